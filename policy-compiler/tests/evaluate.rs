//! The reference evaluator on hand-picked flows.

mod common;

use std::net::IpAddr;

use common::{example_policy, source};
use policy_compiler::{Decision, Flow, Policy, Verdict};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn judge(policy: &Policy, src: &str, dst: &str, proto: u8, port: Option<u16>) -> Decision {
    policy.evaluate(&Flow {
        src: ip(src),
        dst: ip(dst),
        proto,
        port,
    })
}

#[track_caller]
fn expect_allowed(policy: &Policy, src: &str, dst: &str, proto: u8, port: u16, rule: &str) {
    let decision = judge(policy, src, dst, proto, Some(port));
    assert_eq!(decision.verdict, Verdict::Allow, "{decision:?}");
    assert_eq!(decision.rule.as_deref(), Some(rule), "{decision:?}");
    let index = decision.rule_index.expect("allowed by a rule has an index");
    assert_eq!(policy.rule(index).map(|r| r.id.as_str()), Some(rule));
}

#[track_caller]
fn expect_denied(policy: &Policy, src: &str, dst: &str, proto: u8, port: Option<u16>) {
    let decision = judge(policy, src, dst, proto, port);
    assert_eq!(decision.verdict, Verdict::Deny, "{decision:?}");
    assert_eq!(decision.rule, None);
    assert_eq!(decision.rule_index, None);
}

const RADIOLOGY: &str = "10.10.0.5";
const EHR: &str = "10.20.0.5";
const PACS: &str = "10.30.0.5";
const PHARMACY: &str = "10.40.0.5";
const LAB: &str = "10.50.0.5";
const BILLING: &str = "10.60.0.5";
const ICU: &str = "10.70.0.5";

#[test]
fn clinical_flows_are_allowed_by_the_right_rule() {
    let p = example_policy();
    expect_allowed(&p, RADIOLOGY, PACS, TCP, 104, "pacs/1");
    expect_allowed(&p, EHR, PACS, TCP, 11112, "pacs/1");
    expect_allowed(&p, RADIOLOGY, PACS, TCP, 443, "pacs/2");
    for src in [RADIOLOGY, LAB, PHARMACY, BILLING, ICU] {
        expect_allowed(&p, src, EHR, TCP, 443, "ehr-core/1");
    }
    for src in [LAB, RADIOLOGY, ICU] {
        expect_allowed(&p, src, EHR, TCP, 2575, "ehr-core/2");
    }
    expect_allowed(&p, EHR, PHARMACY, TCP, 443, "pharmacy/1");
    expect_allowed(&p, EHR, LAB, TCP, 2575, "lab/1");
    expect_allowed(&p, EHR, BILLING, TCP, 5432, "billing/1");
    expect_allowed(&p, EHR, ICU, TCP, 443, "icu-telemetry/1");
    for dst in [RADIOLOGY, PACS, PHARMACY, LAB, BILLING, ICU] {
        let decision = judge(&p, EHR, dst, ICMP, Some(8));
        assert_eq!(decision.verdict, Verdict::Allow, "{decision:?}");
    }
    let decision = judge(&p, RADIOLOGY, PACS, TCP, Some(104));
    assert_eq!(decision.src_segment, "radiology");
    assert_eq!(decision.dst_segment, "pacs");
    assert_eq!(
        decision.reason,
        "allowed by pacs/1: DICOM from modalities, workstations and the EHR"
    );
}

#[test]
fn lateral_moves_are_denied() {
    let p = example_policy();
    expect_denied(&p, RADIOLOGY, BILLING, TCP, Some(5432));
    expect_denied(&p, RADIOLOGY, PHARMACY, TCP, Some(443));
    expect_denied(&p, PACS, BILLING, TCP, Some(5432));
    expect_denied(&p, LAB, PACS, TCP, Some(104));
    expect_denied(&p, EHR, BILLING, TCP, Some(443));
    expect_denied(&p, EHR, PACS, TCP, Some(22));
    let decision = judge(&p, RADIOLOGY, BILLING, TCP, Some(5432));
    assert_eq!(
        decision.reason,
        "no rule of billing allows tcp/5432 from radiology"
    );
}

