//! `enforcer run --persist`: enforcement stays in force while no daemon runs (SIGKILL, SIGTERM),
//! a new daemon adopts the pinned maps and programs without a gap — no allowed packet dropped,
//! no denied packet passed, established connections kept — and `enforcer detach` removes
//! everything. Without `--persist` the daemon detaches on SIGTERM.
//!
//! The daemons enter only the network namespace of their lab host (not `ip netns exec`, whose
//! private mount namespace would take the pins with it), so the pins live in the host's
//! /sys/fs/bpf as on a real machine: in a directory per lab host, removed by each test's guard.
//!
//! Needs root and a kernel with XDP; `cargo xtask test` provides both and sets `ENFORCER_BIN`.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail, ensure};
use enforcer::events::FlowEvent;
use vm_tests::lab::{Enforcer, HostSpec, Lab, Metrics, NetnsEntry, example_policy_dir, init_test};

const PACS: &str = "pacs";
/// Allowed to reach pacs tcp/104 (DICOM); pacs's outgoing stream goes to it.
const RADIOLOGY_WS: &str = "radiology-ws";
/// Not allowed to reach pacs tcp/104 or udp/161.
const LAB_WS: &str = "lab-ws";
/// Allowed to reach pacs udp/161 (SNMP, rule noc-monitoring-pacs).
const NOC: &str = "noc";
/// Where radiology-ws pushes a stream to pacs over a connection pacs opened (results pushed by a
/// modality): its packets reach pacs's XDP from a source that may not open connections to pacs,
/// so they pass only as long as the connection's state does.
const PUSH_PORT: u16 = 2575;

/// Generous: a probe that should connect is not failed by a busy machine. Dropped packets are
/// caught by the kernel's own counters too (segment-pair verdicts), whatever the timing.
const ALLOWED_TIMEOUT: Duration = Duration::from_secs(3);
/// A denied probe fails after this; one that connects in time is a denied packet that passed.
const DENIED_TIMEOUT: Duration = Duration::from_millis(300);
/// A long-lived connection that goes this long without an answer has lost a packet for good.
const STREAM_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_PAUSE: Duration = Duration::from_millis(40);
/// How long each phase (daemon up, daemon down, adopted daemon up) carries traffic at least.
const PHASE: Duration = Duration::from_secs(2);

const PHASES: [&str; 3] = ["first daemon", "no daemon", "adopting daemon"];

fn lab() -> Result<Lab> {
    Ok(Lab::new(&[
        HostSpec::clinical(PACS, "pacs", 10),
        HostSpec::clinical(RADIOLOGY_WS, "radiology", 20),
        HostSpec::clinical(LAB_WS, "lab", 20),
        HostSpec::new(NOC, None, "10.99.0.10".parse()?, "fd00:99::10".parse()?),
    ])?)
}

/// Removes the pinned enforcer when the test ends, passing or not: declared before the daemons
/// (dropped after them, as `enforcer detach` refuses while a daemon runs) and after the lab.
struct PinGuard<'lab> {
    lab: &'lab Lab,
    host: &'static str,
    dir: PathBuf,
}

impl PinGuard<'_> {
    fn new<'a>(lab: &'a Lab, host: &'static str) -> Result<PinGuard<'a>> {
        let dir = lab.pin_dir(host)?;
        Ok(PinGuard { lab, host, dir })
    }

    fn arg(&self) -> String {
        format!("--pin-dir={}", self.dir.display())
    }

    /// `enforcer detach` for this directory: its stdout, or an error with its stderr.
    fn detach(&self) -> Result<String> {
        let out = self
            .lab
            .enforcer_command(self.host, &["detach", &self.arg()])?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "enforcer detach failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    }
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        if self.dir.exists() {
            if let Err(error) = self.detach() {
                eprintln!("cleanup: {error:#}");
            }
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn start_persistent<'lab>(
    lab: &'lab Lab,
    pins: &PinGuard<'_>,
    policy: &Path,
    metrics_addr: &str,
) -> Result<Enforcer<'lab>> {
    Ok(lab.start_enforcer_entered(
        PACS,
        policy,
        &["--persist", &pins.arg(), "--metrics-addr", metrics_addr],
        NetnsEntry::NetOnly,
    )?)
}

