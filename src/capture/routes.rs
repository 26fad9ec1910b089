//! Policy routing that brings the app's replies back to weft.
//!
//! When weft connects to the app with the client's original source IP
//! (`IP_TRANSPARENT`), the app's replies are addressed to a non-local IP and
//! would leave the pod. The rules ([`super::rules`]) give those replies the
//! reply mark; here, inside the pod's netns:
//!
//! ```text
//! ip rule add fwmark <reply_mark>/<mask> lookup <table> pref <pref>
//! ip route add local 0.0.0.0/0 dev lo table <table>
//! # and, when the netns has IPv6:
//! ip -6 rule add fwmark <reply_mark>/<mask> lookup <table> pref <pref>
//! ip -6 route add local ::/0 dev lo table <table>
//! ```
//!
//! so marked packets are delivered locally, to weft's socket.
//!
//! This is done over netlink (rtnetlink). The netlink socket must be created
//! inside the pod's netns, so the whole exchange runs on the namespace worker
//! ([`Netns::run`]) with a throw-away current-thread tokio runtime.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::route::{RouteMessage, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use super::{CaptureError, Netns};

/// Where the reply policy routing lives.
///
/// The defaults are Istio's (table 100, rule preference 32764, just before
/// the kernel's `main` rule at 32766).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteParams {
    /// Routing table holding the `local default dev lo` routes.
    pub table: u32,
    /// Preference (priority) of the fwmark rule.
    pub pref: u32,
}

impl Default for RouteParams {
    fn default() -> Self {
        RouteParams {
            table: 100,
            pref: 32764,
        }
    }
}

/// Which of the rule's and route's parts to touch.
#[derive(Clone, Copy, Debug)]
enum Op {
    Install,
    Remove,
}

/// Adds the fwmark rule and local routes in `netns` (IPv6 too if
/// [`Netns::has_ipv6`]). Re-installing changes nothing: an identical rule is
/// never added twice and the route is added with replace semantics.
pub fn install(
    netns: &Netns,
    params: &RouteParams,
    fwmark: u32,
    mask: u32,
) -> Result<(), CaptureError> {
    let ipv6 = netns.has_ipv6();
    apply(netns, Op::Install, *params, fwmark, mask, ipv6)
}

/// Removes the fwmark rule(s) and local routes from `netns`; absent ones are
/// not an error. Both families are always cleaned, so a rule installed while
/// the netns had IPv6 goes away even if IPv6 was disabled since.
pub fn remove(
    netns: &Netns,
    params: &RouteParams,
    fwmark: u32,
    mask: u32,
) -> Result<(), CaptureError> {
    apply(netns, Op::Remove, *params, fwmark, mask, true)
}

/// Runs the netlink work for `op` on the namespace worker.
fn apply(
    netns: &Netns,
    op: Op,
    params: RouteParams,
    fwmark: u32,
    mask: u32,
    ipv6: bool,
) -> Result<(), CaptureError> {
    let result = netns.run(move || {
        block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection()
                .map_err(|e| ("open rtnetlink socket".to_string(), e))?;
            let conn = tokio::spawn(conn);
            let work = Work {
                handle,
                params,
                fwmark,
                mask,
            };
            let mut result = work.family(op, IpVersion::V4).await;
            if ipv6 && result.is_ok() {
                result = work.family(op, IpVersion::V6).await;
            }
            conn.abort();
            result
        })
    })?;
    result.map_err(|(step, source)| CaptureError::Netlink {
        path: netns.path().to_path_buf(),
        step,
        source,
    })?;
    tracing::debug!(netns = %netns.path().display(), ?op, ?params, ipv6, "reply routing done");
    Ok(())
}

/// Runs `fut` to completion on a fresh current-thread runtime (the namespace
/// worker is a plain thread, outside any runtime).
fn block_on<F>(fut: F) -> Result<(), StepError>
where
    F: Future<Output = Result<(), StepError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| ("build netlink runtime".to_string(), e))?;
    rt.block_on(fut)
}

/// A failed step, described, with its cause.
type StepError = (String, io::Error);

/// One netlink session's worth of parameters.
struct Work {
    handle: Handle,
    params: RouteParams,
    fwmark: u32,
    mask: u32,
}

