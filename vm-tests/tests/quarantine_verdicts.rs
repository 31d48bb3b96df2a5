//! Quarantine through the real programs with `BPF_PROG_TEST_RUN` on the example hospital
//! policy: a quarantined host is in the `quarantine` segment as source and destination, its
//! established flows are cut, a reload that renumbers segments keeps it isolated, releasing it
//! restores its segment. Every packet is also checked against the reference model. Needs root.
use std::{collections::BTreeSet, net::IpAddr, path::PathBuf};

use enforcer_common::{
    counter,
    direction::{EGRESS, INGRESS},
    map_names,
};
use policy_compiler::{Overrides, Policy};
use vm_tests::{
    harness::{KernelHarness, hex},
    packet_builder::{self, PacketSpec, TCP_ACK, TCP_SYN, Transport},
};

fn example_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../segments")
}

fn example_policy() -> Policy {
    Policy::load_dir(&example_dir()).unwrap_or_else(|e| panic!("example policy: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> PacketSpec {
    PacketSpec::new(ip(src), ip(dst), Transport::tcp(sport, dport, flags))
}

/// Runs `spec` in `dir`; kernel and reference must agree, and give `want`. Returns the rule id.
fn case(
    h: &mut KernelHarness,
    name: &str,
    spec: &PacketSpec,
    dir: u32,
    want: u32,
) -> Option<String> {
    let (frame, _) = packet_builder::build(spec);
    let got = h
        .check(&frame, dir)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(
        counter::NAMES[got.counter as usize],
        counter::NAMES[want as usize],
        "{name}: kernel and reference agree, but not with the case; frame {}",
        hex(&frame)
    );
    got.rule
        .map(|rule| h.reference.policy().rule(rule).unwrap().id.clone())
}

fn quarantining(addrs: &[&str]) -> Overrides {
    Overrides {
        quarantined: addrs.iter().map(|a| ip(a)).collect::<BTreeSet<_>>(),
        ..Overrides::default()
    }
}

const WORKSTATION: &str = "10.10.0.20";
const WORKSTATION_V6: &str = "fd00:10::20";
const PACS: &str = "10.30.0.10";
const PACS_V6: &str = "fd00:30::10";
const REMEDIATION: &str = "10.80.0.10";

#[test]
fn a_quarantined_host_is_isolated_both_ways_and_its_flows_are_cut() {
    let mut h = KernelHarness::load(example_policy()).expect("load the enforcer");
    // Healthy: an established DICOM connection to the PACS.
    let rule = case(
        &mut h,
        "workstation->pacs syn",
        &tcp(WORKSTATION, PACS, 40000, 104, TCP_SYN),
        INGRESS,
        counter::ALLOWED,
    );
    assert_eq!(rule.as_deref(), Some("pacs/1"));
    let data = tcp(WORKSTATION, PACS, 40000, 104, TCP_ACK);
    case(&mut h, "established", &data, INGRESS, counter::ESTABLISHED);
    // Another workstation's connection, which must survive.
    let other = tcp("10.10.0.21", PACS, 40001, 104, TCP_SYN);
    case(&mut h, "other syn", &other, INGRESS, counter::ALLOWED);
    case(
        &mut h,
        "v6 syn",
        &tcp(WORKSTATION_V6, PACS_V6, 40002, 104, TCP_SYN),
        INGRESS,
        counter::ALLOWED,
    );

    h.set_overrides(quarantining(&[WORKSTATION, WORKSTATION_V6]))
        .expect("quarantine");
    assert_eq!(
        enforcer::quarantine::addresses(h.enforcer.ebpf_mut())
            .unwrap()
            .into_iter()
            .collect::<BTreeSet<_>>(),
        [ip(WORKSTATION), ip(WORKSTATION_V6)].into(),
        "both families in the map"
    );
    // The established connection is cut: its next packet is judged as quarantine's, both ways.
    case(&mut h, "cut", &data, INGRESS, counter::DROP_POLICY_DENIED);
    case(
        &mut h,
        "cut reply",
        &data.reversed(),
        INGRESS,
        counter::DROP_POLICY_DENIED,
    );
    case(
        &mut h,
        "cut v6",
        &tcp(WORKSTATION_V6, PACS_V6, 40002, 104, TCP_ACK),
        INGRESS,
        counter::DROP_POLICY_DENIED,
    );
    case(
        &mut h,
        "other host goes on",
        &tcp("10.10.0.21", PACS, 40001, 104, TCP_ACK),
        INGRESS,
        counter::ESTABLISHED,
    );
    // New flows: only what the quarantine rules allow.
    case(
        &mut h,
        "new dicom",
        &tcp(WORKSTATION, PACS, 40003, 104, TCP_SYN),
        INGRESS,
        counter::DROP_POLICY_DENIED,
    );
    let rule = case(
        &mut h,
        "to remediation",
        &tcp(WORKSTATION, REMEDIATION, 40004, 443, TCP_SYN),
        INGRESS,
        counter::ALLOWED,
    );
    assert_eq!(rule.as_deref(), Some("remediation/1"));
    let rule = case(
        &mut h,
        "remediation repairs it",
        &tcp(REMEDIATION, WORKSTATION, 40005, 22, TCP_SYN),
        INGRESS,
        counter::ALLOWED,
    );
    assert_eq!(rule.as_deref(), Some("quarantine/1"));
    case(
        &mut h,
        "pacs cannot reach it",
        &tcp(PACS, WORKSTATION, 40006, 104, TCP_SYN),
        INGRESS,
        counter::DROP_POLICY_DENIED,
    );
    case(
        &mut h,
        "its radiology neighbour cannot reach it (intra of radiology no longer applies)",
        &tcp("10.10.0.21", WORKSTATION, 40007, 445, TCP_SYN),
        INGRESS,
        counter::DROP_POLICY_DENIED,
    );
    case(
        &mut h,
        "the NOC CIDR rule does not apply to it",
        &tcp("10.99.0.10", WORKSTATION, 40008, 22, TCP_SYN),
        INGRESS,
        counter::DROP_POLICY_DENIED,
    );
    // Path-MTU discovery still reaches it.
    let (quoted_frame, layout) =
        packet_builder::build(&tcp(WORKSTATION_V6, "fd00:99::10", 43000, 443, TCP_ACK));
    let pmtu = PacketSpec::new(
        ip("fd00:99::10"),
        ip(WORKSTATION_V6),
        Transport::IcmpError {
            icmp_type: 2,
            code: 0,
            quoted: packet_builder::ip_packet(&quoted_frame, layout),
        },
    );
    let rule = case(&mut h, "packet too big", &pmtu, INGRESS, counter::ALLOWED);
    assert_eq!(rule.as_deref(), Some("quarantine/essential"));

    // The segment-pair counters name the quarantine segment.
    let artifact = policy_compiler::compile(h.reference.policy()).unwrap();
    let quarantine_id = artifact.quarantine.segment;
    let pacs_id = artifact
        .segments
        .iter()
        .find(|s| s.name == "pacs")
        .unwrap()
        .id;
    let denied_from_quarantine: u64 = h
        .enforcer
        .pair_verdicts()
        .unwrap()
        .into_iter()
        .filter(|(key, _)| {
            key.src_segment == quarantine_id
                && key.dst_segment == pacs_id
                && u32::from(key.counter) == counter::DROP_POLICY_DENIED
        })
        .map(|(_, count)| count)
        .sum();
    assert_eq!(denied_from_quarantine, 3, "cut, cut v6, new dicom");

    // Released: its own segment again, for new flows.
    h.set_overrides(Overrides::default()).expect("release");
    let rule = case(
        &mut h,
        "released dicom",
        &tcp(WORKSTATION, PACS, 40009, 104, TCP_SYN),
        INGRESS,
        counter::ALLOWED,
    );
    assert_eq!(rule.as_deref(), Some("pacs/1"));
    case(
        &mut h,
        "released: no remediation rule for radiology on 22",
        &tcp(REMEDIATION, WORKSTATION, 40010, 22, TCP_SYN),
        INGRESS,
        counter::DROP_POLICY_DENIED,
    );
}

#[test]
fn egress_of_a_quarantined_host_is_judged_as_quarantine() {
    let mut sources: Vec<(String, String)> = std::fs::read_dir(example_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
        .map(|e| {
            (
                e.path().display().to_string(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    for (name, text) in &mut sources {
        if name.ends_with("defaults.yaml") {
            text.push_str("egress: enforce\n");
        }
    }
    let policy = Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"));
    let mut h = KernelHarness::load(policy).expect("load the enforcer");
    h.set_overrides(quarantining(&[WORKSTATION])).unwrap();
    // The quarantined host's own enforcer judges what it sends.
    case(
        &mut h,
        "egress to pacs",
        &tcp(WORKSTATION, PACS, 41000, 104, TCP_SYN),
        EGRESS,
        counter::DROP_POLICY_DENIED,
    );
    case(
        &mut h,
        "egress to remediation",
        &tcp(WORKSTATION, REMEDIATION, 41001, 443, TCP_SYN),
        EGRESS,
        counter::ALLOWED,
    );
}

#[test]
fn a_reload_that_renumbers_segments_keeps_the_quarantine() {
    let mut h = KernelHarness::load(example_policy()).expect("load the enforcer");
    h.set_overrides(quarantining(&[WORKSTATION])).unwrap();
    let before = policy_compiler::compile(h.reference.policy()).unwrap();
    // A new segment sorting first shifts every id, quarantine's and its class included.
    let mut sources: Vec<(String, String)> = std::fs::read_dir(example_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
        .map(|e| {
            (
                e.path().display().to_string(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    sources.push((
        "segments/aaa-guest.yaml".into(),
        "segment: aaa-guest\nmembers: [10.5.0.0/24]\nallow:\n  - from: [10.6.0.0/24]\n    ports: [tcp/80]\n".into(),
    ));
    let reloaded = Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"));
    let after = policy_compiler::compile(&reloaded).unwrap();
    assert_ne!(before.quarantine, after.quarantine, "the ids moved");
    h.replace_policy(reloaded).expect("reload");
    case(
        &mut h,
        "still isolated",
        &tcp(WORKSTATION, PACS, 42000, 104, TCP_SYN),
        INGRESS,
        counter::DROP_POLICY_DENIED,
    );
    let rule = case(
        &mut h,
        "still reaches remediation",
        &tcp(WORKSTATION, REMEDIATION, 42001, 443, TCP_SYN),
        INGRESS,
        counter::ALLOWED,
    );
    assert_eq!(rule.as_deref(), Some("remediation/1"));
    let rule = case(
        &mut h,
        "still repaired",
        &tcp(REMEDIATION, WORKSTATION, 42002, 22, TCP_SYN),
        INGRESS,
        counter::ALLOWED,
    );
    assert_eq!(rule.as_deref(), Some("quarantine/1"));
}

/// The kernel skips the quarantine probe while nothing is quarantined: the flag must follow
/// the map through releasing one of two hosts, releasing the last, and quarantining again.
#[test]
fn the_quarantine_probe_follows_every_add_and_remove() {
    let mut h = KernelHarness::load(example_policy()).expect("load the enforcer");
    let in_use = |h: &mut KernelHarness| -> u32 {
        let map = h
            .enforcer
            .ebpf_mut()
            .map_mut(map_names::QUARANTINE_IN_USE)
            .expect("flag map");
        aya::maps::Array::<_, u32>::try_from(map)
            .expect("array")
            .get(&0, 0)
            .expect("flag")
    };
    assert_eq!(in_use(&mut h), 0, "nothing quarantined after a load");
    let syn = |n: u16| tcp(WORKSTATION, PACS, 41000 + n, 104, TCP_SYN);
    case(&mut h, "healthy", &syn(0), INGRESS, counter::ALLOWED);

    h.set_overrides(quarantining(&[WORKSTATION, "10.10.0.21"]))
        .expect("quarantine two");
    assert_eq!(in_use(&mut h), 1);
    case(&mut h, "two", &syn(1), INGRESS, counter::DROP_POLICY_DENIED);
    // Releasing the other host leaves the workstation isolated.
    h.set_overrides(quarantining(&[WORKSTATION]))
        .expect("release one");
    assert_eq!(in_use(&mut h), 1, "one host still quarantined");
    case(
        &mut h,
        "one left",
        &syn(2),
        INGRESS,
        counter::DROP_POLICY_DENIED,
    );
    h.set_overrides(Overrides::default()).expect("release all");
    assert_eq!(in_use(&mut h), 0, "the map is empty");
    case(&mut h, "released", &syn(3), INGRESS, counter::ALLOWED);
    h.set_overrides(quarantining(&[WORKSTATION]))
        .expect("quarantine again");
    assert_eq!(in_use(&mut h), 1);
    case(
        &mut h,
        "again",
        &syn(4),
        INGRESS,
        counter::DROP_POLICY_DENIED,
    );
}
