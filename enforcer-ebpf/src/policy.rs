//! The verdict: two address lookups, one pair lookup, one port lookup. See
//! `enforcer_common` for why this needs no loop over rules.
use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{
    AddrInfo, CLASS_WORLD, PORT_KEY_FIXED_BITS, PairKey, PortKey, SEGMENT_WORLD, segment_mode,
};

use crate::{
    maps::{ADDR_V4, ADDR_V6, PAIRS, PORTS, SEGMENTS},
    packet::{Addrs, Flow},
};

pub enum Judgement {
    Allowed { rule: u32 },
    Audit,
    Unenforced,
    Denied,
}

const WORLD: AddrInfo = AddrInfo {
    segment: SEGMENT_WORLD,
    class: CLASS_WORLD,
};

#[inline(always)]
fn lookup_v4(addr: [u8; 4]) -> AddrInfo {
    ADDR_V4.get(Key::new(32, addr)).copied().unwrap_or(WORLD)
}

#[inline(always)]
fn lookup_v6(addr: [u8; 16]) -> AddrInfo {
    ADDR_V6.get(Key::new(128, addr)).copied().unwrap_or(WORLD)
}

#[inline(always)]
pub fn judge(flow: &Flow) -> Judgement {
    let (src, dst) = match flow.addrs {
        Addrs::V4 { src, dst } => (lookup_v4(src), lookup_v4(dst)),
        Addrs::V6 { src, dst } => (lookup_v6(src), lookup_v6(dst)),
    };
    let mode = SEGMENTS
        .get(dst.segment)
        .map_or(segment_mode::ENFORCE, |info| info.mode);
    if mode == segment_mode::UNENFORCED {
        return Judgement::Unenforced;
    }
    let pair = PairKey {
        dst_segment: dst.segment,
        src_class: src.class,
    };
    // SAFETY: the value is copied out at once; the map entry may be replaced concurrently.
    if let Some(table) = unsafe { PAIRS.get(&pair) }.map(|v| v.port_table) {
        let key = Key::new(
            PORT_KEY_FIXED_BITS + 16,
            PortKey::new(table, flow.proto_key, flow.port),
        );
        if let Some(hit) = PORTS.get(key) {
            return Judgement::Allowed { rule: hit.rule };
        }
    }
    if mode == segment_mode::MONITOR {
        Judgement::Audit
    } else {
        Judgement::Denied
    }
}
