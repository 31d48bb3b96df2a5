//! Namespace plumbing: entering a namespace on a thread, `ip -batch`, sysctls, and the
//! process-wide registry that lets a signal handler or a later run clean up.

use std::{
    collections::BTreeSet,
    fs::File,
    io::Write as _,
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use super::{LabError, Result, io_error};

/// Namespaces and daemon pids this process created and has not removed yet.
struct Registry {
    netns: BTreeSet<String>,
    /// (lab id, pid)
    daemons: BTreeSet<(String, i32)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    netns: BTreeSet::new(),
    daemons: BTreeSet::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // A panic while holding the lock leaves consistent sets behind.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes [`cleanup_all`] (and so [`cleanup_on_signals`]) delete `netns`: a lab's namespaces,
/// and those created outside a [`Lab`](super::Lab), which [`delete_tracked`] deletes and forgets.
pub fn track(netns: &str) {
    registry().netns.insert(netns.to_owned());
}

/// Deletes a namespace given to [`track`], best effort.
pub fn delete_tracked(netns: &str) {
    delete(&[netns.to_owned()]);
}

pub(super) fn register_daemon(lab: &str, pid: i32) {
    registry().daemons.insert((lab.to_owned(), pid));
}

pub(super) fn unregister_daemon(lab: &str, pid: i32) {
    registry().daemons.remove(&(lab.to_owned(), pid));
}

pub(super) fn open(netns: &str) -> Result<File> {
    File::open(format!("/run/netns/{netns}")).map_err(io_error(format!("opening netns {netns}")))
}

/// Moves the calling thread (only it) into the namespace `file` refers to.
pub(super) fn enter(file: &File, netns: &str) -> Result<()> {
    // SAFETY: plain syscall on a valid fd; CLONE_NEWNET affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io_error(format!("setns into {netns}"))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Runs `f` on a new thread inside the network namespace `/run/netns/<netns>` and returns its
/// result. `std::net` sockets opened by `f` belong to that namespace. A panic in `f` is
/// propagated.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = open(netns)?;
    thread::scope(|scope| {
        let worker = scope.spawn(move || {
            enter(&file, netns)?;
            Ok(f())
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Writes `/proc/sys/<key>` = value for each pair, from a thread inside `netns` (net sysctls
/// are per namespace, resolved by the writing thread's namespace).
pub(super) fn sysctls(netns: &str, pairs: &[(&str, &str)]) -> Result<()> {
    in_netns(netns, || {
        for (key, value) in pairs {
            std::fs::write(format!("/proc/sys/{key}"), value)
                .map_err(io_error(format!("sysctl {key}={value} in {netns}")))?;
        }
        Ok(())
    })?
}

/// `ip [-n netns] -batch -`: one process for many commands.
pub(super) fn ip_batch(
    netns: Option<&str>,
    commands: impl IntoIterator<Item = String>,
) -> Result<()> {
    let script: String = commands.into_iter().map(|c| c + "\n").collect();
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(io_error(
        "running `ip` (is iproute2 installed? `cargo xtask setup` installs it)",
    ))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(io_error("writing to `ip -batch`"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_error("waiting for `ip -batch`"))?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: format!(
                "ip {}-batch - <<EOF\n{script}EOF",
                netns.map(|ns| format!("-n {ns} ")).unwrap_or_default()
            ),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Deletes namespaces, best effort: a namespace that is already gone is not an error.
pub(super) fn delete(names: &[String]) {
    let existing: Vec<&String> = names
        .iter()
        .filter(|n| std::path::Path::new("/run/netns").join(n).exists())
        .collect();
    if !existing.is_empty() {
        let script = existing.iter().map(|n| format!("netns del {n}"));
        if let Err(error) = Command::new("ip")
            .args(["-force", "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(script.map(|l| l + "\n").collect::<String>().as_bytes())?;
                }
                child.wait_with_output()
            })
            .map(|out| {
                if !out.status.success() {
                    tracing::warn!(stderr = %String::from_utf8_lossy(&out.stderr), "netns del");
                }
            })
        {
            tracing::warn!(%error, "could not delete lab namespaces");
        }
    }
    let mut reg = registry();
    for name in names {
        reg.netns.remove(name);
    }
}

/// Removes namespaces named `<prefix><pid>x…` whose creating process is gone (a test run that
/// was SIGKILLed, or a crashed demo).
pub fn remove_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let stale: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| of_dead_process(name, prefix))
        .collect();
    if !stale.is_empty() {
        tracing::info!(?stale, "removing namespaces left by dead lab processes");
        delete(&stale);
    }
}

/// Whether `name` is `<prefix><pid>x…` of a process that is gone.
pub fn of_dead_process(name: &str, prefix: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
    !pid.is_empty() && !std::path::Path::new("/proc").join(&pid).exists()
}

/// Removes pin directories `<bpffs>/<prefix><pid>x…` of `--persist` daemons whose lab process
/// is gone: unpinning releases their maps, programs and links (their namespaces, and the
/// interfaces the links were on, are removed by [`remove_stale`]).
pub(super) fn remove_stale_pins(bpffs: &std::path::Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(bpffs) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if of_dead_process(&name, prefix) {
            let pins = entry.path();
            tracing::info!(pins = %pins.display(), "removing pins left by a dead lab process");
            let _ = std::fs::remove_dir_all(pins);
        }
    }
}

/// Stops daemons registered for lab `lab` (SIGTERM, then SIGKILL) and reaps them.
pub(super) fn kill_daemons_in(lab: &str) {
    let pids: Vec<i32> = registry()
        .daemons
        .iter()
        .filter(|(l, _)| l == lab)
        .map(|(_, pid)| *pid)
        .collect();
    terminate_pids(&pids, Duration::from_secs(5));
    let mut reg = registry();
    for pid in pids {
        reg.daemons.remove(&(lab.to_owned(), pid));
    }
}

/// SIGTERM, wait up to `grace` for all to exit, SIGKILL the rest. The pids must be children of
/// this process (they are reaped here).
pub(super) fn terminate_pids(pids: &[i32], grace: Duration) {
    for &pid in pids {
        // SAFETY: signalling a child we spawned and have not reaped, so the pid is ours.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    let mut alive: Vec<i32> = pids.to_vec();
    while !alive.is_empty() && Instant::now() < deadline {
        alive.retain(|&pid| !reaped(pid));
        thread::sleep(Duration::from_millis(20));
    }
    for pid in alive {
        tracing::warn!(pid, "daemon ignored SIGTERM, killing it");
        // SAFETY: as above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
}

fn reaped(pid: i32) -> bool {
    // SAFETY: non-blocking wait on our own child; a null status pointer is allowed.
    let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
    // ECHILD (-1): already reaped by someone else.
    r != 0
}

/// Stops every daemon and deletes every namespace this process created. For signal handlers
/// and other paths that cannot unwind to the [`Lab`](super::Lab) guards.
pub fn cleanup_all() {
    let (netns, daemons) = {
        let reg = registry();
        (
            reg.netns.iter().cloned().collect::<Vec<_>>(),
            reg.daemons.iter().map(|(_, pid)| *pid).collect::<Vec<_>>(),
        )
    };
    terminate_pids(&daemons, Duration::from_secs(3));
    registry().daemons.clear();
    delete(&netns);
}

/// Makes SIGINT, SIGTERM and SIGHUP clean up the lab ([`cleanup_all`]) and exit with
/// 128 + signal. Call it first thing in `main`, before any thread is spawned: it blocks these
/// signals in the calling thread so that every later thread inherits the mask and only the
/// dedicated signal thread receives them. Child processes inherit the mask; the daemons the
/// lab starts unblock them again.
pub fn cleanup_on_signals() -> Result<()> {
    // SAFETY: sigset_t is plain data; the libc calls only write into it.
    let set = unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    };
    // SAFETY: valid set pointer; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io_error("blocking signals")(
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    thread::Builder::new()
        .name("lab-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: valid pointers; the signals are blocked in every thread.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                tracing::warn!(sig, "signal received: removing the lab");
                cleanup_all();
                std::process::exit(128 + sig);
            }
        })
        .map_err(io_error("spawning the signal thread"))?;
    Ok(())
}
