//! UDP: one receive task per listening socket. The engine sends on the same sockets with
//! `try_send_to`, which never waits. On Linux a second task per core-side socket reads
//! the ICMP errors its sends caused (`IP_RECVERR`): a core host whose port or host is
//! unreachable is reported to the engine at once, which moves the request to another
//! host or answers 503, instead of waiting for silence to time out.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

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

/// Binds `addr` with receive and send buffers of `buffer` bytes (see [`size_buffers`]).
pub async fn bind(addr: SocketAddr, buffer: usize) -> Result<Arc<UdpSocket>, UdpError> {
    let socket = UdpSocket::bind(addr)
        .await
        .map_err(|source| UdpError::Bind { addr, source })?;
    size_buffers(&socket, buffer);
    Ok(Arc::new(socket))
}

/// Asks for receive and send buffers of `size` bytes: past `net.core.rmem_max` and
/// `wmem_max` with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` where the process may (Linux,
/// `CAP_NET_ADMIN`), else as much as the limits allow. A buffer smaller than asked is
/// logged once per socket, with the sysctl that caps it: bursts beyond it are dropped
/// by the kernel, and the sender's retransmissions are what recovers them.
pub fn size_buffers(socket: &UdpSocket, size: usize) {
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
    let (length, peer) = match socket.try_recv_from(buffer) {
        Ok(received) => received,
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Received::Empty,
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
    match context.parse(datagram, true, peer) {
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

/// Asks the kernel to queue the ICMP errors of what `socket` sends (Linux:
/// `IP_RECVERR`); done before the socket sends anything, so no error is missed. False
/// where that is not possible: silence still ends such a transaction.
pub fn report_unreachable(socket: &UdpSocket) -> bool {
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
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage,
    };
    use tokio::net::UdpSocket;

    /// Asks the kernel to queue ICMP errors on the socket (`IP_RECVERR`, `IPV6_RECVERR`).
    pub fn enable(socket: &UdpSocket) -> io::Result<()> {
        let v6 = socket.local_addr()?.is_ipv6();
        let result = if v6 {
            setsockopt(socket, sockopt::Ipv6RecvErr, &true)
        } else {
            setsockopt(socket, sockopt::Ipv4RecvErr, &true)
        };
        result.map_err(io::Error::from)
    }

    /// The next queued error: the destination it is about and what it says.
    /// `WouldBlock` when the queue is empty.
    pub fn next(socket: &UdpSocket) -> io::Result<(SocketAddr, &'static str)> {
        let mut buffer = [0u8; 64];
        let mut iov = [io::IoSliceMut::new(&mut buffer)];
        let mut control = nix::cmsg_space!(nix::libc::sock_extended_err, nix::libc::sockaddr_in6);
        let message = recvmsg::<SockaddrStorage>(
            socket.as_raw_fd(),
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
            .and_then(|address| {
                address
                    .as_sockaddr_in()
                    .map(|v4| SocketAddr::from(*v4))
                    .or_else(|| address.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6)))
            })
            .ok_or_else(|| io::Error::other("an error without its destination"))?;
        Ok((addr, reason))
    }
}
