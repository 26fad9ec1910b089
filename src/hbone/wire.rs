//! The HBONE request on the wire: an HTTP/2 CONNECT whose `:authority` is the destination
//! (`ip:port`, or `<service hostname>:<port>` across networks), plus `forwarded`, `baggage`,
//! `traceparent` and, on the inner request of double HBONE, `x-forwarded-network`. One place
//! builds it and one place checks it.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderValue, Method, Request, StatusCode};

/// The header naming the network a double-HBONE connection came from (ztunnel's name); set
/// on the inner request only, so the destination knows its transport peer is a gateway.
pub const ORIGIN_NETWORK_HEADER: &str = "x-forwarded-network";
/// Describes a workload (W3C baggage, the keys ztunnel writes): the source on a request, the
/// destination on a 200.
pub const BAGGAGE_HEADER: &str = "baggage";

/// Where a CONNECT asks to go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Authority {
    /// `<pod ip>:<app port>`: the address the tunnel arrives on, and a port.
    Addr(SocketAddr),
    /// `<service hostname>:<service port>`: double HBONE, where the sender does not know
    /// which endpoint the remote network's gateway picks; the receiver maps the service port.
    Service { host: String, port: u16 },
}

impl Authority {
    pub fn port(&self) -> u16 {
        match self {
            Authority::Addr(a) => a.port(),
            Authority::Service { port, .. } => *port,
        }
    }
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authority::Addr(a) => f.write_str(&host_port(*a)),
            Authority::Service { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl From<SocketAddr> for Authority {
    fn from(a: SocketAddr) -> Self {
        Authority::Addr(a)
    }
}

/// What a client says about the connection it is tunnelling.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// The destination the tunnel should reach.
    pub authority: Authority,
    /// The original client address, for `forwarded: for=`.
    pub client: SocketAddr,
    /// W3C baggage with the source's metadata.
    pub baggage: String,
    /// The hostname of the service the client addressed, when it addressed one: sent as
    /// `forwarded: ...;host=` (as ztunnel sends it; a waypoint picks the service by it).
    pub service_host: Option<String>,
    /// The client's network, on the inner request of double HBONE.
    pub origin_network: Option<String>,
}

/// A request the server refuses before doing anything, with the status that says why.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

impl Refusal {
    fn bad_request(reason: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            reason: reason.into(),
        }
    }
}

/// `ip:port`, with IPv6 in brackets, as `:authority` and `forwarded` want it.
pub fn host_port(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
    }
}

fn traceparent() -> String {
    let trace: u128 = rand::random::<u128>() | 1;
    let span: u64 = rand::random::<u64>() | 1;
    format!("00-{trace:032x}-{span:016x}-00")
}

/// Builds the CONNECT request. h2 turns `authority` into `:authority` and sends no `:scheme` or
/// `:path` for CONNECT.
pub fn connect_request(req: &ConnectRequest) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = Method::CONNECT;
    // An authority-form URI: never fails for a formatted socket address; a service hostname
    // comes from the control plane and was checked as a DNS name there.
    *r.uri_mut() = http::Uri::builder()
        .authority(req.authority.to_string())
        .build()
        .unwrap_or_default();
    let h = r.headers_mut();
    let for_client = format!("for=\"{}\"", host_port(req.client));
    // A hostname that is no header text costs only the `host=` part, never the client address.
    let forwarded = req
        .service_host
        .as_ref()
        .and_then(|host| HeaderValue::from_str(&format!("{for_client};host={host}")).ok())
        .or_else(|| HeaderValue::from_str(&for_client).ok());
    if let Some(v) = forwarded {
        h.insert("forwarded", v);
    }
    if let Ok(v) = HeaderValue::from_str(&req.baggage) {
        h.insert(BAGGAGE_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&traceparent()) {
        h.insert("traceparent", v);
    }
    if let Some(v) = req
        .origin_network
        .as_deref()
        .and_then(|n| HeaderValue::from_str(n).ok())
    {
        h.insert(ORIGIN_NETWORK_HEADER, v);
    }
    r
}

/// The 200 that opens an admitted tunnel. It carries the destination workload's `baggage`, as
/// ztunnel's answers do, so a client that cannot know which endpoint it reached (through a
/// network's gateway, which picks one) can name it; a value that is no header text is left out.
pub fn connect_response(baggage: &str) -> http::Response<()> {
    let mut r = http::Response::new(());
    if let Ok(v) = HeaderValue::from_str(baggage) {
        r.headers_mut().insert(BAGGAGE_HEADER, v);
    }
    r
}

/// The `baggage` of a CONNECT answer, if it has one that is text.
pub fn response_baggage<B>(resp: &http::Response<B>) -> Option<&str> {
    resp.headers().get(BAGGAGE_HEADER)?.to_str().ok()
}