impl Work {
    async fn family(&self, op: Op, family: IpVersion) -> Result<(), StepError> {
        let rule_desc = format!(
            "fwmark {:#x}/{:#x} lookup {} pref {} ({family:?})",
            self.fwmark, self.mask, self.params.table, self.params.pref
        );
        let route = self.local_route(&family).await?;
        let route_desc = format!(
            "local default dev lo table {} ({family:?})",
            self.params.table
        );
        let existing = match self.our_rules(family.clone()).await {
            Ok(rules) => rules,
            // No IPv6 in this kernel: nothing of ours can exist to remove.
            Err(e) if matches!(op, Op::Remove) && is_absent(&e) => Vec::new(),
            Err(e) => return Err((format!("list ip rules to find {rule_desc}"), e)),
        };
        match op {
            Op::Install => {
                self.handle
                    .route()
                    .add(route)
                    .replace()
                    .execute()
                    .await
                    .map_err(|e| (format!("add route {route_desc}"), to_io(e)))?;
                if existing.is_empty() {
                    let mut req = self
                        .handle
                        .rule()
                        .add()
                        .action(RuleAction::ToTable)
                        .table_id(self.params.table)
                        .priority(self.params.pref)
                        .fw_mark(self.fwmark);
                    req.message_mut()
                        .attributes
                        .push(RuleAttribute::FwMask(self.mask));
                    req.message_mut().header.family = family_of(&family);
                    match req.execute().await.map_err(to_io) {
                        Ok(()) => {}
                        // Raced with another installer: the rule is there.
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(e) => return Err((format!("add ip rule {rule_desc}"), e)),
                    }
                }
            }
            Op::Remove => {
                for rule in existing {
                    ignore_absent(self.handle.rule().del(rule).execute().await)
                        .map_err(|e| (format!("delete ip rule {rule_desc}"), e))?;
                }
                ignore_absent(self.handle.route().del(route).execute().await)
                    .map_err(|e| (format!("delete route {route_desc}"), e))?;
            }
        }
        Ok(())
    }

    /// `local 0.0.0.0/0 dev lo table T` (or `::/0`).
    async fn local_route(&self, family: &IpVersion) -> Result<RouteMessage, StepError> {
        let lo = self.loopback_index().await?;
        let any: IpAddr = match family {
            IpVersion::V4 => Ipv4Addr::UNSPECIFIED.into(),
            IpVersion::V6 => Ipv6Addr::UNSPECIFIED.into(),
        };
        let builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(any, 0)
            .map_err(|e| {
                (
                    "build local route".to_string(),
                    io::Error::other(e.to_string()),
                )
            })?;
        Ok(builder
            .table_id(self.params.table)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(lo)
            .build())
    }

    async fn loopback_index(&self) -> Result<u32, StepError> {
        let step = || "look up interface lo".to_string();
        let link = self
            .handle
            .link()
            .get()
            .match_name("lo".to_string())
            .execute()
            .try_next()
            .await
            .map_err(|e| (step(), to_io(e)))?;
        link.map(|l| l.header.index).ok_or_else(|| {
            (
                step(),
                io::Error::new(io::ErrorKind::NotFound, "no loopback interface"),
            )
        })
    }

    /// The rules of `family` that are exactly ours (same pref, mark, mask, table).
    async fn our_rules(&self, family: IpVersion) -> io::Result<Vec<RuleMessage>> {
        let rules: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(family)
            .execute()
            .try_collect()
            .await
            .map_err(to_io)?;
        Ok(rules.into_iter().filter(|r| self.is_ours(r)).collect())
    }

    fn is_ours(&self, rule: &RuleMessage) -> bool {
        let (mut pref, mut mark, mut mask) = (None, None, None);
        let mut table = u32::from(rule.header.table);
        for attr in &rule.attributes {
            match attr {
                RuleAttribute::Priority(p) => pref = Some(*p),
                RuleAttribute::FwMark(m) => mark = Some(*m),
                RuleAttribute::FwMask(m) => mask = Some(*m),
                RuleAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        rule.header.action == RuleAction::ToTable
            && pref == Some(self.params.pref)
            && mark == Some(self.fwmark)
            && mask.unwrap_or(u32::MAX) == self.mask
            && table == self.params.table
    }
}

fn family_of(family: &IpVersion) -> netlink_packet_route::AddressFamily {
    match family {
        IpVersion::V4 => netlink_packet_route::AddressFamily::Inet,
        IpVersion::V6 => netlink_packet_route::AddressFamily::Inet6,
    }
}

/// Netlink errors as `io::Error`, keeping the errno when there is one.
fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// Deleting something already gone (or a family the kernel lacks) is success.
fn ignore_absent(r: Result<(), rtnetlink::Error>) -> io::Result<()> {
    match r.map_err(to_io) {
        Err(e) if is_absent(&e) => Ok(()),
        other => other,
    }
}

fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ESRCH | libc::EAFNOSUPPORT)
    )
}
