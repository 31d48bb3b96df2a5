//! 2. End to end on veth: a generator (`bench_tx`, run with `BPF_F_TEST_XDP_LIVE_FRAMES`)
//!    sends 64-byte UDP frames into one end of a veth pair; the other end runs the arm under
//!    test. Every frame is denied by the policy, so every arm drops every frame it processes,
//!    and the packets it processed are counted by its own counters.
use std::{fmt::Write as _, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};
use aya::{
    EbpfLoader,
    maps::Array,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use enforcer::{Enforcer, EventOptions};
use enforcer_common::{BenchFlow, bench, counter, direction};
use vm_tests::packet_builder::{self, PacketSpec, Transport};

use crate::{
    Options,
    common::{
        Netns, bench_cpu, median, other_cpu, paired_ratio, per_cpu_sum, pin_pid, wait_until_idle,
    },
    policy::{self, BenchPolicy},
    report::{Figure, Report, Section},
};

const FLOWS: usize = 16_384;
const FRAME_LEN: usize = 60;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Enforcer,
    /// The enforcer with the kernel programs of `--baseline-object`.
    Baseline,
    Floor,
    NftLinear,
    NftHash,
    NftInterval,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Enforcer => "enforcer",
            Kind::Baseline => "enforcer, baseline object",
            Kind::Floor => "parse-and-drop floor",
            Kind::NftLinear => "nftables linear rules",
            Kind::NftHash => "nftables verdict maps (hash)",
            Kind::NftInterval => "nftables interval maps",
        }
    }
}

struct Arm {
    kind: Kind,
    size: usize,
    /// Generator side of the veth pair, and its ifindex.
    gen_ifindex: u32,
    rx: String,
    enforcer: Option<Enforcer>,
    samples: Vec<f64>,
}

pub fn mac(side: u8, i: usize) -> [u8; 6] {
    [0x02, side, 0, 0, (i >> 8) as u8, i as u8]
}

pub fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The flows every arm of one policy size receives: UDP to port 9 between hosts of two
/// segments (no rule allows port 9).
fn flows(p: &BenchPolicy) -> Vec<BenchFlow> {
    (0..FLOWS.min(p.size * 4))
        .map(|i| {
            let a = (i.wrapping_mul(2_654_435_761)) % p.size;
            let mut b = (i.wrapping_mul(40_503) + 7) % p.size;
            while p.segment_of(b) == p.segment_of(a) {
                b = (b + 1) % p.size;
            }
            let (std::net::IpAddr::V4(src), std::net::IpAddr::V4(dst)) = (p.hosts[a], p.hosts[b])
            else {
                unreachable!("the end-to-end policy is IPv4 only")
            };
            BenchFlow {
                src: src.octets(),
                dst: dst.octets(),
                dport: 9u16.to_be_bytes(),
                _pad: [0; 2],
            }
        })
        .collect()
}

