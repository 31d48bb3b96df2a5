//! The compiled policy: what the daemon loads into the kernel maps, as deterministic JSON.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use enforcer_common::{
    AddrInfo, CLASS_WILDCARD, Config, HOST_PREFIX_V4, HOST_PREFIX_V6, NO_WILDCARD_RULES_AT_ALL,
    PORT_EXACT_PREFIX, PORT_KEY_FIXED_BITS, PairKey, PairValue, PortKey, PortValue, SegmentInfo,
    lookup_flags, wildcard_bit,
};
use serde::{Deserialize, Serialize};

use crate::model::Mode;
use crate::settings::{OnPolicyChange, Settings, Timeouts};

/// Bumped whenever the artifact's meaning or layout changes (2: the quarantine ids).
pub const FORMAT_VERSION: u32 = 2;

/// Subnets at most this many bits shorter than a host can also go into the host table, one
/// entry per address ([`Artifact::subnet_addresses_v4`]): an address in them is then found by
/// one exact-match lookup instead of a walk of the prefix trie. A /24 is 256 entries.
pub const SUBNET_EXPANSION_BITS: u32 = 8;

/// Addresses of such subnets per family past which none are expanded.
pub const SUBNET_EXPANSION_LIMIT: usize = 1 << 18;

/// Blocks per family past which the shortest subnets are left out of the block table
/// ([`Artifact::prefix_blocks_v4`]) and found in the trie: [`BLOCKS_PER_SUBNET`] for each
/// subnet, at least [`PREFIX_BLOCK_FLOOR`] and at most [`PREFIX_BLOCK_LIMIT`]. A block costs an
/// IPv4 table 24 bytes, an IPv6 one 48 (half full), per slot: the table grows with the policy,
/// not with how short its subnets are.
pub const BLOCKS_PER_SUBNET: usize = 4;
/// See [`BLOCKS_PER_SUBNET`]: 16,384 blocks, a /8 in /22s.
pub const PREFIX_BLOCK_FLOOR: usize = 1 << 14;
/// See [`BLOCKS_PER_SUBNET`]: a million blocks, 24 MiB of IPv4 table per slot.
pub const PREFIX_BLOCK_LIMIT: usize = 1 << 20;

/// A family's subnets block by block, for the kernel's block table (see
/// `enforcer_common::map_names::BLOCKS_V4`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixBlocks<K> {
    /// The prefix length of every block: the longest subnet's.
    pub len: u32,
    /// Each block's first address with what a longest-prefix lookup over every entry gives its
    /// addresses, less those whose answer is a host entry's only; in address order.
    pub blocks: Vec<(K, AddrInfo)>,
    /// Whether every subnet is in the blocks: if not, a block-table miss must walk the trie.
    pub complete: bool,
}

impl<K> PrefixBlocks<K> {
    /// (block length, blocks, complete).
    pub fn summary(&self) -> (u32, usize, bool) {
        (self.len, self.blocks.len(), self.complete)
    }

    fn with_keys<L>(
        self,
        keys: impl FnOnce(Vec<(K, AddrInfo)>) -> Vec<(L, AddrInfo)>,
    ) -> PrefixBlocks<L> {
        PrefixBlocks {
            len: self.len,
            blocks: keys(self.blocks),
            complete: self.complete,
        }
    }
}

/// Addresses (as integers of the IPv4 expansions, so below 2^32) as IPv4 keys.
fn v4_keys(addresses: Vec<(u128, AddrInfo)>) -> Vec<([u8; 4], AddrInfo)> {
    addresses
        .into_iter()
        .map(|(addr, info)| ((addr as u32).to_be_bytes(), info))
        .collect()
}

/// Addresses as IPv6 keys.
fn v6_keys(addresses: Vec<(u128, AddrInfo)>) -> Vec<([u8; 16], AddrInfo)> {
    addresses
        .into_iter()
        .map(|(addr, info)| (addr.to_be_bytes(), info))
        .collect()
}

#[derive(thiserror::Error, Debug)]
pub enum ArtifactError {
    #[error("artifact is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("artifact format version {found} is not supported (expected {FORMAT_VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error("artifact is inconsistent: {0}")]
    Inconsistent(String),
}

