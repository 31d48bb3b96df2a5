//! The `enforcer run` daemon inside a lab host: start, wait for readiness, stop, read counters.

use std::{
    env,
    io::{BufRead as _, BufReader, Read as _},
    marker::PhantomData,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde::Deserialize;

use super::{Host, Lab, LabError, Metrics, Observer, Result, http, io_error, netns};

/// The line the daemon logs once it is attached to every interface.
const READY_MARKER: &str = "enforcer ready";

/// Packet counters of one direction the daemon prints on exit
/// (`{"event":"shutdown","counters":{…},"egress_counters":{…}}`). A counter the daemon does
/// not print reads 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub allowed: u64,
    pub audit: u64,
    pub unenforced: u64,
    pub non_ip: u64,
    pub established: u64,
    pub related: u64,
    pub fragment: u64,
    pub breakglass: u64,
    pub policy_denied: u64,
    pub malformed: u64,
    pub unsupported_encap: u64,
    pub fragment_no_state: u64,
    pub fragment_overlap: u64,
    pub fragment_too_small: u64,
    pub too_many_ext_headers: u64,
    pub conntrack_full: u64,
    pub flow_revoked: u64,
    pub breakglass_expired: u64,
}

impl Counters {
    /// Packets dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.policy_denied
            + self.malformed
            + self.unsupported_encap
            + self.fragment_no_state
            + self.fragment_overlap
            + self.fragment_too_small
            + self.too_many_ext_headers
            + self.conntrack_full
            + self.flow_revoked
            + self.breakglass_expired
    }
}

/// Both directions of a daemon's shutdown summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownCounters {
    /// XDP, packets the interfaces received.
    pub ingress: Counters,
    /// TC, packets the interfaces sent.
    pub egress: Counters,
}

#[derive(Deserialize)]
struct Shutdown {
    event: String,
    counters: Counters,
    #[serde(default)]
    egress_counters: Counters,
}

/// The daemon binary: `$ENFORCER_BIN`, else `enforcer` in the cargo target directory this
/// executable was built into (`target/debug/deps/e2e-…` or `target/debug/demo`).
pub fn enforcer_bin() -> Result<PathBuf> {
    let not_found = LabError::EnforcerBinary;
    if let Some(bin) = env::var_os("ENFORCER_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(not_found(format!(
                "ENFORCER_BIN={} does not exist",
                bin.display()
            )))
        };
    }
    let exe = env::current_exe().map_err(io_error("locating the current executable"))?;
    let mut dir = exe.parent().unwrap_or(Path::new(".")).to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("enforcer");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(not_found(format!(
            "daemon binary not found at {}: run `cargo build -p enforcer`, or use \
             `cargo xtask test`, or set ENFORCER_BIN",
            bin.display()
        )))
    }
}

/// How a daemon (or another `enforcer` command) enters its host's network namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetnsEntry {
    /// `ip netns exec`: the network namespace, plus a private mount namespace with a fresh
    /// `/sys` (no BPF file system), whose pins would vanish with the process.
    #[default]
    IpNetnsExec,
    /// Only the network namespace (`setns(CLONE_NEWNET)` before exec, as `nsenter
    /// --net=/run/netns/NAME` does): the host's mounts, so pins in /sys/fs/bpf outlive the
    /// daemon as they do on a real host. For `--persist`.
    NetOnly,
}

/// `program` to be run in `netns`, entered as `entry` says.
pub(super) fn command_in(netns: &str, entry: NetnsEntry, program: &Path) -> Result<Command> {
    match entry {
        NetnsEntry::IpNetnsExec => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", netns]).arg(program);
            Ok(cmd)
        }
        NetnsEntry::NetOnly => {
            let file = netns::open(netns)?;
            let mut cmd = Command::new(program);
            // SAFETY: setns is async-signal-safe; the child is single-threaded, as setns into a
            // network namespace requires. `file` lives in the closure until exec (CLOEXEC).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Ok(cmd)
        }
    }
}

/// The daemon's default `--metrics-addr`.
const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9477);

