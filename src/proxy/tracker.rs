//! Live inbound connections, grouped by destination workload, so that a state change closes
//! the ones it no longer allows and re-checks only those it may concern.
//!
//! Each destination's group remembers the inputs its connections were last checked against
//! (as the number [`crate::proxy::authorize::inputs`] gives). After a change only the groups
//! whose number changed are re-checked: pod churn elsewhere, or a policy for other workloads,
//! costs one number per destination and no evaluation per connection.

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

/// One destination's connections and what they were last checked against.
struct Group {
    conns: HashMap<u64, Arc<Tracked>>,
    /// The state generation of the last check.
    generation: u64,
    /// The inputs of the last check; `None` when the group must be checked on the next change
    /// (new, or joined by a connection decided on a newer state than the last check).
    inputs: Option<u64>,
}

/// The map's lock is held only to add, remove or copy out entries (a pointer each): opening and
/// closing connections never waits for a policy re-check, which runs on the copies.
#[derive(Default)]
pub struct ConnectionTracker {
    next: AtomicU64,
    live: Mutex<HashMap<String, Group>>,
}

/// Registration of one connection; deregisters on drop.
pub struct TrackedConnection {
    id: u64,
    tracker: Arc<ConnectionTracker>,
    entry: Arc<Tracked>,
}

impl TrackedConnection {
    /// What authorization looked at when the connection was admitted.
    pub fn facts(&self) -> &AdmittedConnection {
        &self.entry.facts
    }

    /// Resolves when a policy change revoked this connection.
    pub async fn revoked(&self) {
        self.entry.close.notified().await
    }
}

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        let mut live = self.tracker.lock();
        let uid = &self.entry.facts.destination_uid;
        if let Some(group) = live.get_mut(uid) {
            group.conns.remove(&self.id);
            if group.conns.is_empty() {
                live.remove(uid);
            }
        }
    }
}

/// What one re-check after a change did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Revalidated {
    /// Connections evaluated again (those of destinations whose inputs changed).
    pub checked: usize,
    pub closed: usize,
}

impl ConnectionTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Group>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection admitted on the state of `generation`.
    pub fn track(
        self: &Arc<Self>,
        facts: AdmittedConnection,
        generation: u64,
    ) -> TrackedConnection {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let uid = facts.destination_uid.clone();
        let entry = Arc::new(Tracked {
            facts,
            close: Notify::new(),
        });
        let mut live = self.lock();
        let group = live.entry(uid).or_insert_with(|| Group {
            conns: HashMap::new(),
            generation,
            inputs: None,
        });
        // Decided on a state the group was not checked against: check the group next time
        // even if its inputs then equal the last ones.
        if generation > group.generation {
            group.inputs = None;
        }
        group.conns.insert(id, entry.clone());
        TrackedConnection {
            id,
            tracker: self.clone(),
            entry,
        }
    }

    /// After a change to the state of `generation`: for every destination whose inputs
    /// (`inputs_of`, `None` when it is gone) differ from those its connections were last
    /// checked against, closes the connections `still_allowed` refuses.
    pub fn revalidate(
        &self,
        generation: u64,
        inputs_of: impl Fn(&str) -> Option<u64>,
        mut still_allowed: impl FnMut(&AdmittedConnection) -> bool,
    ) -> Revalidated {
        let uids: Vec<String> = self.lock().keys().cloned().collect();
        let inputs: Vec<(String, Option<u64>)> = uids
            .into_iter()
            .map(|uid| {
                let i = inputs_of(&uid);
                (uid, i)
            })
            .collect();
        let mut to_check: Vec<Arc<Tracked>> = Vec::new();
        {
            let mut live = self.lock();
            for (uid, now) in inputs {
                let Some(group) = live.get_mut(&uid) else {
                    continue;
                };
                let unchanged = now.is_some() && group.inputs == now;
                group.generation = group.generation.max(generation);
                if !unchanged {
                    group.inputs = now;
                    to_check.extend(group.conns.values().cloned());
                }
            }
        }
        let mut r = Revalidated {
            checked: to_check.len(),
            closed: 0,
        };
        for t in &to_check {
            if !still_allowed(&t.facts) {
                // notify_one stores a permit, so a relay that is not waiting yet still sees it.
                t.close.notify_one();
                r.closed += 1;
            }
        }
        r
    }

    /// Closes every live connection to the workload `uid`; returns how many.
    pub fn close_all_to(&self, uid: &str) -> usize {
        let conns: Vec<Arc<Tracked>> = self
            .lock()
            .get(uid)
            .map(|g| g.conns.values().cloned().collect())
            .unwrap_or_default();
        for t in &conns {
            t.close.notify_one();
        }
        conns.len()
    }

    pub fn len(&self) -> usize {
        self.lock().values().map(|g| g.conns.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(uid: &str, port: u16) -> AdmittedConnection {
        AdmittedConnection {
            destination_uid: uid.to_owned(),
            source_ip: IpAddr::from([10, 250, 0, 1]),
            source_identity: None,
            destination_ip: IpAddr::from([10, 250, 0, 2]),
            destination_port: port,
        }
    }

    #[test]
    fn only_destinations_whose_inputs_changed_are_checked_again() {
        let t = Arc::new(ConnectionTracker::default());
        let _a: Vec<_> = (0..3).map(|p| t.track(conn("a", p), 1)).collect();
        let _b: Vec<_> = (0..2).map(|p| t.track(conn("b", p), 1)).collect();
        let inputs = |a: u64, b: u64| move |uid: &str| Some(if uid == "a" { a } else { b });
        // New groups are checked once.
        assert_eq!(
            t.revalidate(2, inputs(10, 20), |_| true),
            Revalidated {
                checked: 5,
                closed: 0
            }
        );
        // Nothing concerning them changed: no connection evaluated.
        assert_eq!(t.revalidate(3, inputs(10, 20), |_| true).checked, 0);
        // b's policies changed and now refuse port 1.
        let r = t.revalidate(4, inputs(10, 21), |c| c.destination_port != 1);
        assert_eq!(
            r,
            Revalidated {
                checked: 2,
                closed: 1
            }
        );
    }

    #[test]
    fn a_connection_decided_on_a_newer_state_makes_its_group_checked_again() {
        let t = Arc::new(ConnectionTracker::default());
        let _old = t.track(conn("a", 1), 1);
        t.revalidate(2, |_| Some(10), |_| true);
        // Admitted on generation 3 (whose inputs the tracker never saw), re-checked on 4 even
        // though 4's inputs equal 2's.
        let _new = t.track(conn("a", 2), 3);
        assert_eq!(t.revalidate(4, |_| Some(10), |_| true).checked, 2);
        // Decided on an older state than the last check: the admission re-checks it itself.
        let _late = t.track(conn("a", 3), 2);
        assert_eq!(t.revalidate(5, |_| Some(10), |_| true).checked, 0);
    }

    #[test]
    fn a_departed_destination_loses_its_connections_and_groups_go_with_their_last() {
        let t = Arc::new(ConnectionTracker::default());
        let a = t.track(conn("a", 1), 1);
        let _b = t.track(conn("b", 1), 1);
        let r = t.revalidate(
            2,
            |uid| (uid == "b").then_some(7),
            |c| c.destination_uid == "b",
        );
        assert_eq!(r.closed, 1);
        drop(a);
        assert_eq!(t.len(), 1);
        assert_eq!(t.lock().len(), 1, "a's group went with its last connection");
        assert_eq!(t.close_all_to("b"), 1);
    }
}
