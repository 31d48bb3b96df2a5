//! `cargo xtask vm-test`: the kernel-facing tests on another kernel, in QEMU.
//!
//! Fleets run older kernels than developers (Debian 12 ships 6.1), and an older verifier can
//! reject what a newer one accepts. This boots the kernel under TCG with an initramfs holding
//! the test binaries, the daemon, `ip`, `tc` and the modules the lab needs; `vm-tests`'
//! `vm-init` is PID 1, runs the tests with their output on the serial console and ends with
//! `VM-TEST RESULT: PASS` or `FAIL`, which decides the outcome here.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cargo_metadata::Message;
use clap::{Args, Parser};

use crate::{
    setup,
    util::{Workspace, display, exec, output},
};

/// The `--kernel` value that means Debian 12's cloud kernel from the apt sources.
pub(crate) const DEBIAN_6_1: &str = "debian-6.1";

/// Debian 12's meta-package; it depends on the current `linux-image-6.1.0-N-cloud-amd64`. The
/// cloud flavour boots fastest and has what we need (BTF, BPF, veth and bridge as modules).
const DEBIAN_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the tests load, by name; their dependencies are found in the `.ko` files. veth and
/// bridge build the lab, sch_ingress provides the clsact qdisc and cls_bpf the TC filter that
/// pre-6.6 kernels attach egress programs with. The kernel cannot load them on demand: there is
/// no modprobe in the VM.
const MODULES: &[&str] = &["veth", "bridge", "sch_ingress", "cls_bpf"];

/// Test binaries of `vm-tests` run in the VM, in order: the packet-level suites through
/// `BPF_PROG_TEST_RUN` first (they fail fastest when the verifier rejects a program), then the
/// namespace lab with the daemon. `e2e_stateful` needs iperf3 and minutes of TCG time; the
/// host run covers it.
const TESTS: &[&str] = &[
    // The verifier's work on this kernel, against the budget (one load).
    "verifier_budget",
    "packet_verdicts",
    "connection_tracking",
    "quarantine_verdicts",
    // Segment-pair counts in the per-CPU tables and the hash behind them, and taking them.
    "pair_verdicts",
    "breakglass",
    "differential",
    "e2e",
    // Pinning and adoption through the clsact netlink filter on kernels before 6.6.
    "e2e_persist",
];

/// About 7 minutes of tests in the VM on a 2-core machine (TCG shares its cores with whatever
/// else runs); the rest is headroom within CI's budget, against a hung VM.
const TIMEOUT_SECS: u64 = 1500;
const DIFF_PACKETS: u64 = 50_000;

#[derive(Parser)]
pub(crate) struct Options {
    /// `debian-6.1` (downloaded with apt-get and cached under the target directory), or the path
    /// of a kernel image (bzImage) to boot.
    #[arg(long, default_value = DEBIAN_6_1)]
    kernel: String,
    /// With a kernel path: its module tree (`lib/modules/VERSION`) for the modules the lab needs
    /// (veth, bridge, sch_ingress, cls_bpf); without it they must be built in.
    #[arg(long)]
    modules: Option<PathBuf>,
    #[command(flatten)]
    run: RunOptions,
}

#[derive(Args, Clone)]
pub(crate) struct RunOptions {
    /// Generated packets for the differential test inside the VM (the host run uses 1,000,000;
    /// TCG is several times slower).
    #[arg(long, default_value_t = DIFF_PACKETS)]
    diff_packets: u64,
    /// Seconds before QEMU is killed and the run fails.
    #[arg(long, default_value_t = TIMEOUT_SECS)]
    timeout: u64,
    /// Run only these test binaries (repeatable): verifier_budget, packet_verdicts,
    /// connection_tracking, quarantine_verdicts, breakglass, differential, e2e, e2e_persist.
    #[arg(long = "test", value_parser = clap::builder::PossibleValuesParser::new(TESTS))]
    tests: Vec<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            diff_packets: DIFF_PACKETS,
            timeout: TIMEOUT_SECS,
            tests: Vec::new(),
        }
    }
}

/// A kernel to boot and where its modules are.
pub(crate) struct Kernel {
    name: String,
    image: PathBuf,
    modules: Option<PathBuf>,
}

pub(crate) fn run(ws: &Workspace, opts: Options) -> Result<()> {
    let Options {
        kernel,
        modules,
        run,
    } = opts;
    setup::run(ws)?;
    let kernel = resolve_kernel(ws, &kernel, modules)?;
    run_suite(ws, &kernel, &run, &mut Vec::new())
}

