//! UDP: each listening socket is read either by threads of its own that wait on it
//! ([`Listener::Threaded`], the default: the kernel wakes one idle reader per datagram,
//! so a reader that the scheduler holds back does not hold up the next datagram; the
//! proxy's driver keeps each socket's datagrams in order, [`receive_now`]), or
//! by the proxy's driver task when tokio says it is readable ([`Listener::Polled`],
//! [`receive_one`]; replay reads its sockets this way too). Sending never waits
//! ([`send_to`]). On Linux the ICMP errors of what a core-side socket sent
//! (`IP_RECVERR`) are read too: a core host whose port or host is unreachable is
//! reported to the engine at once, which moves the request to another host or answers
//! 503, instead of waiting for silence to time out.

use bytes::Bytes;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

use super::{Inbound, ReceiveContext, TransportEvent};
use crate::config::Transport;
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("cannot bind udp:{addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A UDP socket the proxy listens and sends on, and how it is read.
#[derive(Debug, Clone)]
pub enum Listener {
    /// Registered with tokio's reactor: a task reads it when it is readable
    /// ([`receive_one`]).
    Polled(Arc<UdpSocket>),
    /// Not registered: threads of its own wait on it ([`bind_threaded`]).
    Threaded(Arc<std::net::UdpSocket>),
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Polled(socket) => socket.as_fd(),
            Listener::Threaded(socket) => socket.as_fd(),
        }
    }
}

/// How long a blocking read of a [`Listener::Threaded`] socket waits before its thread
/// looks whether it should stop.
pub const READ_WAIT: Duration = Duration::from_millis(200);

/// Binds `addr` with receive and send buffers of `buffer` bytes (see [`size_buffers`]).
pub async fn bind(addr: SocketAddr, buffer: usize) -> Result<Arc<UdpSocket>, UdpError> {
    let socket = UdpSocket::bind(addr)
        .await
        .map_err(|source| UdpError::Bind { addr, source })?;
    size_buffers(&socket, buffer);
    Ok(Arc::new(socket))
}

/// Binds `addr` for threads that block reading it (each read waits at most
/// [`READ_WAIT`]), with buffers of `buffer` bytes. The socket is not registered with
/// tokio, so a datagram wakes one of its reading threads and nothing else.
pub fn bind_threaded(
    addr: SocketAddr,
    buffer: usize,
) -> Result<Arc<std::net::UdpSocket>, UdpError> {
    let bind_error = |source| UdpError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind_error)?;
    socket
        .set_read_timeout(Some(READ_WAIT))
        .map_err(bind_error)?;
    size_buffers(&socket, buffer);
    Ok(Arc::new(socket))
}

/// Sends one datagram without waiting: a full send buffer is an error (the caller
/// counts it and the sender's retransmission recovers), never a wait.
pub fn send_to(socket: &impl AsFd, bytes: &[u8], to: SocketAddr) -> io::Result<usize> {
    let socket = socket2::SockRef::from(socket);
    #[cfg(target_os = "linux")]
    let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT.bits();
    #[cfg(not(target_os = "linux"))]
    let flags = 0;
    socket.send_to_with_flags(bytes, &to.into(), flags)
}

/// Asks for receive and send buffers of `size` bytes: past `net.core.rmem_max` and
/// `wmem_max` with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` where the process may (Linux,
/// `CAP_NET_ADMIN`), else as much as the limits allow. A buffer smaller than asked is
/// logged once per socket, with the sysctl that caps it: bursts beyond it are dropped
/// by the kernel, and the sender's retransmissions are what recovers them.
pub fn size_buffers(socket: &impl AsFd, size: usize) {
    let reference = socket2::SockRef::from(socket);
    #[cfg(target_os = "linux")]
    let forced = {
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(socket, sockopt::RcvBufForce, &size).is_ok()
            && setsockopt(socket, sockopt::SndBufForce, &size).is_ok()
    };
    #[cfg(not(target_os = "linux"))]
    let forced = false;
    if !forced {
        // Capped by the sysctls; what is granted is read back below.
        let receive = reference.set_recv_buffer_size(size);
        let send = reference.set_send_buffer_size(size);
        if let Err(error) = receive.and(send) {
            tracing::debug!(error = %error, "cannot size a udp socket's buffers");
        }
    }
    // Linux reports twice what was set (the other half is its bookkeeping).
    let granted = |size: io::Result<usize>| size.map(|size| size / 2).unwrap_or(0);
    let (receive, send) = (
        granted(reference.recv_buffer_size()),
        granted(reference.send_buffer_size()),
    );
    if receive < size || send < size {
        tracing::warn!(
            asked = size,
            receive,
            send,
            "udp socket buffers are smaller than sip.udp_buffer (raise net.core.rmem_max and net.core.wmem_max, or grant CAP_NET_ADMIN)"
        );
    } else {
        tracing::debug!(receive, send, "udp socket buffers sized");
    }
}

