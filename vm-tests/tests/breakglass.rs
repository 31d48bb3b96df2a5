//! Break-glass grants, packet by packet through the real XDP (ingress) and TC (egress) programs.
//! Every packet's outcome is stated by the test and checked against the reference model too;
//! grants reach the kernel through the daemon's loader functions. Needs root.
use std::{net::IpAddr, thread, time::Duration};

use enforcer_common::{
    counter,
    direction::{EGRESS, INGRESS},
};
use policy_compiler::{Grant, Overrides, Policy, breakglass::parse_ports};
use vm_tests::{
    harness::{KernelHarness, expect},
    packet_builder::{self, PacketSpec, TCP_ACK, TCP_PSH, TCP_SYN, Transport, ip_packet},
};

const HOUR_NS: u64 = 3_600_000_000_000;

/// radiology may reach pacs on tcp/104; icu and lab may reach nothing; pacs is enforced.
fn policy(defaults: &str) -> Policy {
    policy_with(defaults, "")
}

/// The same, plus `extra` segment files (name, yaml).
fn policy_with(defaults: &str, extra: &str) -> Policy {
    let mut sources = vec![
        (
            "segments/pacs.yaml".to_string(),
            "segment: pacs\nmembers: [10.30.0.0/24, \"fd00:30::/64\"]\nallow:\n  - from: [radiology]\n    ports: [tcp/104]\n".to_string(),
        ),
        (
            "segments/radiology.yaml".to_string(),
            "segment: radiology\nmembers: [10.10.0.0/24, \"fd00:10::/64\"]\n".to_string(),
        ),
        (
            "segments/icu.yaml".to_string(),
            "segment: icu\nmembers: [10.70.0.0/24, \"fd00:70::/64\"]\n".to_string(),
        ),
        (
            "segments/lab.yaml".to_string(),
            "segment: lab\nmembers: [10.50.0.0/24]\nmode: monitor\n".to_string(),
        ),
        ("segments/defaults.yaml".to_string(), defaults.to_string()),
    ];
    if !extra.is_empty() {
        let name = extra
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("segment: "))
            .expect("extra starts with `segment: NAME`");
        sources.push((format!("segments/{name}.yaml"), extra.to_string()));
    }
    Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const ICU: &str = "10.70.0.10";
const PACS: &str = "10.30.0.10";
const LAB: &str = "10.50.0.10";
const RADIOLOGY: &str = "10.10.0.10";

fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> PacketSpec {
    PacketSpec::new(ip(src), ip(dst), Transport::tcp(sport, dport, flags))
}

fn grant(id: u32, from: &str, to: &str, ports: &[&str], expires_ns: u64) -> Grant {
    Grant {
        id,
        from: from.to_string(),
        to: to.to_string(),
        ports: parse_ports(ports).unwrap(),
        expires_ns,
    }
}

fn grants(h: &mut KernelHarness, grants: Vec<Grant>) {
    let unplaced = h
        .set_overrides(Overrides {
            grants,
            ..Overrides::default()
        })
        .unwrap();
    assert!(unplaced.is_empty(), "unplaced grants {unplaced:?}");
}

#[test]
fn a_grant_opens_exactly_its_segments_protocol_and_ports() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    let dicom = tcp(ICU, PACS, 40000, 104, TCP_SYN);
    expect(&mut h, INGRESS, &dicom, counter::DROP_POLICY_DENIED);
    grants(
        &mut h,
        vec![grant(
            7,
            "icu",
            "pacs",
            &["tcp/104", "udp/2000-2010"],
            HOUR_NS,
        )],
    );
    expect(&mut h, INGRESS, &dicom, counter::BREAKGLASS);
    expect(
        &mut h,
        INGRESS,
        &dicom.reversed().with_tcp_flags(TCP_SYN | TCP_ACK),
        counter::ESTABLISHED,
    );
    expect(
        &mut h,
        INGRESS,
        &dicom.clone().with_tcp_flags(TCP_ACK | TCP_PSH),
        counter::ESTABLISHED,
    );
    let syslog = |port| PacketSpec::new(ip(ICU), ip(PACS), Transport::udp(5000, port));
    expect(&mut h, INGRESS, &syslog(2000), counter::BREAKGLASS);
    expect(&mut h, INGRESS, &syslog(2010), counter::BREAKGLASS);
    expect(&mut h, INGRESS, &syslog(2011), counter::DROP_POLICY_DENIED);
    expect(&mut h, INGRESS, &syslog(104), counter::DROP_POLICY_DENIED);
    let v6 = PacketSpec::new(
        ip("fd00:70::10"),
        ip("fd00:30::10"),
        Transport::tcp(40000, 104, TCP_SYN),
    );
    expect(&mut h, INGRESS, &v6, counter::BREAKGLASS);
    // Not another port, not another source segment, not the other way round.
    for denied in [
        tcp(ICU, PACS, 40001, 11112, TCP_SYN),
        tcp(LAB, PACS, 40002, 104, TCP_SYN),
        tcp(PACS, ICU, 40003, 104, TCP_SYN),
        tcp("192.0.2.7", PACS, 40004, 104, TCP_SYN),
    ] {
        expect(&mut h, INGRESS, &denied, counter::DROP_POLICY_DENIED);
    }
    // What a rule allows stays allowed by the rule.
    expect(
        &mut h,
        INGRESS,
        &tcp(RADIOLOGY, PACS, 40005, 104, TCP_SYN),
        counter::ALLOWED,
    );
}

