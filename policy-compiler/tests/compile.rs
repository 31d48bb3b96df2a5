//! The compiled maps, looked up as the kernel does, must agree with the reference evaluator.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::{example_policy, example_sources, source};
use enforcer_common::{
    AddrInfo, CLASS_WILDCARD, CLASS_WORLD, HOST_PREFIX_V4, HOST_PREFIX_V6, PORT_EXACT_PREFIX,
    PairValue, PortKey, SEGMENT_WORLD, lookup_flags, proto_key, segment_mode, wildcard_bit,
};
use policy_compiler::{Artifact, Flow, Overrides, Policy, Verdict, compile};
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

/// Whether the first `bits` bits of `a` and `b` agree (LPM trie matching).
fn prefix_matches(a: &[u8], b: &[u8], bits: u32) -> bool {
    (0..bits as usize).all(|bit| {
        let mask = 0x80u8 >> (bit % 8);
        a.get(bit / 8).map(|x| x & mask) == b.get(bit / 8).map(|x| x & mask)
    })
}

fn port_key_bytes(key: &PortKey) -> [u8; 8] {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&key.table);
    bytes[4] = key.proto;
    bytes[5] = key._pad;
    bytes[6..].copy_from_slice(&key.port);
    bytes
}

/// (prefix length, key bytes, rule index)
type PortTrieEntry = (u32, [u8; 8], u32);

/// The artifact's maps, looked up exactly as the kernel program does.
struct Kernel {
    addr_v4: Vec<(u32, [u8; 4], AddrInfo)>,
    addr_v6: Vec<(u32, [u8; 16], AddrInfo)>,
    /// Mode and `no_wildcard_rules`, by segment id.
    modes: Vec<(u8, u8)>,
    pairs: HashMap<(u32, u32), PairValue>,
    /// PORTS entries grouped by (table, proto key) to keep the brute force fast.
    ports: HashMap<(u32, u8), Vec<PortTrieEntry>>,
    /// What an address of the QUARANTINE map is looked up as (`Config.quarantine_*`).
    quarantine: AddrInfo,
    /// `Config.lookup_flags`: which tries the kernel consults after a host-table miss.
    lookup_flags: u8,
}

/// The kernel's two-step lookup: the entry with every bit fixed (`full`), as its exact-match
/// hash finds it; otherwise, only when `trie_used`, the longest shorter prefix, as its trie does.
fn two_step<'a, K, V>(
    entries: impl Iterator<Item = &'a (u32, K, V)> + Clone,
    matches: impl Fn(&K, u32) -> bool,
    full: u32,
    trie_used: bool,
) -> Option<&'a V>
where
    K: 'a,
    V: 'a,
{
    let candidates = entries.filter(|(len, key, _)| matches(key, *len));
    if let Some((_, _, value)) = candidates.clone().find(|(len, _, _)| *len == full) {
        return Some(value);
    }
    if !trie_used {
        return None;
    }
    candidates
        .filter(|(len, _, _)| *len < full)
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, _, value)| value)
}

impl Kernel {
    fn new(artifact: &Artifact) -> Kernel {
        let mut ports: HashMap<(u32, u8), Vec<PortTrieEntry>> = HashMap::new();
        for (prefix_len, key, value) in artifact.port_entries() {
            let table = u32::from_be_bytes(key.table);
            ports.entry((table, key.proto)).or_default().push((
                prefix_len,
                port_key_bytes(&key),
                value.rule,
            ));
        }
        Kernel {
            addr_v4: artifact.addr_v4_entries().collect(),
            addr_v6: artifact.addr_v6_entries().collect(),
            modes: artifact
                .segment_infos()
                .iter()
                .map(|info| (info.mode, info.no_wildcard_rules))
                .collect(),
            pairs: artifact
                .pair_entries()
                .map(|(key, value)| ((key.dst_segment, key.src_class), value))
                .collect(),
            ports,
            quarantine: AddrInfo {
                segment: artifact.kernel_config(1).quarantine_segment,
                class: artifact.kernel_config(1).quarantine_class,
            },
            lookup_flags: artifact.kernel_config(1).lookup_flags,
        }
    }