#[test]
fn monitor_mode_reports_audit() {
    let p = example_policy();
    let decision = judge(&p, LAB, ICU, TCP, Some(22));
    assert_eq!(decision.verdict, Verdict::Audit);
    assert_eq!(decision.rule, None);
    assert!(decision.reason.contains("monitor"), "{}", decision.reason);
    // Allowed flows into a monitored segment are still plain allows.
    expect_allowed(&p, EHR, ICU, TCP, 443, "icu-telemetry/1");
}

#[test]
fn world_is_not_enforced_by_default() {
    let p = example_policy();
    let decision = judge(&p, PACS, "8.8.8.8", UDP, Some(53));
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.rule, None);
    assert_eq!(decision.dst_segment, "world");
    assert!(decision.reason.contains("not enforced"));
    // From world into a segment is judged.
    expect_denied(&p, "8.8.8.8", PACS, TCP, Some(104));
}

#[test]
fn intra_allow_is_the_pseudo_rule() {
    let p = example_policy();
    expect_allowed(&p, "10.30.0.1", "10.30.0.2", TCP, 5, "pacs/intra");
    let decision = judge(&p, "10.30.0.1", "10.30.0.2", 47, None);
    assert_eq!(decision.rule.as_deref(), Some("pacs/intra"));
}

#[test]
fn noc_cidr_rule_and_icmp_names() {
    let p = example_policy();
    expect_allowed(&p, "10.99.3.4", PACS, ICMP, 8, "noc-monitoring-pacs");
    expect_allowed(&p, "10.99.3.4", PACS, TCP, 22, "noc-monitoring-pacs");
    expect_allowed(&p, "10.99.3.4", EHR, UDP, 161, "noc-monitoring-ehr-core");
    expect_denied(&p, "10.99.3.4", PACS, ICMP, Some(0));
    expect_denied(&p, "10.98.3.4", PACS, TCP, Some(22));
    expect_denied(&p, "10.99.3.4", BILLING, TCP, Some(22));
    let decision = judge(&p, "10.99.3.4", PACS, ICMP, Some(8));
    assert_eq!(decision.src_segment, "world");
    let decision = judge(&p, LAB, PACS, ICMP, Some(8));
    assert_eq!(
        decision.reason,
        "no rule of pacs allows icmp/echo-request from lab"
    );
}

#[test]
fn ipv6_flows() {
    let p = example_policy();
    expect_allowed(&p, "fd00:10::5", "fd00:30::7", TCP, 104, "pacs/1");
    expect_allowed(&p, "fd00:20::1", "fd00:60::1", ICMPV6, 128, "billing/2");
    expect_allowed(
        &p,
        "fd00:99::1",
        "fd00:20::1",
        ICMPV6,
        128,
        "noc-monitoring-ehr-core",
    );
    expect_denied(&p, "fd00:10::5", "fd00:60::7", TCP, Some(5432));
    // ICMP (proto 1) echo-request is type 8, ICMPv6's is 128: matching is by protocol number.
    expect_denied(&p, "fd00:20::1", "fd00:60::1", ICMPV6, Some(8));
    let decision = judge(&p, "fd00:30::1", "2001:db8::1", TCP, Some(443));
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.dst_segment, "world");
}

