//! TCP and TLS: an accept loop per listener and one task per connection that frames the
//! stream (see [`crate::sip::framing`]), answers CRLF keep-alive pings, writes what the
//! engine queues for it, and closes after `tcp_idle_timeout` without traffic. Outbound
//! connections (to the core, or back to an Edge whose connection went away) are opened on
//! demand by [`TcpContext::connect`] and then behave the same. A TLS connection is a TCP
//! one with a handshake first ([`super::tls`]); limits and timeouts are the same.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tls::{Failure, TlsClient, TlsServer};
use super::{ConnectionId, Inbound, ReceiveContext, Side, TransportEvent};
use crate::config::Transport;
use crate::sip::framing::{Frame, StreamFramer, PONG};
use crate::stats::Stats;

/// Messages queued for one connection before further sends are dropped and counted.
const CONNECTION_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("cannot bind tcp:{addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, TcpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| TcpError::Bind { addr, source })
}

/// Everything connection tasks of one side share.
#[derive(Clone)]
pub struct TcpContext {
    pub receive: ReceiveContext,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// A write that takes longer closes the connection: its peer stopped reading.
    pub write_timeout: Duration,
    pub max_connections: usize,
    pub open_connections: Arc<AtomicUsize>,
    pub next_id: Arc<AtomicU64>,
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
    /// Which TLS failures were logged lately.
    pub tls_failures: Arc<super::tls::FailureLog>,
}