/// One observation of the traffic that runs through a test.
#[derive(Clone, Copy, Debug)]
struct Outcome {
    kind: &'static str,
    /// Index into [`PHASES`] when the attempt started.
    phase: usize,
    /// The packets went through (for a denied kind: a violation).
    passed: bool,
}

/// Traffic kept running while daemons come and go, and what became of it.
struct Traffic {
    stop: AtomicBool,
    phase: AtomicUsize,
    outcomes: Mutex<Vec<Outcome>>,
}

const ALLOWED_KINDS: [&str; 4] = [
    "new TCP radiology-ws -> pacs:104",
    "UDP noc -> pacs:161",
    "established TCP radiology-ws -> pacs:104",
    "established TCP pacs -> radiology-ws, pushed to pacs",
];
const DENIED_KINDS: [&str; 2] = ["TCP lab-ws -> pacs:104", "UDP lab-ws -> pacs:161"];

impl Traffic {
    fn new() -> Self {
        Traffic {
            stop: AtomicBool::new(false),
            phase: AtomicUsize::new(0),
            outcomes: Mutex::new(Vec::new()),
        }
    }

    fn record(&self, kind: &'static str, phase: usize, passed: bool) {
        self.outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Outcome {
                kind,
                phase,
                passed,
            });
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    /// Repeats `probe` until stopped, recording each attempt under `kind`.
    fn repeat(&self, kind: &'static str, probe: impl Fn() -> bool) {
        while self.running() {
            let phase = self.phase.load(Ordering::Relaxed);
            let passed = probe();
            self.record(kind, phase, passed);
            thread::sleep(PROBE_PAUSE);
        }
    }

    /// Round trips on one TCP connection from `from` to the echo service at `to`, until stopped
    /// or the connection fails (recorded once; a broken connection stays broken).
    fn echo_stream(&self, lab: &Lab, kind: &'static str, from: &str, to: SocketAddr) {
        let ran = lab.in_host(from, || -> std::io::Result<()> {
            let mut stream = TcpStream::connect_timeout(&to, STREAM_TIMEOUT)?;
            stream.set_read_timeout(Some(STREAM_TIMEOUT))?;
            stream.set_write_timeout(Some(STREAM_TIMEOUT))?;
            let mut n = 0u64;
            while self.running() {
                let phase = self.phase.load(Ordering::Relaxed);
                n += 1;
                let sent = n.to_be_bytes();
                let mut got = [0u8; 8];
                let ok = stream.write_all(&sent).is_ok()
                    && stream.read_exact(&mut got).is_ok()
                    && got == sent;
                self.record(kind, phase, ok);
                if !ok {
                    return Ok(());
                }
                thread::sleep(PROBE_PAUSE);
            }
            Ok(())
        });
        if !matches!(ran, Ok(Ok(()))) {
            self.record(kind, self.phase.load(Ordering::Relaxed), false);
        }
    }

