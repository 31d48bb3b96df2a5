//! Connection tracking, shared by the ingress and egress programs: a packet of a flow that an
//! admitted first packet created state for passes in either direction without a rule.
//!
//! The table is a preallocated hash, not an LRU: LRU eviction would silently forget flows
//! that were allowed, and drop their replies. When the table is full, a new flow that needs
//! state is dropped and counted (`conntrack_full`); tracked flows are unaffected.
//!
//! A flow admitted by a break-glass grant carries the grant's expiry and is judged again at
//! every packet from then on; when nothing allows it any more the packet is dropped
//! (`breakglass_expired`) and the state kept as it is, so the flow stays cut in both
//! directions without the daemon (see `policy_compiler::stateful`).
//!
//! Probes go through the filter in front of the table (`enforcer_common::flow_filter`) when
//! the daemon has enabled it: a 0 byte proves a flow untracked without the table's lookup.
use enforcer_common::{
    Config, FlowFilterState, FlowKey, FlowState, NO_RULE, counter, flow_filter, policy_change,
    proto_key, tcp_state, timeout,
};

use crate::{
    maps::{CONNTRACK, FLOW_FILTER, FLOW_FILTER_STATE, PolicySlot},
    packet::{Addr, Flow, Opaque},
    policy::{self, Judgement, Segments},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// The filter's state, read once per packet.
#[inline(always)]
pub fn filter_state() -> FlowFilterState {
    FLOW_FILTER_STATE.get(0).copied().unwrap_or_default()
}

/// Whether `key` may be in the table: `false` only when the filter is enabled and proves it is
/// not.
#[inline(always)]
fn may_be_tracked(hash: u32, filter: &FlowFilterState) -> bool {
    if filter.flags & flow_filter::ENABLED == 0 || filter.lines == 0 {
        return true;
    }
    let half = u32::from(filter.flags & flow_filter::SECOND_HALF_ACTIVE != 0);
    let (line, byte) = flow_filter::position(hash, half, filter.lines);
    match FLOW_FILTER.get(line) {
        Some(line) => line[byte as usize] != 0,
        None => true,
    }
}

/// Whether a packet is worth the filter's probe: anything but a TCP segment with ACK set, which
/// belongs to a connection in progress and nearly always finds its state, so that the filter
/// would only add its own probe to the table's. Skipping the filter is always correct.
#[inline(always)]
fn likely_untracked(proto: u8, tcp_flags: u8) -> bool {
    proto != proto_key::TCP || tcp_flags & TCP_ACK == 0
}

/// Sets `key`'s byte in both halves of the filter: before the flow is inserted, so that no
/// probe can find the flow in the table and its byte 0 (see `enforcer_common::flow_filter`).
#[inline(always)]
fn note_in_filter(key: &FlowKey, filter: &FlowFilterState) {
    if filter.lines == 0 {
        return;
    }
    let hash = flow_filter::hash(key);
    for half in 0..2 {
        let (line, byte) = flow_filter::position(hash, half, filter.lines);
        if let Some(line) = FLOW_FILTER.get_ptr_mut(line) {
            // SAFETY: a valid map value; other CPUs and the daemon only ever write 1 to its
            // bytes (the daemon zeroes a half only while no program writes it).
            unsafe { (*line)[byte as usize] = 1 };
        }
    }
}

/// Orders two endpoints: address (as big-endian numbers), then port.
#[inline(always)]
fn endpoint_le(a: &Addr, a_port: u16, b: &Addr, b_port: u16) -> bool {
    (a.half_be(0), a.half_be(1), a_port) <= (b.half_be(0), b.half_be(1), b_port)
}

/// Writes into `key` the canonical key of a packet from (`src`, `sport`) to (`dst`, `dport`),
/// and returns which side of the key the source is (0 = `a`, 1 = `b`).
#[inline(always)]
pub fn fill_key(
    key: &mut FlowKey,
    src: &Addr,
    sport: u16,
    dst: &Addr,
    dport: u16,
    proto: u8,
    family: u8,
) -> u8 {
    let src_is_a = endpoint_le(src, sport, dst, dport);
    if src_is_a {
        key.addr_a = src.0;
        key.port_a = sport;
        key.addr_b = dst.0;
        key.port_b = dport;
    } else {
        key.addr_a = dst.0;
        key.port_a = dport;
        key.addr_b = src.0;
        key.port_b = sport;
    }
    key.proto = proto;
    key.family = family;
    key._pad = [0; 2];
    if src_is_a { 0 } else { 1 }
}

#[inline(always)]
fn idle_timeout(state: &FlowState, proto: u8, config: &Config) -> u64 {
    let index = match proto {
        proto_key::TCP => match state.tcp {
            tcp_state::SYN_SENT => timeout::TCP_SYN,
            tcp_state::CLOSING => timeout::TCP_CLOSING,
            _ => timeout::TCP_ESTABLISHED,
        },
        proto_key::UDP => timeout::UDP,
        proto_key::ICMP | proto_key::ICMPV6 => timeout::ICMP,
        _ => timeout::OTHER,
    };
    config.timeouts_ns[index]
}

#[inline(always)]
fn expired(state: &FlowState, proto: u8, now: u64, config: &Config) -> bool {
    now.saturating_sub(state.last_seen_ns) > idle_timeout(state, proto, config)
}

/// Whether the break-glass grant that admitted the flow has ended (or was revoked).
#[inline(always)]
fn grant_expired(state: &FlowState, now: u64) -> bool {
    state.admitted == counter::BREAKGLASS as u8 && now >= state.breakglass_expires_ns
}

/// Whether `key` is a live tracked flow (for ICMP errors that quote it).
#[inline(always)]
pub fn is_tracked(key: &FlowKey, now: u64, config: &Config, filter: &FlowFilterState) -> bool {
    if !may_be_tracked(flow_filter::hash(key), filter) {
        return false;
    }
    // SAFETY: the value is only read.
    match unsafe { CONNTRACK.get(key) } {
        Some(state) => !expired(state, key.proto, now, config) && !grant_expired(state, now),
        None => false,
    }
}

pub enum Tracked {
    /// A packet of a live tracked flow: pass.
    Pass,
    /// The flow's rule is gone and the policy says recheck: drop, and the state is removed.
    Revoked,
    /// The break-glass grant `grant` that admitted the flow has ended and nothing else allows
    /// it: drop, and the state stays.
    GrantExpired { grant: u32 },
    /// No live state: judge the packet as a new flow.
    Untracked,
    /// A bare SYN on the addresses and ports of a closing connection: judge it as a new flow,
    /// whose state replaces the closing one if it is admitted (`create` with `replace`). A
    /// denied one leaves the closing state as it was (see [`flow_cache`] for why).
    Reopened,
}

/// The per-CPU flow cache in front of the table, `FLOW_CACHE` (see
/// `enforcer_common::FlowCacheEntry`).
///
/// An entry is filled only from the table, for an established flow admitted otherwise than by a
/// break-glass grant, and passes later packets that the table would pass too, without updating
/// it: TCP segments without FIN or RST that are not a bare SYN, and any packet of other
/// protocols. It is trusted only
/// - before `valid_until_ns`: at most [`FLOW_CACHE_WINDOW_NS`] and half the flow's shortest
///   idle timeout after the packet that last updated the flow, so the flow cannot have
///   expired meanwhile, for the programs or for the daemon's sweeper;
/// - under the policy generation it was filled under: a new policy's recheck goes through the
///   table;
/// - while `FLOW_CACHE_EPOCH` holds the value read before the table's lookup that filled it: the
///   daemon removes flows (a quarantine) and then, once no program that could have seen them
///   still runs, increments it.
///
/// Programs never remove a flow an entry may stand for: they remove only expired flows, and
/// flows a new policy revokes; a bare SYN that reopens a closing connection replaces its state
/// when admitted and leaves it when denied, as the table would then still pass the segments
/// of the old connection that an entry passes.
mod flow_cache {
    use enforcer_common::{
        Config, FLOW_CACHE_SLOTS, FLOW_CACHE_WINDOW_NS, FlowKey, FlowState, counter, proto_key,
        tcp_state, timeout,
    };

    use super::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, idle_timeout};
    use crate::maps::{FLOW_CACHE, FLOW_CACHE_EPOCH};

    /// The entry a key with filter hash `hash` uses.
    #[inline(always)]
    pub fn slot(hash: u32) -> u32 {
        hash & (FLOW_CACHE_SLOTS - 1)
    }

    /// The TCP flags that decide whether a segment may be passed by an entry.
    const DECIDING_FLAGS: u8 = TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK;

    /// Bit `f` is set when a segment whose deciding flags are `f` may be passed by an entry:
    /// no FIN, no RST, not a bare SYN. Packets of other protocols have no flags (bit 0).
    const ELIGIBLE: u32 = {
        let mut mask = 0u32;
        let mut flags = 0u8;
        while flags <= DECIDING_FLAGS {
            if flags & (TCP_FIN | TCP_RST) == 0 && flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
                mask |= 1 << flags;
            }
            flags += 1;
        }
        mask
    };

    /// The epoch, if the packet may be passed by an entry (and fill one): read before the
    /// table's lookup, which an entry filled with it must follow. The flags are tested by a
    /// shift, not by branches, after which the verifier would tell the flags' values apart
    /// in the rest of the program.
    #[inline(always)]
    pub fn epoch_for(tcp_flags: u8) -> Option<u32> {
        if (ELIGIBLE >> (tcp_flags & DECIDING_FLAGS)) & 1 != 0 {
            FLOW_CACHE_EPOCH.get(0).copied()
        } else {
            None
        }
    }

    /// Whether this CPU's entry `slot` passes the packet of `key`.
    #[inline(always)]
    pub fn passes(key: &FlowKey, slot: u32, now: u64, generation: u32, epoch: u32) -> bool {
        let Some(entry) = FLOW_CACHE.get_ptr(slot) else {
            return false;
        };
        // SAFETY: this CPU's element of a per-CPU array; a program runs to completion on it.
        let entry = unsafe { &*entry };
        let (a, b) = (entry.key.words(), key.words());
        let mut diff = 0;
        for i in 0..a.len() {
            diff |= a[i] ^ b[i];
        }
        diff == 0
            && now < entry.valid_until_ns
            && entry.generation == generation
            && entry.epoch == epoch
    }

    /// Fills this CPU's entry `slot` from `state`, which the packet has just updated, if the
    /// flow may be cached.
    #[inline(always)]
    pub fn remember(
        key: &FlowKey,
        slot: u32,
        epoch: u32,
        state: &FlowState,
        now: u64,
        config: &Config,
    ) {
        if state.tcp != tcp_state::ESTABLISHED || state.admitted == counter::BREAKGLASS as u8 {
            return;
        }
        let Some(entry) = FLOW_CACHE.get_ptr_mut(slot) else {
            return;
        };
        let shortest = if key.proto == proto_key::TCP {
            config.timeouts_ns[timeout::TCP_ESTABLISHED]
                .min(config.timeouts_ns[timeout::TCP_CLOSING])
        } else {
            idle_timeout(state, key.proto, config)
        };
        // SAFETY: as in `passes`.
        let entry = unsafe { &mut *entry };
        entry.key = *key;
        entry.valid_until_ns = now + FLOW_CACHE_WINDOW_NS.min(shortest / 2);
        entry.generation = config.generation;
        entry.epoch = epoch;
    }
}

