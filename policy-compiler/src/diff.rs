//! What a policy change does: which (source, destination, ports) verdicts change, which
//! segments change mode, and which segments are added, removed or get other members. For review
//! of a pull request (`policy-compiler diff`).
//!
//! Reachability is compared per source class and destination label (see [`crate::reachability`]).
//! A label that exists on one side only (a new segment, a new rule CIDR) is compared with what
//! the other policy does to the same addresses: a new CIDR rule shows only what it opens, and a
//! new enforced segment shows what it now stops (its addresses were `world` before).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Serialize, Serializer};

use crate::evaluate::Verdict;
use crate::model::{Mode, Policy, WORLD};
use crate::port_set::PortSet;
use crate::reachability::{
    Access, Destination, SourceClass, destinations, quarantine_overrides, source_classes,
};

/// How the verdict on some packets changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Denied before, allowed now.
    Added,
    /// Allowed before, denied now.
    Removed,
    /// Denied before, passed now as audit (the destination went to monitor mode).
    NowAudited,
    /// Passed as audit before, denied now (the destination went to enforce mode).
    NoLongerAudited,
    /// Passed as audit before, allowed by a rule now.
    AuditNowAllowed,
    /// Allowed by a rule before, passed now only as audit.
    AllowedNowAudited,
}

impl ChangeKind {
    fn of(before: Verdict, after: Verdict) -> Option<ChangeKind> {
        use Verdict::{Allow, Audit, Deny};
        Some(match (before, after) {
            (Deny, Allow) => ChangeKind::Added,
            (Allow, Deny) => ChangeKind::Removed,
            (Deny, Audit) => ChangeKind::NowAudited,
            (Audit, Deny) => ChangeKind::NoLongerAudited,
            (Audit, Allow) => ChangeKind::AuditNowAllowed,
            (Allow, Audit) => ChangeKind::AllowedNowAudited,
            _ => return None,
        })
    }

    /// A short marker for the terminal table.
    pub fn marker(self) -> &'static str {
        match self {
            ChangeKind::Added => "+ allow",
            ChangeKind::Removed => "- allow",
            ChangeKind::NowAudited => "+ AUDIT",
            ChangeKind::NoLongerAudited => "- audit",
            ChangeKind::AuditNowAllowed => "~ allow",
            ChangeKind::AllowedNowAudited => "~ AUDIT",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            ChangeKind::Added => "allowed (was denied)",
            ChangeKind::Removed => "denied (was allowed)",
            ChangeKind::NowAudited => {
                "passes without a rule, reported as audit (monitor mode; was denied)"
            }
            ChangeKind::NoLongerAudited => "denied (was passing as audit)",
            ChangeKind::AuditNowAllowed => "allowed by a rule (was passing as audit)",
            ChangeKind::AllowedNowAudited => {
                "passes only as audit (monitor mode; no rule allows it any more)"
            }
        }
    }

    /// Whether packets pass now that did not before (the changes a reviewer must look at
    /// first).
    pub fn opens(self) -> bool {
        matches!(self, ChangeKind::Added | ChangeKind::NowAudited)
    }
}

/// Packets from one source to one destination whose verdict changed the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReachabilityChange {
    pub from: String,
    pub to: String,
    pub change: ChangeKind,
    pub before: Verdict,
    pub after: Verdict,
    #[serde(serialize_with = "serialize_ports")]
    pub ports: PortSet,
}

fn serialize_ports<S: Serializer>(ports: &PortSet, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(ports.entries())
}

/// A segment (or `world`, or the `egress` setting) whose mode changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModeChange {
    pub segment: String,
    pub before: Mode,
    pub after: Mode,
    pub effect: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum SegmentChange {
    Added {
        segment: String,
        members: Vec<String>,
    },
    Removed {
        segment: String,
        members: Vec<String>,
    },
    Members {
        segment: String,
        added: Vec<String>,
        removed: Vec<String>,
    },
}

/// One side of the comparison.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Side {
    /// As given on the command line: a directory or `REV:DIR`.
    pub source: String,
    pub revision: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyDiff {
    pub old: Side,
    pub new: Side,
    pub reachability: Vec<ReachabilityChange>,
    pub modes: Vec<ModeChange>,
    pub segments: Vec<SegmentChange>,
}

