//! Map layouts and constants shared by the kernel programs (`enforcer-ebpf`) and user space
//! (`enforcer`, `policy-compiler`). This is the only place where a map's key or value layout is
//! defined.
//!
//! # How a packet is judged
//!
//! 1. The destination and source addresses are looked up first in the exact-match host table
//!    of their family ([`map_names::HOSTS_V4`], [`map_names::HOSTS_V6`]: the policy's /32 and
//!    /128 entries), then, on a miss, in the address trie of the other prefixes
//!    ([`map_names::ADDR_V4`], [`map_names::ADDR_V6`]): longest prefix wins. A host entry is the
//!    longest prefix any address can match, so the two steps give exactly the longest match over
//!    all of the policy's prefixes, and a host costs one table probe (nearly always one cache
//!    line, see [`exact_table`]) however large the policy. A policy whose subnets are too many
//!    or too short to list address by address in the host table may list them block by block
//!    instead: in the block table ([`map_names::BLOCKS_V4`], [`map_names::BLOCKS_V6`]), whose
//!    keys are the address with all but its first [`Config::block_len_v4`] bits cleared, each
//!    block holding what the longest prefix over it says. A miss in the host table then costs
//!    a second probe, and the trie is walked only for what the blocks do not cover.
//!    The value ([`AddrInfo`]) gives the address's segment and its *source class*. A miss means
//!    segment [`SEGMENT_WORLD`] and class [`CLASS_WORLD`].
//! 2. The destination segment's [`SegmentInfo`] says whether it is enforced, monitored or not
//!    enforced at all.
//! 3. [`map_names::PAIRS`] maps (destination segment, source class) to a *port table*, with a
//!    fallback entry for rules that match every source ([`CLASS_WILDCARD`]).
//! 4. The port table is looked up with (port table, protocol key, port): first in
//!    [`map_names::PORTS_EXACT`], the table's single ports, then on a miss in the trie
//!    [`map_names::PORTS`], its ranges (longest match). Either names the first rule (in policy
//!    order) that allows the packet; a miss in both is a denial.
//! 5. Only then, for a packet that would be denied (or audited), [`map_names::BREAKGLASS`]: the
//!    live break-glass grants of its (source segment, destination segment) pair.
//!
//! A source class groups the source addresses that every rule treats alike: same segment, and
//! inside the same set of the rules' `from:` CIDRs. The compiler computes classes, so the kernel
//! never iterates over rules.
#![no_std]

/// Map names, as declared in the eBPF object. User space finds maps by these names.
///
/// The policy maps exist twice, one set per *slot*: a reload fills the inactive slot and then
/// flips [`ACTIVE`](map_names::ACTIVE), so every packet is judged entirely by one policy.
pub mod map_names {
    pub const ADDR_V4: [&str; 2] = ["ADDR_V4_0", "ADDR_V4_1"];
    pub const ADDR_V6: [&str; 2] = ["ADDR_V6_0", "ADDR_V6_1"];
    /// The /32 entries of the policy (see [`crate::HOST_PREFIX_V4`]), out of the trie: an
    /// array of [`crate::HostBucketV4`] (see [`crate::exact_table`]).
    pub const HOSTS_V4: [&str; 2] = ["HOSTS_V4_0", "HOSTS_V4_1"];
    /// The /128 entries of the policy (see [`crate::HOST_PREFIX_V6`]), out of the trie: an
    /// array of [`crate::HostBucketV6`].
    pub const HOSTS_V6: [&str; 2] = ["HOSTS_V6_0", "HOSTS_V6_1"];
    /// The IPv4 subnets block by block (see [`crate::Config::block_len_v4`]): an array of
    /// [`crate::HostBucketV4`] keyed by the block's first address. The trie holds every subnet
    /// too, so a block this table had no room for is found there.
    pub const BLOCKS_V4: [&str; 2] = ["BLOCKS_V4_0", "BLOCKS_V4_1"];
    /// [`BLOCKS_V4`] for IPv6 (see [`crate::Config::block_len_v6`]).
    pub const BLOCKS_V6: [&str; 2] = ["BLOCKS_V6_0", "BLOCKS_V6_1"];
    pub const SEGMENTS: [&str; 2] = ["SEGMENTS_0", "SEGMENTS_1"];
    /// An array of [`crate::PairBucket`] (see [`crate::exact_table`]).
    pub const PAIRS: [&str; 2] = ["PAIRS_0", "PAIRS_1"];
    /// The pairs the [`PAIRS`] table had no room for (a hash, nearly always empty).
    pub const PAIRS_OVERFLOW: [&str; 2] = ["PAIRS_OVERFLOW_0", "PAIRS_OVERFLOW_1"];
    pub const PORTS: [&str; 2] = ["PORTS_0", "PORTS_1"];
    /// The single-port entries of the port tables (see [`crate::PORT_EXACT_PREFIX`]), out of
    /// the trie: an array of [`crate::PortBucket`] (see [`crate::exact_table`]).
    pub const PORTS_EXACT: [&str; 2] = ["PORTS_EXACT_0", "PORTS_EXACT_1"];
    pub const RULE_HITS: [&str; 2] = ["RULE_HITS_0", "RULE_HITS_1"];
    /// Break-glass grants in force, keyed by the slot's segment ids (see
    /// [`crate::BreakglassKey`]).
    pub const BREAKGLASS: [&str; 2] = ["BREAKGLASS_0", "BREAKGLASS_1"];
    /// One `u32` per slot: non-zero while that slot's [`BREAKGLASS`] map may hold a grant. The
    /// kernel looks up grants only then; the daemon sets it before the first insert and clears
    /// it only once the map holds nothing, so a grant in force is never skipped.
    pub const BREAKGLASS_IN_USE: &str = "BREAKGLASS_IN_USE";
    /// One [`crate::Config`] per slot.
    pub const CONFIG: &str = "CONFIG";
    /// The slot packets are judged by (one `u32`).
    pub const ACTIVE: &str = "ACTIVE";
    pub const COUNTERS: &str = "COUNTERS";
    pub const DROPS_BY_PROTOCOL: &str = "DROPS_BY_PROTOCOL";
    /// Per-CPU hash of [`crate::PairVerdictKey`] -> `u64`: segment-pair verdict counts that
    /// their slot's [`PAIR_COUNTS`] table had no element for.
    pub const PAIR_VERDICTS: &str = "PAIR_VERDICTS";
    /// Per slot, a per-CPU array of [`crate::PairCount`] ([`crate::PAIR_COUNT_SLOTS`]
    /// elements): the slot's segment-pair verdict counts, each CPU claiming elements for the
    /// keys it counts. Inlined array lookups, where the hash costs a call and a key hash per
    /// judged packet. The daemon reads the inactive slot's table and empties it after a
    /// switch, once no program judges with that slot; it never writes the active one's.
    pub const PAIR_COUNTS: [&str; 2] = ["PAIR_COUNTS_0", "PAIR_COUNTS_1"];
    pub const CONNTRACK: &str = "CONNTRACK";
    /// The filter in front of [`CONNTRACK`]: two halves of [`crate::FlowFilterLine`]s, one byte
    /// per hash of a flow key (see [`crate::flow_filter`]). Memory-mapped by the daemon.
    pub const FLOW_FILTER: &str = "FLOW_FILTER";
    /// One [`crate::FlowFilterState`]: whether the filter is in use, and which half.
    pub const FLOW_FILTER_STATE: &str = "FLOW_FILTER_STATE";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU array of [`crate::RecentEvent`]: the event rate limiter (see
    /// [`crate::RECENT_EVENT_SLOTS`]).
    pub const RECENT_EVENTS: &str = "RECENT_EVENTS";
    pub const EVENT_COUNTERS: &str = "EVENT_COUNTERS";
    /// Quarantined addresses ([`crate::QuarantineKey`] -> `u32`, unused), global.
    pub const QUARANTINE: &str = "QUARANTINE";
    /// One [`crate::Clock`]: how the programs tell the time from jiffies (global).
    pub const CLOCK: &str = "CLOCK";
    /// Per-CPU array of [`crate::FlowCacheEntry`] ([`crate::FLOW_CACHE_SLOTS`] elements): the
    /// established flows each CPU passed lately, probed before [`CONNTRACK`].
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    /// One `u32`, global: entries of [`FLOW_CACHE`] are trusted only while it holds the value
    /// they were filled with. The daemon increments it after removing flows from
    /// [`CONNTRACK`], once no program that could have seen them still runs.
    pub const FLOW_CACHE_EPOCH: &str = "FLOW_CACHE_EPOCH";
    /// One `u32`: non-zero while [`QUARANTINE`] may hold an address. The kernel probes the
    /// quarantine only then; the daemon sets it before the first insert and clears it only
    /// after seeing the map empty, so a quarantined address is never skipped.
    pub const QUARANTINE_IN_USE: &str = "QUARANTINE_IN_USE";
}

/// Version of the maps' layouts and meanings, as far as a pinned enforcer (`enforcer run
/// --persist`) is concerned: a daemon adopts the maps another build pinned only when this number
/// is the same (and every map's type, key size and value size agree). Bump it when a key or value
/// changes its meaning without changing its size (a field repurposed, a counter renumbered, a
/// slot or index scheme changed), so that a new binary refuses to reuse maps it would misread.
///
/// 2: host addresses and single ports moved out of the tries into exact-match hashes; a
/// version-1 program would miss them in the tries.
/// 3: the host, pair and single-port tables became arrays of buckets (see [`exact_table`]),
/// with [`map_names::PAIRS_OVERFLOW`] behind the pair table.
pub const MAP_LAYOUT_VERSION: u32 = 3;

/// Program names, as declared in the eBPF object.
pub mod program_names {
    pub const XDP_INGRESS: &str = "enforcer_xdp";
    pub const TC_EGRESS: &str = "enforcer_tc_egress";
    /// Never attached: the daemon runs it (`BPF_PROG_TEST_RUN`) to calibrate [`crate::Clock`].
    pub const CLOCK_PROBE: &str = "enforcer_clock_probe";
}

/// Benchmark-only programs and maps (`enforcer-ebpf/src/bench.rs`, driven by `cargo xtask
/// bench`). The daemon never loads or attaches these programs; the maps are tiny unless a
/// benchmark sizes them.
pub mod bench {
    /// Returns `XDP_PASS` at once: the floor of per-packet cost.
    pub const EMPTY: &str = "bench_empty";
    /// The enforcer's parser, then a verdict from the parse alone (no policy lookups).
    pub const PARSE_ONLY: &str = "bench_parse_only";
    /// The enforcer's parser, counts the packet in [`RX`] and drops it: the end-to-end floor.
    pub const PARSE_DROP: &str = "bench_parse_drop";
    /// Counts the packet in [`RX`] and returns `XDP_PASS`: in front of nftables, it counts
    /// what the stack is handed.
    pub const PASS_COUNT: &str = "bench_pass_count";
    /// Traffic generator for `BPF_F_TEST_XDP_LIVE_FRAMES`: writes the next [`super::BenchFlow`]
    /// of [`FLOWS`] into an Ethernet/IPv4/UDP frame and returns `XDP_TX`.
    pub const TX: &str = "bench_tx";
    /// Array of [`super::BenchFlow`], cycled through by [`TX`].
    pub const FLOWS: &str = "BENCH_FLOWS";
    /// Per-CPU `u32`: the next index into [`FLOWS`].
    pub const CURSOR: &str = "BENCH_CURSOR";
    /// Per-CPU `u64`: packets [`PARSE_DROP`] or [`PASS_COUNT`] saw.
    pub const RX: &str = "BENCH_RX";
}

/// Value of [`bench::FLOWS`]: what the generator writes into its frame (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchFlow {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub dport: [u8; 2],
    pub _pad: [u8; 2],
}