/// What one read of a UDP socket gave.
// Nearly every read is a message; boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum Received {
    /// A message for the engine.
    Message(Inbound),
    /// A datagram that was read and dropped (counted where it matters): outside the
    /// allow list, a keep-alive, oversized or malformed, or a receive error.
    Dropped,
    /// Nothing is waiting on the socket.
    Empty,
}

/// Reads one datagram from `socket` (bound to `local`) without waiting, and checks and
/// parses it as `context` says. `buffer` must be one byte longer than the largest
/// message allowed, so that an oversized datagram can be told from one that fits.
pub fn receive_one(
    socket: &UdpSocket,
    local: SocketAddr,
    context: &ReceiveContext,
    buffer: &mut [u8],
) -> Received {
    match socket.try_recv_from(buffer) {
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Received::Empty,
        read => admit(read, local, context, buffer),
    }
}

/// Checks and parses what one read of the socket bound to `local` gave (`read`, with
/// the datagram at the start of `buffer`) as `context` says.
pub fn admit(
    read: io::Result<(usize, SocketAddr)>,
    local: SocketAddr,
    context: &ReceiveContext,
    buffer: &[u8],
) -> Received {
    let (length, peer) = match read {
        Ok(received) => received,
        Err(error) => {
            // ICMP errors from earlier sends (ECONNREFUSED) surface here; none of them
            // make the socket unusable.
            tracing::debug!(%local, error = %error, "udp receive error");
            return Received::Dropped;
        }
    };
    if !context.allow.allows(peer.ip()) {
        Stats::bump(&context.stats.not_allowed_dropped);
        tracing::debug!(side = %context.side, %peer, "dropped datagram from a source outside the allow list");
        return Received::Dropped;
    }
    let Some(datagram) = buffer.get(..length) else {
        return Received::Dropped;
    };
    if datagram.iter().all(u8::is_ascii_whitespace) {
        // Keep-alive (RFC 5626 §4.4.1 uses STUN; CRLF pings are common too).
        return Received::Dropped;
    }
    if length > context.max_message_size {
        Stats::bump(&context.stats.malformed_dropped);
        tracing::debug!(side = %context.side, %peer, length, "dropped oversized datagram");
        return Received::Dropped;
    }
    match context.parse(Bytes::copy_from_slice(datagram), true, peer) {
        Some(message) => Received::Message(Inbound {
            side: context.side,
            transport: Transport::Udp,
            local,
            peer,
            message,
        }),
        None => Received::Dropped,
    }
}

/// How many datagrams the kernel dropped, since each socket was made, at the UDP sockets
/// bound to `locals` because their receive buffers were full: the `drops` column of
/// `/proc/net/udp` and `/proc/net/udp6` (Linux). `None` where those cannot be read.
pub fn kernel_drops(locals: &[SocketAddr]) -> Option<u64> {
    let mut total = None;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            *total.get_or_insert(0) += drops_in(&text, locals);
        }
    }
    total
}

