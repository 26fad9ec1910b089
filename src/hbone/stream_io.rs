//! A CONNECT stream as a byte stream (`AsyncRead` + `AsyncWrite`), so that a second TLS +
//! HTTP/2 connection can run inside it: the inner tunnel of double HBONE, carried by the outer
//! tunnel to a network's gateway.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::Lease;
use super::H2Stream;

/// An outer CONNECT stream used as the transport of an inner connection. It holds the outer
/// connection's stream slot (`lease`) for as long as the inner connection lives.
pub struct StreamIo {
    stream: H2Stream,
    /// What was received but not yet read.
    pending: Bytes,
    ended: bool,
    _lease: Option<Lease>,
}

impl StreamIo {
    pub fn new(stream: H2Stream, lease: Option<Lease>) -> Self {
        StreamIo {
            stream,
            pending: Bytes::new(),
            ended: false,
            _lease: lease,
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.stream.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                Some(Ok(chunk)) => {
                    // The window is given back as the bytes arrive here: what the inner
                    // connection has not read yet is bounded by one chunk.
                    let _ = self
                        .stream
                        .recv
                        .flow_control()
                        .release_capacity(chunk.len());
                    self.pending = chunk;
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.stream.send;
        // Only what the peer's window (and h2's send buffer) has room for is handed over, so
        // the inner connection is back-pressured by the outer stream's flow control.
        send.reserve_capacity(buf.len());
        let granted = match ready!(send.poll_capacity(cx)) {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
            None => 0,
        };
        if granted == 0 {
            return match ready!(send.poll_reset(cx)) {
                Ok(reason) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("outer stream reset: {reason:?}"),
                ))),
                Err(e) => Poll::Ready(Err(h2_io(e))),
            };
        }
        let n = granted.min(buf.len());
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes what `send_data` queued; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if std::mem::replace(&mut self.ended, true) {
            return Poll::Ready(Ok(()));
        }
        Poll::Ready(
            self.stream
                .send
                .send_data(Bytes::new(), true)
                .map_err(h2_io),
        )
    }
}