    fn lookup_addr(&self, addr: IpAddr) -> AddrInfo {
        let best = match addr {
            IpAddr::V4(v4) => two_step(
                self.addr_v4.iter(),
                |key, len| prefix_matches(key, &v4.octets(), len),
                HOST_PREFIX_V4,
                self.lookup_flags & lookup_flags::V4_PREFIXES != 0,
            ),
            IpAddr::V6(v6) => two_step(
                self.addr_v6.iter(),
                |key, len| prefix_matches(key, &v6.octets(), len),
                HOST_PREFIX_V6,
                self.lookup_flags & lookup_flags::V6_PREFIXES != 0,
            ),
        };
        best.copied().unwrap_or(AddrInfo {
            segment: SEGMENT_WORLD,
            class: CLASS_WORLD,
        })
    }

    /// The kernel's lookup with `quarantined` in its QUARANTINE map.
    fn judge(&self, flow: &Flow, quarantined: &BTreeSet<IpAddr>) -> (Verdict, Option<u32>) {
        let lookup = |addr: IpAddr| {
            if quarantined.contains(&addr) {
                self.quarantine
            } else {
                self.lookup_addr(addr)
            }
        };
        let dst = lookup(flow.dst);
        let src = lookup(flow.src);
        let (mode, no_wildcard_rules) = self
            .modes
            .get(dst.segment as usize)
            .copied()
            .expect("segment info");
        if mode == segment_mode::UNENFORCED {
            return (Verdict::Allow, None);
        }
        let miss = if mode == segment_mode::MONITOR {
            Verdict::Audit
        } else {
            Verdict::Deny
        };
        let (proto, port) = match (flow.proto, flow.port) {
            (proto_key::TCP | proto_key::UDP | proto_key::ICMP | proto_key::ICMPV6, Some(port)) => {
                (flow.proto, port)
            }
            _ => (proto_key::NO_PORT, 0),
        };
        // The source class's own table, then the destination's wildcard table unless the
        // segment's flags say it has nothing for this protocol.
        let skip_wildcard = no_wildcard_rules & wildcard_bit(proto) != 0;
        for class in [src.class, CLASS_WILDCARD] {
            if class == CLASS_WILDCARD && skip_wildcard {
                continue;
            }
            let Some(pair) = self.pairs.get(&(dst.segment, class)) else {
                continue;
            };
            let key = port_key_bytes(&PortKey::new(pair.port_table, proto, port));
            let best = two_step(
                self.ports
                    .get(&(pair.port_table, proto))
                    .into_iter()
                    .flatten(),
                |entry, len| prefix_matches(entry, &key, len),
                PORT_EXACT_PREFIX,
                pair.has_ranges != 0,
            );
            if let Some(rule) = best {
                return (Verdict::Allow, Some(*rule));
            }
        }
        (miss, None)
    }
}

#[test]
fn compiling_is_deterministic() {
    let sources = example_sources();
    let policy = Policy::from_sources(&sources).expect("valid");
    let first = compile(&policy).expect("compiles").to_json();
    let second = compile(&policy).expect("compiles").to_json();
    assert_eq!(first, second);
    let mut reversed = sources.clone();
    reversed.reverse();
    let third = compile(&Policy::from_sources(&reversed).expect("valid"))
        .expect("compiles")
        .to_json();
    assert_eq!(first, third);
    let loaded = compile(&example_policy()).expect("compiles").to_json();
    assert_eq!(
        first, loaded,
        "load_dir and from_sources agree, revision included"
    );

    // The artifact round-trips.
    let parsed = Artifact::from_json(&first).expect("parses");
    assert_eq!(parsed.to_json(), first);

    // Any change to a file changes the revision.
    let mut changed = sources.clone();
    changed[0].1.push_str("\n# a comment\n");
    let other = Policy::from_sources(&changed).expect("valid");
    assert_ne!(other.revision(), policy.revision());
    assert_eq!(policy.revision().len(), 64);
}

