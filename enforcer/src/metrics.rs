//! Prometheus metrics: a [`MetricsSnapshot`] read from the kernel's per-CPU counters (exact even
//! when events are rate-limited) and the daemon's own state, rendered in the text exposition
//! format. Metric and label names are a stable interface (dashboards and alerts use them).

use std::{collections::BTreeMap, fmt::Write as _};

/// Labels of `enforcer_policy_verdicts_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerdictLabels {
    pub source_segment: String,
    pub destination_segment: String,
    /// `ingress` or `egress`.
    pub direction: String,
    /// `forwarded`, `dropped` or `audit`.
    pub action: String,
    /// What decided: `rule` (an allow rule), `none` (no rule: denied or audited),
    /// `unenforced` (not judged), `revoked` (a tracked flow whose rule is gone), `conntrack_full`,
    /// `breakglass` (a break-glass grant), `breakglass_expired` (a flow whose grant ended).
    pub match_: String,
}

/// Everything `/metrics` shows, read at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// `enforcer_policy_verdicts_total`: judged packets (first packets of flows, denials).
    pub policy_verdicts: Vec<(VerdictLabels, u64)>,
    /// `enforcer_drop_total{reason, protocol}`.
    pub drops: Vec<((String, String), u64)>,
    /// `enforcer_forward_total{direction}`: every packet passed, judged or not.
    pub forwarded: Vec<(String, u64)>,
    /// `enforcer_lost_events_total`: events the kernel ring buffer had no room for, so the
    /// daemon never saw them.
    pub lost_events: u64,
    /// `enforcer_flow_subscriber_missed_total`: events a `/flows` client or the flow log fell
    /// too far behind to receive (the daemon had them; counted once per subscriber).
    pub subscriber_missed: u64,
    /// `enforcer_events_total{outcome}` with outcome `sent` or `rate_limited`.
    pub events: Vec<(String, u64)>,
    /// `enforcer_policy_revision_info{revision, commit}` (value 1).
    pub revision: String,
    pub commit: Option<String>,
    /// `enforcer_policy_reload_total{outcome}` with outcome `success` or `failure`.
    pub reloads_success: u64,
    pub reloads_failure: u64,
    /// `enforcer_policy_rules`: rules of the loaded policy (written rules, without the intra
    /// and essential pseudo-rules).
    pub rules: u64,
    /// `enforcer_bpf_map_pressure{map_name}`: entries / capacity, 0 to 1.
    pub map_pressure: Vec<(String, f64)>,
    /// `enforcer_conntrack_entries`.
    pub conntrack_entries: u64,
    /// `enforcer_conntrack_filter_enabled`: 1 while the filter in front of the connection
    /// table is in use (after its first rebuild).
    pub conntrack_filter_enabled: bool,
    /// `enforcer_policy_last_reload_error` as text is not a metric: the log has it. This is
    /// `enforcer_policy_reload_failing` (1 while the newest policy on disk is rejected).
    pub reload_failing: bool,
    /// `enforcer_quarantined_hosts`: hosts in the `quarantine` segment.
    pub quarantined_hosts: u64,
    /// `enforcer_audit_write_failures_total`: audit records that could not be written.
    pub audit_write_failures: u64,
    /// `enforcer_breakglass_active{source_segment, destination_segment}`: break-glass grants
    /// in force per segment pair (a pair stays, at 0, once its grants have ended).
    pub breakglass_active: Vec<((String, String), u64)>,
    /// `enforcer_breakglass_events_total{action}`: `grant`, `use` (first uses audited),
    /// `expire`, `revoke`.
    pub breakglass_events: Vec<(String, u64)>,
}