/// Everything the kernel needs, sorted so the same policy always gives the same bytes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    pub format_version: u32,
    /// The policy's revision (see [`crate::Policy::revision`]).
    pub revision: String,
    /// Indexed by segment id; `world` is id 0.
    pub segments: Vec<SegmentEntry>,
    /// Indexed by global rule index.
    pub rules: Vec<RuleEntry>,
    pub settings: KernelSettings,
    pub maps: Maps,
    /// What a quarantined address is judged as.
    pub quarantine: QuarantineIds,
}

/// The ids of the built-in `quarantine` segment in this compiled policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuarantineIds {
    pub segment: u32,
    /// The source class (quarantine, no rule CIDRs).
    pub class: u32,
}

/// The settings of `defaults.yaml` that the kernel programs and the daemon apply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KernelSettings {
    pub on_policy_change: OnPolicyChange,
    pub egress: Mode,
    pub conntrack_max_entries: u32,
    pub fragments_max_entries: u32,
    /// Idle timeouts in seconds.
    pub timeouts: Timeouts,
}

impl From<&Settings> for KernelSettings {
    fn from(settings: &Settings) -> Self {
        KernelSettings {
            on_policy_change: settings.on_policy_change,
            egress: settings.egress,
            conntrack_max_entries: settings.conntrack_max_entries,
            fragments_max_entries: settings.fragments_max_entries,
            timeouts: settings.timeouts,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SegmentEntry {
    pub id: u32,
    pub name: String,
    pub mode: Mode,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RuleEntry {
    pub index: u32,
    pub id: String,
    /// The destination segment whose allow-list holds the rule.
    pub segment: String,
    pub reason: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Maps {
    pub addr_v4: Vec<AddrV4Entry>,
    pub addr_v6: Vec<AddrV6Entry>,
    pub pairs: Vec<PairEntry>,
    pub ports: Vec<PortEntry>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AddrV4Entry {
    pub addr: Ipv4Addr,
    pub prefix_len: u32,
    pub segment: u32,
    pub class: u32,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AddrV6Entry {
    pub addr: Ipv6Addr,
    pub prefix_len: u32,
    pub segment: u32,
    pub class: u32,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PairEntry {
    pub dst_segment: u32,
    pub src_class: u32,
    pub port_table: u32,
}

/// One PORTS trie entry: `prefix_len` is `PORT_KEY_FIXED_BITS` plus the fixed leading port bits.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortEntry {
    pub table: u32,
    pub proto: u8,
    pub port: u16,
    pub prefix_len: u32,
    pub rule: u32,
}

/// Number of entries per map, for sizing the kernel maps.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryCounts {
    pub addr_v4: usize,
    pub addr_v6: usize,
    pub segments: usize,
    pub pairs: usize,
    pub ports: usize,
    pub rules: usize,
}

impl Artifact {
    /// Parses and sanity-checks an artifact written by [`Artifact::to_json`].
    pub fn from_json(bytes: &[u8]) -> Result<Artifact, ArtifactError> {
        let artifact: Artifact = serde_json::from_slice(bytes)?;
        artifact.check()?;
        Ok(artifact)
    }

    /// Compact JSON followed by a newline; identical input gives identical bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Only plain structs with string keys: serializing into memory cannot fail.
        let mut bytes = serde_json::to_vec(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    fn check(&self) -> Result<(), ArtifactError> {
        let inconsistent = |what: String| Err(ArtifactError::Inconsistent(what));
        if self.format_version != FORMAT_VERSION {
            return Err(ArtifactError::UnsupportedVersion {
                found: self.format_version,
            });
        }
        if self.segments.is_empty() {
            return inconsistent("no segments (world is missing)".into());
        }
        if let Some(segment) = (0u32..).zip(&self.segments).find(|(id, s)| s.id != *id) {
            return inconsistent(format!("segment '{}' is not at its id", segment.1.name));
        }
        if let Some(rule) = (0u32..)
            .zip(&self.rules)
            .find(|(index, r)| r.index != *index)
        {
            return inconsistent(format!("rule '{}' is not at its index", rule.1.id));
        }
        let segment_count = self.segments.len() as u64;
        let rule_count = self.rules.len() as u64;
        let addr_ok = |prefix_len: u32, max: u32, segment: u32| {
            prefix_len <= max && u64::from(segment) < segment_count
        };
        if !self
            .maps
            .addr_v4
            .iter()
            .all(|e| addr_ok(e.prefix_len, 32, e.segment))
            || !self
                .maps
                .addr_v6
                .iter()
                .all(|e| addr_ok(e.prefix_len, 128, e.segment))
        {
            return inconsistent("address entry with a bad prefix length or segment".into());
        }
        let quarantine = self.segments.get(self.quarantine.segment as usize);
        if quarantine.is_none_or(|segment| segment.name != crate::overrides::QUARANTINE) {
            return inconsistent("the quarantine segment id does not name `quarantine`".into());
        }
        if !self
            .maps
            .pairs
            .iter()
            .all(|e| u64::from(e.dst_segment) < segment_count)
        {
            return inconsistent("pair entry with an unknown segment".into());
        }
        let port_ok = |e: &PortEntry| {
            (PORT_KEY_FIXED_BITS..=PORT_KEY_FIXED_BITS + 16).contains(&e.prefix_len)
                && u64::from(e.rule) < rule_count
        };
        if !self.maps.ports.iter().all(port_ok) {
            return inconsistent("port entry with a bad prefix length or rule".into());
        }
        Ok(())
    }

    /// ADDR_V4 entries: (LPM prefix length, address in network byte order, value).
    pub fn addr_v4_entries(&self) -> impl Iterator<Item = (u32, [u8; 4], AddrInfo)> + '_ {
        self.maps.addr_v4.iter().map(|e| {
            let info = AddrInfo {
                segment: e.segment,
                class: e.class,
            };
            (e.prefix_len, e.addr.octets(), info)
        })
    }

    /// ADDR_V6 entries: (LPM prefix length, address in network byte order, value).
    pub fn addr_v6_entries(&self) -> impl Iterator<Item = (u32, [u8; 16], AddrInfo)> + '_ {
        self.maps.addr_v6.iter().map(|e| {
            let info = AddrInfo {
                segment: e.segment,
                class: e.class,
            };
            (e.prefix_len, e.addr.octets(), info)
        })
    }

    /// Every address of the IPv4 subnets at most [`SUBNET_EXPANSION_BITS`] shorter than a host,
    /// each with what the longest entry holding it says about it (the answer of a
    /// longest-prefix lookup, as no shorter subnet can say otherwise), except the hosts that are
    /// entries of their own; in address order. `None` when there are more than
    /// [`SUBNET_EXPANSION_LIMIT`]: the block table or the trie finds them then.
    pub fn subnet_addresses_v4(&self) -> Option<Vec<([u8; 4], AddrInfo)>> {
        subnet_addresses(self.addr_v4_numbers(), HOST_PREFIX_V4).map(v4_keys)
    }

    /// [`Artifact::subnet_addresses_v4`] for IPv6.
    pub fn subnet_addresses_v6(&self) -> Option<Vec<([u8; 16], AddrInfo)>> {
        subnet_addresses(self.addr_v6_numbers(), HOST_PREFIX_V6).map(v6_keys)
    }

    /// The IPv4 subnets block by block ([`PrefixBlocks`]), less those at most
    /// [`SUBNET_EXPANSION_BITS`] shorter than a host when `long_subnets_in_hosts` (the host
    /// table has their addresses): the longest subnets first, as many as the budget of
    /// blocks allows ([`BLOCKS_PER_SUBNET`]). `None` when there are no such subnets, or not one
    /// fits.
    pub fn prefix_blocks_v4(&self, long_subnets_in_hosts: bool) -> Option<PrefixBlocks<[u8; 4]>> {
        prefix_blocks(
            self.addr_v4_numbers(),
            HOST_PREFIX_V4,
            long_subnets_in_hosts,
        )
        .map(|blocks| blocks.with_keys(v4_keys))
    }

    /// [`Artifact::prefix_blocks_v4`] for IPv6.
    pub fn prefix_blocks_v6(&self, long_subnets_in_hosts: bool) -> Option<PrefixBlocks<[u8; 16]>> {
        prefix_blocks(
            self.addr_v6_numbers(),
            HOST_PREFIX_V6,
            long_subnets_in_hosts,
        )
        .map(|blocks| blocks.with_keys(v6_keys))
    }

    /// [`Artifact::addr_v4_entries`] with each address as an integer, for the expansions.
    fn addr_v4_numbers(&self) -> impl Iterator<Item = (u32, u128, AddrInfo)> + '_ {
        self.addr_v4_entries()
            .map(|(len, addr, info)| (len, u128::from(u32::from_be_bytes(addr)), info))
    }

    /// [`Artifact::addr_v6_entries`] with each address as an integer.
    fn addr_v6_numbers(&self) -> impl Iterator<Item = (u32, u128, AddrInfo)> + '_ {
        self.addr_v6_entries()
            .map(|(len, addr, info)| (len, u128::from_be_bytes(addr), info))
    }

    pub fn pair_entries(&self) -> impl Iterator<Item = (PairKey, PairValue)> + '_ {
        let with_ranges: std::collections::HashSet<u32> = self
            .maps
            .ports
            .iter()
            .filter(|e| e.prefix_len < PORT_EXACT_PREFIX)
            .map(|e| e.table)
            .collect();
        self.maps.pairs.iter().map(move |e| {
            let key = PairKey {
                dst_segment: e.dst_segment,
                src_class: e.src_class,
            };
            (
                key,
                PairValue {
                    port_table: e.port_table,
                    has_ranges: u32::from(with_ranges.contains(&e.port_table)),
                },
            )
        })
    }

    /// PORTS entries: (LPM prefix length, key, value).
    pub fn port_entries(&self) -> impl Iterator<Item = (u32, PortKey, PortValue)> + '_ {
        self.maps.ports.iter().map(|e| {
            let key = PortKey::new(e.table, e.proto, e.port);
            (e.prefix_len, key, PortValue { rule: e.rule })
        })
    }

    /// SEGMENTS array contents, indexed by segment id.
    pub fn segment_infos(&self) -> Vec<SegmentInfo> {
        // Destination segment -> the protocols its wildcard port table has entries for.
        let wildcard_tables: BTreeMap<u32, u32> = self
            .maps
            .pairs
            .iter()
            .filter(|e| e.src_class == CLASS_WILDCARD)
            .map(|e| (e.port_table, e.dst_segment))
            .collect();
        let mut wildcard_protos: BTreeMap<u32, u8> = BTreeMap::new();
        for entry in &self.maps.ports {
            if let Some(segment) = wildcard_tables.get(&entry.table) {
                *wildcard_protos.entry(*segment).or_default() |= wildcard_bit(entry.proto);
            }
        }
        self.segments
            .iter()
            .enumerate()
            .map(|(id, segment)| {
                let protos = u32::try_from(id)
                    .ok()
                    .and_then(|id| wildcard_protos.get(&id))
                    .copied()
                    .unwrap_or(0);
                SegmentInfo {
                    mode: segment.mode.kernel_value(),
                    no_wildcard_rules: NO_WILDCARD_RULES_AT_ALL & !protos,
                    _pad: [0; 2],
                }
            })
            .collect()
    }

    /// Rule ids, indexed by global rule index.
    pub fn rule_ids(&self) -> Vec<String> {
        self.rules.iter().map(|rule| rule.id.clone()).collect()
    }

    /// The kernel's `CONFIG` entry for this policy, loaded as policy generation `generation`.
    pub fn kernel_config(&self, generation: u32) -> Config {
        let settings = &self.settings;
        let policy_change = match settings.on_policy_change {
            OnPolicyChange::Recheck => enforcer_common::policy_change::RECHECK,
            OnPolicyChange::Keep => enforcer_common::policy_change::KEEP,
        };
        let egress_mode = match settings.egress {
            Mode::Unenforced => enforcer_common::segment_mode::UNENFORCED,
            Mode::Enforce => enforcer_common::segment_mode::ENFORCE,
            Mode::Monitor => enforcer_common::segment_mode::MONITOR,
        };
        let mut flags = 0;
        if self
            .maps
            .addr_v4
            .iter()
            .any(|e| e.prefix_len < HOST_PREFIX_V4)
        {
            flags |= lookup_flags::V4_PREFIXES;
        }
        if self
            .maps
            .addr_v6
            .iter()
            .any(|e| e.prefix_len < HOST_PREFIX_V6)
        {
            flags |= lookup_flags::V6_PREFIXES;
        }
        Config {
            generation,
            on_policy_change: policy_change,
            egress_mode,
            lookup_flags: flags,
            _pad: 0,
            timeouts_ns: settings.timeouts.as_kernel_ns(),
            // Event reporting is the daemon's choice, not the policy's.
            event_interval_ns: 0,
            event_flags: 0,
            quarantine_segment: self.quarantine.segment,
            quarantine_class: self.quarantine.class,
            // The daemon's choice: it knows the room its block tables have.
            block_len_v4: 0,
            block_len_v6: 0,
            _pad2: [0; 2],
        }
    }

    pub fn entry_counts(&self) -> EntryCounts {
        EntryCounts {
            addr_v4: self.maps.addr_v4.len(),
            addr_v6: self.maps.addr_v6.len(),
            segments: self.segments.len(),
            pairs: self.maps.pairs.len(),
            ports: self.maps.ports.len(),
            rules: self.rules.len(),
        }
    }
}

/// The addresses of the subnets among `entries` (prefix length, address as an integer of
/// `full` bits with no host bits set, value) with the value of the longest entry holding each;
/// see [`Artifact::subnet_addresses_v4`].
fn subnet_addresses(
    entries: impl Iterator<Item = (u32, u128, AddrInfo)>,
    full: u32,
) -> Option<Vec<(u128, AddrInfo)>> {
    let mut taken = std::collections::HashSet::new();
    let mut subnets = Vec::new();
    for (len, addr, info) in entries {
        if len >= full {
            taken.insert(addr);
        } else if full - len <= SUBNET_EXPANSION_BITS {
            subnets.push((len, addr, info));
        }
    }
    let count: usize = subnets
        .iter()
        .map(|(len, _, _)| 1usize << (full - len))
        .sum();
    if count > SUBNET_EXPANSION_LIMIT {
        return None;
    }
    // Longest first: an address takes the value of the longest subnet holding it.
    subnets.sort_unstable_by_key(|&(len, addr, _)| (std::cmp::Reverse(len), addr));
    let mut addresses = Vec::with_capacity(count);
    for (len, network, info) in subnets {
        for offset in 0..1u128 << (full - len) {
            let addr = network | offset;
            if taken.insert(addr) {
                addresses.push((addr, info));
            }
        }
    }
    addresses.sort_unstable_by_key(|&(addr, _)| addr);
    Some(addresses)
}

/// The subnets among `entries` (prefix length, address as an integer of `full` bits with no
/// host bits set, value) as blocks of the longest subnet's length, less the long ones when
/// `long_subnets_in_hosts`; see [`Artifact::prefix_blocks_v4`]. Every subnet left out is no
/// longer than every one taken, so the longest prefix over a block is always among those
/// taken. (The long subnets are longer than all others: where one holds an address, the host
/// table answers first.)
fn prefix_blocks(
    entries: impl Iterator<Item = (u32, u128, AddrInfo)>,
    full: u32,
    long_subnets_in_hosts: bool,
) -> Option<PrefixBlocks<u128>> {
    let mut subnets: Vec<(u32, u128, AddrInfo)> = entries
        .filter(|&(len, _, _)| {
            len < full && !(long_subnets_in_hosts && full - len <= SUBNET_EXPANSION_BITS)
        })
        .collect();
    // Longest first: a block takes the value of the longest subnet holding it.
    subnets.sort_unstable_by_key(|&(len, addr, _)| (std::cmp::Reverse(len), addr));
    let len = subnets.first()?.0;
    let budget = subnets
        .len()
        .saturating_mul(BLOCKS_PER_SUBNET)
        .clamp(PREFIX_BLOCK_FLOOR, PREFIX_BLOCK_LIMIT);
    let mut count = 0usize;
    let taken = subnets
        .iter()
        .take_while(|&&(subnet_len, _, _)| {
            let blocks = 1usize.checked_shl(len - subnet_len).unwrap_or(usize::MAX);
            count = count.saturating_add(blocks);
            count <= budget
        })
        .count();
    if taken == 0 {
        return None;
    }
    let block_bits = full - len;
    let mut seen = std::collections::HashSet::new();
    let mut blocks = Vec::new();
    for &(subnet_len, network, info) in &subnets[..taken] {
        for offset in 0..1u128 << (len - subnet_len) {
            let addr = network | offset << block_bits;
            if seen.insert(addr) {
                blocks.push((addr, info));
            }
        }
    }
    blocks.sort_unstable_by_key(|&(addr, _)| addr);
    Some(PrefixBlocks {
        len,
        blocks,
        complete: taken == subnets.len(),
    })
}

#[cfg(test)]
mod tests {
    use enforcer_common::AddrInfo;