/// `debian-6.1` or a path, as `--kernel` takes it.
pub(crate) fn resolve_kernel(
    ws: &Workspace,
    kernel: &str,
    modules: Option<PathBuf>,
) -> Result<Kernel> {
    if kernel == DEBIAN_6_1 {
        if modules.is_some() {
            bail!("--modules goes with a kernel path; `{DEBIAN_6_1}` brings its own modules");
        }
        return debian_kernel(ws);
    }
    let image = PathBuf::from(kernel);
    if !image.is_file() {
        bail!("--kernel {kernel}: no such file (give a bzImage path or `{DEBIAN_6_1}`)");
    }
    if let Some(dir) = &modules
        && !dir.is_dir()
    {
        bail!("--modules {}: not a directory", dir.display());
    }
    Ok(Kernel {
        name: kernel.to_owned(),
        image,
        modules,
    })
}

/// Downloads (without installing) Debian 12's cloud kernel package and unpacks it under the
/// target directory; a second call reuses it.
fn debian_kernel(ws: &Workspace) -> Result<Kernel> {
    let package = match debian_kernel_package() {
        Some(package) => package,
        None => {
            // Fresh machines have no package lists yet.
            apt_update()?;
            debian_kernel_package().with_context(|| {
                format!(
                    "cannot fetch Debian's 6.1 kernel for the VM test: `apt-cache depends \
                     {DEBIAN_META_PACKAGE}` names no linux-image-6.1 package (are Debian 12 \
                     apt sources configured?); or pass --kernel PATH"
                )
            })?
        }
    };
    let version = package
        .strip_prefix("linux-image-")
        .context("kernel package name")?
        .to_owned();
    let dir = ws.target_dir.join("vm-test").join("kernels").join(&package);
    let root = dir.join("root");
    let kernel = Kernel {
        name: format!("Debian {version}"),
        image: root.join("boot").join(format!("vmlinuz-{version}")),
        modules: Some(root.join("lib").join("modules").join(&version)),
    };
    let done = dir.join(".unpacked");
    if done.is_file() {
        return Ok(kernel);
    }
    println!("vm-test: downloading {package}");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let download = |dir: &Path| {
        exec(
            Command::new("apt-get")
                // As root, apt would warn that its `_apt` user cannot write to the target dir.
                .args(["-q", "-o", "APT::Sandbox::User=root", "download", &package])
                .current_dir(dir),
        )
    };
    if download(&dir).is_err() {
        // The lists may name a version the mirror no longer has.
        apt_update()?;
        download(&dir).with_context(|| {
            format!(
                "cannot fetch Debian's 6.1 kernel ({package}) for the VM test; check the apt \
                 sources and network, or pass --kernel PATH"
            )
        })?;
    }
    let deb = fs::read_dir(&dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
    exec(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    fs::remove_file(&deb)?;
    if !kernel.image.is_file() {
        bail!("{package} has no {}", kernel.image.display());
    }
    fs::write(&done, "")?;
    Ok(kernel)
}

/// `linux-image-6.1.0-N-cloud-amd64`, the package Debian 12's meta-package depends on.
fn debian_kernel_package() -> Option<String> {
    let deps = output(Command::new("apt-cache").args(["depends", DEBIAN_META_PACKAGE]))?;
    deps.lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .find(|dep| dep.starts_with("linux-image-6.1."))
        .map(str::to_owned)
}

fn apt_update() -> Result<()> {
    exec(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context(
        "cannot fetch Debian's 6.1 kernel for the VM test: the apt package lists could not be \
         updated (check the apt sources and network, or pass --kernel PATH)",
    )
}

/// Builds everything, boots `kernel` with it and runs the tests; the `test result:` lines the
/// test binaries printed are appended to `results`, also when the run fails. An error if any
/// test failed, the VM did not report, or the timeout struck.
pub(crate) fn run_suite(
    ws: &Workspace,
    kernel: &Kernel,
    opts: &RunOptions,
    results: &mut Vec<String>,
) -> Result<()> {
    let started = Instant::now();
    let initramfs = build_initramfs(ws, kernel, opts)?;
    println!(
        "vm-test: initramfs ready after {:.1}s, booting {} under TCG",
        started.elapsed().as_secs_f64(),
        kernel.name
    );
    let booted = Instant::now();
    let outcome = boot(
        kernel,
        &initramfs,
        Duration::from_secs(opts.timeout),
        results,
    );
    let took = booted.elapsed().as_secs_f64();
    println!("\n== vm-test on {}: test results", kernel.name);
    for line in results.iter() {
        println!("{line}");
    }
    match outcome {
        Ok(()) => {
            println!("vm-test: PASS on {} ({took:.1}s in the VM)", kernel.name);
            Ok(())
        }
        Err(error) => Err(error.context(format!("vm-test on {} failed", kernel.name))),
    }
}

/// Everything the VM runs, in a cpio archive under the target directory.
fn build_initramfs(ws: &Workspace, kernel: &Kernel, opts: &RunOptions) -> Result<PathBuf> {
    let enforcer = ws
        .build_enforcer()
        .context("failed to build the enforcer daemon")?;
    let (tests, init) = build_tests(ws)?;
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("`ip` (iproute2) not found; `cargo xtask setup` installs it")?;
    // The persistence test lists TC filters with it.
    let tc = ["/usr/sbin/tc", "/sbin/tc", "/usr/bin/tc", "/bin/tc"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("`tc` (iproute2) not found; `cargo xtask setup` installs it")?;

    let work = ws.target_dir.join("vm-test");
    let stage = work.join("initramfs");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    for dir in [
        "proc", "sys", "dev", "run", "tmp", "root", "etc", "var", "vm-test",
    ] {
        fs::create_dir_all(stage.join(dir))?;
    }
    // iproute2 keeps named namespaces in /var/run/netns, the lab looks in /run/netns.
    std::os::unix::fs::symlink("../run", stage.join("var/run"))?;

    let mut stage = Stage::new(stage);
    stage.binary(&init, Some(Path::new("/init")))?;
    stage.binary(&enforcer, None)?;
    stage.binary(&ip, Some(Path::new("/usr/sbin/ip")))?;
    stage.binary(&tc, Some(Path::new("/usr/sbin/tc")))?;
    for test in tests.values() {
        stage.binary(test, None)?;
    }
    // The tests find the example policy at `<workspace>/vm-tests/../segments`, as compiled in.
    stage.tree(&ws.root.join("segments"))?;
    fs::create_dir_all(stage.path(&ws.root.join("vm-tests")))?;

    let modules = match &kernel.modules {
        Some(dir) => module_order(dir)?,
        None => {
            println!(
                "vm-test: no module tree given; {} must be built into the kernel",
                MODULES.join(", ")
            );
            Vec::new()
        }
    };
    for module in &modules {
        stage.file(module)?;
    }

    let mut steps = Vec::new();
    for name in TESTS {
        if !opts.tests.is_empty() && !opts.tests.iter().any(|t| t == name) {
            continue;
        }
        let bin = &tests[*name];
        let mut env = BTreeMap::new();
        match *name {
            "differential" => {
                env.insert("ENFORCER_DIFF_PACKETS", opts.diff_packets.to_string());
            }
            // Seven daemons verify their programs at once on two emulated CPUs; the persistence
            // tests start several too.
            "e2e" | "e2e_persist" => {
                env.insert("ENFORCER_READY_TIMEOUT", "240".to_owned());
            }
            _ => {}
        }
        steps.push(serde_json::json!({
            "name": name,
            // The console is a tty: without this libtest would colour its output.
            "argv": [bin, "--color=never"],
            "env": env,
        }));
    }
    let plan = serde_json::json!({
        "modules": modules,
        "env": {
            "ENFORCER_BIN": enforcer,
            "NO_COLOR": "1",
            "RUST_BACKTRACE": "1",
        },
        "steps": steps,
    });
    fs::write(
        stage.root.join("vm-test/plan.json"),
        serde_json::to_vec_pretty(&plan)?,
    )?;

    let archive = work.join("initramfs.cpio");
    write_cpio(&stage.root, &archive)?;
    Ok(archive)
}

/// The VM's test binaries by test name, and `vm-init`. Built by exactly the command the host
/// test run builds with (`cargo test` on the host packages): narrowing it down with `--test`
/// or `-p` unifies features differently and compiles the dependency tree a second time.
fn build_tests(ws: &Workspace) -> Result<(BTreeMap<String, PathBuf>, PathBuf)> {
    let mut cmd = ws.cargo(["test", "--no-run"]);
    cmd.args(ws.host_packages());
    let mut tests = BTreeMap::new();
    let mut init = None;
    for exe in cargo_executables(&mut cmd)? {
        if exe.kinds.iter().any(|k| k == "test") && TESTS.contains(&exe.name.as_str()) {
            tests.insert(exe.name, exe.path);
        } else if exe.name == "vm-init" && !exe.test_harness {
            init = Some(exe.path);
        }
    }
    for name in TESTS {
        if !tests.contains_key(*name) {
            bail!("cargo built no test executable `{name}`");
        }
    }
    Ok((tests, init.context("cargo built no executable `vm-init`")?))
}

/// An executable cargo built (or found fresh).
struct Executable {
    /// Target name, e.g. `e2e` or `vm-init`.
    name: String,
    /// Target kinds: `test`, `bin`, …
    kinds: Vec<String>,
    /// Built as a libtest harness (`cargo test` builds bins both ways).
    test_harness: bool,
    path: PathBuf,
}

/// Runs a cargo build command and returns every executable it produced (fresh or rebuilt).
/// Diagnostics go to stderr as usual.
fn cargo_executables(cmd: &mut Command) -> Result<Vec<Executable>> {
    cmd.arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to run {}", display(cmd)))?;
    let mut found = Vec::new();
    let stdout = child.stdout.take().context("cargo stdout")?;
    for message in Message::parse_stream(BufReader::new(stdout)) {
        if let Message::CompilerArtifact(artifact) = message.context("reading cargo's output")?
            && let Some(exe) = artifact.executable
        {
            found.push(Executable {
                name: artifact.target.name.to_string(),
                kinds: artifact.target.kind.iter().map(|k| k.to_string()).collect(),
                test_harness: artifact.profile.test,
                path: exe.into_std_path_buf(),
            });
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{} failed: {status}", display(cmd));
    }
    Ok(found)
}

/// The initramfs being assembled: host files at their host paths, so that the paths compiled
/// into the tests (`ENFORCER_BIN`, the policy directory) hold inside the VM too.
struct Stage {
    root: PathBuf,
    libs: BTreeSet<PathBuf>,
}

impl Stage {
    fn new(root: PathBuf) -> Self {
        Self {
            root,
            libs: BTreeSet::new(),
        }
    }

    /// Where host path `path` goes in the stage.
    fn path(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    fn file(&self, src: &Path) -> Result<()> {
        self.copy(src, src)
    }

    fn copy(&self, src: &Path, at: &Path) -> Result<()> {
        let dst = self.path(at);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent)?;
        }
        // fs::copy follows symlinks: libraries arrive as files under the name ldd printed.
        fs::copy(src, &dst)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        Ok(())
    }

    /// An executable (at `at`, default its own path) without debug info, which makes up most
    /// of a debug build, plus every shared library it needs.
    fn binary(&mut self, src: &Path, at: Option<&Path>) -> Result<()> {
        let dst = self.path(at.unwrap_or(src));
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent)?;
        }
        exec(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(src)
                .arg(&dst),
        )?;
        for lib in shared_libraries(src)? {
            if self.libs.insert(lib.clone()) {
                self.file(&lib)?;
            }
        }
        Ok(())
    }

    /// Every regular file under `dir`, at its host path.
    fn tree(&self, dir: &Path) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                self.tree(&path)?;
            } else {
                self.file(&path)?;
            }
        }
        Ok(())
    }
}