/// Segment id of `world`: every address that is in no segment.
pub const SEGMENT_WORLD: u32 = 0;
/// Source class of an address that matches no prefix in the address trie.
pub const CLASS_WORLD: u32 = 0;

/// The [`PairKey::src_class`] of a destination's fallback entry: the port table of its rules
/// that match every source (`from: any`, essential traffic). Consulted when the source class has
/// no entry of its own, or its table has no match; an own table holds the `any` rules that
/// precede its last specific rule, so the first match is still the first rule in policy order.
pub const CLASS_WILDCARD: u32 = u32::MAX;

/// Compile-time capacity of each map as declared in the eBPF object. The loader overrides these
/// with sizes computed from the compiled policy (plus headroom) before loading.
pub const DEFAULT_MAX_ENTRIES: u32 = 1024;

/// Value of [`map_names::ADDR_V4`] / [`map_names::ADDR_V6`] (keys are `Key<[u8; 4]>` / `Key<[u8; 16]>`, address in
/// network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrInfo {
    pub segment: u32,
    pub class: u32,
}

/// How a segment's incoming traffic is handled.
pub mod segment_mode {
    /// Traffic to the segment is not judged (the default for `world`).
    pub const UNENFORCED: u8 = 0;
    /// Traffic without an allow rule is dropped.
    pub const ENFORCE: u8 = 1;
    /// Traffic without an allow rule passes and is counted as audit.
    pub const MONITOR: u8 = 2;
}

/// Value of the [`map_names::SEGMENTS`] array, indexed by segment id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentInfo {
    /// One of [`segment_mode`].
    pub mode: u8,
    /// Bit [`wildcard_bit`]`(p)` is set when no rule for protocol `p` admits every source into
    /// the segment (its [`CLASS_WILDCARD`] port table has no entry for `p`, or it has none), so
    /// the kernel skips that probe. A clear bit, as in maps written before this field existed,
    /// means "probe".
    pub no_wildcard_rules: u8,
    pub _pad: [u8; 2],
}

/// The bit of [`SegmentInfo::no_wildcard_rules`] for policy protocol key `proto_key` (one of
/// [`proto_key`]).
#[inline(always)]
pub const fn wildcard_bit(proto_key: u8) -> u8 {
    1 << (protocol_class::of(proto_key, true) - 1)
}

/// Every bit [`wildcard_bit`] can return.
pub const NO_WILDCARD_RULES_AT_ALL: u8 = 0x1f;

/// Key of the [`map_names::PAIRS`] table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairKey {
    pub dst_segment: u32,
    pub src_class: u32,
}

/// Value of the [`map_names::PAIRS`] table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairValue {
    pub port_table: u32,
    /// Non-zero when the table has entries in [`map_names::PORTS`] (port ranges): a port that
    /// misses [`map_names::PORTS_EXACT`] is looked up in the trie only then.
    pub has_ranges: u32,
}

/// Protocol keys used in [`PortKey`]. TCP and UDP match on the destination port, ICMP and
/// ICMPv6 on the message type (stored in the port field). Every other IP protocol, and a packet
/// whose transport header is not present (a non-first fragment), uses [`proto_key::NO_PORT`]
/// with port 0: only rules with `ports: [any]` match it.
pub mod proto_key {
    pub const NO_PORT: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// Data part of the [`map_names::PORTS`] LPM-trie key (`Key<PortKey>`). Bits are matched from the first
/// byte, so every field is big-endian and the prefix length is `48 + k` where `k` is the number
/// of leading port bits that are fixed (0..=16).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// Port table id, big-endian.
    pub table: [u8; 4],
    /// One of [`proto_key`].
    pub proto: u8,
    pub _pad: u8,
    /// Port (or ICMP type), big-endian.
    pub port: [u8; 2],
}

