//! The event rate limiter through the real programs with `BPF_PROG_TEST_RUN`: the first packet of
//! every denied flow is reported, its repeats within the interval are not, and flows that crowd
//! one pair of the limiter's slots cost extra events, never a missed one. Needs root.
use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::maps::PerCpuArray;
use enforcer_common::{EventLimiterKey, counter, direction::INGRESS, event_counter, map_names};
use policy_compiler::Policy;
use vm_tests::{
    harness::KernelHarness,
    packet_builder::{self, PacketSpec, Transport},
};

const DPORT: u16 = 9;

/// The limiter is per CPU: every packet of a test must run on the CPU that reported its flow.
fn pin_to_first_cpu() {
    // SAFETY: a zeroed set with one CPU added, for this thread.
    unsafe {
        let mut set = std::mem::zeroed::<libc::cpu_set_t>();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Two segments, nothing allowed between them.
fn harness() -> KernelHarness {
    let policy = Policy::from_sources(&[
        (
            "segments/wards.yaml".to_string(),
            "segment: wards\nmembers: [\"10.88.0.0/16\"]\nallow: []\n".to_string(),
        ),
        (
            "segments/billing.yaml".to_string(),
            "segment: billing\nmembers: [\"10.89.0.0/16\"]\nallow: []\n".to_string(),
        ),
    ])
    .expect("the test policy is valid");
    KernelHarness::load(policy).expect("loading the enforcer (needs root)")
}

fn source(flow: u16) -> Ipv4Addr {
    let [hi, lo] = flow.to_be_bytes();
    Ipv4Addr::new(10, 88, hi, lo)
}

const DESTINATION: Ipv4Addr = Ipv4Addr::new(10, 89, 0, 1);

/// The limiter's key of flow `flow`, as the programs build it for its denial.
fn key(flow: u16) -> EventLimiterKey {
    let mut key = EventLimiterKey {
        dport: DPORT,
        proto: 17,
        counter: counter::DROP_POLICY_DENIED as u8,
        ..EventLimiterKey::default()
    };
    key.src[..4].copy_from_slice(&source(flow).octets());
    key.dst[..4].copy_from_slice(&DESTINATION.octets());
    key
}

/// Sends one UDP datagram of flow `flow`, which the policy denies.
fn send(h: &mut KernelHarness, flow: u16) {
    let frame = packet_builder::build(&PacketSpec::new(
        source(flow).into(),
        DESTINATION.into(),
        Transport::udp(4000, DPORT),
    ))
    .0;
    let outcome = h.check(&frame, INGRESS).unwrap();
    assert_eq!(outcome.counter, counter::DROP_POLICY_DENIED);
}

/// Events (sent, lost, rate-limited) so far, summed over CPUs.
fn events(h: &KernelHarness) -> [u64; 3] {
    let map = h
        .enforcer
        .ebpf()
        .map(map_names::EVENT_COUNTERS)
        .expect("the event counters");
    let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(map).unwrap();
    [
        event_counter::SENT,
        event_counter::LOST,
        event_counter::RATE_LIMITED,
    ]
    .map(|index| counters.get(&index, 0).unwrap().iter().sum())
}

/// Events reported (sent or lost) and rate-limited since `before`.
fn since(h: &KernelHarness, before: [u64; 3]) -> (u64, u64) {
    let now = events(h);
    (now[0] + now[1] - before[0] - before[1], now[2] - before[2])
}

#[test]
fn every_denied_flow_is_reported_once_within_the_interval() {
    pin_to_first_cpu();
    let mut h = harness();
    // Flows with a pair of slots each, so that none is pushed out by another.
    let mut by_pair = BTreeMap::new();
    for flow in 0..u16::MAX {
        by_pair.entry(key(flow).first_slot()).or_insert(flow);
    }
    let flows: Vec<u16> = by_pair.into_values().take(300).collect();
    assert_eq!(flows.len(), 300);

    let before = events(&h);
    for &flow in &flows {
        send(&mut h, flow);
    }
    assert_eq!(
        since(&h, before),
        (300, 0),
        "first packets: reported, limited"
    );
    let before = events(&h);
    for &flow in flows.iter().rev() {
        send(&mut h, flow);
        send(&mut h, flow);
    }
    assert_eq!(since(&h, before), (0, 600), "repeats: reported, limited");
}

#[test]
fn flows_crowding_one_pair_of_slots_are_each_reported() {
    pin_to_first_cpu();
    let mut h = harness();
    // Three flows whose keys hash to the same pair of slots.
    let mut by_pair: BTreeMap<u32, Vec<u16>> = BTreeMap::new();
    let crowd = (0..u16::MAX)
        .find_map(|flow| {
            let flows = by_pair.entry(key(flow).first_slot()).or_default();
            flows.push(flow);
            (flows.len() == 3).then(|| flows.clone())
        })
        .expect("three flows sharing a pair of slots");
    let [a, b, c] = [crowd[0], crowd[1], crowd[2]];

    let before = events(&h);
    for flow in [a, b, a, b] {
        send(&mut h, flow);
    }
    assert_eq!(since(&h, before), (2, 2), "a and b fill the pair");
    let before = events(&h);
    // `c` takes `a`'s slot, reported no later than `b`'s, so `a` is reported again when it
    // comes back; `b` is still in the pair.
    for flow in [c, b, a] {
        send(&mut h, flow);
    }
    assert_eq!(
        since(&h, before),
        (2, 1),
        "c, then b and a again: reported, limited"
    );
}

/// Every byte of either address moves a key to other slots: flows of one IPv6 subnet differ
/// only in their last bytes, and a hash blind to some bits would crowd them into one pair.
/// Random slots would give about 252 pairs for 256 keys; the hash gives at least 190 for every
/// byte, where the one before it (4-byte words, middle bits of the sum) gave 91 for the worst.
#[test]
fn every_address_byte_spreads_keys_over_the_slots() {
    for byte in 0..32 {
        let pairs: std::collections::BTreeSet<u32> = (0..=255u8)
            .map(|value| {
                let mut key = key(0);
                if byte < 16 {
                    key.src[byte] = value;
                } else {
                    key.dst[byte - 16] = value;
                }
                key.first_slot()
            })
            .collect();
        assert!(
            pairs.len() >= 160,
            "256 keys differing in address byte {byte} share {} pairs of slots",
            pairs.len()
        );
    }
}
