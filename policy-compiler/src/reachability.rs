//! Who may reach whom on which ports: the exact reachability of a policy, for review (`diff`,
//! `graph`).
//!
//! Every answer comes from the reference evaluator ([`Policy::evaluate`]), never from the
//! compiled maps, so the review tools agree with the kernel by construction. It is exact, not
//! sampled:
//!
//! - Sources are *source classes*: the longest matching prefix among member prefixes and rule
//!   CIDRs decides everything about a source address (its segment and the rule CIDRs containing
//!   it, see `docs/design.md`), so one address per class stands for all of them. A class is
//!   labelled with its segment (`radiology`, `world`), or with the most specific rule CIDR that
//!   contains it (`10.99.0.0/16`; `10.10.0.0/25 (radiology)` when the CIDR lies in a segment).
//! - Destinations are segments (and `world`): a verdict depends only on the destination's
//!   segment, so one member address stands for all.
//! - The built-in `quarantine` segment has no members in Git: a host moved into it at run time
//!   stands for it, as a source class and as a destination (judged with that host quarantined,
//!   [`Policy::evaluate_with`]).
//! - Ports: the verdict can only change where a rule's port range starts or ends, so the
//!   evaluator is asked once per interval between consecutive range boundaries of the
//!   destination's rules, and once for "every other packet".

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::evaluate::{Flow, Verdict};
use crate::model::{Mode, Policy, PortMatch, RuleKind, Source, WORLD};
use crate::overrides::{Overrides, QUARANTINE};
use crate::port_set::{PORT_PROTOCOLS, PortSet};
use crate::prefix::{Family, Prefix};

/// The address that stands for a quarantined host (TEST-NET-1: never a real device); where it
/// sits in the network does not matter once it is quarantined.
pub const QUARANTINED_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

/// An IP protocol without ports that no `ports` entry but `any` can name (GRE), standing for
/// every packet outside [`PORT_PROTOCOLS`].
const OTHER_PROTOCOL: u8 = 47;

/// One class of source addresses that the policy treats alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceClass {
    /// `radiology`, `world`, `10.99.0.0/16`, or `10.10.0.0/25 (radiology)`.
    pub label: String,
    /// The segment of the class's addresses (`world` for none).
    pub segment: String,
    /// The most specific rule CIDR containing the class's addresses.
    pub cidr: Option<Prefix>,
    /// One address of the class.
    pub address: IpAddr,
    /// The class of quarantined hosts: `address` is judged as quarantined.
    pub quarantined: bool,
}

impl SourceClass {
    /// Segments first (by name), then `world`, then CIDR classes (by prefix).
    pub fn sort_key(&self) -> (u8, Option<Prefix>, &str) {
        let rank = match (&self.cidr, self.segment.as_str()) {
            (None, WORLD) => 1,
            (None, _) => 0,
            (Some(_), _) => 2,
        };
        (rank, self.cidr, &self.segment)
    }
}

/// A segment (or `world`) as a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub name: String,
    pub mode: Mode,
    /// One address of the segment.
    pub address: IpAddr,
    /// The quarantine segment: `address` is judged as quarantined.
    pub quarantined: bool,
}

/// What one source may send to one destination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Allowed by a rule (or not judged: traffic to an unenforced `world`).
    pub allowed: PortSet,
    /// Passed without a rule and reported as audit (the destination is in monitor mode).
    pub audited: PortSet,
}

impl Access {
    /// The verdict on every packet from `src` to `dst`, from the reference evaluator.
    pub fn between(policy: &Policy, src: IpAddr, dst: IpAddr) -> Access {
        Access::between_with(policy, src, dst, &Overrides::default())
    }

    /// [`Access::between`] with run-time overrides (quarantined hosts) in force.
    pub fn between_with(
        policy: &Policy,
        src: IpAddr,
        dst: IpAddr,
        overrides: &Overrides,
    ) -> Access {
        let judge = |proto: u8, port: Option<u16>| {
            policy
                .evaluate_with(
                    &Flow {
                        src,
                        dst,
                        proto,
                        port,
                    },
                    overrides,
                    0,
                )
                .verdict
        };
        let dst_segment = policy
            .evaluate_with(
                &Flow {
                    src,
                    dst,
                    proto: OTHER_PROTOCOL,
                    port: None,
                },
                overrides,
                0,
            )
            .dst_segment;
        let boundaries = range_boundaries(policy, &dst_segment);
        let mut access = Access::default();
        for (proto, max) in PORT_PROTOCOLS {
            let mut starts = vec![0u32];
            if let Some(cuts) = boundaries.get(&proto) {
                starts.extend(
                    cuts.iter()
                        .copied()
                        .filter(|&cut| cut > 0 && cut <= u32::from(max)),
                );
            }
            for (position, &start) in starts.iter().enumerate() {
                let end = starts
                    .get(position + 1)
                    .map_or(u32::from(max), |next| next - 1);
                // `start` and `end` are at most `max`, a u16.
                let (first, last) = (start as u16, end as u16);
                let target = match judge(proto, Some(first)) {
                    Verdict::Allow => &mut access.allowed,
                    Verdict::Audit => &mut access.audited,
                    Verdict::Deny => continue,
                };
                if let Some(ranges) = target.ranges_mut(proto) {
                    ranges.insert(first, last);
                }
            }
        }
        match judge(OTHER_PROTOCOL, None) {
            Verdict::Allow => access.allowed.other = true,
            Verdict::Audit => access.audited.other = true,
            Verdict::Deny => {}
        }
        access
    }