#[test]
fn a_grant_turns_audit_into_breakglass_and_applies_to_enforced_egress() {
    let mut h = KernelHarness::load(policy("egress: enforce\n")).unwrap();
    let to_lab = tcp(ICU, LAB, 40000, 22, TCP_SYN);
    expect(&mut h, INGRESS, &to_lab, counter::AUDIT);
    let egress = tcp(ICU, PACS, 40001, 104, TCP_SYN);
    expect(&mut h, EGRESS, &egress, counter::DROP_POLICY_DENIED);
    grants(
        &mut h,
        vec![
            grant(1, "icu", "lab", &["tcp/22"], HOUR_NS),
            grant(2, "icu", "pacs", &["any"], HOUR_NS),
        ],
    );
    // The audited flow is tracked already; a new one is granted.
    expect(
        &mut h,
        INGRESS,
        &tcp(ICU, LAB, 40010, 22, TCP_SYN),
        counter::BREAKGLASS,
    );
    expect(&mut h, EGRESS, &egress, counter::BREAKGLASS);
    let other_protocol = PacketSpec::new(ip(ICU), ip(PACS), Transport::Other { proto: 47, len: 8 });
    expect(&mut h, EGRESS, &other_protocol, counter::BREAKGLASS);
}

#[test]
fn expired_grants_are_ignored() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    // Expired at reference time 0: the kernel's clock is past it too.
    grants(&mut h, vec![grant(1, "icu", "pacs", &["any"], 0)]);
    expect(
        &mut h,
        INGRESS,
        &tcp(ICU, PACS, 40000, 104, TCP_SYN),
        counter::DROP_POLICY_DENIED,
    );
    // A live grant of the same pair still applies; the lowest live id names it.
    grants(
        &mut h,
        vec![
            grant(1, "icu", "pacs", &["any"], 0),
            grant(2, "icu", "pacs", &["tcp/104"], HOUR_NS),
        ],
    );
    expect(
        &mut h,
        INGRESS,
        &tcp(ICU, PACS, 40000, 104, TCP_SYN),
        counter::BREAKGLASS,
    );
}

#[test]
fn an_established_flow_is_cut_in_both_directions_when_its_grant_expires() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    grants(
        &mut h,
        vec![grant(3, "icu", "pacs", &["tcp/104"], 1_000_000_000)],
    );
    let dicom = tcp(ICU, PACS, 40000, 104, TCP_SYN);
    let reply = dicom.reversed().with_tcp_flags(TCP_ACK | TCP_PSH);
    let (error_quoting, layout) = packet_builder::build(&dicom);
    let icmp_error = PacketSpec::new(
        ip(PACS),
        ip(ICU),
        Transport::IcmpError {
            icmp_type: 11,
            code: 0,
            quoted: ip_packet(&error_quoting, layout),
        },
    );
    expect(&mut h, INGRESS, &dicom, counter::BREAKGLASS);
    expect(&mut h, EGRESS, &reply, counter::ESTABLISHED);
    expect(&mut h, INGRESS, &icmp_error, counter::RELATED);
    thread::sleep(Duration::from_millis(1500));
    h.set_time_ns(1_500_000_000);
    // No daemon involved: the state carries the expiry.
    expect(
        &mut h,
        INGRESS,
        &dicom.clone().with_tcp_flags(TCP_ACK | TCP_PSH),
        counter::DROP_BREAKGLASS_EXPIRED,
    );
    expect(&mut h, EGRESS, &reply, counter::DROP_BREAKGLASS_EXPIRED);
    expect(&mut h, INGRESS, &reply, counter::DROP_BREAKGLASS_EXPIRED);
    // The state stays (so unenforced egress cannot recreate the flow), but relates nothing.
    assert_eq!(h.enforcer.tracked_flows().unwrap(), 1);
    assert_eq!(h.reference.tracked_flows(), 1);
    expect(&mut h, INGRESS, &icmp_error, counter::DROP_POLICY_DENIED);
    expect(
        &mut h,
        INGRESS,
        &tcp(ICU, PACS, 40001, 104, TCP_SYN),
        counter::DROP_POLICY_DENIED,
    );
    // A new grant of the same access lets the flow continue, under the new grant.
    grants(
        &mut h,
        vec![grant(4, "icu", "pacs", &["tcp/104"], 100 * HOUR_NS)],
    );
    expect(&mut h, EGRESS, &reply, counter::ESTABLISHED);
    expect(
        &mut h,
        INGRESS,
        &dicom.clone().with_tcp_flags(TCP_ACK),
        counter::ESTABLISHED,
    );
    assert_eq!(h.revoke_grant(4).unwrap(), 1, "the flow is grant 4's now");
    expect(&mut h, EGRESS, &reply, counter::DROP_BREAKGLASS_EXPIRED);
}