/// Number of key bits of a [`PortKey`] before the port: table (32), protocol (8), padding (8).
pub const PORT_KEY_FIXED_BITS: u32 = 48;

impl PortKey {
    pub const fn new(table: u32, proto: u8, port: u16) -> Self {
        Self {
            table: table.to_be_bytes(),
            proto,
            _pad: 0,
            port: port.to_be_bytes(),
        }
    }
}

/// Prefix length of a [`map_names::PORTS`] entry with every port bit fixed: such entries are
/// stored in [`map_names::PORTS_EXACT`] instead (key: the [`PortKey`] alone).
pub const PORT_EXACT_PREFIX: u32 = PORT_KEY_FIXED_BITS + 16;

/// Prefix length of an IPv4 host: such entries are stored in [`map_names::HOSTS_V4`] (key: the
/// address alone) instead of the trie.
pub const HOST_PREFIX_V4: u32 = 32;
/// Prefix length of an IPv6 host: such entries are stored in [`map_names::HOSTS_V6`].
pub const HOST_PREFIX_V6: u32 = 128;

/// Value of the [`map_names::PORTS`] trie and [`map_names::PORTS_EXACT`]: the global index of
/// the rule that allows the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortValue {
    pub rule: u32,
}

/// Where a packet was judged. The per-CPU [`map_names::COUNTERS`] array holds one block of
/// [`counter::COUNT`] counters per direction, at `direction * counter::COUNT + counter`.
pub mod direction {
    /// XDP, on packets arriving at an interface.
    pub const INGRESS: u32 = 0;
    /// TC, on packets leaving an interface.
    pub const EGRESS: u32 = 1;
    pub const COUNT: u32 = 2;
    pub const NAMES: [&str; COUNT as usize] = ["ingress", "egress"];
}

/// Outcome counters. Every packet a program sees increments exactly one of them. The names are
/// stable: metrics and logs use them.
pub mod counter {
    /// Passed: a new flow allowed by a rule (or `intra: allow`).
    pub const ALLOWED: u32 = 0;
    /// Passed: no rule allowed it, the destination segment is monitored.
    pub const AUDIT: u32 = 1;
    /// Passed: not judged (destination in `world` while world is unenforced; egress while
    /// egress is not enforced).
    pub const UNENFORCED: u32 = 2;
    /// Passed: not IPv4 or IPv6 (ARP, LLDP, ...).
    pub const NON_IP: u32 = 3;
    /// Passed: a packet of a tracked flow, in either direction.
    pub const ESTABLISHED: u32 = 4;
    /// Passed: an ICMP error about a tracked flow.
    pub const RELATED: u32 = 5;
    /// Passed: a later fragment whose first fragment passed.
    pub const FRAGMENT: u32 = 6;
    /// Passed: a new flow allowed by a break-glass grant (the policy would deny or audit it).
    pub const BREAKGLASS: u32 = 7;
    /// Dropped: no rule allowed it.
    pub const DROP_POLICY_DENIED: u32 = 8;
    /// Dropped: too short for its headers, or lengths that contradict each other.
    pub const DROP_MALFORMED: u32 = 9;
    /// Dropped: stacked VLAN tags.
    pub const DROP_UNSUPPORTED_ENCAP: u32 = 10;
    /// Dropped: a later fragment with no known first fragment.
    pub const DROP_FRAGMENT_NO_STATE: u32 = 11;
    /// Dropped: a later fragment that overlaps the transport header of its first fragment.
    pub const DROP_FRAGMENT_OVERLAP: u32 = 12;
    /// Dropped: a first fragment too small to hold its transport header.
    pub const DROP_FRAGMENT_TOO_SMALL: u32 = 13;
    /// Dropped: more IPv6 extension headers than the parser walks.
    pub const DROP_TOO_MANY_EXT_HEADERS: u32 = 14;
    /// Dropped: a new flow needed connection state and the table was full.
    pub const DROP_CONNTRACK_FULL: u32 = 15;
    /// Dropped: a tracked flow whose rule a policy change removed (`on_policy_change: recheck`).
    pub const DROP_FLOW_REVOKED: u32 = 16;
    /// Dropped: a packet of a flow a break-glass grant admitted, after the grant expired or was
    /// revoked, when nothing else allows the flow now.
    pub const DROP_BREAKGLASS_EXPIRED: u32 = 17;
    /// Number of counters per direction.
    pub const COUNT: u32 = 18;

    pub const NAMES: [&str; COUNT as usize] = [
        "allowed",
        "audit",
        "unenforced",
        "non_ip",
        "established",
        "related",
        "fragment",
        "breakglass",
        "policy_denied",
        "malformed",
        "unsupported_encap",
        "fragment_no_state",
        "fragment_overlap",
        "fragment_too_small",
        "too_many_ext_headers",
        "conntrack_full",
        "flow_revoked",
        "breakglass_expired",
    ];

    /// Whether packets counted under `counter` are dropped.
    pub const fn is_drop(counter: u32) -> bool {
        counter >= DROP_POLICY_DENIED
    }
}

/// What to do with tracked flows when the policy changes.
pub mod policy_change {
    /// A flow whose rule was removed is cut at its next packet.
    pub const RECHECK: u8 = 0;
    /// Running flows finish under the rules that admitted them.
    pub const KEEP: u8 = 1;
}

/// Indexes of [`Config::timeouts_ns`].
pub mod timeout {
    pub const TCP_SYN: usize = 0;
    pub const TCP_ESTABLISHED: usize = 1;
    pub const TCP_CLOSING: usize = 2;
    pub const UDP: usize = 3;
    pub const ICMP: usize = 4;
    pub const OTHER: usize = 5;
    pub const FRAGMENT: usize = 6;
    pub const COUNT: usize = 7;
}

/// The single entry of the [`map_names::CONFIG`] array: settings of the loaded policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Bumped on every policy load; flows remember the generation that last judged them.
    pub generation: u32,
    /// One of [`policy_change`].
    pub on_policy_change: u8,
    /// How packets leaving through an interface are judged: one of [`segment_mode`].
    pub egress_mode: u8,
    /// [`lookup_flags`]: which address tries of this slot hold entries.
    pub lookup_flags: u8,
    pub _pad: u8,
    /// Idle timeouts by [`timeout`] index, in nanoseconds.
    pub timeouts_ns: [u64; timeout::COUNT],
    /// At most one event per flow (see [`EventLimiterKey`]) per this many nanoseconds.
    pub event_interval_ns: u64,
    /// [`event_flags`]: which outcomes are reported as events.
    pub event_flags: u32,
    /// Segment id of the built-in `quarantine` segment in this slot's policy: what an address
    /// in [`map_names::QUARANTINE`] belongs to, as destination and as source.
    pub quarantine_segment: u32,
    /// The source class of a quarantined address in this slot's policy: (quarantine, no rule
    /// CIDRs), so only rules naming `quarantine` or `any` match it.
    pub quarantine_class: u32,
    /// Non-zero when the slot's [`map_names::BLOCKS_V4`] table is in use: the prefix length of
    /// its blocks (1-31). An IPv4 address that misses the host table is then probed there,
    /// and looked up in the trie only on a miss and [`lookup_flags::V4_PREFIXES_OUTSIDE_BLOCKS`].
    /// Programs of builds before the table ignore this and walk the trie, which holds every
    /// subnet either way.
    pub block_len_v4: u8,
    /// [`Config::block_len_v4`] for IPv6 (1-127).
    pub block_len_v6: u8,
    pub _pad2: [u8; 2],
}

