//! The proxy: per-workload listeners (outbound capture, inbound HBONE, inbound plaintext), the
//! routing decision, authorization at the door, and the relays.

pub mod admit;
pub mod authorize;
pub mod buffers;
pub mod drain;
pub mod inbound;
pub mod inbound_plain;
pub mod limits;
pub mod listeners;
pub mod outbound;
pub mod relay;
pub mod route;
pub mod socket;
pub mod tracker;

use std::sync::Arc;

use crate::config::Settings;
use crate::hbone::pool::Pool;
use crate::hbone::tls::TlsContext;
use crate::metrics::Metrics;
use crate::state::StateStore;

pub use listeners::{DestinationMode, ListenerSet, WorkloadProxy};
pub use socket::{LocalSockets, SocketFactory};

/// What every listener of this weft shares.
pub struct ProxyContext {
    pub settings: Arc<Settings>,
    pub state: Arc<StateStore>,
    pub tls: Arc<TlsContext>,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    pub tracker: Arc<tracker::ConnectionTracker>,
    pub limits: Arc<limits::LimitReports>,
    /// HBONE connections held, against `settings.limits`.
    pub connections: Arc<limits::ConnectionCaps>,
    /// What the relays may hold on its way into HBONE, per connection and in total.
    pub send_buffers: Arc<buffers::SendBuffers>,
    /// The process-wide budget of pending upstream connects (each pod has its own within it).
    pub connects: Arc<tokio::sync::Semaphore>,
    /// The process-wide budget of forwarded DNS queries in flight.
    pub dns_pending: Arc<tokio::sync::Semaphore>,
    /// weft's own resolvers, for endpoints known only by a hostname.
    pub hosts: Arc<crate::dns::lookup::HostResolver>,
    pub drain: drain::Drain,
}
