//! Live inbound connections, so that a policy change can close the ones it no longer allows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::identity::Identity;

/// What authorization looked at when the connection was admitted; re-checked on change.
#[derive(Clone, Debug)]
pub struct AdmittedConnection {
    pub destination_uid: String,
    pub source_ip: IpAddr,
    pub source_identity: Option<Identity>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

struct Tracked {
    facts: AdmittedConnection,
    close: Notify,
}

/// The map's lock is held only to add, remove or copy out entries (a pointer each): opening and
/// closing connections never waits for a policy re-check, which runs on the copies.
#[derive(Default)]
pub struct ConnectionTracker {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Tracked>>>,
}

/// Registration of one connection; deregisters on drop.
pub struct TrackedConnection {
    id: u64,
    tracker: Arc<ConnectionTracker>,
    entry: Arc<Tracked>,
}

impl TrackedConnection {
    /// Resolves when a policy change revoked this connection.
    pub async fn revoked(&self) {
        self.entry.close.notified().await
    }
}

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        let mut live = self.tracker.live.lock().unwrap_or_else(|p| p.into_inner());
        live.remove(&self.id);
    }
}

impl ConnectionTracker {
    pub fn track(self: &Arc<Self>, facts: AdmittedConnection) -> TrackedConnection {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Tracked {
            facts,
            close: Notify::new(),
        });
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.insert(id, entry.clone());
        TrackedConnection {
            id,
            tracker: self.clone(),
            entry,
        }
    }

    /// Closes every live connection for which `still_allowed` says no; returns how many.
    pub fn revoke(&self, mut still_allowed: impl FnMut(&AdmittedConnection) -> bool) -> usize {
        let live: Vec<Arc<Tracked>> = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.values().cloned().collect()
        };
        let mut n = 0;
        for t in &live {
            if !still_allowed(&t.facts) {
                // notify_one stores a permit, so a relay that is not waiting yet still sees it.
                t.close.notify_one();
                n += 1;
            }
        }
        n
    }

    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
