//! End-to-end policy reload: the daemon picks up an edited policy directory within seconds,
//! rejects an invalid one while keeping the last good policy, reloads on SIGHUP, and never
//! interrupts an allowed flow while doing so.
//!
//! Needs root and a kernel with XDP; `cargo xtask test` provides both and sets `ENFORCER_BIN`.

use std::{
    fs,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail, ensure};
use policy_compiler::Policy;
use vm_tests::lab::{Enforcer, HostSpec, Lab, Metrics};
use vm_tests::lab::{example_policy_dir, init_test};

/// The promise under test: a changed directory is in force (or rejected) within this time.
const RELOAD_WITHIN: Duration = Duration::from_secs(3);
/// The allowed flow's probes: a dropped SYN is only retransmitted after 1 s, so a probe that
/// connects within this time had none of its packets dropped.
const FLOW_PROBE_TIMEOUT: Duration = Duration::from_millis(900);
const POLL_PROBE_TIMEOUT: Duration = Duration::from_millis(300);
const METRICS_ADDR: &str = "127.0.0.1:19481";

/// A copy of the example policy in a fresh directory, removed on drop. Files are replaced by
/// rename from a staging directory next to it, so the daemon never reads a half-written file.
struct PolicyCopy {
    root: PathBuf,
}

impl PolicyCopy {
    fn new(tag: &str) -> Result<Self> {
        let root = std::env::temp_dir().join(format!("msl-reload-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let copy = Self { root };
        fs::create_dir_all(copy.dir()).context("creating the policy copy")?;
        fs::create_dir_all(copy.staging()).context("creating the staging directory")?;
        let source = example_policy_dir();
        for entry in fs::read_dir(&source).with_context(|| format!("{}", source.display()))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::copy(entry.path(), copy.dir().join(entry.file_name()))
                    .with_context(|| format!("copying {}", entry.path().display()))?;
            }
        }
        Ok(copy)
    }

    fn dir(&self) -> PathBuf {
        self.root.join("segments")
    }

    fn staging(&self) -> PathBuf {
        self.root.join("staging")
    }

    fn read(&self, name: &str) -> Result<String> {
        fs::read_to_string(self.dir().join(name)).with_context(|| format!("reading {name}"))
    }

    /// Replaces `name` atomically; with `mtime`, the new file carries that modification time.
    fn write(&self, name: &str, content: &str, mtime: Option<SystemTime>) -> Result<()> {
        let staged = self.staging().join(name);
        fs::write(&staged, content).with_context(|| format!("staging {name}"))?;
        if let Some(mtime) = mtime {
            fs::File::options()
                .write(true)
                .open(&staged)
                .and_then(|f| f.set_modified(mtime))
                .with_context(|| format!("setting the mtime of {name}"))?;
        }
        fs::rename(&staged, self.dir().join(name)).with_context(|| format!("replacing {name}"))
    }

    fn mtime(&self, name: &str) -> Result<SystemTime> {
        Ok(fs::metadata(self.dir().join(name))?.modified()?)
    }

    fn revision(&self) -> Result<String> {
        let policy = Policy::load_dir(&self.dir())
            .map_err(|e| anyhow::anyhow!("the policy copy is invalid: {e}"))?;
        Ok(policy.revision().to_owned())
    }
}