fn policy(files: &[(&str, &str)]) -> Policy {
    let sources: Vec<(String, String)> = files
        .iter()
        .map(|(name, text)| source(&format!("segments/{name}.yaml"), text))
        .collect();
    Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn intra_deny_lets_the_allow_list_decide() {
    let p = policy(&[
        (
            "vault",
            "segment: vault\nmembers: [10.1.0.0/16]\nintra: deny\nallow:\n  - from: [vault]\n    ports: [tcp/22]\n  - from: any\n    ports: [icmp/echo-request]\n",
        ),
        ("other", "segment: other\nmembers: [10.2.0.0/16]\n"),
    ]);
    expect_allowed(&p, "10.1.0.1", "10.1.0.2", TCP, 22, "vault/1");
    expect_allowed(&p, "10.1.0.1", "10.1.0.2", ICMP, 8, "vault/2");
    expect_allowed(&p, "10.2.0.1", "10.1.0.2", ICMP, 8, "vault/2");
    expect_denied(&p, "10.1.0.1", "10.1.0.2", TCP, Some(80));
    expect_denied(&p, "10.2.0.1", "10.1.0.2", TCP, Some(22));
    assert!(p.rules().iter().all(|rule| rule.id != "vault/intra"));
}

#[test]
fn intra_wins_over_earlier_rules() {
    let p = policy(&[(
        "web",
        "segment: web\nmembers: [10.1.0.0/16]\nallow:\n  - from: any\n    ports: any\n",
    )]);
    expect_allowed(&p, "10.1.0.1", "10.1.0.2", TCP, 80, "web/intra");
    expect_allowed(&p, "10.9.0.1", "10.1.0.2", TCP, 80, "web/1");
}

#[test]
fn longest_member_prefix_and_any_ports() {
    let p = policy(&[
        (
            "campus",
            "segment: campus\nmembers: [10.0.0.0/8]\nallow:\n  - from: [world]\n    ports: [tcp/any]\n",
        ),
        (
            "servers",
            "segment: servers\nmembers: [10.5.0.0/16, 10.6.0.1]\nallow:\n  - from: [campus]\n    ports: [tcp/8080-8090]\n  - from: [10.7.0.0/16]\n    ports: [any]\n",
        ),
    ]);
    expect_allowed(&p, "10.1.0.1", "10.5.0.1", TCP, 8085, "servers/1");
    expect_denied(&p, "10.1.0.1", "10.5.0.1", TCP, Some(8091));
    // 10.6.0.1 is a bare address: a /32 member of servers; 10.6.0.2 is campus.
    expect_allowed(&p, "10.1.0.1", "10.6.0.1", TCP, 8080, "servers/1");
    let decision = judge(&p, "10.1.0.1", "10.6.0.2", TCP, Some(8080));
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.rule.as_deref(), Some("campus/intra"));
    // A CIDR source matches whatever its segment (10.7/16 is inside campus).
    expect_allowed(&p, "10.7.1.1", "10.5.0.1", 47, 0, "servers/2");
    let decision = judge(&p, "10.7.1.1", "10.5.0.1", TCP, None);
    assert_eq!(decision.rule.as_deref(), Some("servers/2"));
    // No port information matches only `any`.
    expect_denied(&p, "10.1.0.1", "10.5.0.1", TCP, None);
    expect_denied(&p, "8.8.8.8", "10.1.0.1", TCP, None);
    expect_allowed(&p, "8.8.8.8", "10.1.0.1", TCP, 1, "campus/1");
    expect_denied(&p, "8.8.8.8", "10.1.0.1", UDP, Some(1));
}

#[test]
fn world_rules_when_world_is_enforced() {
    let sources = vec![
        source("p/app.yaml", "segment: app\nmembers: [10.1.0.0/16]\n"),
        source(
            "p/defaults.yaml",
            "world:\n  mode: monitor\n  allow:\n    - from: app\n      ports: [tcp/443]\n      reason: updates\n",
        ),
    ];
    let p = Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"));
    expect_allowed(&p, "10.1.0.1", "1.1.1.1", TCP, 443, "world/1");
    let decision = judge(&p, "10.1.0.1", "1.1.1.1", TCP, Some(80));
    assert_eq!(decision.verdict, Verdict::Audit);
    // world members have no intra pseudo-rule.
    let decision = judge(&p, "2.2.2.2", "1.1.1.1", TCP, Some(80));
    assert_eq!(decision.verdict, Verdict::Audit);
}

fn judge_with(
    policy: &Policy,
    src: &str,
    dst: &str,
    proto: u8,
    port: Option<u16>,
    quarantined: &[&str],
) -> Decision {
    let overrides = policy_compiler::Overrides {
        quarantined: quarantined.iter().map(|a| ip(a)).collect(),
        ..Default::default()
    };
    policy.evaluate_with(
        &Flow {
            src: ip(src),
            dst: ip(dst),
            proto,
            port,
        },
        &overrides,
        0,
    )
}

const REMEDIATION: &str = "10.80.0.5";
const NOC: &str = "10.99.0.7";

