//! How many bytes weft holds on their way from apps into HBONE: one budget per HBONE connection,
//! within one for the process.
//!
//! A relay reads from an app only what the tunnel peer's flow-control window grants, and only
//! once it holds room for it here; the room goes back when HTTP/2 has written the bytes to TLS
//! (when it drops them). A peer that grants window but never reads its socket therefore stops
//! the app's reads (TCP back-pressure) once its connection's budget is full, instead of making
//! weft buffer without end. Bytes coming the other way are bounded by the windows weft
//! advertises (see [`crate::config::H2Tuning`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::limits::{Limit, LimitReports};
use crate::config::Limits;

/// The process's budget, from which every HBONE connection's is carved.
pub struct SendBuffers {
    all: Arc<Semaphore>,
    per_connection: usize,
    /// The largest room one reservation may ask for: the smaller budget, so a reservation can
    /// always be granted once the bytes before it are written.
    largest: usize,
    reports: Arc<LimitReports>,
    /// Bytes held now (`weft_buffered_bytes`).
    held: Gauge,
}

impl SendBuffers {
    pub fn new(limits: &Limits, reports: Arc<LimitReports>, held: Gauge) -> Arc<Self> {
        let all = limits.buffered_bytes.max(1);
        let per_connection = limits.buffered_bytes_per_connection.clamp(1, all);
        Arc::new(SendBuffers {
            all: Arc::new(Semaphore::new(all)),
            per_connection,
            largest: per_connection.min(u32::MAX as usize),
            reports,
            held,
        })
    }

    /// The budget of one new HBONE connection with `peer`.
    pub fn for_connection(self: &Arc<Self>, peer: SocketAddr) -> Arc<ConnectionBuffers> {
        Arc::new(ConnectionBuffers {
            process: self.clone(),
            own: Arc::new(Semaphore::new(self.per_connection)),
            peer,
        })
    }
}

/// One HBONE connection's budget; its streams share it.
pub struct ConnectionBuffers {
    process: Arc<SendBuffers>,
    own: Arc<Semaphore>,
    /// Who is reported when the budget is full.
    peer: SocketAddr,
}

impl std::fmt::Debug for ConnectionBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionBuffers")
            .field("peer", &self.peer)
            .field("free", &self.own.available_permits())
            .finish()
    }
}

impl ConnectionBuffers {
    /// Room for up to `n` bytes (fewer when `n` exceeds what one reservation may hold; at least
    /// one). Waits while the connection's or the process's budget is full; reaching either is
    /// reported once per wait.
    pub async fn reserve(&self, n: usize) -> Reserved {
        let n = n.clamp(1, self.process.largest) as u32;
        let own = match self.own.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                self.report(Limit::BufferedBytesPerConnection);
                self.acquire(&self.own, n).await
            }
        };
        let all = match self.process.all.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                self.report(Limit::BufferedBytes);
                self.acquire(&self.process.all, n).await
            }
        };
        self.process.held.inc_by(i64::from(n));
        Reserved {
            own,
            all,
            held: self.process.held.clone(),
        }
    }

    async fn acquire(&self, budget: &Arc<Semaphore>, n: u32) -> OwnedSemaphorePermit {
        budget
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the buffer budgets are never closed")
    }

    fn report(&self, limit: Limit) {
        self.process.reports.reached(
            limit,
            self.peer,
            "reading from apps paused until HTTP/2 has written what is queued for this peer",
        );
    }
}

/// Room held for bytes on their way into HBONE.
pub struct Reserved {
    own: OwnedSemaphorePermit,
    all: OwnedSemaphorePermit,
    held: Gauge,
}

