//! Monitor-mode rollout from the enforcer's flow log: `impact` (what enforcing would deny) and
//! `suggest` (allow rules for what a monitored segment received), as a library and on the
//! command line.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{example_dir, example_policy, example_sources, source};
use policy_compiler::diff::{ChangeKind, PolicyDiff};
use policy_compiler::evaluate::{Flow, Verdict};
use policy_compiler::flow_log::ObservedFlows;
use policy_compiler::impact::{AuditedBy, Impact};
use policy_compiler::reachability::source_classes;
use policy_compiler::suggest::{SuggestError, SuggestedSource, Suggestion};
use policy_compiler::{Mode, Policy};
use serde_json::{Value, json};

/// One flow log line as `enforcer run --flow-log` writes it. `traffic` is `tcp/PORT`,
/// `udp/PORT`, `icmp/TYPE`, `icmpv6/TYPE` or `proto/NUMBER`; the TCP/UDP source port is
/// `sport`. The segment names are deliberately stale: the tools must derive their own.
fn event(time: &str, src: &str, dst: &str, traffic: &str, sport: u16, verdict: &str) -> String {
    let (proto, value) = traffic.split_once('/').unwrap();
    let value: u16 = value.parse().unwrap();
    let (proto, sport, dport, icmp_type) = match proto {
        "tcp" | "udp" => (proto.to_string(), json!(sport), json!(value), Value::Null),
        "icmp" | "icmpv6" => (proto.to_string(), Value::Null, Value::Null, json!(value)),
        _ => (value.to_string(), Value::Null, Value::Null, Value::Null),
    };
    let reason = match verdict {
        "allow" => "allowed",
        "deny" => "policy_denied",
        _ => "audit",
    };
    json!({
        "time": format!("2024-05-01T{time}Z"),
        "iface": "eth0",
        "direction": "ingress",
        "src": src,
        "dst": dst,
        "sport": sport,
        "dport": dport,
        "proto": proto,
        "icmp_type": icmp_type,
        "src_segment": "stale-name",
        "dst_segment": "stale-name",
        "verdict": verdict,
        "reason": reason,
        "rule": null,
        "revision": "0123456789abcdef",
    })
    .to_string()
}

fn observed(lines: &[String]) -> ObservedFlows {
    let mut observed = ObservedFlows::default();
    observed.add_text("flows.jsonl", &(lines.join("\n") + "\n"));
    assert_eq!(observed.unreadable_count, 0, "{:?}", observed.unreadable);
    observed
}

/// A small hospital: icu monitored with `intra: deny`, ehr and pharmacy enforced, egress
/// monitored, world unenforced.
fn small_sources() -> Vec<(String, String)> {
    vec![
        source(
            "p/icu.yaml",
            "segment: icu\nmembers: [10.70.0.0/24, \"fd00:70::/64\"]\nmode: monitor\nintra: deny\n\
             allow:\n  - from: [ehr]\n    ports: [tcp/443]\n    reason: EHR reads vitals\n",
        ),
        source(
            "p/ehr.yaml",
            "segment: ehr\nmembers: [10.20.0.0/24, \"fd00:20::/64\"]\nmode: enforce\nallow:\n  \
             - from: [pharmacy]\n    ports: [tcp/2575]\n",
        ),
        source(
            "p/pharmacy.yaml",
            "segment: pharmacy\nmembers: [10.40.0.0/24, \"fd00:40::/64\"]\nmode: enforce\n",
        ),
        source("p/defaults.yaml", "egress: monitor\n"),
    ]
}

fn small_policy() -> Policy {
    Policy::from_sources(&small_sources()).unwrap_or_else(|e| panic!("{e}"))
}

