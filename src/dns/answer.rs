//! Answers from weft's state: which queries the DNS proxy answers itself, and what it answers.
//!
//! A pure function of the snapshot, the asking pod's namespace and search list, and the query,
//! so the naming rules (search-domain stripping, Kubernetes short names, wildcard hosts) are
//! tested without sockets. Everything it does not answer is forwarded unchanged.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::state::{Service, Snapshot};

/// TTL of the records weft answers (ztunnel's): short, since VIPs can move with the state.
pub const TTL_SECONDS: u32 = 30;
/// The UDP payload weft advertises in its own answers' EDNS (the DNS flag day's size).
const EDNS_PAYLOAD: u16 = 1232;

/// Who asks: what the proxy knows of the pod the query came from.
pub struct Asker<'a> {
    pub namespace: &'a str,
    /// The pod's search list (from its resolv.conf), most specific first.
    pub search: &'a [Name],
    /// `svc.<cluster domain>.` and `<cluster domain>.`, for expanding short service names.
    pub svc_domain: &'a Name,
    pub cluster_domain: &'a Name,
}

/// What to do with a query.
#[derive(Debug)]
pub enum Lookup {
    /// weft answers (the response, ready to send).
    Answer(Message),
    /// Not weft's to answer: forward the query as it came.
    Forward,
}

/// The query type label of a query (`a`, `aaaa`, ...; `unknown` without a question).
pub fn query_type(query: &Message) -> String {
    query.queries().first().map_or("unknown".into(), |q| {
        q.query_type().to_string().to_lowercase()
    })
}

/// Decides and, for the mesh's names, builds the answer.
pub fn lookup(snap: &Snapshot, asker: &Asker<'_>, query: &Message) -> Lookup {
    let [q] = query.queries() else {
        return Lookup::Forward;
    };
    if query.op_code() != OpCode::Query
        || q.query_class() != DNSClass::IN
        || !matches!(q.query_type(), RecordType::A | RecordType::AAAA)
    {
        return Lookup::Forward;
    }
    let asked = q.name().to_lowercase();
    let Some((service, via)) = find_service(snap, asker, &asked) else {
        return Lookup::Forward;
    };
    let mut answers = Vec::new();
    let mut owner = q.name().clone();
    // Found under a search domain: the client learns the real name (as ztunnel answers).
    if let Some(stripped) = via {
        answers.push(Record::from_rdata(
            owner.clone(),
            TTL_SECONDS,
            RData::CNAME(CNAME(stripped.clone())),
        ));
        owner = stripped;
    }
    for ip in addresses(snap, &service, q.query_type()) {
        let rdata = match (q.query_type(), ip) {
            (RecordType::A, IpAddr::V4(v4)) => RData::A(A(v4)),
            (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
            _ => continue,
        };
        answers.push(Record::from_rdata(owner.clone(), TTL_SECONDS, rdata));
    }
    // A name weft knows with no address of the asked family: NOERROR with no records, never
    // NXDOMAIN (the name exists).
    Lookup::Answer(response(query, ResponseCode::NoError, answers))
}

/// What a service's name resolves to: its VIPs; for a headless one, the addresses of its
/// healthy endpoints (one per workload, of the asked family), as the cluster's DNS gives them.
fn addresses(snap: &Snapshot, service: &Service, asked: RecordType) -> Vec<IpAddr> {
    if !service.vips.is_empty() {
        return service.vips.clone();
    }
    let family = |ip: &&IpAddr| ip.is_ipv4() == (asked == RecordType::A);
    snap.healthy_endpoints(&service.key())
        .filter_map(|ep| ep.workload.workload_ips.iter().find(family).copied())
        .collect()
}

/// A response to `query`: its id, opcode, question and recursion-desired bit, authoritative,
/// recursion available; EDNS when the query had it.
pub fn response(query: &Message, code: ResponseCode, answers: Vec<Record>) -> Message {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(code == ResponseCode::NoError)
        .set_response_code(code);
    m.add_queries(query.queries().iter().cloned());
    m.add_answers(answers);
    if query.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(edns);
    }
    m
}

/// SERVFAIL for `query` (upstream timed out or failed, too many pending).
pub fn servfail(query: &Message) -> Message {
    response(query, ResponseCode::ServFail, Vec::new())
}

/// The wire form of `answer` for a client that accepts `limit` bytes: when it does not fit,
/// the answers are dropped and TC is set, so the client asks again over TCP (RFC 1035 4.2.1,
/// RFC 7766).
pub fn encode_within(answer: &Message, limit: usize) -> Result<Vec<u8>, hickory_proto::ProtoError> {
    let bytes = answer.to_vec()?;
    if bytes.len() <= limit {
        return Ok(bytes);
    }
    answer.truncate().to_vec()
}

