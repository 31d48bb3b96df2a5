//! Random policies for the differential tests, written as YAML so that every generated case
//! goes through the same parser, validator and compiler as a user's policy. Addresses are drawn
//! from a small universe so that random packets keep landing in members, rule CIDRs, nested
//! prefixes and `world`.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use policy_compiler::{Grant, breakglass::parse_ports};
use rand::{Rng, seq::IndexedRandom as _};

/// A generated policy: its files, and addresses worth sending packets to and from.
pub struct GeneratedPolicy {
    pub sources: Vec<(String, String)>,
    pub interesting: Vec<IpAddr>,
    /// The segments' names.
    pub segment_names: Vec<String>,
}

#[derive(Clone, Copy)]
struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    fn to_yaml(self) -> String {
        format!("\"{}/{}\"", self.addr, self.len)
    }

    fn last(self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let host = if self.len == 32 {
                    0
                } else {
                    u32::MAX >> self.len
                };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) | host))
            }
            IpAddr::V6(a) => {
                let host = if self.len == 128 {
                    0
                } else {
                    u128::MAX >> self.len
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(a) | host))
            }
        }
    }

    fn random_inside(self, rng: &mut impl Rng) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let host = if self.len == 32 {
                    0
                } else {
                    u32::MAX >> self.len
                };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) | (rng.random::<u32>() & host)))
            }
            IpAddr::V6(a) => {
                let host = if self.len == 128 {
                    0
                } else {
                    u128::MAX >> self.len
                };
                IpAddr::V6(Ipv6Addr::from(
                    u128::from(a) | (rng.random::<u128>() & host),
                ))
            }
        }
    }
}

/// A random IPv4 address in 10.0-3.0-3.x: small enough that prefixes nest and collide.
fn universe_v4(rng: &mut impl Rng) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        rng.random_range(0..4),
        rng.random_range(0..4),
        rng.random(),
    )
}

/// A random IPv6 address in fd00:0-3:0-3::/32-ish.
fn universe_v6(rng: &mut impl Rng) -> Ipv6Addr {
    let high: u128 = (0xfd00u128 << 112)
        | (rng.random_range(0..4u128) << 96)
        | (rng.random_range(0..4u128) << 80);
    Ipv6Addr::from(high | u128::from(rng.random::<u16>()))
}

/// A random prefix; with `long`, only lengths whose addresses the host tables can hold
/// (`policy_compiler::artifact::SUBNET_EXPANSION_BITS`), so that a whole policy of them is
/// judged through the tables rather than the tries.
fn random_prefix(rng: &mut impl Rng, long: bool) -> Prefix {
    let (v4_lengths, v6_lengths): (&[u8], &[u8]) = if long {
        (&[24, 26, 28, 30, 32], &[120, 124, 128])
    } else {
        (
            &[8, 12, 16, 20, 24, 26, 28, 30, 32],
            &[16, 32, 48, 64, 80, 96, 112, 120, 128],
        )
    };
    if rng.random_bool(0.7) {
        let len = *v4_lengths.choose(rng).unwrap();
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        let addr = u32::from(universe_v4(rng)) & mask;
        Prefix {
            addr: IpAddr::V4(Ipv4Addr::from(addr)),
            len,
        }
    } else {
        let len = *v6_lengths.choose(rng).unwrap();
        let mask = u128::MAX << (128 - u32::from(len));
        let addr = u128::from(universe_v6(rng)) & mask;
        Prefix {
            addr: IpAddr::V6(Ipv6Addr::from(addr)),
            len,
        }
    }
}

fn random_port_entry<R: Rng>(rng: &mut R) -> String {
    const COMMON: [u16; 8] = [22, 53, 80, 104, 443, 2575, 5432, 11112];
    let port = |rng: &mut R| -> u16 {
        if rng.random_bool(0.6) {
            *COMMON.choose(rng).unwrap()
        } else {
            rng.random()
        }
    };
    match rng.random_range(0..12) {
        0..=2 => format!("tcp/{}", port(rng)),
        3 => {
            let a = port(rng);
            let b = port(rng);
            format!("tcp/{}-{}", a.min(b), a.max(b))
        }
        4..=5 => format!("udp/{}", port(rng)),
        6 => {
            let a = port(rng);
            format!("udp/{}-{}", a, a.saturating_add(rng.random_range(0..300)))
        }
        7 => format!(
            "icmp/{}",
            ["echo-request", "echo-reply", "3", "11"]
                .choose(rng)
                .unwrap()
        ),
        8 => format!(
            "icmpv6/{}",
            ["echo-request", "129", "1", "135"].choose(rng).unwrap()
        ),
        9 => ["tcp/any", "udp/any", "icmp/any"]
            .choose(rng)
            .unwrap()
            .to_string(),
        10 => format!("tcp/{}", rng.random_range(0..=65535u32)),
        _ => "any".to_string(),
    }
}