fn addr(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn impact_lists_the_audited_flows_per_monitored_segment() {
    let policy = small_policy();
    let mut egress = event(
        "10:30:00.000",
        "10.40.0.20",
        "10.20.0.10",
        "tcp/22",
        41000,
        "audit",
    );
    egress = egress.replace("\"ingress\"", "\"egress\"");
    let lines = [
        // Would be denied: audited by icu's monitor mode.
        event(
            "10:00:00.000",
            "10.40.0.20",
            "10.70.0.10",
            "tcp/5432",
            40000,
            "audit",
        ),
        event(
            "10:05:00.000",
            "10.40.0.21",
            "10.70.0.10",
            "tcp/5432",
            40001,
            "audit",
        ),
        event(
            "09:00:00.000",
            "10.40.0.21",
            "10.70.0.11",
            "tcp/5432",
            40002,
            "audit",
        ),
        // Logged as denied by an older policy that enforced icu: audit now, so impact.
        event(
            "11:00:00.000",
            "fd00:40::20",
            "fd00:70::10",
            "udp/514",
            40003,
            "deny",
        ),
        // icu to icu with `intra: deny`: impact too.
        event(
            "11:30:00.000",
            "10.70.0.20",
            "10.70.0.10",
            "tcp/22",
            40004,
            "audit",
        ),
        // Allowed by icu's rule now (the log's policy audited it): not impact.
        event(
            "12:00:00.000",
            "10.20.0.10",
            "10.70.0.10",
            "tcp/443",
            40005,
            "audit",
        ),
        // Already denied (ehr is enforced): not impact.
        event(
            "12:00:00.000",
            "10.40.0.20",
            "10.20.0.10",
            "tcp/22",
            40006,
            "deny",
        ),
        // To world, which is unenforced: not impact.
        event(
            "12:00:00.000",
            "10.70.0.10",
            "10.99.0.10",
            "tcp/22",
            40007,
            "allow",
        ),
        // On egress with `egress: monitor`, denied by ehr's allow-list: impact of egress.
        egress,
    ];
    let observed = observed(&lines);
    let impact = Impact::of(&policy, "p/", &observed);
    assert_eq!(impact.policy.monitored, ["icu", "egress"]);
    assert_eq!(impact.events, 9);
    assert_eq!(impact.would_be_denied.flows, 4);
    assert_eq!(impact.would_be_denied.events, 6);
    let segments: Vec<&str> = impact.segments.iter().map(|s| s.segment.as_str()).collect();
    assert_eq!(segments, ["ehr", "icu"]);

    let ehr = &impact.segments[0];
    assert_eq!(ehr.mode, Mode::Enforce);
    assert_eq!(ehr.flows.len(), 1);
    assert_eq!(ehr.flows[0].audited_by, AuditedBy::Egress);
    assert_eq!(ehr.flows[0].traffic, "tcp/22");

    let icu = &impact.segments[1];
    assert_eq!(icu.mode, Mode::Monitor);
    let rows: Vec<(&str, &str, u64)> = icu
        .flows
        .iter()
        .map(|f| (f.from.as_str(), f.traffic.as_str(), f.seen.events))
        .collect();
    assert_eq!(
        rows,
        [
            ("icu", "tcp/22", 1),
            ("pharmacy", "tcp/5432", 3),
            ("pharmacy", "udp/514", 1)
        ]
    );
    let postgres = &icu.flows[1];
    assert_eq!(postgres.to, "icu");
    assert_eq!(
        (postgres.proto.as_str(), postgres.port),
        ("tcp", Some(5432))
    );
    assert_eq!(postgres.audited_by, AuditedBy::Mode);
    assert!(!postgres.likely_reply);
    assert_eq!(
        postgres.seen.first_seen.to_string(),
        "2024-05-01T09:00:00.000Z"
    );
    assert_eq!(
        postgres.seen.last_seen.to_string(),
        "2024-05-01T10:05:00.000Z"
    );
    let sources: Vec<(IpAddr, u64)> = postgres
        .sources
        .iter()
        .map(|s| (s.address, s.seen.events))
        .collect();
    assert_eq!(sources, [(addr("10.40.0.20"), 1), (addr("10.40.0.21"), 2)]);
    let destinations: Vec<(IpAddr, u64)> = postgres
        .destinations
        .iter()
        .map(|s| (s.address, s.seen.events))
        .collect();
    assert_eq!(
        destinations,
        [(addr("10.70.0.10"), 2), (addr("10.70.0.11"), 1)]
    );

    // The JSON field names are an interface for scripts.
    let json: Value = serde_json::from_str(&impact.to_json()).unwrap();
    assert_eq!(json["would_be_denied"], json!({"flows": 4, "events": 6}));
    assert_eq!(json["policy"]["source"], "p/");
    assert_eq!(json["log_revisions"], json!(["0123456789abcdef"]));
    let flow = &json["segments"][1]["flows"][1];
    for field in [
        "from",
        "to",
        "proto",
        "port",
        "traffic",
        "audited_by",
        "likely_reply",
        "events",
        "first_seen",
        "last_seen",
        "sources",
        "destinations",
    ] {
        assert!(flow.get(field).is_some(), "no {field} in {flow}");
    }
    assert_eq!(flow["audited_by"], "mode");
    assert_eq!(flow["sources"][1]["address"], "10.40.0.21");
    assert_eq!(flow["sources"][1]["events"], 2);
    assert_eq!(json["segments"][0]["flows"][0]["audited_by"], "egress");

    let table = impact.to_table();
    assert!(
        table.contains("icu (mode: monitor): 3 flows (5 events) would be denied"),
        "{table}"
    );
    assert!(
        table.contains("10.40.0.20 (1), 10.40.0.21 (2) -> 10.70.0.10 (2), 10.70.0.11 (1)"),
        "{table}"
    );
    assert!(table.contains("tcp/22 (egress)"), "{table}");
    assert!(
        table.contains("4 flows (6 events) to 2 segments would be denied once enforced"),
        "{table}"
    );
    let markdown = impact.to_markdown();
    assert!(
        markdown.contains("| `pharmacy` | `tcp/5432` | 3 |"),
        "{markdown}"
    );
}

#[test]
fn impact_on_the_example_policy_names_only_the_monitored_segment() {
    let policy = example_policy();
    assert_eq!(
        policy
            .segments()
            .iter()
            .filter(|s| s.mode == Mode::Monitor)
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["icu-telemetry"],
        "the example policy's monitored segments changed: update this test"
    );
    let lines = [
        event(
            "10:00:00.000",
            "10.40.0.20",
            "10.70.0.10",
            "tcp/5432",
            40000,
            "audit",
        ),
        event(
            "10:00:01.000",
            "10.10.0.20",
            "10.30.0.10",
            "tcp/104",
            40001,
            "allow",
        ),
        event(
            "10:00:02.000",
            "10.10.0.20",
            "10.30.0.10",
            "tcp/22",
            40002,
            "deny",
        ),
        event(
            "10:00:03.000",
            "10.20.0.10",
            "10.70.0.10",
            "tcp/443",
            40003,
            "allow",
        ),
        event(
            "10:00:04.000",
            "10.20.0.10",
            "10.70.0.10",
            "tcp/45000",
            443,
            "audit",
        ),
    ];
    let impact = Impact::of(&policy, "segments/", &observed(&lines));
    assert_eq!(impact.segments.len(), 1);
    let icu = &impact.segments[0];
    assert_eq!(icu.segment, "icu-telemetry");
    let rows: Vec<(&str, &str, bool)> = icu
        .flows
        .iter()
        .map(|f| (f.from.as_str(), f.traffic.as_str(), f.likely_reply))
        .collect();
    assert_eq!(
        rows,
        [
            ("ehr-core", "tcp/45000", true),
            ("pharmacy", "tcp/5432", false)
        ]
    );
    assert!(impact.to_table().contains("tcp/45000 (reply?)"));

    let quiet = [event(
        "10:00:01.000",
        "10.10.0.20",
        "10.30.0.10",
        "tcp/104",
        40001,
        "allow",
    )];
    let impact = Impact::of(&policy, "segments/", &observed(&quiet));
    assert!(impact.is_empty());
    assert!(
        impact
            .summary()
            .starts_with("nothing observed would be denied"),
        "{}",
        impact.summary()
    );
}

/// The suggestion appended to the end of the segment's `allow:` list (where it says to go).
fn with_suggestion(file_text: &str, suggestion: &str) -> String {
    let mut text = file_text.trim_end().to_string();
    match text.find("\nallow:") {
        Some(start) => {
            // The test files end with their allow list, so appending lands inside it.
            let after = &text[start + "\nallow:".len()..];
            assert!(
                after
                    .lines()
                    .skip(1)
                    .all(|line| line.is_empty() || line.starts_with(' ') || line.starts_with('#')),
                "`allow:` is not the last key of the file:\n{file_text}"
            );
        }
        None => text.push_str("\nallow:"),
    }
    text.push('\n');
    text.push_str(suggestion);
    text
}

/// Checks a suggestion the way a reviewer relies on it: pasted into the segment's file it
/// parses, admits every suggested flow, leaves skipped traffic audited, keeps the ids of the
/// existing rules, and opens nothing beyond the suggested (source, port) pairs.
fn check_pasted(
    sources: &[(String, String)],
    file: &str,
    suggestion: &Suggestion,
    observed: &ObservedFlows,
) -> Policy {
    let before = Policy::from_sources(sources).unwrap();
    let yaml = suggestion.to_yaml();
    let mut edited = sources.to_vec();
    let (_, text) = edited.iter_mut().find(|(name, _)| name == file).unwrap();
    *text = with_suggestion(text, &yaml);
    let pasted = text.clone();
    let after = Policy::from_sources(&edited).unwrap_or_else(|e| {
        panic!("the pasted suggestion does not load:\n{e}\n--- file ---\n{pasted}")
    });

    assert!(!suggestion.flows.is_empty());
    for flow in &suggestion.flows {
        let decision = after.evaluate(flow);
        assert_eq!(
            decision.verdict,
            Verdict::Allow,
            "{flow:?}: {decision:?}\n{yaml}"
        );
        assert_eq!(before.evaluate(flow).verdict, Verdict::Audit, "{flow:?}");
    }
    // What was skipped is still only audited.
    for key in observed.flows.keys() {
        let decision = before.evaluate(&key.flow);
        if decision.dst_segment != suggestion.segment || decision.verdict != Verdict::Audit {
            continue;
        }
        let suggested = suggestion.flows.contains(&key.flow);
        let logged_denied = key.logged == Verdict::Deny;
        assert_eq!(
            after.evaluate(&key.flow).verdict == Verdict::Allow,
            suggested,
            "{key:?} (logged denied: {logged_denied})\n{yaml}"
        );
    }
    // Existing rules keep their ids.
    for rule in before.rules() {
        if rule.segment == suggestion.segment && !rule.id.ends_with("/intra") {
            assert!(
                after
                    .rules()
                    .iter()
                    .any(|r| r.id == rule.id && r.line == rule.line)
            );
        }
    }

    // Nothing else opens: every reachability change is audit -> allowed, to the segment, from
    // a suggested source, on suggested ports.
    let diff = PolicyDiff::between(&before, "before", &after, "after");
    assert!(!diff.reachability.is_empty());
    assert!(
        diff.modes.is_empty() && diff.segments.is_empty(),
        "{}",
        diff.to_table()
    );
    // Exactly what was seen: (source, protocol, port) of every suggested flow.
    let seen: BTreeSet<(SuggestedSource, u8, u16)> = suggestion
        .flows
        .iter()
        .map(|flow| {
            let segment = before.evaluate(flow).src_segment;
            let source = if segment == "world" {
                SuggestedSource::Host(flow.src)
            } else {
                SuggestedSource::Segment(segment)
            };
            (source, flow.proto, flow.port.unwrap())
        })
        .collect();
    let classes = source_classes(&after);
    for change in &diff.reachability {
        assert_eq!(
            change.change,
            ChangeKind::AuditNowAllowed,
            "{}",
            diff.to_table()
        );
        assert_eq!(change.to, suggestion.segment, "{}", diff.to_table());
        let class = classes
            .iter()
            .find(|class| class.label == change.from)
            .unwrap_or_else(|| panic!("no source class {}", change.from));
        let source = match class.cidr {
            Some(cidr) if cidr.prefix_len() == 32 || cidr.prefix_len() == 128 => {
                SuggestedSource::Host(cidr.addr())
            }
            _ => SuggestedSource::Segment(class.segment.clone()),
        };
        assert!(!change.ports.other, "{}", diff.to_table());
        for (proto, max) in [(6u8, u16::MAX), (17, u16::MAX), (1, 255), (58, 255)] {
            let ranges = change.ports.ranges(proto).unwrap();
            for &(first, last) in ranges.ranges() {
                assert!(last <= max);
                for port in first..=last {
                    assert!(
                        seen.contains(&(source.clone(), proto, port))
                            && suggestion.admits(&source, proto, Some(port)),
                        "{source} -> {} proto {proto} port {port} opened but not seen:\n{}\n{yaml}",
                        change.to,
                        diff.to_table()
                    );
                }
            }
        }
    }
    after
}

#[test]
fn suggestion_for_the_example_icu_segment_admits_exactly_what_it_received() {
    let lines = [
        // Two pharmacy hosts, one port; lab on the same ports: one rule for both.
        event(
            "10:00:00.000",
            "10.40.0.20",
            "10.70.0.10",
            "tcp/5432",
            40000,
            "audit",
        ),
        event(
            "10:00:05.000",
            "10.40.0.20",
            "10.70.0.10",
            "tcp/5432",
            40010,
            "audit",
        ),
        event(
            "10:01:00.000",
            "10.40.0.21",
            "10.70.0.10",
            "tcp/5432",
            40001,
            "audit",
        ),
        event(
            "10:02:00.000",
            "10.40.0.21",
            "10.70.0.10",
            "tcp/8080",
            40002,
            "audit",
        ),
        event(
            "10:02:00.000",
            "10.40.0.21",
            "10.70.0.10",
            "tcp/8081",
            40002,
            "audit",
        ),
        event(
            "10:02:00.000",
            "10.40.0.21",
            "10.70.0.10",
            "tcp/8082",
            40002,
            "audit",
        ),
        event(
            "10:02:00.000",
            "10.40.0.21",
            "10.70.0.10",
            "tcp/8090",
            40002,
            "audit",
        ),
        event(
            "10:03:00.000",
            "10.50.0.21",
            "10.70.0.10",
            "tcp/5432",
            40003,
            "audit",
        ),
        event(
            "10:03:00.000",
            "10.50.0.21",
            "10.70.0.10",
            "tcp/8080",
            40003,
            "audit",
        ),
        event(
            "10:03:00.000",
            "10.50.0.21",
            "10.70.0.10",
            "tcp/8081",
            40003,
            "audit",
        ),
        event(
            "10:03:00.000",
            "10.50.0.21",
            "10.70.0.10",
            "tcp/8082",
            40003,
            "audit",
        ),
        event(
            "10:03:00.000",
            "10.50.0.21",
            "10.70.0.10",
            "tcp/8090",
            40003,
            "audit",
        ),
        // The NOC (in no segment) pings and polls SNMP, over both IP versions.
        event(
            "10:04:00.000",
            "10.99.0.10",
            "10.70.0.11",
            "icmp/8",
            0,
            "audit",
        ),
        event(
            "10:04:00.000",
            "fd00:99::10",
            "fd00:70::11",
            "icmpv6/128",
            0,
            "audit",
        ),
        event(
            "10:04:00.000",
            "10.99.0.10",
            "10.70.0.11",
            "udp/161",
            50000,
            "audit",
        ),
        // Radiology's UDP syslog, allowed by no rule.
        event(
            "10:05:00.000",
            "10.10.0.20",
            "10.70.0.10",
            "udp/514",
            50001,
            "audit",
        ),
        // Replies whose start was not seen, ICMP replies, GRE: not suggested.
        event(
            "10:06:00.000",
            "10.20.0.10",
            "10.70.0.10",
            "tcp/45123",
            443,
            "audit",
        ),
        event(
            "10:06:00.000",
            "10.20.0.10",
            "10.70.0.10",
            "icmp/0",
            0,
            "audit",
        ),
        event(
            "10:06:00.000",
            "10.40.0.20",
            "10.70.0.10",
            "proto/47",
            0,
            "audit",
        ),
        // Already allowed by icu's rules: not suggested.
        event(
            "10:07:00.000",
            "10.20.0.10",
            "10.70.0.10",
            "tcp/443",
            40004,
            "audit",
        ),
        // Denied when logged (never reached icu): not suggested.
        event(
            "10:08:00.000",
            "10.60.0.20",
            "10.70.0.10",
            "tcp/3389",
            40005,
            "deny",
        ),
        // To other segments: not suggested.
        event(
            "10:09:00.000",
            "10.40.0.20",
            "10.30.0.10",
            "tcp/104",
            40006,
            "deny",
        ),
    ];
    let observed = observed(&lines);
    let policy = example_policy();
    let suggestion = Suggestion::for_segment(&policy, "segments/", &observed, "icu-telemetry")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(suggestion.audited_events, 19);
    assert_eq!(suggestion.denied_events, 1);
    let rules: Vec<(Vec<String>, Vec<String>)> = suggestion
        .rules
        .iter()
        .map(|rule| {
            (
                rule.from.iter().map(ToString::to_string).collect(),
                rule.ports.iter().map(|p| p.entry()).collect(),
            )
        })
        .collect();
    let strings = |items: &[&str]| items.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(
        rules,
        [
            (
                strings(&["lab", "pharmacy"]),
                strings(&["tcp/5432", "tcp/8080-8082", "tcp/8090"])
            ),
            (strings(&["radiology"]), strings(&["udp/514"])),
            (
                strings(&["10.99.0.10/32"]),
                strings(&["udp/161", "icmp/echo-request"])
            ),
            (
                strings(&["fd00:99::10/128"]),
                strings(&["icmpv6/echo-request"])
            ),
        ]
    );
    let postgres = &suggestion.rules[0].ports[0];
    assert_eq!(postgres.seen.events, 4);
    assert_eq!(
        postgres.seen.first_seen.to_string(),
        "2024-05-01T10:00:00.000Z"
    );
    assert_eq!(
        postgres.seen.last_seen.to_string(),
        "2024-05-01T10:03:00.000Z"
    );
    let skipped: Vec<&str> = suggestion
        .skipped
        .iter()
        .map(|s| s.traffic.as_str())
        .collect();
    assert_eq!(skipped, ["icmp/echo-reply", "tcp/45123", "protocol 47"]);

    let yaml = suggestion.to_yaml();
    for expected in [
        "  - from: [lab, pharmacy]\n    ports:\n      - tcp/5432 ",
        "# 4 events, first seen 2024-05-01T10:00:00.000Z, last seen 2024-05-01T10:03:00.000Z",
        "- tcp/8080-8082  # 6 events, first seen 2024-05-01T10:02:00.000Z, last seen 2024-05-01T10:03:00.000Z",
        "ports seen: 8080, 8081, 8082",
        "  - from: [\"10.99.0.10/32\"]",
        "  - from: [\"fd00:99::10/128\"]",
        "    reason: \"TODO: why radiology needs udp/514 (seen in monitor mode)\"",
        "#   tcp/45123 from ehr-core (10.20.0.10, source port 443) to 10.70.0.10",
        "end of the `allow:` list of",
        "not considered: 1 event denied when logged",
    ] {
        assert!(yaml.contains(expected), "{expected:?} missing in:\n{yaml}");
    }
    for line in yaml.lines() {
        assert!(
            line.trim_start().starts_with('#') || line.starts_with("  ") || line.is_empty(),
            "a line that would not stay inside the allow list: {line:?}"
        );
    }

    let (file, _) = example_sources()
        .into_iter()
        .find(|(name, _)| name.ends_with("/icu-telemetry.yaml"))
        .unwrap();
    let after = check_pasted(&example_sources(), &file, &suggestion, &observed);
    // The first suggested rule follows icu-telemetry's two rules.
    let decision = after.evaluate(&Flow {
        src: addr("10.40.0.20"),
        dst: addr("10.70.0.10"),
        proto: 6,
        port: Some(5432),
    });
    assert_eq!(decision.rule.as_deref(), Some("icu-telemetry/3"));
}

#[test]
fn suggestion_for_a_small_policy_with_intra_deny_and_no_rules() {
    let mut sources = small_sources();
    // A monitored segment without any rule yet: the suggestion must say to add `allow:`.
    sources.push(source(
        "p/lab.yaml",
        "segment: lab\nmembers: [10.50.0.0/24, \"fd00:50::/64\"]\nmode: monitor\n",
    ));
    let policy = Policy::from_sources(&sources).unwrap();
    let lines = [
        event(
            "10:00:00.000",
            "10.70.0.20",
            "10.70.0.10",
            "tcp/22",
            40000,
            "audit",
        ),
        event(
            "10:00:00.000",
            "fd00:70::20",
            "fd00:70::10",
            "tcp/23",
            40000,
            "audit",
        ),
        event(
            "10:00:00.000",
            "10.40.0.20",
            "10.70.0.10",
            "udp/123",
            123,
            "audit",
        ),
        event(
            "10:00:00.000",
            "10.40.0.20",
            "10.50.0.10",
            "tcp/80",
            40001,
            "audit",
        ),
        event(
            "10:00:00.000",
            "10.1.2.3",
            "10.50.0.10",
            "tcp/80",
            40002,
            "audit",
        ),
    ];
    let observed = observed(&lines);

    let icu = Suggestion::for_segment(&policy, "p/", &observed, "icu").unwrap();
    let rules: Vec<String> = icu.rules.iter().map(|r| r.from[0].to_string()).collect();
    assert_eq!(rules, ["icu", "pharmacy"]);
    assert!(
        icu.to_yaml()
            .contains("  - from: [icu]\n    ports:\n      - tcp/22-23 ")
    );
    check_pasted(&sources, "p/icu.yaml", &icu, &observed);

    let lab = Suggestion::for_segment(&policy, "p/", &observed, "lab").unwrap();
    assert!(!lab.has_rules);
    let yaml = lab.to_yaml();
    assert!(
        yaml.contains("under a new `allow:` in p/lab.yaml"),
        "{yaml}"
    );
    assert!(
        yaml.contains("  - from: [pharmacy, \"10.1.2.3/32\"]"),
        "{yaml}"
    );
    check_pasted(&sources, "p/lab.yaml", &lab, &observed);
}

#[test]
fn suggest_refuses_segments_it_cannot_help_with() {
    let policy = example_policy();
    let observed = observed(&[event(
        "10:00:00.000",
        "10.40.0.20",
        "10.70.0.10",
        "tcp/5432",
        40000,
        "audit",
    )]);
    let error =
        Suggestion::for_segment(&policy, "segments/", &observed, "icu-telemetri").unwrap_err();
    assert!(matches!(error, SuggestError::UnknownSegment { .. }));
    assert!(
        error
            .to_string()
            .contains("hint: did you mean 'icu-telemetry'?"),
        "{error}"
    );
    let error = Suggestion::for_segment(&policy, "segments/", &observed, "finance").unwrap_err();
    assert!(
        error
            .to_string()
            .contains("the segments are: billing, ehr-core"),
        "{error}"
    );

    let error = Suggestion::for_segment(&policy, "segments/", &observed, "pacs").unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("segment 'pacs' is in mode enforce, not monitor"),
        "{message}"
    );
    assert!(
        message.contains("hint: set `mode: monitor` in "),
        "{message}"
    );
    assert!(message.contains("pacs.yaml"), "{message}");

    let error = Suggestion::for_segment(&policy, "segments/", &observed, "world").unwrap_err();
    assert_eq!(error, SuggestError::World);

    // Nothing audited to the segment: an empty suggestion, not an error.
    let quiet = observed_with_only_allowed();
    let suggestion =
        Suggestion::for_segment(&policy, "segments/", &quiet, "icu-telemetry").unwrap();
    assert_eq!(suggestion.audited_events, 0);
    assert!(suggestion.is_empty());
}