impl Reserved {
    pub fn len(&self) -> usize {
        self.own.num_permits()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps room for `n` bytes and gives the rest back.
    pub fn shrink_to(&mut self, n: usize) {
        let extra = self.len().saturating_sub(n);
        if extra == 0 {
            return;
        }
        // `split` hands out part of a permit; dropping that part releases it.
        drop(self.own.split(extra));
        drop(self.all.split(extra));
        self.held.dec_by(extra as i64);
    }

    /// `data`, holding this room until the last piece of it is dropped (by HTTP/2, once written).
    pub fn attach(self, data: Vec<u8>) -> Bytes {
        Bytes::from_owner(Held { data, _room: self })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.held.dec_by(self.len() as i64);
    }
}

struct Held {
    data: Vec<u8>,
    _room: Reserved,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{LimitLabels, Metrics};

    fn budgets(per_connection: usize, all: usize) -> (Arc<SendBuffers>, Arc<Metrics>) {
        let m = Arc::new(Metrics::new());
        let limits = Limits {
            buffered_bytes_per_connection: per_connection,
            buffered_bytes: all,
            ..Limits::default()
        };
        let reports = Arc::new(LimitReports::new(m.clone()));
        (
            SendBuffers::new(&limits, reports, m.buffered_bytes.clone()),
            m,
        )
    }

    fn reached(m: &Metrics, limit: Limit) -> u64 {
        m.limits_reached
            .get_or_create(&LimitLabels {
                limit: limit.name(),
            })
            .get()
    }

    /// What a waiting reservation got once room was given back.
    async fn granted_once_freed(waiting: tokio::task::JoinHandle<usize>) -> usize {
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("room given back")
            .expect("task")
    }

    fn peer(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 250, 0, n], 15008))
    }

    #[tokio::test]
    async fn room_is_held_until_the_last_piece_of_the_data_is_dropped() {
        let (b, m) = budgets(100, 1000);
        let conn = b.for_connection(peer(1));
        let mut room = conn.reserve(60).await;
        room.shrink_to(40);
        assert_eq!(m.buffered_bytes.get(), 40);
        let mut data = room.attach(vec![7; 40]);
        let head = data.split_to(10);
        drop(data);
        assert_eq!(m.buffered_bytes.get(), 40, "a piece is still queued");
        assert_eq!(&head[..], &[7; 10]);
        drop(head);
        assert_eq!(m.buffered_bytes.get(), 0);
        assert_eq!(conn.own.available_permits(), 100);
        assert_eq!(b.all.available_permits(), 1000);
    }

    #[tokio::test]
    async fn a_full_connection_waits_and_is_reported_while_others_go_on() {
        let (b, m) = budgets(100, 1000);
        let (slow, other) = (b.for_connection(peer(1)), b.for_connection(peer(2)));
        let held = slow.reserve(100).await;
        let waiting = tokio::spawn({
            let slow = slow.clone();
            async move { slow.reserve(10).await.len() }
        });
        let served = tokio::time::timeout(std::time::Duration::from_secs(5), other.reserve(100))
            .await
            .expect("another connection has its own budget");
        assert_eq!(served.len(), 100);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the full connection must wait");
        assert_eq!(reached(&m, Limit::BufferedBytesPerConnection), 1);
        drop(held);
        assert_eq!(granted_once_freed(waiting).await, 10);
    }

    #[tokio::test]
    async fn the_process_budget_bounds_all_connections_together() {
        let (b, m) = budgets(100, 150);
        let (c1, c2) = (b.for_connection(peer(1)), b.for_connection(peer(2)));
        let first = c1.reserve(100).await;
        let second = tokio::spawn(async move { c2.reserve(100).await.len() });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !second.is_finished(),
            "only 50 bytes are left in the process"
        );
        assert_eq!(reached(&m, Limit::BufferedBytes), 1);
        assert_eq!(m.buffered_bytes.get(), 100);
        drop(first);
        assert_eq!(granted_once_freed(second).await, 100);
    }

    #[tokio::test]
    async fn one_reservation_never_asks_for_more_than_a_budget_holds() {
        let (b, _) = budgets(64, 1000);
        let room = b.for_connection(peer(1)).reserve(1 << 20).await;
        assert_eq!(room.len(), 64);
    }
}