    /// `from` connects to `server`'s `port`, and `server` pushes a counter over it until
    /// stopped; every message `from` receives in order is recorded as passed, a silence of
    /// [`STREAM_TIMEOUT`] or a gap as failed (once).
    fn push_stream(&self, lab: &Lab, kind: &'static str, from: &str, server: &str, port: u16) {
        let Ok(server_addr) = lab.host(server).map(|h| SocketAddr::new(h.v4.into(), port)) else {
            self.record(kind, 0, false);
            return;
        };
        let (bound_tx, bound_rx) = mpsc::channel();
        thread::scope(|scope| {
            scope.spawn(|| {
                let _ = lab.in_host(server, || {
                    let listener = match TcpListener::bind(server_addr) {
                        Ok(listener) => listener,
                        Err(error) => {
                            let _ = bound_tx.send(Err(error));
                            return;
                        }
                    };
                    let _ = bound_tx.send(Ok(()));
                    let Ok((mut stream, _)) = listener.accept() else {
                        return;
                    };
                    let _ = stream.set_write_timeout(Some(STREAM_TIMEOUT));
                    let mut n = 0u64;
                    while self.running() {
                        n += 1;
                        if stream.write_all(&n.to_be_bytes()).is_err() {
                            return;
                        }
                        thread::sleep(PROBE_PAUSE);
                    }
                });
            });
            if !matches!(bound_rx.recv(), Ok(Ok(()))) {
                self.record(kind, 0, false);
                return;
            }
            let ran = lab.in_host(from, || -> std::io::Result<()> {
                let mut stream = TcpStream::connect_timeout(&server_addr, STREAM_TIMEOUT)?;
                stream.set_read_timeout(Some(STREAM_TIMEOUT))?;
                let mut expected = 1u64;
                while self.running() {
                    let phase = self.phase.load(Ordering::Relaxed);
                    let mut got = [0u8; 8];
                    let ok =
                        stream.read_exact(&mut got).is_ok() && u64::from_be_bytes(got) == expected;
                    // Stopping closes the server's end: not a failure.
                    if !self.running() {
                        break;
                    }
                    self.record(kind, phase, ok);
                    if !ok {
                        break;
                    }
                    expected += 1;
                }
                Ok(())
            });
            if !matches!(ran, Ok(Ok(()))) {
                self.record(kind, self.phase.load(Ordering::Relaxed), false);
            }
            // The server may still wait in accept when the client never connected.
            let _ = lab.in_host(server, || {
                TcpStream::connect_timeout(&server_addr, Duration::from_millis(100))
            });
        });
    }

    /// Checks the outcomes: in every phase, every allowed kind passed at least once and never
    /// failed, every denied kind was tried and never passed. Prints the tally either way.
    fn verdict(&self, phases: usize) -> Result<()> {
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        let mut problems = Vec::new();
        let mut table = String::new();
        for (phase, name) in PHASES.iter().enumerate().take(phases) {
            for kind in ALLOWED_KINDS.iter().chain(&DENIED_KINDS) {
                let seen: Vec<&Outcome> = outcomes
                    .iter()
                    .filter(|o| o.phase == phase && o.kind == *kind)
                    .collect();
                let passed = seen.iter().filter(|o| o.passed).count();
                let blocked = seen.len() - passed;
                table.push_str(&format!(
                    "  {name:16} {kind:52} passed {passed:4}  blocked {blocked:4}\n"
                ));
                if ALLOWED_KINDS.contains(kind) {
                    if blocked > 0 {
                        problems.push(format!("{name}: {kind} (allowed) failed {blocked} times"));
                    }
                    if passed == 0 {
                        problems.push(format!("{name}: {kind} (allowed) never went through"));
                    }
                } else {
                    if passed > 0 {
                        problems.push(format!("{name}: {kind} (denied) passed {passed} times"));
                    }
                    if blocked == 0 {
                        problems.push(format!("{name}: {kind} (denied) was never tried"));
                    }
                }
            }
        }
        eprintln!("traffic during the test:\n{table}");
        ensure!(problems.is_empty(), "{}\n{table}", problems.join("\n"));
        Ok(())
    }
}

