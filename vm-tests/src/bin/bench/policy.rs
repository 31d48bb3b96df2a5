//! Generated policies of N member prefixes and N rules, written as YAML so that they go through
//! the same parser, validator and compiler as a user's policy.
//!
//! Prefix `i` is a host (`/32`, or `/128` for every fourth one when IPv6 is on) scattered over
//! 10.0.0.0/8 (fd00::/16) by an odd multiplier, so the tries hold spread-out keys rather than a
//! dense run. It belongs to segment `i % S`. Rule `r` lives in segment `r % S` and allows one
//! source host (`from: [HOST/32]`) on one port: every rule CIDR becomes a source class, so the
//! policy has about N addresses, N (segment, class) pairs and N port entries.
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use policy_compiler::{Artifact, Policy, ReadCache};

#[derive(Clone, Copy)]
pub struct Rule {
    /// Index of the source host.
    pub from: usize,
    /// A member host of the rule's segment, of the source's family: a destination it allows.
    pub to: usize,
    pub tcp: bool,
    pub port: u16,
}

pub struct BenchPolicy {
    pub size: usize,
    pub segments: usize,
    pub hosts: Vec<IpAddr>,
    pub rules: Vec<Rule>,
    /// One file per segment, plus `defaults.yaml`.
    pub sources: Vec<(String, String)>,
}

pub fn segment_count(size: usize) -> usize {
    (size / 100).clamp(2, 1000)
}

/// Host `i`; with `v6`, every fourth host of each segment is IPv6 (`i / segments`, so that
/// every segment has both families).
fn host(i: usize, segments: usize, v6: bool) -> IpAddr {
    if v6 && (i / segments) % 4 == 3 {
        let low = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        IpAddr::V6(Ipv6Addr::from((0xfd00u128 << 112) | u128::from(low)))
    } else {
        let low = (i as u32).wrapping_mul(2_654_435_761) & 0x00ff_ffff;
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | low))
    }
}

/// The prefix written for host `addr`: the host itself, or with `subnets` the /31 (/127) that
/// holds it. No two hosts of a policy below 7.6 million share one: two IPv4 hosts differ only
/// in the last bit when their indexes differ by ±(the multiplier's inverse mod 2^24), 7,655,599
/// at least (IPv6: mod 2^64).
fn cidr(addr: IpAddr, subnets: bool) -> String {
    match (addr, subnets) {
        (IpAddr::V4(a), false) => format!("{a}/32"),
        (IpAddr::V6(a), false) => format!("{a}/128"),
        (IpAddr::V4(a), true) => format!("{}/31", Ipv4Addr::from(u32::from(a) & !1)),
        (IpAddr::V6(a), true) => format!("{}/127", Ipv6Addr::from(u128::from(a) & !1)),
    }
}

pub fn segment_name(s: usize) -> String {
    format!("s{s:04}")
}

/// `variant` shifts every port (a different policy of the same shape); `extra_segment` adds a
/// segment that sorts first, so every segment and class id moves (for reloads).
pub fn generate(size: usize, v6: bool, variant: u16, extra_segment: bool) -> BenchPolicy {
    generate_with(size, v6, variant, extra_segment, false)
}

/// The policy of [`generate`] with every member and rule source a /31 (/127) subnet around its
/// host instead of the host, as in a policy written with subnets: no address has a host entry,
/// so every lookup walks the prefix trie.
pub fn generate_subnets(size: usize) -> BenchPolicy {
    generate_with(size, true, 0, false, true)
}

fn generate_with(
    size: usize,
    v6: bool,
    variant: u16,
    extra_segment: bool,
    subnets: bool,
) -> BenchPolicy {
    let segments = segment_count(size);
    // Addresses are unique below 2^24 (v4) / 2^64 (v6): the multipliers are odd.
    assert!(size <= 1 << 23, "too many hosts for 10.0.0.0/8");
    let hosts: Vec<IpAddr> = (0..size).map(|i| host(i, segments, v6)).collect();
    let per_segment = size.div_ceil(segments);
    let mut rules = Vec::with_capacity(size);
    for r in 0..size {
        let seg = r % segments;
        // A member of the segment, then a source host of the same family from elsewhere.
        let mut to = seg + segments * ((r / segments) % per_segment);
        if to >= size {
            to = seg;
        }
        let mut from = (r.wrapping_mul(7919) + 13) % size;
        while hosts[from].is_ipv6() != hosts[to].is_ipv6() || from % segments == seg {
            from = (from + 1) % size;
        }
        let port = 1024 + ((r / segments) as u16).wrapping_mul(3) % 40_000 + variant;
        rules.push(Rule {
            from,
            to,
            tcp: r % 2 == 0,
            port,
        });
    }
    let mut sources = Vec::with_capacity(segments + 2);
    for seg in 0..segments {
        let mut yaml = format!("segment: {}\nmembers: [", segment_name(seg));
        let members: Vec<String> = (seg..size)
            .step_by(segments)
            .map(|i| format!("\"{}\"", cidr(hosts[i], subnets)))
            .collect();
        yaml.push_str(&members.join(", "));
        yaml.push_str("]\nallow:\n");
        for rule in rules.iter().skip(seg).step_by(segments) {
            let proto = if rule.tcp { "tcp" } else { "udp" };
            let _ = writeln!(
                yaml,
                "  - from: [\"{}\"]\n    ports: [{proto}/{}]",
                cidr(hosts[rule.from], subnets),
                rule.port
            );
        }
        sources.push((format!("segments/{}.yaml", segment_name(seg)), yaml));
    }
    if extra_segment {
        sources.push((
            "segments/a-extra.yaml".to_string(),
            "segment: a-extra\nmembers: [\"172.31.0.0/24\"]\nallow:\n  - from: [\"172.31.1.0/24\"]\n    ports: [tcp/1]\n".to_string(),
        ));
    }
    // Long timeouts: nothing expires while a benchmark runs.
    sources.push((
        "segments/defaults.yaml".to_string(),
        "conntrack:\n  max_entries: 1000000\n  udp_timeout: 1h\n  tcp_syn_timeout: 1h\n  icmp_timeout: 1h\n"
            .to_string(),
    ));
    BenchPolicy {
        size,
        segments,
        hosts,
        rules,
        sources,
    }
}

impl BenchPolicy {
    pub fn validate(&self) -> Result<Policy> {
        Policy::from_sources(&self.sources).map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn compile(&self) -> Result<Artifact> {
        Ok(policy_compiler::compile(&self.validate()?)?)
    }

    /// As the daemon validates and compiles: through its read cache (see [`ReadCache`]).
    /// The validated policy and its artifact, as the daemon's load has them: it keeps the
    /// policy until the new one is live.
    pub fn compile_cached(&self, cache: &mut ReadCache) -> Result<(Policy, Artifact)> {
        let policy = Policy::from_sources_cached(&self.sources, cache)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let artifact = policy_compiler::compile(&policy)?;
        Ok((policy, artifact))
    }

    pub fn segment_of(&self, host: usize) -> usize {
        host % self.segments
    }

    /// Writes the policy files into `dir` (created).
    pub fn write_dir(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        for (name, text) in &self.sources {
            let file = name.trim_start_matches("segments/");
            std::fs::write(dir.join(file), text)?;
        }
        Ok(())
    }
}