#[test]
fn example_artifact_shape() {
    let policy = example_policy();
    let artifact = compile(&policy).expect("compiles");
    let names: Vec<&str> = artifact.segments.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "world",
            "billing",
            "ehr-core",
            "icu-telemetry",
            "lab",
            "pacs",
            "pharmacy",
            "quarantine",
            "radiology",
            "remediation"
        ]
    );
    // A quarantined address is judged as the quarantine segment and its own class, which no
    // address entry carries.
    assert_eq!(artifact.quarantine.segment, 7);
    let config = artifact.kernel_config(1);
    assert_eq!(
        (config.quarantine_segment, config.quarantine_class),
        (7, artifact.quarantine.class)
    );
    assert!(
        artifact
            .maps
            .addr_v4
            .iter()
            .all(|e| e.class != artifact.quarantine.class && e.segment != 7)
    );
    // `remediation` names `from: quarantine`: the quarantine class has its own pair entry.
    assert!(
        artifact
            .maps
            .pairs
            .iter()
            .any(|e| e.dst_segment == 9 && e.src_class == artifact.quarantine.class)
    );
    assert_eq!(artifact.segment_infos()[0].mode, segment_mode::UNENFORCED);
    assert_eq!(artifact.segment_infos()[3].mode, segment_mode::MONITOR);
    // Rule order: segments by name with file order, then intra pseudo-rules by segment name,
    // then the essential-traffic pseudo-rules by segment name.
    let ids = artifact.rule_ids();
    assert_eq!(ids[0], "billing/1");
    assert_eq!(ids[2], "ehr-core/1");
    // (quarantine is intra: deny, so it has no intra pseudo-rule.)
    assert_eq!(ids[ids.len() - 17], "billing/intra");
    assert_eq!(ids[ids.len() - 10], "remediation/intra");
    assert_eq!(ids[ids.len() - 9], "billing/essential");
    assert_eq!(ids[ids.len() - 3], "quarantine/essential");
    assert_eq!(ids[ids.len() - 1], "remediation/essential");
    // The pacs members' entry: 10.30.0.0/24 in segment 5.
    let pacs = artifact
        .addr_v4_entries()
        .find(|(len, addr, _)| *len == 24 && *addr == [10, 30, 0, 0])
        .expect("pacs entry");
    assert_eq!(pacs.2.segment, 5);
    // tcp/104 of pacs/1 is one /64 entry in some table.
    let pacs_1 = ids.iter().position(|id| id == "pacs/1").expect("pacs/1") as u32;
    assert!(artifact.maps.ports.iter().any(|e| e.rule == pacs_1
        && e.proto == proto_key::TCP
        && e.port == 104
        && e.prefix_len == 64));
    // Intra (ports: any) covers ICMP with one 256-type block and has a NO_PORT entry.
    let intra = ids
        .iter()
        .position(|id| id == "pacs/intra")
        .expect("pacs/intra") as u32;
    assert!(artifact.maps.ports.iter().any(|e| e.rule == intra
        && e.proto == proto_key::ICMP
        && e.port == 0
        && e.prefix_len == 56));
    assert!(
        artifact
            .maps
            .ports
            .iter()
            .any(|e| e.rule == intra && e.proto == proto_key::NO_PORT && e.prefix_len == 64)
    );
    let counts = artifact.entry_counts();
    assert_eq!(counts.segments, 10);
    assert_eq!(
        counts.addr_v4, 9,
        "8 segments with members and the NOC CIDR"
    );
}

fn random_ip(rng: &mut SmallRng, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()))
    } else {
        IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
    }
}

/// A random address inside `prefix` (text form `ADDR/LEN`).
fn address_in(rng: &mut SmallRng, prefix: &str) -> IpAddr {
    let (addr, len) = prefix.split_once('/').expect("prefix");
    let len: u32 = len.parse().expect("length");
    match addr.parse::<IpAddr>().expect("address") {
        IpAddr::V4(v4) => {
            let host_mask = if len >= 32 { 0 } else { u32::MAX >> len };
            IpAddr::V4(Ipv4Addr::from(
                u32::from(v4) | (rng.random::<u32>() & host_mask),
            ))
        }
        IpAddr::V6(v6) => {
            let host_mask = if len >= 128 { 0 } else { u128::MAX >> len };
            IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) | (rng.random::<u128>() & host_mask),
            ))
        }
    }
}

/// Nested and overlapping prefixes, so that longest-match and classes matter.
fn prefix_pool() -> Vec<String> {
    let mut pool = vec![
        "10.0.0.0/8".to_string(),
        "0.0.0.0/0".to_string(),
        "::/0".to_string(),
    ];
    for a in 0..3 {
        pool.push(format!("10.{a}.0.0/16"));
        pool.push(format!("fd00:{a}::/32"));
        for b in 0..3 {
            pool.push(format!("10.{a}.{b}.0/24"));
            pool.push(format!("10.{a}.{b}.128/25"));
            pool.push(format!("10.{a}.{b}.7/32"));
            pool.push(format!("fd00:{a}:{b}::/48"));
            pool.push(format!("fd00:{a}:{b}::7/128"));
        }
    }
    pool
}

