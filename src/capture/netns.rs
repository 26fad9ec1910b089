//! Handles on network namespaces and running code inside them.
//!
//! Network namespaces are per *thread* on Linux, and a socket belongs for its
//! whole life to the namespace it was created in. So to open a listener or an
//! upstream socket "in a pod", weft only needs one thread that sits in the
//! pod's netns and creates sockets on request; the caller gets the socket back
//! and uses it from any thread. [`Netns`] owns such a thread.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::{self, ThreadId};

use nix::sched::{setns, CloneFlags};

use super::CaptureError;

/// Path of weft's own network namespace.
const SELF_NETNS: &str = "/proc/self/ns/net";

/// The identity of a namespace: device and inode of its nsfs file.
///
/// Two different paths (`/run/netns/x`, `/proc/123/ns/net`) name the same
/// namespace exactly when their `NsId`s are equal. Computing one needs only a
/// `stat`, so it is the tool for scanning `/proc/*/ns/net` without opening a
/// [`Netns`] (and its thread) per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NsId {
    /// `st_dev` of the nsfs file.
    pub dev: u64,
    /// `st_ino` of the nsfs file (the number shown as `net:[ino]`).
    pub ino: u64,
}

impl NsId {
    /// The identity of the namespace at `path` (symlinks such as
    /// `/proc/PID/ns/net` are followed).
    pub fn of_path(path: impl AsRef<Path>) -> io::Result<NsId> {
        let meta = std::fs::metadata(path)?;
        Ok(NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl fmt::Display for NsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

/// A unit of work for the namespace worker. It sends its own result back.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// A handle on one network namespace, with a worker thread inside it.
///
/// Cloning is cheap and shares the worker. The worker `setns`es once, then
/// runs closures sent to it over a channel, so entering the namespace costs a
/// channel round trip (microseconds), not a `setns` pair per socket. It exits
/// when the last clone is dropped. Holding the namespace fd keeps the
/// namespace alive even after the pod's processes (and its
/// `/proc/PID/ns/net` path) are gone.
#[derive(Clone)]
pub struct Netns {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    id: NsId,
    fd: OwnedFd,
    jobs: mpsc::Sender<Job>,
    worker: ThreadId,
}

impl Netns {
    /// Opens the namespace at `path` (`/run/netns/NAME`, `/proc/PID/ns/net`)
    /// and starts its worker thread. Fails if the file is not a network
    /// namespace or weft may not enter it.
    pub fn open(path: impl AsRef<Path>) -> Result<Netns, CaptureError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source| CaptureError::Open {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(open_err)?;
        Netns::from_fd(OwnedFd::from(file), path)
    }

    /// Takes over an already open namespace file (one handed over by the CNI layer) and starts
    /// its worker thread. `label` names it in messages. A descriptor that is not a network
    /// namespace is refused here: the worker's `setns` fails.
    pub fn from_fd(fd: OwnedFd, label: impl Into<PathBuf>) -> Result<Netns, CaptureError> {
        let path = label.into();
        let open_err = |source| CaptureError::Open {
            path: path.clone(),
            source,
        };
        let meta = File::from(fd.try_clone().map_err(open_err)?)
            .metadata()
            .map_err(open_err)?;
        let id = NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        // The worker gets its own copy of the fd, used once for setns.
        let worker_fd = fd.try_clone().map_err(open_err)?;

        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        let handle = thread::Builder::new()
            .name(format!("weft-netns-{}", id.ino))
            .spawn(move || worker_main(worker_fd, ready_tx, job_rx))
            .map_err(|source| CaptureError::SpawnWorker {
                path: path.clone(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(CaptureError::Setns { path, source }),
            Err(_) => return Err(CaptureError::WorkerGone { path }),
        }
        let worker = handle.thread().id();
        tracing::debug!(netns = %path.display(), %id, "netns worker started");
        Ok(Netns {
            inner: Arc::new(Inner {
                path,
                id,
                fd,
                jobs,
                worker,
            }),
        })
    }

    /// weft's own network namespace (that of the process, `/proc/self/ns/net`).
    pub fn current() -> Result<Netns, CaptureError> {
        Netns::open(SELF_NETNS)
    }

    /// The path this handle was opened from (for messages; it may no longer exist).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The namespace's identity.
    pub fn id(&self) -> NsId {
        self.inner.id
    }

    /// Whether `self` and `other` are the same namespace, whatever their paths.
    pub fn same_as(&self, other: &Netns) -> bool {
        self.inner.id == other.inner.id
    }

    /// Runs `f` on a thread inside this namespace and returns its result,
    /// blocking the caller until it is done. The caller's thread never changes
    /// namespace. Sockets created by `f` stay in this namespace.
    ///
    /// Jobs of one namespace run one after another, so `f` should be short
    /// (create a socket, bind, return) and must not block on I/O. It must not
    /// change the worker's namespace (no `setns`/`unshare`). Calling `run`
    /// from inside `f` on the same `Netns` runs the inner closure directly.
    /// From async code use [`Netns::run_async`].
    pub fn run<F, R>(&self, f: F) -> Result<R, CaptureError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        if thread::current().id() == self.inner.worker {
            return Ok(f());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Box::new(move || {
            // The caller may have gone; nothing to do then.
            let _ = tx.send(f());
        }))?;
        rx.recv().map_err(|_| self.lost_job())
    }

    /// Like [`Netns::run`], but awaits the result without blocking the
    /// calling (tokio) thread.
    pub async fn run_async<F, R>(&self, f: F) -> Result<R, CaptureError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        if thread::current().id() == self.inner.worker {
            return Ok(f());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.await.map_err(|_| self.lost_job())
    }

    /// Runs `f` on the calling thread inside this namespace, then moves the thread back to
    /// weft's own namespace before returning.
    ///
    /// This is for the socket of every proxied connection: a `setns` pair costs a few
    /// microseconds, while [`Netns::run`] costs two thread wake-ups with the caller (a runtime
    /// worker) blocked in between. `f` must be short and must not block or await.
    ///
    /// If the thread cannot go back, it would create every later socket in the wrong
    /// namespace; weft aborts instead.
    pub fn run_here<R>(&self, f: impl FnOnce() -> R) -> Result<R, CaptureError> {
        if thread::current().id() == self.inner.worker {
            return Ok(f());
        }
        let home = home_netns().map_err(|source| CaptureError::Open {
            path: PathBuf::from(SELF_NETNS),
            source,
        })?;
        setns(&self.inner.fd, CloneFlags::CLONE_NEWNET).map_err(|e| CaptureError::Setns {
            path: self.inner.path.clone(),
            source: e.into(),
        })?;
        /// Goes home on every way out of `run_here`, unwinding included.
        struct GoHome<'a>(BorrowedFd<'a>);
        impl Drop for GoHome<'_> {
            fn drop(&mut self) {
                if let Err(e) = setns(self.0, CloneFlags::CLONE_NEWNET) {
                    tracing::error!(error = %e, "cannot return to weft's own network namespace; aborting");
                    std::process::abort();
                }
            }
        }
        let _home = GoHome(home);
        Ok(f())
    }

    /// Whether IPv6 is usable in this namespace: an `AF_INET6` socket can be
    /// created and bound to `[::1]:0`.
    ///
    /// That is false when the kernel has no IPv6, when IPv6 is disabled in the
    /// namespace (`net.ipv6.conf.all.disable_ipv6=1` removes `::1`), or when
    /// `lo` is down. When it is true, weft may bind `[::]`/`[::1]` listeners
    /// and install IPv6 rules and routes. It says nothing about global IPv6
    /// addresses. Returns false if the worker is gone.
    pub fn has_ipv6(&self) -> bool {
        self.run(probe_ipv6).unwrap_or(false)
    }

    fn submit(&self, job: Job) -> Result<(), CaptureError> {
        self.inner
            .jobs
            .send(job)
            .map_err(|_| CaptureError::WorkerGone {
                path: self.inner.path.clone(),
            })
    }

    /// The worker dropped a job without answering: the closure panicked.
    fn lost_job(&self) -> CaptureError {
        CaptureError::JobPanicked {
            path: self.inner.path.clone(),
        }
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netns")
            .field("path", &self.inner.path)
            .field("id", &self.inner.id)
            .finish()
    }
}

/// weft's own network namespace, opened once. `/proc/self` names the main thread, which only
/// drives the runtime's root future and never enters a pod's namespace, so this is home even
/// while another thread is inside one.
fn home_netns() -> io::Result<BorrowedFd<'static>> {
    static HOME: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    if let Some(fd) = HOME.get() {
        return Ok(fd.as_fd());
    }
    let fd = OwnedFd::from(File::open(SELF_NETNS)?);
    Ok(HOME.get_or_init(|| fd).as_fd())
}

/// Body of the namespace worker: enter once, then serve jobs until every
/// [`Netns`] clone (and with them the job sender) is gone.
fn worker_main(fd: OwnedFd, ready: mpsc::SyncSender<io::Result<()>>, jobs: mpsc::Receiver<Job>) {
    let entered = setns(&fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
    drop(fd);
    let ok = entered.is_ok();
    if ready.send(entered).is_err() || !ok {
        return;
    }
    drop(ready);
    while let Ok(job) = jobs.recv() {
        // A panicking job drops its reply sender, which the caller sees as
        // `JobPanicked`; the worker keeps serving.
        let _ = catch_unwind(AssertUnwindSafe(job));
    }
    tracing::debug!("netns worker exiting");
}

/// See [`Netns::has_ipv6`]. Runs inside the namespace.
fn probe_ipv6() -> bool {
    let sock = match socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None) {
        Ok(sock) => sock,
        Err(_) => return false,
    };
    let addr = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0));
    sock.bind(&addr.into()).is_ok()
}