/// Runs the allowed and denied traffic on `lab` until `steps` returns, then checks it.
fn with_traffic(
    lab: &Lab,
    phases: usize,
    steps: impl FnOnce(&Traffic) -> Result<()>,
) -> Result<()> {
    let pacs = lab.host(PACS)?.clone();
    let pacs_v4 = IpAddr::from(pacs.v4);
    let traffic = Traffic::new();
    let result = thread::scope(|scope| {
        scope.spawn(|| {
            traffic.repeat(ALLOWED_KINDS[0], || {
                lab.tcp_connect(RADIOLOGY_WS, pacs_v4, 104, ALLOWED_TIMEOUT)
            })
        });
        scope.spawn(|| {
            traffic.repeat(ALLOWED_KINDS[1], || {
                lab.udp_probe(NOC, pacs_v4, 161, ALLOWED_TIMEOUT)
            })
        });
        scope.spawn(|| {
            traffic.echo_stream(
                lab,
                ALLOWED_KINDS[2],
                RADIOLOGY_WS,
                SocketAddr::new(pacs_v4, 104),
            )
        });
        scope.spawn(|| traffic.push_stream(lab, ALLOWED_KINDS[3], PACS, RADIOLOGY_WS, PUSH_PORT));
        scope.spawn(|| {
            traffic.repeat(DENIED_KINDS[0], || {
                lab.tcp_connect(LAB_WS, pacs_v4, 104, DENIED_TIMEOUT)
            })
        });
        scope.spawn(|| {
            traffic.repeat(DENIED_KINDS[1], || {
                lab.udp_probe(LAB_WS, pacs_v4, 161, DENIED_TIMEOUT)
            })
        });
        // Every kind under way before the first phase counts.
        thread::sleep(PHASE);
        let result = steps(&traffic);
        traffic.stop.store(true, Ordering::Relaxed);
        result
    });
    result?;
    traffic.verdict(phases)
}

fn enter_phase(traffic: &Traffic, phase: usize) {
    traffic.phase.store(phase, Ordering::Relaxed);
    eprintln!("phase: {}", PHASES[phase]);
}

/// Packets the kernel judged for a segment pair, by action, from a daemon's `/metrics`.
fn judged(metrics: &Metrics, from: &str, to: &str, action: &str) -> f64 {
    metrics.sum(
        "enforcer_policy_verdicts_total",
        &[
            ("source_segment", from),
            ("destination_segment", to),
            ("action", action),
        ],
    )
}

/// The kernel's count agrees with the probes': nothing from radiology or world (noc) to pacs was
/// dropped, and (unless a policy in between allowed some of it) nothing from lab to pacs was
/// forwarded.
fn check_kernel_verdicts(enforcer: &Enforcer<'_>, lab_was_allowed_some: bool) -> Result<()> {
    let metrics = enforcer.metrics()?;
    for from in ["radiology", "world"] {
        ensure!(
            judged(&metrics, from, "pacs", "dropped") == 0.0,
            "the kernel dropped packets from {from} to pacs:\n{metrics}"
        );
        ensure!(
            judged(&metrics, from, "pacs", "forwarded") > 0.0,
            "the kernel counted nothing from {from} to pacs:\n{metrics}"
        );
    }
    ensure!(
        lab_was_allowed_some
            || judged(&metrics, "lab", "pacs", "forwarded") == 0.0
                && judged(&metrics, "lab", "pacs", "audit") == 0.0,
        "the kernel let packets from lab to pacs through:\n{metrics}"
    );
    ensure!(
        judged(&metrics, "lab", "pacs", "dropped") > 0.0,
        "the kernel counted no dropped packets from lab to pacs:\n{metrics}"
    );
    Ok(())
}

fn attachments(lab: &Lab) -> Result<Vec<String>> {
    Ok(lab.bpf_attachments(PACS, "eth0")?)
}

/// After `enforcer detach`: nothing on the interface, no pins, and lab-ws reaches pacs again.
fn check_detached(lab: &Lab, pins: &PinGuard<'_>, output: &str) -> Result<()> {
    ensure!(
        output.contains("XDP link") && output.contains("TC egress") && output.contains("removed"),
        "enforcer detach does not say what it removed:\n{output}"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left = attachments(lab)?;
        if left.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "still attached after enforcer detach: {left:#?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        !pins.dir.exists(),
        "the pin directory {} is still there",
        pins.dir.display()
    );
    let pacs = IpAddr::from(lab.host(PACS)?.v4);
    ensure!(
        lab.tcp_connect(LAB_WS, pacs, 104, ALLOWED_TIMEOUT),
        "lab-ws still cannot reach pacs tcp/104 after enforcer detach"
    );
    let again = pins.detach()?;
    ensure!(
        again.contains("nothing to detach"),
        "a second enforcer detach should be a no-op:\n{again}"
    );
    Ok(())
}

