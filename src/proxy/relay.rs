//! Moving bytes: TCP↔TCP and TCP↔HTTP/2 stream, both directions at once, half-close propagated.
//!
//! A direction waits for its socket to become readable before it takes a buffer, so an idle
//! connection holds no buffer at all. Buffers start small and double while reads fill them, up
//! to [`MAX_BUF`]. Reads from TCP are handed to HTTP/2 as `Bytes` without another copy. Each
//! read bumps the connection's Prometheus counter once.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

use super::buffers::ConnectionBuffers;
use crate::hbone::H2Stream;
use crate::metrics::connection::{ByteCounters, ConnectionGuard};

const MIN_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 256 * 1024;
/// A read this much smaller than its buffer is copied out, and the buffer freed at once: a
/// trickle of small messages must not pin a large buffer per connection while it is queued.
const COPY_BELOW_FRACTION: usize = 8;

/// Bytes moved each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    pub to_server: u64,
    pub to_client: u64,
}

/// Puts a finished relay's byte totals, and its error if it ended abnormally, on the
/// connection's record.
pub fn record(guard: &mut ConnectionGuard, (moved, result): (Transferred, io::Result<()>)) {
    guard.set_bytes(moved.to_server, moved.to_client);
    if let Err(e) = result {
        guard.note_error(e);
    }
}

/// How much to read next from one socket: follows the traffic.
struct ChunkSize(usize);

impl ChunkSize {
    fn new() -> Self {
        ChunkSize(MIN_BUF)
    }

    fn get(&self) -> usize {
        self.0
    }

    /// After `n` bytes were read into a buffer of `capacity`: doubles while reads fill chunks,
    /// halves when they come in small; says whether the bytes should be copied out so the
    /// buffer can be freed.
    fn after_read(&mut self, n: usize, capacity: usize) -> bool {
        if n == self.0 {
            self.0 = (self.0 * 2).min(MAX_BUF);
        } else if n < self.0 / 4 {
            self.0 = (self.0 / 2).max(MIN_BUF);
        }
        n < capacity / COPY_BELOW_FRACTION
    }
}

/// Reads one socket in chunks whose size follows the traffic.
struct ChunkReader {
    size: ChunkSize,
}

impl ChunkReader {
    fn new() -> Self {
        ChunkReader {
            size: ChunkSize::new(),
        }
    }

    /// The next chunk; empty at end of stream.
    async fn next(&mut self, r: &OwnedReadHalf) -> io::Result<Bytes> {
        loop {
            r.readable().await?;
            let mut buf = BytesMut::with_capacity(self.size.get());
            let n = match r.try_read_buf(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            let capacity = buf.capacity();
            return Ok(if self.size.after_read(n, capacity) {
                Bytes::copy_from_slice(&buf)
            } else {
                buf.freeze()
            });
        }
    }
}

async fn tcp_to_tcp<W>(
    r: &OwnedReadHalf,
    w: &mut W,
    counter: &Counter,
    total: &mut u64,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut reader = ChunkReader::new();
    loop {
        let chunk = reader.next(r).await?;
        if chunk.is_empty() {
            return w.shutdown().await;
        }
        w.write_all(&chunk).await?;
        *total += chunk.len() as u64;
        counter.inc_by(chunk.len() as u64);
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Moves what the app sends into the stream. It reads only what the peer's flow-control
/// window grants and what the connection's buffer budget has room for, so a peer that does
/// not take the bytes stops the app's reads (TCP back-pressure) instead of filling weft: a
/// stalled stream holds no buffer at all.
async fn tcp_to_h2(
    r: &OwnedReadHalf,
    send: &mut SendStream<Bytes>,
    buffers: &ConnectionBuffers,
    counter: &Counter,
    total: &mut u64,
) -> io::Result<()> {
    let mut size = ChunkSize::new();
    loop {
        r.readable().await?;
        let granted = window(send, size.get()).await?;
        let mut room = buffers.reserve(granted).await;
        let want = room.len();
        let mut buf = Vec::with_capacity(want);
        let read = r.try_read_buf(&mut buf);
        let n = match read {
            Ok(0) => return send.send_data(Bytes::new(), true).map_err(h2_io),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                send.reserve_capacity(0);
                continue;
            }
            Err(e) => return Err(e),
        };
        if size.after_read(n, want) {
            buf = buf[..n].to_vec();
            room.shrink_to(n);
        }
        send.send_data(room.attach(buf), false).map_err(h2_io)?;
        // Window granted but not used goes back to the connection, where other streams need it.
        send.reserve_capacity(0);
        *total += n as u64;
        counter.inc_by(n as u64);
    }
}

/// Waits until the peer's window lets the stream send something; how much (at most `want`).
async fn window(send: &mut SendStream<Bytes>, want: usize) -> io::Result<usize> {
    send.reserve_capacity(want);
    loop {
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(0)) => continue,
            Some(Ok(c)) => return Ok(c.min(want)),
            Some(Err(e)) => return Err(h2_io(e)),
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
        }
    }
}

