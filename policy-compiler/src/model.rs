//! The validated policy and its parts.
//!
//! # The policy language
//!
//! One YAML file per segment (`NAME.yaml` or `NAME.yml` holding `segment: NAME`), plus an
//! optional `defaults.yaml` that says how traffic to `world` (addresses in no segment) is judged.
//! A segment's `allow:` list is an ingress allow-list: it says who may reach its members.
//!
//! Semantics, which [`Policy::evaluate`](crate::Policy::evaluate) implements literally:
//! - An address belongs to the segment whose member prefix matches it most specifically, or to
//!   the implicit segment `world`.
//! - Traffic to `world` is allowed without judgement unless `defaults.yaml` sets `world.mode`.
//! - Between two members of one segment with `intra: allow` (the default), the pseudo-rule
//!   `SEGMENT/intra` allows everything and wins over the other rules, so the verdict always names
//!   it. With `intra: deny` the segment's allow-list decides exactly as for any other source:
//!   rules naming the segment itself, `any`, or a CIDR containing the source can open specific
//!   ports inside the segment. This keeps one rule of evaluation instead of a special case.
//! - Otherwise the first rule (in file order) whose `from` matches the source and whose `ports`
//!   match the packet allows it; without one the packet is denied, or passed as `audit` when the
//!   destination segment is in `mode: monitor`.
//! - The built-in segment `quarantine` always exists: no members in Git (hosts are moved into it
//!   at run time, see [`crate::overrides`]), always enforced, `intra: deny`. Its optional file
//!   `quarantine.yaml` holds only its allow-list (who may reach quarantined hosts); other
//!   segments name `from: quarantine` to let quarantined hosts reach them. A quarantined
//!   address is in `quarantine` as a destination and as a source, whatever its prefix says;
//!   as a source it matches rules naming `quarantine` and `any`, never a CIDR rule or its old
//!   segment (its trust came from where it sat in the network).
//! - Ports are matched by IP protocol number whatever the IP version. A packet without port
//!   information (a non-first fragment, or a protocol other than TCP/UDP/ICMP/ICMPv6) matches
//!   only `any`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::settings::Settings;

use crate::prefix::Prefix;

/// The implicit segment of every address that is in no segment.
pub const WORLD: &str = "world";
/// Names that cannot be used for segments: `world` is implicit, `any` is a keyword of `from`,
/// `breakglass` would give rule ids (`breakglass/N`) that name break-glass grants.
/// (`quarantine` is the built-in segment of quarantined hosts: its file may exist, with an
/// allow-list but no members.)
pub const RESERVED_SEGMENT_NAMES: [&str; 3] = [WORLD, "any", BREAKGLASS];

/// The rule id of a flow admitted by break-glass grant N is `breakglass/N`.
pub const BREAKGLASS: &str = "breakglass";

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// ICMP (IPv4) message type names accepted in `icmp/NAME`.
pub const ICMP_TYPE_NAMES: [(&str, u8); 11] = [
    ("echo-reply", 0),
    ("destination-unreachable", 3),
    ("source-quench", 4),
    ("redirect", 5),
    ("echo-request", 8),
    ("router-advertisement", 9),
    ("router-solicitation", 10),
    ("time-exceeded", 11),
    ("parameter-problem", 12),
    ("timestamp", 13),
    ("timestamp-reply", 14),
];

/// ICMPv6 message type names accepted in `icmpv6/NAME`.
pub const ICMPV6_TYPE_NAMES: [(&str, u8); 11] = [
    ("destination-unreachable", 1),
    ("packet-too-big", 2),
    ("time-exceeded", 3),
    ("parameter-problem", 4),
    ("echo-request", 128),
    ("echo-reply", 129),
    ("router-solicitation", 133),
    ("router-advertisement", 134),
    ("neighbor-solicitation", 135),
    ("neighbor-advertisement", 136),
    ("redirect", 137),
];

/// How traffic to a segment is judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Not judged at all (only `world` can be unenforced).
    Unenforced,
    /// Traffic without an allow rule is denied.
    Enforce,
    /// Traffic without an allow rule passes and is reported as audit.
    Monitor,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Unenforced => "unenforced",
            Mode::Enforce => "enforce",
            Mode::Monitor => "monitor",
        }
    }

    /// The value stored in the kernel's `SEGMENTS` map.
    pub fn kernel_value(self) -> u8 {
        use enforcer_common::segment_mode;
        match self {
            Mode::Unenforced => segment_mode::UNENFORCED,
            Mode::Enforce => segment_mode::ENFORCE,
            Mode::Monitor => segment_mode::MONITOR,
        }
    }
}

/// Whether two members of the same segment may talk freely.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Intra {
    Allow,
    Deny,
}

