//! Map declarations. Layouts are defined in `enforcer-common`; sizes here are placeholders that
//! the loader replaces with sizes computed from the compiled policy.
//!
//! The policy maps exist in two slots; [`ACTIVE`] says which one judges packets, so a reload
//! can fill the other slot and switch in one write (see [`PolicySlot`]).
use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, RingBuf},
};
use enforcer_common::{
    AddrInfo, BREAKGLASS_MAX_PAIRS, BreakglassKey, BreakglassValue, Clock, Config,
    DEFAULT_MAX_ENTRIES, FLOW_CACHE_SLOTS, FlowCacheEntry, FlowFilterLine, FlowFilterState,
    FlowKey, FlowState, FragmentKey, FragmentState, HostBucketV4, HostBucketV6, PAIR_COUNT_SLOTS,
    PairBucket, PairCount, PairKey, PairValue, PairVerdictKey, PortBucket, PortKey, PortValue,
    QUARANTINE_MAX_ENTRIES, QuarantineKey, RECENT_EVENT_SLOTS, RecentEvent, SegmentInfo, counter,
    direction, event_counter, protocol_class,
};

use crate::packet::Scratch;

// The exact-match tables are arrays sized by the loader (see `enforcer_common::exact_table`);
// memory-mapping makes their elements start on a page, so every bucket is one cache line. The
// tries and the pair table's overflow are allocated per entry: they follow the policy, and an
// inactive slot, emptied after a switch, costs nothing there.
macro_rules! policy_slot {
    ($slot:ident, $index:literal, $hosts_v4:ident, $hosts_v6:ident, $blocks_v4:ident,
     $blocks_v6:ident, $addr_v4:ident,
     $addr_v6:ident, $segments:ident, $pairs:ident, $pairs_overflow:ident, $ports_exact:ident,
     $ports:ident, $rule_hits:ident, $breakglass:ident, $pair_counts:ident) => {
        #[map]
        pub static $hosts_v4: Array<HostBucketV4> =
            Array::with_max_entries(DEFAULT_MAX_ENTRIES, BPF_F_MMAPABLE);
        #[map]
        pub static $hosts_v6: Array<HostBucketV6> =
            Array::with_max_entries(DEFAULT_MAX_ENTRIES, BPF_F_MMAPABLE);
        #[map]
        pub static $blocks_v4: Array<HostBucketV4> =
            Array::with_max_entries(DEFAULT_MAX_ENTRIES, BPF_F_MMAPABLE);
        #[map]
        pub static $blocks_v6: Array<HostBucketV6> =
            Array::with_max_entries(DEFAULT_MAX_ENTRIES, BPF_F_MMAPABLE);
        #[map]
        pub static $addr_v4: LpmTrie<[u8; 4], AddrInfo> =
            LpmTrie::with_max_entries(DEFAULT_MAX_ENTRIES, 0);
        #[map]
        pub static $addr_v6: LpmTrie<[u8; 16], AddrInfo> =
            LpmTrie::with_max_entries(DEFAULT_MAX_ENTRIES, 0);
        #[map]
        pub static $segments: Array<SegmentInfo> = Array::with_max_entries(DEFAULT_MAX_ENTRIES, 0);
        #[map]
        pub static $pairs: Array<PairBucket> =
            Array::with_max_entries(DEFAULT_MAX_ENTRIES, BPF_F_MMAPABLE);
        #[map]
        pub static $pairs_overflow: HashMap<PairKey, PairValue> =
            HashMap::with_max_entries(DEFAULT_MAX_ENTRIES, BPF_F_NO_PREALLOC);
        #[map]
        pub static $ports_exact: Array<PortBucket> =
            Array::with_max_entries(DEFAULT_MAX_ENTRIES, BPF_F_MMAPABLE);
        #[map]
        pub static $ports: LpmTrie<PortKey, PortValue> =
            LpmTrie::with_max_entries(DEFAULT_MAX_ENTRIES, 0);
        #[map]
        pub static $rule_hits: PerCpuArray<u64> =
            PerCpuArray::with_max_entries(DEFAULT_MAX_ENTRIES, 0);
        #[map]
        pub static $breakglass: HashMap<BreakglassKey, BreakglassValue> =
            HashMap::with_max_entries(BREAKGLASS_MAX_PAIRS, 0);
        #[map]
        pub static $pair_counts: PerCpuArray<PairCount> =
            PerCpuArray::with_max_entries(PAIR_COUNT_SLOTS, 0);

        impl_policy_slot!(
            $slot,
            $index,
            $hosts_v4,
            $hosts_v6,
            $blocks_v4,
            $blocks_v6,
            $addr_v4,
            $addr_v6,
            $segments,
            $pairs,
            $pairs_overflow,
            $ports_exact,
            $ports,
            $rule_hits,
            $breakglass,
            $pair_counts
        );
    };
}