/// nftables on the netdev ingress hook of `device` (the earliest hook, before the IP stack),
/// holding `p` in one of three forms. Rules only cover what the benchmark sends (IPv4).
fn nft_ruleset(p: &BenchPolicy, kind: Kind, table: &str, device: &str) -> String {
    let mut out = format!("table netdev {table} {{\n  counter drops {{ }}\n");
    let proto = |tcp: bool| if tcp { "tcp" } else { "udp" };
    match kind {
        Kind::NftLinear => {
            // One rule per policy rule; the destination segment's members as a set.
            for seg in 0..p.segments {
                let members: Vec<String> = (seg..p.size)
                    .step_by(p.segments)
                    .map(|i| p.hosts[i].to_string())
                    .collect();
                let _ = writeln!(
                    out,
                    "  set m{seg} {{ type ipv4_addr; elements = {{ {} }} }}",
                    members.join(", ")
                );
            }
            let _ = writeln!(
                out,
                "  chain ingress {{\n    type filter hook ingress device \"{device}\" priority 0; policy accept;"
            );
            for (r, rule) in p.rules.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "    ip saddr {} ip daddr @m{} {} dport {} accept",
                    p.hosts[rule.from],
                    r % p.segments,
                    proto(rule.tcp),
                    rule.port
                );
            }
            out.push_str("    counter name \"drops\" drop\n  }\n");
        }
        Kind::NftHash | Kind::NftInterval => {
            // The enforcer's pipeline: destination -> segment chain -> (source, proto, port).
            let interval = kind == Kind::NftInterval;
            let (flags, suffix) = if interval {
                ("flags interval; ", "/32")
            } else {
                ("", "")
            };
            let dst: Vec<String> = (0..p.size)
                .map(|i| format!("{}{suffix} : jump s{}", p.hosts[i], p.segment_of(i)))
                .collect();
            for seg in 0..p.segments {
                let allow: Vec<String> = p
                    .rules
                    .iter()
                    .skip(seg)
                    .step_by(p.segments)
                    .map(|r| {
                        format!(
                            "{}{suffix} . {} . {} : accept",
                            p.hosts[r.from],
                            proto(r.tcp),
                            r.port
                        )
                    })
                    .collect();
                let elements = if allow.is_empty() {
                    String::new()
                } else {
                    format!("elements = {{ {} }}", allow.join(", "))
                };
                let _ = writeln!(
                    out,
                    "  map a{seg} {{ type ipv4_addr . inet_proto . inet_service : verdict; {flags}{elements} }}\n  chain s{seg} {{\n    ip saddr . meta l4proto . th dport vmap @a{seg}\n    counter name \"drops\" drop\n  }}"
                );
            }
            let _ = writeln!(
                out,
                "  map dsts {{ type ipv4_addr : verdict; {flags}elements = {{ {} }} }}",
                dst.join(", ")
            );
            let _ = writeln!(
                out,
                "  chain ingress {{\n    type filter hook ingress device \"{device}\" priority 0; policy accept;\n    ip daddr vmap @dsts\n  }}"
            );
        }
        _ => unreachable!(),
    }
    out.push_str("}\n");
    out
}

pub fn frame(gen_mac: [u8; 6], rx_mac: [u8; 6]) -> Vec<u8> {
    let (mut frame, _) = packet_builder::build(&PacketSpec::new(
        "10.0.0.1".parse().unwrap(),
        "10.0.0.2".parse().unwrap(),
        Transport::udp(4000, 9),
    ));
    frame[0..6].copy_from_slice(&rx_mac);
    frame[6..12].copy_from_slice(&gen_mac);
    // Pad to the 60-byte minimum (64 on the wire with the FCS), lengths to match.
    let pad = FRAME_LEN - frame.len();
    frame.extend(std::iter::repeat_n(0u8, pad));
    let ip_len = (FRAME_LEN - 14) as u16;
    frame[16..18].copy_from_slice(&ip_len.to_be_bytes());
    frame[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    frame
}

/// `struct xdp_md` for a live-frames run injected on `ifindex`.
pub fn xdp_md(ifindex: u32) -> Vec<u8> {
    [0u32, FRAME_LEN as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}

/// Moves the veth NAPI threads of the namespace's receivers to the other CPU, so the receiving
/// arm does not share a CPU with the generator.
fn pin_napi_threads() -> usize {
    let mut pinned = 0;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.starts_with("napi/rx") && pin_pid(pid, other_cpu()).is_ok() {
                pinned += 1;
            }
        }
    }
    pinned
}