/// One entry of a rule's `from`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// Every source address.
    Any,
    /// Every member of the named segment (`world` included).
    Segment(String),
    /// Every address inside the prefix, whatever its segment.
    Cidr(Prefix),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Any => f.write_str("any"),
            Source::Segment(name) => f.write_str(name),
            Source::Cidr(prefix) => write!(f, "{prefix}"),
        }
    }
}

/// One entry of a rule's `ports`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortMatch {
    /// Every IP protocol and port, including packets without port information.
    Any,
    /// Destination ports (TCP/UDP) or message types (ICMP/ICMPv6) `first..=last` of one IP
    /// protocol.
    Range { proto: u8, first: u16, last: u16 },
}

impl PortMatch {
    /// Whether a packet of IP protocol `proto` with port (or ICMP type) `port` matches.
    pub fn matches(&self, proto: u8, port: Option<u16>) -> bool {
        match *self {
            PortMatch::Any => true,
            PortMatch::Range {
                proto: range_proto,
                first,
                last,
            } => range_proto == proto && port.is_some_and(|port| first <= port && port <= last),
        }
    }
}

impl fmt::Display for PortMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PortMatch::Any => f.write_str("any"),
            PortMatch::Range { proto, first, last } => {
                let name = proto_name(proto).unwrap_or("?");
                let full = if matches!(proto, PROTO_ICMP | PROTO_ICMPV6) {
                    255
                } else {
                    u16::MAX
                };
                if first == 0 && last == full {
                    write!(f, "{name}/any")
                } else if first == last {
                    write!(f, "{name}/{first}")
                } else {
                    write!(f, "{name}/{first}-{last}")
                }
            }
        }
    }
}

/// The policy-language name of an IP protocol that has ports or types.
pub fn proto_name(proto: u8) -> Option<&'static str> {
    match proto {
        PROTO_TCP => Some("tcp"),
        PROTO_UDP => Some("udp"),
        PROTO_ICMP => Some("icmp"),
        PROTO_ICMPV6 => Some("icmpv6"),
        _ => None,
    }
}

/// The name of an ICMP (`proto` 1) or ICMPv6 (58) message type, if it has one.
pub fn icmp_type_name(proto: u8, icmp_type: u16) -> Option<&'static str> {
    let table: &[(&str, u8)] = match proto {
        PROTO_ICMP => &ICMP_TYPE_NAMES,
        PROTO_ICMPV6 => &ICMPV6_TYPE_NAMES,
        _ => return None,
    };
    table
        .iter()
        .find(|(_, value)| u16::from(*value) == icmp_type)
        .map(|(name, _)| *name)
}

/// The number of an ICMP (`proto` 1) or ICMPv6 (58) message type name.
pub fn icmp_type_by_name(proto: u8, name: &str) -> Option<u8> {
    let table: &[(&str, u8)] = match proto {
        PROTO_ICMP => &ICMP_TYPE_NAMES,
        PROTO_ICMPV6 => &ICMPV6_TYPE_NAMES,
        _ => return None,
    };
    table
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, value)| *value)
}

/// What a rule allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleKind {
    /// A rule written in an `allow:` list.
    Allow {
        from: Vec<Source>,
        ports: Vec<PortMatch>,
    },
    /// The pseudo-rule `SEGMENT/intra` of a segment with `intra: allow`: every packet between
    /// two members of the segment.
    Intra,
}

/// A rule, with its place in the global rule order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Global rule index (see [`crate::compile`]); also the kernel's per-rule counter index.
    pub index: u32,
    /// `name:` if given, else `SEGMENT/N`; `SEGMENT/intra` for the pseudo-rule.
    pub id: String,
    /// The destination segment whose allow-list holds the rule (`world` for defaults rules).
    pub segment: String,
    pub kind: RuleKind,
    pub reason: Option<String>,
    /// Where the rule was written: (file, line); the segment's file for the pseudo-rule.
    pub file: String,
    pub line: usize,
}

impl Rule {
    /// The `SEGMENT/essential` pseudo-rule (from `essential_traffic` in `defaults.yaml`).
    pub fn is_essential(&self) -> bool {
        self.id.ends_with("/essential") && self.id.starts_with(&self.segment)
    }
}

/// A segment as written in its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub name: String,
    pub description: Option<String>,
    pub members: Vec<Prefix>,
    pub mode: Mode,
    pub intra: Intra,
    /// Global indexes of the segment's `allow:` rules, in file order.
    pub rules: Vec<u32>,
    /// Global index of the `SEGMENT/intra` pseudo-rule, when `intra: allow`.
    pub intra_rule: Option<u32>,
    pub file: String,
}

