//! `/init` of the initramfs that `cargo xtask vm-test` boots in QEMU: mounts the pseudo
//! filesystems, loads the kernel modules the tests need, runs the test binaries listed in
//! `/vm-test/plan.json` with their output on the serial console, prints
//! `VM-TEST RESULT: PASS` or `FAIL`, and powers the VM off.
//!
//! Only useful as PID 1 of that VM: it refuses to run anywhere else.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs::{self, File},
    os::fd::AsRawFd as _,
    path::Path,
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

const PLAN: &str = "/vm-test/plan.json";

/// Written by xtask (`xtask/src/vm_test.rs`); paths are the host's, preserved in the initramfs.
#[derive(Deserialize)]
struct Plan {
    /// Kernel modules in load order (dependencies first).
    #[serde(default)]
    modules: Vec<String>,
    /// Environment of every step.
    #[serde(default)]
    env: BTreeMap<String, String>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    name: String,
    argv: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("vm-init is the init of the vm-test initramfs; run `cargo xtask vm-test`");
        std::process::exit(2);
    }
    let pass = match run() {
        Ok(pass) => pass,
        Err(e) => {
            println!("vm-init: {e:#}");
            false
        }
    };
    println!("VM-TEST RESULT: {}", if pass { "PASS" } else { "FAIL" });
    // SAFETY: plain syscalls; as PID 1 we may power off, and sync first so nothing is lost.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Only reached if reboot failed; exiting PID 1 panics the kernel, and QEMU's -no-reboot
    // turns that into an exit too.
    std::process::exit(1);
}

fn run() -> Result<bool> {
    mount_all()?;
    reopen_console();
    let plan: Plan = serde_json::from_slice(&fs::read(PLAN).with_context(|| PLAN.to_owned())?)
        .with_context(|| format!("parsing {PLAN}"))?;
    println!(
        "vm-init: kernel {}",
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    for module in &plan.modules {
        load_module(module)?;
    }
    // SAFETY: setenv before any thread exists (we have none).
    unsafe {
        std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        std::env::set_var("HOME", "/root");
    }
    let mut pass = true;
    for step in &plan.steps {
        println!("VM-TEST STEP {}: start", step.name);
        let started = Instant::now();
        let ok = run_step(step, &plan.env)?;
        println!(
            "VM-TEST STEP {}: {} in {:.1}s",
            step.name,
            if ok { "ok" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        );
        pass &= ok;
    }
    Ok(pass)
}

fn mount_all() -> Result<()> {
    // The bpf filesystem is where aya would pin maps; debugfs holds the verifier's trace pipe.
    // No tmpfs on /tmp: the initramfs root is writable already, and the test binaries sit at
    // their host paths, which are under /tmp when the workspace is (a fresh CI clone may be).
    let mounts = [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/run", "tmpfs"),
        ("bpf", "/sys/fs/bpf", "bpf"),
        ("debugfs", "/sys/kernel/debug", "debugfs"),
    ];
    for (source, target, fstype) in mounts {
        fs::create_dir_all(target).with_context(|| format!("mkdir {target}"))?;
        let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
        let (source_c, target_c, fstype_c) = (c(source), c(target), c(fstype));
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                source_c.as_ptr(),
                target_c.as_ptr(),
                fstype_c.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "mounting {fstype} on {target}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// The kernel gives init the console only if `/dev/console` exists in the initramfs; opening
/// it from devtmpfs works either way.
fn reopen_console() {
    if let Ok(console) = File::options().read(true).write(true).open("/dev/console") {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of our own process.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
}

fn load_module(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening module {path}"))?;
    let params = CString::default();
    // SAFETY: a valid fd and an empty parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        // Built in, or loaded as a dependency already.
        if error.raw_os_error() != Some(libc::EEXIST) {
            bail!("loading module {path}: {error}");
        }
    }
    let name = Path::new(path)
        .file_name()
        .map_or(path.into(), |n| n.to_string_lossy());
    println!("vm-init: loaded {name}");
    Ok(())
}

/// Runs one step; orphans the test leaves behind are reparented to us, so reap everything while
/// waiting for the step's own process.
fn run_step(step: &Step, env: &BTreeMap<String, String>) -> Result<bool> {
    let Some((program, args)) = step.argv.split_first() else {
        bail!("step {} has an empty argv", step.name);
    };
    let child = Command::new(program)
        .args(args)
        .envs(env)
        .envs(&step.env)
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let pid = child.id() as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: waiting for any child of ours; a valid status pointer.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped == pid {
            let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            if !ok {
                println!("vm-init: {} ended with wait status {status:#x}", step.name);
            }
            return Ok(ok);
        }
        if reaped < 0 {
            bail!(
                "waiting for {}: {}",
                step.name,
                std::io::Error::last_os_error()
            );
        }
    }
}