/// Counts a connection for `tcp_max_connections` while it lives.
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl TcpContext {
    fn reserve_slot(&self) -> Option<ConnectionSlot> {
        let previous = self.open_connections.fetch_add(1, Ordering::Relaxed);
        let slot = ConnectionSlot(self.open_connections.clone());
        (previous < self.max_connections).then_some(slot)
    }

    fn new_id(&self) -> ConnectionId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Opens a connection to `peer` in the background (TLS with `tls`) and returns its id
    /// and queue at once; what is queued is written once connected. A failed connect or
    /// handshake is reported to the engine as `ConnectionClosed { connect_failed: true }`.
    pub fn connect(
        &self,
        peer: SocketAddr,
        tls: Option<(usize, Arc<TlsClient>)>,
    ) -> (ConnectionId, mpsc::Sender<Bytes>) {
        let owner = tls.as_ref().map(|(trunk, _)| *trunk);
        let tls = tls.map(|(_, client)| client);
        let id = self.new_id();
        let transport = if tls.is_some() {
            Transport::Tls
        } else {
            Transport::Tcp
        };
        let (sender, mut receiver) = mpsc::channel(CONNECTION_QUEUE);
        let context = self.clone();
        self.tracker.spawn(async move {
            let side = context.receive.side;
            let Some(slot) = context.reserve_slot() else {
                Stats::bump(&context.receive.stats.tcp_connections_refused);
                tracing::warn!(%side, %peer, "tcp connection limit reached; not connecting");
                context.discard(&mut receiver);
                context.report_closed(transport, peer, owner, id, true).await;
                return;
            };
            let connected = tokio::select! {
                _ = context.cancel.cancelled() => return,
                connected = tokio::time::timeout(context.connect_timeout, TcpStream::connect(peer)) => connected,
            };
            let stream = match connected {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::warn!(%side, %peer, %transport, error = %error, "connect failed");
                    context.discard(&mut receiver);
                    context.report_closed(transport, peer, owner, id, true).await;
                    return;
                }
                Err(_) => {
                    tracing::warn!(%side, %peer, %transport, timeout = ?context.connect_timeout, "connect timed out");
                    context.discard(&mut receiver);
                    context.report_closed(transport, peer, owner, id, true).await;
                    return;
                }
            };
            set_nodelay(&stream, side, peer);
            let Some(tls) = tls else {
                Stats::bump(&context.receive.stats.tcp_connections_opened);
                tracing::debug!(%side, %peer, id, "tcp connection opened");
                context.serve(stream, Transport::Tcp, peer, None, id, receiver).await;
                drop(slot);
                return;
            };
            let handshake = tls.connector().connect(tls.server_name(), stream);
            let handshake = tokio::select! {
                _ = context.cancel.cancelled() => return,
                handshake = tokio::time::timeout(context.connect_timeout, handshake) => handshake,
            };
            match handshake {
                Ok(Ok(stream)) => {
                    Stats::bump(&context.receive.stats.tcp_connections_opened);
                    tracing::debug!(%side, %peer, id, "tls connection opened");
                    context.serve(stream, Transport::Tls, peer, owner, id, receiver).await;
                    drop(slot);
                }
                Ok(Err(error)) => {
                    context.handshake_failed(peer, &Failure::of(&error));
                    context.discard(&mut receiver);
                    context.report_closed(transport, peer, owner, id, true).await;
                }
                Err(_) => {
                    context.handshake_failed(peer, &Failure::Other("no handshake within tcp_connect_timeout".into()));
                    context.discard(&mut receiver);
                    context.report_closed(transport, peer, owner, id, true).await;
                }
            }
        });
        (id, sender)
    }

    /// Counts a failed TLS handshake, and logs it unless the same peer failed the
    /// same way within the last minute.
    fn handshake_failed(&self, peer: SocketAddr, failure: &Failure) {
        Stats::bump(failure.counter(&self.receive.stats));
        let side = self.receive.side;
        if self.tls_failures.should_log(peer, failure, Instant::now()) {
            tracing::warn!(%side, %peer, reason = %failure, "tls handshake failed");
        } else {
            tracing::debug!(%side, %peer, reason = %failure, "tls handshake failed again");
        }
    }

    /// Counts what was queued for a connection that will never carry it.
    fn discard(&self, queue: &mut mpsc::Receiver<Bytes>) {
        queue.close();
        while queue.try_recv().is_ok() {
            Stats::bump(&self.receive.stats.send_failed);
        }
    }

    async fn report_closed(
        &self,
        transport: Transport,
        peer: SocketAddr,
        owner: Option<usize>,
        id: ConnectionId,
        connect_failed: bool,
    ) {
        let event = TransportEvent::ConnectionClosed {
            side: self.receive.side,
            transport,
            peer,
            owner,
            id,
            connect_failed,
        };
        // The engine is gone only during shutdown, when nobody needs the news.
        let _ = self.receive.engine.send(event).await;
    }

    /// Reads, frames and writes one connection until it closes, idles out or shutdown.
    async fn serve<S: Connection>(
        &self,
        stream: S,
        transport: Transport,
        peer: SocketAddr,
        owner: Option<usize>,
        id: ConnectionId,
        mut outgoing: mpsc::Receiver<Bytes>,
    ) {
        let side = self.receive.side;
        let local = match stream.local() {
            Ok(local) => local,
            Err(error) => {
                tracing::debug!(%side, %peer, error = %error, "connection lost before use");
                self.report_closed(transport, peer, owner, id, false).await;
                return;
            }
        };
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut heard = false;
        // A peer that refused this connection (a TLS alert before it sent anything):
        // what was sent on it is lost, as after a failed connect.
        let mut refused = false;
        let mut framer = StreamFramer::new(self.receive.max_message_size);
        let mut idle_deadline = Instant::now() + self.idle_timeout;
        // A message the engine's full queue could not take yet. While one waits, this
        // connection reads no more (back-pressure on this peer only), but it goes on
        // writing what the engine sends it: the answers that will drain the queue.
        let mut stalled: Option<TransportEvent> = None;
        let mut batch_buffer = bytes::BytesMut::new();
        let reason = 'connection: loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break 'connection "shutdown",
                _ = tokio::time::sleep_until(idle_deadline) => break 'connection "idle",
                read = reader.read_buf(framer.buffer_mut()), if stalled.is_none() => {
                    match read {
                        Ok(0) => break 'connection "closed by peer",
                        Ok(_) => {}
                        Err(error) => {
                            // A TLS 1.3 server refuses a client certificate only after
                            // the handshake, on the first read.
                            if !heard && Failure::is_tls(&error) {
                                refused = true;
                                // TLS connections the sidecar opens always have an owner.
                                let failure = match owner {
                                    Some(_) => Failure::of(&error),
                                    None => Failure::of(&error).as_listener(),
                                };
                                self.handshake_failed(peer, &failure);
                            } else {
                                tracing::debug!(%side, %peer, error = %error, "read failed");
                            }
                            break 'connection "read error";
                        }
                    }
                    heard = true;
                    idle_deadline = Instant::now() + self.idle_timeout;
                    let arrival = Arrival { side, transport, local, peer };
                    match self.hand_over(&mut framer, &mut writer, arrival).await {
                        Ok(waiting) => stalled = waiting,
                        Err(reason) => break 'connection reason,
                    }
                }
                permit = self.receive.engine.reserve(), if stalled.is_some() => {
                    let Ok(permit) = permit else { break 'connection "shutdown" };
                    if let Some(event) = stalled.take() {
                        permit.send(event);
                        Stats::bump(&self.receive.stats.messages_received);
                    }
                    // What was framed behind it goes on now.
                    let arrival = Arrival { side, transport, local, peer };
                    match self.hand_over(&mut framer, &mut writer, arrival).await {
                        Ok(waiting) => stalled = waiting,
                        Err(reason) => break 'connection reason,
                    }
                }
                queued = outgoing.recv() => {
                    let Some(bytes) = queued else { break 'connection "engine dropped the connection" };
                    // Whatever else is queued goes in the same write: one system call
                    // (one TLS record) for a burst instead of one per message, so the
                    // queue drains as fast as the engine fills it.
                    let batch = gather(bytes, &mut outgoing, &mut batch_buffer);
                    if let Err(reason) = self.write(&mut writer, &batch, peer).await {
                        Stats::bump(&self.receive.stats.send_failed);
                        break 'connection reason;
                    }
                    idle_deadline = Instant::now() + self.idle_timeout;
                }
            }
        };
        tracing::debug!(%side, %peer, %transport, id, reason, "connection closed");
        self.discard(&mut outgoing);
        self.report_closed(transport, peer, owner, id, refused)
            .await;
    }
}