#[test]
fn enforcement_survives_sigkill_and_a_new_daemon_adopts_it_without_a_gap() -> Result<()> {
    init_test();
    let lab = lab()?;
    let _services = lab.serve(PACS, &[104], &[161])?;
    let pins = PinGuard::new(&lab, PACS)?;
    let policy = example_policy_dir();
    let metrics_addr = "127.0.0.1:19491";
    let first = start_persistent(&lab, &pins, &policy, metrics_addr)?;
    ensure!(
        first.wait_for_log(
            "pinned maps, programs and attachments",
            Duration::from_secs(1)
        ),
        "the first daemon does not say it pinned:\n{}",
        first.stderr()
    );
    let mut second = None;
    let mut gap = (SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH);
    with_traffic(&lab, 3, |traffic| {
        enter_phase(traffic, 0);
        thread::sleep(PHASE);

        enter_phase(traffic, 1);
        gap.0 = SystemTime::now();
        first.kill()?;
        let attached = attachments(&lab)?;
        ensure!(
            // Program names are cut to 15 characters by the kernel.
            attached
                .iter()
                .any(|a| a.starts_with("xdp:") && a.contains("enforcer_xdp"))
                && attached.iter().any(|a| a.contains("enforcer_tc_eg")),
            "after SIGKILL the programs should stay attached: {attached:#?}"
        );
        thread::sleep(PHASE);

        let adopting = start_persistent(&lab, &pins, &policy, metrics_addr)?;
        gap.1 = SystemTime::now();
        enter_phase(traffic, 2);
        ensure!(
            adopting.wait_for_log("adopted the pinned enforcer", Duration::from_secs(1))
                && adopting.wait_for_log("unchanged, kept", Duration::from_secs(1))
                && adopting.wait_for_log("program replaced in place", Duration::from_secs(1)),
            "the new daemon did not adopt the pinned enforcer:\n{}",
            adopting.stderr()
        );
        thread::sleep(PHASE);
        second = Some(adopting);
        Ok(())
    })?;
    let second = second.context("no adopting daemon")?;
    // The adopted maps carry the counts of the whole test: both daemons and the gap.
    check_kernel_verdicts(&second, false)?;
    // Denials the kernel reported while no daemon read its event ring are delivered by the
    // adopting daemon, with the names of the policy in force.
    let flows = second.http_get(
        "/flows?follow=false&verdict=deny&from=lab&to=pacs",
        Duration::from_secs(5),
    )?;
    let in_gap = flows
        .lines()
        .filter_map(|line| serde_json::from_str::<FlowEvent>(line).ok())
        .filter(|event| {
            event
                .system_time()
                .is_some_and(|time| gap.0 < time && time < gap.1)
        })
        .count();
    ensure!(
        in_gap > 0,
        "no denial from lab to pacs reported for the time no daemon ran:\n{flows}"
    );
    // The running daemon holds the directory: detaching under it is refused.
    let refused = lab.enforcer_command(PACS, &["detach", &pins.arg()])?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success() && stderr.contains("stop it first"),
        "enforcer detach must refuse while a daemon runs ({}):\n{stderr}",
        refused.status
    );

    // SIGTERM with --persist: the programs stay, and so does enforcement.
    second.stop_all()?;
    let pacs = IpAddr::from(lab.host(PACS)?.v4);
    ensure!(
        !lab.tcp_connect(LAB_WS, pacs, 104, DENIED_TIMEOUT)
            && lab.tcp_connect(RADIOLOGY_WS, pacs, 104, ALLOWED_TIMEOUT),
        "after SIGTERM with --persist the policy should stay in force"
    );
    let output = pins.detach()?;
    eprintln!("enforcer detach:\n{output}");
    check_detached(&lab, &pins, &output)
}