/// Bits of [`Config::lookup_flags`]: an address that misses the host table is looked up in
/// its family's trie only when the trie holds prefixes, so a policy of hosts never walks one.
pub mod lookup_flags {
    pub const V4_PREFIXES: u8 = 1;
    pub const V6_PREFIXES: u8 = 2;
    /// With a block table in use: some IPv4 prefix is not in it, so a miss there walks the
    /// trie.
    pub const V4_PREFIXES_OUTSIDE_BLOCKS: u8 = 4;
    /// [`V4_PREFIXES_OUTSIDE_BLOCKS`] for IPv6.
    pub const V6_PREFIXES_OUTSIDE_BLOCKS: u8 = 8;
    /// For the daemon only (the programs do not read it): the IPv4 host table holds the
    /// addresses of the subnets at most 8 bits shorter than a host, while shorter subnets
    /// remain. Without [`V4_PREFIXES`], it holds every subnet's.
    pub const V4_SUBNETS_IN_HOSTS: u8 = 16;
    /// [`V4_SUBNETS_IN_HOSTS`] for IPv6.
    pub const V6_SUBNETS_IN_HOSTS: u8 = 32;
}

// The block lengths took the place of the last four bytes of padding: programs and daemons of
// builds before them read the same layout.
const _: () = assert!(core::mem::offset_of!(Config, block_len_v4) + 4 == size_of::<Config>());

/// The little-endian word that keeps the first `len` bits (1-32) of an IPv4 address read as a
/// little-endian word: the key of its block in [`map_names::BLOCKS_V4`].
#[inline(always)]
pub fn block_mask_v4(len: u8) -> u32 {
    match u32::from(len) {
        0 => 0,
        len => (u32::MAX << (32 - len.min(32))).swap_bytes(),
    }
}

/// The two little-endian words that keep the first `len` bits (1-128) of an IPv6 address read
/// as two little-endian words (see [`block_mask_v4`]).
#[inline(always)]
pub fn block_mask_v6(len: u8) -> [u64; 2] {
    let keep = |bits: u32| match bits {
        0 => 0,
        bits => (u64::MAX << (64 - bits.min(64))).swap_bytes(),
    };
    let len = u32::from(len);
    [keep(len.min(64)), keep(len.saturating_sub(64))]
}

/// Key of [`map_names::QUARANTINE`]: a quarantined address (IPv4 in the first 4 bytes, the rest
/// zero). Global, not per policy slot: the slot's [`Config`] says which segment and class it
/// stands for, so a reload renumbering segments needs no rewrite.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct QuarantineKey {
    pub addr: [u8; 16],
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Capacity of [`map_names::QUARANTINE`] (allocated per entry, not up front).
pub const QUARANTINE_MAX_ENTRIES: u32 = 65_536;

/// Bits of [`Config::event_flags`]. Drops and audits are always reported; allowed first
/// packets of new flows only when asked for.
pub mod event_flags {
    pub const REPORT_ALLOWED: u32 = 1;
}

/// Protocol classes of [`map_names::DROPS_BY_PROTOCOL`], indexed
/// `(direction * counter::COUNT + counter) * protocol_class::COUNT + class`.
pub mod protocol_class {
    /// No IP protocol known (a frame dropped before its IP header was understood).
    pub const NONE: u32 = 0;
    pub const TCP: u32 = 1;
    pub const UDP: u32 = 2;
    pub const ICMP: u32 = 3;
    pub const ICMPV6: u32 = 4;
    pub const OTHER: u32 = 5;
    pub const COUNT: u32 = 6;
    pub const NAMES: [&str; COUNT as usize] = ["none", "tcp", "udp", "icmp", "icmpv6", "other"];

    pub const fn of(proto: u8, known: bool) -> u32 {
        if !known {
            return NONE;
        }
        match proto {
            6 => TCP,
            17 => UDP,
            1 => ICMP,
            58 => ICMPV6,
            _ => OTHER,
        }
    }
}

/// Key of the per-CPU [`map_names::PAIR_VERDICTS`] hash: judged packets (first packets of
/// flows, and denials) by segment pair. Segment ids belong to the policy `generation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairVerdictKey {
    pub generation: u32,
    pub src_segment: u32,
    pub dst_segment: u32,
    /// [`direction`].
    pub direction: u8,
    /// The outcome [`counter`].
    pub counter: u8,
    pub _pad: [u8; 2],
}

/// Elements of each [`map_names::PAIR_COUNTS`] table (a power of two): 96 KiB per CPU and slot.
///
/// A policy of a few dozen segments judges a few hundred distinct (pair, direction, outcome)
/// keys; a key whose two elements other keys hold is counted in [`map_names::PAIR_VERDICTS`].
pub const PAIR_COUNT_SLOTS: u32 = 4096;

/// An element of a [`map_names::PAIR_COUNTS`] table: the key this CPU counts there (generation
/// 0: none yet) and its count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairCount {
    pub key: PairVerdictKey,
    pub count: u64,
}

impl PairVerdictKey {
    /// The two elements of a [`map_names::PAIR_COUNTS`] table that may count this key (the
    /// generation is left out: one slot's table only ever counts one generation). A key is
    /// counted at the first that holds it or is unused; with two independent choices, far
    /// fewer keys end in the hash than with one (about 2% instead of 11% of 1,000 keys).
    #[inline(always)]
    pub fn count_slots(&self) -> [u32; 2] {
        // Segment ids are small: direction and outcome go into the unused upper half of the
        // source's word. A multiply's top bits depend on every bit below them; the two choices
        // are its top two runs of bits.
        let word = u64::from(self.src_segment)
            ^ u64::from(self.direction) << 24
            ^ u64::from(self.counter) << 16
            ^ u64::from(self.dst_segment) << 32;
        let h = word.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let bits = PAIR_COUNT_SLOTS.trailing_zeros();
        [
            (h >> (64 - bits)) as u32,
            (h >> (64 - 2 * bits)) as u32 & (PAIR_COUNT_SLOTS - 1),
        ]
    }
}

/// Indexes of the per-CPU [`map_names::EVENT_COUNTERS`] array.
pub mod event_counter {
    /// Events written to the ring buffer.
    pub const SENT: u32 = 0;
    /// Events the ring buffer had no room for.
    pub const LOST: u32 = 1;
    /// Events not sent because their flow had one within the interval.
    pub const RATE_LIMITED: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// A flow as far as event rate limiting is concerned (source, destination, protocol,
/// destination port, outcome). Five aligned 8-byte words, which the programs hash and compare
/// whole; `_pad` is always 0.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventLimiterKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub dport: u16,
    pub proto: u8,
    pub counter: u8,
    pub _pad: u32,
}

impl EventLimiterKey {
    /// Words of the key.
    pub const WORDS: usize = size_of::<EventLimiterKey>() / 8;

    /// The key as 8-byte words, which the programs hash and compare without byte loops or a
    /// `bcmp` subprogram.
    #[inline(always)]
    pub fn words(&self) -> &[u64; Self::WORDS] {
        const {
            assert!(
                size_of::<EventLimiterKey>().is_multiple_of(8)
                    && core::mem::align_of::<EventLimiterKey>() >= 8
            );
        }
        // SAFETY: same size; the key is 8-byte aligned and holds only integers.
        unsafe { &*(self as *const EventLimiterKey).cast::<[u64; Self::WORDS]>() }
    }

