//! Break-glass grants in the reference evaluator (`Policy::evaluate_with`).

mod common;

use std::net::IpAddr;

use common::{errors_of, example_policy, source};
use policy_compiler::{Decision, Flow, Grant, Overrides, Policy, Verdict, breakglass::parse_ports};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICU: &str = "10.70.0.10";
const PACS: &str = "10.30.0.10";
const RADIOLOGY: &str = "10.10.0.10";
const LAB: &str = "10.50.0.10";

fn grant(id: u32, from: &str, to: &str, ports: &[&str], expires_ns: u64) -> Grant {
    Grant {
        id,
        from: from.to_string(),
        to: to.to_string(),
        ports: parse_ports(ports).unwrap(),
        expires_ns,
    }
}

fn with_grants(grants: Vec<Grant>) -> Overrides {
    Overrides {
        grants,
        ..Overrides::default()
    }
}

fn judge(
    policy: &Policy,
    overrides: &Overrides,
    now_ns: u64,
    src: &str,
    dst: &str,
    proto: u8,
    port: u16,
) -> Decision {
    let ip = |text: &str| text.parse::<IpAddr>().unwrap();
    policy.evaluate_with(
        &Flow {
            src: ip(src),
            dst: ip(dst),
            proto,
            port: Some(port),
        },
        overrides,
        now_ns,
    )
}

#[test]
fn a_live_grant_opens_exactly_its_pair_and_ports() {
    let policy = example_policy();
    let overrides = with_grants(vec![grant(
        5,
        "icu-telemetry",
        "pacs",
        &["tcp/104", "udp/2000-2010"],
        1_000,
    )]);
    let without = judge(&policy, &Overrides::default(), 0, ICU, PACS, TCP, 104);
    assert_eq!(without.verdict, Verdict::Deny);

    let opened = judge(&policy, &overrides, 999, ICU, PACS, TCP, 104);
    assert_eq!(opened.verdict, Verdict::Allow, "{opened:?}");
    assert_eq!(opened.rule.as_deref(), Some("breakglass/5"));
    assert_eq!(opened.grant, Some(5));
    assert_eq!(opened.rule_index, None);
    assert!(opened.reason.contains("break-glass grant 5"), "{opened:?}");
    assert_eq!(
        judge(&policy, &overrides, 0, ICU, PACS, UDP, 2005).verdict,
        Verdict::Allow
    );

    // Other ports, protocols, pairs and directions stay denied.
    for (src, dst, proto, port) in [
        (ICU, PACS, TCP, 11112),
        (ICU, PACS, UDP, 104),
        (ICU, PACS, UDP, 2011),
        (LAB, PACS, TCP, 104),
        (PACS, ICU, TCP, 104),
        (ICU, "10.60.0.10", TCP, 104),
    ] {
        let decision = judge(&policy, &overrides, 0, src, dst, proto, port);
        assert_ne!(decision.verdict, Verdict::Allow, "{decision:?}");
        assert_eq!(decision.grant, None);
    }
}

#[test]
fn an_expired_grant_is_ignored() {
    let policy = example_policy();
    let overrides = with_grants(vec![grant(1, "icu-telemetry", "pacs", &["tcp/104"], 1_000)]);
    for now in [1_000, 1_001, u64::MAX] {
        let decision = judge(&policy, &overrides, now, ICU, PACS, TCP, 104);
        assert_eq!(decision.verdict, Verdict::Deny, "at {now}: {decision:?}");
    }
}

#[test]
fn grants_never_change_what_is_allowed_already() {
    let policy = example_policy();
    let overrides = with_grants(vec![grant(1, "radiology", "pacs", &["any"], u64::MAX)]);
    let decision = judge(&policy, &overrides, 0, RADIOLOGY, PACS, TCP, 104);
    assert_eq!(decision.rule.as_deref(), Some("pacs/1"));
    assert_eq!(decision.grant, None);
    // ...and what passes unjudged (traffic to an unenforced world) stays unjudged.
    let overrides = with_grants(vec![grant(2, "pacs", "world", &["any"], u64::MAX)]);
    let decision = judge(&policy, &overrides, 0, PACS, "192.0.2.1", TCP, 443);
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!((decision.rule, decision.grant), (None, None));
}

#[test]
fn a_grant_turns_audit_into_allow() {
    // icu-telemetry is monitored: pharmacy may not reach it, so that passes as audit.
    let policy = example_policy();
    let pharmacy = "10.40.0.10";
    assert_eq!(
        judge(&policy, &Overrides::default(), 0, pharmacy, ICU, TCP, 22).verdict,
        Verdict::Audit
    );
    let overrides = with_grants(vec![grant(9, "pharmacy", "icu-telemetry", &["tcp/22"], 10)]);
    let decision = judge(&policy, &overrides, 0, pharmacy, ICU, TCP, 22);
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.rule.as_deref(), Some("breakglass/9"));
}