/// Map capacities the compiled policy must fit in (the loader sizes the kernel maps from the
/// artifact, but never beyond these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub addr_v4: u64,
    pub addr_v6: u64,
    pub pairs: u64,
    pub ports: u64,
    /// Segments including `world`.
    pub segments: u64,
    /// Rules including the intra pseudo-rules.
    pub rules: u64,
}

impl Capacities {
    pub const KERNEL: Capacities = Capacities {
        addr_v4: 2_000_000,
        addr_v6: 2_000_000,
        pairs: 4_000_000,
        ports: 4_000_000,
        segments: 65_536,
        rules: 2_000_000,
    };
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities::KERNEL
    }
}

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Sorted by name; `world` is not among them.
    pub(crate) segments: Vec<Segment>,
    pub(crate) world_mode: Mode,
    /// Global indexes of the `world` rules from `defaults.yaml`.
    pub(crate) world_rules: Vec<u32>,
    /// Every rule, indexed by global rule index.
    pub(crate) rules: Vec<Rule>,
    pub(crate) revision: String,
    pub(crate) settings: Settings,
}

impl Policy {
    /// Hex SHA-256 over the sorted (file name, NUL, content, NUL) of every policy file read.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// The policy without its rules: segments (names, members, modes), world mode and settings.
    /// What a long-running daemon keeps to validate run-time requests: a 100k-rule policy's
    /// rules take tens of MiB it would hold for nothing.
    pub fn outline(&self) -> Policy {
        Policy {
            segments: self
                .segments
                .iter()
                .map(|segment| Segment {
                    rules: Vec::new(),
                    intra_rule: None,
                    ..segment.clone()
                })
                .collect(),
            world_mode: self.world_mode,
            world_rules: Vec::new(),
            rules: Vec::new(),
            revision: self.revision.clone(),
            settings: self.settings.clone(),
        }
    }

    /// The user segments, sorted by name (`world` is implicit and not included).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// A user segment by name.
    pub fn segment(&self, name: &str) -> Option<&Segment> {
        self.segments
            .binary_search_by(|segment| segment.name.as_str().cmp(name))
            .ok()
            .and_then(|found| self.segments.get(found))
    }

    /// `world` first, then the user segments sorted by name (the order of segment ids).
    pub fn segment_names(&self) -> Vec<String> {
        std::iter::once(WORLD.to_string())
            .chain(self.segments.iter().map(|segment| segment.name.clone()))
            .collect()
    }

    pub fn world_mode(&self) -> Mode {
        self.world_mode
    }

    /// The rules of `world` (from `defaults.yaml`), in file order.
    pub fn world_rules(&self) -> impl Iterator<Item = &Rule> {
        self.world_rules
            .iter()
            .filter_map(|&index| self.rule(index))
    }

    /// Every rule, indexed by global rule index.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn rule(&self, index: u32) -> Option<&Rule> {
        self.rules.get(index as usize)
    }

    /// Policy-wide settings from `defaults.yaml`.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The rules written by users (every rule but the intra and essential pseudo-rules).
    pub fn written_rule_count(&self) -> usize {
        self.rules
            .iter()
            .filter(|rule| matches!(rule.kind, RuleKind::Allow { .. }) && !rule.is_essential())
            .count()
    }

    /// `(prefix, segment name)` for every member prefix.
    pub fn members(&self) -> impl Iterator<Item = (Prefix, &str)> {
        self.segments.iter().flat_map(|segment| {
            segment
                .members
                .iter()
                .map(move |prefix| (*prefix, segment.name.as_str()))
        })
    }

    /// A one-line summary, e.g. `7 segments, 23 rules, revision 1a2b3c4d5e6f`.
    pub fn summary(&self) -> String {
        let revision_start = self.revision.get(..12).unwrap_or(&self.revision);
        // The built-in quarantine segment is counted when the policy has its file.
        let written = self
            .segments
            .iter()
            .filter(|segment| segment.file != crate::load::BUILT_IN_FILE)
            .count();
        format!(
            "{written} segments, {} rules, revision {revision_start}",
            self.written_rule_count()
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::Policy;

    #[test]
    fn an_outline_keeps_segments_and_settings_and_drops_rules() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../segments");
        let policy = Policy::load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        let outline = policy.outline();
        assert!(!policy.rules().is_empty());
        assert!(outline.rules().is_empty());
        assert_eq!(outline.segment_names(), policy.segment_names());
        assert_eq!(outline.world_mode(), policy.world_mode());
        assert_eq!(outline.settings(), policy.settings());
        for segment in policy.segments() {
            let kept = outline.segment(&segment.name).expect("segment kept");
            assert_eq!(
                (&kept.members, kept.mode, kept.intra),
                (&segment.members, segment.mode, segment.intra)
            );
            assert!(kept.rules.is_empty());
        }
    }
}
