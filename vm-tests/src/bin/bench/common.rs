//! Measurement plumbing shared by the benchmarks: CPU pinning, medians, `BPF_PROG_TEST_RUN`
//! helpers, a private network namespace.
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};

/// Sets up and enables the filter in front of the connection table, as the daemon does once
/// its programs are attached. `false` for kernel programs without one (a `--baseline-object`
/// from before it). The filter stays enabled when its handle is dropped; no rebuild follows,
/// which costs nothing here: these benchmarks end no flows.
pub fn enable_flow_filter(enforcer: &mut enforcer::Enforcer) -> Result<bool> {
    match enforcer.take_flow_filter() {
        Ok(mut filter) => {
            filter.rebuild().context("enabling the flow filter")?;
            Ok(true)
        }
        Err(enforcer::flow_filter::FlowFilterError::MissingMap(_)) => Ok(false),
        Err(error) => Err(error).context("setting up the flow filter"),
    }
}

/// Pins the calling thread to `cpu`: `BPF_PROG_TEST_RUN` runs the program on the caller's CPU.
pub fn pin_to(cpu: usize) -> Result<()> {
    vm_tests::harness::pin(0, cpu)
}

pub fn pin_pid(pid: i32, cpu: usize) -> Result<()> {
    vm_tests::harness::pin(pid, cpu)
}

/// CPUs online (not `available_parallelism`, which shrinks to 1 once this thread is pinned).
pub fn cpu_count() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// The CPU benchmarks run on: the last one (CPU 0 takes most interrupts), and the "other" CPU
/// for concurrent work.
pub fn bench_cpu() -> usize {
    cpu_count().saturating_sub(1)
}

pub fn other_cpu() -> usize {
    0
}

/// Waits until `cpu` has been at least 90% idle over 100 ms (`/proc/stat`, in clock ticks of
/// 10 ms); fails after a minute.
pub fn wait_until_idle(cpu: usize) -> Result<()> {
    const WINDOW: std::time::Duration = std::time::Duration::from_millis(100);
    let started = std::time::Instant::now();
    let mut last = cpu_times(cpu)?;
    loop {
        std::thread::sleep(WINDOW);
        let now = cpu_times(cpu)?;
        let (busy, idle) = (now.0 - last.0, now.1 - last.1);
        if busy + idle > 0 && idle * 10 >= (busy + idle) * 9 {
            return Ok(());
        }
        if started.elapsed().as_secs() >= 60 {
            bail!("CPU {cpu} stayed busy for a minute: the benchmark needs it idle");
        }
        last = now;
    }
}

/// (busy, idle) clock ticks of `cpu` since boot.
fn cpu_times(cpu: usize) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let prefix = format!("cpu{cpu} ");
    let line = stat
        .lines()
        .find(|line| line.starts_with(&prefix))
        .with_context(|| format!("no {prefix}line in /proc/stat"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal (guest time is within user).
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    let busy = ticks.iter().take(8).sum::<u64>() - idle;
    Ok((busy, idle))
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// Per-run ratios of two arms measured side by side, then their median.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    median(&ratios)
}

pub fn paired_diff(a: &[f64], b: &[f64]) -> f64 {
    let diffs: Vec<f64> = a.iter().zip(b).map(|(a, b)| a - b).collect();
    median(&diffs)
}

/// Mean ns per run of `program` over `frames`, each run `repeat` times by the kernel (the
/// kernel reports the mean per repetition, in whole ns, for each frame).
pub fn ns_per_packet(program: &Xdp, frames: &[Vec<u8>], repeat: u32) -> Result<f64> {
    let mut total = 0u128;
    for frame in frames {
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })?;
        total += result.duration.as_nanos();
    }
    Ok(total as f64 / frames.len() as f64)
}

pub fn run_once(program: &Xdp, frame: &[u8]) -> Result<u32> {
    Ok(program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::default()
        })?
        .return_value)
}

pub fn xdp<'a>(ebpf: &'a aya::Ebpf, name: &str) -> Result<&'a Xdp> {
    let program = ebpf
        .program(name)
        .with_context(|| format!("no program {name}"))?;
    Ok(program.try_into()?)
}

pub fn load_xdp(ebpf: &mut aya::Ebpf, name: &str) -> Result<()> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    program.load().with_context(|| format!("loading {name}"))?;
    Ok(())
}

pub fn per_cpu_sum(ebpf: &aya::Ebpf, map: &str, index: u32) -> Result<u64> {
    let array: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(ebpf.map(map).with_context(|| format!("no map {map}"))?)?;
    Ok(array.get(&index, 0)?.iter().sum())
}

/// What the benchmark names its namespaces, temporary directories and mounts with: the prefix,
/// then the process id (see [`vm_tests::lab::of_dead_process`]).
pub const PREFIX: &str = "enfbench-";

/// A name for something this process creates: `enfbench-<pid>x<tag>`.
pub fn own_name(tag: &str) -> String {
    format!("{PREFIX}{}x{tag}", std::process::id())
}

/// Removes what an interrupted or killed benchmark left behind: its namespaces (with the veths
/// and attached programs in them), and its temporary directories and private bpffs mounts.
pub fn remove_leftovers() {
    vm_tests::lab::remove_stale_netns(PREFIX);
    let temp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&temp) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !vm_tests::lab::of_dead_process(&name, PREFIX) {
            continue;
        }
        let path = entry.path();
        if let Ok(target) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path; failing (not a mount point) is harmless.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if removed.is_ok() {
            eprintln!(
                "removed {} (left by a benchmark that was killed)",
                path.display()
            );
        }
    }
}

/// A network namespace this process created; deleted (with everything in it) on drop, and by
/// the signal handler (`vm_tests::lab::cleanup_on_signals`) when the benchmark is interrupted.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(tag: &str) -> Result<Self> {
        let name = own_name(tag);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        vm_tests::lab::track_netns(&name);
        Ok(Netns { name })
    }

    /// `ip -n NS -batch -`.
    pub fn ip_batch(&self, commands: &[String]) -> Result<()> {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("running ip")?;
        child
            .stdin
            .take()
            .context("ip stdin")?
            .write_all((commands.join("\n") + "\n").as_bytes())?;
        let status = child.wait()?;
        if !status.success() {
            bail!("ip -batch failed: {commands:?}");
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        Ok(vm_tests::lab::in_netns(&self.name, f)?)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        vm_tests::lab::delete_tracked_netns(&self.name);
    }
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Keeps programs attached (native XDP) to idle veths in a private namespace, one veth each.
///
/// `BPF_PROG_TEST_RUN` on an XDP program installs it in the kernel's XDP dispatcher for the
/// call and removes it afterwards, a `synchronize_rcu()` each way (milliseconds) unless the
/// program is in the dispatcher already. An attached program is, so test runs cost what a
/// packet costs, as for an attached program. No traffic flows through these veths.
pub struct Parking {
    netns: Netns,
    next: usize,
}

impl Parking {
    pub fn new(tag: &str) -> Result<Self> {
        Ok(Parking {
            netns: Netns::create(tag)?,
            next: 0,
        })
    }

    pub fn park(&mut self, ebpf: &mut aya::Ebpf, name: &str) -> Result<()> {
        let iface = format!("park{}", self.next);
        self.next += 1;
        self.netns.ip_batch(&[
            format!("link add {iface} type veth peer name {iface}p"),
            format!("link set {iface} up"),
            format!("link set {iface}p up"),
        ])?;
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        self.netns
            .run(|| program.attach(&iface, aya::programs::XdpMode::Driver))?
            .with_context(|| format!("attaching {name} to {iface}"))?;
        Ok(())
    }
}