/// The `--metrics-addr` among `args` (else the default), made reachable: a daemon listening on
/// every address is reached over loopback.
fn metrics_addr(args: &[&str]) -> Result<SocketAddr, String> {
    let mut given = None;
    for (i, arg) in args.iter().enumerate() {
        if let Some(value) = arg.strip_prefix("--metrics-addr=") {
            given = Some(value);
        } else if *arg == "--metrics-addr" {
            given = Some(
                args.get(i + 1)
                    .copied()
                    .ok_or("--metrics-addr without a value")?,
            );
        }
    }
    let mut addr = match given {
        Some(value) => value
            .parse::<SocketAddr>()
            .map_err(|e| format!("--metrics-addr {value:?}: {e}"))?,
        None => DEFAULT_METRICS_ADDR,
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(addr)
}

/// The value of `--flag VALUE` or `--flag=VALUE` among `args`.
fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, arg)| {
        arg.strip_prefix(flag)
            .and_then(|rest| rest.strip_prefix('='))
            .or_else(|| (*arg == flag).then(|| args.get(i + 1).copied()).flatten())
    })
}

/// Where a lab daemon keeps its control socket, state file and audit log unless the caller's
/// arguments say otherwise: `<temp>/<lab id>/<host>/`, removed with the lab. Daemons of one
/// machine must not share the default `/run/enforcer/control.sock` or state file.
#[derive(Clone, Debug)]
pub struct DaemonFiles {
    pub control_socket: PathBuf,
    pub state_file: PathBuf,
    pub audit_log: PathBuf,
}

impl DaemonFiles {
    fn for_host(lab_id: &str, name: &str, extra: &[&str]) -> Self {
        let dir = super::run_dir(lab_id).join(name);
        let given = |flag: &str, default: &str| {
            flag_value(extra, flag).map_or_else(|| dir.join(default), PathBuf::from)
        };
        DaemonFiles {
            control_socket: given("--control-socket", "control.sock"),
            state_file: given("--state-file", "state.json"),
            audit_log: given("--audit-log", "audit.jsonl"),
        }
    }

    /// The arguments for the files `extra` does not name.
    fn args(&self, extra: &[&str]) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        for (flag, path) in [
            ("--control-socket", &self.control_socket),
            ("--state-file", &self.state_file),
            ("--audit-log", &self.audit_log),
        ] {
            if flag_value(extra, flag).is_none() {
                args.push(flag.into());
                args.push(path.into());
            }
        }
        args
    }
}

/// A running daemon. Dropping it kills the daemon (SIGTERM, then SIGKILL); [`Enforcer::stop`]
/// also collects its counters. It borrows the [`Lab`], so it cannot outlive the namespace.
pub struct Enforcer<'lab> {
    /// The host's name, or `router` for a gateway daemon.
    host: String,
    netns: String,
    lab_id: String,
    bin: PathBuf,
    /// Where the HTTP endpoints listen, as reached from inside `netns`.
    metrics_addr: SocketAddr,
    files: DaemonFiles,
    child: Option<Child>,
    stderr: Arc<Mutex<Vec<String>>>,
    ready: mpsc::Receiver<()>,
    stdout: Option<JoinHandle<String>>,
    _lab: PhantomData<&'lab Lab>,
}

