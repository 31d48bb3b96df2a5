//! The per-CPU flow cache in front of the connection table (`enforcer_common::FlowCacheEntry`):
//! whatever it passes, the table would have passed too. Each test first lets an entry pass a
//! packet, then changes what the table holds in the ways an entry must not outlive. Every
//! packet is checked against the reference model too, which has no cache. Needs root.
//!
//! `KernelHarness` keeps a test on one CPU, so its packets meet the entries its earlier packets
//! filled.
use std::{net::IpAddr, thread, time::Duration};

use enforcer_common::{FLOW_CACHE_WINDOW_NS, counter, direction::INGRESS};
use policy_compiler::{Overrides, Policy};
use vm_tests::{
    harness::{KernelHarness, expect},
    packet_builder::{PacketSpec, TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN, Transport},
};

/// radiology may reach pacs on tcp/104 and udp/514; nobody may reach radiology.
fn policy(defaults: &str) -> Policy {
    let sources = vec![
        (
            "segments/pacs.yaml".to_string(),
            "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: [radiology]\n    ports: [tcp/104, udp/514]\n".to_string(),
        ),
        (
            "segments/radiology.yaml".to_string(),
            "segment: radiology\nmembers: [10.10.0.0/24]\n".to_string(),
        ),
        ("segments/defaults.yaml".to_string(), defaults.to_string()),
    ];
    Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const RADIOLOGY: &str = "10.10.0.10";
const PACS: &str = "10.30.0.10";

fn dicom(flags: u8) -> PacketSpec {
    PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::tcp(40000, 104, flags))
}

fn syslog() -> PacketSpec {
    PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::udp(40001, 514))
}

/// Opens the DICOM connection and passes two segments each way, the later ones from the entry
/// the earlier ones filled.
fn establish(h: &mut KernelHarness) {
    expect(h, INGRESS, &dicom(TCP_SYN), counter::ALLOWED);
    expect(
        h,
        INGRESS,
        &dicom(TCP_SYN | TCP_ACK).reversed(),
        counter::ESTABLISHED,
    );
    for _ in 0..2 {
        expect(h, INGRESS, &dicom(TCP_ACK | TCP_PSH), counter::ESTABLISHED);
        expect(
            h,
            INGRESS,
            &dicom(TCP_ACK | TCP_PSH).reversed(),
            counter::ESTABLISHED,
        );
    }
}

#[test]
fn a_quarantine_cuts_a_flow_its_cache_entry_was_passing() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    establish(&mut h);
    let mut overrides = Overrides::default();
    overrides.quarantined.insert(ip(RADIOLOGY));
    h.set_overrides(overrides).unwrap();
    assert_eq!(h.enforcer.tracked_flows().unwrap(), 0);
    // The table no longer has the flow: both sides' segments are judged, and denied.
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_ACK | TCP_PSH),
        counter::DROP_POLICY_DENIED,
    );
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_ACK | TCP_PSH).reversed(),
        counter::DROP_POLICY_DENIED,
    );
}

#[test]
fn an_idle_flow_expires_though_its_cache_entry_passed_its_last_packets() {
    let mut h = KernelHarness::load(policy("conntrack:\n  udp_timeout: 1s\n")).unwrap();
    expect(&mut h, INGRESS, &syslog(), counter::ALLOWED);
    for _ in 0..3 {
        expect(&mut h, INGRESS, &syslog().reversed(), counter::ESTABLISHED);
    }
    thread::sleep(Duration::from_millis(1500));
    h.set_time_ns(1_500_000_000);
    // pacs may not send to radiology by itself.
    expect(
        &mut h,
        INGRESS,
        &syslog().reversed(),
        counter::DROP_POLICY_DENIED,
    );
}

#[test]
fn a_busy_flow_stays_while_its_cache_entries_pass_its_packets() {
    // Packets 50 ms apart for three timeouts: most pass from an entry, which does not refresh
    // the table; the entry's window is what keeps the table's idle time short.
    let mut h = KernelHarness::load(policy("conntrack:\n  udp_timeout: 1s\n")).unwrap();
    expect(&mut h, INGRESS, &syslog(), counter::ALLOWED);
    const { assert!(FLOW_CACHE_WINDOW_NS < 500_000_000) };
    for step in 1..=60u64 {
        thread::sleep(Duration::from_millis(50));
        h.set_time_ns(step * 50_000_000);
        expect(&mut h, INGRESS, &syslog().reversed(), counter::ESTABLISHED);
    }
}

#[test]
fn a_policy_change_rechecks_a_flow_its_cache_entry_was_passing() {
    let mut h = KernelHarness::load(policy("on_policy_change: recheck\n")).unwrap();
    establish(&mut h);
    // The same policy without radiology's rule.
    let sources = vec![
        (
            "segments/pacs.yaml".to_string(),
            "segment: pacs\nmembers: [10.30.0.0/24]\n".to_string(),
        ),
        (
            "segments/radiology.yaml".to_string(),
            "segment: radiology\nmembers: [10.10.0.0/24]\n".to_string(),
        ),
        (
            "segments/defaults.yaml".to_string(),
            "on_policy_change: recheck\n".to_string(),
        ),
    ];
    h.replace_policy(Policy::from_sources(&sources).unwrap())
        .unwrap();
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_ACK | TCP_PSH).reversed(),
        counter::DROP_FLOW_REVOKED,
    );
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_ACK | TCP_PSH),
        counter::DROP_POLICY_DENIED,
    );
}

#[test]
fn a_denied_reopen_leaves_the_closing_connection_and_an_admitted_one_replaces_it() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    establish(&mut h);
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_FIN | TCP_ACK),
        counter::ESTABLISHED,
    );
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_FIN | TCP_ACK).reversed(),
        counter::ESTABLISHED,
    );
    // Closing: the last ACK passes, from the entry or the table alike.
    expect(&mut h, INGRESS, &dicom(TCP_ACK), counter::ESTABLISHED);
    // pacs may not open a connection to radiology on these ports: denied, and nothing changes.
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_SYN).reversed(),
        counter::DROP_POLICY_DENIED,
    );
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_ACK).reversed(),
        counter::ESTABLISHED,
    );
    assert_eq!(h.enforcer.tracked_flows().unwrap(), 1);
    // radiology may: a new connection, not yet answered.
    expect(&mut h, INGRESS, &dicom(TCP_SYN), counter::ALLOWED);
    assert_eq!(h.enforcer.tracked_flows().unwrap(), 1);
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_SYN | TCP_ACK).reversed(),
        counter::ESTABLISHED,
    );
}
