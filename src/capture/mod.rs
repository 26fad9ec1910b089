//! Traffic capture inside a pod's network namespace.
//!
//! weft serves every captured pod of its node from one process. For each pod
//! it must (a) create sockets *inside the pod's netns* ([`Netns::run`]), and
//! (b) install, in that netns, the rules that send the pod's TCP traffic to
//! those sockets ([`rules`], nftables) plus the policy routing that brings
//! replies to weft's spoofed-source sockets back to weft ([`routes`],
//! netlink). [`PodCapture`] ties (b) together.
//!
//! Nothing here changes the netns of a caller's thread: all in-namespace work
//! happens on a per-namespace worker thread owned by [`Netns`].

use std::io;
use std::path::PathBuf;

pub mod enroll;
pub mod locate;
pub mod netns;
pub mod pod;
pub mod routes;
pub mod rules;

#[cfg(test)]
mod tests;

pub use netns::{Netns, NsId};
pub use routes::RouteParams;
pub use rules::RuleParams;

/// Everything that can go wrong while entering a netns or installing capture.
///
/// Each variant names the namespace path and the step, because on a busy node
/// "setns failed" alone does not tell which of fifty pods is broken.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The namespace file could not be opened or inspected.
    #[error("netns {path}: cannot open namespace file: {source}")]
    Open { path: PathBuf, source: io::Error },

    /// `setns(CLONE_NEWNET)` refused the file (not a netns, or no privilege).
    #[error("netns {path}: setns(CLONE_NEWNET) failed: {source}")]
    Setns { path: PathBuf, source: io::Error },

    /// The per-namespace worker thread could not be started.
    #[error("netns {path}: cannot start the namespace worker thread: {source}")]
    SpawnWorker { path: PathBuf, source: io::Error },

    /// The worker thread is no longer running (it should live as long as the handle).
    #[error("netns {path}: namespace worker thread is gone")]
    WorkerGone { path: PathBuf },

    /// The closure given to [`Netns::run`] panicked; the worker survived.
    #[error("netns {path}: closure run inside the namespace panicked")]
    JobPanicked { path: PathBuf },

    /// Parameters that would produce a broken or looping ruleset.
    #[error("invalid capture parameters: {0}")]
    InvalidParams(String),

    /// The `nft` binary is not installed.
    #[error("`nft` not found in PATH, /usr/sbin or /sbin: install the nftables package")]
    NftMissing,

    /// `nft` could not be started or talked to.
    #[error("netns {path}: {step}: cannot run nft: {source}")]
    NftSpawn {
        path: PathBuf,
        step: &'static str,
        source: io::Error,
    },

    /// `nft` ran and rejected the request.
    #[error("netns {path}: {step}: nft exited with {status}: {stderr}")]
    Nft {
        path: PathBuf,
        step: &'static str,
        status: String,
        stderr: String,
    },

    /// A netlink request (policy routing) failed.
    #[error("netns {path}: {step}: {source}")]
    Netlink {
        path: PathBuf,
        step: String,
        source: io::Error,
    },
}

/// Installs and removes everything a captured pod needs in its netns:
/// the nftables redirection table and the reply policy routing.
///
/// Both halves are idempotent, so a restarted weft can simply install again.
pub struct PodCapture;

impl PodCapture {
    /// Installs (or re-installs) capture in `netns`.
    ///
    /// Routes go first so that by the time traffic is redirected, replies to
    /// spoofed-source sockets already have their way back. The caller should
    /// have its listeners bound before calling this: from the moment the rules
    /// are in, the pod's new connections go to them.
    ///
    /// Blocks for a few milliseconds (spawns `nft`, talks netlink); from async
    /// code call it through `spawn_blocking`.
    pub fn install(
        netns: &Netns,
        rules: &RuleParams,
        routes: &RouteParams,
    ) -> Result<(), CaptureError> {
        rules.validate()?;
        routes::install(netns, routes, rules.reply_mark, rules.mask)?;
        rules::install(netns, rules)
    }

    /// Removes capture from `netns`; absent pieces are not an error.
    ///
    /// Rules go first so the pod stops being redirected before its return
    /// routing disappears.
    pub fn uninstall(
        netns: &Netns,
        rules: &RuleParams,
        routes: &RouteParams,
    ) -> Result<(), CaptureError> {
        rules::remove(netns)?;
        routes::remove(netns, routes, rules.reply_mark, rules.mask)
    }
}