const PORT_CHOICES: &[&str] = &[
    "tcp/22",
    "tcp/80",
    "tcp/443",
    "tcp/0",
    "tcp/65535",
    "tcp/any",
    "udp/53",
    "udp/any",
    "udp/161-162",
    "icmp/echo-request",
    "icmp/any",
    "icmp/0",
    "icmp/255",
    "icmpv6/echo-request",
    "icmpv6/any",
    "icmpv6/1",
    "any",
];

fn random_ports(rng: &mut SmallRng) -> String {
    let mut entries = Vec::new();
    for _ in 0..rng.random_range(1..4) {
        if rng.random_bool(0.4) {
            let proto = if rng.random_bool(0.5) { "tcp" } else { "udp" };
            let first: u16 = rng.random_range(0..2000);
            let last = first.saturating_add(rng.random_range(0..3000));
            entries.push(format!("{proto}/{first}-{last}"));
        } else {
            entries.push(PORT_CHOICES.choose(rng).expect("choice").to_string());
        }
    }
    format!("[{}]", entries.join(", "))
}

fn random_rules(rng: &mut SmallRng, names: &[String], pool: &[String]) -> String {
    let mut text = String::new();
    let count = rng.random_range(0..6);
    if count > 0 {
        text.push_str("allow:\n");
    }
    for _ in 0..count {
        let mut from = Vec::new();
        for _ in 0..rng.random_range(1..4) {
            match rng.random_range(0..10) {
                0 => from.push("any".to_string()),
                1 => from.push("world".to_string()),
                2..=5 => from.push(format!("\"{}\"", pool.choose(rng).expect("prefix"))),
                _ => from.push(names.choose(rng).expect("name").clone()),
            }
        }
        writeln!(
            text,
            "  - from: [{}]\n    ports: {}",
            from.join(", "),
            random_ports(rng)
        )
        .expect("write");
    }
    text
}

fn random_policy(rng: &mut SmallRng) -> Vec<(String, String)> {
    let pool = prefix_pool();
    let count = rng.random_range(1..7);
    // Names whose sort order differs from creation order.
    let names: Vec<String> = (0..count)
        .map(|n| format!("{}-seg{n}", ["zz", "aa", "mm"][n % 3]))
        .collect();
    let mut free: Vec<&String> = pool.iter().collect();
    let mut sources = Vec::new();
    // Rules may name the built-in quarantine segment too.
    let sources_names: Vec<String> = names
        .iter()
        .cloned()
        .chain(["quarantine".to_string()])
        .collect();
    for name in &names {
        let mut members = Vec::new();
        // The pool is larger than 6 segments x 3 members: it never runs dry.
        for _ in 0..rng.random_range(1..4) {
            let pick = rng.random_range(0..free.len());
            members.push(format!("\"{}\"", free.swap_remove(pick)));
        }
        let mode = if rng.random_bool(0.3) {
            "monitor"
        } else {
            "enforce"
        };
        let intra = if rng.random_bool(0.5) {
            "allow"
        } else {
            "deny"
        };
        let text = format!(
            "segment: {name}\nmembers: [{}]\nmode: {mode}\nintra: {intra}\n{}",
            members.join(", "),
            random_rules(rng, &sources_names, &pool)
        );
        sources.push(source(&format!("segments/{name}.yaml"), &text));
    }
    // The built-in quarantine segment, with an allow-list of its own half of the time.
    if rng.random_bool(0.5) {
        let text = format!(
            "segment: quarantine\n{}",
            random_rules(rng, &sources_names, &pool)
        );
        sources.push(source("segments/quarantine.yaml", &text));
    }
    let world_mode = ["unenforced", "enforce", "monitor"]
        .choose(rng)
        .expect("mode");
    let world_rules = random_rules(rng, &sources_names, &pool).replace("\n", "\n  ");
    let defaults = format!("world:\n  mode: {world_mode}\n  {}", world_rules.trim_end());
    sources.push(source("segments/defaults.yaml", &defaults));
    sources
}

