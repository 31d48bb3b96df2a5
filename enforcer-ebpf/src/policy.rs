//! The policy verdict for a flow's first packet: two address lookups, one pair lookup, one port
//! lookup. An address is probed in the quarantine (only while a host is quarantined), then in
//! the host table, on a miss in the block table where the slot uses one, and only then in the
//! prefix trie; a port in the single-port table, and
//! only on a miss in the range trie. The tables are `enforcer_common::exact_table`s; a key
//! they had no room for is in their fallback map. See `enforcer_common` for why this needs no
//! loop over rules. Only a packet the policy would deny or audit costs one more lookup, and
//! only while the slot holds a grant: the break-glass grants of its segment pair.
use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{
    AddrInfo, BREAKGLASS_ANY_PROTO, BREAKGLASS_MAX_RANGES, BreakglassKey, CLASS_WILDCARD,
    CLASS_WORLD, Config, PORT_EXACT_PREFIX, PairKey, PortKey, QuarantineKey, SEGMENT_WORLD,
    block_mask_v4, block_mask_v6, direction,
    exact_table::{self, Lookup},
    lookup_flags, segment_mode, wildcard_bit,
};

use crate::{
    maps::{BREAKGLASS_IN_USE, PolicySlot, QUARANTINE, QUARANTINE_IN_USE},
    packet::Addr,
};

#[derive(Clone, Copy)]
pub enum Judgement {
    Allowed {
        rule: u32,
    },
    /// Allowed by break-glass grant `grant`, which ends at `expires_ns`.
    Breakglass {
        grant: u32,
        expires_ns: u64,
    },
    Audit,
    Unenforced,
    Denied,
}

const WORLD: AddrInfo = AddrInfo {
    segment: SEGMENT_WORLD,
    class: CLASS_WORLD,
};

/// What a judgement found out about the packet's segments.
#[derive(Clone, Copy)]
pub struct Segments {
    pub src: u32,
    pub dst: u32,
}

/// The segment and source class of `addr` (IPv4 in the first 4 bytes when `family` is 4): the
/// quarantine segment's when it is in `QUARANTINE`, else its longest member prefix's.
/// `QUARANTINE` is probed only when `quarantine_in_use` (read once per packet) says so.
#[inline(always)]
pub fn lookup<P: PolicySlot>(
    config: &Config,
    addr: &Addr,
    family: u8,
    quarantine_in_use: bool,
) -> AddrInfo {
    // Read whole once for either family: built from the `[u8; 16]`, each word or IPv4 address
    // costs a load and a shift per byte.
    let words = addr.words_le();
    let addr = &addr.0;
    // The key is built only when probed: even its padding costs a call to `memset`.
    if quarantine_in_use && is_quarantined(addr, family) {
        return AddrInfo {
            segment: config.quarantine_segment,
            class: config.quarantine_class,
        };
    }
    // A host entry is the longest match there can be; the tries hold only shorter prefixes
    // (and the rare host its table had no room for). The block table, where in use, holds
    // what the longest of those says over each block; the trie holds them all too, so a block
    // the table had no room for is found there.
    let found = if family == 4 {
        // The first four bytes: the low half of the first little-endian word.
        let word = words[0] as u32;
        let in_trie = match exact_table::find(&word.to_le_bytes(), |i| P::hosts_v4().get(i)) {
            Lookup::Found(info) => return info,
            Lookup::Absent if config.lookup_flags & lookup_flags::V4_PREFIXES == 0 => false,
            Lookup::Absent if config.block_len_v4 != 0 => {
                let block = (word & block_mask_v4(config.block_len_v4)).to_le_bytes();
                match exact_table::find(&block, |i| P::blocks_v4().get(i)) {
                    Lookup::Found(info) => return info,
                    Lookup::Absent => {
                        config.lookup_flags & lookup_flags::V4_PREFIXES_OUTSIDE_BLOCKS != 0
                    }
                    Lookup::Crowded => true,
                }
            }
            Lookup::Absent | Lookup::Crowded => true,
        };
        if !in_trie {
            return WORLD;
        }
        P::addr_v4().get(Key::new(32, word.to_le_bytes())).copied()
    } else {
        let in_trie = match exact_table::find_v6(words, |i| P::hosts_v6().get(i)) {
            Lookup::Found(info) => return info,
            Lookup::Absent if config.lookup_flags & lookup_flags::V6_PREFIXES == 0 => false,
            Lookup::Absent if config.block_len_v6 != 0 => {
                let mask = block_mask_v6(config.block_len_v6);
                let block = [words[0] & mask[0], words[1] & mask[1]];
                match exact_table::find_v6(block, |i| P::blocks_v6().get(i)) {
                    Lookup::Found(info) => return info,
                    Lookup::Absent => {
                        config.lookup_flags & lookup_flags::V6_PREFIXES_OUTSIDE_BLOCKS != 0
                    }
                    Lookup::Crowded => true,
                }
            }
            Lookup::Absent | Lookup::Crowded => true,
        };
        if !in_trie {
            return WORLD;
        }
        P::addr_v6().get(Key::new(128, *addr)).copied()
    };
    found.unwrap_or(WORLD)
}