/// The most one write gathers from a connection's queue.
const BATCH_BYTES: usize = 64 * 1024;

/// `first` and whatever else waits in `queue`, up to [`BATCH_BYTES`], as one buffer
/// (`first` itself when nothing else waits).
fn gather(first: Bytes, queue: &mut mpsc::Receiver<Bytes>, buffer: &mut bytes::BytesMut) -> Bytes {
    let Ok(second) = queue.try_recv() else {
        return first;
    };
    buffer.clear();
    buffer.extend_from_slice(&first);
    buffer.extend_from_slice(&second);
    while buffer.len() < BATCH_BYTES {
        let Ok(next) = queue.try_recv() else { break };
        buffer.extend_from_slice(&next);
    }
    buffer.split().freeze()
}

/// Where a connection's messages come from.
#[derive(Clone, Copy)]
struct Arrival {
    side: Side,
    transport: Transport,
    local: SocketAddr,
    peer: SocketAddr,
}

impl TcpContext {
    /// Hands every complete message in `framer` to the engine, answering keep-alive
    /// pings on `writer`. Returns the message the engine's full queue could not take
    /// (the caller waits for room before reading on), or why the connection ends.
    async fn hand_over(
        &self,
        framer: &mut StreamFramer,
        writer: &mut (impl AsyncWrite + Unpin),
        arrival: Arrival,
    ) -> Result<Option<TransportEvent>, &'static str> {
        let Arrival {
            side,
            transport,
            local,
            peer,
        } = arrival;
        loop {
            match framer.next_frame() {
                Ok(None) => return Ok(None),
                Ok(Some(Frame::Ping)) => self.write(writer, PONG, peer).await?,
                Ok(Some(Frame::Message(bytes))) => {
                    let Some(message) = self.receive.parse(bytes, false, peer) else {
                        continue;
                    };
                    let event = TransportEvent::Message(Inbound {
                        side,
                        transport,
                        local,
                        peer,
                        message,
                    });
                    match self.receive.engine.try_send(event) {
                        Ok(()) => Stats::bump(&self.receive.stats.messages_received),
                        Err(mpsc::error::TrySendError::Full(event)) => return Ok(Some(event)),
                        Err(mpsc::error::TrySendError::Closed(_)) => return Err("shutdown"),
                    }
                }
                Err(error) => {
                    Stats::bump(&self.receive.stats.tcp_framing_errors);
                    tracing::warn!(%side, %peer, error = %error, "closing tcp connection: stream cannot be framed");
                    return Err("framing error");
                }
            }
        }
    }
}

impl TcpContext {
    /// Writes `bytes` within `write_timeout`; the error names why the connection ends.
    async fn write(
        &self,
        writer: &mut (impl AsyncWrite + Unpin),
        bytes: &[u8],
        peer: SocketAddr,
    ) -> Result<(), &'static str> {
        let side = self.receive.side;
        match tokio::time::timeout(self.write_timeout, writer.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                tracing::debug!(%side, %peer, error = %error, "tcp write failed");
                Err("write error")
            }
            Err(_) => {
                Stats::bump(&self.receive.stats.tcp_write_timeouts);
                tracing::warn!(%side, %peer, timeout = ?self.write_timeout, "closing tcp connection: the peer stopped reading");
                Err("write timeout")
            }
        }
    }
}

/// A byte stream a connection task serves: TCP, or TLS over TCP.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn local(&self) -> io::Result<SocketAddr>;
}

impl Connection for TcpStream {
    fn local(&self) -> io::Result<SocketAddr> {
        self.local_addr()
    }
}