/// Looks up the flow of a packet whose source is side `src_side` of `key`, and updates its
/// state (TCP progress, idle time, policy generation).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn track<P: PolicySlot>(
    key: &FlowKey,
    src_side: u8,
    flow: &Flow,
    now: u64,
    config: &Config,
    filter: &FlowFilterState,
    segments: &mut Segments,
    opaque: &mut Opaque,
) -> Tracked {
    let hash = flow_filter::hash(key);
    if likely_untracked(key.proto, flow.tcp_flags) && !may_be_tracked(hash, filter) {
        return Tracked::Untracked;
    }
    let slot = flow_cache::slot(hash);
    let epoch = flow_cache::epoch_for(flow.tcp_flags);
    if let Some(epoch) = epoch
        && flow_cache::passes(key, slot, now, config.generation, epoch)
    {
        return Tracked::Pass;
    }
    // Kept in memory, not in a register, to the end: the verifier would check the rest (a
    // recheck's judgement included) once for each value of the flag.
    // SAFETY: valid, aligned, exclusive references.
    unsafe {
        core::ptr::write_volatile(&mut opaque.cache_usable, u32::from(epoch.is_some()));
        core::ptr::write_volatile(&mut opaque.cache_epoch, epoch.unwrap_or(0));
    }
    let Some(state) = CONNTRACK.get_ptr_mut(key) else {
        return Tracked::Untracked;
    };
    // SAFETY: a valid map value; concurrent updates from other CPUs only race on
    // bookkeeping fields, never on the decision to pass.
    let state = unsafe { &mut *state };
    if expired(state, key.proto, now, config) {
        let _ = CONNTRACK.remove(key);
        return Tracked::Untracked;
    }
    if reopens(state, key.proto, flow.tcp_flags) {
        return Tracked::Reopened;
    }
    let grant_ended = grant_expired(state, now);
    let policy_changed = state.generation != config.generation;
    if grant_ended || (policy_changed && config.on_policy_change == policy_change::RECHECK) {
        // Kept in memory, not in a register, across the judgement: the verifier would check
        // the judgement once for each value of a flag it can see.
        // SAFETY: a valid, aligned, exclusive reference.
        unsafe { core::ptr::write_volatile(&mut opaque.grant_ended, u32::from(grant_ended)) };
        let judgement = recheck::<P>(key, state, now, config, segments, opaque);
        // SAFETY: as above.
        let grant_ended = unsafe { core::ptr::read_volatile(&opaque.grant_ended) } != 0;
        let (rule, admitted, expires_ns) = match judgement {
            Judgement::Denied if grant_ended => return Tracked::GrantExpired { grant: state.rule },
            Judgement::Denied => {
                let _ = CONNTRACK.remove(key);
                return Tracked::Revoked;
            }
            Judgement::Allowed { rule } => (rule, counter::ALLOWED, 0),
            Judgement::Breakglass { grant, expires_ns } => (grant, counter::BREAKGLASS, expires_ns),
            Judgement::Audit => (NO_RULE, counter::AUDIT, 0),
            Judgement::Unenforced => (NO_RULE, counter::UNENFORCED, 0),
        };
        state.rule = rule;
        state.admitted = admitted as u8;
        state.breakglass_expires_ns = expires_ns;
    }
    state.generation = config.generation;
    if key.proto == proto_key::TCP {
        let flags = flow.tcp_flags;
        if flags & TCP_RST != 0 {
            // Kept for the closing timeout: segments still in flight behind a reset (the
            // peer's data, its own RST) belong to the flow and must not be judged as new.
            state.tcp = tcp_state::CLOSING;
            state.last_seen_ns = now;
            return Tracked::Pass;
        }
        let from_initiator = src_side == state.initiator;
        if !from_initiator && state.tcp == tcp_state::SYN_SENT {
            state.tcp = tcp_state::ESTABLISHED;
        }
        if flags & TCP_FIN != 0 {
            state.fin_seen |= if from_initiator {
                tcp_state::FIN_FROM_INITIATOR
            } else {
                tcp_state::FIN_FROM_RESPONDER
            };
            if state.fin_seen == tcp_state::FIN_FROM_INITIATOR | tcp_state::FIN_FROM_RESPONDER {
                state.tcp = tcp_state::CLOSING;
            }
        }
    }
    state.last_seen_ns = now;
    // SAFETY: as above.
    let (usable, epoch) = unsafe {
        (
            core::ptr::read_volatile(&opaque.cache_usable),
            core::ptr::read_volatile(&opaque.cache_epoch),
        )
    };
    if usable != 0 {
        flow_cache::remember(key, slot, epoch, state, now, config);
    }
    Tracked::Pass
}

