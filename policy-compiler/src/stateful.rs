//! The reference model of the kernel programs as a whole: the packet parser, connection
//! tracking, fragment tracking and the policy, for a sequence of packets seen on ingress or
//! egress. It is the specification the differential tests hold the kernel to: one expected
//! outcome (a counter of `enforcer_common::counter`) per packet.
//!
//! - A later fragment passes when its datagram's first fragment passed (within the fragment
//!   timeout), else it is dropped (`fragment_no_state`).
//! - An ICMP error whose quoted packet belongs to a tracked flow passes (`related`).
//! - A packet of a tracked flow passes in either direction (`established`). TCP: a RST, or FINs
//!   from both sides, start the short closing timeout (so segments still in flight pass); a
//!   bare SYN on a closing flow is judged as a new flow, whose state replaces the closing one
//!   when it is admitted (a denied one leaves the closing state as it was). With
//!   `on_policy_change: recheck`, a flow is judged again, as its first packet, on its first
//!   packet after a policy load; if its rule is gone the state is removed and the packet dropped
//!   (`flow_revoked`).
//! - A flow admitted by a break-glass grant carries the grant's expiry. At its first packet from
//!   then on (or after the daemon revoked the grant, see [`StatefulEvaluator::expire_grant_flows`])
//!   it is judged again, as its first packet; when nothing allows it now the packet is dropped
//!   (`breakglass_expired`) and the state stays, unrefreshed, so that every later packet in
//!   either direction is judged the same way until the state idles out: removing it would let
//!   the responder's next packet, leaving through unenforced egress, recreate the flow. Such a
//!   flow is no longer `related` to ICMP errors.
//! - Any other packet is judged by the policy and its run-time overrides (egress only when
//!   `egress` is not unenforced; a denial on monitored egress is audit). When it passes and starts a flow (not a TCP RST or
//!   FIN; for ICMP only an echo request), state is created; if the table is full the packet is
//!   dropped (`conntrack_full`). A first fragment that passes is remembered, or dropped
//!   (`conntrack_full`) when the fragment table is full.
use std::collections::HashMap;

use enforcer_common::{FlowKey, FragmentKey, counter, direction, tcp_state};

use crate::{
    Flow, Mode, OnPolicyChange, Overrides, Policy, Verdict,
    packet::{DropReason, FrameOutcome, Packet, flow_key, parse_frame, widen},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What happened to one packet: the counter it is counted under (which says whether it passed)
/// and, for a new flow allowed by a rule, the rule's global index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketOutcome {
    pub counter: u32,
    pub rule: Option<u32>,
}

impl PacketOutcome {
    fn of(counter: u32) -> Self {
        PacketOutcome {
            counter,
            rule: None,
        }
    }

    pub fn passed(&self) -> bool {
        !counter::is_drop(self.counter)
    }
}

#[derive(Clone, Debug)]
struct ConnState {
    last_seen_ns: u64,
    generation: u32,
    /// 0 when endpoint `a` of the key started the flow.
    initiator: u8,
    tcp: u8,
    fin_seen: u8,
    /// The admitting packet as the policy judged it, and where.
    admitted_flow: Flow,
    direction: u32,
    /// (id, expiry) of the break-glass grant that admitted the flow.
    grant: Option<(u32, u64)>,
}

impl ConnState {
    fn grant_expired(&self, now_ns: u64) -> bool {
        self.grant
            .is_some_and(|(_, expires_ns)| now_ns >= expires_ns)
    }
}

enum Judgement {
    Allowed(u32),
    Breakglass { grant: u32, expires_ns: u64 },
    Audit,
    Unenforced,
    Denied,
}

/// The reference model's state: a loaded policy and the connection and fragment tables.
pub struct StatefulEvaluator {
    policy: Policy,
    generation: u32,
    conntrack: HashMap<FlowKey, ConnState>,
    fragments: HashMap<FragmentKey, u64>,
    overrides: Overrides,
    now_ns: u64,
}

impl StatefulEvaluator {
    pub fn new(policy: Policy) -> Self {
        StatefulEvaluator {
            policy,
            generation: 1,
            conntrack: HashMap::new(),
            fragments: HashMap::new(),
            overrides: Overrides::default(),
            now_ns: 0,
        }
    }