impl Enforcer<'_> {
    pub(super) fn spawn(
        host: &Host,
        bin: &Path,
        policy_dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let lab_id = host
            .netns
            .strip_suffix(&format!("-{}", host.name))
            .unwrap_or(&host.netns);
        Self::spawn_in(
            &host.name,
            &host.netns,
            lab_id,
            &["eth0"],
            bin,
            policy_dir,
            extra,
            NetnsEntry::IpNetnsExec,
        )
    }

    /// `enforcer run` in namespace `netns` (entered as `entry` says) on `ifaces`, with `extra`
    /// arguments appended; `name` is for logs and errors.
    #[expect(
        clippy::too_many_arguments,
        reason = "internal; the public API takes fewer"
    )]
    pub(super) fn spawn_in(
        name: &str,
        netns: &str,
        lab_id: &str,
        ifaces: &[&str],
        bin: &Path,
        policy_dir: &Path,
        extra: &[&str],
        entry: NetnsEntry,
    ) -> Result<Self> {
        let metrics_addr = metrics_addr(extra).map_err(|message| LabError::Enforcer {
            host: name.to_owned(),
            message,
        })?;
        let mut cmd = command_in(netns, entry, bin)?;
        cmd.args(["run", "--policy"]).arg(policy_dir);
        for iface in ifaces {
            cmd.args(["--iface", iface]);
        }
        let files = DaemonFiles::for_host(lab_id, name, extra);
        cmd.args(files.args(extra));
        cmd.args(extra);
        cmd
            // Readiness is read from the info-level log, whatever the caller's RUST_LOG says.
            .env(
                "RUST_LOG",
                env::var("ENFORCER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: Ctrl-C in a terminal reaches us, and we stop the daemon in
            // order, rather than it racing our cleanup.
            .process_group(0);
        dies_with_this_process(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(io_error(format!("starting {} in {name}", bin.display(),)))?;
        let lab_id = lab_id.to_owned();
        netns::register_daemon(&lab_id, child.id() as i32);

        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready) = mpsc::channel();
        if let Some(stderr) = child.stderr.take() {
            let lines = Arc::clone(&stderr_lines);
            let name = name.to_owned();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    tracing::debug!(host = %name, "enforcer: {line}");
                    if line.contains(READY_MARKER) {
                        let _ = ready_tx.send(());
                    }
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        let stdout = child.stdout.take().map(|mut out| {
            thread::spawn(move || {
                let mut text = String::new();
                let _ = out.read_to_string(&mut text);
                text
            })
        });
        tracing::info!(host = %name, ?ifaces, pid = child.id(), "enforcer started");
        Ok(Self {
            host: name.to_owned(),
            netns: netns.to_owned(),
            lab_id,
            bin: bin.to_path_buf(),
            metrics_addr,
            files,
            child: Some(child),
            stderr: stderr_lines,
            ready,
            stdout,
            _lab: PhantomData,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The namespace the daemon runs in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The daemon's process id while it runs. `ip netns exec` execs the program in place (and
    /// [`NetnsEntry::NetOnly`] starts it directly), so this is the `enforcer` process itself
    /// (e.g. for `/proc/PID/status`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where `/metrics`, `/healthz`, `/readyz` and `/flows` are served, as reached from inside
    /// the daemon's namespace (the `--metrics-addr` given, with an unspecified address replaced
    /// by loopback).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The daemon's control socket, state file and audit log.
    pub fn files(&self) -> &DaemonFiles {
        &self.files
    }

    /// Runs the enforcer CLI (`enforcer ARGS --control-socket <this daemon's>`) from the test
    /// process, as a control client would on the host. The socket is a file: no namespace is
    /// needed to reach it.
    pub fn control_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .arg("--control-socket")
            .arg(&self.files.control_socket);
        cmd
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the daemon.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let Some(pid) = self.pid() else {
            return Err(self.error("already stopped".into()));
        };
        // SAFETY: our unreaped child, so the pid cannot have been reused.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            return Err(io_error(format!("kill({pid}, {signal})"))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Asks the daemon to reload its policy (SIGHUP).
    pub fn reload(&self) -> Result<()> {
        self.signal(libc::SIGHUP)
    }

    /// `GET path` from the daemon's HTTP endpoint, from inside its namespace; the body of a
    /// 200 answer.
    pub fn http_get(&self, path: &str, timeout: Duration) -> Result<String> {
        let addr = self.metrics_addr;
        let answer = netns::in_netns(&self.netns, || http::get(addr, path, timeout))?;
        answer.map_err(|message| LabError::Enforcer {
            host: self.host.clone(),
            message: format!("GET http://{addr}{path}: {message}"),
        })
    }

    /// `/metrics`, parsed.
    pub fn metrics(&self) -> Result<Metrics> {
        let text = self.http_get("/metrics", Duration::from_secs(5))?;
        Metrics::parse(&text).map_err(|message| LabError::Enforcer {
            host: self.host.clone(),
            message: format!("unparsable /metrics ({message}):\n{text}"),
        })
    }

    /// Starts `enforcer observe --addr <this daemon> ARGS` in the daemon's namespace.
    pub fn observe(&self, args: &[&str]) -> Result<Observer<'_>> {
        Observer::spawn(
            &self.host,
            &self.netns,
            &self.bin,
            &format!("http://{}", self.metrics_addr),
            args,
        )
    }

    /// Whether a stderr line containing `needle` appears within `timeout` (lines logged before
    /// the call count too).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .stderr
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|line| line.contains(needle));
            if found {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    fn error(&self, message: String) -> LabError {
        LabError::Enforcer {
            host: self.host.clone(),
            message: format!("{message}\n--- daemon stderr ---\n{}", self.stderr()),
        }
    }

    /// Waits for the readiness line until `deadline` (shared when several daemons start).
    pub(super) fn wait_ready(&mut self, deadline: Instant, timeout: Duration) -> Result<()> {
        match self
            .ready
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(()) => Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(self.error(format!("no `{READY_MARKER}` line within {timeout:?}")))
            }
            // stderr closed: the daemon exited (or closed stderr) before it was ready.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.take().and_then(|mut child| {
                    netns::unregister_daemon(&self.lab_id, child.id() as i32);
                    child.wait().ok()
                });
                Err(self.error(format!(
                    "exited before `{READY_MARKER}` ({})",
                    status.map_or("unknown status".into(), |s| s.to_string())
                )))
            }
        }
    }

    /// Kills the daemon with SIGKILL: no clean shutdown, no summary (a crash, an OOM kill).
    pub fn kill(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Err(self.error("already stopped".into()));
        };
        let pid = child.id() as i32;
        let killed = child.kill().and_then(|()| child.wait());
        netns::unregister_daemon(&self.lab_id, pid);
        let status = killed.map_err(io_error(format!("killing the daemon on {}", self.host)))?;
        tracing::info!(host = %self.host, %status, "enforcer killed");
        Ok(())
    }

    /// Stops the daemon with SIGTERM (SIGKILL after 10 s) and returns its ingress counters.
    pub fn stop(self) -> Result<Counters> {
        self.stop_all().map(|c| c.ingress)
    }

    /// Stops the daemon like [`Enforcer::stop`] and returns the counters of both directions.
    pub fn stop_all(mut self) -> Result<ShutdownCounters> {
        let Some(child) = self.child.take() else {
            return Err(self.error("already stopped".into()));
        };
        let pid = child.id() as i32;
        // Wait through `terminate_pids`; drop the Child without waiting again.
        netns::terminate_pids(&[pid], Duration::from_secs(10));
        netns::unregister_daemon(&self.lab_id, pid);
        drop(child);
        let stdout = self
            .stdout
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let shutdown = stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<Shutdown>(line.trim()).ok())
            .find(|s| s.event == "shutdown");
        match shutdown {
            Some(Shutdown {
                counters,
                egress_counters,
                ..
            }) => {
                let counters = ShutdownCounters {
                    ingress: counters,
                    egress: egress_counters,
                };
                tracing::info!(host = %self.host, ?counters, "enforcer stopped");
                Ok(counters)
            }
            None => Err(self.error(format!(
                "no shutdown summary on stdout; stdout was:\n{stdout}"
            ))),
        }
    }
}