    /// The first of the key's two slots in [`map_names::RECENT_EVENTS`] (the second follows
    /// it). Multilinear: the products are independent of one another, so the CPU overlaps
    /// them, where a chain of multiplies waits for each in turn. The slots come from the sum's
    /// top bits, the only ones that every bit of a 64-bit word reaches.
    #[inline(always)]
    pub fn first_slot(&self) -> u32 {
        const K: [u64; EventLimiterKey::WORDS] = [
            0x9e37_79b9_7f4a_7c15,
            0xc2b2_ae3d_27d4_eb4f,
            0x1656_67b1_9e37_79f9,
            0x85eb_ca77_c2b2_ae63,
            0x27d4_eb2f_1656_67c5,
        ];
        let words = self.words();
        let mut hash: u64 = 0;
        for i in 0..Self::WORDS {
            hash = hash.wrapping_add(words[i].wrapping_mul(K[i]));
        }
        ((hash >> (64 - RECENT_EVENT_SLOTS.trailing_zeros())) as u32) & (RECENT_EVENT_SLOTS - 2)
    }
}

/// Slots of [`map_names::RECENT_EVENTS`] on each CPU (a power of two).
///
/// The rate limiter is a two-way set-associative table per CPU: a flow's key hashes to a pair
/// of slots, each holding a flow reported there and when. A flow found in its pair from less
/// than an interval ago is rate-limited; otherwise it takes its own slot or the one reported
/// longer ago, and is reported. Flows crowding a pair therefore cost extra events, never a
/// missed one. It replaced an LRU hash,
/// whose insert (one per reported flow) and eviction cost more than the rest of a denial. 48
/// bytes a slot: 768 KiB per CPU.
pub const RECENT_EVENT_SLOTS: u32 = 16_384;

/// Value of [`map_names::RECENT_EVENTS`].
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecentEvent {
    /// Byte for byte where the key and the padding after it were when the key was 36 bytes,
    /// so that a pinned limiter needs no migration.
    pub key: EventLimiterKey,
    /// When the flow was last reported (the programs' clock); 0 for an empty slot.
    pub reported_ns: u64,
}

// The limiter's pinned layout (see `RecentEvent::key`).
const _: () = assert!(
    size_of::<RecentEvent>() == 48 && core::mem::offset_of!(RecentEvent, reported_ns) == 40
);

/// One event in the [`map_names::EVENTS`] ring buffer: a denied, audited or (optionally)
/// allowed-new-flow packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The programs' clock ([`Clock`]: CLOCK_MONOTONIC_COARSE).
    pub time_ns: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Global rule index in the policy of `generation`, or [`NO_RULE`]; the break-glass grant's
    /// id when `counter` is [`counter::BREAKGLASS`].
    pub rule: u32,
    pub src_segment: u32,
    pub dst_segment: u32,
    pub ifindex: u32,
    /// Policy generation that judged the packet.
    pub generation: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// [`direction`].
    pub direction: u8,
    /// The outcome [`counter`].
    pub counter: u8,
    /// ICMP type (for ICMP and ICMPv6).
    pub icmp_type: u8,
    pub _pad: [u8; 3],
}

/// Key of the connection-tracking hash. The two endpoints are stored in canonical order
/// (`(addr_a, port_a) <= (addr_b, port_b)`), so a packet and its reply find the same entry with
/// one lookup. IPv4 addresses fill the first 4 bytes. ICMP echo uses its identifier as both
/// ports; protocols without ports use 0.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub addr_a: [u8; 16],
    pub addr_b: [u8; 16],
    pub port_a: u16,
    pub port_b: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 2],
}

/// The first `N` 8-byte words of `value`, little-endian as [`address_half`] reads them, but
/// each read whole. For addresses at the start of an 8-aligned key: built byte by byte, as from
/// an address of unknown alignment, each word costs a BPF program 22 instructions.
#[inline(always)]
pub fn leading_words<T, const N: usize>(value: &T) -> [u64; N] {
    const {
        assert!(core::mem::align_of::<T>() >= 8 && core::mem::size_of::<T>() >= 8 * N);
    }
    let words = (value as *const T).cast::<u64>();
    // SAFETY: the `N` words are inside `value` and aligned (checked above); any bytes are a
    // valid `u64`.
    core::array::from_fn(|i| u64::from_le(unsafe { words.add(i).read() }))
}

impl FlowKey {
    /// The two addresses as four words ([`leading_words`]).
    #[inline(always)]
    pub fn address_words(&self) -> [u64; 4] {
        const {
            assert!(
                core::mem::offset_of!(FlowKey, addr_a) == 0
                    && core::mem::offset_of!(FlowKey, addr_b) == 16
            );
        }
        leading_words(self)
    }
}

/// TCP progress of a tracked flow, as far as state expiry needs it.
pub mod tcp_state {
    /// The initiator's SYN was seen, no reply yet.
    pub const SYN_SENT: u8 = 0;
    pub const ESTABLISHED: u8 = 1;
    /// Both sides sent FIN, or either sent RST: the entry expires after the closing timeout.
    pub const CLOSING: u8 = 2;
    /// Bits of [`super::FlowState::fin_seen`].
    pub const FIN_FROM_INITIATOR: u8 = 1;
    pub const FIN_FROM_RESPONDER: u8 = 2;
}

/// Value of the connection-tracking hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub last_seen_ns: u64,
    /// Policy generation that last judged the flow.
    pub generation: u32,
    /// The rule that admitted the flow, or [`NO_RULE`]; the grant's id when `admitted` is
    /// [`counter::BREAKGLASS`].
    pub rule: u32,
    /// Port (or ICMP type) the policy judged, in the initiator-to-responder direction.
    pub policy_port: u16,
    /// The counter that admitted the flow ([`counter::ALLOWED`], `AUDIT`, `UNENFORCED` or
    /// `BREAKGLASS`, in which case [`FlowState::rule`] is the grant's id).
    pub admitted: u8,
    /// 0 when the endpoint `a` of the key started the flow, 1 when `b` did.
    pub initiator: u8,
    /// One of [`tcp_state`] (TCP only).
    pub tcp: u8,
    /// [`tcp_state::FIN_FROM_INITIATOR`] | [`tcp_state::FIN_FROM_RESPONDER`].
    pub fin_seen: u8,
    /// The policy protocol key of the admitting packet.
    pub policy_proto: u8,
    /// The [`direction`] in which the flow was admitted (and is rechecked).
    pub direction: u8,
    /// For a flow admitted by a break-glass grant: the grant's expiry (the programs'
    /// [`Clock`]). From then on the flow is judged again at each packet, and dropped
    /// ([`counter::DROP_BREAKGLASS_EXPIRED`]) unless something else allows it. The daemon sets
    /// it to 0 when it revokes the grant.
    pub breakglass_expires_ns: u64,
}

/// Entries of [`map_names::FLOW_CACHE`] on each CPU (a power of two): 64 bytes each, 128 KiB
/// per CPU.
pub const FLOW_CACHE_SLOTS: u32 = 2048;

/// How long a [`FlowCacheEntry`] may pass its flow's packets without the connection table, at
/// most: the flow's `last_seen_ns` lags its packets by up to this much, so an idle flow expires
/// up to this much early.
pub const FLOW_CACHE_WINDOW_NS: u64 = 100_000_000;

