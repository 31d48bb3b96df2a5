//! The decision for one packet, the same for both directions: parse, follow fragments and
//! tracked flows, judge new flows by the policy of the active slot; then count it, and report
//! it as an event when it is a denial, an audit or (if asked for) an allowed new flow.
use enforcer_common::{Config, NO_RULE, PairVerdictKey, counter, event_flags, protocol_class};

use crate::{
    conntrack::{self, Tracked},
    counters, eth, events, fragments,
    maps::{ACTIVE, CONFIG, PolicySlot, SCRATCH, policy_slot},
    packet::{Flow, Frame, Parsed, Scratch},
    policy::{self, Judgement, Segments},
};

pub const EMPTY_FLOW: Flow = Flow {
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

/// Segment ids not looked up (yet).
const UNKNOWN: u32 = u32::MAX;

/// The counter (and so the verdict) for `frame`, seen in direction `dir` on `ifindex`.
#[inline(always)]
pub fn decide(frame: &Frame, dir: u32, ifindex: u32) -> Result<u32, ()> {
    // Read once: the whole decision uses one policy, whatever a reload does meanwhile.
    let slot = ACTIVE.get(0).copied().unwrap_or(0) & 1;
    let config = CONFIG.get(slot).ok_or(())?;
    let policy = policy_slot(slot);
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch slot; a program runs to completion on one CPU.
    let scratch: &mut Scratch = unsafe { &mut *scratch };
    scratch.flow = EMPTY_FLOW;
    let now = conntrack::now_ns();
    let mut segments = Segments {
        src: UNKNOWN,
        dst: UNKNOWN,
    };
    let (outcome, rule, is_flow) = match eth::parse(frame, scratch) {
        Parsed::NonIp => (counter::NON_IP, NO_RULE, false),
        Parsed::Drop(reason) => (reason, NO_RULE, false),
        Parsed::LaterFragment => (
            fragments::follow(&scratch.fragment, now, config),
            NO_RULE,
            false,
        ),
        Parsed::Flow => {
            let (outcome, rule) = decide_flow(&policy, scratch, dir, now, config, &mut segments);
            if scratch.flow.first_fragment
                && !counter::is_drop(outcome)
                && !fragments::remember(&mut scratch.fragment, &scratch.flow, now)
            {
                (counter::DROP_CONNTRACK_FULL, NO_RULE, true)
            } else {
                (outcome, rule, true)
            }
        }
    };
    if counter::is_drop(outcome) {
        let class = protocol_class::of(scratch.flow.proto, is_flow);
        counters::drop_by_protocol(dir, outcome, class);
    }
    if is_flow {
        account(
            &policy,
            scratch,
            config,
            dir,
            ifindex,
            now,
            outcome,
            rule,
            &mut segments,
        );
    }
    Ok(outcome)
}

/// Rule hits, segment-pair verdicts and the event of an IP packet whose outcome is final.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn account(
    policy: &PolicySlot,
    scratch: &mut Scratch,
    config: &Config,
    dir: u32,
    ifindex: u32,
    now: u64,
    outcome: u32,
    rule: u32,
    segments: &mut Segments,
) {
    // Credited only once the packet is sure to pass.
    if outcome == counter::ALLOWED {
        counters::rule_hit(policy, rule);
    }
    let judged = segments.src != UNKNOWN;
    if judged {
        counters::pair_verdict(&PairVerdictKey {
            generation: config.generation,
            src_segment: segments.src,
            dst_segment: segments.dst,
            direction: dir as u8,
            counter: outcome as u8,
            _pad: [0; 2],
        });
    }
    let reported = match outcome {
        counter::DROP_POLICY_DENIED
        | counter::DROP_FLOW_REVOKED
        | counter::DROP_CONNTRACK_FULL
        | counter::DROP_BREAKGLASS_EXPIRED
        | counter::AUDIT
        // A break-glass grant in use: always reported, it is audited.
        | counter::BREAKGLASS => true,
        counter::ALLOWED => config.event_flags & event_flags::REPORT_ALLOWED != 0,
        _ => false,
    };
    if !reported {
        return;
    }
    let flow = &scratch.flow;
    if !judged {
        segments.src = policy::lookup(policy, config, &flow.src, flow.family).segment;
        segments.dst = policy::lookup(policy, config, &flow.dst, flow.family).segment;
    }
    let event = &mut scratch.event;
    event.time_ns = now;
    event.src = flow.src;
    event.dst = flow.dst;
    event.rule = rule;
    event.src_segment = segments.src;
    event.dst_segment = segments.dst;
    event.ifindex = ifindex;
    event.generation = config.generation;
    event.sport = flow.sport;
    event.dport = flow.dport;
    event.proto = flow.proto;
    event.family = flow.family;
    event.direction = dir as u8;
    event.counter = outcome as u8;
    event.icmp_type = if flow.proto == 1 || flow.proto == 58 {
        flow.port as u8
    } else {
        0
    };
    events::emit(event, config.event_interval_ns);
}

/// The counter for an IP packet, and the rule (or break-glass grant) of a new flow it allows.
#[inline(always)]
fn decide_flow(
    policy: &PolicySlot,
    scratch: &mut Scratch,
    dir: u32,
    now: u64,
    config: &Config,
    segments: &mut Segments,
) -> (u32, u32) {
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
    match conntrack::track(policy, key, src_side, flow, now, config, segments) {
        Tracked::Pass => return (counter::ESTABLISHED, NO_RULE),
        Tracked::Revoked => return (counter::DROP_FLOW_REVOKED, NO_RULE),
        // The event names the grant that had admitted the flow.
        Tracked::GrantExpired { grant } => return (counter::DROP_BREAKGLASS_EXPIRED, grant),
        Tracked::Untracked => {}
    }
    let judgement = policy::judge(
        policy,
        &flow.src,
        &flow.dst,
        flow.family,
        flow.proto_key,
        flow.port,
        dir,
        now,
        config,
        segments,
    );
    let (admitted, rule, expires_ns) = match judgement {
        Judgement::Allowed { rule } => (counter::ALLOWED, rule, 0),
        Judgement::Breakglass { grant, expires_ns } => (counter::BREAKGLASS, grant, expires_ns),
        Judgement::Audit => (counter::AUDIT, NO_RULE, 0),
        Judgement::Unenforced => (counter::UNENFORCED, NO_RULE, 0),
        Judgement::Denied => return (counter::DROP_POLICY_DENIED, NO_RULE),
    };
    if conntrack::starts_flow(flow)
        && !conntrack::create(
            key, src_side, flow, admitted, rule, expires_ns, dir, now, config,
        )
    {
        return (counter::DROP_CONNTRACK_FULL, NO_RULE);
    }
    (admitted, rule)
}
