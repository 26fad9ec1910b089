//! The nftables ruleset that redirects a pod's TCP traffic (and its DNS) to weft.
//!
//! weft owns exactly one table in the pod's netns, `table inet weft`, and
//! always replaces it whole in one `nft -f -` transaction, so a pod never sees
//! a half-installed ruleset and re-installing is idempotent. The semantics
//! follow ztunnel's in-pod mode (Istio CNI's `ISTIO_PRERT`/`ISTIO_OUTPUT`
//! chains), with NAT `redirect` for inbound plaintext instead of TPROXY.
//!
//! `nft` is spawned *from the namespace worker thread* ([`Netns::run`]): a
//! child inherits the namespaces of the thread that forks it, so nft runs in
//! the pod's netns. This is preferred over `nsenter --net=PATH` because it
//! uses the namespace fd weft already holds: a `/proc/PID/ns/net` path can
//! vanish when the pod's process exits, or even name another process after
//! PID reuse, while the held fd always means the namespace weft opened.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::{CaptureError, Netns};

/// The family and name of weft's table (`nft list table inet weft`).
pub const TABLE: &str = "inet weft";

/// Ports and marks the ruleset is built from.
///
/// The defaults are Istio's, so a pod captured by weft looks like one captured
/// by ztunnel. The fields are public because the main crate's config fills
/// them; [`RuleParams::validate`] rejects combinations that would loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleParams {
    /// Outbound capture listener (app → anywhere).
    pub outbound_port: u16,
    /// Plaintext inbound capture listener (non-mesh client → app).
    pub inbound_plain_port: u16,
    /// HBONE inbound listener; traffic to it is never redirected.
    pub hbone_port: u16,
    /// `SO_MARK` on every socket weft creates; marked traffic is never redirected.
    pub mark: u32,
    /// Bits of the packet/conntrack mark that weft owns.
    pub mask: u32,
    /// Conntrack mark of connections opened by weft inside the pod; restored
    /// onto the app's replies so policy routing brings them back to weft.
    pub reply_mark: u32,
    /// The DNS proxy's port: the pod's DNS (UDP and TCP to port 53) goes there.
    /// None leaves DNS alone (DNS capture off for the node or the pod).
    pub dns_port: Option<u16>,
}

/// Ports and mark from the process defaults (`config`, the one place for them); mask and
/// reply mark are the capture's own.
impl Default for RuleParams {
    fn default() -> Self {
        let (ports, settings) = (
            crate::config::Ports::default(),
            crate::config::Settings::default(),
        );
        RuleParams {
            outbound_port: ports.outbound,
            inbound_plain_port: ports.inbound_plaintext,
            hbone_port: ports.hbone,
            mark: settings.mark,
            mask: 0xfff,
            reply_mark: 0x111,
            dns_port: settings.dns.enabled.then_some(ports.dns),
        }
    }
}

impl RuleParams {
    /// Rejects parameters that cannot work: zero or shared ports, marks
    /// outside the mask, a zero mark, or a reply mark equal to weft's mark.
    pub fn validate(&self) -> Result<(), CaptureError> {
        let bad = |msg: String| Err(CaptureError::InvalidParams(msg));
        let ports = [self.outbound_port, self.inbound_plain_port, self.hbone_port];
        if let Some(dns) = self.dns_port {
            if dns == 0 || ports.contains(&dns) {
                return bad(format!(
                    "the DNS port {dns} must be non-zero and differ from {ports:?}"
                ));
            }
        }
        if ports.contains(&0) {
            return bad(format!("capture ports must be non-zero: {ports:?}"));
        }
        if ports[0] == ports[1] || ports[0] == ports[2] || ports[1] == ports[2] {
            return bad(format!("capture ports must be distinct: {ports:?}"));
        }
        for (name, mark) in [("mark", self.mark), ("reply_mark", self.reply_mark)] {
            if mark == 0 || mark & !self.mask != 0 {
                return bad(format!(
                    "{name} {mark:#x} must be non-zero and inside mask {:#x}",
                    self.mask
                ));
            }
        }
        if self.mark == self.reply_mark {
            return bad(format!(
                "mark and reply_mark must differ (both {:#x})",
                self.mark
            ));
        }
        Ok(())
    }