/// The service a name stands for from the asker's point of view, and the name it was found
/// under when that differs from the asked one because a search domain was stripped.
fn find_service(
    snap: &Snapshot,
    asker: &Asker<'_>,
    asked: &Name,
) -> Option<(Arc<Service>, Option<Name>)> {
    for (candidate, via) in candidates(asker, asked) {
        for host in wildcards(&candidate) {
            if let Some(s) = best_service(snap, asker, &host) {
                // A wildcard host answers under the asked name itself.
                let via = via.clone().filter(|_| host == hostname(&candidate));
                return Some((s, via));
            }
        }
    }
    None
}

/// The names to try, in order: the asked name; its Kubernetes expansions; then, for every
/// search domain it ends with, the name without it (and that name's expansions), which the
/// client's resolver built by appending its search list.
fn candidates(asker: &Asker<'_>, asked: &Name) -> Vec<(Name, Option<Name>)> {
    let mut out: Vec<(Name, Option<Name>)> = Vec::new();
    let mut add = |n: Name, via: Option<Name>| {
        if !out.iter().any(|(m, _)| *m == n) {
            out.push((n, via));
        }
    };
    add(asked.clone(), None);
    for e in kube_expansions(asker, asked) {
        add(e, None);
    }
    for domain in asker.search {
        let Some(stripped) = strip_domain(asked, domain) else {
            continue;
        };
        add(stripped.clone(), Some(stripped.clone()));
        for e in kube_expansions(asker, &stripped) {
            add(e, Some(stripped.clone()));
        }
    }
    out
}

/// `name` without the trailing `domain`, when it ends with it and has more labels.
fn strip_domain(name: &Name, domain: &Name) -> Option<Name> {
    let domain = domain.to_lowercase();
    let (n, d) = (name.num_labels(), domain.num_labels());
    if n <= d || !domain.zone_of(name) {
        return None;
    }
    let labels: Vec<&[u8]> = name.iter().take(usize::from(n - d)).collect();
    Name::from_labels(labels).ok().map(|mut s| {
        s.set_fqdn(true);
        s
    })
}

/// Kubernetes' short forms of a service name: `svc` (in the asker's namespace), `svc.ns`,
/// `svc.ns.svc`.
fn kube_expansions(asker: &Asker<'_>, name: &Name) -> Vec<Name> {
    let append = |domain: &Name| name.clone().append_domain(domain).ok();
    let ns_domain = Name::from_ascii(asker.namespace)
        .ok()
        .and_then(|ns| ns.append_domain(asker.svc_domain).ok());
    match name.num_labels() {
        1 => ns_domain.and_then(|d| append(&d)).into_iter().collect(),
        2 => append(asker.svc_domain).into_iter().collect(),
        3 if name
            .iter()
            .next_back()
            .is_some_and(|l| l.eq_ignore_ascii_case(b"svc")) =>
        {
            append(asker.cluster_domain).into_iter().collect()
        }
        _ => Vec::new(),
    }
}

/// The hostname forms to look up for a name: itself, then `*.parent` for each parent with at
/// least one label (ServiceEntry hosts may be wildcards).
fn wildcards(name: &Name) -> Vec<String> {
    let host = hostname(name);
    let mut out = vec![host.clone()];
    let mut rest = host.as_str();
    while let Some((_, parent)) = rest.split_once('.') {
        out.push(format!("*.{parent}"));
        rest = parent;
    }
    out
}

/// The state's spelling of a name: lowercase, without the root dot.
fn hostname(name: &Name) -> String {
    let s = name.to_lowercase().to_ascii();
    s.strip_suffix('.').unwrap_or(&s).to_string()
}

/// The service with `host` that has an address and that the asker may see, preferring the
/// asker's own namespace.
///
/// A service without a VIP is answered only when it is a Kubernetes headless service (its
/// host is under `svc.<cluster domain>`) with healthy endpoints: with their addresses. Any
/// other (a ServiceEntry with nothing allocated, a headless service with no ready pod) is the
/// real DNS's to answer, and is forwarded.
fn best_service(snap: &Snapshot, asker: &Asker<'_>, host: &str) -> Option<Arc<Service>> {
    let mut first = None;
    let svc_suffix = format!(".{}", hostname(asker.svc_domain));
    for s in snap.services_by_hostname(host) {
        // Not visible to the asker: forwarded, as if not in the mesh.
        if !s.visible_to(asker.namespace) {
            continue;
        }
        if s.vips.is_empty()
            && !(s.hostname.ends_with(&svc_suffix)
                && snap.healthy_endpoints(&s.key()).next().is_some())
        {
            continue;
        }
        if s.namespace == asker.namespace {
            return Some(s.clone());
        }
        first.get_or_insert_with(|| s.clone());
    }
    first
}

#[cfg(test)]
mod tests;
