//! The drain signal: set once on shutdown. HBONE server connections answer it with GOAWAY (so
//! peers open their next streams to the weft that took over), the pool stops handing out its
//! connections, and every live connection, inbound and outbound, gets the drain period.

use std::future::Future;

use tokio::sync::watch;

pub struct Drain {
    started: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            started: watch::Sender::new(false),
        }
    }
}

impl Drain {
    pub fn start(&self) {
        self.started.send_replace(true);
    }

    pub fn is_started(&self) -> bool {
        *self.started.borrow()
    }

    /// Resolves once the drain has started (at once if it has).
    pub fn signalled(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.started.subscribe();
        async move {
            // An error means the sender is gone, i.e. the process is ending: drain then too.
            let _ = rx.wait_for(|started| *started).await;
        }
    }
}
