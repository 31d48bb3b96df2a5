//! 1. Per-packet cost under `BPF_PROG_TEST_RUN`: the empty program (floor), the parser alone,
//!    and the enforcer, over corpora that cycle through many addresses, at each policy size.
use std::{fmt::Write as _, net::IpAddr};

use anyhow::{Context as _, Result, bail};
use enforcer::{Enforcer, EventOptions};
use enforcer_common::bench;
use vm_tests::{
    harness::{XDP_DROP, XDP_PASS},
    packet_builder::{self, PacketSpec, TCP_SYN, Transport},
};

use crate::{
    Options,
    common::{
        Parking, enable_flow_filter, load_xdp, median, ns_per_packet, paired_diff, paired_ratio,
        run_once, xdp,
    },
    policy::{self, BenchPolicy},
    report::{Figure, Report, Section},
};

fn spec(p: &BenchPolicy, src: usize, dst: IpAddr, transport: Transport) -> PacketSpec {
    PacketSpec::new(p.hosts[src], dst, transport)
}

fn transport(tcp: bool, sport: u16, dport: u16) -> Transport {
    if tcp {
        Transport::tcp(sport, dport, TCP_SYN)
    } else {
        Transport::udp(sport, dport)
    }
}

/// A host of the same family as `like` and in another segment (`intra: allow` would pass
/// traffic between two members of one segment), picked by `seed`.
fn host_like(p: &BenchPolicy, like: usize, seed: usize) -> usize {
    let mut h = seed.wrapping_mul(2_654_435_761) % p.size;
    while p.hosts[h].is_ipv6() != p.hosts[like].is_ipv6() || p.segment_of(h) == p.segment_of(like) {
        h = (h + 1) % p.size;
    }
    h
}

/// The mixed corpus: allowed new flows and their replies (which pass by connection state),
/// denied TCP/UDP/ICMP between random hosts, traffic to `world`; IPv4 and IPv6, some with a
/// VLAN tag. With `(frame, expected XDP action)` for a sanity check.
pub fn mixed_corpus(p: &BenchPolicy, frames: usize) -> Vec<(Vec<u8>, u32)> {
    let mut out = Vec::with_capacity(frames);
    let mut i = 0usize;
    while out.len() < frames {
        let rule = p.rules[(i.wrapping_mul(40_503)) % p.rules.len()];
        let dst = p.hosts[rule.to];
        let sport = 20_000 + (i % 40_000) as u16;
        let allowed = spec(p, rule.from, dst, transport(rule.tcp, sport, rule.port));
        let vlan = i.is_multiple_of(3);
        let tag = |s: PacketSpec| if vlan { s.with_vlan(100) } else { s };
        let reply = allowed.reversed().with_tcp_flags(TCP_SYN | 0x10);
        let a = host_like(p, rule.from, i * 7 + 1);
        let b = host_like(p, a, i * 13 + 5);
        let denied = match i % 3 {
            0 => transport(false, sport, 9),
            1 => transport(true, sport, 23),
            _ => Transport::icmp(if p.hosts[a].is_ipv6() { 128 } else { 8 }, i as u16),
        };
        let world: IpAddr = if p.hosts[a].is_ipv6() {
            "2001:db8::1".parse().unwrap()
        } else {
            "192.0.2.1".parse().unwrap()
        };
        for (s, action) in [
            (tag(allowed), XDP_PASS),
            (tag(reply), XDP_PASS),
            (tag(spec(p, a, p.hosts[b], denied)), XDP_DROP),
            (spec(p, a, world, transport(false, sport, 53)), XDP_PASS),
        ] {
            out.push((packet_builder::build(&s).0, action));
        }
        i += 1;
    }
    out.truncate(frames);
    out
}

