//! weft's own CNI plugin, weft-cni, and weft's side of it: capture before the pod starts.
//!
//! The container runtime runs weft-cni after the pod's network is set up and before any of
//! its containers start. The plugin asks the node's weft, over a Unix socket, to capture the
//! pod in the namespace the runtime names; it returns only once weft has its listeners and
//! rules in place, so the pod's first connection is already captured. If weft refuses or is
//! not there, the pod does not start (fail closed) unless the plugin is set to fail open.
//!
//! - [`wire`]: the request and reply between plugin and weft (one JSON object each way).
//! - [`plugin`]: the plugin itself (CNI spec 1.0 commands), run by `src/bin/weft-cni.rs`.
//! - [`server`]: weft's side: admission, capture through the enroller, and the record of
//!   handed pods that lets a restarted weft serve them again.
//! - [`install`]: putting the plugin into the node's CNI configuration list and taking it out.

pub mod install;
pub mod plugin;
pub mod server;
pub mod wire;

pub use server::CniServerSettings;