/// Value of [`map_names::FLOW_CACHE`]: an established flow that this CPU found in the connection
/// table, so that its next packets within the window pass without the table's lookup (a call
/// into the kernel and a hash of the 40-byte key, some 25 ns). See `enforcer_ebpf::conntrack`
/// for when an entry may be trusted.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCacheEntry {
    pub key: FlowKey,
    /// The entry passes packets before this time only (the programs' clock); 0 when empty.
    pub valid_until_ns: u64,
    /// The policy generation the flow was last judged under ([`Config::generation`]).
    pub generation: u32,
    /// The value of [`map_names::FLOW_CACHE_EPOCH`] read before the table's lookup.
    pub epoch: u32,
}

impl FlowKey {
    /// The key as five 8-byte words.
    #[inline(always)]
    pub fn words(&self) -> [u64; 5] {
        const { assert!(size_of::<FlowKey>() == 40) };
        leading_words(self)
    }
}

/// [`FlowState::rule`] of a flow no rule admitted.
pub const NO_RULE: u32 = u32::MAX;

/// Key of the per-slot [`map_names::BREAKGLASS`] hash: a (source segment, destination segment)
/// pair, in the slot's segment numbering. Consulted only when the policy would deny (or audit) a
/// new flow, so it costs nothing on the allowed and established paths.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BreakglassKey {
    pub src_segment: u32,
    pub dst_segment: u32,
}

/// Port ranges a pair's [`BreakglassValue`] holds at most, over all of its grants.
pub const BREAKGLASS_MAX_RANGES: usize = 16;
/// Segment pairs the [`map_names::BREAKGLASS`] maps hold at most.
pub const BREAKGLASS_MAX_PAIRS: u32 = 256;
/// [`BreakglassRange::proto`] of a grant for `any`: every protocol and port.
pub const BREAKGLASS_ANY_PROTO: u8 = 255;

/// One port range of a grant: policy protocol key ([`proto_key`], or [`BREAKGLASS_ANY_PROTO`])
/// and ports (or ICMP types) `first..=last`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakglassRange {
    /// Time ([`Clock`]) at which the grant ends: it applies while `now < expires_ns`.
    pub expires_ns: u64,
    /// The grant's id (never 0).
    pub grant: u32,
    pub first: u16,
    pub last: u16,
    pub proto: u8,
    pub _pad: [u8; 7],
}

/// Value of the [`map_names::BREAKGLASS`] hash: the ranges of every grant of a segment pair,
/// sorted by grant id. The first live range that matches names the grant (the lowest id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakglassValue {
    /// Ranges in use (at most [`BREAKGLASS_MAX_RANGES`]).
    pub count: u32,
    pub _pad: u32,
    pub ranges: [BreakglassRange; BREAKGLASS_MAX_RANGES],
}

/// Bytes `i..i + 8` of a 16-byte address, for reading it as a word: little-endian for the
/// hashes below (the same on both sides), big-endian to order addresses as numbers. Built byte
/// by byte: the address may sit at any alignment.
#[inline(always)]
pub fn address_half(addr: &[u8; 16], i: usize) -> [u8; 8] {
    [
        addr[i],
        addr[i + 1],
        addr[i + 2],
        addr[i + 3],
        addr[i + 4],
        addr[i + 5],
        addr[i + 6],
        addr[i + 7],
    ]
}

#[inline(always)]
fn address_word(addr: &[u8; 16], i: usize) -> u64 {
    u64::from_le_bytes(address_half(addr, i))
}

/// A filter in front of the connection table, so that a packet of an untracked flow (a scan, a
/// denial, the first packet of every flow) usually skips the table's probe: a hash lookup that
/// misses the cache, since the table is large and every new flow lands in a random bucket.
///
/// One byte per hash of a [`FlowKey`], in two halves. The rule it must never break: while it
/// is [`ENABLED`], every tracked flow's byte is set in the active half, so a 0 byte proves
/// "untracked". It is kept by setting only:
/// - a program sets the flow's byte in both halves *before* it inserts the flow (once
///   [`FlowFilterState::lines`] is non-zero); removals never clear a byte;
/// - the daemon rebuilds the inactive half (`enforcer::flow_filter`), dropping the bytes of
///   removed flows: it waits for running programs (none reads the inactive half any more),
///   zeroes it, waits again (every program that could have set a byte before or during the
///   zeroing has inserted its flow), sets the byte of every flow in a listing of the table, and
///   makes that half the active one.
pub mod flow_filter {
    use super::FlowKey;

    /// Bytes per line (a map element; one cache line).
    pub const LINE_BYTES: u32 = 64;
    /// Bits of [`super::FlowFilterState::flags`]: probes may trust the active half.
    pub const ENABLED: u32 = 1;
    /// The second half (lines `lines..2 * lines`) is the active one.
    pub const SECOND_HALF_ACTIVE: u32 = 2;

    /// Lines per half for a connection table of `conntrack_max_entries`: two bytes per entry,
    /// so that a full table leaves most bytes 0, rounded up to a power of two.
    pub const fn lines_per_half(conntrack_max_entries: u32) -> u32 {
        let bytes = (conntrack_max_entries as u64 * 2).next_power_of_two();
        let lines = bytes / LINE_BYTES as u64;
        // At least a page per half, which `mmap` needs; at most 2^24 lines (1 GiB).
        if lines < 64 {
            64
        } else if lines > 1 << 24 {
            1 << 24
        } else {
            lines as u32
        }
    }

    /// The hash of a flow key that picks its byte: the same function in the kernel and in the
    /// daemon. Whole 8-byte words ([`FlowKey::address_words`]), multiply and shift.
    #[inline(always)]
    pub fn hash(key: &FlowKey) -> u32 {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut h = u64::from(key.port_a)
            | u64::from(key.port_b) << 16
            | u64::from(key.proto) << 32
            | u64::from(key.family) << 40;
        for w in key.address_words() {
            h = (h ^ w).wrapping_mul(K);
            h ^= h >> 29;
        }
        h = h.wrapping_mul(K);
        (h >> 32) as u32
    }

    /// Where `hash`'s byte is in half `half` of a filter of `lines` lines per half: (line,
    /// byte in the line).
    #[inline(always)]
    pub fn position(hash: u32, half: u32, lines: u32) -> (u32, u32) {
        let line = half * lines + ((hash / LINE_BYTES) & (lines - 1));
        (line, hash & (LINE_BYTES - 1))
    }
}

/// The exact-match tables of a policy slot ([`map_names::HOSTS_V4`], [`map_names::HOSTS_V6`],
/// [`map_names::PAIRS`], [`map_names::PORTS_EXACT`]): open addressing in a plain array of 64-byte
/// buckets, so that a lookup is a multiply and, nearly always, one cache line, with no call into
/// the kernel's hash code (array lookups are inlined by the verifier).
///
/// - Element 0 is a header: its first entry's `used` field holds the bucket mask (buckets minus
///   one, buckets a power of two). A table carries its own size, so programs judging with a
///   table of another size (a pinned table replaced by a larger copy) can never index one with
///   the other's mask.
/// - Buckets are elements `1..=buckets`. A key's home bucket is `hash & mask`; the daemon puts
///   it in the first free entry of the first bucket with one among the home bucket and the next
///   [`MAX_PROBES`]` - 1` (wrapping). A table is written whole and never changed in place, so a
///   lookup may stop at the first free entry: the key would be there or earlier.
/// - A key that finds no free entry in its [`MAX_PROBES`] buckets goes into the table's
///   fallback map instead, which the kernel consults only when a lookup ends on
///   [`Lookup::Crowded`]: a host into its family's trie (as a /32 or /128), a single port into
///   the port trie (as a full-length block), a pair into [`map_names::PAIRS_OVERFLOW`]. At the
///   daemon's load factor (at most half the entries used) that is a handful of keys in 100,000.
pub mod exact_table {
    use super::{
        AddrInfo, HostBucketV4, HostBucketV6, HostEntryV4, HostEntryV6, PairBucket, PairEntry,
        PairKey, PairValue, PortBucket, PortEntry, PortKey, PortValue, address_word as word,
    };