/// Whether a packet opens a new connection on the addresses and ports of a closing one: a
/// bare SYN, which is judged as a new flow rather than passed on the old flow's state.
#[inline(always)]
fn reopens(state: &FlowState, proto: u8, tcp_flags: u8) -> bool {
    proto == proto_key::TCP
        && state.tcp == tcp_state::CLOSING
        && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Judges a tracked flow again, as its first packet, under the current policy.
#[inline(always)]
fn recheck<P: PolicySlot>(
    key: &FlowKey,
    state: &FlowState,
    now: u64,
    config: &Config,
    segments: &mut Segments,
    opaque: &mut Opaque,
) -> Judgement {
    let (addr_a, addr_b) = Addr::of_key(key);
    let (initiator, responder) = if state.initiator == 0 {
        (addr_a, addr_b)
    } else {
        (addr_b, addr_a)
    };
    // Copied to one place: two pointers into the key, in either order, would have the
    // verifier check the judgement once for each.
    opaque.recheck_src = *initiator;
    opaque.recheck_dst = *responder;
    policy::judge::<P>(
        &opaque.recheck_src,
        &opaque.recheck_dst,
        key.family,
        state.policy_proto,
        state.policy_port,
        u32::from(state.direction),
        now,
        config,
        segments,
    )
}

/// Whether a packet admitted as a new flow starts tracked state: not a TCP RST or FIN, and for
/// ICMP only an echo request.
#[inline(always)]
pub fn starts_flow(flow: &Flow) -> bool {
    match flow.proto {
        proto_key::TCP => flow.tcp_flags & (TCP_RST | TCP_FIN) == 0,
        proto_key::ICMP | proto_key::ICMPV6 => flow.is_echo_request,
        _ => true,
    }
}

/// Creates state for a flow admitted under `admitted` (a pass counter) by `rule` (a grant id for
/// [`counter::BREAKGLASS`], which ends at `breakglass_expires_ns`). `false` when the table is
/// full.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn create(
    key: &FlowKey,
    src_side: u8,
    flow: &Flow,
    admitted: u32,
    rule: u32,
    breakglass_expires_ns: u64,
    direction: u32,
    now: u64,
    config: &Config,
    filter: &FlowFilterState,
    replace: bool,
) -> bool {
    let syn_only = flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let state = FlowState {
        last_seen_ns: now,
        generation: config.generation,
        rule,
        policy_port: flow.port,
        admitted: admitted as u8,
        initiator: src_side,
        tcp: if syn_only {
            tcp_state::SYN_SENT
        } else {
            tcp_state::ESTABLISHED
        },
        fin_seen: 0,
        policy_proto: flow.proto_key,
        direction: direction as u8,
        breakglass_expires_ns,
    };
    note_in_filter(key, filter);
    // A reopened flow's state is replaced; otherwise a flow another CPU created meanwhile
    // stays as it is.
    let flags = if replace { BPF_ANY } else { BPF_NOEXIST };
    match CONNTRACK.insert(key, state, flags) {
        Ok(()) => true,
        Err(error) => !replace && error == -EEXIST,
    }
}