/// Checks an incoming request: CONNECT, and an authority that is either `ip:port` with the
/// address the tunnel arrived on (a pod only tunnels to itself) or a DNS name and a port (a
/// service, mapped by the receiver to the pod's port). Returns the destination.
pub fn validate<B>(req: &Request<B>, arrived_on: IpAddr) -> Result<Authority, Refusal> {
    if req.method() != Method::CONNECT {
        return Err(Refusal::bad_request(format!(
            "method {} is not CONNECT",
            req.method()
        )));
    }
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| Refusal::bad_request("CONNECT without :authority"))?;
    let not_valid = || {
        Refusal::bad_request(format!(
            "authority {:?} is neither ip:port nor hostname:port",
            authority.as_str()
        ))
    };
    let Ok(dest) = authority.as_str().parse::<SocketAddr>() else {
        let (host, port) = authority.as_str().rsplit_once(':').ok_or_else(not_valid)?;
        let port: u16 = port.parse().map_err(|_| not_valid())?;
        if !is_dns_name(host) {
            return Err(not_valid());
        }
        return Ok(Authority::Service {
            host: host.to_ascii_lowercase(),
            port,
        });
    };
    if canonical(dest.ip()) != canonical(arrived_on) {
        return Err(Refusal::bad_request(format!(
            "authority {dest} does not match the address the tunnel arrived on ({arrived_on})"
        )));
    }
    Ok(Authority::Addr(dest))
}

/// A DNS name as a service hostname is one: dot-separated labels of letters, digits and
/// inner hyphens, not all digits (so a mistyped address is not taken for a name).
fn is_dns_name(host: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.len() <= 253
        && host.split('.').all(label_ok)
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// The network a double-HBONE request says it came from.
pub fn origin_network<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(ORIGIN_NETWORK_HEADER)?
        .to_str()
        .ok()
        .filter(|n| !n.is_empty())
}

/// IPv4-mapped IPv6 (from a dual-stack listener) compares equal to the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The `forwarded: for="ip:port"` address, if present and well-formed.
pub fn forwarded_for<B>(req: &Request<B>) -> Option<SocketAddr> {
    let v = req.headers().get("forwarded")?.to_str().ok()?;
    v.split(';')
        .flat_map(|p| p.split(','))
        .filter_map(|kv| kv.trim().strip_prefix("for="))
        .map(|s| s.trim_matches('"'))
        .find_map(|s| s.parse().ok())
}

/// The source's metadata an HBONE request carries as W3C baggage, in the keys and order
/// ztunnel writes them; empty values are left out, as ztunnel leaves them out.
#[derive(Clone, Copy, Debug, Default)]
pub struct Baggage<'a> {
    pub cluster: &'a str,
    pub namespace: &'a str,
    /// Names the workload's key: `k8s.<workload_type>.name`.
    pub workload_type: &'a str,
    pub workload: &'a str,
    pub service: &'a str,
    pub version: &'a str,
    pub region: &'a str,
    pub zone: &'a str,
}

/// The request's `baggage` header, if any.
pub fn baggage<B>(req: &Request<B>) -> Option<&str> {
    req.headers().get(BAGGAGE_HEADER)?.to_str().ok()
}

impl<'a> Baggage<'a> {
    /// The keys of a `baggage` header as ztunnel writes them; other members are ignored, and
    /// so are W3C member properties (after `;`).
    pub fn parse(header: &'a str) -> Self {
        let mut b = Baggage::default();
        for member in header.split(',') {
            let member = member.split(';').next().unwrap_or_default();
            let Some((key, value)) = member.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            match key {
                "k8s.cluster.name" => b.cluster = value,
                "k8s.namespace.name" => b.namespace = value,
                "service.name" => b.service = value,
                "service.version" => b.version = value,
                "cloud.region" => b.region = value,
                "cloud.availability_zone" => b.zone = value,
                _ => {
                    if let Some(kind) = key
                        .strip_prefix("k8s.")
                        .and_then(|k| k.strip_suffix(".name"))
                        .filter(|k| !k.is_empty() && !k.contains('.'))
                    {
                        b.workload_type = kind;
                        b.workload = value;
                    }
                }
            }
        }
        b
    }

    pub fn header(&self) -> String {
        let workload_key = format!("k8s.{}.name", self.workload_type);
        [
            ("k8s.cluster.name", self.cluster),
            ("k8s.namespace.name", self.namespace),
            (workload_key.as_str(), self.workload),
            ("service.name", self.service),
            ("service.version", self.version),
            ("cloud.region", self.region),
            ("cloud.availability_zone", self.zone),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, authority: &str) -> Request<()> {
        let mut r = Request::new(());
        *r.method_mut() = method;
        *r.uri_mut() = http::Uri::builder().authority(authority).build().unwrap();
        r
    }

    #[test]
    fn accepts_matching_connect() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let d = validate(&req(Method::CONNECT, "10.0.0.1:80"), ip).unwrap();
        assert_eq!(d, Authority::Addr("10.0.0.1:80".parse().unwrap()));
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert!(validate(&req(Method::CONNECT, "[fd00::1]:80"), v6).is_ok());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert!(validate(&req(Method::CONNECT, "10.0.0.1:80"), mapped).is_ok());
    }