#[test]
fn the_lowest_live_grant_id_names_the_verdict() {
    let policy = example_policy();
    let overrides = with_grants(vec![
        grant(8, "icu-telemetry", "pacs", &["tcp/any"], 100),
        grant(3, "icu-telemetry", "pacs", &["tcp/100-110"], 50),
        grant(2, "icu-telemetry", "pacs", &["tcp/104"], 10),
    ]);
    let rule = |now| judge(&policy, &overrides, now, ICU, PACS, TCP, 104).rule;
    assert_eq!(rule(0).as_deref(), Some("breakglass/2"));
    assert_eq!(rule(10).as_deref(), Some("breakglass/3"));
    assert_eq!(rule(50).as_deref(), Some("breakglass/8"));
    assert_eq!(rule(100), None);
}

#[test]
fn intra_deny_segments_can_be_opened_inside() {
    let sources = vec![
        source(
            "segments/vault.yaml",
            "segment: vault\nmembers: [10.1.0.0/16]\nintra: deny\n",
        ),
        source("segments/defaults.yaml", ""),
    ];
    let policy = Policy::from_sources(&sources).unwrap();
    let overrides = with_grants(vec![grant(1, "vault", "vault", &["tcp/22"], 10)]);
    let decision = judge(&policy, &overrides, 0, "10.1.0.1", "10.1.0.2", TCP, 22);
    assert_eq!(decision.rule.as_deref(), Some("breakglass/1"));
}

#[test]
fn breakglass_names_are_reserved_in_the_policy() {
    let errors = errors_of(&[source(
        "segments/breakglass.yaml",
        "segment: breakglass\nmembers: [10.0.0.0/8]\n",
    )]);
    assert!(
        errors.iter().any(|e| e
            .to_string()
            .contains("segment name 'breakglass' is reserved")),
        "{errors:?}"
    );
    let errors = errors_of(&[source(
        "segments/pacs.yaml",
        "segment: pacs\nmembers: [10.0.0.0/8]\nallow:\n  - name: breakglass/1\n    from: any\n    ports: any\n",
    )]);
    assert!(
        errors.iter().any(|e| {
            let text = e.to_string();
            text.contains("invalid rule name 'breakglass/1'") && text.contains("break-glass")
        }),
        "{errors:?}"
    );
}

#[test]
fn max_ttl_is_a_setting_of_defaults_yaml() {
    let policy = example_policy();
    assert_eq!(policy.settings().breakglass_max_ttl, 4 * 3600);
    let sources = vec![
        source(
            "segments/pacs.yaml",
            "segment: pacs\nmembers: [10.0.0.0/8]\n",
        ),
        source("segments/defaults.yaml", "breakglass:\n  max_ttl: 30m\n"),
    ];
    assert_eq!(
        Policy::from_sources(&sources)
            .unwrap()
            .settings()
            .breakglass_max_ttl,
        1800
    );
    let errors = errors_of(&[
        source(
            "segments/pacs.yaml",
            "segment: pacs\nmembers: [10.0.0.0/8]\n",
        ),
        source("segments/defaults.yaml", "breakglass:\n  max_tll: 30m\n"),
    ]);
    assert!(
        errors
            .iter()
            .any(|e| e.to_string().contains("did you mean `max_ttl`")),
        "{errors:?}"
    );
    let errors = errors_of(&[
        source(
            "segments/pacs.yaml",
            "segment: pacs\nmembers: [10.0.0.0/8]\n",
        ),
        source("segments/defaults.yaml", "breakglass:\n  max_ttl: 0s\n"),
    ]);
    assert!(
        errors
            .iter()
            .any(|e| e.to_string().contains("max_ttl") && e.line == Some(2)),
        "{errors:?}"
    );
}

#[test]
fn quarantine_wins_over_a_grant_from_the_former_segment() {
    let policy = example_policy();
    let mut overrides = with_grants(vec![grant(
        1,
        "icu-telemetry",
        "pacs",
        &["tcp/104"],
        u64::MAX,
    )]);
    assert_eq!(
        judge(&policy, &overrides, 0, ICU, PACS, TCP, 104).grant,
        Some(1)
    );
    overrides.quarantined.insert(ICU.parse().unwrap());
    let decision = judge(&policy, &overrides, 0, ICU, PACS, TCP, 104);
    assert_eq!(decision.src_segment, "quarantine");
    assert_eq!(decision.verdict, Verdict::Deny, "{decision:?}");
    assert_eq!(decision.grant, None);
    // A quarantined destination is out of reach of grants to its former segment too.
    overrides.quarantined.insert(PACS.parse().unwrap());
    let decision = judge(&policy, &overrides, 0, "10.70.0.11", PACS, TCP, 104);
    assert_eq!(decision.dst_segment, "quarantine");
    assert_eq!(decision.grant, None);
}
