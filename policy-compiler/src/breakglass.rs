//! Break-glass grants in the specification and in the kernel's layout.
//!
//! Semantics (the reference evaluator applies them in [`Policy::evaluate_with`], the kernel
//! mirrors them): when the policy would deny a packet, or pass it as audit in a monitored
//! segment, a *live* grant (`now < expires_ns`) whose `from` is the packet's source segment,
//! whose `to` is its destination segment and one of whose port entries matches, allows it with
//! rule id `breakglass/<id>`. Among several such grants the lowest id names the verdict. A grant
//! never changes what is allowed already, nor traffic that is not judged (an unenforced
//! `world`, egress while egress is unenforced). The source segment is the one after the other
//! overrides: a quarantined host's segment is `quarantine`, so no grant from its former segment
//! lets it out.
//!
//! In the kernel, the grants of one (source segment, destination segment) pair are one
//! [`BreakglassValue`] of up to [`BREAKGLASS_MAX_RANGES`] port ranges, sorted by grant id; see
//! [`kernel_entries`].
use std::collections::BTreeMap;

use enforcer_common::{
    BREAKGLASS_ANY_PROTO, BREAKGLASS_MAX_PAIRS, BREAKGLASS_MAX_RANGES, BreakglassKey,
    BreakglassRange, BreakglassValue,
};

use crate::{
    Decision, Flow, Policy, PortMatch, Verdict,
    model::BREAKGLASS,
    overrides::{Grant, Overrides},
};

/// The rule id of flows admitted by grant `id`.
pub fn rule_id(id: u32) -> String {
    format!("{BREAKGLASS}/{id}")
}

impl Grant {
    /// Whether the grant is in force at CLOCK_MONOTONIC_COARSE time `now_ns`.
    pub fn is_live(&self, now_ns: u64) -> bool {
        now_ns < self.expires_ns
    }

    /// Whether the grant opens a packet of IP protocol `proto` with port (or ICMP type) `port`
    /// from segment `from` to segment `to`, at `now_ns`.
    pub fn opens(&self, from: &str, to: &str, proto: u8, port: Option<u16>, now_ns: u64) -> bool {
        self.is_live(now_ns)
            && self.from == from
            && self.to == to
            && self.ports.iter().any(|entry| entry.matches(proto, port))
    }
}

impl Policy {
    /// `decision` (the policy's verdict on `flow`, other overrides applied) with the grants of
    /// `overrides` applied: see the module documentation.
    pub(crate) fn apply_grants(
        &self,
        decision: Decision,
        flow: &Flow,
        overrides: &Overrides,
        now_ns: u64,
    ) -> Decision {
        if !matches!(decision.verdict, Verdict::Deny | Verdict::Audit) {
            return decision;
        }
        let granting = overrides
            .grants
            .iter()
            .filter(|grant| {
                grant.opens(
                    &decision.src_segment,
                    &decision.dst_segment,
                    flow.proto,
                    flow.port,
                    now_ns,
                )
            })
            .min_by_key(|grant| grant.id);
        let Some(grant) = granting else {
            return decision;
        };
        let reason = format!(
            "allowed by break-glass grant {} ({} -> {}); without it: {}",
            grant.id, grant.from, grant.to, decision.reason
        );
        Decision {
            verdict: Verdict::Allow,
            rule: Some(rule_id(grant.id)),
            rule_index: None,
            grant: Some(grant.id),
            reason,
            ..decision
        }
    }
}

/// Parses `--ports` entries exactly like a rule's `ports:` (`tcp/104`, `tcp/8080-8090`,
/// `udp/any`, `icmp/echo-request`, `any`). The error names the entry, the problem and the fix.
pub fn parse_ports<S: AsRef<str>>(entries: &[S]) -> Result<Vec<PortMatch>, String> {
    if entries.is_empty() {
        return Err("no ports given: name at least one, e.g. tcp/104".to_string());
    }
    entries
        .iter()
        .map(|entry| {
            let entry = entry.as_ref().trim();
            crate::load::parse_port(entry).map_err(|(problem, hint)| match hint {
                Some(hint) => format!("invalid port entry '{entry}': {problem} ({hint})"),
                None => format!("invalid port entry '{entry}': {problem}"),
            })
        })
        .collect()
}

/// Why a set of grants does not fit the kernel's break-glass map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error(
        "break-glass grants from {from} to {to} would need {needed} port ranges; the kernel holds at most {BREAKGLASS_MAX_RANGES} per segment pair (revoke a grant of that pair, or name fewer port entries)"
    )]
    TooManyRanges {
        from: String,
        to: String,
        needed: usize,
    },
    #[error(
        "break-glass grants would cover {needed} segment pairs; the kernel holds at most {BREAKGLASS_MAX_PAIRS} (revoke grants first)"
    )]
    TooManyPairs { needed: usize },
}

/// Grants in the kernel's layout for one policy slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelEntries {
    pub entries: BTreeMap<BreakglassKey, BreakglassValue>,
    /// Ids of grants that name a segment the policy does not have (they are not written).
    pub unplaced: Vec<u32>,
}

