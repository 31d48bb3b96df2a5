//! The kernel programs against the reference model on generated policies and packet sequences:
//! conversations (TCP handshakes, data, FIN, RST; UDP; ICMP echo; other protocols) in both
//! directions on ingress and egress, ICMP errors quoting earlier packets, fragments in and out
//! of order, IPv6 extension headers, VLAN tags, adversarial mutations, and policy reloads in
//! the middle, hosts quarantined and released at run time (their flows cut as the daemon cuts
//! them), break-glass grants in force (live and expired, granted and revoked along the way).
//! Every packet's outcome must agree. Needs root.
//!
//! Replay a failure with `ENFORCER_TEST_SEED=<seed>`; scale with `ENFORCER_DIFF_PACKETS`.
use std::net::IpAddr;

use enforcer_common::{counter, direction};
use policy_compiler::{
    Overrides, Policy,
    packet::{FrameOutcome, parse_frame},
};
use rand::{Rng, SeedableRng, rngs::SmallRng, seq::IndexedRandom as _};
use vm_tests::{
    harness::KernelHarness,
    packet_builder::{
        self, PacketSpec, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Transport, ip_packet,
    },
    policy_gen,
};

const PACKETS_PER_POLICY: usize = 10_000;
/// At most this many grants at once: 3 port entries each stay within a pair's 16 ranges.
const MAX_GRANTS: usize = 5;

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// A conversation: the first packet's spec; replies are its reverse.
struct Conversation {
    spec: PacketSpec,
}

fn random_port(rng: &mut SmallRng) -> u16 {
    if rng.random_bool(0.6) {
        *[22, 53, 80, 104, 443, 514, 2575, 5432, 11112]
            .choose(rng)
            .unwrap()
    } else {
        rng.random()
    }
}

fn new_conversation(rng: &mut SmallRng, interesting: &[IpAddr]) -> Conversation {
    let v6 = rng.random_bool(0.35);
    let pick = |rng: &mut SmallRng| loop {
        let addr = *interesting.choose(rng).unwrap();
        if addr.is_ipv6() == v6 {
            return addr;
        }
    };
    let (src, dst) = (pick(rng), pick(rng));
    let transport = match rng.random_range(0..10) {
        0..=4 => Transport::tcp(rng.random(), random_port(rng), TCP_SYN),
        5..=6 => Transport::udp(rng.random(), random_port(rng)),
        7..=8 => Transport::icmp(if v6 { 128 } else { 8 }, rng.random()),
        _ => Transport::Other {
            proto: *[47, 50, 132, 59].choose(rng).unwrap(),
            len: rng.random_range(0..32),
        },
    };
    let mut spec = PacketSpec::new(src, dst, transport);
    if rng.random_bool(0.1) {
        spec = spec.with_vlan(rng.random_range(1..4095));
    }
    if v6 && rng.random_bool(0.15) {
        let count = rng.random_range(1..=9);
        let headers: Vec<u8> = (0..count)
            .map(|_| *[0u8, 43, 60, 51].choose(rng).unwrap())
            .collect();
        spec = spec.with_ext_headers(&headers);
    } else if !v6 && rng.random_bool(0.1) {
        spec = spec.with_ipv4_options(rng.random_range(1..=10) * 4);
    }
    Conversation { spec }
}

