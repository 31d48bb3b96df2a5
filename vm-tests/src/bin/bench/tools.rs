//! 5. Compiler and daemon: `policy-compiler compile` time and peak memory (a child process,
//!    its own rusage from `wait4`), the daemon's resident memory with a 100k-rule policy, and
//!    the `/metrics` encoding time with every segment pair populated.
use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use enforcer::metrics::{MetricsSnapshot, VerdictLabels};

use crate::{
    Options,
    common::{Netns, median},
    policy,
    report::{Figure, Report, Section},
};

fn sibling_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join(name);
    if !bin.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p {}` (cargo xtask bench does)",
            bin.display(),
            if name == "enforcer" {
                "enforcer"
            } else {
                "policy-compiler"
            }
        );
    }
    Ok(bin)
}

/// First argument of the helper mode of this binary: run the rest of the command line as a
/// child and print its wall time (ns) and peak RSS (KiB).
///
/// A child's `ru_maxrss` includes the high-water mark of the memory it had before `exec`, i.e.
/// of the process that spawned it: spawned from this (large) process it would report our size.
/// Spawned from a fresh, small copy of this binary it reports its own.
pub const MEASURE_CHILD: &str = "--measure-child";

pub fn measure_child() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let (program, rest) = args.split_first().context("no command")?;
    let (took, maxrss) = run_measured(Command::new(program).args(rest))?;
    println!("{} {maxrss}", took.as_nanos());
    Ok(())
}

/// `cmd` measured by a fresh copy of this binary (see [`MEASURE_CHILD`]).
fn measured(program: &Path, args: &[&std::ffi::OsStr]) -> Result<(Duration, i64)> {
    let out = Command::new(std::env::current_exe()?)
        .arg(MEASURE_CHILD)
        .arg(program)
        .args(args)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("{} failed", program.display());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    let (Some(ns), Some(kib)) = (words.next(), words.next()) else {
        bail!("unexpected measurement {text:?}");
    };
    Ok((Duration::from_nanos(ns.parse()?), kib.parse()?))
}

/// Runs `cmd` to completion; its wall time and peak resident memory (KiB).
fn run_measured(cmd: &mut Command) -> Result<(Duration, i64)> {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let mut status = 0;
    // SAFETY: rusage is plain data written by the kernel; the pid is our child.
    let mut usage = unsafe { std::mem::zeroed::<libc::rusage>() };
    // SAFETY: as above; wait4 reaps exactly this child and reports its own usage.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let took = started.elapsed();
    if pid < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed (status {status})");
    }
    Ok((took, usage.ru_maxrss))
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Starts the daemon on a veth in a private namespace, waits for `enforcer ready`, and returns
/// its (VmRSS, VmHWM) in KiB.
fn daemon_memory(enforcer: &Path, policy_dir: &Path) -> Result<(u64, u64)> {
    let netns = Netns::create("daemon")?;
    netns.ip_batch(&[
        "link add eth0 type veth peer name peer0".to_string(),
        "link set eth0 up".to_string(),
        "link set peer0 up".to_string(),
    ])?;
    let mut command = Command::new("ip");
    vm_tests::lab::dies_with_this_process(&mut command);
    let mut child = command
        .args(["netns", "exec", &netns.name])
        .arg(enforcer)
        .args(["run", "--policy"])
        .arg(policy_dir)
        .args(["--iface", "eth0"])
        // Its own files, not the default /run/enforcer and /var/lib/enforcer of this machine.
        .arg("--control-socket")
        .arg(std::env::temp_dir().join(format!("{}.sock", netns.name)))
        .arg("--state-file")
        .arg(std::env::temp_dir().join(format!("{}.state.json", netns.name)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the daemon")?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("enforcer ready") {
                let _ = tx.send(());
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(300)).is_ok();
    // Settle: the first metrics and event reads have happened.
    std::thread::sleep(Duration::from_secs(2));
    let memory = (
        status_kib(child.id(), "VmRSS:"),
        status_kib(child.id(), "VmHWM:"),
    );
    // SAFETY: plain kill(2) of our own child (`ip netns exec` execs the daemon: same pid).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    if !ready {
        bail!("the daemon did not report ready");
    }
    match memory {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        _ => bail!("no memory figures for the daemon"),
    }
}

fn metrics_snapshot(segments: usize) -> MetricsSnapshot {
    let names: Vec<String> = (0..segments).map(policy::segment_name).collect();
    let mut snapshot = MetricsSnapshot {
        revision: "0123456789abcdef".to_string(),
        rules: 100_000,
        ..MetricsSnapshot::default()
    };
    for src in &names {
        for dst in &names {
            for (action, match_) in [("forwarded", "rule"), ("dropped", "none")] {
                snapshot.policy_verdicts.push((
                    VerdictLabels {
                        source_segment: src.clone(),
                        destination_segment: dst.clone(),
                        direction: "ingress".to_string(),
                        action: action.to_string(),
                        match_: match_.to_string(),
                    },
                    12_345,
                ));
            }
        }
    }
    snapshot
}

pub fn run(opts: &Options, report: &mut Report) -> Result<()> {
    let compiler = match &opts.compiler_bin {
        Some(bin) => bin.clone(),
        None => sibling_bin("policy-compiler")?,
    };
    let enforcer = match &opts.enforcer_bin {
        Some(bin) => bin.clone(),
        None => sibling_bin("enforcer")?,
    };
    let sizes: &[usize] = if opts.quick {
        &[1_000, 100_000]
    } else {
        &[1_000, 100_000, 1_000_000]
    };
    let dir = std::env::temp_dir().join(crate::common::own_name("policies"));
    let result = measure(opts, report, &compiler, &enforcer, sizes, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(
    opts: &Options,
    report: &mut Report,
    compiler: &Path,
    enforcer: &Path,
    sizes: &[usize],
    dir: &Path,
) -> Result<()> {
    let mut dirs = Vec::new();
    for &size in sizes {
        let d = dir.join(format!("p{size}"));
        policy::generate(size, true, 0, false).write_dir(&d)?;
        dirs.push(d);
    }
    let compile_runs = if opts.quick { 3 } else { opts.runs };
    let mut times = vec![Vec::new(); sizes.len()];
    let mut peaks = vec![Vec::new(); sizes.len()];
    for run in 0..compile_runs {
        for k in 0..sizes.len() {
            let i = (k + run) % sizes.len();
            let out = dir.join(format!("p{}.json", sizes[i]));
            let (took, maxrss) = measured(
                compiler,
                &[
                    "compile".as_ref(),
                    dirs[i].as_os_str(),
                    "-o".as_ref(),
                    out.as_os_str(),
                ],
            )?;
            times[i].push(took.as_secs_f64() * 1e3);
            peaks[i].push(maxrss as f64 / 1024.0);
        }
    }
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Method: the policies of sections 1–3 written as YAML directories; `policy-compiler \
         compile DIR -o FILE` (release build) run as a child process {compile_runs} times per \
         size, sizes rotated; wall time and the child's peak RSS (`wait4` rusage of that one child, \
         i.e. `getrusage(RUSAGE_CHILDREN)` maxrss, taken by a fresh small copy of the runner that \
         spawns it: a child's maxrss includes the memory of whoever forked it). The daemon (`enforcer run`, \
         release build) is started with the 100k policy on a veth in a private namespace; \
         VmRSS is read from /proc 2 s after `enforcer ready` (VmHWM, the peak, includes \
         compiling the policy), in each of several starts: the figure is the median, and the \
         largest is judged as well, since how a start leaves the heap varies. `/metrics`: `MetricsSnapshot::render` of a snapshot with every \
         (source, destination) pair of S segments populated, forwarded and dropped (2·S² \
         series), {} runs.\n",
        opts.runs
    );
    let _ = writeln!(text, "| rules | compile ms | peak RSS MiB |\n|---|---|---|");
    for (i, &size) in sizes.iter().enumerate() {
        let (t, m) = (median(&times[i]), median(&peaks[i]));
        let _ = writeln!(text, "| {size} | {t:.0} | {m:.0} |");
        report
            .figures
            .push(Figure::new(format!("compile_{size}_time"), t, "ms"));
        report
            .figures
            .push(Figure::new(format!("compile_{size}_peak_rss"), m, "MiB"));
    }

    // Enough runs to see a start that leaves the heap fragmented: the largest is judged too.
    let daemon_runs = if opts.quick { 2 } else { 10 };
    let mut rss = Vec::new();
    let mut hwm = Vec::new();
    let p100k = dirs[sizes.iter().position(|&s| s == 100_000).context("100k")?].clone();
    for _ in 0..daemon_runs {
        let (r, h) = daemon_memory(enforcer, &p100k)?;
        rss.push(r as f64 / 1024.0);
        hwm.push(h as f64 / 1024.0);
    }
    let largest = rss.iter().copied().fold(0.0, f64::max);
    let (rss, hwm) = (median(&rss), median(&hwm));
    let _ = writeln!(
        text,
        "\nDaemon with the 100k policy ({daemon_runs} runs): VmRSS {rss:.1} MiB (largest \
         {largest:.1}), VmHWM {hwm:.1} MiB.\n"
    );
    let under_target = |mib: f64| mib * 1_048_576.0 < 40e6;
    report.figures.push(
        Figure::new("daemon_100k_rss", rss, "MiB")
            .vs(
                "target 40 MB (ratio: RSS / 40 MB)",
                rss * 1_048_576.0 / 40e6,
            )
            .target("< 40 MB", under_target(rss)),
    );
    report.figures.push(
        Figure::new("daemon_100k_rss_largest", largest, "MiB")
            .vs(
                format!("target 40 MB, largest of {daemon_runs} starts (ratio: RSS / 40 MB)"),
                largest * 1_048_576.0 / 40e6,
            )
            .target("< 40 MB in every start", under_target(largest)),
    );
    report
        .figures
        .push(Figure::new("daemon_100k_peak_rss", hwm, "MiB"));

    let _ = writeln!(
        text,
        "| segments | series | render ms | bytes |\n|---|---|---|---|"
    );
    let segment_counts: &[usize] = if opts.quick { &[100] } else { &[100, 1000] };
    for &segments in segment_counts {
        let snapshot = metrics_snapshot(segments);
        let mut ms = Vec::new();
        let mut bytes = 0;
        for _ in 0..opts.runs {
            let started = Instant::now();
            let text = snapshot.render();
            ms.push(started.elapsed().as_secs_f64() * 1e3);
            bytes = text.len();
        }
        let m = median(&ms);
        let _ = writeln!(
            text,
            "| {segments} | {} | {m:.1} | {bytes} |",
            2 * segments * segments
        );
        report.figures.push(Figure::new(
            format!("metrics_render_{segments}_segments"),
            m,
            "ms",
        ));
    }
    program_load(opts, report, &mut text)?;
    report.sections.push(Section {
        title: "5. Compiler, daemon, /metrics".to_string(),
        text,
    });
    Ok(())
}

/// What loading the kernel programs costs: the instructions the verifier processes for each
/// (its limit is 1,000,000; `vm-tests/tests/verifier_budget.rs` holds them to a third of it)
/// and the time `Enforcer::load` takes, with the example policy.
fn program_load(opts: &Options, report: &mut Report, text: &mut String) -> Result<()> {
    const VERIFIER_LIMIT: f64 = 1_000_000.0;
    let dir = vm_tests::lab::example_policy_dir();
    let policy = policy_compiler::Policy::load_dir(&dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let artifact = policy_compiler::compile(&policy)?;
    let runs = if opts.quick { 3 } else { opts.runs };
    let mut load_ms = Vec::new();
    let mut processed = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let enforcer = enforcer::Enforcer::load(&artifact)?;
        load_ms.push(started.elapsed().as_secs_f64() * 1e3);
        processed.clear();
        for name in [
            enforcer_common::program_names::XDP_INGRESS,
            enforcer_common::program_names::TC_EGRESS,
        ] {
            let program = enforcer.ebpf().program(name).context(name)?;
            let count = program
                .info()?
                .verified_instruction_count()
                .context("the kernel reports no verified instruction count")?;
            processed.push((name, f64::from(count)));
        }
    }
    let load = median(&load_ms);
    let _ = writeln!(
        text,
        "\nLoading the kernel programs with the example policy (`Enforcer::load`, {runs} \
         runs): {load:.0} ms; instructions the verifier processed: {}.\n",
        processed
            .iter()
            .map(|(name, count)| format!("{name} {count:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    report
        .figures
        .push(Figure::new("program_load_time", load, "ms"));
    for (name, count) in processed {
        report.figures.push(
            Figure::new(
                format!("verifier_{name}_instructions"),
                count,
                "instructions",
            )
            .vs("the verifier's limit of 1,000,000", count / VERIFIER_LIMIT),
        );
    }
    Ok(())
}