/// The maps of one policy slot, as a type: code generic over it names each map as a constant,
/// which lets the verifier inline the hash and array lookups. A slot chosen at run time (a
/// struct of map references) makes every lookup a helper call through a function pointer.
pub trait PolicySlot {
    /// The slot's index in `CONFIG` and `ACTIVE`.
    const INDEX: u32;
    fn hosts_v4() -> &'static Array<HostBucketV4>;
    fn hosts_v6() -> &'static Array<HostBucketV6>;
    fn blocks_v4() -> &'static Array<HostBucketV4>;
    fn blocks_v6() -> &'static Array<HostBucketV6>;
    fn addr_v4() -> &'static LpmTrie<[u8; 4], AddrInfo>;
    fn addr_v6() -> &'static LpmTrie<[u8; 16], AddrInfo>;
    fn segments() -> &'static Array<SegmentInfo>;
    fn pairs() -> &'static Array<PairBucket>;
    fn pairs_overflow() -> &'static HashMap<PairKey, PairValue>;
    fn ports_exact() -> &'static Array<PortBucket>;
    fn ports() -> &'static LpmTrie<PortKey, PortValue>;
    fn rule_hits() -> &'static PerCpuArray<u64>;
    fn breakglass() -> &'static HashMap<BreakglassKey, BreakglassValue>;
    fn pair_counts() -> &'static PerCpuArray<PairCount>;
}

macro_rules! impl_policy_slot {
    ($slot:ident, $index:literal, $hosts_v4:ident, $hosts_v6:ident, $blocks_v4:ident,
     $blocks_v6:ident, $addr_v4:ident,
     $addr_v6:ident, $segments:ident, $pairs:ident, $pairs_overflow:ident, $ports_exact:ident,
     $ports:ident, $rule_hits:ident, $breakglass:ident, $pair_counts:ident) => {
        pub struct $slot;

        impl PolicySlot for $slot {
            const INDEX: u32 = $index;
            #[inline(always)]
            fn hosts_v4() -> &'static Array<HostBucketV4> {
                &$hosts_v4
            }
            #[inline(always)]
            fn hosts_v6() -> &'static Array<HostBucketV6> {
                &$hosts_v6
            }
            #[inline(always)]
            fn blocks_v4() -> &'static Array<HostBucketV4> {
                &$blocks_v4
            }
            #[inline(always)]
            fn blocks_v6() -> &'static Array<HostBucketV6> {
                &$blocks_v6
            }
            #[inline(always)]
            fn addr_v4() -> &'static LpmTrie<[u8; 4], AddrInfo> {
                &$addr_v4
            }
            #[inline(always)]
            fn addr_v6() -> &'static LpmTrie<[u8; 16], AddrInfo> {
                &$addr_v6
            }
            #[inline(always)]
            fn segments() -> &'static Array<SegmentInfo> {
                &$segments
            }
            #[inline(always)]
            fn pairs() -> &'static Array<PairBucket> {
                &$pairs
            }
            #[inline(always)]
            fn pairs_overflow() -> &'static HashMap<PairKey, PairValue> {
                &$pairs_overflow
            }
            #[inline(always)]
            fn ports_exact() -> &'static Array<PortBucket> {
                &$ports_exact
            }
            #[inline(always)]
            fn ports() -> &'static LpmTrie<PortKey, PortValue> {
                &$ports
            }
            #[inline(always)]
            fn rule_hits() -> &'static PerCpuArray<u64> {
                &$rule_hits
            }
            #[inline(always)]
            fn breakglass() -> &'static HashMap<BreakglassKey, BreakglassValue> {
                &$breakglass
            }
            #[inline(always)]
            fn pair_counts() -> &'static PerCpuArray<PairCount> {
                &$pair_counts
            }
        }
    };
}