    /// The table definition (without the replace preamble).
    ///
    /// With the default parameters it is exactly (the `unit` tests hold the
    /// text to this comment):
    ///
    /// ```text
    /// table inet weft {
    ///     # Mangle stage of inbound. Packets of sockets weft opened inside the
    ///     # pod (to the app, often with a spoofed source) get the reply
    ///     # conntrack mark; later packets of such connections get it restored.
    ///     chain prerouting_mangle {
    ///         type filter hook prerouting priority mangle; policy accept;
    ///         meta mark & 0xfff == 0x539 ct mark set ct mark & 0xfffff000 | 0x111
    ///         meta mark & 0xfff != 0x539 ct mark & 0xfff == 0x111 meta mark set ct mark
    ///     }
    ///     # Inbound capture: TCP from outside to anything but HBONE -> 15006.
    ///     chain prerouting_nat {
    ///         type nat hook prerouting priority dstnat; policy accept;
    ///         tcp dport 15008 accept
    ///         iif "lo" accept
    ///         meta mark & 0xfff == 0x539 accept
    ///         meta l4proto tcp redirect to :15006
    ///     }
    ///     # Loop guard: the capture ports only take redirected connections.
    ///     chain input_filter {
    ///         type filter hook input priority filter; policy accept;
    ///         tcp dport { 15001, 15006 } ct direction original ct status ! dnat reject with tcp reset
    ///     }
    ///     # The app's replies to weft's spoofed-source sockets: restore the
    ///     # mark; the route-type chain re-routes them, so the fwmark rule
    ///     # (see `routes`) delivers them locally to weft.
    ///     chain output_mangle {
    ///         type route hook output priority mangle; policy accept;
    ///         meta mark & 0xfff != 0x539 ct mark & 0xfff == 0x111 meta mark set ct mark
    ///     }
    ///     # Outbound capture: the app's TCP, not to loopback, not weft's own -> 15001.
    ///     chain output_nat {
    ///         type nat hook output priority -100; policy accept;
    ///         meta mark & 0xfff == 0x539 accept
    ///         meta mark & 0xfff == 0x111 accept
    ///         ip daddr 127.0.0.0/8 accept
    ///         ip6 daddr ::1 accept
    ///         oif "lo" accept
    ///         # DNS to the pod's resolvers -> the DNS proxy.
    ///         udp dport 53 redirect to :15053
    ///         tcp dport 53 redirect to :15053
    ///         meta l4proto tcp redirect to :15001
    ///     }
    /// }
    /// ```
    ///
    /// Decisions worth knowing:
    /// - NAT chains only see the first packet of a connection, so established
    ///   connections (and connections that existed before capture) are never
    ///   re-routed; the mark rules in the NAT chains only matter for new ones.
    /// - **A pod calling itself** (its own pod IP, routed via `lo`) is let
    ///   through uncaptured in both directions (`oif "lo"` in output, `iif
    ///   "lo"` in prerouting), as ztunnel does: the traffic never leaves the
    ///   pod, there is no peer identity to enforce, and capturing it would
    ///   hand weft a connection whose destination is the pod itself.
    /// - **Loops** are cut in three places: weft's own sockets carry `mark`
    ///   and are never redirected; everything via `lo` is uncaptured; and the
    ///   capture ports accept only connections that were actually redirected
    ///   to them (`ct status dnat`), so an app or peer connecting straight to
    ///   `pod-ip:15006` or `127.0.0.1:15001` gets a reset instead of making
    ///   weft connect to itself. (A redirect that does not change the tuple
    ///   sets no `dnat` status, so `peer → pod-ip:15006` is reset too.)
    ///   The HBONE port stays reachable directly, as it must.
    /// - Outbound `redirect` sends IPv4 to `127.0.0.1:15001` and IPv6 to
    ///   `[::1]:15001`: the outbound listener must accept on both loopbacks
    ///   the pod has (bind `[::]` dual-stack, or `0.0.0.0` in IPv4-only pods).
    ///   The original destination is `SO_ORIGINAL_DST` /
    ///   `IP6T_SO_ORIGINAL_DST` on the accepted socket, as for inbound.
    /// - The table is `inet`, so one ruleset serves IPv4-only and dual-stack
    ///   pods; the `ip6` rule is inert where IPv6 is disabled.
    /// - **DNS**: the pod's queries to any resolver but a loopback one go to the
    ///   DNS proxy (redirect in output: `127.0.0.1:15053` / `[::1]:15053`, which is
    ///   where it listens, so its replies leave from the address conntrack maps
    ///   back to the resolver's). Without DNS capture those two lines are absent.
    pub fn ruleset(&self) -> String {
        let RuleParams {
            outbound_port: outbound,
            inbound_plain_port: inbound,
            hbone_port: hbone,
            mark,
            mask,
            reply_mark: reply,
            dns_port,
        } = *self;
        let keep = !mask;
        let dns = dns_port.map_or(String::new(), |port| {
            format!(
                "        # DNS to the pod's resolvers -> the DNS proxy.
        udp dport 53 redirect to :{port}
        tcp dport 53 redirect to :{port}
"
            )
        });
        format!(
            "\
table {TABLE} {{
    # Mangle stage of inbound. Packets of sockets weft opened inside the
    # pod (to the app, often with a spoofed source) get the reply
    # conntrack mark; later packets of such connections get it restored.
    chain prerouting_mangle {{
        type filter hook prerouting priority mangle; policy accept;
        meta mark & {mask:#x} == {mark:#x} ct mark set ct mark & {keep:#x} | {reply:#x}
        meta mark & {mask:#x} != {mark:#x} ct mark & {mask:#x} == {reply:#x} meta mark set ct mark
    }}
    # Inbound capture: TCP from outside to anything but HBONE -> {inbound}.
    chain prerouting_nat {{
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport {hbone} accept
        iif \"lo\" accept
        meta mark & {mask:#x} == {mark:#x} accept
        meta l4proto tcp redirect to :{inbound}
    }}
    # Loop guard: the capture ports only take redirected connections.
    chain input_filter {{
        type filter hook input priority filter; policy accept;
        tcp dport {{ {outbound}, {inbound} }} ct direction original ct status ! dnat reject with tcp reset
    }}
    # The app's replies to weft's spoofed-source sockets: restore the
    # mark; the route-type chain re-routes them, so the fwmark rule
    # (see `routes`) delivers them locally to weft.
    chain output_mangle {{
        type route hook output priority mangle; policy accept;
        meta mark & {mask:#x} != {mark:#x} ct mark & {mask:#x} == {reply:#x} meta mark set ct mark
    }}
    # Outbound capture: the app's TCP, not to loopback, not weft's own -> {outbound}.
    chain output_nat {{
        type nat hook output priority -100; policy accept;
        meta mark & {mask:#x} == {mark:#x} accept
        meta mark & {mask:#x} == {reply:#x} accept
        ip daddr 127.0.0.0/8 accept
        ip6 daddr ::1 accept
        oif \"lo\" accept
{dns}        meta l4proto tcp redirect to :{outbound}
    }}
}}
"
        )
    }

    /// The whole `nft -f -` input of an install: create the table if absent,
    /// delete it, define it anew. One transaction, so the swap is atomic and
    /// works whether or not an old table exists.
    pub fn transaction(&self) -> String {
        format!("{}{}", remove_transaction(), self.ruleset())
    }
}

/// The `nft -f -` input of a removal: idempotent, absent is fine.
/// (nft 1.0.6 has no `destroy table`, hence create-then-delete.)
fn remove_transaction() -> String {
    format!("table {TABLE} {{}}\ndelete table {TABLE}\n")
}

/// Installs or atomically replaces weft's table in `netns`.
pub fn install(netns: &Netns, params: &RuleParams) -> Result<(), CaptureError> {
    params.validate()?;
    const STEP: &str = "install nftables table inet weft";
    let out = nft(netns, STEP, &["-f", "-"], Some(params.transaction()))?;
    check(netns, STEP, &out)?;
    tracing::debug!(netns = %netns.path().display(), "capture rules installed");
    Ok(())
}

/// Deletes weft's table from `netns`; succeeds if it was not there.
pub fn remove(netns: &Netns) -> Result<(), CaptureError> {
    const STEP: &str = "remove nftables table inet weft";
    let out = nft(netns, STEP, &["-f", "-"], Some(remove_transaction()))?;
    check(netns, STEP, &out)
}

/// The current `nft list table inet weft` text of `netns`, or `None` when the
/// table does not exist. For tests and the admin dump.
pub fn inspect(netns: &Netns) -> Result<Option<String>, CaptureError> {
    const STEP: &str = "list nftables table inet weft";
    let out = nft(netns, STEP, &["list", "table", "inet", "weft"], None)?;
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("No such file") {
        return Ok(None);
    }
    check(netns, STEP, &out)?;
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Runs `nft ARGS` inside `netns`, feeding it `input`.
///
/// Only the fork/exec happens on the namespace worker; the caller's thread
/// writes stdin and waits, so a slow nft does not hold up socket creation.
fn nft(
    netns: &Netns,
    step: &'static str,
    args: &'static [&'static str],
    input: Option<String>,
) -> Result<Output, CaptureError> {
    let bin = find_nft().ok_or(CaptureError::NftMissing)?;
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let spawn_err = |source| CaptureError::NftSpawn {
        path: netns.path().to_path_buf(),
        step,
        source,
    };
    let mut child = netns
        .run(move || {
            Command::new(bin)
                .args(args)
                .env("LC_ALL", "C")
                .stdin(stdin)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        })?
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (input, child.stdin.take()) {
        // A write error (nft exited early) shows up in its status and stderr.
        let _ = pipe.write_all(text.as_bytes());
    }
    child.wait_with_output().map_err(spawn_err)
}

/// Turns a failed nft run into an error naming the namespace and step.
fn check(netns: &Netns, step: &'static str, out: &Output) -> Result<(), CaptureError> {
    if out.status.success() {
        return Ok(());
    }
    Err(CaptureError::Nft {
        path: netns.path().to_path_buf(),
        step,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Finds the `nft` binary in `PATH`, then in the sbin directories daemons'
/// `PATH`s often lack.
fn find_nft() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nft"))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn defaults_are_istios() {
        let p = RuleParams::default();
        assert_eq!(
            (p.outbound_port, p.inbound_plain_port, p.hbone_port),
            (15001, 15006, 15008)
        );
        assert_eq!((p.mark, p.mask, p.reply_mark), (0x539, 0xfff, 0x111));
        p.validate().expect("defaults are valid");
    }

    #[test]
    fn validate_rejects_loops() {
        let ok = RuleParams::default();
        let cases = [
            RuleParams {
                outbound_port: 0,
                ..ok
            },
            RuleParams {
                inbound_plain_port: 15001,
                ..ok
            },
            RuleParams {
                hbone_port: 15006,
                ..ok
            },
            RuleParams { mark: 0x1539, ..ok },
            RuleParams {
                reply_mark: 0,
                ..ok
            },
            RuleParams {
                reply_mark: 0x539,
                ..ok
            },
        ];
        for p in cases {
            assert!(
                matches!(p.validate(), Err(CaptureError::InvalidParams(_))),
                "{p:?}"
            );
        }
    }

    /// The ruleset documented on [`RuleParams::ruleset`] is the one built.
    #[test]
    fn ruleset_matches_doc() {
        let src = include_str!("rules.rs");
        let doc: String = src
            .lines()
            .map(str::trim_start)
            .skip_while(|l| *l != "/// ```text")
            .skip(1)
            .take_while(|l| *l != "/// ```")
            .map(|l| format!("{}\n", l.strip_prefix("/// ").unwrap_or("")))
            .collect();
        // Doc lines are indented relative to `/// `; the built text the same.
        assert_eq!(doc, RuleParams::default().ruleset());
    }

    #[test]
    fn dns_is_redirected_only_when_captured() {
        let on = RuleParams::default().ruleset();
        assert!(on.contains("udp dport 53 redirect to :15053"));
        assert!(on.contains("tcp dport 53 redirect to :15053"));
        let off = RuleParams {
            dns_port: None,
            ..RuleParams::default()
        }
        .ruleset();
        assert!(!off.contains("dport 53"), "{off}");
        // DNS comes before the catch-all TCP redirect, or TCP DNS would go to 15001.
        let dns_at = on.find("tcp dport 53").unwrap();
        assert!(dns_at < on.find("meta l4proto tcp redirect to :15001").unwrap());
        let clash = RuleParams {
            dns_port: Some(15001),
            ..RuleParams::default()
        };
        assert!(clash.validate().is_err());
    }

    #[test]
    fn transaction_replaces_the_table() {
        let t = RuleParams::default().transaction();
        assert!(t.starts_with("table inet weft {}\ndelete table inet weft\ntable inet weft {\n"));
        assert!(t.contains("redirect to :15001"));
        assert!(t.contains("redirect to :15006"));
        assert!(t.contains("tcp dport 15008 accept"));
        assert!(t.contains("ct mark set ct mark & 0xfffff000 | 0x111"));
        assert!(t.contains("tcp dport { 15001, 15006 } ct direction original ct status ! dnat"));
    }
}
