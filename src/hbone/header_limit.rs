//! Counting the header-list limit. HTTP/2 enforces it for weft: a request whose header list is
//! larger than the advertised limit is answered 431 inside h2 and never reaches weft's code.
//! h2 tells of it only with a debug event, emitted while the connection is being polled. So
//! [`layer`] (installed with weft's log subscriber) counts that event on the polling thread,
//! and [`accept`] (the poll of one served connection) turns the count into a reached
//! limit for that connection's peer once the poll is over (a log line cannot be written from
//! inside the subscriber that is handling an event).

use std::cell::Cell;
use std::net::SocketAddr;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context as LayerContext, Layer};

use crate::proxy::limits::{Limit, LimitReports};

/// Where h2 reports an oversized header list, and how its message starts.
const H2_TARGET: &str = "h2::proto::streams::recv";
const H2_MESSAGE: &str = "stream error REQUEST_HEADER_FIELDS_TOO_LARGE";

thread_local! {
    /// Oversized header lists seen on this thread since the current poll began.
    static OVERSIZED: Cell<u32> = const { Cell::new(0) };
}

/// The layer that counts h2's oversized-header events; it sees nothing else.
pub fn layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    OversizedHeaders.with_filter(Targets::new().with_target(H2_TARGET, Level::DEBUG))
}

struct OversizedHeaders;

impl<S: Subscriber> Layer<S> for OversizedHeaders {
    fn on_event(&self, event: &Event<'_>, _ctx: LayerContext<'_, S>) {
        let mut message = IsOversized(false);
        event.record(&mut message);
        if message.0 {
            OVERSIZED.with(|n| n.set(n.get().saturating_add(1)));
        }
    }
}

struct IsOversized(bool);

impl Visit for IsOversized {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}").starts_with(H2_MESSAGE);
        }
    }
}

/// The next stream of a served connection, as `Connection::accept`; every oversized header
/// list h2 refused meanwhile is reported as reached by `peer`.
pub async fn accept<T, B>(
    conn: &mut h2::server::Connection<T, B>,
    peer: SocketAddr,
    reports: &LimitReports,
) -> Option<Result<(http::Request<h2::RecvStream>, h2::server::SendResponse<B>), h2::Error>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: bytes::Buf,
{
    std::future::poll_fn(|cx| {
        // A count left by another connection's poll on this thread (an h2 client's) is not ours.
        OVERSIZED.with(|n| n.set(0));
        let polled = conn.poll_accept(cx);
        for _ in 0..OVERSIZED.with(|n| n.replace(0)) {
            reports.reached(
                Limit::HeaderList,
                peer,
                "request header list over the limit answered 431",
            );
        }
        polled
    })
    .await
}