#[test]
fn a_quarantined_host_is_in_the_quarantine_segment_both_ways() {
    let p = example_policy();
    // Healthy: radiology reaches the PACS, the PACS reaches radiology.
    let healthy = judge_with(&p, RADIOLOGY, PACS, TCP, Some(104), &[]);
    assert_eq!(healthy, judge(&p, RADIOLOGY, PACS, TCP, Some(104)));
    assert_eq!(healthy.verdict, Verdict::Allow);

    let q = [RADIOLOGY];
    let out = judge_with(&p, RADIOLOGY, PACS, TCP, Some(104), &q);
    assert_eq!(out.verdict, Verdict::Deny, "{out:?}");
    assert_eq!(out.src_segment, "quarantine");
    assert_eq!(out.dst_segment, "pacs");
    let inbound = judge_with(&p, PACS, RADIOLOGY, TCP, Some(104), &q);
    assert_eq!(inbound.verdict, Verdict::Deny, "{inbound:?}");
    assert_eq!(inbound.dst_segment, "quarantine");
    // What quarantine.yaml and `from: quarantine` allow.
    let to_remediation = judge_with(&p, RADIOLOGY, REMEDIATION, TCP, Some(443), &q);
    assert_eq!(to_remediation.rule.as_deref(), Some("remediation/1"));
    let repair = judge_with(&p, REMEDIATION, RADIOLOGY, TCP, Some(22), &q);
    assert_eq!(repair.rule.as_deref(), Some("quarantine/1"));
    // Essential traffic still reaches it.
    let pmtu = judge_with(&p, "8.8.8.8", RADIOLOGY, ICMP, Some(3), &q);
    assert_eq!(pmtu.rule.as_deref(), Some("quarantine/essential"));
    // Its own segment's intra: allow is gone: quarantined hosts do not reach each other, nor
    // its old neighbours.
    let neighbour = "10.10.0.6";
    assert_eq!(
        judge_with(&p, RADIOLOGY, neighbour, TCP, Some(445), &[])
            .rule
            .as_deref(),
        Some("radiology/intra")
    );
    assert_eq!(
        judge_with(&p, RADIOLOGY, neighbour, TCP, Some(445), &q).verdict,
        Verdict::Deny
    );
    assert_eq!(
        judge_with(
            &p,
            RADIOLOGY,
            neighbour,
            TCP,
            Some(445),
            &[RADIOLOGY, neighbour]
        )
        .verdict,
        Verdict::Deny
    );
    // Traffic between other hosts is untouched.
    assert_eq!(
        judge_with(&p, EHR, PACS, TCP, Some(104), &q),
        judge(&p, EHR, PACS, TCP, Some(104))
    );
}

#[test]
fn a_quarantined_source_matches_quarantine_and_any_never_a_cidr() {
    // The NOC reaches the PACS by a CIDR rule; quarantined, it does not.
    let p = example_policy();
    assert_eq!(
        judge_with(&p, NOC, PACS, TCP, Some(22), &[])
            .rule
            .as_deref(),
        Some("noc-monitoring-pacs")
    );
    assert_eq!(
        judge_with(&p, NOC, PACS, TCP, Some(22), &[NOC]).verdict,
        Verdict::Deny
    );
    // `any` still matches it; a monitored destination audits it.
    let policy = Policy::from_sources(&[
        source(
            "segments/web.yaml",
            "segment: web\nmembers: [10.1.0.0/24]\nallow:\n  - from: [10.0.0.0/8]\n    ports: [tcp/22]\n  - from: any\n    ports: [tcp/443]\n",
        ),
        source(
            "segments/watch.yaml",
            "segment: watch\nmembers: [10.2.0.0/24]\nmode: monitor\n",
        ),
    ])
    .unwrap();
    let q = ["10.3.0.1"];
    assert_eq!(
        judge_with(&policy, "10.3.0.1", "10.1.0.1", TCP, Some(22), &[]).verdict,
        Verdict::Allow
    );
    assert_eq!(
        judge_with(&policy, "10.3.0.1", "10.1.0.1", TCP, Some(22), &q).verdict,
        Verdict::Deny
    );
    assert_eq!(
        judge_with(&policy, "10.3.0.1", "10.1.0.1", TCP, Some(443), &q)
            .rule
            .as_deref(),
        Some("web/2")
    );
    let audited = judge_with(&policy, "10.3.0.1", "10.2.0.1", TCP, Some(80), &q);
    assert_eq!(audited.verdict, Verdict::Audit);
    // The built-in quarantine segment (no file) is reached by nobody but essential traffic.
    let inbound = judge_with(&policy, "10.1.0.1", "10.3.0.1", TCP, Some(443), &q);
    assert_eq!(inbound.verdict, Verdict::Deny);
    assert_eq!(inbound.dst_segment, "quarantine");
    // A quarantined address in `world` as well: IPv6 too.
    let v6 = judge_with(
        &policy,
        "2001:db8::1",
        "10.1.0.1",
        TCP,
        Some(443),
        &["2001:db8::1"],
    );
    assert_eq!(v6.src_segment, "quarantine");
}