#[test]
fn revoking_a_grant_cuts_its_flows_and_only_them() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    grants(
        &mut h,
        vec![
            grant(1, "icu", "pacs", &["tcp/104"], HOUR_NS),
            grant(2, "icu", "pacs", &["tcp/443"], HOUR_NS),
        ],
    );
    let first = tcp(ICU, PACS, 40000, 104, TCP_SYN);
    let second = tcp(ICU, PACS, 40001, 443, TCP_SYN);
    let syslog = PacketSpec::new(ip(ICU), ip(PACS), Transport::udp(5000, 104));
    expect(&mut h, INGRESS, &first, counter::BREAKGLASS);
    expect(&mut h, INGRESS, &second, counter::BREAKGLASS);
    expect(&mut h, INGRESS, &syslog, counter::DROP_POLICY_DENIED);
    assert_eq!(h.revoke_grant(1).unwrap(), 1);
    expect(
        &mut h,
        INGRESS,
        &first.reversed().with_tcp_flags(TCP_SYN | TCP_ACK),
        counter::DROP_BREAKGLASS_EXPIRED,
    );
    expect(
        &mut h,
        INGRESS,
        &first.clone().with_tcp_flags(TCP_ACK),
        counter::DROP_BREAKGLASS_EXPIRED,
    );
    expect(
        &mut h,
        INGRESS,
        &tcp(ICU, PACS, 40002, 104, TCP_SYN),
        counter::DROP_POLICY_DENIED,
    );
    expect(
        &mut h,
        INGRESS,
        &second.reversed().with_tcp_flags(TCP_SYN | TCP_ACK),
        counter::ESTABLISHED,
    );
}

#[test]
fn a_reload_rewrites_grants_with_the_new_segment_numbering() {
    let mut h = KernelHarness::load(policy("on_policy_change: recheck\n")).unwrap();
    grants(&mut h, vec![grant(1, "icu", "pacs", &["tcp/104"], HOUR_NS)]);
    let dicom = tcp(ICU, PACS, 40000, 104, TCP_SYN);
    expect(&mut h, INGRESS, &dicom, counter::BREAKGLASS);
    // `aaa` sorts first: every other segment's id moves up by one.
    h.replace_policy(policy_with(
        "on_policy_change: recheck\n",
        "segment: aaa\nmembers: [10.1.0.0/24]\n",
    ))
    .unwrap();
    assert!(h.enforcer.unplaced_grants().is_empty());
    // The tracked flow is rechecked under the new numbering, and still granted.
    expect(
        &mut h,
        INGRESS,
        &dicom.reversed().with_tcp_flags(TCP_SYN | TCP_ACK),
        counter::ESTABLISHED,
    );
    expect(
        &mut h,
        INGRESS,
        &tcp(ICU, PACS, 40001, 104, TCP_SYN),
        counter::BREAKGLASS,
    );
    expect(
        &mut h,
        INGRESS,
        &tcp("10.1.0.5", PACS, 40002, 104, TCP_SYN),
        counter::DROP_POLICY_DENIED,
    );
    // A policy without `icu`: the grant opens nothing, and the recheck cuts its flows.
    let without_icu = Policy::from_sources(&[
        (
            "segments/pacs.yaml".to_string(),
            "segment: pacs\nmembers: [10.30.0.0/24]\n".to_string(),
        ),
        (
            "segments/defaults.yaml".to_string(),
            "on_policy_change: recheck\n".to_string(),
        ),
    ])
    .unwrap();
    h.replace_policy(without_icu).unwrap();
    assert_eq!(h.enforcer.unplaced_grants(), &[1]);
    expect(
        &mut h,
        INGRESS,
        &dicom.clone().with_tcp_flags(TCP_ACK),
        counter::DROP_FLOW_REVOKED,
    );
}