/// The next packet of the run, and the direction it is seen in.
fn next_packet(
    rng: &mut SmallRng,
    conversations: &mut Vec<Conversation>,
    interesting: &[IpAddr],
) -> (Vec<u8>, u32) {
    let dir = if rng.random_bool(0.7) {
        direction::INGRESS
    } else {
        direction::EGRESS
    };
    if conversations.is_empty() || rng.random_bool(0.25) {
        let conversation = new_conversation(rng, interesting);
        let (frame, _) = packet_builder::build(&conversation.spec);
        if conversations.len() >= 64 {
            let evicted = rng.random_range(0..conversations.len());
            conversations.swap_remove(evicted);
        }
        conversations.push(conversation);
        return (frame, dir);
    }
    if rng.random_ratio(1, 50) {
        return (packet_builder::arp(), dir);
    }
    let base = conversations.choose(rng).unwrap().spec.clone();
    let forward = rng.random_bool(0.5);
    let mut spec = if forward {
        base.clone()
    } else {
        base.reversed()
    };
    let flags = *[
        TCP_ACK,
        TCP_ACK | TCP_PSH,
        TCP_SYN | TCP_ACK,
        TCP_FIN | TCP_ACK,
        TCP_RST,
        TCP_SYN,
    ]
    .choose(rng)
    .unwrap();
    spec = spec.with_tcp_flags(flags);
    let roll = rng.random_range(0..100);
    if roll < 8 {
        // An ICMP error about this conversation, sent back to the packet's source (or, now and
        // then, to someone else).
        let (quoted_frame, layout) = packet_builder::build(&spec);
        let mut quoted = ip_packet(&quoted_frame, layout);
        quoted.truncate(rng.random_range(20..=quoted.len().max(20)));
        let v6 = spec.dst.is_ipv6();
        let icmp_type = if v6 {
            *[1u8, 2, 3, 4].choose(rng).unwrap()
        } else {
            *[3u8, 11, 12].choose(rng).unwrap()
        };
        let to = if rng.random_bool(0.9) {
            spec.src
        } else {
            *interesting.iter().find(|a| a.is_ipv6() == v6).unwrap()
        };
        let error = PacketSpec::new(
            spec.dst,
            to,
            Transport::IcmpError {
                icmp_type,
                code: 0,
                quoted,
            },
        );
        let (frame, _) = packet_builder::build(&error);
        return (frame, dir);
    }
    if roll < 18 {
        // A fragment of a datagram of this conversation; ids repeat so that first and later
        // fragments meet, in either order.
        let id = rng.random_range(0..4);
        let offset = if rng.random_bool(0.4) {
            0
        } else {
            rng.random_range(1..200)
        };
        spec = spec.with_fragment(id, offset, offset == 0 || rng.random_bool(0.5));
    }
    let (mut frame, layout) = packet_builder::build(&spec);
    if rng.random_bool(0.08) {
        packet_builder::mutate(rng, &mut frame, layout);
    }
    (frame, dir)
}