fn random_flow(rng: &mut SmallRng, pool: &[String]) -> Flow {
    let v6 = rng.random_bool(0.4);
    let family_pool: Vec<&String> = pool.iter().filter(|p| p.contains(':') == v6).collect();
    let endpoint = |rng: &mut SmallRng| {
        if rng.random_bool(0.1) {
            random_ip(rng, v6)
        } else {
            let prefix = family_pool.choose(rng).expect("prefix");
            address_in(rng, prefix)
        }
    };
    let src = endpoint(rng);
    let dst = endpoint(rng);
    let proto = *[6u8, 6, 6, 17, 17, 1, 58, 47, 0]
        .choose(rng)
        .expect("proto");
    let port = if rng.random_bool(0.1) || !matches!(proto, 1 | 6 | 17 | 58) {
        None
    } else if matches!(proto, 1 | 58) {
        Some(rng.random_range(0..=255))
    } else {
        let interesting = [
            0u16, 1, 21, 22, 23, 53, 80, 161, 162, 443, 1999, 2000, 4999, 65535,
        ];
        if rng.random_bool(0.5) {
            Some(*interesting.choose(rng).expect("port"))
        } else {
            Some(rng.random())
        }
    };
    Flow {
        src,
        dst,
        proto,
        port,
    }
}

#[track_caller]
fn cross_check(policy: &Policy, flows: impl Iterator<Item = Flow>, context: &str) -> usize {
    let artifact = compile(policy).expect("compiles");
    let reparsed = Artifact::from_json(&artifact.to_json()).expect("artifact parses");
    let kernel = Kernel::new(&reparsed);
    let mut checked = 0;
    // Deterministic per flow: every fourth source and every third destination is quarantined.
    for (n, flow) in flows.enumerate() {
        let expected = policy.evaluate(&flow);
        let got = kernel.judge(&flow, &BTreeSet::new());
        assert_eq!(
            got,
            (expected.verdict, expected.rule_index),
            "{context}: kernel lookup disagrees with the evaluator on {flow:?}: {expected:?}"
        );
        let mut overrides = Overrides::default();
        if n % 4 == 0 {
            overrides.quarantined.insert(flow.src);
        }
        if n % 3 == 0 {
            overrides.quarantined.insert(flow.dst);
        }
        if !overrides.quarantined.is_empty() {
            let expected = policy.evaluate_with(&flow, &overrides, 0);
            let got = kernel.judge(&flow, &overrides.quarantined);
            assert_eq!(
                got,
                (expected.verdict, expected.rule_index),
                "{context}: kernel lookup disagrees with the evaluator on {flow:?} with {:?} \
                 quarantined: {expected:?}",
                overrides.quarantined
            );
        }
        checked += 1;
    }
    checked
}

#[test]
fn compiled_maps_agree_with_the_evaluator_on_the_example() {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = SmallRng::seed_from_u64(seed);
    let policy = example_policy();
    let pool: Vec<String> = policy
        .members()
        .map(|(prefix, _)| prefix.to_string())
        .chain([
            "10.99.0.0/16".into(),
            "fd00:99::/64".into(),
            "0.0.0.0/0".into(),
            "::/0".into(),
        ])
        .collect();
    let flows: Vec<Flow> = (0..10_000).map(|_| random_flow(&mut rng, &pool)).collect();
    cross_check(&policy, flows.into_iter(), &format!("example, seed {seed}"));
}

#[test]
fn compiled_maps_agree_with_the_evaluator_on_random_policies() {
    let seed: u64 = std::env::var("CROSS_CHECK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (set CROSS_CHECK_SEED to replay)");
    let mut rng = SmallRng::seed_from_u64(seed);
    let pool = prefix_pool();
    let mut checked = 0;
    let mut policies = 0;
    let mut verdicts: HashMap<Verdict, usize> = HashMap::new();
    while policies < 25 {
        let sources = random_policy(&mut rng);
        let policy = match Policy::from_sources(&sources) {
            Ok(policy) => policy,
            Err(errors) => panic!("seed {seed}: generated policy invalid:\n{errors}\n{sources:#?}"),
        };
        policies += 1;
        let flows: Vec<Flow> = (0..2_000).map(|_| random_flow(&mut rng, &pool)).collect();
        for flow in &flows {
            *verdicts.entry(policy.evaluate(flow).verdict).or_default() += 1;
        }
        checked += cross_check(
            &policy,
            flows.into_iter(),
            &format!("seed {seed}, policy {policies}"),
        );
    }
    println!("{checked} flows on {policies} policies agree: {verdicts:?}");
    assert!(verdicts.len() == 3, "every verdict exercised: {verdicts:?}");
}

