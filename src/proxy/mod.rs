//! The proxy: per-workload listeners (outbound capture, inbound HBONE, inbound plaintext), the
//! routing decision, authorization at the door, and the relays.

pub mod authorize;
pub mod inbound;
pub mod inbound_plain;
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
}

impl ProxyContext {
    /// Ports that must never be the destination of a proxied connection: they are weft's own,
    /// and forwarding to them would loop.
    pub fn own_ports(&self) -> [u16; 3] {
        let p = &self.settings.ports;
        [p.outbound, p.inbound_plaintext, p.hbone]
    }
}