/// The judged corpus: every packet is a new flow the policy denies, so every run of it does
/// the full lookup (both addresses, the pair, the pair's single-port table for half of them).
pub fn judged_corpus(p: &BenchPolicy, frames: usize) -> Vec<(Vec<u8>, u32)> {
    (0..frames)
        .map(|i| {
            let rule = p.rules[(i.wrapping_mul(40_503)) % p.rules.len()];
            let sport = 20_000 + (i % 40_000) as u16;
            let s = if i % 2 == 0 {
                // The rule's own pair, a port no rule allows (rule ports are below 42,000): the
                // pair's single-port table is searched and misses.
                spec(
                    p,
                    rule.from,
                    p.hosts[rule.to],
                    transport(rule.tcp, sport, 50_000 + (i % 1000) as u16),
                )
            } else {
                let a = host_like(p, rule.from, i * 7 + 3);
                let b = host_like(p, a, i * 11 + 1);
                spec(p, a, p.hosts[b], transport(i % 4 == 1, sport, 9))
            };
            let s = if i % 5 == 0 { s.with_vlan(7) } else { s };
            (packet_builder::build(&s).0, XDP_DROP)
        })
        .collect()
}

/// Corpora measured, by their index in the samples: the first two on the host policy, the third
/// on the same policy written with subnets.
const CORPORA: [&str; 3] = ["mixed", "judged", "judged_subnets"];

/// One policy's enforcer, the same policy under the kernel programs of `--baseline-object`,
/// and the corpora measured on it: frames with the XDP action each must get.
struct Loaded {
    enforcer: Enforcer,
    baseline: Option<Enforcer>,
    corpora: Vec<Vec<(Vec<u8>, u32)>>,
}

impl Loaded {
    fn new(
        p: &BenchPolicy,
        corpora: Vec<Vec<(Vec<u8>, u32)>>,
        baseline_object: Option<&[u8]>,
        parking: &mut Parking,
    ) -> Result<Self> {
        let artifact = p.compile()?;
        let mut enforcer = Enforcer::load(&artifact)?;
        enable_flow_filter(&mut enforcer)?;
        parking.park(
            enforcer.ebpf_mut(),
            enforcer_common::program_names::XDP_INGRESS,
        )?;
        let mut baseline = match baseline_object {
            Some(object) => Some(
                Enforcer::load_object(&artifact, EventOptions::default(), object)
                    .context("loading the baseline object")?,
            ),
            None => None,
        };
        if let Some(baseline) = &mut baseline {
            enable_flow_filter(baseline)?;
            parking.park(
                baseline.ebpf_mut(),
                enforcer_common::program_names::XDP_INGRESS,
            )?;
        }
        // Sanity: the enforcer (and the baseline) give every frame the verdict the corpus was
        // built for.
        for (which, e) in [
            ("this build", Some(&enforcer)),
            ("baseline", baseline.as_ref()),
        ] {
            let Some(e) = e else { continue };
            let program = e.xdp_program()?;
            for (frame, want) in corpora.iter().flatten() {
                let got = run_once(program, frame)?;
                if got != *want {
                    bail!(
                        "policy of {}, {which}: frame {} got action {got}, want {want}",
                        p.size,
                        vm_tests::harness::hex(frame)
                    );
                }
            }
        }
        Ok(Self {
            enforcer,
            baseline,
            corpora,
        })
    }
}