#[test]
fn a_pair_holds_at_most_sixteen_port_ranges() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    let ports: Vec<String> = (1..=17).map(|port| format!("tcp/{port}")).collect();
    let too_many = Grant {
        ports: parse_ports(&ports).unwrap(),
        ..grant(1, "icu", "pacs", &["any"], HOUR_NS)
    };
    let error = h
        .set_overrides(Overrides {
            grants: vec![too_many],
            ..Overrides::default()
        })
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("icu to pacs") && error.contains("at most 16"),
        "{error}"
    );
    // Nothing changed: the previous (empty) grants are in force.
    assert!(h.enforcer.grants().is_empty());
}

#[test]
fn quarantine_wins_over_a_grant() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    let grant = grant(1, "icu", "pacs", &["tcp/104"], HOUR_NS);
    let quarantined = Overrides {
        quarantined: [ip(ICU)].into_iter().collect(),
        grants: vec![grant.clone()],
    };
    h.set_overrides(quarantined).unwrap();
    expect(
        &mut h,
        INGRESS,
        &tcp(ICU, PACS, 40000, 104, TCP_SYN),
        counter::DROP_POLICY_DENIED,
    );
    // Released, the host's segment is icu again and the grant applies.
    grants(&mut h, vec![grant]);
    expect(
        &mut h,
        INGRESS,
        &tcp(ICU, PACS, 40001, 104, TCP_SYN),
        counter::BREAKGLASS,
    );
}

/// `BREAKGLASS_IN_USE[slot]`, as the kernel reads it.
fn grants_flag(h: &mut KernelHarness, slot: usize) -> u32 {
    let map = h
        .enforcer
        .ebpf_mut()
        .map_mut(enforcer_common::map_names::BREAKGLASS_IN_USE)
        .unwrap();
    let flags: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map).unwrap();
    flags.get(&(slot as u32), 0).unwrap()
}

#[test]
fn grants_are_looked_up_only_while_the_slot_holds_one_and_a_new_daemon_resyncs_the_flag() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    let slot = h.enforcer.active_slot();
    let dicom = |sport| tcp(ICU, PACS, sport, 104, TCP_SYN);
    assert_eq!(grants_flag(&mut h, slot), 0, "no grant yet");
    grants(&mut h, vec![grant(3, "icu", "pacs", &["tcp/104"], HOUR_NS)]);
    assert_eq!(grants_flag(&mut h, slot), 1, "set with the first grant");
    expect(&mut h, INGRESS, &dicom(40000), counter::BREAKGLASS);
    grants(&mut h, vec![]);
    assert_eq!(grants_flag(&mut h, slot), 0, "cleared with the last grant");
    expect(&mut h, INGRESS, &dicom(40001), counter::DROP_POLICY_DENIED);

    // Grants in maps whose flag says nothing (a daemon adopting maps pinned before the flag
    // existed): the kernel skips them, which is what the resync is for.
    grants(&mut h, vec![grant(4, "icu", "pacs", &["tcp/104"], HOUR_NS)]);
    {
        let map = h
            .enforcer
            .ebpf_mut()
            .map_mut(enforcer_common::map_names::BREAKGLASS_IN_USE)
            .unwrap();
        let mut flags: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map).unwrap();
        flags.set(slot as u32, 0, 0).unwrap();
    }
    let (frame, _) = packet_builder::build(&dicom(40002));
    assert_eq!(
        h.run_kernel(&frame, INGRESS).unwrap(),
        vm_tests::harness::action(INGRESS, false),
        "with the flag cleared the grant is not looked up"
    );
    enforcer::policy_maps::sync_breakglass_in_use(h.enforcer.ebpf_mut()).unwrap();
    assert_eq!(grants_flag(&mut h, slot), 1, "resynced from the map");
    assert_eq!(
        grants_flag(&mut h, 1 - slot),
        0,
        "the other slot holds no grant"
    );
    expect(&mut h, INGRESS, &dicom(40003), counter::BREAKGLASS);
}