/// The break-glass map contents of a policy whose segment ids are the indexes of
/// `segment_names` (`world` first), for `grants` (expiry in the kernel's clock). Expired grants
/// are written too: the kernel ignores them, exactly as the specification does.
pub fn kernel_entries(
    segment_names: &[String],
    grants: &[Grant],
) -> Result<KernelEntries, CapacityError> {
    let id_of = |name: &str| {
        segment_names
            .iter()
            .position(|known| known == name)
            .and_then(|id| u32::try_from(id).ok())
    };
    let mut sorted: Vec<&Grant> = grants.iter().collect();
    // Stable: the kernel's first match is the specification's lowest id.
    sorted.sort_by_key(|grant| grant.id);
    let mut result = KernelEntries::default();
    let mut ranges: BTreeMap<BreakglassKey, Vec<BreakglassRange>> = BTreeMap::new();
    for grant in sorted {
        let (Some(src_segment), Some(dst_segment)) = (id_of(&grant.from), id_of(&grant.to)) else {
            result.unplaced.push(grant.id);
            continue;
        };
        let key = BreakglassKey {
            src_segment,
            dst_segment,
        };
        let pair = ranges.entry(key).or_default();
        for entry in &grant.ports {
            let (proto, first, last) = match *entry {
                PortMatch::Any => (BREAKGLASS_ANY_PROTO, 0, u16::MAX),
                PortMatch::Range { proto, first, last } => (proto, first, last),
            };
            pair.push(BreakglassRange {
                expires_ns: grant.expires_ns,
                grant: grant.id,
                first,
                last,
                proto,
                _pad: [0; 7],
            });
        }
        if pair.len() > BREAKGLASS_MAX_RANGES {
            return Err(CapacityError::TooManyRanges {
                from: grant.from.clone(),
                to: grant.to.clone(),
                needed: pair.len(),
            });
        }
    }
    if ranges.len() > BREAKGLASS_MAX_PAIRS as usize {
        return Err(CapacityError::TooManyPairs {
            needed: ranges.len(),
        });
    }
    for (key, list) in ranges {
        let mut value = BreakglassValue {
            count: list.len() as u32,
            ..BreakglassValue::default()
        };
        value.ranges[..list.len()].copy_from_slice(&list);
        result.entries.insert(key, value);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: u32, from: &str, to: &str, ports: &[&str], expires_ns: u64) -> Grant {
        Grant {
            id,
            from: from.to_string(),
            to: to.to_string(),
            ports: parse_ports(ports).unwrap(),
            expires_ns,
        }
    }

    #[test]
    fn ports_parse_like_policy_ports() {
        assert_eq!(
            parse_ports(&["tcp/104", "udp/any", "icmp/echo-request", "any"]).unwrap(),
            vec![
                PortMatch::Range {
                    proto: 6,
                    first: 104,
                    last: 104
                },
                PortMatch::Range {
                    proto: 17,
                    first: 0,
                    last: u16::MAX
                },
                PortMatch::Range {
                    proto: 1,
                    first: 8,
                    last: 8
                },
                PortMatch::Any,
            ]
        );
        let error = parse_ports(&["104"]).unwrap_err();
        assert!(
            error.contains("'104'") && error.contains("tcp/104"),
            "{error}"
        );
        let error = parse_ports(&["tcp/90-80"]).unwrap_err();
        assert!(error.contains("tcp/80-90"), "{error}");
        assert!(parse_ports::<&str>(&[]).is_err());
    }

    #[test]
    fn kernel_entries_sort_by_grant_and_skip_unknown_segments() {
        let names: Vec<String> = ["world", "icu", "pacs"].map(String::from).to_vec();
        let grants = [
            grant(7, "icu", "pacs", &["tcp/104", "tcp/11112"], 50),
            grant(3, "icu", "pacs", &["any"], 10),
            grant(4, "icu", "gone", &["tcp/1"], 10),
        ];
        let kernel = kernel_entries(&names, &grants).unwrap();
        assert_eq!(kernel.unplaced, vec![4]);
        let value = kernel.entries[&BreakglassKey {
            src_segment: 1,
            dst_segment: 2,
        }];
        assert_eq!(value.count, 3);
        let ranges = &value.ranges[..3];
        assert_eq!(
            ranges
                .iter()
                .map(|r| (r.grant, r.proto, r.first, r.last, r.expires_ns))
                .collect::<Vec<_>>(),
            vec![
                (3, BREAKGLASS_ANY_PROTO, 0, u16::MAX, 10),
                (7, 6, 104, 104, 50),
                (7, 6, 11112, 11112, 50),
            ]
        );
    }

    #[test]
    fn a_full_pair_is_refused_with_its_names() {
        let names: Vec<String> = ["world", "icu", "pacs"].map(String::from).to_vec();
        let ports: Vec<String> = (0..17).map(|p| format!("tcp/{p}")).collect();
        let grants = [Grant {
            id: 1,
            from: "icu".into(),
            to: "pacs".into(),
            ports: parse_ports(&ports).unwrap(),
            expires_ns: 1,
        }];
        let error = kernel_entries(&names, &grants).unwrap_err().to_string();
        assert!(
            error.contains("icu to pacs") && error.contains("17"),
            "{error}"
        );
    }
}
