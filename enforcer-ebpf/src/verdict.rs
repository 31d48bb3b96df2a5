//! The decision for one packet, the same for both directions: parse, follow fragments and
//! tracked flows, judge new flows by the policy of the active slot; then count it, and report
//! it as an event when it is a denial, an audit or (if asked for) an allowed new flow.
use enforcer_common::{
    Config, EventLimiterKey, NO_RULE, PairVerdictKey, counter, event_flags, protocol_class,
};

use crate::{
    clock,
    conntrack::{self, Tracked},
    counters, eth, events, fragments,
    maps::{ACTIVE, CONFIG, PolicySlot, SCRATCH, Slot0, Slot1},
    packet::{Frame, Parsed, Scratch, opaque},
    policy::{self, Judgement, Segments},
};

/// Segment ids not looked up (yet).
const UNKNOWN: u32 = u32::MAX;

/// Returned by [`decide_ip`] when the program cannot read its own maps.
const ABORTED: u32 = u32::MAX;

/// Where a program sees packets: their direction, and the interface, which is read only for an
/// event (in XDP it is three dependent loads through the receive queue).
pub trait Hook: Copy {
    const DIR: u32;
    fn ifindex(self) -> u32;
}

/// The counter (and so the verdict) for `frame`, seen at `hook`.
#[inline(always)]
pub fn decide<H: Hook>(frame: &Frame, hook: H) -> Result<u32, ()> {
    // Read once: the whole decision uses one policy, whatever a reload does meanwhile.
    let slot = ACTIVE.get(0).copied().unwrap_or(0) & 1;
    let (start, end, len) = frame.parts();
    let outcome = if slot == 0 {
        decide_in::<Slot0, H>(start, end, len, hook)
    } else {
        decide_in::<Slot1, H>(start, end, len, hook)
    };
    if outcome == ABORTED {
        Err(())
    } else {
        Ok(outcome)
    }
}

/// The counter for the frame `[start, end)` of `len` bytes, judged by the policy in slot `P`;
/// [`ABORTED`] when a map cannot be read.
///
/// One copy per slot, each a separate function that takes only scalars (`hook` is the context
/// pointer): the maps of slot `P` are then constants in it, and the compiler cannot fold the
/// two copies back into one that picks its maps at run time. Parsing is inlined here rather
/// than called: on this kernel's CPUs every call returns through a mitigation thunk, some 10 ns
/// a call.
#[inline(never)]
fn decide_in<P: PolicySlot, H: Hook>(start: usize, end: usize, len: usize, hook: H) -> u32 {
    let dir = H::DIR;
    let (Some(config), Some(scratch)) = (CONFIG.get(P::INDEX), SCRATCH.get_ptr_mut(0)) else {
        return ABORTED;
    };
    // SAFETY: this CPU's scratch slot; a program runs to completion on one CPU.
    let scratch: &mut Scratch = unsafe { &mut *scratch };
    scratch.flow.clear();
    let now = clock::now_ns();
    let frame = Frame::new(start, end, len);
    let outcome = match eth::parse(&frame, scratch) {
        Parsed::NonIp => counter::NON_IP,
        Parsed::Drop(reason) => reason,
        Parsed::LaterFragment => fragments::follow(&scratch.fragment, now, config),
        Parsed::Flow => return decide_ip::<P, H>(scratch, config, hook, now),
    };
    if counter::is_drop(outcome) {
        let class = protocol_class::of(scratch.flow.proto, false);
        counters::drop_by_protocol(dir, outcome, class);
    }
    outcome
}

