//! 3. Reload: validate + compile + atomic swap (`Enforcer::replace_policy`) of a large policy
//!    while another CPU judges packets with the real program, counting packets whose verdict
//!    matches neither the old nor the new policy.
use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::programs::Xdp;
use enforcer::{
    Enforcer,
    events::{EventNamer, PolicyNames},
};
use enforcer_common::program_names;
use policy_compiler::ReadCache;
use vm_tests::{
    harness::{XDP_DROP, XDP_PASS},
    packet_builder::{self, PacketSpec, TCP_RST, Transport},
};

use crate::{
    Options,
    common::{Parking, median, other_cpu, pin_to, run_once},
    policy::{self, BenchPolicy},
    report::{Figure, Report, Section},
};

/// A private bpffs, for a second handle on the program (the judging thread's).
struct PrivateBpffs(PathBuf);

impl PrivateBpffs {
    fn mount() -> Result<Self> {
        let dir = std::env::temp_dir().join(crate::common::own_name("bpffs"));
        std::fs::create_dir_all(&dir)?;
        let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("mounting a bpffs");
        }
        Ok(PrivateBpffs(dir))
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if let Ok(target) = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()) {
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Frames whose verdict is the same under both policies: TCP RST (judged every time, never
/// creates connection state) on a rule's port (allowed by both) or on port 9 (denied by both).
pub fn stable_corpus(p: &BenchPolicy, frames: usize) -> Vec<(Vec<u8>, u32)> {
    let tcp_rules: Vec<_> = p.rules.iter().filter(|r| r.tcp).collect();
    (0..frames)
        .map(|i| {
            let rule = tcp_rules[(i.wrapping_mul(40_503)) % tcp_rules.len()];
            let (port, want) = if i % 2 == 0 {
                (rule.port, XDP_PASS)
            } else {
                (9, XDP_DROP)
            };
            let spec = PacketSpec::new(
                p.hosts[rule.from],
                p.hosts[rule.to],
                Transport::tcp(40_000, port, TCP_RST),
            );
            (packet_builder::build(&spec).0, want)
        })
        .collect()
}

pub fn run(opts: &Options, report: &mut Report) -> Result<()> {
    let sizes: &[usize] = if opts.quick {
        &[100_000]
    } else {
        &[100_000, 1_000_000]
    };
    let reloads = if opts.quick { 2 } else { opts.runs };
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Method: policy A (N prefixes, N rules, as in section 1) is loaded with `Enforcer::load`; \
         policy B is A plus one segment that sorts first, so every segment and class id differs. \
         A thread pinned to CPU {} runs the enforcer's XDP program with `BPF_PROG_TEST_RUN` in a \
         loop (one packet per call) over 256 frames whose verdict is the same under A and B (TCP \
         RST, so no connection state: allowed ones on a rule's port, denied ones on port 9); a \
         packet judged by a mixture of the two would find no rule. The main thread reloads \
         {reloads} times, alternating B and A: time to live = `Policy::from_sources_cached` \
         (validate, through a read cache as the daemon's: A's files were read at the first load, \
         so a reload parses only the files not cached as they are, B's extra segment file or \
         none; every other file is taken from the cache) + `policy_compiler::compile` + the \
         names of the new generation for the event namer (`PolicyNames::of`) + \
         `Enforcer::replace_policy` (write the inactive slot, switch), as the daemon does; then, \
         outside the timing, the validated policy is dropped and `clear_inactive_slot` called, \
         as the daemon does after the switch. The read cache's size is what the daemon keeps \
         for it.\n",
        other_cpu()
    );
    let _ = writeln!(
        text,
        "| rules | validate+compile ms | write+switch ms | time to live ms | packets judged | mixed verdicts | read cache MiB |\n|---|---|---|---|---|---|---|"
    );
    for &size in sizes {
        let a = policy::generate(size, true, 0, false);
        let b = policy::generate(size, true, 0, true);
        let mut cache = ReadCache::new();
        let (_, first) = a.compile_cached(&mut cache)?;
        let mut enforcer = Enforcer::load(&first)?;
        let mut namer = EventNamer::new();
        namer.add_policy(Arc::new(PolicyNames::of(enforcer.generation(), &first)));
        let mut parking = Parking::new("reload")?;
        parking.park(enforcer.ebpf_mut(), program_names::XDP_INGRESS)?;
        let bpffs = PrivateBpffs::mount()?;
        let pin = bpffs.0.join("enforcer_xdp");
        enforcer.pin_xdp_program(&pin)?;
        let judge = Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface)?;
        let corpus = stable_corpus(&a, 256);
        for (frame, want) in &corpus {
            anyhow::ensure!(run_once(&judge, frame)? == *want, "corpus verdict");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let judging = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || -> Result<(u64, u64)> {
                pin_to(other_cpu())?;
                let (mut judged, mut wrong) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    for (frame, want) in &corpus {
                        if run_once(&judge, frame)? != *want {
                            wrong += 1;
                        }
                        judged += 1;
                    }
                }
                Ok((judged, wrong))
            })
        };
        let (mut compile_ms, mut swap_ms, mut live_ms) = (Vec::new(), Vec::new(), Vec::new());
        let result = (|| -> Result<()> {
            for k in 0..reloads {
                let next = if k % 2 == 0 { &b } else { &a };
                let started = Instant::now();
                let (policy, artifact) = next.compile_cached(&mut cache)?;
                let compiled = started.elapsed();
                // As the daemon: events of the new generation must find its names.
                let names = PolicyNames::of(enforcer.generation() + 1, &artifact);
                namer.add_policy(Arc::new(names));
                let swap = enforcer.replace_policy(&artifact)?;
                let live = started.elapsed();
                drop(policy);
                compile_ms.push(compiled.as_secs_f64() * 1e3);
                swap_ms.push(swap.as_secs_f64() * 1e3);
                live_ms.push(live.as_secs_f64() * 1e3);
                // As the daemon does a moment after the switch (it waits a second; a shorter
                // pause keeps the run short, and the clearing itself first waits for packets
                // still being judged by the old slot).
                thread::sleep(Duration::from_millis(200));
                enforcer.clear_inactive_slot()?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let (judged, wrong) = judging
            .join()
            .map_err(|_| anyhow::anyhow!("judging thread panicked"))??;
        result?;
        let live = median(&live_ms);
        let _ = writeln!(
            text,
            "| {size} | {:.0} | {:.0} | {live:.0} | {judged} | {wrong} | {:.1} |",
            median(&compile_ms),
            median(&swap_ms),
            cache.bytes() as f64 / (1024.0 * 1024.0),
        );
        eprintln!("reload {size}: live after {live:.0} ms, {wrong} of {judged} mixed");
        let mut figure = Figure::new(format!("reload_{size}_time_to_live"), live, "ms");
        if size == 100_000 {
            figure = figure
                .vs("target 300 ms", live / 300.0)
                .target("< 300 ms, 0 mixed verdicts", live < 300.0 && wrong == 0);
        }
        report.figures.push(figure);
        report.figures.push(
            Figure::new(
                format!("reload_{size}_mixed_verdicts"),
                wrong as f64,
                "packets",
            )
            .vs(format!("{judged} packets judged during the reloads"), 0.0)
            .target("0", wrong == 0),
        );
        drop(enforcer);
        drop(bpffs);
    }
    report.sections.push(Section {
        title: "3. Reload under traffic".to_string(),
        text,
    });
    Ok(())
}
