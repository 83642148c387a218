//! UDP: one receive task per listening socket. The engine sends on the same sockets with
//! `try_send_to`, which never waits.

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

pub async fn bind(addr: SocketAddr) -> Result<Arc<UdpSocket>, UdpError> {
    UdpSocket::bind(addr)
        .await
        .map(Arc::new)
        .map_err(|source| UdpError::Bind { addr, source })
}

/// Receives datagrams until cancelled.
pub async fn receive_loop(
    socket: Arc<UdpSocket>,
    context: ReceiveContext,
    cancel: CancellationToken,
) {
    let local = match socket.local_addr() {
        Ok(local) => local,
        Err(error) => {
            tracing::error!(error = %error, "udp socket has no local address; receive loop not started");
            return;
        }
    };
    // One byte more than the limit tells an oversized datagram from one that fits.
    let mut buffer = vec![0u8; context.max_message_size + 1];
    loop {
        let received = tokio::select! {
            _ = cancel.cancelled() => return,
            received = socket.recv_from(&mut buffer) => received,
        };
        let (length, peer) = match received {
            Ok(received) => received,
            Err(error) => {
                // ICMP errors from earlier sends (ECONNREFUSED) surface here; none of them
                // make the socket unusable.
                tracing::debug!(%local, error = %error, "udp receive error");
                continue;
            }
        };
        if !context.allow.allows(peer.ip()) {
            Stats::bump(&context.stats.not_allowed_dropped);
            tracing::debug!(side = %context.side, %peer, "dropped datagram from a source outside the allow list");
            continue;
        }
        let datagram = &buffer[..length];
        if datagram.iter().all(u8::is_ascii_whitespace) {
            // Keep-alive (RFC 5626 §4.4.1 uses STUN; CRLF pings are common too).
            continue;
        }
        if length > context.max_message_size {
            Stats::bump(&context.stats.malformed_dropped);
            tracing::debug!(side = %context.side, %peer, length, "dropped oversized datagram");
            continue;
        }
        let Some(message) = context.parse(datagram, true, peer) else {
            continue;
        };
        let event = TransportEvent::Message(Inbound {
            side: context.side,
            transport: Transport::Udp,
            local,
            peer,
            message,
        });
        match context.engine.try_send(event) {
            Ok(()) => Stats::bump(&context.stats.messages_received),
            Err(TrySendError::Full(_)) => {
                // The sender retransmits; dropping keeps this loop from blocking.
                Stats::bump(&context.stats.queue_full_dropped);
            }
            Err(TrySendError::Closed(_)) => return,
        }
    }
}
