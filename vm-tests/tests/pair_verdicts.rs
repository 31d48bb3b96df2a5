//! Segment-pair verdict counts through the real programs with `BPF_PROG_TEST_RUN`: every judged
//! packet is counted once for its (source, destination, direction, outcome), whether its slot's
//! table (`PAIR_COUNTS_*`) or the hash behind it (`PAIR_VERDICTS`) holds the key, and a reload
//! takes the previous policy's counts out of the kernel exactly once. Needs root.
use std::collections::BTreeMap;

use enforcer_common::{PAIR_COUNT_SLOTS, PairVerdictKey, counter, direction::INGRESS};
use policy_compiler::Policy;
use vm_tests::{
    harness::KernelHarness,
    packet_builder::{self, PacketSpec, TCP_SYN, Transport},
};

/// More ordered pairs than a table has elements: some keys must be counted in the hash.
const SEGMENTS: u8 = 80;
/// Pairs whose source is below this get a second packet.
const TWICE_BELOW: u8 = 8;

fn host(segment: u8) -> String {
    format!("10.77.{segment}.1")
}

/// `SEGMENTS` segments of one host each, no rule between them; `extra` adds a segment that sorts
/// first, so that every segment id moves.
fn policy(extra: bool) -> Policy {
    let mut sources: Vec<(String, String)> = (0..SEGMENTS)
        .map(|s| {
            (
                format!("segments/seg{s:02}.yaml"),
                format!(
                    "segment: seg{s:02}\nmembers: [\"{}/32\"]\nallow: []\n",
                    host(s)
                ),
            )
        })
        .collect();
    if extra {
        sources.push((
            "segments/a-extra.yaml".into(),
            "segment: a-extra\nmembers: [\"172.31.0.0/24\"]\nallow: []\n".into(),
        ));
    }
    Policy::from_sources(&sources).expect("the test policy is valid")
}

/// Runs one denied TCP SYN per ordered pair of segments (two for the first sources), checking
/// each against the reference; returns the counts expected for `generation`.
fn judge_every_pair(h: &mut KernelHarness, generation: u32) -> BTreeMap<PairVerdictKey, u64> {
    let artifact = policy_compiler::compile(h.reference.policy()).unwrap();
    let id = |s: u8| {
        let name = format!("seg{s:02}");
        artifact
            .segments
            .iter()
            .find(|segment| segment.name == name)
            .unwrap()
            .id
    };
    let mut expected = BTreeMap::new();
    for src in 0..SEGMENTS {
        for dst in (0..SEGMENTS).filter(|&dst| dst != src) {
            let spec = PacketSpec::new(
                host(src).parse().unwrap(),
                host(dst).parse().unwrap(),
                Transport::tcp(40_000, 9, TCP_SYN),
            );
            let (frame, _) = packet_builder::build(&spec);
            let times = if src < TWICE_BELOW { 2 } else { 1 };
            for _ in 0..times {
                let outcome = h.check(&frame, INGRESS).unwrap();
                assert_eq!(outcome.counter, counter::DROP_POLICY_DENIED);
            }
            let key = PairVerdictKey {
                generation,
                src_segment: id(src),
                dst_segment: id(dst),
                direction: INGRESS as u8,
                counter: counter::DROP_POLICY_DENIED as u8,
                _pad: [0; 2],
            };
            expected.insert(key, times);
        }
    }
    assert!(
        expected.len() > PAIR_COUNT_SLOTS as usize,
        "the test needs more keys than a table has elements"
    );
    expected
}

fn counts_of(h: &KernelHarness, generation: u32) -> BTreeMap<PairVerdictKey, u64> {
    let mut counts = BTreeMap::new();
    for (key, count) in h.enforcer.pair_verdicts().unwrap() {
        if key.generation == generation {
            *counts.entry(key).or_default() += count;
        }
    }
    counts
}

/// Where two counts differ, for the failure message (the first few).
fn differences(
    got: &BTreeMap<PairVerdictKey, u64>,
    want: &BTreeMap<PairVerdictKey, u64>,
) -> Vec<String> {
    let keys: std::collections::BTreeSet<_> = got.keys().chain(want.keys()).collect();
    keys.into_iter()
        .filter(|key| got.get(key) != want.get(key))
        .take(5)
        .map(|key| {
            format!(
                "{} -> {}: counted {:?}, sent {:?}",
                key.src_segment,
                key.dst_segment,
                got.get(key),
                want.get(key)
            )
        })
        .collect()
}

/// `got` must equal `want`, key by key.
fn assert_same(
    what: &str,
    got: &BTreeMap<PairVerdictKey, u64>,
    want: &BTreeMap<PairVerdictKey, u64>,
) {
    assert!(
        got == want,
        "{what}: {} keys counted, {} sent; first differences: {:#?}",
        got.len(),
        want.len(),
        differences(got, want)
    );
}

/// The daemon's take after a reload, by key.
fn take(h: &mut KernelHarness) -> BTreeMap<PairVerdictKey, u64> {
    h.enforcer
        .take_old_pair_verdicts()
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn every_judged_packet_is_counted_once_for_its_pair_in_the_table_or_the_hash() {
    let mut h = KernelHarness::load(policy(false)).unwrap();
    let generation = h.enforcer.generation();
    let expected = judge_every_pair(&mut h, generation);
    assert_same("counted", &counts_of(&h, generation), &expected);
}

#[test]
fn a_reload_takes_the_previous_policys_counts_out_once_and_frees_its_table() {
    let mut h = KernelHarness::load(policy(false)).unwrap();
    let first = h.enforcer.generation();
    let first_counts = judge_every_pair(&mut h, first);

    // The ids move; the first policy's counts stay where they were until taken.
    h.replace_policy(policy(true)).unwrap();
    let second = h.enforcer.generation();
    let second_counts = judge_every_pair(&mut h, second);
    assert_same("before the take", &counts_of(&h, first), &first_counts);

    assert_same("taken", &take(&mut h), &first_counts);
    assert!(
        counts_of(&h, first).is_empty(),
        "the first policy's counts are still in the kernel after the take"
    );
    assert!(take(&mut h).is_empty(), "a second take found counts again");
    assert_same(
        "the policy in force",
        &counts_of(&h, second),
        &second_counts,
    );

    // The third policy goes into the emptied slot and is counted exactly as well.
    h.replace_policy(policy(false)).unwrap();
    let third = h.enforcer.generation();
    let third_counts = judge_every_pair(&mut h, third);
    assert_same("the third policy", &counts_of(&h, third), &third_counts);
    // Read from the table the take had emptied before, now holding the second policy's.
    assert_same(
        "the second policy until taken",
        &counts_of(&h, second),
        &second_counts,
    );
    assert_same("second take", &take(&mut h), &second_counts);
}