fn observed_with_only_allowed() -> ObservedFlows {
    observed(&[event(
        "10:00:00.000",
        "10.20.0.10",
        "10.70.0.10",
        "tcp/443",
        40000,
        "allow",
    )])
}

// --- the command line ---------------------------------------------------------------------

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_policy-compiler"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_string()
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "policy-compiler-monitor-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn copy_example(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for (file, content) in example_sources() {
        std::fs::write(to.join(file.rsplit('/').next().unwrap()), content).unwrap();
    }
}

fn show(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn cli_impact_exit_codes_and_formats() {
    let dir = scratch_dir("impact");
    let log = dir.join("flows.jsonl");
    let rotated = dir.join("flows.jsonl.1");
    std::fs::write(
        &rotated,
        event(
            "09:00:00.000",
            "10.40.0.20",
            "10.70.0.10",
            "tcp/5432",
            40000,
            "audit",
        ) + "\n",
    )
    .unwrap();
    std::fs::write(
        &log,
        [
            event(
                "10:00:00.000",
                "10.40.0.21",
                "10.70.0.10",
                "tcp/5432",
                40001,
                "audit",
            ),
            "{\"truncated\": ".to_string(),
            event(
                "10:00:01.000",
                "10.10.0.20",
                "10.30.0.10",
                "tcp/104",
                40002,
                "allow",
            ),
        ]
        .join("\n")
            + "\n",
    )
    .unwrap();
    let example = show(&example_dir());

    let output = run(&["impact", &example, "--flows", &show(&log), &show(&rotated)]);
    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("icu-telemetry (mode: monitor): 1 flow (2 events) would be denied"),
        "{stdout}"
    );
    assert!(stdout.contains("pharmacy  tcp/5432"), "{stdout}");
    assert!(stdout.contains("3 flow events read from"), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "{}:2: warning: line skipped: not a flow event",
            show(&log)
        )),
        "{stderr}"
    );

    // The same with repeated --flows, as JSON.
    let output = run(&[
        "impact",
        &example,
        "--flows",
        &show(&log),
        "--flows",
        &show(&rotated),
        "--format",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json["would_be_denied"]["events"], 2);
    assert_eq!(json["unreadable_lines"], 1);
    assert_eq!(json["unreadable"][0]["line"], 2);
    assert_eq!(json["segments"][0]["segment"], "icu-telemetry");
    assert_eq!(json["files"][1]["events"], 1);

    let output = run(&[
        "impact",
        &example,
        "--flows",
        &show(&log),
        "--format",
        "markdown",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stdout).starts_with("### Impact of enforcing"));

    // `enforcer observe --output json | policy-compiler impact DIR --flows -`
    let mut child = Command::new(env!("CARGO_BIN_EXE_policy-compiler"))
        .args(["impact", &example, "--flows", "-", "--format", "json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("binary runs");
    let piped = std::fs::read(&rotated).unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &piped).unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json["files"][0]["file"], "<stdin>");
    assert_eq!(json["would_be_denied"]["events"], 1);

    // Nothing would be denied: 0.
    let quiet = dir.join("quiet.jsonl");
    std::fs::write(
        &quiet,
        event(
            "10:00:01.000",
            "10.10.0.20",
            "10.30.0.10",
            "tcp/104",
            40002,
            "allow",
        ) + "\n",
    )
    .unwrap();
    let output = run(&["impact", &example, "--flows", &show(&quiet)]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("nothing observed would be denied"));

    // Errors: 2.
    let missing = dir.join("missing.jsonl");
    let output = run(&["impact", &example, "--flows", &show(&missing)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("cannot read the flow log"),
        "{}",
        text(&output.stderr)
    );
    let garbage = dir.join("garbage.log");
    std::fs::write(&garbage, "kernel: something\nmore\n").unwrap();
    let output = run(&["impact", &example, "--flows", &show(&garbage)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("is a flow event"),
        "{}",
        text(&output.stderr)
    );
    let output = run(&["impact", &example, "--flows", &show(&log), &show(&log)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("is given twice"));
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("pacs.yaml"),
        "segment: pacs\nmembers: [10.30.0.1/24]\n",
    )
    .unwrap();
    let output = run(&["impact", &show(&broken), "--flows", &show(&log)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("host bits set"),
        "{}",
        text(&output.stderr)
    );
    let output = run(&["impact", &example]);
    assert_eq!(output.status.code(), Some(2), "--flows is required");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The whole loop on the command line: suggest, paste into the segment's file, check, and the
/// suggested flows are no longer impact (what was skipped still is).
#[test]
fn cli_suggest_pasted_into_the_policy_passes_check_and_clears_the_impact() {
    let dir = scratch_dir("suggest");
    let policy_dir = dir.join("segments");
    copy_example(&policy_dir);
    let log = dir.join("flows.jsonl");
    std::fs::write(
        &log,
        [
            event(
                "10:00:00.000",
                "10.40.0.20",
                "10.70.0.10",
                "tcp/5432",
                40000,
                "audit",
            ),
            event(
                "10:00:00.000",
                "10.40.0.20",
                "10.70.0.10",
                "tcp/5433",
                40000,
                "audit",
            ),
            event(
                "10:00:00.000",
                "10.99.0.10",
                "10.70.0.10",
                "icmp/8",
                0,
                "audit",
            ),
            event(
                "10:00:00.000",
                "10.20.0.10",
                "10.70.0.10",
                "udp/50000",
                53,
                "audit",
            ),
        ]
        .join("\n")
            + "\n",
    )
    .unwrap();
    let output = run(&[
        "suggest",
        &show(&policy_dir),
        "--flows",
        &show(&log),
        "--segment",
        "icu-telemetry",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let yaml = text(&output.stdout);
    assert!(
        yaml.contains("  - from: [pharmacy]\n    ports:\n      - tcp/5432-5433"),
        "{yaml}"
    );
    assert!(yaml.contains("#   udp/50000 from ehr-core"), "{yaml}");

    let file = policy_dir.join("icu-telemetry.yaml");
    let content = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, with_suggestion(&content, &yaml)).unwrap();
    let output = run(&["check", &show(&policy_dir)]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}\n{yaml}",
        text(&output.stderr)
    );

    let output = run(&[
        "impact",
        &show(&policy_dir),
        "--flows",
        &show(&log),
        "--format",
        "json",
    ]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "the skipped reply is still impact"
    );
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["would_be_denied"]["flows"], 1);
    assert_eq!(json["segments"][0]["flows"][0]["traffic"], "udp/50000");
    assert_eq!(json["segments"][0]["flows"][0]["likely_reply"], true);

    // Errors say how to fix them; exit code 2.
    let output = run(&[
        "suggest",
        &show(&policy_dir),
        "--flows",
        &show(&log),
        "--segment",
        "pacs",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("is in mode enforce, not monitor")
            && stderr.contains("hint: set `mode: monitor`"),
        "{stderr}"
    );
    let output = run(&[
        "suggest",
        &show(&policy_dir),
        "--flows",
        &show(&log),
        "--segment",
        "icu",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("'icu' is not a segment of"),
        "{}",
        text(&output.stderr)
    );

    // No audited flow to the segment: a note, exit 0, nothing on stdout.
    let quiet = dir.join("quiet.jsonl");
    std::fs::write(
        &quiet,
        event(
            "10:00:01.000",
            "10.10.0.20",
            "10.30.0.10",
            "tcp/104",
            40002,
            "allow",
        ) + "\n",
    )
    .unwrap();
    let output = run(&[
        "suggest",
        &show(&policy_dir),
        "--flows",
        &show(&quiet),
        "--segment",
        "icu-telemetry",
    ]);
    assert_eq!(output.status.code(), Some(0));
    assert!(output.stdout.is_empty());
    assert!(
        text(&output.stderr).contains("note: no audited flow to icu-telemetry"),
        "{}",
        text(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
