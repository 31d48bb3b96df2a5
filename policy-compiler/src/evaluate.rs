//! The reference evaluator: a literal reading of the policy semantics (see [`crate::model`]).
//!
//! It shares nothing with [`crate::compile`] on purpose: differential tests compare the kernel
//! (running the compiled maps) with this code, so a compiler bug cannot hide in both.

use std::{collections::BTreeSet, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::model::{
    Intra, Mode, PROTO_ICMP, PROTO_ICMPV6, Policy, Rule, RuleKind, Segment, Source, WORLD,
    icmp_type_name, proto_name,
};
use crate::overrides::QUARANTINE;
use crate::prefix::Prefix;

/// A packet as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 = TCP, 17 = UDP, 1 = ICMP, 58 = ICMPv6, ...).
    pub proto: u8,
    /// TCP/UDP destination port or ICMP/ICMPv6 type; `None` without a transport header.
    pub port: Option<u16>,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
    Audit,
}

/// The verdict on a flow, and why.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct Decision {
    pub verdict: Verdict,
    /// Id of the rule that allowed the flow.
    pub rule: Option<String>,
    /// Global index of that rule (the kernel's per-rule counter index).
    pub rule_index: Option<u32>,
    /// The break-glass grant that allowed the flow (`rule` is then `breakglass/<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<u32>,
    pub src_segment: String,
    pub dst_segment: String,
    pub reason: String,
}

/// Where an endpoint of a flow sits for the policy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Placement<'a> {
    /// `None` for `world`.
    pub segment: Option<&'a Segment>,
    /// Moved into the quarantine segment at run time: rules naming a CIDR do not match it.
    pub quarantined: bool,
}

impl Policy {
    /// The segment holding `addr`: the one with the most specific member prefix containing it.
    fn segment_of(&self, addr: IpAddr) -> Option<&Segment> {
        let mut best: Option<(Prefix, &Segment)> = None;
        for segment in &self.segments {
            for prefix in &segment.members {
                let longer = best
                    .is_none_or(|(best_prefix, _)| prefix.prefix_len() > best_prefix.prefix_len());
                if prefix.contains_addr(addr) && longer {
                    best = Some((*prefix, segment));
                }
            }
        }
        best.map(|(_, segment)| segment)
    }

    /// Where `addr` sits: in [`QUARANTINE`] when it is among `quarantined`, whatever its
    /// prefixes say, else in the segment of its most specific member prefix.
    pub(crate) fn placement(&self, addr: IpAddr, quarantined: &BTreeSet<IpAddr>) -> Placement<'_> {
        if quarantined.contains(&addr) {
            Placement {
                segment: self.segment(QUARANTINE),
                quarantined: true,
            }
        } else {
            Placement {
                segment: self.segment_of(addr),
                quarantined: false,
            }
        }
    }

    /// Judges a flow exactly as the policy says.
    pub fn evaluate(&self, flow: &Flow) -> Decision {
        let nobody = BTreeSet::new();
        let src = self.placement(flow.src, &nobody);
        let dst = self.placement(flow.dst, &nobody);
        self.evaluate_placed(flow, src, dst)
    }

    /// Judges a flow between endpoints already placed in their segments.
    pub(crate) fn evaluate_placed(
        &self,
        flow: &Flow,
        src: Placement<'_>,
        dst: Placement<'_>,
    ) -> Decision {
        let src_segment = src.segment;
        let dst_segment = dst.segment;
        let src_name = src_segment.map_or(WORLD, |segment| segment.name.as_str());
        let dst_name = dst_segment.map_or(WORLD, |segment| segment.name.as_str());
        let decision = |verdict, rule: Option<&Rule>, reason: String| Decision {
            verdict,
            rule: rule.map(|rule| rule.id.clone()),
            rule_index: rule.map(|rule| rule.index),
            grant: None,
            src_segment: src_name.to_string(),
            dst_segment: dst_name.to_string(),
            reason,
        };
        let allowed_by = |rule: &Rule| {
            let reason = match &rule.reason {
                Some(reason) => format!("allowed by {}: {reason}", rule.id),
                None => format!("allowed by {}", rule.id),
            };
            decision(Verdict::Allow, Some(rule), reason)
        };

        let (mode, rule_indexes) = match dst_segment {
            Some(segment) => (segment.mode, segment.rules.as_slice()),
            None => (self.world_mode, self.world_rules.as_slice()),
        };
        if mode == Mode::Unenforced {
            let reason = format!("{WORLD} is not enforced ({} is in no segment)", flow.dst);
            return decision(Verdict::Allow, None, reason);
        }

        if let (Some(src), Some(dst)) = (src_segment, dst_segment)
            && src.name == dst.name
            && dst.intra == Intra::Allow
            && let Some(intra) = dst.intra_rule.and_then(|index| self.rule(index))
        {
            return allowed_by(intra);
        }

        for rule in rule_indexes.iter().filter_map(|&index| self.rule(index)) {
            let RuleKind::Allow { from, ports } = &rule.kind else {
                continue;
            };
            let source_matches = from.iter().any(|source| match source {
                Source::Any => true,
                Source::Segment(name) => name == src_name,
                // A quarantined source lost the trust its address range had.
                Source::Cidr(prefix) => !src.quarantined && prefix.contains_addr(flow.src),
            });
            let port_matches = ports.iter().any(|port| port.matches(flow.proto, flow.port));
            if source_matches && port_matches {
                return allowed_by(rule);
            }
        }

        let what = describe_traffic(flow.proto, flow.port);
        if mode == Mode::Monitor {
            let reason = format!(
                "no rule of {dst_name} allows {what} from {src_name} (monitor mode: passed, reported as audit)"
            );
            decision(Verdict::Audit, None, reason)
        } else {
            let reason = format!("no rule of {dst_name} allows {what} from {src_name}");
            decision(Verdict::Deny, None, reason)
        }
    }
}

/// `tcp/5432`, `icmp/echo-request`, `protocol 47`, ...
fn describe_traffic(proto: u8, port: Option<u16>) -> String {
    match (proto_name(proto), port) {
        (Some(name), Some(port)) if matches!(proto, PROTO_ICMP | PROTO_ICMPV6) => {
            match icmp_type_name(proto, port) {
                Some(type_name) => format!("{name}/{type_name}"),
                None => format!("{name}/{port}"),
            }
        }
        (Some(name), Some(port)) => format!("{name}/{port}"),
        (Some(name), None) => format!("{name} without port information"),
        (None, _) => format!("IP protocol {proto}"),
    }
}