pub fn run(opts: &Options, report: &mut Report) -> Result<()> {
    let sizes: Vec<usize> = if opts.quick {
        vec![10, 1_000, 100_000]
    } else {
        vec![10, 1_000, 100_000, 1_000_000]
    };
    let frames = if opts.quick { 256 } else { 1_000 };
    let repeat = if opts.quick { 50 } else { 100 };
    let baseline_object = opts.read_baseline_object()?;
    let mut parking = Parking::new("pp")?;
    // Per size: the host policy with the mixed and judged corpora, then the subnet policy with
    // its judged corpus (`CORPORA`).
    let mut loaded: Vec<[Loaded; 2]> = Vec::new();
    for &size in &sizes {
        let hosts = policy::generate(size, true, 0, false);
        let mut on_hosts = Loaded::new(
            &hosts,
            vec![mixed_corpus(&hosts, frames), judged_corpus(&hosts, frames)],
            baseline_object.as_deref(),
            &mut parking,
        )?;
        if loaded.is_empty() {
            // The floors live in the first enforcer's object: they use no policy map.
            let ebpf = on_hosts.enforcer.ebpf_mut();
            load_xdp(ebpf, bench::EMPTY)?;
            load_xdp(ebpf, bench::PARSE_ONLY)?;
            parking.park(ebpf, bench::EMPTY)?;
            parking.park(ebpf, bench::PARSE_ONLY)?;
        }
        let subnets = policy::generate_subnets(size);
        let on_subnets = Loaded::new(
            &subnets,
            vec![judged_corpus(&subnets, frames)],
            baseline_object.as_deref(),
            &mut parking,
        )?;
        eprintln!("per-packet: loaded the policies of {size} prefixes/rules");
        loaded.push([on_hosts, on_subnets]);
    }

    // samples[corpus][arm][size index][run]; arms: 0 empty, 1 parse-only, 2 enforcer,
    // 3 baseline (with --baseline-object).
    let arms = if baseline_object.is_some() { 4 } else { 3 };
    let mut samples = vec![vec![vec![Vec::new(); sizes.len()]; arms]; CORPORA.len()];
    let corpora: Vec<Vec<Vec<Vec<u8>>>> = loaded
        .iter()
        .map(|policies| {
            policies
                .iter()
                .flat_map(|l| &l.corpora)
                .map(|corpus| corpus.iter().map(|(frame, _)| frame.clone()).collect())
                .collect()
        })
        .collect();
    for run in 0..opts.runs {
        for (si, policies) in loaded.iter().enumerate() {
            let floors = loaded[0][0].enforcer.ebpf();
            let mut ci = 0;
            for l in policies {
                let mut programs = vec![
                    xdp(floors, bench::EMPTY)?,
                    xdp(floors, bench::PARSE_ONLY)?,
                    l.enforcer.xdp_program()?,
                ];
                if let Some(baseline) = &l.baseline {
                    programs.push(baseline.xdp_program()?);
                }
                for _ in &l.corpora {
                    // Rotate the order every run so no arm always goes first.
                    for k in 0..arms {
                        let arm = (k + run) % arms;
                        let ns = ns_per_packet(programs[arm], &corpora[si][ci], repeat)?;
                        samples[ci][arm][si].push(ns);
                    }
                    ci += 1;
                }
            }
        }
    }

    let mut text = String::new();
    let _ = writeln!(
        text,
        "Method: for each policy size a policy of N host prefixes and N rules \
         (`vm-tests/src/bin/bench/policy.rs`: segments = N/100 clamped to 2..1000, a quarter of \
         the hosts IPv6, rule r allows one source host to segment r mod S on one TCP or UDP \
         port) is compiled with `policy_compiler::compile` and \
         loaded with `Enforcer::load` (all sizes loaded at once), with the filter in front of \
         the connection table enabled as the daemon enables it. Two corpora of {frames} \
         different frames each: **mixed** (allowed TCP/UDP new flows, their replies, denied \
         TCP/UDP/ICMP between random hosts, traffic to `world`; IPv4 and IPv6, a third with an \
         802.1Q tag) and **judged** (only new flows that the policy denies, so every packet \
         takes the full lookup: both addresses, the segment pair, and for half of them the \
         pair's single-port table). A third corpus, **judged_subnets**, is the judged one on the same policy written \
         with subnets: every member and rule source the /31 (/127) around its host \
         (`policy::generate_subnets`), so no address has a host entry of its own, as with a \
         policy of VLAN subnets: the loader puts the subnets' addresses into the host table \
         up to 262,144 of them, and beyond that (at 1M) their blocks into the block table. Each frame is run with `BPF_PROG_TEST_RUN` `repeat={repeat}`; the kernel reports \
         the mean ns per repetition (whole ns), and a sample is the mean over the corpus. Repeats \
         of one frame see the state its first run created: an allowed flow is `established` from \
         its second repetition on, a denied flow is judged every time (its flow event is \
         rate-limited after the first). One run measures every arm at every size, arms rotated \
         (A B C, B C A, ...); {} runs, pinned to CPU {} with `sched_setaffinity` (aya's \
         `TestRunOptions` has no CPU option for XDP; test_run runs on the caller's CPU).\n",
        opts.runs,
        crate::common::bench_cpu(),
    );
    let _ = writeln!(
        text,
        "| corpus | size | empty ns | parse-only ns | enforcer ns | enforcer − empty ns | enforcer / empty |\n|---|---|---|---|---|---|---|"
    );
    let names = CORPORA;
    for ci in 0..CORPORA.len() {
        for (si, &size) in sizes.iter().enumerate() {
            let [e, p, f] = [0, 1, 2].map(|a| &samples[ci][a][si]);
            let _ = writeln!(
                text,
                "| {} | {size} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
                names[ci],
                median(e),
                median(p),
                median(f),
                paired_diff(f, e),
                paired_ratio(f, e)
            );
        }
    }
    for ci in 0..CORPORA.len() {
        let name = names[ci];
        report.plot.push((
            format!("enforcer ({name})"),
            sizes
                .iter()
                .enumerate()
                .map(|(si, &s)| (s, median(&samples[ci][2][si])))
                .collect(),
        ));
    }
    for (arm, label) in [(1, "parse only"), (0, "empty program")] {
        report.plot.push((
            label.to_string(),
            sizes
                .iter()
                .enumerate()
                .map(|(si, &s)| (s, median(&samples[0][arm][si])))
                .collect(),
        ));
    }

    for ci in 0..CORPORA.len() {
        let name = names[ci];
        for (si, &size) in sizes.iter().enumerate() {
            let (e, f) = (&samples[ci][0][si], &samples[ci][2][si]);
            let above = paired_diff(f, e);
            let mut figure = Figure::new(
                format!("per_packet_{name}_{size}_enforcer_minus_empty"),
                above,
                "ns",
            )
            .vs(
                "empty XDP program (ratio: enforcer / empty)",
                paired_ratio(f, e),
            );
            if size == 100_000 {
                figure = figure.target("≤ 50 ns above the empty program", above <= 50.0);
            }
            report.figures.push(figure);
            report.figures.push(
                Figure::new(
                    format!("per_packet_{name}_{size}_enforcer"),
                    median(f),
                    "ns",
                )
                .vs("parse-only program (ratio: enforcer / parse-only)", {
                    paired_ratio(f, &samples[ci][1][si])
                }),
            );
        }
        if let (Some(k1), Some(m1)) = (
            sizes.iter().position(|&s| s == 1_000),
            sizes.iter().position(|&s| s == 1_000_000),
        ) {
            let (a, b) = (&samples[ci][2][m1], &samples[ci][2][k1]);
            let ratio = paired_ratio(a, b);
            report.figures.push(
                Figure::new(format!("per_packet_{name}_1M_vs_1k"), median(a), "ns")
                    .vs("enforcer at 1k prefixes/rules", ratio)
                    .target("≤ 1.3 × the cost at 1k", ratio <= 1.3),
            );
        }
    }
    if let Some(file) = &opts.baseline_object {
        let _ = writeln!(
            text,
            "\n**Against the baseline object** `{}` (the kernel programs of an earlier build, \
             loaded with the same policy and measured as a fourth arm in the same rotation):\n\n\
             | corpus | size | enforcer ns | baseline ns | enforcer / baseline |\n|---|---|---|---|---|",
            file.display()
        );
        for ci in 0..CORPORA.len() {
            for (si, &size) in sizes.iter().enumerate() {
                let (f, b) = (&samples[ci][2][si], &samples[ci][3][si]);
                let ratio = paired_ratio(f, b);
                let _ = writeln!(
                    text,
                    "| {} | {size} | {:.1} | {:.1} | {ratio:.3} |",
                    names[ci],
                    median(f),
                    median(b),
                );
                report.figures.push(
                    Figure::new(
                        format!("per_packet_{}_{size}_vs_baseline", names[ci]),
                        median(f),
                        "ns",
                    )
                    .vs(
                        "the baseline object's programs (ratio: enforcer / baseline)",
                        ratio,
                    ),
                );
            }
        }
    }
    report.sections.push(Section {
        title: "1. Per-packet cost (BPF_PROG_TEST_RUN)".to_string(),
        text,
    });
    Ok(())
}