#[test]
fn kernel_agrees_with_reference_on_generated_packet_sequences() {
    let seed = env_number("ENFORCER_TEST_SEED").unwrap_or_else(rand::random::<u64>);
    let total = env_number("ENFORCER_DIFF_PACKETS").unwrap_or(1_000_000) as usize;
    println!("differential test seed: {seed} (replay with ENFORCER_TEST_SEED={seed})");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut seen = [[0usize; counter::COUNT as usize]; direction::COUNT as usize];
    let mut checked = 0usize;
    let mut reloads = 0usize;
    let mut quarantine_changes = 0usize;
    let mut grant_changes = 0usize;
    let mut filter_rebuilds = 0usize;
    // IP packets from or to a quarantined host: [otherwise, allowed by a rule].
    let mut quarantined_seen = [0usize; 2];
    let mut policy_number = 0usize;
    while checked < total {
        let generated = policy_gen::generate(&mut rng);
        let policy = Policy::from_sources(&generated.sources).unwrap_or_else(|e| {
            panic!("seed {seed}: generated policy {policy_number} is invalid: {e}")
        });
        let mut sources = generated.sources.clone();
        let mut harness = KernelHarness::load(policy).expect("load the enforcer");
        // A few of the generator's hosts start quarantined, and a few grants are in force.
        let mut overrides = Overrides::default();
        for _ in 0..rng.random_range(0..=2) {
            overrides
                .quarantined
                .insert(*generated.interesting.choose(&mut rng).unwrap());
        }
        let names = &generated.segment_names;
        overrides.grants = (1..=rng.random_range(0..=3))
            .map(|id| policy_gen::random_grant(&mut rng, id, names))
            .collect();
        let mut next_grant = overrides.grants.len() as u32 + 1;
        harness.set_overrides(overrides).expect("overrides");
        let mut conversations = Vec::new();
        for _ in 0..PACKETS_PER_POLICY.min(total - checked) {
            if rng.random_ratio(1, 2_000) {
                sources = policy_gen::mutate_policy(&mut rng, &sources);
                let reloaded = Policy::from_sources(&sources).expect("mutated policy is valid");
                harness.replace_policy(reloaded).expect("reload");
                reloads += 1;
            }
            if rng.random_ratio(1, 500) {
                // Quarantine a host of the conversations (cutting its flows), or release one.
                let mut overrides = harness.overrides().clone();
                let host = *generated.interesting.choose(&mut rng).unwrap();
                if !overrides.quarantined.remove(&host) {
                    overrides.quarantined.insert(host);
                }
                harness.set_overrides(overrides).expect("quarantine");
                quarantine_changes += 1;
            }
            if rng.random_ratio(1, 500) {
                // Revoke a grant (cutting its flows as the daemon does), or give a new one.
                let grants = &harness.overrides().grants;
                if !grants.is_empty() && (grants.len() >= MAX_GRANTS || rng.random_bool(0.5)) {
                    let revoked = grants[rng.random_range(0..grants.len())].id;
                    harness
                        .revoke_grant(revoked)
                        .unwrap_or_else(|e| panic!("seed {seed}: revoking: {e:#}"));
                } else {
                    let mut overrides = harness.overrides().clone();
                    overrides
                        .grants
                        .push(policy_gen::random_grant(&mut rng, next_grant, names));
                    next_grant += 1;
                    harness.set_overrides(overrides).expect("grants fit");
                }
                grant_changes += 1;
            }
            if rng.random_ratio(1, 2_000) {
                // As the daemon does after every sweep: flows ended since drop out of the
                // filter in front of the connection table; the live ones must not.
                harness
                    .rebuild_flow_filter()
                    .expect("rebuild the flow filter");
                filter_rebuilds += 1;
            }
            let (frame, dir) = next_packet(&mut rng, &mut conversations, &generated.interesting);
            let outcome = harness.check(&frame, dir).unwrap_or_else(|e| {
                panic!(
                    "seed {seed}, policy {policy_number}, packet {checked}: {e:#}\nquarantined: {:?}\ngrants: {:?}\npolicy files:\n{}",
                    harness.overrides().quarantined,
                    harness.overrides().grants,
                    sources
                        .iter()
                        .map(|(name, text)| format!("--- {name}\n{text}"))
                        .collect::<String>()
                )
            });
            seen[dir as usize][outcome.counter as usize] += 1;
            if let FrameOutcome::Ip(packet) = parse_frame(&frame) {
                let quarantined = &harness.overrides().quarantined;
                if quarantined.contains(&packet.flow.src) || quarantined.contains(&packet.flow.dst)
                {
                    quarantined_seen[usize::from(outcome.counter == counter::ALLOWED)] += 1;
                }
            }
            checked += 1;
        }
        policy_number += 1;
    }
    println!(
        "checked {checked} packets over {policy_number} policies, {reloads} reloads, \
         {quarantine_changes} quarantine changes, {grant_changes} grants given or revoked and \
         {filter_rebuilds} rebuilds of the connection table's filter"
    );
    for dir in 0..direction::COUNT {
        let by_outcome: Vec<String> = counter::NAMES
            .iter()
            .zip(seen[dir as usize])
            .map(|(name, n)| format!("{name}={n}"))
            .collect();
        println!(
            "{}: {}",
            direction::NAMES[dir as usize],
            by_outcome.join(" ")
        );
    }
    println!(
        "packets from or to a quarantined host: {} ({} allowed by a rule)",
        quarantined_seen[0] + quarantined_seen[1],
        quarantined_seen[1]
    );
    // The generator must keep reaching every outcome, or agreement proves little.
    if total >= 1_000_000 {
        assert!(
            quarantined_seen[0] >= 1_000 && quarantined_seen[1] >= 100,
            "quarantined hosts too rarely in the traffic: {quarantined_seen:?}"
        );
        for (index, name) in counter::NAMES.iter().enumerate() {
            let count = seen[0][index] + seen[1][index];
            assert!(count >= 10, "only {count} packets ended as {name}");
        }
    }
}