impl Drop for Enforcer<'_> {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let pid = child.id() as i32;
            netns::terminate_pids(&[pid], Duration::from_secs(5));
            netns::unregister_daemon(&self.lab_id, pid);
        }
    }
}

/// Makes a child daemon get SIGTERM if this process dies without unwinding (so it detaches
/// instead of holding XDP on an orphaned namespace), and hear the signals that
/// [`cleanup_on_signals`](super::cleanup_on_signals) blocks: the signal mask is inherited across
/// exec, and would leave the daemon deaf to SIGTERM.
pub fn dies_with_this_process(cmd: &mut Command) {
    // SAFETY: prctl, sigemptyset and pthread_sigmask are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut none = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_metrics_addr() {
        let addr = |args: &[&str]| super::metrics_addr(args).map(|a| a.to_string());
        assert_eq!(addr(&[]).unwrap(), "127.0.0.1:9477");
        assert_eq!(
            addr(&["--report-allowed", "--metrics-addr", "127.0.0.1:1"]).unwrap(),
            "127.0.0.1:1"
        );
        assert_eq!(addr(&["--metrics-addr=[::]:2"]).unwrap(), "[::1]:2");
        assert!(addr(&["--metrics-addr"]).is_err());
    }

    #[test]
    fn lab_daemons_get_their_own_files_unless_given() {
        let files = super::DaemonFiles::for_host("msl1x0", "pacs", &["--audit-log=/x/a.jsonl"]);
        assert!(files.control_socket.ends_with("msl1x0/pacs/control.sock"));
        assert_eq!(files.audit_log, std::path::PathBuf::from("/x/a.jsonl"));
        let args = files.args(&["--audit-log=/x/a.jsonl"]);
        assert_eq!(args.len(), 4, "{args:?}");
        assert_eq!(
            super::flag_value(&["--state-file", "/s"], "--state-file"),
            Some("/s")
        );
        assert_eq!(
            super::flag_value(&["--state-filex=/s"], "--state-file"),
            None
        );
    }
}
