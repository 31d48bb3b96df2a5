//! The policy verdict for a flow's first packet: two address lookups, one pair lookup, one port
//! lookup. See `enforcer_common` for why this needs no loop over rules.
use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{
    AddrInfo, CLASS_WORLD, Config, PORT_KEY_FIXED_BITS, PairKey, PortKey, SEGMENT_WORLD, direction,
    segment_mode,
};

use crate::maps::{ADDR_V4, ADDR_V6, PAIRS, PORTS, SEGMENTS};

#[derive(Clone, Copy)]
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

/// The segment and source class of `addr` (IPv4 in the first 4 bytes when `family` is 4).
#[inline(always)]
fn lookup(addr: &[u8; 16], family: u8) -> AddrInfo {
    let found = if family == 4 {
        ADDR_V4.get(Key::new(32, [addr[0], addr[1], addr[2], addr[3]]))
    } else {
        ADDR_V6.get(Key::new(128, *addr))
    };
    found.copied().unwrap_or(WORLD)
}

/// Judges a packet from `src` to `dst` with policy protocol key `proto_key` and port `port`,
/// seen in `dir`. Egress is judged by the destination's allow-list too, so both
/// ends of a connection check the same rule; `config.egress_mode` says whether it is.
#[inline(always)]
pub fn judge(
    src: &[u8; 16],
    dst: &[u8; 16],
    family: u8,
    proto_key: u8,
    port: u16,
    dir: u32,
    config: &Config,
) -> Judgement {
    if dir == direction::EGRESS && config.egress_mode == segment_mode::UNENFORCED {
        return Judgement::Unenforced;
    }
    let judgement = judge_destination(lookup(src, family), lookup(dst, family), proto_key, port);
    if dir == direction::EGRESS
        && config.egress_mode == segment_mode::MONITOR
        && matches!(judgement, Judgement::Denied)
    {
        return Judgement::Audit;
    }
    judgement
}

#[inline(always)]
fn judge_destination(src: AddrInfo, dst: AddrInfo, proto_key: u8, port: u16) -> Judgement {
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
    // SAFETY: the value is copied out at once.
    if let Some(table) = unsafe { PAIRS.get(pair) }.map(|v| v.port_table) {
        let key = Key::new(
            PORT_KEY_FIXED_BITS + 16,
            PortKey::new(table, proto_key, port),
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