    /// The packets with this verdict (denied: neither allowed nor audited).
    pub fn with_verdict(&self, verdict: Verdict) -> PortSet {
        match verdict {
            Verdict::Allow => self.allowed.clone(),
            Verdict::Audit => self.audited.clone(),
            Verdict::Deny => self.allowed.union(&self.audited).complement(),
        }
    }
}

/// Per protocol number, the sorted values where a rule's port range of the destination segment
/// starts or ends (one past its end).
fn range_boundaries(policy: &Policy, destination: &str) -> BTreeMap<u8, BTreeSet<u32>> {
    let mut boundaries: BTreeMap<u8, BTreeSet<u32>> = BTreeMap::new();
    let rule_indexes: Vec<u32> = match policy.segment(destination) {
        Some(segment) => segment.rules.clone(),
        None => policy.world_rules().map(|rule| rule.index).collect(),
    };
    for rule in rule_indexes.iter().filter_map(|&index| policy.rule(index)) {
        let RuleKind::Allow { ports, .. } = &rule.kind else {
            continue;
        };
        for port in ports {
            if let PortMatch::Range { proto, first, last } = *port {
                let cuts = boundaries.entry(proto).or_default();
                cuts.insert(u32::from(first));
                cuts.insert(u32::from(last) + 1);
            }
        }
    }
    boundaries
}

/// The source classes of a policy, sorted (segments, `world`, CIDR classes).
pub fn source_classes(policy: &Policy) -> Vec<SourceClass> {
    let rule_cidrs = rule_cidrs(policy);
    let mut prefixes: BTreeSet<Prefix> = policy.members().map(|(prefix, _)| prefix).collect();
    prefixes.extend(rule_cidrs.iter().copied());
    // The whole address space stands for addresses that match no prefix at all.
    let mut regions = prefixes.clone();
    regions.extend(whole_spaces());
    let prefixes: Vec<Prefix> = prefixes.into_iter().collect();

    let mut classes: Vec<SourceClass> = Vec::new();
    for region in regions {
        let Some(address) = uncovered_address(region, &prefixes) else {
            continue;
        };
        let segment = policy
            .evaluate(&Flow {
                src: address,
                dst: address,
                proto: OTHER_PROTOCOL,
                port: None,
            })
            .src_segment;
        let cidr = rule_cidrs
            .iter()
            .filter(|cidr| cidr.contains_addr(address))
            .max_by_key(|cidr| cidr.prefix_len())
            .copied();
        let label = match cidr {
            None => segment.clone(),
            Some(cidr) if segment == WORLD => cidr.to_string(),
            Some(cidr) => format!("{cidr} ({segment})"),
        };
        if classes.iter().all(|class| class.label != label) {
            classes.push(SourceClass {
                label,
                segment,
                cidr,
                address,
                quarantined: false,
            });
        }
    }
    if policy.segment(QUARANTINE).is_some() {
        classes.push(SourceClass {
            label: QUARANTINE.to_string(),
            segment: QUARANTINE.to_string(),
            cidr: None,
            address: QUARANTINED_HOST,
            quarantined: true,
        });
    }
    classes.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    classes
}

/// Every segment that owns at least one address, sorted by name, then `world`.
pub fn destinations(policy: &Policy) -> Vec<Destination> {
    let members: Vec<Prefix> = policy.members().map(|(prefix, _)| prefix).collect();
    let mut destinations = Vec::new();
    for segment in policy.segments() {
        let address = segment
            .members
            .iter()
            .filter_map(|&member| uncovered_address(member, &members))
            .next();
        if let Some(address) = address {
            destinations.push(Destination {
                name: segment.name.clone(),
                mode: segment.mode,
                address,
                quarantined: false,
            });
        } else if segment.name == QUARANTINE {
            destinations.push(Destination {
                name: segment.name.clone(),
                mode: segment.mode,
                address: QUARANTINED_HOST,
                quarantined: true,
            });
        }
    }
    if let Some(address) = world_address(policy, None) {
        destinations.push(Destination {
            name: WORLD.to_string(),
            mode: policy.world_mode(),
            address,
            quarantined: false,
        });
    }
    destinations
}