/// A copy of the example policy in a fresh directory, removed on drop.
struct PolicyCopy(PathBuf);

impl PolicyCopy {
    fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("msl-persist-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(example_policy_dir())? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::copy(entry.path(), dir.join(entry.file_name()))?;
            }
        }
        Ok(PolicyCopy(dir))
    }
}

impl Drop for PolicyCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn an_upgrade_with_a_changed_and_larger_policy_takes_over_without_a_gap() -> Result<()> {
    init_test();
    let lab = lab()?;
    let _services = lab.serve(PACS, &[104, 11112], &[161])?;
    let pins = PinGuard::new(&lab, PACS)?;
    let policy = PolicyCopy::new("grow")?;
    let metrics_addr = "127.0.0.1:19492";
    let pacs = IpAddr::from(lab.host(PACS)?.v4);
    let first = start_persistent(&lab, &pins, &policy.0, metrics_addr)?;
    ensure!(
        !lab.tcp_connect(LAB_WS, pacs, 11112, DENIED_TIMEOUT),
        "lab-ws reached pacs tcp/11112 before the policy allowed it"
    );
    let mut second = None;
    with_traffic(&lab, 3, |traffic| {
        enter_phase(traffic, 0);
        thread::sleep(PHASE);

        // Stopped for an upgrade: SIGTERM leaves everything in place with --persist.
        enter_phase(traffic, 1);
        first.stop_all()?;
        // The new version's policy: lab may use DICOM TLS on pacs, and 200 new segments, far
        // more prefixes than the pinned maps were sized for.
        let pacs_yaml = policy.0.join("pacs.yaml");
        let text = fs::read_to_string(&pacs_yaml)?;
        let opened = text.replacen(
            "allow:\n",
            "allow:\n  - from: [lab]\n    ports: [tcp/11112]\n    reason: results over DICOM TLS\n",
            1,
        );
        ensure!(opened != text, "pacs.yaml has no `allow:` to extend");
        fs::write(&pacs_yaml, opened)?;
        // Twenty /24s each: more prefixes than the address maps have room for, sized for the
        // first policy's subnets address by address.
        for n in 0..200u32 {
            let members: Vec<String> = (n * 20..n * 20 + 20)
                .map(|i| format!("172.{}.{}.0/24", 16 + i / 256, i % 256))
                .collect();
            fs::write(
                policy.0.join(format!("ward-{n}.yaml")),
                format!(
                    "segment: ward-{n}\nmembers: [{}]\nmode: enforce\n",
                    members.join(", ")
                ),
            )?;
        }
        thread::sleep(PHASE);

        let adopting = start_persistent(&lab, &pins, &policy.0, metrics_addr)?;
        enter_phase(traffic, 2);
        ensure!(
            adopting.wait_for_log("adopted the pinned enforcer", Duration::from_secs(1))
                && adopting.wait_for_log("changed, switched atomically", Duration::from_secs(1))
                && adopting.wait_for_log("ADDR_V4_0", Duration::from_secs(1)),
            "the new daemon did not adopt, resize and switch:\n{}",
            adopting.stderr()
        );
        ensure!(
            lab.tcp_connect(LAB_WS, pacs, 11112, ALLOWED_TIMEOUT),
            "the adopting daemon's policy (lab -> pacs tcp/11112) is not in force"
        );
        // The wards' 4,000 /24s are a million addresses, too many for the host table: they go
        // in as blocks, and the block table pinned for the first policy had no room for them.
        // It is replaced by a larger one that the new policy uses, as a fresh start would,
        // rather than leaving every ward address to the trie walk.
        let metrics = adopting.metrics()?;
        let blocks = metrics.sum("enforcer_bpf_map_pressure", &[("map_name", "BLOCKS_V4_0")]);
        ensure!(
            adopting.wait_for_log("BLOCKS_V4_0", Duration::from_secs(1)) && blocks > 0.0,
            "the adopting daemon did not resize the block table and use it (pressure {blocks}):\n{}\n{metrics}",
            adopting.stderr()
        );
        thread::sleep(PHASE);
        // The first reload after adoption: back to the original rules for pacs.
        fs::copy(example_policy_dir().join("pacs.yaml"), &pacs_yaml)?;
        adopting.reload()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while lab.tcp_connect(LAB_WS, pacs, 11112, DENIED_TIMEOUT) {
            ensure!(
                Instant::now() < deadline,
                "the reload after adoption did not close lab -> pacs tcp/11112:\n{}",
                adopting.stderr()
            );
        }
        thread::sleep(PHASE);
        second = Some(adopting);
        Ok(())
    })?;
    // Counts of the adopting daemon's policies (the first one's generation has no names here).
    let second = second.context("no adopting daemon")?;
    check_kernel_verdicts(&second, true)?;
    drop(second);
    let output = pins.detach()?;
    check_detached(&lab, &pins, &output)
}

