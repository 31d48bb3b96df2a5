//! Compiles a validated [`Policy`] into the kernel map contents described in `docs/design.md`.
//!
//! - Segment ids: 0 = `world`, then segments sorted by name.
//! - Global rule index: segments sorted by name with their rules in file order, then the `world`
//!   rules, then one `SEGMENT/intra` pseudo-rule per segment with `intra: allow`.
//! - Address tries hold every member prefix and every rule CIDR; each entry's value is its
//!   segment and its source class, the interned (segment, set of rule CIDRs containing it).
//! - The built-in `quarantine` segment always has an id, and its source class (quarantine, no
//!   CIDRs) always exists, though no prefix carries it: the kernel gives both to addresses in
//!   its QUARANTINE map (see [`Artifact::quarantine`]).
//! - PAIRS maps (destination segment, source class) to a port table, the interned ordered list
//!   of the destination's rules that the class matches; PORTS maps (table, protocol, port) to the
//!   first rule of that list allowing it, as aligned power-of-two port blocks.

use std::collections::{BTreeMap, BTreeSet};

use enforcer_common::{CLASS_WILDCARD, CLASS_WORLD, PORT_KEY_FIXED_BITS, SEGMENT_WORLD, proto_key};
use foldhash::{HashMap, HashMapExt as _};

use crate::artifact::{
    AddrV4Entry, AddrV6Entry, Artifact, FORMAT_VERSION, KernelSettings, Maps, PairEntry, PortEntry,
    QuarantineIds, RuleEntry, SegmentEntry,
};
use crate::model::{Capacities, Mode, Policy, PortMatch, RuleKind, Source, WORLD};
use crate::overrides::QUARANTINE;
use crate::prefix::{Family, Prefix};

/// One map that the compiled policy does not fit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overflow {
    pub map: &'static str,
    pub needed: u64,
    pub capacity: u64,
}