// Slot 0 and its maps.
policy_slot!(
    Slot0,
    0,
    HOSTS_V4_0,
    HOSTS_V6_0,
    BLOCKS_V4_0,
    BLOCKS_V6_0,
    ADDR_V4_0,
    ADDR_V6_0,
    SEGMENTS_0,
    PAIRS_0,
    PAIRS_OVERFLOW_0,
    PORTS_EXACT_0,
    PORTS_0,
    RULE_HITS_0,
    BREAKGLASS_0,
    PAIR_COUNTS_0
);
// Slot 1 and its maps.
policy_slot!(
    Slot1,
    1,
    HOSTS_V4_1,
    HOSTS_V6_1,
    BLOCKS_V4_1,
    BLOCKS_V6_1,
    ADDR_V4_1,
    ADDR_V6_1,
    SEGMENTS_1,
    PAIRS_1,
    PAIRS_OVERFLOW_1,
    PORTS_EXACT_1,
    PORTS_1,
    RULE_HITS_1,
    BREAKGLASS_1,
    PAIR_COUNTS_1
);

/// The slot that judges packets.
#[map]
pub static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// The programs' clock (see `clock`); written by the daemon.
#[map]
pub static CLOCK: Array<Clock> = Array::with_max_entries(1, 0);

/// The settings of the policy in each slot.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(2, 0);

/// Quarantined addresses, whatever the slot: `CONFIG[slot]` says which segment and source class
/// they are judged as. Written rarely, so allocated per entry rather than up front.
#[map]
pub static QUARANTINE: HashMap<QuarantineKey, u32> =
    HashMap::with_max_entries(QUARANTINE_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Non-zero while `QUARANTINE` may hold an address (see `map_names::QUARANTINE_IN_USE`).
#[map]
pub static QUARANTINE_IN_USE: Array<u32> = Array::with_max_entries(1, 0);

/// Per slot, non-zero while its break-glass map may hold a grant (see
/// `map_names::BREAKGLASS_IN_USE`).
#[map]
pub static BREAKGLASS_IN_USE: Array<u32> = Array::with_max_entries(2, 0);

#[map]
pub static CONNTRACK: HashMap<FlowKey, FlowState> =
    HashMap::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

/// See `enforcer_common::FlowCacheEntry` and `conntrack`.
#[map]
pub static FLOW_CACHE: PerCpuArray<FlowCacheEntry> =
    PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

#[map]
pub static FLOW_CACHE_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// See `enforcer_common::flow_filter`. Memory-mapped by the daemon, which rebuilds halves of
/// it; sized by the loader from the connection table's.
#[map]
pub static FLOW_FILTER: Array<FlowFilterLine> = Array::with_max_entries(128, BPF_F_MMAPABLE);

#[map]
pub static FLOW_FILTER_STATE: Array<FlowFilterState> = Array::with_max_entries(1, 0);

#[map]
pub static FRAGMENTS: HashMap<FragmentKey, FragmentState> =
    HashMap::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(direction::COUNT * counter::COUNT, 0);

#[map]
pub static DROPS_BY_PROTOCOL: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(direction::COUNT * counter::COUNT * protocol_class::COUNT, 0);

/// The segment-pair counts a slot's `PAIR_COUNTS` table had no element for (see
/// `counters::pair_verdict`).
#[map]
pub static PAIR_VERDICTS: PerCpuHashMap<PairVerdictKey, u64> =
    PerCpuHashMap::with_max_entries(65_536, 0);

/// Events for the daemon (see `events`). 4 MiB: about 58,000 events of backlog.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// The event rate limiter (see `enforcer_common::RECENT_EVENT_SLOTS`).
#[map]
pub static RECENT_EVENTS: PerCpuArray<RecentEvent> =
    PerCpuArray::with_max_entries(RECENT_EVENT_SLOTS, 0);

#[map]
pub static EVENT_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(event_counter::COUNT, 0);

/// Working memory of the packet being judged (see `packet::Scratch`).
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