    /// Buckets a lookup reads at most.
    pub const MAX_PROBES: u32 = 4;

    /// Buckets for a table of `capacity` keys: at most half the entries used, rounded up to a
    /// power of two.
    pub const fn buckets_for(capacity: u32, per_bucket: u32) -> u32 {
        let buckets = (capacity as u64 * 2).div_ceil(per_bucket as u64);
        let buckets = buckets.next_power_of_two();
        if buckets < 16 {
            16
        } else if buckets > 1 << 28 {
            1 << 28
        } else {
            buckets as u32
        }
    }

    /// Array elements (header and buckets) of a table of `capacity` keys.
    pub const fn map_entries(capacity: u32, per_bucket: u32) -> u32 {
        buckets_for(capacity, per_bucket) + 1
    }

    /// The keys a table of `map_entries` elements holds at its load factor: the inverse of
    /// [`map_entries`] (never less than the capacity it was sized for).
    pub const fn capacity_of(map_entries: u32, per_bucket: u32) -> u32 {
        (map_entries.saturating_sub(1) as u64 * per_bucket as u64 / 2) as u32
    }

    /// The array index of bucket `bucket` (counted from 0).
    #[inline(always)]
    pub const fn index(bucket: u32) -> u32 {
        bucket + 1
    }

    #[inline(always)]
    fn mix(h: u64, word: u64) -> u64 {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let h = (h ^ word).wrapping_mul(K);
        h ^ (h >> 29)
    }

    #[inline(always)]
    fn finish(h: u64) -> u32 {
        (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
    }

    /// The hash that picks an IPv4 address's home bucket: the same in the kernel and the daemon.
    #[inline(always)]
    pub fn hash_v4(addr: &[u8; 4]) -> u32 {
        finish(mix(4, u64::from(u32::from_le_bytes(*addr))))
    }

    #[inline(always)]
    pub fn hash_v6(addr: &[u8; 16]) -> u32 {
        hash_v6_words([word(addr, 0), word(addr, 8)])
    }

    /// [`hash_v6`] of an address given as its two little-endian words.
    #[inline(always)]
    pub fn hash_v6_words(words: [u64; 2]) -> u32 {
        finish(mix(mix(6, words[0]), words[1]))
    }

    #[inline(always)]
    fn pair_word(key: &PairKey) -> u64 {
        u64::from(key.dst_segment) | u64::from(key.src_class) << 32
    }

    #[inline(always)]
    pub fn hash_pair(key: &PairKey) -> u32 {
        finish(mix(2, pair_word(key)))
    }

    #[inline(always)]
    fn port_word(key: &PortKey) -> u64 {
        u64::from(u32::from_le_bytes(key.table))
            | u64::from(key.proto) << 32
            | u64::from(key._pad) << 40
            | u64::from(u16::from_le_bytes(key.port)) << 48
    }

    #[inline(always)]
    pub fn hash_port(key: &PortKey) -> u32 {
        finish(mix(3, port_word(key)))
    }

    // Keys are compared as words: a byte-wise compare is a loop (or a call) in a BPF program.
    #[inline(always)]
    fn same_v4(a: &[u8; 4], b: &[u8; 4]) -> bool {
        u32::from_le_bytes(*a) == u32::from_le_bytes(*b)
    }

    #[inline(always)]
    fn same_v6(a: &[u8; 16], b: &[u8; 16]) -> bool {
        word(a, 0) == word(b, 0) && word(a, 8) == word(b, 8)
    }

    #[inline(always)]
    fn same_pair(a: &PairKey, b: &PairKey) -> bool {
        pair_word(a) == pair_word(b)
    }

    #[inline(always)]
    fn same_port(a: &PortKey, b: &PortKey) -> bool {
        port_word(a) == port_word(b)
    }

    /// What a bucket says about a key.
    pub enum Probe<V> {
        Found(V),
        /// The bucket has a free entry: the key is in no later bucket.
        Absent,
        /// The bucket is full without the key: try the next one.
        Next,
    }

    /// What a table says about a key.
    pub enum Lookup<V> {
        Found(V),
        /// Not in the table, nor anywhere else.
        Absent,
        /// Every bucket probed was full without the key: it may be in the fallback map.
        Crowded,
    }

    /// A bucket of one table; the kernel and the daemon share the code over it.
    pub trait Bucket: Copy + Default {
        type Key: Copy;
        type Value: Copy;
        /// Keys per bucket.
        const ENTRIES: u32;
        /// The hash that picks a key's home bucket.
        fn hash(key: &Self::Key) -> u32;
        fn probe(&self, key: &Self::Key) -> Probe<Self::Value>;
        /// Puts `key` in a free entry; `false` when the bucket is full.
        fn place(&mut self, key: &Self::Key, value: Self::Value) -> bool;
        /// The header element of a table of `buckets` buckets.
        fn header(buckets: u32) -> Self;
        /// The bucket mask a header holds.
        fn mask(&self) -> u32;
        /// Calls `each` with every key the bucket holds.
        fn for_each(&self, each: impl FnMut(Self::Key, Self::Value));
    }

    /// `key` in the table whose element `i` is `element(i)`. An element that cannot be read
    /// sends the lookup to the fallback map.
    #[inline(always)]
    pub fn find<'a, B: Bucket + 'a>(
        key: &B::Key,
        element: impl Fn(u32) -> Option<&'a B>,
    ) -> Lookup<B::Value> {
        find_with(B::hash(key), element, |bucket| bucket.probe(key))
    }

    /// [`find`] for an IPv6 host given as its two little-endian words: the entries' keys are
    /// compared as words too. The generic compare cannot know where a key sits, and builds
    /// each word from eight byte loads, over a hundred BPF instructions a probed bucket.
    #[inline(always)]
    pub fn find_v6<'a>(
        words: [u64; 2],
        element: impl Fn(u32) -> Option<&'a HostBucketV6>,
    ) -> Lookup<AddrInfo> {
        find_with(hash_v6_words(words), element, |bucket| {
            bucket.probe_words(words)
        })
    }

    #[inline(always)]
    fn find_with<'a, B: Bucket + 'a>(
        hash: u32,
        element: impl Fn(u32) -> Option<&'a B>,
        probe: impl Fn(&B) -> Probe<B::Value>,
    ) -> Lookup<B::Value> {
        let Some(header) = element(0) else {
            return Lookup::Crowded;
        };
        let mask = header.mask();
        let mut bucket = hash & mask;
        for _ in 0..MAX_PROBES {
            let Some(found) = element(index(bucket)) else {
                return Lookup::Crowded;
            };
            match probe(found) {
                Probe::Found(value) => return Lookup::Found(value),
                Probe::Absent => return Lookup::Absent,
                Probe::Next => bucket = (bucket + 1) & mask,
            }
        }
        Lookup::Crowded
    }