/// The content type of [`MetricsSnapshot::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl MetricsSnapshot {
    /// The snapshot in the Prometheus text exposition format 0.0.4. Series are sorted by labels
    /// so that the output is deterministic; repeated label sets are summed, because the format
    /// forbids duplicate series.
    pub fn render(&self) -> String {
        let mut out = String::new();

        family(
            &mut out,
            "enforcer_policy_verdicts_total",
            "counter",
            "Packets judged by the policy (first packets of flows and denials).",
        );
        let verdicts = self.policy_verdicts.iter().map(|(l, v)| {
            (
                [
                    ("source_segment", l.source_segment.as_str()),
                    ("destination_segment", l.destination_segment.as_str()),
                    ("direction", l.direction.as_str()),
                    ("action", l.action.as_str()),
                    ("match", l.match_.as_str()),
                ],
                *v,
            )
        });
        counter_samples(&mut out, "enforcer_policy_verdicts_total", verdicts);

        family(
            &mut out,
            "enforcer_drop_total",
            "counter",
            "Packets dropped, by reason and protocol.",
        );
        let drops = self.drops.iter().map(|((reason, protocol), v)| {
            (
                [("reason", reason.as_str()), ("protocol", protocol.as_str())],
                *v,
            )
        });
        counter_samples(&mut out, "enforcer_drop_total", drops);

        family(
            &mut out,
            "enforcer_forward_total",
            "counter",
            "Packets passed, judged or not.",
        );
        let forwarded = self
            .forwarded
            .iter()
            .map(|(direction, v)| ([("direction", direction.as_str())], *v));
        counter_samples(&mut out, "enforcer_forward_total", forwarded);

        family(
            &mut out,
            "enforcer_lost_events_total",
            "counter",
            "Flow events lost in the kernel: no room in the ring buffer.",
        );
        sample(
            &mut out,
            "enforcer_lost_events_total",
            &[],
            self.lost_events,
        );

        family(
            &mut out,
            "enforcer_flow_subscriber_missed_total",
            "counter",
            "Flow events a /flows client or the flow log fell too far behind to receive.",
        );
        sample(
            &mut out,
            "enforcer_flow_subscriber_missed_total",
            &[],
            self.subscriber_missed,
        );

        family(
            &mut out,
            "enforcer_events_total",
            "counter",
            "Flow events by outcome (sent or rate_limited).",
        );
        let events = self
            .events
            .iter()
            .map(|(outcome, v)| ([("outcome", outcome.as_str())], *v));
        counter_samples(&mut out, "enforcer_events_total", events);

        family(
            &mut out,
            "enforcer_policy_revision_info",
            "gauge",
            "Revision (content hash) and commit of the policy in force.",
        );
        sample(
            &mut out,
            "enforcer_policy_revision_info",
            &[
                ("revision", &self.revision),
                ("commit", self.commit.as_deref().unwrap_or("")),
            ],
            1,
        );

        family(
            &mut out,
            "enforcer_policy_reload_total",
            "counter",
            "Policy reloads by outcome.",
        );
        sample(
            &mut out,
            "enforcer_policy_reload_total",
            &[("outcome", "failure")],
            self.reloads_failure,
        );
        sample(
            &mut out,
            "enforcer_policy_reload_total",
            &[("outcome", "success")],
            self.reloads_success,
        );

        family(
            &mut out,
            "enforcer_policy_reload_failing",
            "gauge",
            "1 while the newest policy on disk is rejected and an older one stays in force.",
        );
        sample(
            &mut out,
            "enforcer_policy_reload_failing",
            &[],
            u64::from(self.reload_failing),
        );

        family(
            &mut out,
            "enforcer_policy_rules",
            "gauge",
            "Rules of the policy in force.",
        );
        sample(&mut out, "enforcer_policy_rules", &[], self.rules);

        family(
            &mut out,
            "enforcer_bpf_map_pressure",
            "gauge",
            "Entries over capacity of each BPF map, 0 to 1.",
        );
        let mut pressure: BTreeMap<&str, f64> = BTreeMap::new();
        for (map, value) in &self.map_pressure {
            // A repeated map name is a caller bug; keep the last value rather than emit
            // a duplicate series that Prometheus would reject.
            pressure.insert(map, *value);
        }
        for (map, value) in pressure {
            sample(
                &mut out,
                "enforcer_bpf_map_pressure",
                &[("map_name", map)],
                Float(value),
            );
        }

        family(
            &mut out,
            "enforcer_conntrack_entries",
            "gauge",
            "Tracked flows.",
        );
        sample(
            &mut out,
            "enforcer_conntrack_entries",
            &[],
            self.conntrack_entries,
        );

        family(
            &mut out,
            "enforcer_conntrack_filter_enabled",
            "gauge",
            "1 while packets of untracked flows skip the connection table's lookup (the filter \
             in front of it is rebuilt at every sweep); 0 means every packet probes the table.",
        );
        sample(
            &mut out,
            "enforcer_conntrack_filter_enabled",
            &[],
            u64::from(self.conntrack_filter_enabled),
        );

        family(
            &mut out,
            "enforcer_quarantined_hosts",
            "gauge",
            "Hosts moved into the quarantine segment at run time.",
        );
        sample(
            &mut out,
            "enforcer_quarantined_hosts",
            &[],
            self.quarantined_hosts,
        );

        family(
            &mut out,
            "enforcer_breakglass_active",
            "gauge",
            "Break-glass grants in force, by segment pair.",
        );
        let mut active: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for ((from, to), grants) in &self.breakglass_active {
            *active.entry((from, to)).or_default() += grants;
        }
        for ((from, to), grants) in active {
            sample(
                &mut out,
                "enforcer_breakglass_active",
                &[("source_segment", from), ("destination_segment", to)],
                grants,
            );
        }

        family(
            &mut out,
            "enforcer_breakglass_events_total",
            "counter",
            "Break-glass grants given, first uses audited, grants expired and revoked.",
        );
        let events = self
            .breakglass_events
            .iter()
            .map(|(action, v)| ([("action", action.as_str())], *v));
        counter_samples(&mut out, "enforcer_breakglass_events_total", events);

        family(
            &mut out,
            "enforcer_audit_write_failures_total",
            "counter",
            "Audit records that could not be written to the audit log.",
        );
        sample(
            &mut out,
            "enforcer_audit_write_failures_total",
            &[],
            self.audit_write_failures,
        );

        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Sorted, summed counter samples. Sorted in a vector and summed in one pass: with every segment
/// pair populated there are millions of label sets, and an ordered map of them was most of the
/// render. The label names at each position are the same in every sample of a family, so the
/// values alone decide the order.
fn counter_samples<'a, const N: usize>(
    out: &mut String,
    name: &str,
    samples: impl Iterator<Item = ([(&'a str, &'a str); N], u64)>,
) {
    let mut samples: Vec<_> = samples.collect();
    samples.sort_unstable_by(|(a, _), (b, _)| {
        let values = |labels: &[(&'a str, &'a str); N]| labels.map(|(_, value)| value);
        values(a).cmp(&values(b))
    });
    let mut samples = samples.into_iter().peekable();
    while let Some((labels, mut total)) = samples.next() {
        while let Some((_, value)) = samples.next_if(|(next, _)| *next == labels) {
            total = total.saturating_add(value);
        }
        series(out, name, &labels);
        out.push(' ');
        out.push_str(itoa::Buffer::new().format(total));
        out.push('\n');
    }
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    series(out, name, labels);
    let _ = writeln!(out, " {value}");
}