/// Generates a random valid policy.
pub fn generate(rng: &mut impl Rng) -> GeneratedPolicy {
    let segment_count = rng.random_range(1..=8);
    // A third of the policies use only prefixes the host tables can hold address by address.
    let long = rng.random_bool(0.3);
    let names: Vec<String> = (0..segment_count).map(|i| format!("s{i}")).collect();
    let names_for_grants = names.clone();
    // Rules may also name the built-in quarantine segment (hosts quarantined at run time).
    let source_names: Vec<String> = names
        .iter()
        .cloned()
        .chain(["quarantine".to_string()])
        .collect();
    let mut used = BTreeSet::new();
    let mut interesting = Vec::new();
    let mut sources = Vec::new();
    for name in &names {
        let mut yaml = format!("segment: {name}\nmembers: [");
        let member_count = rng.random_range(1..=3);
        let mut members = Vec::new();
        while members.len() < member_count {
            let prefix = random_prefix(rng, long);
            if used.insert((prefix.addr, prefix.len)) {
                members.push(prefix.to_yaml());
                note(prefix, rng, &mut interesting);
            }
        }
        yaml.push_str(&members.join(", "));
        yaml.push_str("]\n");
        if rng.random_bool(0.3) {
            yaml.push_str("mode: monitor\n");
        } else if rng.random_bool(0.5) {
            yaml.push_str("mode: enforce\n");
        }
        match rng.random_range(0..3) {
            0 => yaml.push_str("intra: deny\n"),
            1 => yaml.push_str("intra: allow\n"),
            _ => {}
        }
        let rules = random_rules(rng, name, &source_names, long, &mut interesting);
        yaml.push_str(&rules);
        sources.push((format!("segments/{name}.yaml"), yaml));
    }
    // The built-in quarantine segment, with an allow-list of its own half of the time.
    if rng.random_bool(0.5) {
        let mut yaml = "segment: quarantine\n".to_string();
        yaml.push_str(&random_rules(
            rng,
            "quarantine",
            &source_names,
            long,
            &mut interesting,
        ));
        sources.push(("segments/quarantine.yaml".to_string(), yaml));
    }
    let mut yaml = random_settings(rng);
    if rng.random_bool(0.6) {
        yaml.push_str("world:\n");
        let mode = *["unenforced", "enforce", "monitor"].choose(rng).unwrap();
        let _ = writeln!(yaml, "  mode: {mode}");
        let rules = random_rules(rng, "world", &source_names, long, &mut interesting);
        for line in rules.lines() {
            let _ = writeln!(yaml, "  {line}");
        }
    }
    sources.push(("segments/defaults.yaml".to_string(), yaml));
    for _ in 0..6 {
        interesting.push(IpAddr::V4(universe_v4(rng)));
        interesting.push(IpAddr::V6(universe_v6(rng)));
    }
    interesting.push(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    interesting.push(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)));
    GeneratedPolicy {
        sources,
        interesting,
        segment_names: names_for_grants,
    }
}

/// A random break-glass grant between the policy's segments (sometimes `world`, or a segment
/// the policy does not have), live (expiry `u64::MAX`) or expired (0) in reference time.
pub fn random_grant<R: Rng>(rng: &mut R, id: u32, segment_names: &[String]) -> Grant {
    let segment = |rng: &mut R| match rng.random_range(0..10) {
        0 => "world".to_string(),
        1 => "gone".to_string(),
        _ => segment_names.choose(rng).unwrap().clone(),
    };
    let (from, to) = (segment(rng), segment(rng));
    let entries: Vec<String> = (0..rng.random_range(1..=3))
        .map(|_| random_port_entry(rng))
        .collect();
    Grant {
        id,
        from,
        to,
        ports: parse_ports(&entries).expect("generated port entries are valid"),
        expires_ns: if rng.random_bool(0.8) { u64::MAX } else { 0 },
    }
}