/// 200 segments x 20 rules: keeps an eye on compile time (no timing assertion).
#[test]
fn compiles_a_largish_policy() {
    let mut rng = SmallRng::seed_from_u64(7);
    let names: Vec<String> = (0..200).map(|n| format!("seg-{n:03}")).collect();
    let mut sources = Vec::new();
    for (n, name) in names.iter().enumerate() {
        let mut text = format!(
            "segment: {name}\nmembers: [10.{}.{}.0/24, \"fd00:{n:x}::/64\"]\nallow:\n",
            n / 256,
            n % 256
        );
        for _ in 0..20 {
            let from = match rng.random_range(0..20) {
                0 => "any".to_string(),
                1..=4 => format!("172.16.{}.0/24", rng.random_range(0..50)),
                _ => format!(
                    "[{}, {}]",
                    names.choose(&mut rng).unwrap(),
                    names.choose(&mut rng).unwrap()
                ),
            };
            writeln!(
                text,
                "  - from: {from}\n    ports: {}",
                random_ports(&mut rng)
            )
            .unwrap();
        }
        sources.push(source(&format!("big/{name}.yaml"), &text));
    }
    let policy = Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"));
    let started = std::time::Instant::now();
    let artifact = compile(&policy).expect("compiles");
    println!(
        "compiled in {:?}: {:?}",
        started.elapsed(),
        artifact.entry_counts()
    );
    // Written rules, one intra and one essential pseudo-rule per segment, and the essential
    // pseudo-rule of the built-in quarantine segment.
    assert_eq!(artifact.rules.len(), 200 * 20 + 200 + 200 + 1);
    let pool: Vec<String> = policy
        .members()
        .map(|(prefix, _)| prefix.to_string())
        .chain((0..50).map(|n| format!("172.16.{n}.0/24")))
        .collect();
    let flows: Vec<Flow> = (0..500).map(|_| random_flow(&mut rng, &pool)).collect();
    cross_check(&policy, flows.into_iter(), "largish policy");
}

/// 1,000 segments x 100 rules. Run in release with
/// `cargo test --release -p policy-compiler --test compile -- --ignored --nocapture`.
#[test]
#[ignore = "large; run in release mode to measure compile time"]
fn compiles_a_large_policy() {
    let mut rng = SmallRng::seed_from_u64(11);
    let names: Vec<String> = (0..1000).map(|n| format!("seg-{n:04}")).collect();
    let mut sources = Vec::new();
    for (n, name) in names.iter().enumerate() {
        let mut text = format!(
            "segment: {name}\nmembers: [10.{}.{}.0/24, \"fd00:{n:x}::/64\"]\nallow:\n",
            n / 256,
            n % 256
        );
        for _ in 0..100 {
            let from = match rng.random_range(0..1000) {
                0..=9 => "any".to_string(),
                10..=199 => format!(
                    "172.{}.{}.0/24",
                    16 + rng.random_range(0..4),
                    rng.random_range(0..256)
                ),
                _ => format!(
                    "[{}, {}]",
                    names.choose(&mut rng).unwrap(),
                    names.choose(&mut rng).unwrap()
                ),
            };
            writeln!(
                text,
                "  - from: {from}\n    ports: {}",
                random_ports(&mut rng)
            )
            .unwrap();
        }
        sources.push(source(&format!("big/{name}.yaml"), &text));
    }
    let started = std::time::Instant::now();
    let policy = Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"));
    println!("validated in {:?}", started.elapsed());
    let started = std::time::Instant::now();
    let artifact = compile(&policy).expect("compiles");
    println!(
        "compiled in {:?}: {:?}",
        started.elapsed(),
        artifact.entry_counts()
    );
    let started = std::time::Instant::now();
    let json = artifact.to_json();
    println!("serialized {} bytes in {:?}", json.len(), started.elapsed());
}