    /// Loads a new policy; tracked flows stay (see `on_policy_change`).
    pub fn load(&mut self, policy: Policy) {
        self.policy = policy;
        self.generation += 1;
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Sets the run-time overrides (quarantine, break-glass) in force from now on. The tracked
    /// flows and fragments of an address that becomes quarantined are forgotten, as the daemon
    /// removes their kernel state: its established connections are cut at once, and its next
    /// packets are judged as the quarantine segment's.
    pub fn set_overrides(&mut self, overrides: Overrides) {
        let newly_quarantined: Vec<([u8; 16], u8)> = overrides
            .quarantined
            .difference(&self.overrides.quarantined)
            .map(|addr| widen(*addr))
            .collect();
        if !newly_quarantined.is_empty() {
            let involves = |addr_a: &[u8; 16], addr_b: &[u8; 16], family: u8| {
                newly_quarantined
                    .iter()
                    .any(|(addr, f)| *f == family && (addr == addr_a || addr == addr_b))
            };
            self.conntrack
                .retain(|key, _| !involves(&key.addr_a, &key.addr_b, key.family));
            self.fragments
                .retain(|key, _| !involves(&key.src, &key.dst, key.family));
        }
        self.overrides = overrides;
    }

    /// Sets the clock that idle timeouts are measured against.
    pub fn set_time_ns(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
    }

    /// Tracked flows.
    pub fn tracked_flows(&self) -> usize {
        self.conntrack.len()
    }

    /// The run-time overrides in force.
    pub fn overrides(&self) -> &Overrides {
        &self.overrides
    }

    /// What the daemon does to the flows of a grant it revokes (after removing the grant from
    /// the overrides): their expiry becomes 0, so their next packet is judged again. Returns
    /// how many flows the grant admitted.
    pub fn expire_grant_flows(&mut self, grant: u32) -> usize {
        let mut expired = 0;
        for state in self.conntrack.values_mut() {
            if let Some((id, expires_ns)) = &mut state.grant
                && *id == grant
            {
                *expires_ns = 0;
                expired += 1;
            }
        }
        expired
    }

    /// Removes idle flows, as the daemon's periodic sweep does; returns how many.
    pub fn sweep_expired(&mut self) -> usize {
        let before = self.conntrack.len();
        let now = self.now_ns;
        let expired: Vec<FlowKey> = self
            .conntrack
            .iter()
            .filter(|(key, state)| {
                now.saturating_sub(state.last_seen_ns) > self.idle_timeout_ns(state, key.proto)
            })
            .map(|(key, _)| *key)
            .collect();
        for key in &expired {
            self.conntrack.remove(key);
        }
        before - self.conntrack.len()
    }

    /// The outcome for `frame` seen in `dir` (`enforcer_common::direction`).
    pub fn process(&mut self, frame: &[u8], dir: u32) -> PacketOutcome {
        match parse_frame(frame) {
            FrameOutcome::NonIp => PacketOutcome::of(counter::NON_IP),
            FrameOutcome::Drop(reason) => PacketOutcome::of(match reason {
                DropReason::Malformed => counter::DROP_MALFORMED,
                DropReason::UnsupportedEncap => counter::DROP_UNSUPPORTED_ENCAP,
                DropReason::FragmentOverlap => counter::DROP_FRAGMENT_OVERLAP,
                DropReason::FragmentTooSmall => counter::DROP_FRAGMENT_TOO_SMALL,
                DropReason::TooManyExtHeaders => counter::DROP_TOO_MANY_EXT_HEADERS,
            }),
            FrameOutcome::LaterFragment(key) => PacketOutcome::of(self.follow_fragment(&key)),
            FrameOutcome::Ip(packet) => {
                let outcome = self.decide(&packet, dir);
                match packet.first_fragment {
                    Some((id, proto)) if outcome.passed() => {
                        if self.remember_fragment(&packet, id, proto) {
                            outcome
                        } else {
                            PacketOutcome::of(counter::DROP_CONNTRACK_FULL)
                        }
                    }
                    _ => outcome,
                }
            }
        }
    }

    fn follow_fragment(&mut self, key: &FragmentKey) -> u32 {
        let timeout = self
            .policy
            .settings()
            .timeouts
            .fragment
            .saturating_mul(1_000_000_000);
        match self.fragments.get(key) {
            Some(first_seen) if self.now_ns.saturating_sub(*first_seen) <= timeout => {
                counter::FRAGMENT
            }
            Some(_) => {
                self.fragments.remove(key);
                counter::DROP_FRAGMENT_NO_STATE
            }
            None => counter::DROP_FRAGMENT_NO_STATE,
        }
    }

    fn remember_fragment(&mut self, packet: &Packet, id: u32, proto: u8) -> bool {
        let (src, family) = widen(packet.flow.src);
        let (dst, _) = widen(packet.flow.dst);
        let key = FragmentKey {
            src,
            dst,
            id,
            proto,
            family,
            _pad: [0; 2],
        };
        let capacity = self.policy.settings().fragments_max_entries as usize;
        if !self.fragments.contains_key(&key) && self.fragments.len() >= capacity {
            return false;
        }
        self.fragments.insert(key, self.now_ns);
        true
    }

    fn judge(&self, flow: &Flow, dir: u32) -> Judgement {
        let egress_mode = self.policy.settings().egress;
        if dir == direction::EGRESS && egress_mode == Mode::Unenforced {
            return Judgement::Unenforced;
        }
        let decision = self
            .policy
            .evaluate_with(flow, &self.overrides, self.now_ns);
        if let Some(grant) = decision.grant {
            let expires_ns = self
                .overrides
                .grants
                .iter()
                .find(|candidate| candidate.id == grant)
                .map_or(0, |granting| granting.expires_ns);
            return Judgement::Breakglass { grant, expires_ns };
        }
        match (decision.verdict, decision.rule_index) {
            (Verdict::Allow, Some(rule)) => Judgement::Allowed(rule),
            (Verdict::Allow, None) => Judgement::Unenforced,
            (Verdict::Audit, _) => Judgement::Audit,
            (Verdict::Deny, _) if dir == direction::EGRESS && egress_mode == Mode::Monitor => {
                Judgement::Audit
            }
            (Verdict::Deny, _) => Judgement::Denied,
        }
    }

    fn idle_timeout_ns(&self, state: &ConnState, proto: u8) -> u64 {
        let timeouts = &self.policy.settings().timeouts;
        let seconds = match proto {
            6 => match state.tcp {
                tcp_state::SYN_SENT => timeouts.tcp_syn,
                tcp_state::CLOSING => timeouts.tcp_closing,
                _ => timeouts.tcp_established,
            },
            17 => timeouts.udp,
            1 | 58 => timeouts.icmp,
            _ => timeouts.other,
        };
        seconds.saturating_mul(1_000_000_000)
    }

    fn is_tracked(&self, key: &FlowKey) -> bool {
        self.conntrack.get(key).is_some_and(|state| {
            self.now_ns.saturating_sub(state.last_seen_ns) <= self.idle_timeout_ns(state, key.proto)
                && !state.grant_expired(self.now_ns)
        })
    }

    fn decide(&mut self, packet: &Packet, dir: u32) -> PacketOutcome {
        if let Some(quoted) = &packet.quoted
            && self.is_tracked(quoted)
        {
            return PacketOutcome::of(counter::RELATED);
        }
        let (src, family) = widen(packet.flow.src);
        let (dst, _) = widen(packet.flow.dst);
        let (key, src_side) = flow_key(
            &src,
            packet.sport,
            &dst,
            packet.dport,
            packet.flow.proto,
            family,
        );
        let reopened = match self.track(&key, src_side, packet) {
            Tracked::Outcome(outcome) => return PacketOutcome::of(outcome),
            Tracked::Untracked => false,
            Tracked::Reopened => true,
        };
        let mut grant = None;
        let (admitted, rule) = match self.judge(&packet.flow, dir) {
            Judgement::Allowed(rule) => (counter::ALLOWED, Some(rule)),
            Judgement::Breakglass {
                grant: id,
                expires_ns,
            } => {
                grant = Some((id, expires_ns));
                (counter::BREAKGLASS, None)
            }
            Judgement::Audit => (counter::AUDIT, None),
            Judgement::Unenforced => (counter::UNENFORCED, None),
            Judgement::Denied => return PacketOutcome::of(counter::DROP_POLICY_DENIED),
        };
        if starts_flow(packet) {
            let capacity = self.policy.settings().conntrack_max_entries as usize;
            // A reopened flow's state is replaced, which needs no room.
            if !reopened && self.conntrack.len() >= capacity {
                return PacketOutcome::of(counter::DROP_CONNTRACK_FULL);
            }
            let syn_only = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            self.conntrack.insert(
                key,
                ConnState {
                    last_seen_ns: self.now_ns,
                    generation: self.generation,
                    initiator: src_side,
                    tcp: if syn_only {
                        tcp_state::SYN_SENT
                    } else {
                        tcp_state::ESTABLISHED
                    },
                    fin_seen: 0,
                    admitted_flow: packet.flow,
                    direction: dir,
                    grant,
                },
            );
        }
        PacketOutcome {
            counter: admitted,
            rule,
        }
    }

    /// The outcome for a packet of a live tracked flow.
    fn track(&mut self, key: &FlowKey, src_side: u8, packet: &Packet) -> Tracked {
        let Some(state) = self.conntrack.get(key).cloned() else {
            return Tracked::Untracked;
        };
        if self.now_ns.saturating_sub(state.last_seen_ns) > self.idle_timeout_ns(&state, key.proto)
        {
            self.conntrack.remove(key);
            return Tracked::Untracked;
        }
        if key.proto == 6
            && state.tcp == tcp_state::CLOSING
            && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        {
            return Tracked::Reopened;
        }
        Tracked::Outcome(self.track_live(key, src_side, packet, state))
    }

    /// [`Self::track`] for a flow whose state is live and not reopened.
    fn track_live(
        &mut self,
        key: &FlowKey,
        src_side: u8,
        packet: &Packet,
        mut state: ConnState,
    ) -> u32 {
        let grant_expired = state.grant_expired(self.now_ns);
        let policy_changed = state.generation != self.generation;
        if grant_expired
            || (policy_changed
                && self.policy.settings().on_policy_change == OnPolicyChange::Recheck)
        {
            match self.judge(&state.admitted_flow, state.direction) {
                // Kept as it is: see the module documentation.
                Judgement::Denied if grant_expired => {
                    return counter::DROP_BREAKGLASS_EXPIRED;
                }
                Judgement::Denied => {
                    self.conntrack.remove(key);
                    return counter::DROP_FLOW_REVOKED;
                }
                Judgement::Breakglass { grant, expires_ns } => {
                    state.grant = Some((grant, expires_ns));
                }
                Judgement::Allowed(_) | Judgement::Audit | Judgement::Unenforced => {
                    state.grant = None;
                }
            }
        }
        state.generation = self.generation;
        if key.proto == 6 {
            let flags = packet.tcp_flags;
            if flags & TCP_RST != 0 {
                state.tcp = tcp_state::CLOSING;
                state.last_seen_ns = self.now_ns;
                self.conntrack.insert(*key, state);
                return counter::ESTABLISHED;
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
        state.last_seen_ns = self.now_ns;
        self.conntrack.insert(*key, state);
        counter::ESTABLISHED
    }
}

/// What the connection table says about a packet.
enum Tracked {
    /// A packet of a live tracked flow, with its outcome.
    Outcome(u32),
    /// No live state: judged as a new flow.
    Untracked,
    /// A bare SYN on a closing TCP flow: judged as a new flow, whose state replaces the closing
    /// one if it is admitted; a denied one leaves the closing state as it was.
    Reopened,
}

fn starts_flow(packet: &Packet) -> bool {
    match packet.flow.proto {
        6 => packet.tcp_flags & (TCP_RST | TCP_FIN) == 0,
        1 | 58 => packet.is_echo_request,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// An Ethernet + IPv4 + TCP frame.
    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
        frame.extend_from_slice(&src);
        frame.extend_from_slice(&dst);
        let mut header = [0u8; 20];
        header[0..2].copy_from_slice(&sport.to_be_bytes());
        header[2..4].copy_from_slice(&dport.to_be_bytes());
        header[12] = 5 << 4;
        header[13] = flags;
        frame.extend_from_slice(&header);
        frame
    }

    fn quarantining(addr: [u8; 4]) -> Overrides {
        let mut overrides = Overrides::default();
        overrides
            .quarantined
            .insert(std::net::IpAddr::V4(Ipv4Addr::from(addr)));
        overrides
    }

    #[test]
    fn quarantining_a_host_cuts_its_flows_and_only_its() {
        let policy = Policy::from_sources(&[(
            "pacs.yaml".into(),
            "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: [10.10.0.0/24]\n    ports: [tcp/104]\n"
                .into(),
        )])
        .unwrap();
        let mut model = StatefulEvaluator::new(policy);
        let (ws, other, pacs) = ([10, 10, 0, 20], [10, 10, 0, 21], [10, 30, 0, 10]);
        let ingress = direction::INGRESS;
        for host in [ws, other] {
            let syn = model.process(&tcp(host, pacs, 40000, 104, TCP_SYN), ingress);
            assert_eq!(syn.counter, counter::ALLOWED);
        }
        assert_eq!(model.tracked_flows(), 2);
        let ack = tcp(ws, pacs, 40000, 104, TCP_ACK);
        assert_eq!(model.process(&ack, ingress).counter, counter::ESTABLISHED);

        model.set_overrides(quarantining(ws));
        assert_eq!(
            model.tracked_flows(),
            1,
            "the quarantined host's flow is cut"
        );
        // Its next packet is judged afresh, as the quarantine segment's: denied.
        assert_eq!(
            model.process(&ack, ingress).counter,
            counter::DROP_POLICY_DENIED
        );
        let reply = tcp(pacs, ws, 104, 40000, TCP_ACK);
        assert_eq!(
            model.process(&reply, direction::INGRESS).counter,
            counter::DROP_POLICY_DENIED
        );
        // The other host's flow goes on.
        let other_ack = tcp(other, pacs, 40000, 104, TCP_ACK);
        assert_eq!(
            model.process(&other_ack, ingress).counter,
            counter::ESTABLISHED
        );
        // Setting the same overrides again cuts nothing more; releasing the host restores its
        // segment for new flows.
        model.set_overrides(quarantining(ws));
        assert_eq!(model.tracked_flows(), 1);
        model.set_overrides(Overrides::default());
        let syn = model.process(&tcp(ws, pacs, 40001, 104, TCP_SYN), ingress);
        assert_eq!(syn.counter, counter::ALLOWED);
    }
}
