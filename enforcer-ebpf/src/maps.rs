//! Map declarations. Layouts are defined in `enforcer-common`; sizes here are placeholders that
//! the loader replaces with sizes computed from the compiled policy.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray},
};
use enforcer_common::{
    AddrInfo, Config, DEFAULT_MAX_ENTRIES, FlowKey, FlowState, FragmentKey, FragmentState, PairKey,
    PairValue, PortKey, PortValue, SegmentInfo, counter, direction,
};

use crate::packet::Scratch;

#[map]
pub static ADDR_V4: LpmTrie<[u8; 4], AddrInfo> = LpmTrie::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

#[map]
pub static ADDR_V6: LpmTrie<[u8; 16], AddrInfo> = LpmTrie::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

#[map]
pub static SEGMENTS: Array<SegmentInfo> = Array::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

#[map]
pub static PAIRS: HashMap<PairKey, PairValue> = HashMap::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

#[map]
pub static PORTS: LpmTrie<PortKey, PortValue> = LpmTrie::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static CONNTRACK: HashMap<FlowKey, FlowState> =
    HashMap::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

#[map]
pub static FRAGMENTS: HashMap<FragmentKey, FragmentState> =
    HashMap::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(direction::COUNT * counter::COUNT, 0);

#[map]
pub static RULE_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DEFAULT_MAX_ENTRIES, 0);

/// Working memory of the packet being judged (see `packet::Scratch`).
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
