//! Reuse of HBONE connections.
//!
//! Connections are shared per [`PoolKey`]; each carries up to `max_streams` streams before
//! another is opened. Creating a connection for a key is single-flight: the first caller
//! installs a shared connect future and every concurrent caller awaits that same future. The map
//! lock is held only to look up or install, never across the handshake.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use super::client::TunnelConnection;
use super::HboneError;
use crate::identity::Identity;

/// What makes two tunnels interchangeable. The source IP is part of it because in-pod
/// connections leave from the pod's own address, which the far side uses as the client IP.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    pub source: Identity,
    pub source_ip: IpAddr,
    pub destination: Vec<Identity>,
    pub target: TunnelTarget,
}

/// Where a pooled connection's TCP (or outer stream) goes.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum TunnelTarget {
    /// A peer's HBONE port.
    Direct(SocketAddr),
    /// The inner connection of double HBONE: inside a CONNECT to `authority` through
    /// `gateway` (which presents one of `gateway_identities`). The gateway chose the endpoint
    /// when the connection was made; every stream on it goes to that endpoint.
    ViaGateway {
        gateway: SocketAddr,
        gateway_identities: Vec<Identity>,
        authority: super::wire::Authority,
    },
}

/// A pool failure, shared by every caller that waited on the same connect.
#[derive(Clone, Debug, thiserror::Error)]
#[error(transparent)]
pub struct PoolError(pub Arc<HboneError>);

type PendingConnect = Shared<BoxFuture<'static, Result<Arc<Pooled>, PoolError>>>;

/// A pooled connection and how many streams use it.
pub struct Pooled {
    conn: TunnelConnection,
    streams: AtomicUsize,
    /// Milliseconds since the pool's epoch when the last stream ended.
    last_used: AtomicU64,
}

impl Pooled {
    fn try_acquire(&self, max: usize) -> bool {
        if self.conn.is_closed() {
            return false;
        }
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// The right to open one stream on a pooled connection; returns the slot when dropped.
pub struct Lease {
    conn: Arc<Pooled>,
    epoch: Instant,
}

impl Lease {
    pub fn connection(&self) -> &TunnelConnection {
        &self.conn.conn
    }

    /// A connection of its own for one stream, in no pool: it closes when the stream ends.
    pub fn unpooled(conn: TunnelConnection) -> Lease {
        let pooled = Pooled::new(conn);
        pooled.streams.store(1, Ordering::Release);
        Lease {
            conn: Arc::new(pooled),
            epoch: Instant::now(),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn
            .last_used
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
        self.conn.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Pooled>>,
    pending: Option<PendingConnect>,
}

pub struct Pool {
    entries: Mutex<HashMap<PoolKey, Entry>>,
    max_streams: usize,
    idle_timeout: Duration,
    spare_idle_timeout: Duration,
    epoch: Instant,
}

impl Pool {
    pub fn new(
        max_streams: usize,
        idle_timeout: Duration,
        spare_idle_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Pool {
            entries: Mutex::new(HashMap::new()),
            max_streams: max_streams.max(1),
            idle_timeout,
            spare_idle_timeout: spare_idle_timeout.min(idle_timeout),
            epoch: Instant::now(),
        })
    }

    fn lease(&self, conn: &Arc<Pooled>) -> Lease {
        Lease {
            conn: conn.clone(),
            epoch: self.epoch,
        }
    }

    /// A stream slot on a connection for `key`, connecting with `connect` when none has room.
    pub async fn checkout<F, Fut>(
        self: &Arc<Self>,
        key: &PoolKey,
        connect: F,
    ) -> Result<Lease, PoolError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<TunnelConnection, HboneError>> + Send + 'static,
    {
        // A fresh connection may be filled by concurrent waiters before we get a slot; a few
        // rounds always suffice because each round adds a connection.
        for _ in 0..8 {
            let pending = {
                let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                let entry = entries.entry(key.clone()).or_default();
                entry.conns.retain(|c| !c.conn.is_closed());
                if let Some(c) = entry.conns.iter().find(|c| c.try_acquire(self.max_streams)) {
                    return Ok(self.lease(c));
                }
                match &entry.pending {
                    Some(p) => p.clone(),
                    None => {
                        let p = self.connect_once(key.clone(), connect());
                        entry.pending = Some(p.clone());
                        p
                    }
                }
            };
            let conn = pending.await?;
            if conn.try_acquire(self.max_streams) {
                return Ok(self.lease(&conn));
            }
        }
        Err(PoolError(Arc::new(HboneError::NoFreeStream)))
    }

    /// Wraps a connect so that, whoever drives it, its result lands in the pool exactly once.
    fn connect_once<Fut>(self: &Arc<Self>, key: PoolKey, connect: Fut) -> PendingConnect
    where
        Fut: Future<Output = Result<TunnelConnection, HboneError>> + Send + 'static,
    {
        let pool = Arc::downgrade(self);
        async move {
            let result = connect.await;
            let Some(pool) = pool.upgrade() else {
                return result
                    .map(|conn| Arc::new(Pooled::new(conn)))
                    .map_err(|e| PoolError(Arc::new(e)));
            };
            let mut entries = pool.entries.lock().unwrap_or_else(|p| p.into_inner());
            let entry = entries.entry(key).or_default();
            entry.pending = None;
            match result {
                Ok(conn) => {
                    let pooled = Arc::new(Pooled::new(conn));
                    // Counts as just used, so the reaper leaves it alone until a stream takes it.
                    pooled
                        .last_used
                        .store(pool.epoch.elapsed().as_millis() as u64, Ordering::Release);
                    entry.conns.push(pooled.clone());
                    Ok(pooled)
                }
                Err(e) => Err(PoolError(Arc::new(e))),
            }
        }
        .boxed()
        .shared()
    }

    /// Drops connections that are closed or have been idle too long: the first idle one of a
    /// key (the one checkout tries first) after the idle timeout, the others after the spare
    /// timeout.
    pub fn reap(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let idle_ms = self.idle_timeout.as_millis() as u64;
        let spare_ms = self.spare_idle_timeout.as_millis() as u64;
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, e| {
            let mut warm_kept = false;
            e.conns.retain(|c| {
                if c.conn.is_closed() {
                    return false;
                }
                if c.streams.load(Ordering::Acquire) > 0 {
                    return true;
                }
                let idle = now.saturating_sub(c.last_used.load(Ordering::Acquire));
                if !warm_kept {
                    warm_kept = true;
                    return idle < idle_ms;
                }
                idle < spare_ms
            });
            !e.conns.is_empty() || e.pending.is_some()
        });
    }

    pub async fn run_reaper(self: Arc<Self>) {
        let period =
            (self.spare_idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            self.reap();
        }
    }

    /// Open pooled connections (for tests and /config_dump).
    pub fn connection_count(&self) -> usize {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.values().map(|e| e.conns.len()).sum()
    }

    /// On shutdown: no pooled connection takes another stream. Streams in flight carry on
    /// (their leases keep their connections), and each connection closes when its last ends.
    pub fn drain(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for entry in entries.values() {
            for c in &entry.conns {
                c.conn.closed.store(true, Ordering::Release);
            }
        }
        entries.clear();
    }

    /// Marks a connection unusable after a stream on it failed at the HTTP/2 level.
    pub fn discard(&self, lease: &Lease) {
        lease.conn.conn.closed.store(true, Ordering::Release);
    }
}

impl Pooled {
    fn new(conn: TunnelConnection) -> Self {
        Pooled {
            conn,
            streams: AtomicUsize::new(0),
            last_used: AtomicU64::new(0),
        }
    }
}