#[test]
fn a_pinned_enforcer_with_another_map_layout_is_refused_and_stays_in_force() -> Result<()> {
    init_test();
    let lab = lab()?;
    let _services = lab.serve(PACS, &[104], &[])?;
    let pins = PinGuard::new(&lab, PACS)?;
    let policy = example_policy_dir();
    let pacs = IpAddr::from(lab.host(PACS)?.v4);
    start_persistent(&lab, &pins, &policy, "127.0.0.1:19493")?.stop_all()?;
    let ours = format!("layout-v{}", enforcer_common::MAP_LAYOUT_VERSION);
    fs::rename(pins.dir.join(&ours), pins.dir.join("layout-v999"))
        .context("pretending the pins come from another version")?;
    let refused = match start_persistent(&lab, &pins, &policy, "127.0.0.1:19493") {
        Ok(_) => bail!("a daemon adopted maps of another layout"),
        Err(error) => error.to_string(),
    };
    ensure!(
        refused.contains("layout version 999") && refused.contains("enforcer detach"),
        "the refusal does not explain itself:\n{refused}"
    );
    ensure!(
        !lab.tcp_connect(LAB_WS, pacs, 104, DENIED_TIMEOUT)
            && lab.tcp_connect(RADIOLOGY_WS, pacs, 104, ALLOWED_TIMEOUT),
        "the pinned enforcer should stay in force when a daemon refuses to adopt it"
    );
    let output = pins.detach()?;
    check_detached(&lab, &pins, &output)
}

#[test]
fn without_persist_sigterm_detaches_everything() -> Result<()> {
    init_test();
    let lab = lab()?;
    let _services = lab.serve(PACS, &[104], &[])?;
    let pacs = IpAddr::from(lab.host(PACS)?.v4);
    let enforcer = lab.start_enforcer_with(
        PACS,
        &example_policy_dir(),
        &["--metrics-addr", "127.0.0.1:19494"],
    )?;
    let attached = attachments(&lab)?;
    ensure!(
        attached.iter().any(|a| a.contains("enforcer_xdp"))
            && attached.iter().any(|a| a.contains("enforcer_tc_eg")),
        "the daemon is not attached: {attached:#?}"
    );
    ensure!(
        !lab.tcp_connect(LAB_WS, pacs, 104, DENIED_TIMEOUT),
        "lab-ws reached pacs tcp/104 while enforced"
    );
    enforcer.stop_all()?;
    let left = attachments(&lab)?;
    ensure!(left.is_empty(), "still attached after SIGTERM: {left:#?}");
    ensure!(
        lab.tcp_connect(LAB_WS, pacs, 104, ALLOWED_TIMEOUT),
        "lab-ws cannot reach pacs tcp/104 after the daemon detached"
    );
    Ok(())
}