/// A series' name and labels, `name{label="value",...}`.
fn series(out: &mut String, name: &str, labels: &[(&str, &str)]) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (label, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(label);
            out.push_str("=\"");
            escape_label_value(out, value);
            out.push('"');
        }
        out.push('}');
    }
}

/// The escapes the exposition format defines for label values.
fn escape_label_value(out: &mut String, value: &str) {
    let mut rest = value;
    // Copied in runs between escapes: label values rarely hold any.
    while let Some(at) = rest.find(['\\', '"', '\n']) {
        out.push_str(&rest[..at]);
        out.push_str(match rest.as_bytes()[at] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        });
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
}

/// A float as the exposition format spells it (`+Inf`, `-Inf`, `NaN`; Rust writes `inf`).
struct Float(f64);

impl std::fmt::Display for Float {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            v if v.is_nan() => f.write_str("NaN"),
            v if v == f64::INFINITY => f.write_str("+Inf"),
            v if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            v => write!(f, "{v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values() {
        let mut out = String::new();
        escape_label_value(&mut out, "a\\b\"c\nd");
        assert_eq!(out, r#"a\\b\"c\nd"#);
        for (value, escaped) in [
            ("", ""),
            ("radiology", "radiology"),
            ("\"", r#"\""#),
            ("é\"\"\\\nß", r#"é\"\"\\\nß"#),
            ("\n\nx\\", r#"\n\nx\\"#),
        ] {
            let mut out = String::new();
            escape_label_value(&mut out, value);
            assert_eq!(out, escaped, "{value:?}");
        }
    }

    #[test]
    fn empty_snapshot_has_fixed_series() {
        let text = MetricsSnapshot::default().render();
        assert!(text.contains("enforcer_policy_reload_total{outcome=\"success\"} 0\n"));
        assert!(text.contains("enforcer_policy_reload_total{outcome=\"failure\"} 0\n"));
        assert!(text.contains("enforcer_policy_revision_info{revision=\"\",commit=\"\"} 1\n"));
        assert!(text.contains("enforcer_policy_reload_failing 0\n"));
    }

    #[test]
    fn sums_repeated_label_sets_and_sorts() {
        let snapshot = MetricsSnapshot {
            forwarded: vec![
                ("ingress".into(), 2),
                ("egress".into(), 1),
                ("ingress".into(), 3),
            ],
            ..Default::default()
        };
        let text = snapshot.render();
        let egress = text.find("enforcer_forward_total{direction=\"egress\"} 1\n");
        let ingress = text.find("enforcer_forward_total{direction=\"ingress\"} 5\n");
        assert!(egress.unwrap() < ingress.unwrap(), "{text}");
    }

    #[test]
    fn verdict_series_are_summed_and_ordered_by_every_label() {
        let labels = |src: &str, dst: &str, direction: &str, action: &str| VerdictLabels {
            source_segment: src.into(),
            destination_segment: dst.into(),
            direction: direction.into(),
            action: action.into(),
            match_: "none".into(),
        };
        let snapshot = MetricsSnapshot {
            policy_verdicts: vec![
                (labels("pacs", "ehr", "ingress", "dropped"), 1),
                (labels("lab", "pacs", "ingress", "dropped"), 2),
                (labels("lab", "ehr", "ingress", "forwarded"), 3),
                (labels("lab", "ehr", "egress", "dropped"), 4),
                (labels("lab", "ehr", "ingress", "dropped"), 5),
                (labels("pacs", "ehr", "ingress", "dropped"), 6),
                (labels("lab", "ehr", "ingress", "dropped"), 7),
            ],
            ..Default::default()
        };
        let text = snapshot.render();
        let series: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("enforcer_policy_verdicts_total{"))
            .collect();
        let line = |src: &str, dst: &str, direction: &str, action: &str, value: u64| {
            format!(
                "enforcer_policy_verdicts_total{{source_segment=\"{src}\",destination_segment=\"{dst}\",direction=\"{direction}\",action=\"{action}\",match=\"none\"}} {value}"
            )
        };
        assert_eq!(
            series,
            [
                line("lab", "ehr", "egress", "dropped", 4),
                line("lab", "ehr", "ingress", "dropped", 12),
                line("lab", "ehr", "ingress", "forwarded", 3),
                line("lab", "pacs", "ingress", "dropped", 2),
                line("pacs", "ehr", "ingress", "dropped", 7),
            ]
        );
    }

    #[test]
    fn floats_use_exposition_spelling() {
        assert_eq!(Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Float(f64::NAN).to_string(), "NaN");
        assert_eq!(Float(0.25).to_string(), "0.25");
    }
}