    use super::{
        PREFIX_BLOCK_FLOOR, SUBNET_EXPANSION_BITS, SUBNET_EXPANSION_LIMIT, prefix_blocks,
        subnet_addresses,
    };

    /// What a longest-prefix lookup of IPv4 `addr` over `entries` gives, the slow way.
    fn longest(entries: &[(u32, u128, AddrInfo)], addr: u128) -> Option<AddrInfo> {
        entries
            .iter()
            .filter(|(len, network, _)| addr >> (32 - len) == network >> (32 - len))
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, _, info)| *info)
    }

    fn info(segment: u32) -> AddrInfo {
        AddrInfo {
            segment,
            class: segment,
        }
    }

    /// Each address gets what a longest-prefix lookup over every entry gives it.
    #[test]
    fn subnet_addresses_answer_as_the_longest_prefix_does() {
        let entries = [
            (24, 0x0a00_0100, info(1)),
            (28, 0x0a00_0110, info(2)),
            (30, 0x0a00_0114, info(3)),
            (32, 0x0a00_0115, info(4)),
            (32, 0x0a00_0900, info(5)),
        ];
        let addresses = subnet_addresses(entries.into_iter(), 32).unwrap();
        // 256 addresses of the /24, less the host that is an entry of its own.
        assert_eq!(addresses.len(), 255);
        for (addr, got) in &addresses {
            assert_eq!(Some(*got), longest(&entries, *addr), "{addr:#x}");
        }
        assert!(addresses.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(!addresses.iter().any(|(addr, _)| *addr == 0x0a00_0115));
    }

    #[test]
    fn subnets_too_short_or_too_many_are_left_to_the_trie() {
        let short = 32 - SUBNET_EXPANSION_BITS - 1;
        let long = 32 - SUBNET_EXPANSION_BITS;
        let both = [(short, 0x0a00_0000, info(1)), (long, 0x0a00_0100, info(2))];
        let addresses = subnet_addresses(both.into_iter(), 32).unwrap();
        assert_eq!(addresses.len(), 256, "only the long subnet's");
        assert!(addresses.iter().all(|(_, got)| *got == info(2)));
        let many = (0..=SUBNET_EXPANSION_LIMIT >> SUBNET_EXPANSION_BITS)
            .map(|i| (32 - SUBNET_EXPANSION_BITS, (i as u128) << 8, info(1)));
        assert!(subnet_addresses(many, 32).is_none());
        assert_eq!(subnet_addresses(std::iter::empty(), 128), Some(Vec::new()));
    }

    /// Every address of a block gets what a longest-prefix lookup over every subnet gives it;
    /// hosts are not blocks.
    #[test]
    fn prefix_blocks_answer_as_the_longest_prefix_does() {
        let entries = [
            (12, 0x0a00_0000, info(1)),
            (16, 0x0a01_0000, info(2)),
            (22, 0x0a01_0400, info(3)),
            (24, 0x0a01_0500, info(4)),
            (32, 0x0a01_0501, info(5)),
        ];
        let blocks = prefix_blocks(entries.into_iter(), 32, false).unwrap();
        assert_eq!(blocks.len, 24);
        assert!(blocks.complete);
        // The /12 is 4,096 blocks of /24, the others lie inside it.
        assert_eq!(blocks.blocks.len(), 1 << 12);
        // Hosts are not blocks: the host table answers for them first.
        let subnets: Vec<_> = entries.iter().copied().filter(|e| e.0 < 32).collect();
        for (block, got) in &blocks.blocks {
            assert_eq!(block & 0xff, 0, "{block:#x}");
            for addr in [*block, block | 0x7f, block | 0xff] {
                assert_eq!(Some(*got), longest(&subnets, addr), "{addr:#x}");
            }
        }
        assert!(blocks.blocks.windows(2).all(|w| w[0].0 < w[1].0));
    }

    /// Past the limit the shortest subnets are left out, and the blocks say so; every one left
    /// out is shorter than every one taken.
    #[test]
    fn prefix_blocks_leave_the_shortest_subnets_to_the_trie() {
        let entries = [
            (31, 0x0a00_0002, info(1)),
            (24, 0x0b00_0000, info(2)),
            (8, 0x0c00_0000, info(3)),
        ];
        let blocks = prefix_blocks(entries.into_iter(), 32, false).unwrap();
        assert_eq!(blocks.len, 31);
        assert!(!blocks.complete);
        // The /31 and the /24's 128 blocks; the /8's 2^23 are past the limit.
        assert_eq!(blocks.blocks.len(), 129);
        const { assert!((1usize << 23) > PREFIX_BLOCK_FLOOR) };
        // A /16 in /31s is 32,768 blocks: past the budget beside two /31s, not beside 16,384.
        let many: Vec<_> = (0..16_384u128)
            .map(|i| (31, 0x0a00_0000 + 2 * i, info(1)))
            .collect();
        let with_16 = |subnets: &[(u32, u128, AddrInfo)]| {
            let entries = subnets.iter().copied().chain([(16, 0x0b00_0000, info(2))]);
            prefix_blocks(entries, 32, false).unwrap().complete
        };
        assert!(!with_16(&many[..2]));
        assert!(with_16(&many));
        assert!(prefix_blocks([(32, 1, info(1))].into_iter(), 32, false).is_none());
        // With the long subnets in the host table, the blocks are the /8's, of /8.
        let short_only = prefix_blocks(entries.into_iter(), 32, true).unwrap();
        assert_eq!(
            (short_only.len, short_only.blocks.len(), short_only.complete),
            (8, 1, true)
        );
        // IPv6: a /16 under /127 blocks would be 2^111 of them.
        let v6 = prefix_blocks(
            [(127, 2, info(1)), (16, 0xfd00 << 112, info(2))].into_iter(),
            128,
            false,
        )
        .unwrap();
        assert_eq!((v6.len, v6.blocks.len(), v6.complete), (127, 1, false));
        assert!(
            prefix_blocks([(16, 0, info(1)), (8, 0, info(2))].into_iter(), 128, true).is_some()
        );
    }

    /// The kernel keys a block by the address's words masked with these: the same bytes as the
    /// block's first address.
    #[test]
    fn block_masks_keep_the_first_bits() {
        for len in 1..=32u8 {
            let addr: u32 = 0xdead_beef;
            let want = (addr & (u32::MAX << (32 - u32::from(len)))).to_be_bytes();
            let word = u32::from_le_bytes(addr.to_be_bytes());
            let got = (word & enforcer_common::block_mask_v4(len)).to_le_bytes();
            assert_eq!(got, want, "/{len}");
        }
        for len in 1..=128u8 {
            let addr: u128 = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
            let want = (addr & (u128::MAX << (128 - u32::from(len)))).to_be_bytes();
            let bytes = addr.to_be_bytes();
            let words = [
                u64::from_le_bytes(bytes[..8].try_into().unwrap()),
                u64::from_le_bytes(bytes[8..].try_into().unwrap()),
            ];
            let mask = enforcer_common::block_mask_v6(len);
            let mut got = [0u8; 16];
            got[..8].copy_from_slice(&(words[0] & mask[0]).to_le_bytes());
            got[8..].copy_from_slice(&(words[1] & mask[1]).to_le_bytes());
            assert_eq!(got, want, "/{len}");
        }
    }
}