/// The sum of the `drops` column over the lines of a `/proc/net/udp*` table whose local
/// address is one of `locals`.
fn drops_in(table: &str, locals: &[SocketAddr]) -> u64 {
    let wanted: Vec<String> = locals.iter().map(|local| proc_address(*local)).collect();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let drops = fields.last()?;
            wanted
                .iter()
                .any(|want| want.eq_ignore_ascii_case(local))
                .then(|| drops.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// An address as `/proc/net/udp*` writes it: the address's 32-bit words in host byte
/// order as hex, a colon, the port as hex.
fn proc_address(addr: SocketAddr) -> String {
    let words = match addr.ip() {
        std::net::IpAddr::V4(v4) => format!("{:08X}", u32::from_ne_bytes(v4.octets())),
        std::net::IpAddr::V6(v6) => v6
            .octets()
            .chunks_exact(4)
            .map(|word| {
                format!(
                    "{:08X}",
                    u32::from_ne_bytes([word[0], word[1], word[2], word[3]])
                )
            })
            .collect(),
    };
    format!("{words}:{:04X}", addr.port())
}

/// Asks the kernel to queue the ICMP errors of what `socket` sends (Linux:
/// `IP_RECVERR`); done before the socket sends anything, so no error is missed. False
/// where that is not possible: silence still ends such a transaction.
pub fn report_unreachable(socket: &impl AsFd) -> bool {
    #[cfg(target_os = "linux")]
    {
        match errors::enable(socket) {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(error = %error, "cannot ask for ICMP errors on a udp socket");
                false
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        false
    }
}

/// The next ICMP error queued on `socket` (after [`report_unreachable`]): the
/// destination it is about and what it says. `WouldBlock` when none is queued.
pub fn next_unreachable(socket: &impl AsFd) -> io::Result<(SocketAddr, &'static str)> {
    #[cfg(target_os = "linux")]
    {
        errors::next(socket)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        Err(io::ErrorKind::WouldBlock.into())
    }
}

/// Reads one datagram from a blocking socket without waiting (`MSG_DONTWAIT`):
/// `WouldBlock` when none is queued.
pub fn receive_now(socket: &impl AsFd, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::socket::{recvmsg, MsgFlags, SockaddrStorage};
        use std::os::fd::AsRawFd;
        let mut iov = [io::IoSliceMut::new(buffer)];
        let message = recvmsg::<SockaddrStorage>(
            socket.as_fd().as_raw_fd(),
            &mut iov,
            None,
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        let length = message.bytes;
        let peer = message
            .address
            .as_ref()
            .and_then(ip_address)
            .ok_or_else(|| io::Error::other("a datagram without its source"))?;
        Ok((length, peer))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (socket, buffer);
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The IP address and port in a socket address the kernel gave, if it is one.
#[cfg(target_os = "linux")]
fn ip_address(address: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    address
        .as_sockaddr_in()
        .map(|v4| SocketAddr::from(*v4))
        .or_else(|| address.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6)))
}

/// How often the error queue is read even without a wake-up, so that no error waits
/// long whatever the readiness bookkeeping did.
const ERROR_QUEUE_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Reports the ICMP errors (port or host unreachable) of what `socket` sent (after
/// [`report_unreachable`]) to the engine as [`TransportEvent::Unreachable`], until
/// cancelled.
pub async fn watch_unreachable(
    socket: Arc<UdpSocket>,
    context: ReceiveContext,
    cancel: CancellationToken,
) {
    #[cfg(target_os = "linux")]
    {
        use tokio::io::Interest;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = socket.ready(Interest::ERROR) => {}
                _ = tokio::time::sleep(ERROR_QUEUE_POLL) => {}
            }
            // Each queued error names the destination of the datagram that caused it.
            while let Ok((addr, reason)) = errors::next(&socket) {
                tracing::debug!(side = %context.side, to = %addr, reason, "udp destination unreachable");
                let event = TransportEvent::Unreachable {
                    side: context.side,
                    addr,
                };
                if let Err(TrySendError::Closed(_)) = context.engine.try_send(event) {
                    return;
                }
            }
            // The queue is empty: wait for the next error (or the next poll).
            let _ = socket.try_io(Interest::ERROR, || {
                Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (socket, context, cancel);
    }
}

#[cfg(target_os = "linux")]
mod errors {
    use std::io;
    use std::net::SocketAddr;
    use std::os::fd::{AsFd, AsRawFd};

    use nix::sys::socket::{
        recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage,
    };

    /// Asks the kernel to queue ICMP errors on the socket (`IP_RECVERR`, `IPV6_RECVERR`).
    pub fn enable(socket: &impl AsFd) -> io::Result<()> {
        let v6 = socket2::SockRef::from(socket)
            .local_addr()?
            .as_socket()
            .is_some_and(|local| local.is_ipv6());
        let result = if v6 {
            setsockopt(socket, sockopt::Ipv6RecvErr, &true)
        } else {
            setsockopt(socket, sockopt::Ipv4RecvErr, &true)
        };
        result.map_err(io::Error::from)
    }

    /// The next queued error: the destination it is about and what it says.
    /// `WouldBlock` when the queue is empty.
    pub fn next(socket: &impl AsFd) -> io::Result<(SocketAddr, &'static str)> {
        let mut buffer = [0u8; 64];
        let mut iov = [io::IoSliceMut::new(&mut buffer)];
        let mut control = nix::cmsg_space!(nix::libc::sock_extended_err, nix::libc::sockaddr_in6);
        let message = recvmsg::<SockaddrStorage>(
            socket.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        let errno = message
            .cmsgs()
            .map_err(io::Error::from)?
            .find_map(|cmsg| match cmsg {
                ControlMessageOwned::Ipv4RecvErr(error, _) => Some(error.ee_errno),
                ControlMessageOwned::Ipv6RecvErr(error, _) => Some(error.ee_errno),
                _ => None,
            });
        let reason = match errno.map(|errno| errno as i32) {
            Some(nix::libc::ECONNREFUSED) => "port unreachable",
            Some(nix::libc::EHOSTUNREACH) => "host unreachable",
            Some(nix::libc::ENETUNREACH) => "network unreachable",
            _ => "unreachable",
        };
        let addr = message
            .address
            .as_ref()
            .and_then(super::ip_address)
            .ok_or_else(|| io::Error::other("an error without its destination"))?;
        Ok((addr, reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threaded_socket_blocks_for_a_datagram_and_gives_up_after_its_read_wait() {
        let socket = bind_threaded("127.0.0.1:0".parse().unwrap(), 1 << 16).unwrap();
        let local = socket.local_addr().unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            send_to(&peer, b"OPTIONS", local).unwrap();
            peer.local_addr().unwrap()
        });
        let mut buffer = [0u8; 64];
        let (length, from) = socket.recv_from(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"OPTIONS");
        assert_eq!(from, sender.join().unwrap());
        // Nothing more comes: the read ends by itself, so its thread can look whether
        // to stop.
        let error = socket.recv_from(&mut buffer).unwrap_err();
        assert!(
            matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{error:?}"
        );
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_threaded_core_socket_reads_the_icmp_error_its_send_caused() {
        let socket = bind_threaded("127.0.0.1:0".parse().unwrap(), 1 << 16).unwrap();
        assert!(report_unreachable(&socket));
        // A port nobody listens on: the kernel answers port unreachable.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let nobody = closed.local_addr().unwrap();
        drop(closed);
        send_to(&socket, b"INVITE", nobody).unwrap();
        let mut buffer = [0u8; 64];
        // The blocked read returns the error; the queue then names the destination.
        assert!(socket.recv_from(&mut buffer).is_err());
        let (addr, reason) = next_unreachable(&socket).unwrap();
        assert_eq!((addr, reason), (nobody, "port unreachable"));
        assert_eq!(
            next_unreachable(&socket).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn kernel_drops_are_read_for_our_sockets_only() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  440: 0100007F:13C4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 260053 2 000000003986afa6 17\n\
 4556: 0100007F:13C6 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 260054 2 0000000003c77dd2 5\n\
 4558: 00000000:13C4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 260055 2 000000003ab6eb97 1000\n";
        let ours: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        let also: SocketAddr = "127.0.0.1:5062".parse().unwrap();
        assert_eq!(drops_in(table, &[ours]), 17);
        assert_eq!(drops_in(table, &[ours, also]), 22);
        // Another socket on the same port but another address is not ours.
        assert_eq!(drops_in(table, &["127.0.0.2:5060".parse().unwrap()]), 0);
        assert_eq!(drops_in("garbage\nmore garbage", &[ours]), 0);
        assert_eq!(
            proc_address("[::1]:5060".parse().unwrap()),
            "00000000000000000000000001000000:13C4"
        );
    }
}