async fn h2_to_tcp<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    w: &mut W,
    counter: &Counter,
    total: &mut u64,
) -> io::Result<()> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let n = chunk.len();
        w.write_all(&chunk).await?;
        // Window is returned only once the bytes are written: back-pressure end to end.
        recv.flow_control().release_capacity(n).map_err(h2_io)?;
        *total += n as u64;
        counter.inc_by(n as u64);
    }
    w.shutdown().await
}

/// Makes the coming close a TCP RST, so the app sees an abort rather than a clean end.
fn abort(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
}

/// Runs both directions until both have ended; the first error aborts the other direction
/// (dropping it closes its sockets or resets its stream).
///
/// The directions are pinned by the caller and borrowed here: a future moved into an async
/// function is stored twice in its state (once as the argument, once where it is pinned), and
/// this state lives as long as the connection.
async fn both(
    mut a: Pin<&mut impl Future<Output = io::Result<()>>>,
    mut b: Pin<&mut impl Future<Output = io::Result<()>>>,
) -> io::Result<()> {
    let (mut a_done, mut b_done) = (false, false);
    while !(a_done && b_done) {
        tokio::select! {
            r = &mut a, if !a_done => { r?; a_done = true; }
            r = &mut b, if !b_done => { r?; b_done = true; }
        }
    }
    Ok(())
}

/// Relays between a downstream (client-side) and upstream (server-side) TCP connection.
pub async fn tcp_tcp(
    client: TcpStream,
    server: TcpStream,
    counters: &ByteCounters,
) -> (Transferred, io::Result<()>) {
    let (cr, mut cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    let mut t = Transferred::default();
    let r = both(
        pin!(tcp_to_tcp(
            &cr,
            &mut sw,
            &counters.to_server,
            &mut t.to_server
        )),
        pin!(tcp_to_tcp(
            &sr,
            &mut cw,
            &counters.to_client,
            &mut t.to_client
        )),
    )
    .await;
    if r.is_err() {
        abort(cw.as_ref());
        abort(sw.as_ref());
    }
    (t, r)
}

/// Which end of the tunnel the TCP side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpSide {
    /// The app client (outbound): TCP → stream is towards the server.
    Client,
    /// The app server (inbound): stream → TCP is towards the server.
    Server,
}

/// Relays between a TCP connection and an HBONE stream.
pub async fn tcp_h2(
    tcp: TcpStream,
    stream: H2Stream,
    side: TcpSide,
    counters: &ByteCounters,
) -> (Transferred, io::Result<()>) {
    let H2Stream {
        mut send,
        mut recv,
        buffers,
    } = stream;
    let (tr, mut tw) = tcp.into_split();
    let mut t = Transferred::default();
    let (from_tcp, from_h2, tcp_total, h2_total) = match side {
        TcpSide::Client => (
            &counters.to_server,
            &counters.to_client,
            &mut t.to_server,
            &mut t.to_client,
        ),
        TcpSide::Server => (
            &counters.to_client,
            &counters.to_server,
            &mut t.to_client,
            &mut t.to_server,
        ),
    };
    let r = both(
        pin!(tcp_to_h2(&tr, &mut send, &buffers, from_tcp, tcp_total)),
        pin!(h2_to_tcp(&mut recv, &mut tw, from_h2, h2_total)),
    )
    .await;
    if r.is_err() {
        // An abort, not an end: RST_STREAM to the tunnel peer, RST to the app.
        send.send_reset(h2::Reason::CANCEL);
        abort(tw.as_ref());
    }
    (t, r)
}