#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq)]
pub enum CompileError {
    #[error("the compiled policy does not fit the kernel maps: {}", describe_overflows(.0))]
    OverCapacity(Vec<Overflow>),
    #[error("the policy needs more than 2^32 {0}")]
    IdSpaceExhausted(&'static str),
}

fn describe_overflows(overflows: &[Overflow]) -> String {
    overflows
        .iter()
        .map(|o| {
            format!(
                "{} needs {} entries, {} more than its capacity of {}",
                o.map,
                o.needed,
                o.needed.saturating_sub(o.capacity),
                o.capacity
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Compiles against the kernel's map capacities ([`Capacities::KERNEL`]).
pub fn compile(policy: &Policy) -> Result<Artifact, CompileError> {
    compile_with_capacities(policy, &Capacities::KERNEL)
}

pub fn compile_with_capacities(
    policy: &Policy,
    capacities: &Capacities,
) -> Result<Artifact, CompileError> {
    let mut segment_ids: HashMap<&str, u32> = HashMap::new();
    segment_ids.insert(WORLD, SEGMENT_WORLD);
    for (segment, id) in policy.segments().iter().zip(1u32..) {
        segment_ids.insert(&segment.name, id);
    }
    let addresses = AddressPlan::new(policy, &segment_ids)?;
    let (pairs, tables) = plan_pairs(policy, &segment_ids, &addresses)?;
    let ports = plan_ports(policy, &tables)?;

    let mut segments = vec![SegmentEntry {
        id: SEGMENT_WORLD,
        name: WORLD.to_string(),
        mode: policy.world_mode(),
    }];
    segments.extend(
        policy
            .segments()
            .iter()
            .zip(1u32..)
            .map(|(segment, id)| SegmentEntry {
                id,
                name: segment.name.clone(),
                mode: segment.mode,
            }),
    );
    let rules = policy
        .rules()
        .iter()
        .map(|rule| RuleEntry {
            index: rule.index,
            id: rule.id.clone(),
            segment: rule.segment.clone(),
            reason: rule.reason.clone(),
        })
        .collect();
    let artifact = Artifact {
        format_version: FORMAT_VERSION,
        revision: policy.revision().to_string(),
        segments,
        rules,
        settings: KernelSettings::from(policy.settings()),
        maps: Maps {
            addr_v4: addresses.v4,
            addr_v6: addresses.v6,
            pairs,
            ports,
        },
        quarantine: QuarantineIds {
            segment: segment_ids
                .get(QUARANTINE)
                .copied()
                .unwrap_or(SEGMENT_WORLD),
            class: addresses.quarantine_class,
        },
    };
    check_capacities(&artifact, capacities)?;
    tracing::debug!(counts = ?artifact.entry_counts(), "compiled policy");
    Ok(artifact)
}

fn check_capacities(artifact: &Artifact, capacities: &Capacities) -> Result<(), CompileError> {
    let counts = artifact.entry_counts();
    let overflows: Vec<Overflow> = [
        ("ADDR_V4", counts.addr_v4, capacities.addr_v4),
        ("ADDR_V6", counts.addr_v6, capacities.addr_v6),
        ("SEGMENTS", counts.segments, capacities.segments),
        ("PAIRS", counts.pairs, capacities.pairs),
        ("PORTS", counts.ports, capacities.ports),
        ("RULE_HITS", counts.rules, capacities.rules),
    ]
    .into_iter()
    .filter(|(_, needed, capacity)| *needed as u64 > *capacity)
    .map(|(map, needed, capacity)| Overflow {
        map,
        needed: needed as u64,
        capacity,
    })
    .collect();
    if overflows.is_empty() {
        Ok(())
    } else {
        Err(CompileError::OverCapacity(overflows))
    }
}

fn to_u32(value: usize, what: &'static str) -> Result<u32, CompileError> {
    u32::try_from(value).map_err(|_| CompileError::IdSpaceExhausted(what))
}

/// A source class: the source's segment id and the sorted ids of the rule CIDRs containing it.
type Class = (u32, Vec<u32>);

struct AddressPlan {
    v4: Vec<AddrV4Entry>,
    v6: Vec<AddrV6Entry>,
    /// Indexed by class id.
    classes: Vec<Class>,
    /// Sorted distinct rule CIDRs; a CIDR's id is its position.
    cidr_ids: HashMap<Prefix, u32>,
    /// The class of a quarantined address: (quarantine, no CIDRs). No prefix holds it; the
    /// kernel gives it to addresses in the QUARANTINE map.
    quarantine_class: u32,
}

impl AddressPlan {
    fn new(policy: &Policy, segment_ids: &HashMap<&str, u32>) -> Result<Self, CompileError> {
        let mut members: HashMap<Prefix, u32> = HashMap::new();
        for (prefix, segment) in policy.members() {
            members.insert(
                prefix,
                segment_ids.get(segment).copied().unwrap_or(SEGMENT_WORLD),
            );
        }
        // Sorted vectors rather than ordered sets: a large policy has hundreds of thousands.
        let mut cidrs: Vec<Prefix> = policy
            .rules()
            .iter()
            .filter_map(|rule| match &rule.kind {
                RuleKind::Allow { from, .. } => Some(from),
                _ => None,
            })
            .flatten()
            .filter_map(|source| match source {
                Source::Cidr(prefix) => Some(*prefix),
                _ => None,
            })
            .collect();
        cidrs.sort_unstable();
        cidrs.dedup();
        let cidr_ids: HashMap<Prefix, u32> = cidrs.iter().copied().zip(0u32..).collect();
        // Only the prefix lengths in use need probing when walking up from an entry.
        let lengths = |family: Family, set: &mut dyn Iterator<Item = &Prefix>| -> Vec<u8> {
            let lengths: BTreeSet<u8> = set
                .filter(|p| p.family() == family)
                .map(|p| p.prefix_len())
                .collect();
            lengths.into_iter().collect()
        };
        let member_lengths = [
            lengths(Family::V4, &mut members.keys()),
            lengths(Family::V6, &mut members.keys()),
        ];
        let cidr_lengths = [
            lengths(Family::V4, &mut cidrs.iter()),
            lengths(Family::V6, &mut cidrs.iter()),
        ];

        let mut entries: Vec<Prefix> = members
            .keys()
            .copied()
            .chain(cidrs.iter().copied())
            .collect();
        entries.sort_unstable();
        entries.dedup();
        // Each class is kept once, as the key of its id; the list by id is made at the end.
        let mut class_ids: HashMap<Class, u32> = HashMap::new();
        class_ids.insert((SEGMENT_WORLD, Vec::new()), CLASS_WORLD);
        let mut plan = AddressPlan {
            v4: Vec::new(),
            v6: Vec::new(),
            classes: Vec::new(),
            cidr_ids,
            quarantine_class: 0,
        };
        for entry in entries {
            let family_index = usize::from(entry.family() == Family::V6);
            let segment = member_lengths[family_index]
                .iter()
                .rev()
                .filter(|len| **len <= entry.prefix_len())
                .find_map(|len| members.get(&entry.truncate(*len)))
                .copied()
                .unwrap_or(SEGMENT_WORLD);
            let cidr_set: Vec<u32> = cidr_lengths[family_index]
                .iter()
                .filter(|len| **len <= entry.prefix_len())
                .filter_map(|len| plan.cidr_ids.get(&entry.truncate(*len)).copied())
                .collect();
            let class = intern(&mut class_ids, (segment, cidr_set), "source classes")?;
            let prefix_len = u32::from(entry.prefix_len());
            match entry.addr() {
                std::net::IpAddr::V4(addr) => plan.v4.push(AddrV4Entry {
                    addr,
                    prefix_len,
                    segment,
                    class,
                }),
                std::net::IpAddr::V6(addr) => plan.v6.push(AddrV6Entry {
                    addr,
                    prefix_len,
                    segment,
                    class,
                }),
            }
        }
        let quarantine_key = (
            segment_ids
                .get(QUARANTINE)
                .copied()
                .unwrap_or(SEGMENT_WORLD),
            Vec::new(),
        );
        plan.quarantine_class = intern(&mut class_ids, quarantine_key, "source classes")?;
        plan.classes = by_id(class_ids);
        plan.v4.sort();
        plan.v6.sort();
        Ok(plan)
    }
}

/// PAIRS entries and the interned port tables (ordered rule index lists), indexed by table id.
fn plan_pairs(
    policy: &Policy,
    segment_ids: &HashMap<&str, u32>,
    addresses: &AddressPlan,
) -> Result<(Vec<PairEntry>, Vec<Vec<u32>>), CompileError> {
    let segment_count = policy.segments().len() + 1;
    let mut classes_by_segment: Vec<Vec<u32>> = vec![Vec::new(); segment_count];
    let mut classes_by_cidr: Vec<Vec<u32>> = vec![Vec::new(); addresses.cidr_ids.len()];
    for (class_id, (segment, cidrs)) in (0u32..).zip(&addresses.classes) {
        if let Some(list) = classes_by_segment.get_mut(*segment as usize) {
            list.push(class_id);
        }
        for cidr in cidrs {
            if let Some(list) = classes_by_cidr.get_mut(*cidr as usize) {
                list.push(class_id);
            }
        }
    }

    // Destinations in segment id order: world first (only when judged), then by name.
    let mut destinations: Vec<(u32, &[u32], Option<u32>)> = Vec::new();
    if policy.world_mode() != Mode::Unenforced {
        destinations.push((SEGMENT_WORLD, policy.world_rules.as_slice(), None));
    }
    for (segment, id) in policy.segments().iter().zip(1u32..) {
        destinations.push((id, segment.rules.as_slice(), segment.intra_rule));
    }

    let mut pairs = Vec::new();
    let mut table_ids: HashMap<Vec<u32>, u32> = HashMap::new();
    for (destination, rule_indexes, intra_rule) in destinations {
        // Index the destination's rules by the kind of source they name, so only classes that
        // some rule can match are visited (except with `any`, which matches every class).
        let mut any_rules = Vec::new();
        let mut by_segment: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut by_cidr: HashMap<u32, Vec<u32>> = HashMap::new();
        for rule in rule_indexes.iter().filter_map(|&index| policy.rule(index)) {
            let RuleKind::Allow { from, .. } = &rule.kind else {
                continue;
            };
            for source in from {
                match source {
                    Source::Any => any_rules.push(rule.index),
                    Source::Segment(name) => {
                        if let Some(id) = segment_ids.get(name.as_str()) {
                            by_segment.entry(*id).or_default().push(rule.index);
                        }
                    }
                    Source::Cidr(prefix) => {
                        if let Some(id) = addresses.cidr_ids.get(prefix) {
                            by_cidr.entry(*id).or_default().push(rule.index);
                        }
                    }
                }
            }
        }
        // Only classes that a rule names specifically (by segment, CIDR or intra) get a pair
        // entry of their own; every other class falls back to the destination's wildcard
        // entry, which holds the `any` rules. Without the fallback, one `any` rule would need
        // an entry for every (destination, class).
        let mut candidate_classes = Vec::new();
        {
            let mut add = |list: Option<&Vec<u32>>| {
                candidate_classes.extend(list.into_iter().flatten());
            };
            for segment in by_segment.keys() {
                add(classes_by_segment.get(*segment as usize));
            }
            if intra_rule.is_some() {
                add(classes_by_segment.get(destination as usize));
            }
            for cidr in by_cidr.keys() {
                add(classes_by_cidr.get(*cidr as usize));
            }
        }
        // Ascending, so that port tables are numbered in the same order on every run.
        candidate_classes.sort_unstable();
        candidate_classes.dedup();
        any_rules.sort_unstable();
        any_rules.dedup();
        let mut entries: Vec<(u32, Vec<u32>)> = Vec::new();
        if !any_rules.is_empty() {
            entries.push((CLASS_WILDCARD, any_rules.clone()));
        }
        for class_id in candidate_classes {
            let Some((class_segment, class_cidrs)) = addresses.classes.get(class_id as usize)
            else {
                continue;
            };
            let mut matching: Vec<u32> = Vec::new();
            if let Some(rules) = by_segment.get(class_segment) {
                matching.extend(rules);
            }
            for cidr in class_cidrs {
                if let Some(rules) = by_cidr.get(cidr) {
                    matching.extend(rules);
                }
            }
            matching.sort_unstable();
            matching.dedup();
            let intra = intra_rule
                .filter(|_| *class_segment == destination && destination != SEGMENT_WORLD);
            if matching.is_empty() && intra.is_none() {
                continue;
            }
            // `any` rules before the last specific rule go into this table too, so that its
            // first match is the first match overall; later ones are found in the wildcard
            // table when this one misses.
            if let Some(&last) = matching.last() {
                matching.extend(any_rules.iter().filter(|&&rule| rule < last));
                matching.sort_unstable();
                matching.dedup();
            }
            let mut table = Vec::with_capacity(matching.len() + 1);
            table.extend(intra);
            table.extend(matching);
            entries.push((class_id, table));
        }
        for (class_id, table) in entries {
            let port_table = intern(&mut table_ids, table, "port tables")?;
            pairs.push(PairEntry {
                dst_segment: destination,
                src_class: class_id,
                port_table,
            });
        }
    }
    pairs.sort();
    Ok((pairs, by_id(table_ids)))
}

/// The id of `key` in `ids`, which numbers keys in the order they were first seen.
fn intern<K: Eq + std::hash::Hash>(
    ids: &mut HashMap<K, u32>,
    key: K,
    what: &'static str,
) -> Result<u32, CompileError> {
    let next = to_u32(ids.len(), what)?;
    Ok(*ids.entry(key).or_insert(next))
}

/// The keys of `ids` listed by id (ids are `0..len`, as [`intern`] gives them).
fn by_id<K>(ids: HashMap<K, u32>) -> Vec<K> {
    let mut keys: Vec<(u32, K)> = ids.into_iter().map(|(key, id)| (id, key)).collect();
    keys.sort_unstable_by_key(|(id, _)| *id);
    keys.into_iter().map(|(_, key)| key).collect()
}

/// The port matches of a rule; the intra pseudo-rule allows everything.
fn rule_ports(policy: &Policy, index: u32) -> &[PortMatch] {
    match policy.rule(index).map(|rule| &rule.kind) {
        Some(RuleKind::Allow { ports, .. }) => ports,
        Some(RuleKind::Intra) => &[PortMatch::Any],
        None => &[],
    }
}

fn plan_ports(policy: &Policy, tables: &[Vec<u32>]) -> Result<Vec<PortEntry>, CompileError> {
    const KEYS: [(u8, u32); 4] = [
        (proto_key::TCP, 65_535),
        (proto_key::UDP, 65_535),
        (proto_key::ICMP, 255),
        (proto_key::ICMPV6, 255),
    ];
    let mut entries = Vec::new();
    // Per protocol key, (first, last, position in the table): the lowest position wins where
    // they overlap. Reused across tables; each rule is read once per table.
    let mut intervals: [Vec<(u32, u32, usize)>; KEYS.len()] = Default::default();
    // Every rule's ports copied once, in order, into one array: read table by table from the
    // rules themselves, each read would be a cache miss or two in a large policy.
    let mut all_ports: Vec<PortMatch> = Vec::new();
    let mut ports_end: Vec<usize> = Vec::with_capacity(policy.rules().len());
    for index in 0..policy.rules().len() {
        all_ports.extend_from_slice(rule_ports(policy, index as u32));
        ports_end.push(all_ports.len());
    }
    let ports_of = |rule: u32| -> &[PortMatch] {
        let rule = rule as usize;
        let start = rule.checked_sub(1).map_or(0, |before| ports_end[before]);
        ports_end
            .get(rule)
            .map_or(&[], |&end| &all_ports[start..end])
    };
    for (table, rules) in (0u32..).zip(tables) {
        intervals.iter_mut().for_each(Vec::clear);
        let mut any_rule = None;
        for (position, &rule) in rules.iter().enumerate() {
            for port in ports_of(rule) {
                match *port {
                    PortMatch::Any => {
                        any_rule.get_or_insert(rule);
                        for (list, (_, max_port)) in intervals.iter_mut().zip(KEYS) {
                            list.push((0, max_port, position));
                        }
                    }
                    PortMatch::Range { proto, first, last } => {
                        let Some(key) = KEYS.iter().position(|(key, _)| *key == proto) else {
                            continue;
                        };
                        let max_port = KEYS[key].1;
                        if u32::from(first) <= max_port {
                            intervals[key].push((
                                u32::from(first),
                                u32::from(last).min(max_port),
                                position,
                            ));
                        }
                    }
                }
            }
        }
        for (list, (proto, _)) in intervals.iter().zip(KEYS) {
            for (first, last, position) in first_match_intervals(list) {
                let Some(&rule) = rules.get(position) else {
                    continue;
                };
                for (start, size_log2) in aligned_blocks(first, last) {
                    entries.push(PortEntry {
                        table,
                        proto,
                        port: u16::try_from(start).unwrap_or(u16::MAX),
                        prefix_len: PORT_KEY_FIXED_BITS + 16 - size_log2,
                        rule,
                    });
                }
            }
        }
        if let Some(rule) = any_rule {
            entries.push(PortEntry {
                table,
                proto: proto_key::NO_PORT,
                port: 0,
                prefix_len: PORT_KEY_FIXED_BITS + 16,
                rule,
            });
        }
    }
    entries.sort();
    Ok(entries)
}

/// Cuts the covered space into maximal intervals with the same winner (lowest position).
/// Returns (first, last, position) sorted by `first`; uncovered ports are left out.
fn first_match_intervals(intervals: &[(u32, u32, usize)]) -> Vec<(u32, u32, usize)> {
    // Most port tables of a large policy hold one rule with one port.
    if let [only] = intervals {
        return vec![*only];
    }
    // Events at `first` (start) and `last + 1` (end); `true` sorts ends after starts at a
    // position, which does not matter since all events at one position apply together.
    let mut events: Vec<(u32, bool, usize)> = Vec::with_capacity(intervals.len() * 2);
    for &(first, last, position) in intervals {
        events.push((first, true, position));
        events.push((last + 1, false, position));
    }
    events.sort_unstable();
    let mut active: BTreeMap<usize, usize> = BTreeMap::new();
    let mut result = Vec::new();
    let mut open: Option<(u32, usize)> = None;
    let mut next = 0;
    while let Some(&(at, _, _)) = events.get(next) {
        while let Some(&(event_at, is_start, position)) = events.get(next) {
            if event_at != at {
                break;
            }
            if is_start {
                *active.entry(position).or_default() += 1;
            } else if let Some(count) = active.get_mut(&position) {
                *count -= 1;
                if *count == 0 {
                    active.remove(&position);
                }
            }
            next += 1;
        }
        let winner = active.keys().next().copied();
        if open.map(|(_, position)| position) != winner {
            if let Some((start, position)) = open {
                result.push((start, at - 1, position));
            }
            open = winner.map(|position| (at, position));
        }
    }
    result
}

/// Splits `first..=last` into aligned power-of-two blocks: (start, log2 of size), size <= 2^16.
fn aligned_blocks(first: u32, last: u32) -> Vec<(u32, u32)> {
    let mut blocks = Vec::new();
    let mut start = first;
    while start <= last {
        let mut size_log2 = start.trailing_zeros().min(16);
        while start + (1 << size_log2) - 1 > last {
            size_log2 -= 1;
        }
        blocks.push((start, size_log2));
        start += 1 << size_log2;
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_and_cover_exactly() {
        assert_eq!(aligned_blocks(0, 65_535), vec![(0, 16)]);
        assert_eq!(aligned_blocks(0, 255), vec![(0, 8)]);
        assert_eq!(aligned_blocks(104, 104), vec![(104, 0)]);
        assert_eq!(
            aligned_blocks(8080, 8090),
            vec![(8080, 3), (8088, 1), (8090, 0)]
        );
        for (first, last) in [(1, 65_535), (3, 1000), (65_535, 65_535), (7, 8)] {
            let mut next = first;
            for (start, size_log2) in aligned_blocks(first, last) {
                assert_eq!(start, next);
                assert_eq!(start % (1 << size_log2), 0);
                next = start + (1 << size_log2);
            }
            assert_eq!(next, last + 1);
        }
    }

    #[test]
    fn first_match_keeps_policy_order() {
        // Rule at position 1 covers 0..=100; position 0 covers 50..=60 and wins there.
        let cut = first_match_intervals(&[(50, 60, 0), (0, 100, 1), (200, 300, 2), (250, 260, 1)]);
        assert_eq!(
            cut,
            vec![
                (0, 49, 1),
                (50, 60, 0),
                (61, 100, 1),
                (200, 249, 2),
                (250, 260, 1),
                (261, 300, 2)
            ]
        );
        assert_eq!(
            first_match_intervals(&[(0, 65_535, 0), (80, 80, 0)]),
            vec![(0, 65_535, 0)]
        );
    }
}