impl Drop for PolicyCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Polls `/metrics` until `check` accepts it or `timeout` passes; the last snapshot either way.
fn metrics_until(
    enforcer: &Enforcer<'_>,
    timeout: Duration,
    mut check: impl FnMut(&Metrics) -> bool,
) -> Result<(bool, Metrics)> {
    let deadline = Instant::now() + timeout;
    loop {
        let metrics = enforcer.metrics()?;
        if check(&metrics) {
            return Ok((true, metrics));
        }
        if Instant::now() >= deadline {
            return Ok((false, metrics));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `from` connects to `to:port` within `timeout`, trying repeatedly.
fn connects_within(lab: &Lab, from: &str, to: IpAddr, port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if lab.tcp_connect(from, to, port, POLL_PROBE_TIMEOUT) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// Judged lab -> pacs packets dropped, over every policy generation the daemon loaded.
fn lab_to_pacs_dropped(metrics: &Metrics) -> f64 {
    metrics.sum(
        "enforcer_policy_verdicts_total",
        &[
            ("source_segment", "lab"),
            ("destination_segment", "pacs"),
            ("action", "dropped"),
        ],
    )
}

fn reloads(metrics: &Metrics, outcome: &str) -> u64 {
    metrics.sum("enforcer_policy_reload_total", &[("outcome", outcome)]) as u64
}

fn failing(metrics: &Metrics) -> Option<f64> {
    metrics.get("enforcer_policy_reload_failing", &[])
}

/// The revision label of the one `enforcer_policy_revision_info` series.
fn revision_in_force(metrics: &Metrics) -> Option<String> {
    let mut series = metrics.select("enforcer_policy_revision_info", &[]);
    let only = series.next()?;
    if series.next().is_some() || only.value != 1.0 {
        return None;
    }
    only.labels.get("revision").cloned()
}

fn log_lines(enforcer: &Enforcer<'_>, needle: &str) -> usize {
    enforcer
        .stderr()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[test]
fn policy_reloads_on_change_and_sighup_without_interrupting_flows() -> Result<()> {
    init_test();
    let policy = PolicyCopy::new("main")?;
    let original_revision = policy.revision()?;
    let lab = Lab::new(&[
        HostSpec::clinical("pacs", "pacs", 10),
        HostSpec::clinical("lab-ws", "lab", 20),
        HostSpec::clinical("radiology-ws", "radiology", 20),
    ])?;
    let pacs = IpAddr::from(lab.host("pacs")?.v4);
    let _services = lab.serve("pacs", &[104], &[])?;
    let enforcer =
        lab.start_enforcer_with("pacs", &policy.dir(), &["--metrics-addr", METRICS_ADDR])?;
    let metrics = enforcer.metrics()?;
    ensure!(
        revision_in_force(&metrics).as_deref() == Some(original_revision.as_str()),
        "the daemon does not report the copy's revision {original_revision}:\n{metrics}"
    );
    ensure!(
        !lab.tcp_connect("lab-ws", pacs, 104, POLL_PROBE_TIMEOUT),
        "lab-ws reached pacs tcp/104 before any rule allowed it"
    );
    // Counted under the first policy; the reloads below must not lose them.
    let (counted, metrics) =
        metrics_until(&enforcer, RELOAD_WITHIN, |m| lab_to_pacs_dropped(m) >= 1.0)?;
    ensure!(
        counted,
        "the denied lab-ws -> pacs attempt was not counted:\n{metrics}"
    );
    let dropped_before = lab_to_pacs_dropped(&metrics);

    // The allowed flow, probed all along with new connections (each judged by the policy in
    // force at that moment).
    let stop = AtomicBool::new(false);
    let flow_failures = Mutex::new(Vec::new());
    let (result, flow_probes) = thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let started = Instant::now();
            let mut probes = 0u32;
            while !stop.load(Ordering::Relaxed) {
                probes += 1;
                if !lab.tcp_connect("radiology-ws", pacs, 104, FLOW_PROBE_TIMEOUT) {
                    flow_failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(started.elapsed());
                }
                thread::sleep(Duration::from_millis(20));
            }
            probes
        });
        let result = reload_steps(&lab, &enforcer, &policy, pacs, &original_revision);
        stop.store(true, Ordering::Relaxed);
        (result, prober.join())
    });
    let flow_probes = flow_probes.map_err(|_| anyhow::anyhow!("the prober panicked"))?;
    let failures = flow_failures
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    // The steps' own error first: it usually explains a failed probe.
    if let Err(error) = result {
        bail!("{error:#}\n--- daemon log ---\n{}", enforcer.stderr());
    }
    ensure!(
        failures.is_empty(),
        "radiology-ws -> pacs tcp/104 (allowed throughout) failed {} of {flow_probes} times, at \
         {failures:?} into the test",
        failures.len()
    );
    ensure!(
        flow_probes >= 10,
        "only {flow_probes} probes of the allowed flow"
    );
    eprintln!("allowed flow probed {flow_probes} times during the reloads, never failed");
    // The daemon takes the previous policy's segment-pair counts out of the kernel a second
    // after each reload; a counter must not go backwards when it does.
    thread::sleep(Duration::from_millis(1500));
    let metrics = enforcer.metrics()?;
    ensure!(
        lab_to_pacs_dropped(&metrics) >= dropped_before,
        "enforcer_policy_verdicts_total for lab -> pacs dropped went from {dropped_before} to {} \
         across the reloads:\n{metrics}",
        lab_to_pacs_dropped(&metrics)
    );
    enforcer.stop().context("stopping the daemon")?;
    Ok(())
}

fn reload_steps(
    lab: &Lab,
    enforcer: &Enforcer<'_>,
    policy: &PolicyCopy,
    pacs: IpAddr,
    original_revision: &str,
) -> Result<()> {
    // 1. Allow the lab segment DICOM into pacs: picked up by the directory watch.
    let original = policy.read("pacs.yaml")?;
    let first_rule = "  - from: [radiology, ehr-core]\n";
    ensure!(
        original.contains(first_rule),
        "pacs.yaml changed; this test edits its first rule:\n{original}"
    );
    let allowing = original.replacen(first_rule, "  - from: [radiology, ehr-core, lab]\n", 1);
    let edited = Instant::now();
    policy.write("pacs.yaml", &allowing, None)?;
    let new_revision = policy.revision()?;
    ensure!(
        new_revision != original_revision,
        "the edit did not change the revision"
    );
    ensure!(
        connects_within(lab, "lab-ws", pacs, 104, RELOAD_WITHIN),
        "lab-ws could not reach pacs tcp/104 within {RELOAD_WITHIN:?} of allowing it"
    );
    let in_force = edited.elapsed();
    let (ok, metrics) = metrics_until(enforcer, Duration::from_millis(500), |m| {
        reloads(m, "success") == 1
    })?;
    ensure!(
        ok,
        "enforcer_policy_reload_total{{outcome=\"success\"}} is not 1:\n{metrics}"
    );
    ensure!(
        reloads(&metrics, "failure") == 0 && failing(&metrics) == Some(0.0),
        "a valid policy counted as a failed reload:\n{metrics}"
    );
    ensure!(
        revision_in_force(&metrics).as_deref() == Some(new_revision.as_str()),
        "enforcer_policy_revision_info does not show the new revision {new_revision}:\n{metrics}"
    );
    ensure!(
        enforcer
            .stderr()
            .lines()
            .any(|l| l.contains("policy reloaded") && l.contains(&new_revision)),
        "no `policy reloaded` log line with revision {new_revision}"
    );
    // Only the edited file was parsed again; the others came from the daemon's read cache.
    ensure!(
        enforcer
            .stderr()
            .lines()
            .any(|l| l.contains(&new_revision) && l.contains("files_read=1 ")),
        "the reload did not read exactly the one edited file:\n{}",
        enforcer.stderr()
    );
    eprintln!("edit in force after {in_force:?}");

    // 2. A YAML syntax error of the same size (`{` opens a flow mapping that `]` never closes):
    // rejected, and the last good policy stays.
    let broken = allowing.replacen("members: [", "members: {", 1);
    ensure!(
        broken != allowing && broken.len() == allowing.len(),
        "could not break pacs.yaml"
    );
    let written = Instant::now();
    policy.write("pacs.yaml", &broken, None)?;
    let (rejected, metrics) = metrics_until(enforcer, RELOAD_WITHIN, |m| {
        reloads(m, "failure") >= 1 && failing(m) == Some(1.0)
    })?;
    ensure!(
        rejected,
        "an invalid pacs.yaml was not reported as a failed reload within {RELOAD_WITHIN:?}:\n\
         {metrics}"
    );
    let rejected_after = written.elapsed();
    ensure!(
        reloads(&metrics, "success") == 1,
        "the invalid policy counted as a successful reload:\n{metrics}"
    );
    ensure!(
        revision_in_force(&metrics).as_deref() == Some(new_revision.as_str()),
        "the revision in force changed with an invalid policy:\n{metrics}"
    );
    ensure!(
        enforcer.wait_for_log("policy reload rejected", Duration::from_secs(1)),
        "no log line explains the rejected reload"
    );
    ensure!(
        lab.tcp_connect("lab-ws", pacs, 104, FLOW_PROBE_TIMEOUT),
        "lab-ws lost pacs tcp/104 when an invalid policy was rejected"
    );
    eprintln!("invalid policy rejected after {rejected_after:?}");

    // 3. Fix it behind the watcher's back (same names, sizes and mtimes), then SIGHUP: only the
    // signal can have caused the reload.
    let watcher_reloads = log_lines(enforcer, "policy directory changed");
    let broken_mtime = policy.mtime("pacs.yaml")?;
    policy.write("pacs.yaml", &allowing, Some(broken_mtime))?;
    enforcer.reload().context("sending SIGHUP")?;
    let (reloaded, metrics) = metrics_until(enforcer, RELOAD_WITHIN, |m| {
        reloads(m, "success") >= 2 && failing(m) == Some(0.0)
    })?;
    ensure!(
        reloaded,
        "SIGHUP with a fixed policy did not reload within {RELOAD_WITHIN:?}:\n{metrics}"
    );
    // One more watch interval: the watcher must not have seen (or see) the change.
    thread::sleep(Duration::from_millis(1200));
    let metrics = enforcer.metrics()?;
    ensure!(
        reloads(&metrics, "success") == 2
            && log_lines(enforcer, "policy directory changed") == watcher_reloads,
        "expected exactly one reload, by SIGHUP, after the fix:\n{metrics}"
    );
    ensure!(
        log_lines(enforcer, "SIGHUP received") == 1,
        "the daemon did not log the SIGHUP"
    );
    ensure!(
        revision_in_force(&metrics).as_deref() == Some(new_revision.as_str()),
        "after the fix the revision in force is not {new_revision}:\n{metrics}"
    );
    ensure!(
        lab.tcp_connect("lab-ws", pacs, 104, FLOW_PROBE_TIMEOUT),
        "lab-ws lost pacs tcp/104 after the fixed policy was reloaded"
    );
    Ok(())
}