/// The dynamic loader and libraries `ldd` lists for `exe`; none for a static executable.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let Some(list) = output(Command::new("ldd").arg(exe)) else {
        // `not a dynamic executable` exits non-zero.
        return Ok(Vec::new());
    };
    let mut libs = Vec::new();
    for line in list.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x…)`; the vDSO has no path.
        let target = line.split("=>").last().unwrap_or_default().trim();
        let path = target.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("{}: {}", exe.display(), line.trim());
        }
    }
    Ok(libs)
}

/// The `.ko` files for [`MODULES`] and their dependencies, dependencies first. A module the
/// kernel has built in (`modules.builtin`) is skipped.
fn module_order(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = BTreeMap::new();
    index_modules(dir, &mut files)?;
    let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin
        .lines()
        .filter_map(|line| Path::new(line).file_name())
        .map(|name| module_name(&name.to_string_lossy()))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in MODULES {
        visit_module(name, &files, &builtin, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn visit_module(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<PathBuf>,
) -> Result<()> {
    let name = module_name(name);
    if !seen.insert(name.clone()) || builtin.contains(&name) {
        return Ok(());
    }
    let Some(file) = files.get(&name) else {
        bail!("kernel module {name} is neither in the module tree nor built in");
    };
    let bytes = fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    for dep in module_depends(&bytes) {
        visit_module(&dep, files, builtin, seen, order)?;
    }
    order.push(file.clone());
    Ok(())
}

/// `.ko` files under `dir` by module name. Compressed modules (`.ko.xz`) would need a
/// decompressor in the VM and are not supported; Debian 12's are plain.
fn index_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, files)?;
        } else if let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str()?.strip_suffix(".ko"))
        {
            files.insert(module_name(stem), path);
        }
    }
    Ok(())
}

/// Module names use `_` where file names may use `-`.
fn module_name(file_name: &str) -> String {
    file_name.trim_end_matches(".ko").replace('-', "_")
}

/// The `depends=` entry of a module's `.modinfo` section (NUL-separated `key=value` strings).
fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(start) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &ko[start + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|dep| !dep.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A newc cpio archive of `stage`, the format the kernel unpacks into its root filesystem.
fn write_cpio(stage: &Path, archive: &Path) -> Result<()> {
    let mut names = Vec::new();
    list_tree(stage, Path::new(""), &mut names)?;
    names.sort();
    let out =
        fs::File::create(archive).with_context(|| format!("creating {}", archive.display()))?;
    let mut cmd = Command::new("cpio");
    cmd.args(["--create", "--format=newc", "--quiet", "--owner=0:0"])
        .current_dir(stage)
        .stdin(Stdio::piped())
        .stdout(out);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to run {} (is cpio installed?)", display(&cmd)))?;
    let mut stdin = child.stdin.take().context("cpio stdin")?;
    for name in &names {
        writeln!(stdin, "{}", name.display())?;
    }
    drop(stdin);
    let status = child.wait()?;
    if !status.success() {
        bail!("{} failed: {status}", display(&cmd));
    }
    Ok(())
}

/// Paths under `root` relative to it, directories before their contents; symlinks are not
/// followed.
fn list_tree(root: &Path, rel: &Path, names: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let path = rel.join(entry.file_name());
        names.push(path.clone());
        if entry.file_type()?.is_dir() {
            list_tree(root, &path, names)?;
        }
    }
    Ok(())
}

/// Boots the VM and follows its console until it powers off or `timeout` passes, collecting
/// the `test result:` lines into `results`.
fn boot(
    kernel: &Kernel,
    initramfs: &Path,
    timeout: Duration,
    results: &mut Vec<String>,
) -> Result<()> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2G"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initramfs)
        // panic=-1: a kernel panic reboots at once, which -no-reboot turns into QEMU exiting.
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "failed to run {} (`cargo xtask setup` installs qemu-system-x86)",
            display(&cmd)
        )
    })?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().context("QEMU stdout")?;
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            if tx.send(printable(&line)).is_err() {
                break;
            }
            line.clear();
        }
    });

    let deadline = Instant::now() + timeout;
    let mut verdict = None;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                println!("{line}");
                if let Some(result) = line.find("test result: ") {
                    results.push(line[result..].to_owned());
                }
                if let Some(v) = line.strip_prefix("VM-TEST RESULT: ") {
                    verdict = Some(v.trim() == "PASS");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Our own child, by its handle.
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "timed out after {}s; QEMU killed (raise --timeout, or look for a hung \
                     test in the console output above)",
                    timeout.as_secs()
                );
            }
        }
    }
    let status = child.wait();
    match verdict {
        Some(true) => Ok(()),
        Some(false) => bail!("tests failed inside the VM (see the console output above)"),
        None => bail!(
            "the VM stopped ({}) without a `VM-TEST RESULT` line: it did not boot, or its init \
             crashed (see the console output above)",
            status.map_or_else(|e| e.to_string(), |s| s.to_string())
        ),
    }
}

/// A console line without its line ending and without the terminal escapes (`ESC [ … letter`)
/// and other control characters the firmware and the kernel's tty write.
fn printable(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next_if_eq(&'[').is_some() {
                while chars.next().is_some_and(|c| !c.is_ascii_alphabetic()) {}
            }
        } else if c == '\t' || !c.is_control() {
            out.push(c);
        }
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::{module_depends, module_name, printable};

    #[test]
    fn console_lines() {
        assert_eq!(
            printable(b"\x1bc\x1b[?7l\x1b[2JSeaBIOS (version 1.16)\r\n"),
            "cSeaBIOS (version 1.16)"
        );
        assert_eq!(printable(b"test result: ok.\r\n"), "test result: ok.");
    }

    #[test]
    fn modinfo_depends() {
        let ko = b"\x7fELF...\0license=GPL\0depends=llc,stp\0vermagic=6.1.0\0";
        assert_eq!(module_depends(ko), ["llc", "stp"]);
        assert!(module_depends(b"\0depends=\0name=veth\0").is_empty());
        assert_eq!(module_name("sch-ingress.ko"), "sch_ingress");
    }
}