/// The lowest address of the policy's `world` (in no member prefix) of `family`, or of either
/// family (IPv4 first).
pub fn world_address(policy: &Policy, family: Option<Family>) -> Option<IpAddr> {
    let members: Vec<Prefix> = policy.members().map(|(prefix, _)| prefix).collect();
    whole_spaces()
        .into_iter()
        .filter(|space| family.is_none_or(|family| space.family() == family))
        .find_map(|space| uncovered_address(space, &members))
}

/// Every CIDR named in a rule's `from`, sorted and deduplicated.
fn rule_cidrs(policy: &Policy) -> Vec<Prefix> {
    let mut cidrs = BTreeSet::new();
    for rule in policy.rules() {
        if let RuleKind::Allow { from, .. } = &rule.kind {
            cidrs.extend(from.iter().filter_map(|source| match source {
                Source::Cidr(prefix) => Some(*prefix),
                _ => None,
            }));
        }
    }
    cidrs.into_iter().collect()
}

fn whole_spaces() -> [Prefix; 2] {
    [
        Prefix::containing(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        Prefix::containing(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    ]
}

/// The lowest address of `region` that is in no prefix of `prefixes` strictly inside it, so
/// that `region` is its longest match. `None` when those prefixes cover the region.
pub fn uncovered_address(region: Prefix, prefixes: &[Prefix]) -> Option<IpAddr> {
    let inside: Vec<Prefix> = prefixes
        .iter()
        .copied()
        .filter(|prefix| region.contains(prefix) && *prefix != region)
        .collect();
    first_uncovered(region, &inside)
}

/// Halves the region until a half holds none of `inside` (depth at most the address width).
fn first_uncovered(region: Prefix, inside: &[Prefix]) -> Option<IpAddr> {
    let relevant: Vec<Prefix> = inside
        .iter()
        .copied()
        .filter(|prefix| region.contains(prefix) || prefix.contains(&region))
        .collect();
    if relevant.is_empty() {
        return Some(region.addr());
    }
    if relevant.iter().any(|prefix| prefix.contains(&region)) {
        return None;
    }
    let half_len = region.prefix_len() + 1;
    let lower = Prefix::containing(region.addr(), half_len);
    let upper = Prefix::containing(with_bit_set(region.addr(), half_len), half_len);
    first_uncovered(lower, &relevant).or_else(|| first_uncovered(upper, &relevant))
}

/// `addr` with bit number `position` (1 = the most significant) set.
fn with_bit_set(addr: IpAddr, position: u8) -> IpAddr {
    let width = Family::of(addr).width();
    let shift = u32::from(width - position);
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) | (1u32 << shift))),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) | (1u128 << shift))),
    }
}

/// The overrides under which a source and a destination, each an address and whether it
/// stands for a quarantined host, are judged.
pub(crate) fn quarantine_overrides(ends: [(IpAddr, bool); 2]) -> Overrides {
    let mut overrides = Overrides::default();
    for (address, quarantined) in ends {
        if quarantined {
            overrides.quarantined.insert(address);
        }
    }
    overrides
}

/// The whole reachability of one policy: for every source class and destination, its access.
#[derive(Clone, Debug)]
pub struct Reachability {
    pub sources: Vec<SourceClass>,
    pub destinations: Vec<Destination>,
    /// `access[s][d]` is what `sources[s]` may send to `destinations[d]`.
    pub access: Vec<Vec<Access>>,
}

impl Reachability {
    pub fn of(policy: &Policy) -> Reachability {
        let sources = source_classes(policy);
        let destinations = destinations(policy);
        let access = sources
            .iter()
            .map(|source| {
                destinations
                    .iter()
                    .map(|destination| {
                        let overrides = quarantine_overrides([
                            (source.address, source.quarantined),
                            (destination.address, destination.quarantined),
                        ]);
                        Access::between_with(
                            policy,
                            source.address,
                            destination.address,
                            &overrides,
                        )
                    })
                    .collect()
            })
            .collect();
        Reachability {
            sources,
            destinations,
            access,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(text: &str) -> Prefix {
        Prefix::parse(text).unwrap()
    }

    #[test]
    fn finds_the_first_uncovered_address() {
        let region = prefix("10.0.0.0/8");
        assert_eq!(
            uncovered_address(region, &[]),
            Some("10.0.0.0".parse().unwrap())
        );
        assert_eq!(
            uncovered_address(region, &[prefix("10.0.0.0/9")]),
            Some("10.128.0.0".parse().unwrap())
        );
        assert_eq!(
            uncovered_address(region, &[prefix("10.0.0.0/9"), prefix("10.128.0.0/9")]),
            None
        );
        assert_eq!(
            uncovered_address(region, &[prefix("10.0.0.0/32"), prefix("10.0.0.0/8")]),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            uncovered_address(prefix("::/0"), &[prefix("::/1")]),
            Some("8000::".parse().unwrap())
        );
    }
}