    #[test]
    fn refuses_the_rest_with_400() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for r in [
            req(Method::GET, "10.0.0.1:80"),
            req(Method::CONNECT, "10.0.0.2:80"),
            req(Method::CONNECT, "example.com"),
            req(Method::CONNECT, "example.com:http"),
            req(Method::CONNECT, "-bad-.example.com:80"),
            req(Method::CONNECT, "10.0.0.300:80"),
            req(Method::CONNECT, "10.0.0.1"),
        ] {
            assert_eq!(
                validate(&r, ip).unwrap_err().status,
                StatusCode::BAD_REQUEST
            );
        }
    }

    #[test]
    fn accepts_a_service_hostname_for_double_hbone() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let d = validate(&req(Method::CONNECT, "Web.Shop.svc.cluster.local:80"), ip).unwrap();
        assert_eq!(
            d,
            Authority::Service {
                host: "web.shop.svc.cluster.local".into(),
                port: 80
            }
        );
        let r = connect_request(&ConnectRequest {
            authority: d.clone(),
            client: "10.0.0.9:5555".parse().unwrap(),
            baggage: String::new(),
            service_host: Some("web.shop.svc.cluster.local".into()),
            origin_network: Some("east".into()),
        });
        assert_eq!(
            r.uri().authority().unwrap().as_str(),
            "web.shop.svc.cluster.local:80"
        );
        assert_eq!(origin_network(&r), Some("east"));
        assert_eq!(validate(&r, "10.9.9.9".parse().unwrap()).unwrap(), d);
    }

    #[test]
    fn baggage_is_written_as_ztunnel_writes_it() {
        let full = Baggage {
            cluster: "Kubernetes",
            namespace: "shop",
            workload_type: "cronjob",
            workload: "report",
            service: "report",
            version: "v2",
            region: "eu-west",
            zone: "eu-west-1a",
        };
        assert_eq!(
            full.header(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.cronjob.name=report,\
             service.name=report,service.version=v2,cloud.region=eu-west,\
             cloud.availability_zone=eu-west-1a"
        );
        let sparse = Baggage {
            namespace: "shop",
            workload_type: "deployment",
            version: "latest",
            ..Baggage::default()
        };
        assert_eq!(
            sparse.header(),
            "k8s.namespace.name=shop,service.version=latest"
        );
    }

    #[test]
    fn baggage_reads_back_what_it_writes_and_ignores_the_rest() {
        let header = "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.cronjob.name=report,\
                      service.name=report,service.version=v2,cloud.region=eu-west,\
                      cloud.availability_zone=eu-west-1a";
        let b = Baggage::parse(header);
        assert_eq!(b.header(), header);
        assert_eq!((b.workload_type, b.workload), ("cronjob", "report"));
        let odd = Baggage::parse(" k8s.pod.name = a1 ;prop=x, userId=7,k8s..name=z,novalue,=v");
        assert_eq!((odd.workload_type, odd.workload), ("pod", "a1"));
        assert_eq!(odd.header(), "k8s.pod.name=a1");
        assert!(Baggage::parse("").header().is_empty());
    }

    #[test]
    fn request_has_wire_headers() {
        let r = connect_request(&ConnectRequest {
            authority: Authority::Addr("[fd00::2]:8080".parse().unwrap()),
            client: "10.0.0.9:5555".parse().unwrap(),
            baggage: Baggage {
                cluster: "c",
                namespace: "ns",
                workload_type: "deployment",
                workload: "w",
                service: "a",
                version: "v",
                ..Baggage::default()
            }
            .header(),
            service_host: Some("web.shop.svc.cluster.local".into()),
            origin_network: None,
        });
        assert!(r.headers().get(ORIGIN_NETWORK_HEADER).is_none());
        assert_eq!(
            r.headers()["forwarded"],
            "for=\"10.0.0.9:5555\";host=web.shop.svc.cluster.local"
        );
        assert_eq!(r.method(), Method::CONNECT);
        assert_eq!(r.uri().authority().unwrap().as_str(), "[fd00::2]:8080");
        assert_eq!(forwarded_for(&r), Some("10.0.0.9:5555".parse().unwrap()));
        let tp = r.headers()["traceparent"].to_str().unwrap();
        assert_eq!(tp.len(), 55);
        assert!(r.headers()["baggage"]
            .to_str()
            .unwrap()
            .contains("k8s.namespace.name=ns"));
    }
}