impl Connection for tokio_rustls::client::TlsStream<TcpStream> {
    fn local(&self) -> io::Result<SocketAddr> {
        self.get_ref().0.local_addr()
    }
}

impl Connection for tokio_rustls::server::TlsStream<TcpStream> {
    fn local(&self) -> io::Result<SocketAddr> {
        self.get_ref().0.local_addr()
    }
}

/// Nagle would hold small SIP messages back behind unacknowledged ones.
fn set_nodelay(stream: &TcpStream, side: Side, peer: SocketAddr) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%side, %peer, error = %error, "cannot set TCP_NODELAY");
    }
}

/// Accepts connections until cancelled; with `tls`, each one after its handshake.
pub async fn accept_loop(listener: TcpListener, context: TcpContext, tls: Option<Arc<TlsServer>>) {
    let transport = if tls.is_some() {
        Transport::Tls
    } else {
        Transport::Tcp
    };
    loop {
        let accepted = tokio::select! {
            _ = context.cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %error, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let side = context.receive.side;
        if !context.receive.allow.allows(peer.ip()) {
            Stats::bump(&context.receive.stats.not_allowed_dropped);
            tracing::debug!(%side, %peer, "refused connection from a source outside the allow list");
            continue;
        }
        let Some(slot) = context.reserve_slot() else {
            Stats::bump(&context.receive.stats.tcp_connections_refused);
            tracing::warn!(%side, %peer, "tcp connection limit reached; refusing connection");
            continue;
        };
        set_nodelay(&stream, side, peer);
        let task_context = context.clone();
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        // The handshake runs in the connection's task: a slow peer holds up no one else.
        context.tracker.spawn(async move {
            let context = task_context;
            let Some(acceptor) = acceptor else {
                if let Some((id, receiver)) = context.opened(transport, peer).await {
                    context.serve(stream, transport, peer, None, id, receiver).await;
                }
                drop(slot);
                return;
            };
            let handshake = tokio::select! {
                _ = context.cancel.cancelled() => return,
                handshake = tokio::time::timeout(context.connect_timeout, acceptor.accept(stream)) => handshake,
            };
            match handshake {
                Ok(Ok(stream)) => {
                    if let Some((id, receiver)) = context.opened(transport, peer).await {
                        context.serve(stream, transport, peer, None, id, receiver).await;
                    }
                }
                Ok(Err(error)) => context.handshake_failed(peer, &Failure::of(&error).as_listener()),
                Err(_) => context.handshake_failed(
                    peer,
                    &Failure::Other("no handshake within tcp_connect_timeout".into()),
                ),
            }
            drop(slot);
        });
    }
}

impl TcpContext {
    /// Tells the engine about an accepted connection; its id and queue, or `None` when
    /// the engine is gone.
    async fn opened(
        &self,
        transport: Transport,
        peer: SocketAddr,
    ) -> Option<(ConnectionId, mpsc::Receiver<Bytes>)> {
        Stats::bump(&self.receive.stats.tcp_connections_opened);
        let id = self.new_id();
        let (sender, receiver) = mpsc::channel(CONNECTION_QUEUE);
        let opened = TransportEvent::ConnectionOpened {
            side: self.receive.side,
            transport,
            peer,
            owner: None,
            id,
            sender,
        };
        self.receive.engine.send(opened).await.ok()?;
        Some((id, receiver))
    }
}

#[cfg(test)]
mod gather_tests {
    use super::*;

    #[test]
    fn a_write_gathers_what_is_queued_up_to_its_bound_and_keeps_the_order() {
        let (sender, mut queue) = mpsc::channel(16);
        let mut buffer = bytes::BytesMut::new();
        // Nothing else queued: the message itself, not a copy.
        let alone = Bytes::from_static(b"one");
        assert_eq!(gather(alone.clone(), &mut queue, &mut buffer), alone);
        for part in [&b"two"[..], b"three", b"four"] {
            sender.try_send(Bytes::copy_from_slice(part)).unwrap();
        }
        let batch = gather(Bytes::from_static(b"one"), &mut queue, &mut buffer);
        assert_eq!(&batch[..], b"onetwothreefour");
        assert!(queue.try_recv().is_err());
        // Past the bound the rest waits for the next write.
        let big = Bytes::from(vec![b'x'; BATCH_BYTES]);
        sender.try_send(big.clone()).unwrap();
        sender.try_send(Bytes::from_static(b"later")).unwrap();
        let batch = gather(Bytes::from_static(b"head"), &mut queue, &mut buffer);
        assert_eq!(batch.len(), 4 + BATCH_BYTES);
        assert_eq!(&queue.try_recv().unwrap()[..], b"later");
    }
}
