//! End-to-end break-glass: the real daemon on the pacs server, the real CLI over the control
//! socket, real TCP from an ICU workstation. icu-telemetry may not reach pacs on tcp/104 (DICOM)
//! in the example policy; a grant opens exactly that for its TTL, the kernel cuts the open
//! connection when the grant expires or is revoked, and every step is in the audit log,
//! `/metrics` and the flow log.
//!
//! Needs root and a kernel with XDP; `cargo xtask test` provides both and sets `ENFORCER_BIN`.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::Path,
    process::Output,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use vm_tests::lab::{Enforcer, HostSpec, Lab, Metrics, example_policy_dir, init_test};

const DICOM: u16 = 104;
const DICOM_TLS: u16 = 11112;
const PROBE: Duration = Duration::from_millis(700);
const ICU_WS: &str = "icu-telemetry-ws";

fn run(enforcer: &Enforcer<'_>, args: &[&str]) -> Result<Output> {
    let output = enforcer
        .control_command(args)
        .output()
        .with_context(|| format!("running enforcer {args:?}"))?;
    Ok(output)
}

/// `enforcer ARGS --output json`, which must succeed; its JSON.
fn run_json(enforcer: &Enforcer<'_>, args: &[&str]) -> Result<Value> {
    let output = run(enforcer, &[args, &["--output", "json"]].concat())?;
    ensure!(
        output.status.success(),
        "enforcer {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("enforcer {args:?} printed no JSON"))
}

/// `enforcer ARGS`, which must fail; its stderr.
fn run_refused(enforcer: &Enforcer<'_>, args: &[&str]) -> Result<String> {
    let output = run(enforcer, args)?;
    ensure!(
        !output.status.success(),
        "enforcer {args:?} succeeded: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

fn grants_in_force(enforcer: &Enforcer<'_>) -> Result<usize> {
    let list = run_json(enforcer, &["breakglass", "list"])?;
    Ok(list["grants"].as_array().map_or(0, Vec::len))
}

fn active(metrics: &Metrics) -> Option<f64> {
    metrics.get(
        "enforcer_breakglass_active",
        &[
            ("source_segment", "icu-telemetry"),
            ("destination_segment", "pacs"),
        ],
    )
}

fn events(metrics: &Metrics, action: &str) -> f64 {
    metrics.sum("enforcer_breakglass_events_total", &[("action", action)])
}

/// Polls `/metrics` until `check` accepts it; fails with the last snapshot after `timeout`.
fn wait_metrics(
    enforcer: &Enforcer<'_>,
    timeout: Duration,
    what: &str,
    check: impl Fn(&Metrics) -> bool,
) -> Result<Metrics> {
    let deadline = Instant::now() + timeout;
    loop {
        let metrics = enforcer.metrics()?;
        if check(&metrics) {
            return Ok(metrics);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not seen within {timeout:?}; /metrics: {metrics:?}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// An open TCP connection from the ICU workstation to pacs, and whether it still echoes.
struct Connection(TcpStream);

impl Connection {
    fn open(lab: &Lab, to: SocketAddr) -> Result<Self> {
        let stream = lab
            .in_host(ICU_WS, || TcpStream::connect_timeout(&to, PROBE))?
            .with_context(|| format!("connecting {ICU_WS} -> {to}"))?;
        stream.set_read_timeout(Some(PROBE))?;
        stream.set_write_timeout(Some(PROBE))?;
        Ok(Connection(stream))
    }

    fn echoes(&mut self, payload: &[u8; 8]) -> bool {
        let mut got = [0u8; 8];
        self.0.write_all(payload).is_ok() && self.0.read_exact(&mut got).is_ok() && &got == payload
    }
}

fn audit_records(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the audit log {}", path.display()))?;
    text.lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("audit line {line}")))
        .collect()
}

fn of_kind<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["kind"] == kind).collect()
}

#[test]
fn breakglass_grant_opens_exactly_the_port_until_it_expires_or_is_revoked() -> Result<()> {
    init_test();
    let lab = Lab::new(&[
        HostSpec::clinical("pacs", "pacs", 10),
        HostSpec::clinical(ICU_WS, "icu-telemetry", 20),
    ])?;
    let pacs = lab.host("pacs")?.clone();
    let _services = lab.serve("pacs", &[DICOM, DICOM_TLS], &[])?;
    std::fs::create_dir_all(lab.run_dir())?;
    let flow_log = lab.run_dir().join("pacs-flows.jsonl");
    let flow_log_arg = flow_log.to_string_lossy().into_owned();
    let enforcer = lab.start_enforcer_with(
        "pacs",
        &example_policy_dir(),
        &["--flow-log", &flow_log_arg],
    )?;
    let dicom = SocketAddr::new(pacs.v4.into(), DICOM);
    let connects = |port| lab.tcp_connect(ICU_WS, pacs.v4.into(), port, PROBE);

    ensure!(
        !connects(DICOM),
        "icu-telemetry reached pacs tcp/104 before any grant"
    );

    // Refused requests change nothing.
    let too_long = run_refused(
        &enforcer,
        &[
            "breakglass",
            "grant",
            "--from",
            "icu-telemetry",
            "--to",
            "pacs",
            "--ports",
            "tcp/104",
            "--ttl",
            "5h",
            "--reason",
            "code blue bed 12",
        ],
    )?;
    ensure!(
        too_long.contains("maximum of 4h") && too_long.contains("breakglass.max_ttl"),
        "the refusal must name the maximum and where it is set: {too_long}"
    );
    let unknown = run_refused(
        &enforcer,
        &[
            "breakglass",
            "grant",
            "--from",
            "icu",
            "--to",
            "pacs",
            "--ports",
            "tcp/104",
            "--ttl",
            "3s",
            "--reason",
            "x",
        ],
    )?;
    ensure!(
        unknown.contains("did you mean `icu-telemetry`"),
        "{unknown}"
    );
    let bad_port = run_refused(
        &enforcer,
        &[
            "breakglass",
            "grant",
            "--from",
            "icu-telemetry",
            "--to",
            "pacs",
            "--ports",
            "104",
            "--ttl",
            "3s",
            "--reason",
            "x",
        ],
    )?;
    ensure!(bad_port.contains("tcp/104"), "{bad_port}");
    // A client that may not use the socket gets a clear error.
    let nobody = enforcer
        .control_command(&[
            "breakglass",
            "grant",
            "--from",
            "icu-telemetry",
            "--to",
            "pacs",
            "--ports",
            "tcp/104",
            "--ttl",
            "3s",
            "--reason",
            "x",
        ])
        .uid(65534)
        .gid(65534)
        .output()?;
    let nobody_error = String::from_utf8_lossy(&nobody.stderr);
    ensure!(
        !nobody.status.success() && nobody_error.contains("permission denied"),
        "an unprivileged client: {nobody_error}"
    );
    ensure!(
        grants_in_force(&enforcer)? == 0,
        "a refused request left a grant"
    );
    ensure!(!connects(DICOM), "a refused request opened pacs tcp/104");

    // Granted: exactly tcp/104, for a few seconds.
    let granted = run_json(
        &enforcer,
        &[
            "breakglass",
            "grant",
            "--from",
            "icu-telemetry",
            "--to",
            "pacs",
            "--ports",
            "tcp/104",
            "--ttl",
            "5s",
            "--reason",
            "code blue bed 12",
        ],
    )?;
    let granted_at = Instant::now();
    let id = granted["id"].as_u64().context("the grant prints its id")?;
    ensure!(granted["expires_at"].is_string(), "{granted}");
    ensure!(granted["rule"] == format!("breakglass/{id}"), "{granted}");
    let mut open = Connection::open(&lab, dicom)?;
    ensure!(
        open.echoes(b"study-01"),
        "the granted connection does not echo"
    );
    ensure!(
        connects(DICOM),
        "a second connection on the granted port failed"
    );
    ensure!(!connects(DICOM_TLS), "the grant opened tcp/11112 too");
    let listed = run_json(&enforcer, &["breakglass", "list"])?;
    let listed = &listed["grants"][0];
    ensure!(
        listed["id"] == id && listed["from"] == "icu-telemetry" && listed["to"] == "pacs",
        "{listed}"
    );
    ensure!(
        listed["ports"] == serde_json::json!(["tcp/104"]),
        "{listed}"
    );
    ensure!(
        listed["reason"] == "code blue bed 12" && listed["granted_by"] == "root",
        "{listed}"
    );
    let metrics = enforcer.metrics()?;
    ensure!(
        granted_at.elapsed() < Duration::from_secs(5),
        "too slow to check the grant before its expiry"
    );
    ensure!(
        active(&metrics) == Some(1.0),
        "active: {:?}",
        active(&metrics)
    );
    ensure!(events(&metrics, "grant") == 1.0, "{metrics:?}");

    // Expiry: the kernel cuts the open connection on its own, the daemon cleans up.
    thread::sleep(
        Duration::from_secs(5).saturating_sub(granted_at.elapsed()) + Duration::from_millis(500),
    );
    ensure!(
        !open.echoes(b"study-02"),
        "the connection still echoes after the grant expired"
    );
    ensure!(
        !connects(DICOM),
        "a new connection passed after the grant expired"
    );
    let metrics = wait_metrics(
        &enforcer,
        Duration::from_secs(5),
        "the expiry in /metrics",
        |m| active(m) == Some(0.0) && events(m, "expire") == 1.0,
    )?;
    ensure!(events(&metrics, "use") >= 1.0, "{metrics:?}");
    ensure!(
        grants_in_force(&enforcer)? == 0,
        "the expired grant is still listed"
    );

    // Revocation cuts a connection at once.
    let second = run_json(
        &enforcer,
        &[
            "breakglass",
            "grant",
            "--from",
            "icu-telemetry",
            "--to",
            "pacs",
            "--ports",
            "tcp/104,tcp/11112",
            "--ttl",
            "2m",
            "--reason",
            "transfer of prior studies",
        ],
    )?;
    let second_id = second["id"].as_u64().context("the grant prints its id")?;
    ensure!(
        second_id > id,
        "grant ids are not reused: {second_id} after {id}"
    );
    let mut open = Connection::open(&lab, dicom)?;
    ensure!(
        open.echoes(b"study-03"),
        "the second grant's connection does not echo"
    );
    ensure!(
        connects(DICOM_TLS),
        "the second grant did not open tcp/11112"
    );
    let revoked = run_json(
        &enforcer,
        &[
            "breakglass",
            "revoke",
            &second_id.to_string(),
            "--reason",
            "patient stable",
        ],
    )?;
    ensure!(revoked["flows_cut"].as_u64() >= Some(1), "{revoked}");
    ensure!(
        !open.echoes(b"study-04"),
        "the connection still echoes after the revocation"
    );
    ensure!(
        !connects(DICOM),
        "a new connection passed after the revocation"
    );
    wait_metrics(
        &enforcer,
        Duration::from_secs(3),
        "the revocation in /metrics",
        |m| active(m) == Some(0.0) && events(m, "revoke") == 1.0,
    )?;
    let again = run_refused(&enforcer, &["breakglass", "revoke", &second_id.to_string()])?;
    ensure!(again.contains("no break-glass grant"), "{again}");

    // The audit log has every step, with who and why, and its chain is intact.
    let records = audit_records(&enforcer.files().audit_log)?;
    let grants = of_kind(&records, "breakglass_grant");
    ensure!(grants.len() == 2, "grant records: {grants:?}");
    ensure!(
        grants[0]["id"] == id
            && grants[0]["reason"] == "code blue bed 12"
            && grants[0]["actor"]["user"] == "root"
            && grants[0]["ttl_seconds"] == 5,
        "{}",
        grants[0]
    );
    let uses = of_kind(&records, "breakglass_use");
    ensure!(
        uses.iter()
            .any(|u| u["id"] == id && u["src"] == "10.70.0.20" && u["dport"] == DICOM),
        "use records: {uses:?}"
    );
    ensure!(
        uses.len() == 2,
        "one use record per grant and source: {uses:?}"
    );
    let expired = of_kind(&records, "breakglass_expire");
    ensure!(expired.len() == 1 && expired[0]["id"] == id, "{expired:?}");
    let revokes = of_kind(&records, "breakglass_revoke");
    ensure!(
        revokes.len() == 1
            && revokes[0]["id"] == second_id
            && revokes[0]["revoke_reason"] == "patient stable",
        "{revokes:?}"
    );
    let verify = std::process::Command::new(vm_tests::lab::enforcer_bin()?)
        .args(["audit", "verify"])
        .arg(&enforcer.files().audit_log)
        .output()?;
    ensure!(
        verify.status.success(),
        "audit verify: {}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // The flow log has the use of the grant and the expired packets.
    let counters = enforcer.stop_all()?;
    let flows = std::fs::read_to_string(&flow_log)?;
    let events: Vec<Value> = flows
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    ensure!(
        events.iter().any(|e| e["reason"] == "breakglass"
            && e["rule"] == format!("breakglass/{id}")
            && e["verdict"] == "allow"
            && e["src_segment"] == "icu-telemetry"
            && e["dport"] == DICOM),
        "no use event in the flow log:\n{flows}"
    );
    ensure!(
        events
            .iter()
            .any(|e| e["reason"] == "breakglass_expired" && e["verdict"] == "deny"),
        "no breakglass_expired event in the flow log:\n{flows}"
    );
    ensure!(
        counters.ingress.breakglass >= 4 && counters.ingress.breakglass_expired >= 2,
        "{counters:?}"
    );
    Ok(())
}

/// A copy of the example policy in `dir`, to change during the test.
fn copy_example_policy(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(example_policy_dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "yaml") {
            std::fs::copy(&path, dir.join(path.file_name().unwrap_or_default()))?;
        }
    }
    Ok(())
}

/// Waits until the daemon logs that it reloaded the policy now in `dir`.
fn wait_reloaded(enforcer: &Enforcer<'_>, dir: &Path) -> Result<()> {
    let policy = policy_compiler::Policy::load_dir(dir)
        .map_err(|e| anyhow::anyhow!("the changed policy is invalid: {e}"))?;
    let revision = policy.revision().to_string();
    ensure!(
        enforcer.wait_for_log(&revision, Duration::from_secs(15)),
        "no reload to revision {revision}:\n{}",
        enforcer.stderr()
    );
    Ok(())
}

#[test]
fn grants_survive_a_restart_and_follow_reloads() -> Result<()> {
    init_test();
    let lab = Lab::new(&[
        HostSpec::clinical("pacs", "pacs", 10),
        HostSpec::clinical(ICU_WS, "icu-telemetry", 20),
    ])?;
    let pacs = lab.host("pacs")?.clone();
    let _services = lab.serve("pacs", &[DICOM, DICOM_TLS], &[])?;
    let policy_dir = lab.run_dir().join("policy");
    copy_example_policy(&policy_dir)?;
    let connects = |port| lab.tcp_connect(ICU_WS, pacs.v4.into(), port, PROBE);

    let enforcer = lab.start_enforcer("pacs", &policy_dir)?;
    let lasting = run_json(
        &enforcer,
        &[
            "breakglass",
            "grant",
            "--from",
            "icu-telemetry",
            "--to",
            "pacs",
            "--ports",
            "tcp/104",
            "--ttl",
            "10m",
            "--reason",
            "night shift imaging",
        ],
    )?;
    let lasting_id = lasting["id"].as_u64().context("grant id")?;
    let short = run_json(
        &enforcer,
        &[
            "breakglass",
            "grant",
            "--from",
            "icu-telemetry",
            "--to",
            "pacs",
            "--ports",
            "tcp/11112",
            "--ttl",
            "2s",
            "--reason",
            "one transfer",
        ],
    )?;
    let short_id = short["id"].as_u64().context("grant id")?;
    let audit_log = enforcer.files().audit_log.clone();
    enforcer.stop_all()?;
    thread::sleep(Duration::from_millis(2500));

    // The restarted daemon puts back what is left of the lasting grant; the short one ended
    // while it was stopped.
    let enforcer = lab.start_enforcer("pacs", &policy_dir)?;
    let listed = run_json(&enforcer, &["breakglass", "list"])?;
    let grants = listed["grants"].as_array().context("grants")?;
    ensure!(
        grants.len() == 1 && grants[0]["id"] == lasting_id,
        "{listed}"
    );
    let remaining = grants[0]["remaining_seconds"].as_u64().unwrap_or(0);
    ensure!(
        (500..=597).contains(&remaining),
        "remaining {remaining}s: the TTL counts on while the daemon is stopped"
    );
    ensure!(connects(DICOM), "the restored grant does not open tcp/104");
    ensure!(
        !connects(DICOM_TLS),
        "the grant that expired while stopped is in force"
    );
    let records = audit_records(&audit_log)?;
    let expired = of_kind(&records, "breakglass_expire");
    ensure!(
        expired.len() == 1 && expired[0]["id"] == short_id && expired[0]["while_stopped"] == true,
        "{expired:?}"
    );

    // A reload renumbers the segments (`aaa` sorts first): the grant follows.
    std::fs::write(
        policy_dir.join("aaa.yaml"),
        "segment: aaa\nmembers: [10.1.0.0/24]\n",
    )?;
    wait_reloaded(&enforcer, &policy_dir)?;
    ensure!(
        connects(DICOM),
        "the grant does not open tcp/104 after a reload"
    );

    // A reload that removes the grant's segment revokes the grant.
    // (icu-telemetry becomes icu, in its file and wherever a rule names it.)
    for entry in std::fs::read_dir(&policy_dir)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        if text.contains("icu-telemetry") && !path.ends_with("icu-telemetry.yaml") {
            std::fs::write(&path, text.replace("icu-telemetry", "icu"))?;
        }
    }
    let icu = std::fs::read_to_string(policy_dir.join("icu-telemetry.yaml"))?;
    std::fs::write(
        policy_dir.join("icu.yaml"),
        icu.replace("icu-telemetry", "icu"),
    )?;
    std::fs::remove_file(policy_dir.join("icu-telemetry.yaml"))?;
    wait_reloaded(&enforcer, &policy_dir)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while grants_in_force(&enforcer)? != 0 {
        ensure!(
            Instant::now() < deadline,
            "the orphaned grant is still in force"
        );
        thread::sleep(Duration::from_millis(100));
    }
    ensure!(!connects(DICOM), "tcp/104 is still open without the grant");
    let records = audit_records(&audit_log)?;
    let revoked = of_kind(&records, "breakglass_revoke");
    ensure!(
        revoked.len() == 1
            && revoked[0]["id"] == lasting_id
            && revoked[0]["revoke_reason"]
                .as_str()
                .is_some_and(|r| r.contains("icu-telemetry is not in the policy any more")),
        "{revoked:?}"
    );
    Ok(())
}
