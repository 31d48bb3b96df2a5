//! The decision for one packet, the same for both directions: parse, follow fragments and
//! tracked flows, and judge new flows by the policy.
use enforcer_common::{Config, NO_RULE, counter};

use crate::{
    conntrack::{self, Tracked},
    counters, eth, fragments,
    maps::{CONFIG, SCRATCH},
    packet::{Flow, Frame, Parsed, Scratch},
    policy::{self, Judgement},
};

const EMPTY_FLOW: Flow = Flow {
    src: [0; 16],
    dst: [0; 16],
    quoted: enforcer_common::FlowKey {
        addr_a: [0; 16],
        addr_b: [0; 16],
        port_a: 0,
        port_b: 0,
        proto: 0,
        family: 0,
        _pad: [0; 2],
    },
    frag_id: 0,
    port: 0,
    sport: 0,
    dport: 0,
    family: 0,
    proto: 0,
    proto_key: 0,
    tcp_flags: 0,
    is_echo_request: false,
    has_quoted: false,
    first_fragment: false,
    frag_proto: 0,
};

/// The counter (and so the verdict) for `frame`, seen in direction `dir`.
#[inline(always)]
pub fn decide(frame: &Frame, dir: u32) -> Result<u32, ()> {
    let config = CONFIG.get(0).ok_or(())?;
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch slot; a program runs to completion on one CPU.
    let scratch: &mut Scratch = unsafe { &mut *scratch };
    scratch.flow = EMPTY_FLOW;
    let now = conntrack::now_ns();
    Ok(match eth::parse(frame, scratch) {
        Parsed::NonIp => counter::NON_IP,
        Parsed::Drop(reason) => reason,
        Parsed::LaterFragment => fragments::follow(&scratch.fragment, now, config),
        Parsed::Flow => {
            let (outcome, rule) = decide_flow(scratch, dir, now, config);
            if scratch.flow.first_fragment
                && !counter::is_drop(outcome)
                && !fragments::remember(&mut scratch.fragment, &scratch.flow, now)
            {
                return Ok(counter::DROP_CONNTRACK_FULL);
            }
            // Credited only once the packet is sure to pass.
            if outcome == counter::ALLOWED {
                counters::rule_hit(rule);
            }
            outcome
        }
    })
}

/// The counter for an IP packet, and the rule of a new flow it allows.
#[inline(always)]
fn decide_flow(scratch: &mut Scratch, dir: u32, now: u64, config: &Config) -> (u32, u32) {
    let flow = &scratch.flow;
    if flow.has_quoted && conntrack::is_tracked(&flow.quoted, now, config) {
        return (counter::RELATED, NO_RULE);
    }
    let key = &mut scratch.flow_key;
    let src_side = conntrack::fill_key(
        key,
        &flow.src,
        flow.sport,
        &flow.dst,
        flow.dport,
        flow.proto,
        flow.family,
    );
    match conntrack::track(key, src_side, flow, now, config) {
        Tracked::Pass => return (counter::ESTABLISHED, NO_RULE),
        Tracked::Revoked => return (counter::DROP_FLOW_REVOKED, NO_RULE),
        Tracked::Untracked => {}
    }
    let judgement = policy::judge(
        &flow.src,
        &flow.dst,
        flow.family,
        flow.proto_key,
        flow.port,
        dir,
        config,
    );
    let (admitted, rule) = match judgement {
        Judgement::Allowed { rule } => (counter::ALLOWED, rule),
        Judgement::Audit => (counter::AUDIT, NO_RULE),
        Judgement::Unenforced => (counter::UNENFORCED, NO_RULE),
        Judgement::Denied => return (counter::DROP_POLICY_DENIED, NO_RULE),
    };
    if conntrack::starts_flow(flow)
        && !conntrack::create(key, src_side, flow, admitted, rule, dir, now, config)
    {
        return (counter::DROP_CONNTRACK_FULL, NO_RULE);
    }
    (admitted, rule)
}