pub fn run(opts: &Options, report: &mut Report) -> Result<()> {
    let sizes = [10usize, 1_000, 100_000];
    // About 0.1 s (quick) or 1 s of generator time per sample.
    let packets: u32 = if opts.quick { 500_000 } else { 10_000_000 };
    let netns = Netns::create("e2e")?;
    let dir = std::env::temp_dir().join(crate::common::own_name("nft"));
    std::fs::create_dir_all(&dir)?;
    let result = measure(opts, report, &netns, &dir, &sizes, packets);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(
    opts: &Options,
    report: &mut Report,
    netns: &Netns,
    dir: &Path,
    sizes: &[usize],
    packets: u32,
) -> Result<()> {
    let mut arms: Vec<Arm> = Vec::new();
    let baseline_object = opts.read_baseline_object()?;
    let mut plan = vec![(Kind::Floor, 0usize)];
    for &size in sizes {
        if baseline_object.is_some() {
            plan.push((Kind::Baseline, size));
        }
        for kind in [
            Kind::Enforcer,
            Kind::NftLinear,
            Kind::NftHash,
            Kind::NftInterval,
        ] {
            plan.push((kind, size));
        }
    }
    let mut ip = vec!["link set lo up".to_string()];
    for (i, _) in plan.iter().enumerate() {
        ip.push(format!(
            "link add gen{i} address {} type veth peer name rx{i} address {}",
            mac_text(mac(1, i)),
            mac_text(mac(2, i))
        ));
        ip.push(format!("link set gen{i} up"));
        ip.push(format!("link set rx{i} up"));
    }
    ip.push("link add park type veth peer name parkp".to_string());
    ip.push("link set park up".to_string());
    ip.push("link set parkp up".to_string());
    netns.ip_batch(&ip)?;
    // The generator and the floors: a second copy of the eBPF object with its own maps.
    let mut generator = EbpfLoader::new()
        .map_max_entries(bench::FLOWS, FLOWS as u32)
        .load(enforcer::loader::ebpf_object())
        .context("loading the benchmark programs")?;
    for name in [bench::TX, bench::PARSE_DROP, bench::PASS_COUNT] {
        crate::common::load_xdp(&mut generator, name)?;
    }

    let policies: Vec<BenchPolicy> = sizes
        .iter()
        .map(|&size| policy::generate(size, false, 0, false))
        .collect();
    for (i, &(kind, size)) in plan.iter().enumerate() {
        let rx = format!("rx{i}");
        let table = format!("t{i}");
        let p = policies.iter().find(|p| p.size == size);
        let mut enforcer = None;
        match kind {
            Kind::Enforcer | Kind::Baseline => {
                let p = p.context("policy")?;
                let artifact = p.compile()?;
                let mut e = match (&baseline_object, kind) {
                    (Some(object), Kind::Baseline) => {
                        Enforcer::load_object(&artifact, EventOptions::default(), object)
                            .context("loading the baseline object")?
                    }
                    _ => Enforcer::load(&artifact)?,
                };
                netns.run(|| e.attach(&rx))??;
                crate::common::enable_flow_filter(&mut e)?;
                enforcer = Some(e);
            }
            Kind::Floor => attach(&mut generator, bench::PARSE_DROP, netns, &rx)?,
            _ => {
                attach(&mut generator, bench::PASS_COUNT, netns, &rx)?;
                let p = p.context("policy")?;
                let file = dir.join(format!("{table}.nft"));
                std::fs::write(&file, nft_ruleset(p, kind, &table, &rx))?;
                let started = Instant::now();
                let status = Command::new("ip")
                    .args(["netns", "exec", &netns.name, "nft", "-f"])
                    .arg(&file)
                    .status()?;
                if !status.success() {
                    bail!("nft -f {} failed", file.display());
                }
                eprintln!(
                    "e2e: {} for {size} rules loaded in {:.1} s",
                    kind.label(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let gen_ifindex = netns.run(|| {
            let name = std::ffi::CString::new(format!("gen{i}")).unwrap();
            // SAFETY: valid NUL-terminated name.
            unsafe { libc::if_nametoindex(name.as_ptr()) }
        })?;
        arms.push(Arm {
            kind,
            size,
            gen_ifindex,
            rx,
            enforcer,
            samples: Vec::new(),
        });
    }
    // Keep the generator in the XDP dispatcher between runs (see `Parking`).
    attach(&mut generator, bench::TX, netns, "park")?;
    // NAPI in a kernel thread (veth has NAPI once XDP is attached), which can then run on
    // the other CPU.
    let threaded = (0..plan.len())
        .map(|i| format!("echo 1 > /sys/class/net/rx{i}/threaded"))
        .collect::<Vec<_>>()
        .join("; ");
    let threaded_ok = Command::new("ip")
        .args(["netns", "exec", &netns.name, "sh", "-c", &threaded])
        .status()
        .is_ok_and(|s| s.success());
    let pinned = pin_napi_threads();
    eprintln!("e2e: threaded NAPI {threaded_ok}, {pinned} NAPI threads pinned");
    // Each size has its own flows: the table is rewritten before each sample.
    let flow_sets: Vec<Vec<BenchFlow>> = policies.iter().map(flows).collect();

    for run in 0..opts.runs {
        for k in 0..arms.len() {
            let a = (k + run) % arms.len();
            let flows = match arms[a].kind {
                Kind::Floor => &flow_sets[flow_sets.len() - 1],
                _ => &flow_sets[sizes.iter().position(|&s| s == arms[a].size).unwrap()],
            };
            write_flows(&mut generator, flows, FLOWS)?;
            let tx: &Xdp = crate::common::xdp(&generator, bench::TX)?;
            let arm = &arms[a];
            let count = |arm: &Arm, generator: &aya::Ebpf| -> Result<u64> {
                match arm.kind {
                    Kind::Enforcer | Kind::Baseline => Ok(arm
                        .enforcer
                        .as_ref()
                        .context("enforcer")?
                        .counter(direction::INGRESS, counter::DROP_POLICY_DENIED)?),
                    // Floor and nftables arms: the generator copy's counter.
                    _ => per_cpu_sum(generator, bench::RX, 0),
                }
            };
            // The frames left in the previous arm's veth ring (up to 256) are processed after
            // its sample by its NAPI thread on the receive CPU; one NAPI poll of nftables' linear
            // rules at 100k rules holds that CPU for hundreds of milliseconds. Kernel work left
            // from earlier namespaces (their teardown) can hold it too.
            wait_until_idle(other_cpu())?;
            let before = count(arm, &generator)?;
            let data = frame(mac(1, a), mac(2, a));
            let ctx = xdp_md(arm.gen_ifindex);
            let started = Instant::now();
            inject(tx, netns, &data, &ctx, packets)?;
            let took = started.elapsed();
            let after = count(arm, &generator)?;
            let mpps = (after - before) as f64 / took.as_secs_f64() / 1e6;
            if arm.kind == Kind::Floor && after - before < u64::from(packets / 100) {
                bail!(
                    "the parse-and-drop floor processed {} of {packets} frames: its receive \
                     CPU did not run it, and every ratio to it would be meaningless",
                    after - before
                );
            }
            if std::env::var_os("BENCH_DEBUG").is_some() {
                eprintln!(
                    "e2e sample: {} {} got {} in {:?}",
                    arm.kind.label(),
                    arm.size,
                    after - before,
                    took
                );
                let _ = Command::new("ip")
                    .args(["-n", &netns.name, "-s", "link", "show", &format!("gen{a}")])
                    .status();
                let _ = Command::new("ip")
                    .args(["-n", &netns.name, "-s", "link", "show", &arm.rx])
                    .status();
            }
            arms[a].samples.push(mpps);
        }
    }

    // Report.
    let floor = arms
        .iter()
        .find(|a| a.kind == Kind::Floor)
        .context("floor")?;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Method: one network namespace with a veth pair per arm. The generator is the \
         benchmark-only XDP program `bench_tx` (enforcer-ebpf/src/bench.rs), run with \
         `BPF_PROG_TEST_RUN` and `BPF_F_TEST_XDP_LIVE_FRAMES` (aya `TestRunAttrs::xdp_live_frames(64)`) \
         on the generator end of the pair: for each frame it writes the next of {FLOWS} flows (source, \
         destination, UDP port 9; IPv4 hosts of two different segments of the policy) into a \
         60-byte frame (64 on the wire) and returns `XDP_TX`, which the kernel turns into a \
         transmit on that veth, so the frame arrives at the other end. {packets} frames per \
         sample; the sample is the packets the arm processed (its own counter: the enforcer's \
         `policy_denied`; the floor's `BENCH_RX`; for nftables the same counter, bumped by \
         `bench_pass_count` in front of it — the netdev ingress hook runs in the same NAPI poll, \
         with no queue in between, and `nft list counter` reads every rule of the namespace \
         first, a minute at 100k rules) divided by the wall time of the injection. Before each sample the runner waits until the \
         receive CPU has been at least 90% idle for 100 ms (`/proc/stat`), so that one arm's \
         backlog is not processed in the next arm's sample: the frames left in an arm's veth \
         ring are processed after its sample, and one NAPI poll of nftables' linear rules at \
         100k rules holds the CPU for hundreds of milliseconds. No rule allows port 9: every arm drops every frame. Arms: \
         the enforcer (native XDP, `Enforcer::attach`, its connection table's filter enabled); the floor `bench_parse_drop` (the \
         enforcer's parser, a counter, `XDP_DROP`); and `bench_pass_count` (a counter, \
         `XDP_PASS`) in front of nftables on the netdev ingress hook of the same device — the earliest nftables hook, \
         before the IP stack — holding the same policy as (i) linear rules, one per policy rule \
         (`ip saddr H ip daddr @members udp dport P accept`), (ii) verdict maps (hash): \
         destination → segment chain → `ip saddr . meta l4proto . th dport` map, (iii) the same \
         with `flags interval` (rbtree and pipapo){}. Receive NAPI is threaded ({}) and its \
         threads pinned to CPU {} ({pinned} threads); the generator runs on CPU {}. {} runs, arms \
         rotated. The generator itself costs CPU time and transmit drops when the receiver is \
         slower; the figures are receive rates.\n",
        match &opts.baseline_object {
            Some(file) => format!(
                "; with `--baseline-object`, the enforcer again with the kernel programs of `{}`",
                file.display()
            ),
            None => String::new(),
        },
        if threaded_ok {
            "on"
        } else {
            "could not be switched on"
        },
        other_cpu(),
        bench_cpu(),
        opts.runs
    );
    let _ = writeln!(
        text,
        "| arm | rules | Mpps (median) | ratio to floor |\n|---|---|---|---|"
    );
    for arm in &arms {
        let _ = writeln!(
            text,
            "| {} | {} | {:.3} | {:.2} |",
            arm.kind.label(),
            if arm.kind == Kind::Floor {
                "—".to_string()
            } else {
                arm.size.to_string()
            },
            median(&arm.samples),
            paired_ratio(&arm.samples, &floor.samples)
        );
    }
    for &size in sizes {
        let find = |kind| arms.iter().find(|a| a.kind == kind && a.size == size);
        let Some(enf) = find(Kind::Enforcer) else {
            continue;
        };
        let vs_floor = paired_ratio(&enf.samples, &floor.samples);
        report.figures.push(
            Figure::new(
                format!("e2e_enforcer_{size}_mpps"),
                median(&enf.samples),
                "Mpps",
            )
            .vs("parse-and-drop XDP floor", vs_floor)
            .target("≥ 0.8 × the floor's rate", vs_floor >= 0.8),
        );
        if let Some(base) = find(Kind::Baseline) {
            report.figures.push(
                Figure::new(
                    format!("e2e_baseline_{size}_mpps"),
                    median(&base.samples),
                    "Mpps",
                )
                .vs(
                    format!("ratio: enforcer / the baseline object's programs at {size} rules"),
                    paired_ratio(&enf.samples, &base.samples),
                ),
            );
        }
        for kind in [Kind::NftLinear, Kind::NftHash, Kind::NftInterval] {
            let Some(nft) = find(kind) else { continue };
            let ratio = paired_ratio(&enf.samples, &nft.samples);
            let tag = match kind {
                Kind::NftLinear => "linear",
                Kind::NftHash => "hash",
                _ => "interval",
            };
            let mut figure = Figure::new(
                format!("e2e_nft_{tag}_{size}_mpps"),
                median(&nft.samples),
                "Mpps",
            )
            .vs(
                format!("ratio: enforcer / {} at {size} rules", kind.label()),
                ratio,
            );
            if kind == Kind::NftInterval && size == 100_000 {
                figure = figure.target("enforcer ≥ 3 × nftables interval set", ratio >= 3.0);
            }
            report.figures.push(figure);
        }
    }
    report.sections.push(Section {
        title: "2. End to end on veth (live frames)".to_string(),
        text,
    });
    drop(arms);
    Ok(())
}

fn attach(ebpf: &mut aya::Ebpf, name: &str, netns: &Netns, iface: &str) -> Result<()> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    netns
        .run(|| program.attach(iface, XdpMode::Driver))?
        .with_context(|| format!("attaching {name} to {iface}"))?;
    Ok(())
}

/// Sends `packets` frames from the generator `tx` out of the interface `ctx` names (live
/// frames: each `XDP_TX` is a real transmit on the veth).
pub fn inject(tx: &Xdp, netns: &Netns, data: &[u8], ctx: &[u8], packets: u32) -> Result<()> {
    netns.run(|| {
        tx.test_run(TestRunOptions {
            data_in: Some(data),
            ctx_in: Some(ctx),
            repeat: packets,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..TestRunOptions::default()
        })
    })??;
    Ok(())
}

/// Fills the generator's table of `capacity` flows, repeating `flows` as needed.
pub fn write_flows(ebpf: &mut aya::Ebpf, flows: &[BenchFlow], capacity: usize) -> Result<()> {
    let mut table: Array<_, BenchFlow> =
        Array::try_from(ebpf.map_mut(bench::FLOWS).context("flows map")?)?;
    for i in 0..capacity {
        table.set(i as u32, flows[i % flows.len()], 0)?;
    }
    Ok(())
}