/// Whether `QUARANTINE` may hold an address; an unreadable flag counts as "in use".
#[inline(always)]
pub fn quarantine_in_use() -> bool {
    QUARANTINE_IN_USE.get(0).is_none_or(|in_use| *in_use != 0)
}

#[inline(always)]
fn is_quarantined(addr: &[u8; 16], family: u8) -> bool {
    let key = QuarantineKey {
        addr: *addr,
        family,
        _pad: [0; 3],
    };
    // SAFETY: only the presence of the entry is read.
    unsafe { QUARANTINE.get(key) }.is_some()
}

/// Judges a packet from `src` to `dst` with policy protocol key `proto_key` and port `port`,
/// seen in `dir` at `now` (for break-glass expiry). Egress is judged by the destination's allow-list too, so both
/// ends of a connection check the same rule; `config.egress_mode` says whether it is.
/// Egress that is not enforced is not judged at all, and its segments are not looked up
/// (`segments` stays as it was).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn judge<P: PolicySlot>(
    src: &Addr,
    dst: &Addr,
    family: u8,
    proto_key: u8,
    port: u16,
    dir: u32,
    now: u64,
    config: &Config,
    segments: &mut Segments,
) -> Judgement {
    if dir == direction::EGRESS && config.egress_mode == segment_mode::UNENFORCED {
        return Judgement::Unenforced;
    }
    let quarantine = quarantine_in_use();
    let (src, dst) = (
        lookup::<P>(config, src, family, quarantine),
        lookup::<P>(config, dst, family, quarantine),
    );
    segments.src = src.segment;
    segments.dst = dst.segment;
    let judgement = judge_destination::<P>(src, dst, proto_key, port, now);
    if dir == direction::EGRESS
        && config.egress_mode == segment_mode::MONITOR
        && matches!(judgement, Judgement::Denied)
    {
        return Judgement::Audit;
    }
    judgement
}

#[inline(always)]
fn judge_destination<P: PolicySlot>(
    src: AddrInfo,
    dst: AddrInfo,
    proto_key: u8,
    port: u16,
    now: u64,
) -> Judgement {
    let (mode, no_wildcard_rules) = P::segments()
        .get(dst.segment)
        .map_or((segment_mode::ENFORCE, 0), |info| {
            (info.mode, info.no_wildcard_rules)
        });
    if mode == segment_mode::UNENFORCED {
        return Judgement::Unenforced;
    }
    // The source class's own table first, then the destination's wildcard table if it has one:
    // on a gateway most denied packets would otherwise pay for that probe's cache misses.
    let classes = if no_wildcard_rules & wildcard_bit(proto_key) != 0 {
        1
    } else {
        2
    };
    for src_class in [src.class, CLASS_WILDCARD].into_iter().take(classes) {
        let pair = PairKey {
            dst_segment: dst.segment,
            src_class,
        };
        let table = match exact_table::find(&pair, |i| P::pairs().get(i)) {
            Lookup::Found(table) => Some(table),
            Lookup::Absent => None,
            // SAFETY: the value is copied out at once.
            Lookup::Crowded => unsafe { P::pairs_overflow().get(pair) }.copied(),
        };
        if let Some(table) = table {
            let key = PortKey::new(table.port_table, proto_key, port);
            let in_trie = match exact_table::find(&key, |i| P::ports_exact().get(i)) {
                Lookup::Found(hit) => return Judgement::Allowed { rule: hit.rule },
                Lookup::Absent => table.has_ranges != 0,
                Lookup::Crowded => true,
            };
            if in_trie && let Some(hit) = P::ports().get(Key::new(PORT_EXACT_PREFIX, key)) {
                return Judgement::Allowed { rule: hit.rule };
            }
        }
    }
    // Probed unless the slot has no grant; an unreadable flag counts as "in use".
    let grants_in_use = BREAKGLASS_IN_USE
        .get(P::INDEX)
        .is_none_or(|in_use| *in_use != 0);
    if grants_in_use
        && let Some(judgement) = breakglass::<P>(src.segment, dst.segment, proto_key, port, now)
    {
        return judgement;
    }
    if mode == segment_mode::MONITOR {
        Judgement::Audit
    } else {
        Judgement::Denied
    }
}

/// The first live break-glass range of the segment pair that matches the packet: the grant
/// with the lowest id, as the ranges are sorted by grant.
#[inline(always)]
fn breakglass<P: PolicySlot>(
    src_segment: u32,
    dst_segment: u32,
    proto_key: u8,
    port: u16,
    now: u64,
) -> Option<Judgement> {
    let key = BreakglassKey {
        src_segment,
        dst_segment,
    };
    // SAFETY: the value is only read. A grant or revocation replaces the whole value at once.
    let grants = unsafe { P::breakglass().get(key) }?;
    let count = grants.count as usize;
    for index in 0..BREAKGLASS_MAX_RANGES {
        if index >= count {
            break;
        }
        let range = &grants.ranges[index];
        let matches = range.proto == BREAKGLASS_ANY_PROTO
            || (range.proto == proto_key && range.first <= port && port <= range.last);
        if matches && now < range.expires_ns {
            return Some(Judgement::Breakglass {
                grant: range.grant,
                expires_ns: range.expires_ns,
            });
        }
    }
    None
}