/// The counter for the IP packet parsed into `scratch`, judged by the policy in slot `P`, and
/// its accounting.
#[inline(always)]
fn decide_ip<P: PolicySlot, H: Hook>(
    scratch: &mut Scratch,
    config: &Config,
    hook: H,
    now: u64,
) -> u32 {
    let dir = H::DIR;
    let mut segments = Segments {
        src: UNKNOWN,
        dst: UNKNOWN,
    };
    let (outcome, rule) = decide_flow::<P>(scratch, dir, now, config, &mut segments);
    // Many paths end in a decision, most with constants: made opaque, they are accounted as one.
    let mut outcome = opaque(&mut scratch.opaque.outcome, outcome);
    let mut rule = opaque(&mut scratch.opaque.rule, rule);
    if scratch.flow.first_fragment
        && !counter::is_drop(outcome)
        && !fragments::remember(&mut scratch.fragment, &scratch.flow, now)
    {
        (outcome, rule) = (counter::DROP_CONNTRACK_FULL, NO_RULE);
    }
    if counter::is_drop(outcome) {
        let class = protocol_class::of(scratch.flow.proto, true);
        counters::drop_by_protocol(dir, outcome, class);
    }
    account::<P, H>(scratch, config, hook, now, outcome, rule, &mut segments);
    outcome
}

/// Rule hits, segment-pair verdicts and the event of an IP packet whose outcome is final.
#[inline(always)]
fn account<P: PolicySlot, H: Hook>(
    scratch: &mut Scratch,
    config: &Config,
    hook: H,
    now: u64,
    outcome: u32,
    rule: u32,
    segments: &mut Segments,
) {
    let dir = H::DIR;
    // Credited only once the packet is sure to pass.
    if outcome == counter::ALLOWED {
        counters::rule_hit::<P>(rule);
    }
    let judged = segments.src != UNKNOWN;
    if judged {
        counters::pair_verdict::<P>(&PairVerdictKey {
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
    let limiter_key = EventLimiterKey {
        src: flow.src.0,
        dst: flow.dst.0,
        dport: flow.dport,
        proto: flow.proto,
        counter: outcome as u8,
        _pad: 0,
    };
    if !events::admit(&limiter_key, now, config.event_interval_ns) {
        return;
    }
    if !judged {
        let quarantine = policy::quarantine_in_use();
        segments.src = policy::lookup::<P>(config, &flow.src, flow.family, quarantine).segment;
        segments.dst = policy::lookup::<P>(config, &flow.dst, flow.family, quarantine).segment;
    }
    let event = &mut scratch.event;
    event.time_ns = now;
    event.src = flow.src.0;
    event.dst = flow.dst.0;
    event.rule = rule;
    event.src_segment = segments.src;
    event.dst_segment = segments.dst;
    event.ifindex = hook.ifindex();
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
    events::send(event);
}

/// The counter for an IP packet, and the rule (or break-glass grant) of a new flow it allows.
#[inline(always)]
fn decide_flow<P: PolicySlot>(
    scratch: &mut Scratch,
    dir: u32,
    now: u64,
    config: &Config,
    segments: &mut Segments,
) -> (u32, u32) {
    let flow = &scratch.flow;
    let filter = conntrack::filter_state();
    if flow.has_quoted && conntrack::is_tracked(&flow.quoted, now, config, &filter) {
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
    let tracked = conntrack::track::<P>(
        key,
        src_side,
        flow,
        now,
        config,
        &filter,
        segments,
        &mut scratch.opaque,
    );
    match tracked {
        Tracked::Pass => return (counter::ESTABLISHED, NO_RULE),
        Tracked::Revoked => return (counter::DROP_FLOW_REVOKED, NO_RULE),
        // The event names the grant that had admitted the flow.
        Tracked::GrantExpired { grant } => return (counter::DROP_BREAKGLASS_EXPIRED, grant),
        Tracked::Untracked | Tracked::Reopened => {}
    }
    // Kept in memory across the judgement: the verifier would check it once for each value.
    let reopened = opaque(
        &mut scratch.opaque.reopened,
        u32::from(matches!(tracked, Tracked::Reopened)),
    ) != 0;
    let judgement = policy::judge::<P>(
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
            key, src_side, flow, admitted, rule, expires_ns, dir, now, config, &filter, reopened,
        )
    {
        return (counter::DROP_CONNTRACK_FULL, NO_RULE);
    }
    (admitted, rule)
}
