//! Addresses for ServiceEntries that have none, in the Kubernetes-direct mode (where no istiod
//! allocates them into `status.addresses`): so that a host with no real DNS record, or one
//! resolved by DNS, still has a VIP weft's DNS proxy can answer and its capture can route.
//!
//! From Istio's ranges (240.240.0.0/16 and 2001:2::/48, where istiod allocates by default).
//! Every weft computes the same answer from the same objects, without coordinating: a host's
//! address is a hash of `namespace/name/host`, and only a collision moves one, to the next free
//! address in the order of those keys. An address therefore stays put while other entries
//! come and go, except in the rare case that a new key sorting before it lands on its slot.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::state::Service;

const V4_BASE: u32 = u32::from_be_bytes([240, 240, 0, 0]);
const V6_BASE: u128 = 0x2001_0002_0000_0000_0000_0000_0000_0000;
/// Slots 1..=65534 of the /16: neither its first nor its last address.
const SLOTS: u32 = 65534;

/// Gives `services[i]` for each `i` in `which` one IPv4 and one IPv6 address not used by any
/// service in `services`.
pub fn assign(services: &mut [Service], which: &[usize]) {
    let mut used: HashSet<IpAddr> = services.iter().flat_map(|s| s.vips.clone()).collect();
    let mut order: Vec<(String, usize)> = which
        .iter()
        .map(|&i| {
            let s = &services[i];
            (format!("{}/{}/{}", s.namespace, s.name, s.hostname), i)
        })
        .collect();
    order.sort();
    for (key, i) in order {
        let start = fnv1a(key.as_bytes()) % SLOTS;
        let Some(slot) = (0..SLOTS)
            .map(|probe| (start + probe) % SLOTS + 1)
            .find(|slot| !used.contains(&v4(*slot)))
        else {
            tracing::warn!(service = %key, "no address left to allocate in 240.240.0.0/16");
            continue;
        };
        for ip in [v4(slot), v6(slot)] {
            used.insert(ip);
            services[i].vips.push(ip);
        }
    }
}

fn v4(slot: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(V4_BASE + slot))
}

fn v6(slot: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(V6_BASE + u128::from(slot)))
}

/// FNV-1a (64 bits): stable across builds and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn se(name: &str, host: &str) -> Service {
        Service {
            name: name.into(),
            namespace: "shop".into(),
            hostname: host.into(),
            vips: vec![],
            ports: Default::default(),
            subject_alt_names: vec![],
            waypoint: None,
            passthrough: false,
            visibility: Default::default(),
        }
    }

    fn allocated(services: Vec<Service>) -> Vec<Vec<IpAddr>> {
        let mut services = services;
        let which: Vec<usize> = (0..services.len())
            .filter(|i| services[*i].vips.is_empty())
            .collect();
        assign(&mut services, &which);
        services.into_iter().map(|s| s.vips).collect()
    }

    #[test]
    fn one_address_of_each_family_in_istios_ranges() {
        let vips = allocated(vec![se("a", "a.example.com")]);
        let [v4, v6] = vips[0][..] else {
            panic!("two addresses, got {:?}", vips[0])
        };
        let (IpAddr::V4(v4), IpAddr::V6(v6)) = (v4, v6) else {
            panic!("v4 then v6")
        };
        assert_eq!(v4.octets()[..2], [240, 240]);
        assert!(v4.octets()[2..] != [0, 0] && v4.octets()[2..] != [255, 255]);
        assert_eq!(v6.segments()[..3], [0x2001, 2, 0]);
        assert_eq!(
            v6.segments()[7],
            u16::from_be_bytes([v4.octets()[2], v4.octets()[3]])
        );
    }

    #[test]
    fn an_address_stays_put_while_other_entries_come_and_go() {
        let alone = allocated(vec![se("a", "a.example.com")]);
        let crowd = allocated(vec![
            se("z", "z.example.com"),
            se("a", "a.example.com"),
            se("m", "m.example.com"),
        ]);
        assert_eq!(alone[0], crowd[1]);
        let distinct: HashSet<_> = crowd.iter().flatten().collect();
        assert_eq!(distinct.len(), 6);
    }

    #[test]
    fn a_used_address_is_skipped() {
        let first = allocated(vec![se("a", "a.example.com")]);
        let mut taken = se("user", "user.example.com");
        taken.vips = vec![first[0][0]];
        let again = allocated(vec![taken, se("a", "a.example.com")]);
        assert_ne!(
            again[1][0], first[0][0],
            "moved off the address a user holds"
        );
        assert_eq!(again[0], vec![first[0][0]], "the user's address untouched");
    }
}