impl PolicyDiff {
    /// Compares two validated policies; `old_source` and `new_source` only label the output.
    pub fn between(old: &Policy, old_source: &str, new: &Policy, new_source: &str) -> PolicyDiff {
        PolicyDiff {
            old: Side {
                source: old_source.to_string(),
                revision: old.revision().to_string(),
            },
            new: Side {
                source: new_source.to_string(),
                revision: new.revision().to_string(),
            },
            reachability: reachability_changes(old, new),
            modes: mode_changes(old, new),
            segments: segment_changes(old, new),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.reachability.is_empty() && self.modes.is_empty() && self.segments.is_empty()
    }

    /// `3 reachability changes (2 opening), 1 mode change, no segment change`.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "no reachability change".to_string();
        }
        let opening = self
            .reachability
            .iter()
            .filter(|change| change.change.opens())
            .count();
        let mut reachability = count(self.reachability.len(), "reachability change");
        if opening > 0 {
            reachability.push_str(&format!(" ({opening} opening traffic)"));
        }
        format!(
            "{reachability}, {}, {}",
            count(self.modes.len(), "mode change"),
            count(self.segments.len(), "segment change")
        )
    }

    /// A table for the terminal.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "policy diff: {} -> {}",
            self.old.source, self.new.source
        );
        if !self.reachability.is_empty() {
            let header = ["CHANGE", "FROM", "TO", "PORTS"];
            let rows: Vec<[String; 4]> = self
                .reachability
                .iter()
                .map(|change| {
                    [
                        change.change.marker().to_string(),
                        change.from.clone(),
                        change.to.clone(),
                        change.ports.to_string(),
                    ]
                })
                .collect();
            let _ = writeln!(out, "\nReachability:");
            let widths: Vec<usize> = (0..3)
                .map(|column| {
                    rows.iter()
                        .map(|row| row[column].chars().count())
                        .chain([header[column].len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: [&str; 4]| {
                format!(
                    "  {:<w0$}  {:<w1$}  {:<w2$}  {}",
                    cells[0],
                    cells[1],
                    cells[2],
                    cells[3],
                    w0 = widths[0],
                    w1 = widths[1],
                    w2 = widths[2]
                )
            };
            let _ = writeln!(out, "{}", line(header));
            for row in &rows {
                let _ = writeln!(out, "{}", line([&row[0], &row[1], &row[2], &row[3]]));
            }
            let mut kinds: Vec<ChangeKind> = self.reachability.iter().map(|c| c.change).collect();
            kinds.sort();
            kinds.dedup();
            for kind in kinds {
                let _ = writeln!(out, "  ({}: {})", kind.marker(), kind.description());
            }
        }
        if !self.modes.is_empty() {
            let _ = writeln!(out, "\nMode changes:");
            for mode in &self.modes {
                let _ = writeln!(
                    out,
                    "  {}: {} -> {}  ({})",
                    mode.segment,
                    mode.before.as_str(),
                    mode.after.as_str(),
                    mode.effect
                );
            }
        }
        if !self.segments.is_empty() {
            let _ = writeln!(out, "\nSegment changes:");
            for change in &self.segments {
                let _ = writeln!(out, "  {}", segment_change_text(change, |text| text.into()));
            }
        }
        let _ = writeln!(out, "\n{}", self.summary());
        out
    }

    /// Markdown for a pull-request comment. Starts with a hidden marker so that CI can find and
    /// update its previous comment.
    pub fn to_markdown(&self) -> String {
        let code = |text: &str| format!("`{text}`");
        let mut out = String::new();
        let _ = writeln!(out, "<!-- policy-compiler diff -->");
        let _ = writeln!(out, "### Policy reachability changes\n");
        let _ = writeln!(
            out,
            "{} (revision {}) → {} (revision {})\n",
            code(&self.old.source),
            code(short(&self.old.revision)),
            code(&self.new.source),
            code(short(&self.new.revision))
        );
        if self.is_empty() {
            let _ = writeln!(
                out,
                "✅ No reachability change: every packet gets the same verdict."
            );
            return out;
        }
        if !self.reachability.is_empty() {
            let _ = writeln!(out, "| Change | From | To | Ports |");
            let _ = writeln!(out, "|---|---|---|---|");
            // A mode change gives every source the same row: one row, its sources listed.
            let mut groups: Vec<(&ReachabilityChange, Vec<&str>)> = Vec::new();
            for change in &self.reachability {
                let same = groups.iter_mut().find(|(first, _)| {
                    (first.to.as_str(), first.change, &first.ports)
                        == (change.to.as_str(), change.change, &change.ports)
                });
                match same {
                    Some((_, sources)) => sources.push(&change.from),
                    None => groups.push((change, vec![&change.from])),
                }
            }
            // What opens traffic first: that is what a reviewer must not miss.
            groups.sort_by_key(|(change, _)| {
                (!change.change.opens(), change.to.clone(), change.change)
            });
            for (change, sources) in groups {
                let sources: Vec<String> = sources.iter().map(|source| code(source)).collect();
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    markdown_change(change.change),
                    sources.join(", "),
                    code(&change.to),
                    code(&change.ports.to_string())
                );
            }
            let _ = writeln!(out);
        }
        if !self.modes.is_empty() {
            let _ = writeln!(out, "#### Mode changes\n");
            let _ = writeln!(out, "| Segment | Before | After | Effect |");
            let _ = writeln!(out, "|---|---|---|---|");
            for mode in &self.modes {
                let warning = if mode.after == Mode::Monitor || mode.after == Mode::Unenforced {
                    "⚠️ "
                } else {
                    ""
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | **{}** | {warning}{} |",
                    code(&mode.segment),
                    mode.before.as_str(),
                    mode.after.as_str(),
                    mode.effect
                );
            }
            let _ = writeln!(out);
        }
        if !self.segments.is_empty() {
            let _ = writeln!(out, "#### Segment changes\n");
            for change in &self.segments {
                let _ = writeln!(out, "- {}", segment_change_text(change, code));
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out, "_{}._", self.summary());
        out
    }

    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

fn markdown_change(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Added => "➕ **allowed**",
        ChangeKind::Removed => "➖ **denied** (was allowed)",
        ChangeKind::NowAudited => "⚠️ **passes as audit** (monitor mode: would-be denials pass)",
        ChangeKind::NoLongerAudited => "➖ **denied** (was passing as audit)",
        ChangeKind::AuditNowAllowed => "✔️ allowed by a rule (was passing as audit)",
        ChangeKind::AllowedNowAudited => "⚠️ **audit only** (monitor mode; was allowed by a rule)",
    }
}

fn segment_change_text(change: &SegmentChange, quote: impl Fn(&str) -> String) -> String {
    let list = |items: &[String]| {
        items
            .iter()
            .map(|item| quote(item))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match change {
        SegmentChange::Added { segment, members } => {
            format!("+ segment {} added: {}", quote(segment), list(members))
        }
        SegmentChange::Removed { segment, members } => {
            format!(
                "- segment {} removed (was {})",
                quote(segment),
                list(members)
            )
        }
        SegmentChange::Members {
            segment,
            added,
            removed,
        } => {
            let mut parts = Vec::new();
            if !added.is_empty() {
                parts.push(format!("added {}", list(added)));
            }
            if !removed.is_empty() {
                parts.push(format!("removed {}", list(removed)));
            }
            format!("~ {} members: {}", quote(segment), parts.join("; "))
        }
    }
}

fn short(revision: &str) -> &str {
    revision.get(..12).unwrap_or(revision)
}

fn count(n: usize, what: &str) -> String {
    match n {
        0 => format!("no {what}"),
        1 => format!("1 {what}"),
        _ => format!("{n} {what}s"),
    }
}

/// Labels of both sides, each with its class (or destination) in the old and new policy.
type BothSides<T> = BTreeMap<String, (Option<T>, Option<T>)>;

fn reachability_changes(old: &Policy, new: &Policy) -> Vec<ReachabilityChange> {
    let mut sources: BothSides<SourceClass> = BTreeMap::new();
    for (class, is_new) in source_classes(old)
        .into_iter()
        .map(|class| (class, false))
        .chain(source_classes(new).into_iter().map(|class| (class, true)))
    {
        let sides = sources.entry(class.label.clone()).or_default();
        *(if is_new { &mut sides.1 } else { &mut sides.0 }) = Some(class);
    }
    let mut destinations_by_name: BothSides<Destination> = BTreeMap::new();
    for (destination, is_new) in destinations(old)
        .into_iter()
        .map(|destination| (destination, false))
        .chain(
            destinations(new)
                .into_iter()
                .map(|destination| (destination, true)),
        )
    {
        let sides = destinations_by_name
            .entry(destination.name.clone())
            .or_default();
        *(if is_new { &mut sides.1 } else { &mut sides.0 }) = Some(destination);
    }

    // (label, old end, new end); an end is an address and whether it stands for a quarantined
    // host.
    type End = (IpAddr, bool);
    let mut source_order: Vec<(&String, End, End, &SourceClass)> = Vec::new();
    for (label, sides) in &sources {
        if let Some((in_old, in_new)) = each_side(sides) {
            source_order.push((
                label,
                (in_old.address, in_old.quarantined),
                (in_new.address, in_new.quarantined),
                in_new,
            ));
        }
    }
    source_order.sort_by(|a, b| a.3.sort_key().cmp(&b.3.sort_key()));
    let mut destination_order: Vec<(&String, End, End)> = Vec::new();
    for (name, sides) in &destinations_by_name {
        if let Some((in_old, in_new)) = each_side(sides) {
            destination_order.push((
                name,
                (in_old.address, in_old.quarantined),
                (in_new.address, in_new.quarantined),
            ));
        }
    }
    // `world` last, like in the reachability model.
    destination_order.sort_by_key(|(name, _, _)| (name.as_str() == WORLD, (*name).clone()));

    let access = |policy: &Policy, src: End, dst: End| {
        Access::between_with(policy, src.0, dst.0, &quarantine_overrides([src, dst]))
    };
    let verdicts = [Verdict::Allow, Verdict::Audit, Verdict::Deny];
    let mut changes = Vec::new();
    for (from, old_src, new_src, _) in &source_order {
        for (to, old_dst, new_dst) in &destination_order {
            let before = access(old, *old_src, *old_dst);
            let after = access(new, *new_src, *new_dst);
            if before == after {
                continue;
            }
            let mut pair_changes = Vec::new();
            for was in verdicts {
                for now in verdicts {
                    let Some(change) = ChangeKind::of(was, now) else {
                        continue;
                    };
                    let ports = before
                        .with_verdict(was)
                        .intersection(&after.with_verdict(now));
                    if !ports.is_empty() {
                        pair_changes.push(ReachabilityChange {
                            from: (*from).clone(),
                            to: (*to).clone(),
                            change,
                            before: was,
                            after: now,
                            ports,
                        });
                    }
                }
            }
            pair_changes.sort_by_key(|change| change.change);
            changes.extend(pair_changes);
        }
    }
    changes
}

/// What to judge on each side: the side's own class (or destination), else the other side's,
/// so that a label present on one side only is compared on the same addresses.
fn each_side<T>((in_old, in_new): &(Option<T>, Option<T>)) -> Option<(&T, &T)> {
    let old_side = in_old.as_ref().or(in_new.as_ref())?;
    let new_side = in_new.as_ref().or(in_old.as_ref())?;
    Some((old_side, new_side))
}

fn mode_changes(old: &Policy, new: &Policy) -> Vec<ModeChange> {
    let mut changes = Vec::new();
    for segment in new.segments() {
        if let Some(before) = old.segment(&segment.name)
            && before.mode != segment.mode
        {
            changes.push(mode_change(&segment.name, before.mode, segment.mode));
        }
    }
    if old.world_mode() != new.world_mode() {
        changes.push(mode_change(WORLD, old.world_mode(), new.world_mode()));
    }
    let (old_egress, new_egress) = (old.settings().egress, new.settings().egress);
    if old_egress != new_egress {
        let effect = match new_egress {
            Mode::Unenforced => "hosts' outgoing packets are no longer judged",
            Mode::Monitor => "hosts' outgoing packets are judged; would-be denials pass as audit",
            Mode::Enforce => "hosts' outgoing packets are judged and denied without a rule",
        };
        changes.push(ModeChange {
            segment: "egress (defaults.yaml)".to_string(),
            before: old_egress,
            after: new_egress,
            effect: effect.to_string(),
        });
    }
    changes
}

fn mode_change(segment: &str, before: Mode, after: Mode) -> ModeChange {
    let effect = match (before, after) {
        (_, Mode::Monitor) => "would-be denials now pass, reported as audit",
        (_, Mode::Enforce) if before == Mode::Unenforced => {
            "traffic is now judged: without a rule it is denied"
        }
        (_, Mode::Enforce) => "traffic without a rule is now denied",
        (_, Mode::Unenforced) => "traffic is no longer judged: everything passes",
    };
    ModeChange {
        segment: segment.to_string(),
        before,
        after,
        effect: effect.to_string(),
    }
}

fn segment_changes(old: &Policy, new: &Policy) -> Vec<SegmentChange> {
    let members = |segment: &crate::model::Segment| -> Vec<String> {
        segment.members.iter().map(ToString::to_string).collect()
    };
    let mut changes = Vec::new();
    for segment in old.segments() {
        if new.segment(&segment.name).is_none() {
            changes.push(SegmentChange::Removed {
                segment: segment.name.clone(),
                members: members(segment),
            });
        }
    }
    for segment in new.segments() {
        match old.segment(&segment.name) {
            None => changes.push(SegmentChange::Added {
                segment: segment.name.clone(),
                members: members(segment),
            }),
            Some(before) => {
                let added: Vec<String> = segment
                    .members
                    .iter()
                    .filter(|member| !before.members.contains(member))
                    .map(ToString::to_string)
                    .collect();
                let removed: Vec<String> = before
                    .members
                    .iter()
                    .filter(|member| !segment.members.contains(member))
                    .map(ToString::to_string)
                    .collect();
                if !added.is_empty() || !removed.is_empty() {
                    changes.push(SegmentChange::Members {
                        segment: segment.name.clone(),
                        added,
                        removed,
                    });
                }
            }
        }
    }
    changes.sort_by(|a, b| segment_name(a).cmp(segment_name(b)));
    changes
}

fn segment_name(change: &SegmentChange) -> &str {
    match change {
        SegmentChange::Added { segment, .. }
        | SegmentChange::Removed { segment, .. }
        | SegmentChange::Members { segment, .. } => segment,
    }
}
