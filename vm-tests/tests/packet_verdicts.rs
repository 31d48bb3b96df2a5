//! Packet-level tests: frames through the real XDP program with `BPF_PROG_TEST_RUN`, compared
//! with the reference parser and evaluator of `policy-compiler`. Needs root.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use enforcer_common::counter;
use policy_compiler::Policy;
use rand::{Rng, SeedableRng, rngs::SmallRng, seq::IndexedRandom as _};
use vm_tests::{
    harness::{KernelHarness, Outcome, XDP_DROP, XDP_PASS, expected, hex},
    packet_builder::{self, PacketSpec, Transport},
    policy_gen,
};

fn example_policy() -> Policy {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../segments");
    Policy::load_dir(Path::new(&dir)).unwrap_or_else(|e| panic!("example policy: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn tcp(src: &str, dst: &str, dport: u16) -> PacketSpec {
    PacketSpec::new(ip(src), ip(dst), Transport::Tcp { sport: 40000, dport })
}

fn udp(src: &str, dst: &str, dport: u16) -> PacketSpec {
    PacketSpec::new(ip(src), ip(dst), Transport::Udp { sport: 40000, dport })
}

fn icmp(src: &str, dst: &str, icmp_type: u8) -> PacketSpec {
    PacketSpec::new(ip(src), ip(dst), Transport::Icmp { icmp_type, code: 0 })
}

/// Runs `frame`, asserts the kernel agrees with the reference, and that both give
/// `action`/`counter`, so the test does not depend on the reference alone being right.
fn assert_case(harness: &mut KernelHarness, name: &str, frame: &[u8], action: u32, counter: u32) -> Outcome {
    let got = harness
        .check(frame)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(
        (got.action, got.counter),
        (action, counter),
        "{name}: kernel and reference agree on {got}, but the case expects action {action} counter {}; frame {}",
        counter::NAMES[counter as usize],
        hex(frame)
    );
    got
}

fn rule_id(harness: &KernelHarness, outcome: Outcome) -> String {
    let rule = outcome.rule.expect("an allowed packet names its rule");
    let artifact = policy_compiler::compile(&harness.policy).unwrap();
    artifact.rule_ids()[rule as usize].clone()
}

#[test]
fn example_policy_clinical_flows() {
    let mut h = KernelHarness::load(example_policy()).expect("load the enforcer");
    let pass = XDP_PASS;
    let drop = XDP_DROP;

    // Radiology to PACS, DICOM: allowed by a pacs rule, over IPv4, IPv6 and a VLAN tag.
    let (frame, _) = packet_builder::build(&tcp("10.10.0.10", "10.30.0.10", 104));
    let got = assert_case(&mut h, "radiology->pacs dicom", &frame, pass, counter::ALLOWED);
    assert!(rule_id(&h, got).starts_with("pacs"), "rule {}", rule_id(&h, got));
    let (frame, _) = packet_builder::build(&tcp("fd00:10::10", "fd00:30::10", 104));
    assert_case(&mut h, "radiology->pacs dicom v6", &frame, pass, counter::ALLOWED);
    let (frame, _) = packet_builder::build(&tcp("10.10.0.10", "10.30.0.10", 104).with_vlan(30));
    assert_case(&mut h, "radiology->pacs dicom vlan", &frame, pass, counter::ALLOWED);
    let spec = tcp("10.10.0.10", "10.30.0.10", 104).with_ipv4_options(12);
    let (frame, _) = packet_builder::build(&spec);
    assert_case(&mut h, "radiology->pacs with IP options", &frame, pass, counter::ALLOWED);

    // Lateral movement that must stop.
    for (name, spec) in [
        ("radiology->billing db", tcp("10.10.0.10", "10.60.0.10", 5432)),
        ("radiology->billing db v6", tcp("fd00:10::10", "fd00:60::10", 5432)),
        ("radiology->pharmacy", tcp("10.10.0.10", "10.40.0.10", 443)),
        ("pacs->billing", tcp("10.30.0.10", "10.60.0.10", 5432)),
        ("lab->pacs dicom", tcp("10.50.0.10", "10.30.0.10", 104)),
        ("radiology->pacs wrong port", tcp("10.10.0.10", "10.30.0.10", 5432)),
        ("world->ehr", tcp("192.0.2.7", "10.20.0.10", 443)),
    ] {
        let (frame, _) = packet_builder::build(&spec);
        assert_case(&mut h, name, &frame, drop, counter::DROP_POLICY_DENIED);
    }

    // EHR to billing is the one way into billing.
    let (frame, _) = packet_builder::build(&tcp("10.20.0.10", "10.60.0.10", 5432));
    assert_case(&mut h, "ehr->billing claims", &frame, pass, counter::ALLOWED);
    // ICMP echo from the EHR, and a UDP flow the policy allows somewhere.
    let (frame, _) = packet_builder::build(&icmp("10.20.0.10", "10.50.0.10", 8));
    assert_case(&mut h, "ehr->lab ping", &frame, pass, counter::ALLOWED);
    let (frame, _) = packet_builder::build(&icmp("10.10.0.10", "10.50.0.10", 8));
    assert_case(&mut h, "radiology->lab ping", &frame, drop, counter::DROP_POLICY_DENIED);
    let (frame, _) = packet_builder::build(&udp("10.10.0.10", "10.60.0.10", 514));
    assert_case(&mut h, "radiology->billing syslog", &frame, drop, counter::DROP_POLICY_DENIED);

    // ICU telemetry is monitored: a would-be denial passes as audit.
    let (frame, _) = packet_builder::build(&tcp("10.60.0.10", "10.70.0.10", 22));
    assert_case(&mut h, "billing->icu (monitor)", &frame, pass, counter::AUDIT);
    // Traffic to world is not enforced by default.
    let (frame, _) = packet_builder::build(&tcp("10.10.0.10", "192.0.2.7", 443));
    assert_case(&mut h, "radiology->world", &frame, pass, counter::UNENFORCED);
    // Inside a segment with intra: allow.
    let (frame, _) = packet_builder::build(&tcp("10.30.0.10", "10.30.0.11", 9999));
    assert_case(&mut h, "pacs intra", &frame, pass, counter::ALLOWED);

    // Frames that are not IP, or not well-formed.
    assert_case(&mut h, "arp", &packet_builder::arp(), pass, counter::NON_IP);
    let (frame, _) = packet_builder::build(&tcp("10.20.0.10", "10.60.0.10", 5432));
    assert_case(&mut h, "truncated tcp", &frame[..frame.len() - 1], drop, counter::DROP_MALFORMED);
    assert_case(&mut h, "ethernet only", &frame[..14], drop, counter::DROP_MALFORMED);
    let mut bad_ihl = frame.clone();
    bad_ihl[14] = 0x44;
    assert_case(&mut h, "ihl 4", &bad_ihl, drop, counter::DROP_MALFORMED);
    let mut long_total = frame.clone();
    long_total[16..18].copy_from_slice(&1000u16.to_be_bytes());
    assert_case(&mut h, "total length past the frame", &long_total, drop, counter::DROP_MALFORMED);
    let mut qinq = frame.clone();
    qinq.splice(12..12, [0x88, 0xa8, 0x00, 0x07, 0x81, 0x00, 0x00, 0x08]);
    assert_case(&mut h, "stacked vlan", &qinq, drop, counter::DROP_UNSUPPORTED_ENCAP);
    // A later fragment to billing carries no ports: only `ports: [any]` could admit it.
    let mut fragment = frame.clone();
    fragment[20..22].copy_from_slice(&0x0010u16.to_be_bytes());
    assert_case(&mut h, "later fragment", &fragment, drop, counter::DROP_POLICY_DENIED);
}

/// Generated policies and packets, well-formed and adversarial: the kernel must agree with the
/// reference on every one. Replay a failure with ENFORCER_TEST_SEED=<seed>.
#[test]
fn kernel_agrees_with_reference_on_generated_packets() {
    const POLICIES: usize = 40;
    const PACKETS_PER_POLICY: usize = 2_600;
    let seed = std::env::var("ENFORCER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("differential test seed: {seed} (replay with ENFORCER_TEST_SEED={seed})");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut checked = 0usize;
    let mut by_counter = [0usize; counter::COUNT as usize];
    for policy_number in 0..POLICIES {
        let generated = policy_gen::generate(&mut rng);
        let policy = Policy::from_sources(&generated.sources).unwrap_or_else(|e| {
            panic!("seed {seed}: generated policy {policy_number} is invalid: {e}\n{:#?}", generated.sources)
        });
        let mut harness = KernelHarness::load(policy).expect("load the enforcer");
        for _ in 0..PACKETS_PER_POLICY {
            let frame = random_frame(&mut rng, &generated.interesting);
            let outcome = harness.check(&frame).unwrap_or_else(|e| {
                panic!(
                    "seed {seed}, policy {policy_number}: {e:#}\npolicy files:\n{}",
                    generated
                        .sources
                        .iter()
                        .map(|(name, text)| format!("--- {name}\n{text}"))
                        .collect::<String>()
                )
            });
            by_counter[outcome.counter as usize] += 1;
            checked += 1;
        }
    }
    println!("checked {checked} packets; by outcome: {:?}", counter::NAMES.iter().zip(by_counter).collect::<Vec<_>>());
    assert!(checked >= 100_000);
    // The generator must keep exercising every outcome, or the comparison proves little.
    for (name, count) in counter::NAMES.iter().zip(by_counter) {
        assert!(count >= 100, "only {count} packets ended as {name}");
    }
}

fn random_frame(rng: &mut SmallRng, interesting: &[IpAddr]) -> Vec<u8> {
    if rng.random_ratio(1, 100) {
        return packet_builder::arp();
    }
    let v6 = rng.random_bool(0.35);
    let pick = |rng: &mut SmallRng| loop {
        let addr = *interesting.choose(rng).unwrap();
        if addr.is_ipv6() == v6 {
            return addr;
        }
    };
    let (src, dst) = (pick(rng), pick(rng));
    let port = |rng: &mut SmallRng| -> u16 {
        if rng.random_bool(0.5) {
            *[22, 53, 80, 104, 443, 514, 2575, 5432, 11112].choose(rng).unwrap()
        } else {
            rng.random()
        }
    };
    let transport = match rng.random_range(0..10) {
        0..=4 => Transport::Tcp { sport: rng.random(), dport: port(rng) },
        5..=6 => Transport::Udp { sport: rng.random(), dport: port(rng) },
        7..=8 => Transport::Icmp {
            icmp_type: *[0, 1, 3, 8, 11, 128, 129, 135].choose(rng).unwrap(),
            code: 0,
        },
        _ => Transport::Other { proto: *[47, 50, 132, 0, 43, 44].choose(rng).unwrap(), len: rng.random_range(0..32) },
    };
    let mut spec = PacketSpec::new(src, dst, transport);
    if rng.random_bool(0.15) {
        spec = spec.with_vlan(rng.random_range(1..4095));
    }
    if !v6 && rng.random_bool(0.1) {
        spec = spec.with_ipv4_options(rng.random_range(1..=10) * 4);
    }
    let (mut frame, layout) = packet_builder::build(&spec);
    if rng.random_bool(0.25) {
        packet_builder::mutate(rng, &mut frame, layout);
    }
    frame
}

#[test]
fn reference_expectation_is_not_trivial() {
    // Guards the harness itself: a denied packet must be expected as a drop.
    let policy = example_policy();
    let (frame, _) = packet_builder::build(&tcp("10.10.0.10", "10.60.0.10", 5432));
    let (want, _) = expected(&policy, &frame);
    assert_eq!(want.action, XDP_DROP);
}