/// Policy-wide settings. Timeouts are long so that nothing expires during a test run (the
/// reference model's clock stands still); tables are sometimes tiny so that "full" happens.
fn random_settings(rng: &mut impl Rng) -> String {
    let mut yaml = String::new();
    let change = *["recheck", "keep"].choose(rng).unwrap();
    let _ = writeln!(yaml, "on_policy_change: {change}");
    let egress = *["unenforced", "unenforced", "monitor", "enforce"]
        .choose(rng)
        .unwrap();
    let _ = writeln!(yaml, "egress: {egress}");
    match rng.random_range(0..3) {
        0 => yaml.push_str("essential_traffic: []\n"),
        1 => yaml
            .push_str("essential_traffic: [icmp/time-exceeded, icmpv6/packet-too-big, udp/53]\n"),
        _ => {}
    }
    let conntrack = if rng.random_bool(0.15) { 24 } else { 100_000 };
    let _ = writeln!(
        yaml,
        "conntrack:\n  max_entries: {conntrack}\n  tcp_syn_timeout: 1h\n  tcp_established_timeout: 1h\n  tcp_closing_timeout: 1h\n  udp_timeout: 1h\n  icmp_timeout: 1h\n  other_timeout: 1h"
    );
    let fragments = if rng.random_bool(0.15) { 8 } else { 10_000 };
    let _ = writeln!(
        yaml,
        "fragments:\n  max_entries: {fragments}\n  timeout: 1h"
    );
    yaml
}

/// A variant of a generated policy for a reload: one segment loses its rules or changes mode.
/// It never needs more map entries than the original, so it fits the loaded maps.
pub fn mutate_policy(rng: &mut impl Rng, sources: &[(String, String)]) -> Vec<(String, String)> {
    let mut sources = sources.to_vec();
    let segments: Vec<usize> = (0..sources.len())
        .filter(|&i| !sources[i].0.ends_with("defaults.yaml"))
        .collect();
    let Some(&chosen) = segments.choose(rng) else {
        return sources;
    };
    let text = &mut sources[chosen].1;
    if rng.random_bool(0.5)
        && let Some(allow) = text.find("allow:")
    {
        text.truncate(allow);
    } else if text.contains("mode: monitor") {
        *text = text.replace("mode: monitor", "mode: enforce");
    } else {
        *text = text.replace("mode: enforce", "mode: monitor");
    }
    sources
}

/// Records a prefix's edges and one random inside address as packet endpoints.
fn note(prefix: Prefix, rng: &mut impl Rng, interesting: &mut Vec<IpAddr>) {
    interesting.push(prefix.addr);
    interesting.push(prefix.last());
    interesting.push(prefix.random_inside(rng));
}

fn random_rules(
    rng: &mut impl Rng,
    owner: &str,
    names: &[String],
    long: bool,
    interesting: &mut Vec<IpAddr>,
) -> String {
    let rule_count = rng.random_range(0..=5);
    if rule_count == 0 {
        return String::new();
    }
    let mut yaml = String::from("allow:\n");
    for i in 0..rule_count {
        let from_count = rng.random_range(1..=3);
        let mut from = Vec::new();
        for _ in 0..from_count {
            match rng.random_range(0..10) {
                0..=4 => from.push(names.choose(rng).unwrap().clone()),
                5 => from.push("world".to_string()),
                6 => from.push("any".to_string()),
                _ => {
                    let prefix = random_prefix(rng, long);
                    note(prefix, rng, interesting);
                    from.push(prefix.to_yaml());
                }
            }
        }
        from.sort();
        from.dedup();
        let port_count = rng.random_range(1..=3);
        let ports: Vec<String> = (0..port_count)
            .map(|_| format!("\"{}\"", random_port_entry(rng)))
            .collect();
        if rng.random_bool(0.2) {
            let _ = writeln!(yaml, "  - name: {owner}-r{i}");
            let _ = writeln!(yaml, "    from: [{}]", from.join(", "));
        } else {
            let _ = writeln!(yaml, "  - from: [{}]", from.join(", "));
        }
        let _ = writeln!(yaml, "    ports: [{}]", ports.join(", "));
    }
    yaml
}