    macro_rules! bucket {
        ($bucket:ident, $entry:ident, $key:ty, $value:ty, $hash:ident, $same:ident) => {
            impl Bucket for $bucket {
                type Key = $key;
                type Value = $value;
                const ENTRIES: u32 = Self::ENTRY_COUNT as u32;

                #[inline(always)]
                fn hash(key: &$key) -> u32 {
                    $hash(key)
                }

                /// Entries are filled from the first and never removed, so the first free one
                /// ends the search: one branch per entry, which keeps the verifier's work small.
                #[inline(always)]
                fn probe(&self, key: &$key) -> Probe<$value> {
                    for entry in &self.entries {
                        if entry.used == 0 {
                            return Probe::Absent;
                        }
                        if $same(&entry.key, key) {
                            return Probe::Found(entry.value);
                        }
                    }
                    Probe::Next
                }

                fn place(&mut self, key: &$key, value: $value) -> bool {
                    match self.entries.iter_mut().find(|entry| entry.used == 0) {
                        Some(entry) => {
                            // Field by field: the IPv6 entry has padding the others lack.
                            let mut placed = $entry::default();
                            placed.key = *key;
                            placed.value = value;
                            placed.used = 1;
                            *entry = placed;
                            true
                        }
                        None => false,
                    }
                }

                fn header(buckets: u32) -> Self {
                    let mut header = Self::default();
                    header.entries[0].used = buckets - 1;
                    header
                }

                #[inline(always)]
                fn mask(&self) -> u32 {
                    self.entries[0].used
                }

                fn for_each(&self, mut each: impl FnMut($key, $value)) {
                    for entry in self.entries.iter().filter(|entry| entry.used != 0) {
                        each(entry.key, entry.value);
                    }
                }
            }
        };
    }

    bucket!(
        HostBucketV4,
        HostEntryV4,
        [u8; 4],
        AddrInfo,
        hash_v4,
        same_v4
    );
    bucket!(
        HostBucketV6,
        HostEntryV6,
        [u8; 16],
        AddrInfo,
        hash_v6,
        same_v6
    );
    bucket!(
        PairBucket, PairEntry, PairKey, PairValue, hash_pair, same_pair
    );
    bucket!(
        PortBucket, PortEntry, PortKey, PortValue, hash_port, same_port
    );
}

/// Bucket of [`map_names::HOSTS_V4`] (see [`exact_table`]).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostBucketV4 {
    pub entries: [HostEntryV4; HostBucketV4::ENTRY_COUNT],
}

impl HostBucketV4 {
    pub const ENTRY_COUNT: usize = 4;
}

/// An IPv4 host and its segment and source class; `used` is 0 in a free entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostEntryV4 {
    pub key: [u8; 4],
    pub used: u32,
    pub value: AddrInfo,
}

/// Bucket of [`map_names::HOSTS_V6`] (see [`exact_table`]).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostBucketV6 {
    pub entries: [HostEntryV6; HostBucketV6::ENTRY_COUNT],
}

impl HostBucketV6 {
    pub const ENTRY_COUNT: usize = 2;

    /// [`exact_table::Bucket::probe`] for a key given as its two little-endian words (see
    /// [`exact_table::find_v6`]).
    #[inline(always)]
    pub fn probe_words(&self, words: [u64; 2]) -> exact_table::Probe<AddrInfo> {
        for entry in &self.entries {
            if entry.used == 0 {
                return exact_table::Probe::Absent;
            }
            if entry.key_words() == words {
                return exact_table::Probe::Found(entry.value);
            }
        }
        exact_table::Probe::Next
    }
}

/// 8-aligned, which changes neither its size nor where its fields are, so that its key can be
/// read as two words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostEntryV6 {
    pub key: [u8; 16],
    pub used: u32,
    pub _pad: u32,
    pub value: AddrInfo,
}

impl HostEntryV6 {
    /// The key as two words ([`leading_words`]).
    #[inline(always)]
    pub fn key_words(&self) -> [u64; 2] {
        const {
            assert!(
                core::mem::size_of::<HostEntryV6>() == 32
                    && core::mem::offset_of!(HostEntryV6, key) == 0
                    && core::mem::offset_of!(HostEntryV6, value) == 24
            );
        }
        leading_words(self)
    }
}

/// Bucket of [`map_names::PAIRS`] (see [`exact_table`]).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairBucket {
    pub entries: [PairEntry; PairBucket::ENTRY_COUNT],
    pub _pad: u32,
}

impl PairBucket {
    pub const ENTRY_COUNT: usize = 3;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairEntry {
    pub key: PairKey,
    pub value: PairValue,
    pub used: u32,
}

/// Bucket of [`map_names::PORTS_EXACT`] (see [`exact_table`]).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortBucket {
    pub entries: [PortEntry; PortBucket::ENTRY_COUNT],
}

impl PortBucket {
    pub const ENTRY_COUNT: usize = 4;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortEntry {
    pub key: PortKey,
    pub value: PortValue,
    pub used: u32,
}

/// One line of [`map_names::FLOW_FILTER`].
pub type FlowFilterLine = [u8; flow_filter::LINE_BYTES as usize];

/// Value of [`map_names::FLOW_FILTER_STATE`]. All zero (as loaded): the filter is neither set
/// nor used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowFilterState {
    /// [`flow_filter::ENABLED`], [`flow_filter::SECOND_HALF_ACTIVE`].
    pub flags: u32,
    /// Lines per half (a power of two); 0 until the daemon sets up the filter, and programs set
    /// bytes only when it is not.
    pub lines: u32,
}

/// Value of [`map_names::CLOCK`]: the programs' clock, CLOCK_MONOTONIC_COARSE (the daemon's), as
/// a function of the jiffies counter. Reading jiffies is one load, which the verifier inlines;
/// the coarse clock's helper call costs some 20 ns a packet on CPUs whose mitigations make every
/// call and return dear. Both advance at the timer tick, and the kernel derives jiffies from the
/// monotonic clock in steps of exactly one tick, so `jiffies × tick_ns + offset_ns` is the
/// coarse clock to within the tick's interrupt latency, except that after an idle period it can
/// lag it by up to one tick (the daemon allows for that when it sweeps). All zero (as loaded):
/// not calibrated, and the programs read the coarse clock with the helper.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    /// The kernel's tick (`TICK_NSEC`: 1e9 / CONFIG_HZ, rounded); 0 when not calibrated.
    pub tick_ns: u64,
    /// Added to `jiffies × tick_ns`, wrapping (it is usually "negative").
    pub offset_ns: u64,
}

impl Clock {
    /// The time at `jiffies`, in ns of CLOCK_MONOTONIC_COARSE.
    #[inline(always)]
    pub fn at(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.tick_ns)
            .wrapping_add(self.offset_ns)
    }
}

/// Key of the fragment-tracking hash: one IP datagram.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Value of the fragment-tracking hash: the first fragment passed at `first_seen_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentState {
    pub first_seen_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain only integers and have no implicit
    // padding (explicit `_pad` fields fill the gaps).
    unsafe impl aya::Pod for AddrInfo {}
    unsafe impl aya::Pod for SegmentInfo {}
    unsafe impl aya::Pod for PairKey {}
    unsafe impl aya::Pod for PairValue {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PortValue {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Clock {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for FlowFilterState {}
    unsafe impl aya::Pod for HostBucketV4 {}
    unsafe impl aya::Pod for HostBucketV6 {}
    unsafe impl aya::Pod for PairBucket {}
    unsafe impl aya::Pod for PortBucket {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentState {}
    unsafe impl aya::Pod for PairVerdictKey {}
    unsafe impl aya::Pod for PairCount {}
    unsafe impl aya::Pod for EventLimiterKey {}
    unsafe impl aya::Pod for RecentEvent {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for BenchFlow {}
    unsafe impl aya::Pod for BreakglassKey {}
    unsafe impl aya::Pod for BreakglassValue {}
    unsafe impl aya::Pod for QuarantineKey {}
}
