//! End-to-end monitor mode: one daemon (a gateway) judges an enforced segment and a monitored
//! one with real traffic. Audited flows pass, and are streamed to the flow log with verdict
//! `audit` and counted in `enforcer_policy_verdicts_total{action="audit"}`; denied flows are
//! dropped. Then the rollout loop on that very flow log: `impact` names the flows enforcing
//! would deny, `suggest` proposes the rules, and the daemon, reloaded with the suggestion and the
//! segment enforced, admits the suggested flows by the new rule and drops the rest.
//!
//! Needs root, a kernel with XDP and TC, and `ping`; set `ENFORCER_BIN` or build the daemon
//! (`cargo build -p enforcer`) first.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use policy_compiler::flow_log::ObservedFlows;
use policy_compiler::impact::Impact;
use policy_compiler::suggest::{SuggestedSource, Suggestion};
use policy_compiler::{Flow, Mode, Policy, Verdict};
use serde_json::Value;
use vm_tests::lab::{Enforcer, HostSpec, Lab, Metrics};
use vm_tests::lab::{example_policy_dir, init_test};

const MONITORED: &str = "icu-telemetry";
const METRICS_ADDR: &str = "127.0.0.1:19481";
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A denied probe gets no second chance; this is how long it may try.
const DENIED_TIMEOUT: Duration = Duration::from_millis(600);
/// Events reach the flow log within about a second (the writer flushes at least every second).
const LOGGED_WITHIN: Duration = Duration::from_secs(10);
const RELOAD_WITHIN: Duration = Duration::from_secs(15);
/// Small enough that the log rotates during the test: `impact` and `suggest` read every file.
const FLOW_LOG_MAX_BYTES: &str = "1500";

/// Audited today (no rule of icu-telemetry allows them), suggested, then allowed.
const AUDITED_TCP: u16 = 5432;
const AUDITED_UDP: u16 = 514;
/// Never sent before the switch: not suggested, so denied once icu-telemetry is enforced.
const UNOBSERVED_TCP: u16 = 22;
/// pacs is enforced: radiology may use DICOM, not SSH.
const ALLOWED_TCP: u16 = 104;
const DENIED_TCP: u16 = 22;

/// A scratch directory removed when the test ends, also on failure.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_policy(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        let is_policy = path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml");
        if path.is_file() && is_policy {
            std::fs::copy(&path, to.join(path.file_name().context("file name")?))?;
        }
    }
    Ok(())
}

/// The flow log and its rotated files, oldest first.
fn flow_log_files(log: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..=20)
        .rev()
        .map(|n| PathBuf::from(format!("{}.{n}", log.display())))
        .filter(|path| path.exists())
        .collect();
    if log.exists() {
        files.push(log.to_path_buf());
    }
    files
}

fn logged_events(log: &Path) -> Vec<Value> {
    flow_log_files(log)
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .collect::<Vec<Value>>()
        })
        .collect()
}

/// What an awaited event is, and how to recognise it.
type Wanted<'a> = (&'a str, &'a dyn Fn(&Value) -> bool);

/// Waits until every `wanted` predicate matches some logged event; the events either way.
fn wait_for_events(log: &Path, wanted: &[Wanted<'_>]) -> Result<Vec<Value>> {
    let deadline = Instant::now() + LOGGED_WITHIN;
    loop {
        let events = logged_events(log);
        let missing: Vec<&str> = wanted
            .iter()
            .filter(|(_, matches)| !events.iter().any(*matches))
            .map(|(what, _)| *what)
            .collect();
        if missing.is_empty() {
            return Ok(events);
        }
        if Instant::now() >= deadline {
            bail!(
                "not in the flow log within {LOGGED_WITHIN:?}: {missing:?}; logged:\n{}",
                events
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn event_matches(event: &Value, src: IpAddr, dst: IpAddr, proto: &str, verdict: &str) -> bool {
    event["src"] == src.to_string()
        && event["dst"] == dst.to_string()
        && event["proto"] == proto
        && event["verdict"] == verdict
}

fn metrics_until(
    enforcer: &Enforcer<'_>,
    within: Duration,
    check: impl Fn(&Metrics) -> bool,
) -> Result<(bool, Metrics)> {
    let deadline = Instant::now() + within;
    loop {
        let metrics = enforcer.metrics()?;
        if check(&metrics) || Instant::now() >= deadline {
            return Ok((check(&metrics), metrics));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn verdicts(metrics: &Metrics, src: &str, dst: &str, action: &str) -> f64 {
    metrics.sum(
        "enforcer_policy_verdicts_total",
        &[
            ("source_segment", src),
            ("destination_segment", dst),
            ("direction", "ingress"),
            ("action", action),
        ],
    )
}

fn ping(lab: &Lab, from: &str, to: IpAddr) -> Result<bool> {
    let status = lab
        .command(from, "ping")?
        .args(["-c", "1", "-W", "2", &to.to_string()])
        .output()
        .context("running ping (iputils-ping)")?;
    Ok(status.status.success())
}

fn expect_verdict(policy: &Policy, src: IpAddr, dst: IpAddr, proto: u8, port: u16, want: Verdict) {
    let decision = policy.evaluate(&Flow {
        src,
        dst,
        proto,
        port: Some(port),
    });
    assert_eq!(
        decision.verdict, want,
        "{src} -> {dst} proto {proto} port {port}: {}",
        decision.reason
    );
}

#[test]
fn monitored_and_enforced_segments_on_one_enforcer_then_suggest_and_enforce() -> Result<()> {
    init_test();
    let scratch = Scratch(std::env::temp_dir().join(format!("msl-monitor-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    let policy_dir = scratch.0.join("segments");
    copy_policy(&example_policy_dir(), &policy_dir).context("copying the example policy")?;
    let log = scratch.0.join("flows.jsonl");
    let policy = Policy::load_dir(&policy_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(
        policy.segment(MONITORED).map(|s| s.mode) == Some(Mode::Monitor)
            && policy.segment("pacs").map(|s| s.mode) == Some(Mode::Enforce),
        "the example policy no longer monitors {MONITORED} and enforces pacs"
    );

    let hosts = [
        HostSpec::clinical("radiology", "radiology", 10),
        HostSpec::clinical("pacs", "pacs", 10),
        HostSpec::clinical("pharmacy", "pharmacy", 10),
        HostSpec::clinical("icu", MONITORED, 10),
    ];
    let lab = Lab::new(&hosts).context("building the lab")?;
    let ip = |name: &str| -> Result<IpAddr> { Ok(lab.host(name)?.v4.into()) };
    let (radiology, pacs, pharmacy, icu) =
        (ip("radiology")?, ip("pacs")?, ip("pharmacy")?, ip("icu")?);
    expect_verdict(&policy, pharmacy, icu, 6, AUDITED_TCP, Verdict::Audit);
    expect_verdict(&policy, pharmacy, icu, 17, AUDITED_UDP, Verdict::Audit);
    expect_verdict(&policy, pharmacy, icu, 1, 8, Verdict::Audit);
    expect_verdict(&policy, pharmacy, icu, 6, UNOBSERVED_TCP, Verdict::Audit);
    expect_verdict(&policy, radiology, pacs, 6, ALLOWED_TCP, Verdict::Allow);
    expect_verdict(&policy, radiology, pacs, 6, DENIED_TCP, Verdict::Deny);

    let _icu_services = lab.serve("icu", &[AUDITED_TCP, UNOBSERVED_TCP], &[AUDITED_UDP])?;
    let _pacs_services = lab.serve("pacs", &[ALLOWED_TCP, DENIED_TCP], &[])?;
    let ports = lab.router_ports();
    let port_refs: Vec<&str> = ports.iter().map(String::as_str).collect();
    let log_arg = log.display().to_string();
    let gateway = lab
        .start_router_enforcer_with(
            &port_refs,
            &policy_dir,
            &[
                "--metrics-addr",
                METRICS_ADDR,
                "--report-allowed",
                "--flow-log",
                &log_arg,
                "--flow-log-max-bytes",
                FLOW_LOG_MAX_BYTES,
                "--flow-log-keep",
                "20",
            ],
        )
        .context("starting the gateway daemon")?;

    // One enforcer, two modes: audited flows pass, the denied one is dropped.
    ensure!(
        lab.tcp_connect("pharmacy", icu, AUDITED_TCP, PROBE_TIMEOUT),
        "pharmacy -> icu tcp/{AUDITED_TCP} did not pass, though icu-telemetry is monitored"
    );
    ensure!(
        lab.udp_probe("pharmacy", icu, AUDITED_UDP, PROBE_TIMEOUT),
        "pharmacy -> icu udp/{AUDITED_UDP} did not pass, though icu-telemetry is monitored"
    );
    ensure!(
        ping(&lab, "pharmacy", icu)?,
        "pharmacy could not ping icu (monitored)"
    );
    ensure!(
        lab.tcp_connect("radiology", pacs, ALLOWED_TCP, PROBE_TIMEOUT),
        "radiology -> pacs tcp/{ALLOWED_TCP} is allowed but did not connect"
    );
    ensure!(
        !lab.tcp_connect("radiology", pacs, DENIED_TCP, DENIED_TIMEOUT),
        "radiology -> pacs tcp/{DENIED_TCP} connected, though pacs is enforced"
    );

    let audit_tcp = |e: &Value| {
        event_matches(e, pharmacy, icu, "tcp", "audit")
            && e["dport"] == AUDITED_TCP
            && e["reason"] == "audit"
            && e["src_segment"] == "pharmacy"
            && e["dst_segment"] == MONITORED
            && e["rule"].is_null()
            && e["revision"] == policy.revision()
    };
    let audit_udp =
        |e: &Value| event_matches(e, pharmacy, icu, "udp", "audit") && e["dport"] == AUDITED_UDP;
    let audit_ping =
        |e: &Value| event_matches(e, pharmacy, icu, "icmp", "audit") && e["icmp_type"] == 8;
    let denied = |e: &Value| {
        event_matches(e, radiology, pacs, "tcp", "deny")
            && e["dport"] == DENIED_TCP
            && e["reason"] == "policy_denied"
            && e["dst_segment"] == "pacs"
    };
    let allowed = |e: &Value| {
        event_matches(e, radiology, pacs, "tcp", "allow")
            && e["dport"] == ALLOWED_TCP
            && e["rule"] == "pacs/1"
    };
    wait_for_events(
        &log,
        &[
            ("audit tcp", &audit_tcp),
            ("audit udp", &audit_udp),
            ("audit icmp", &audit_ping),
            ("deny tcp", &denied),
            ("allow tcp", &allowed),
        ],
    )?;
    let (counted, metrics) = metrics_until(&gateway, LOGGED_WITHIN, |m| {
        verdicts(m, "pharmacy", MONITORED, "audit") >= 3.0
            && verdicts(m, "radiology", "pacs", "dropped") >= 1.0
    })?;
    ensure!(
        counted,
        "enforcer_policy_verdicts_total: expected >= 3 audit (pharmacy -> {MONITORED}) and >= 1 \
         dropped (radiology -> pacs):\n{metrics}"
    );
    ensure!(
        verdicts(&metrics, "pharmacy", MONITORED, "dropped") == 0.0,
        "a flow to the monitored segment was dropped:\n{metrics}"
    );

    // The rollout loop on that flow log (rotated on the way: every file is read).
    let files = flow_log_files(&log);
    ensure!(files.len() >= 2, "the flow log did not rotate: {files:?}");
    let observed = ObservedFlows::read_files(&files).context("reading the flow log")?;
    ensure!(
        observed.unreadable_count == 0,
        "unreadable flow log lines: {:?}",
        observed.unreadable
    );
    let impact = Impact::of(&policy, "segments", &observed);
    let impact_rows: Vec<(String, String, String)> = impact
        .segments
        .iter()
        .flat_map(|segment| {
            segment
                .flows
                .iter()
                .map(|flow| (flow.to.clone(), flow.from.clone(), flow.traffic.clone()))
        })
        .collect();
    let row = |traffic: String| (MONITORED.to_string(), "pharmacy".to_string(), traffic);
    ensure!(
        impact_rows
            == [
                row(format!("tcp/{AUDITED_TCP}")),
                row(format!("udp/{AUDITED_UDP}")),
                row("icmp/echo-request".into())
            ],
        "impact of enforcing {MONITORED}:\n{}",
        impact.to_table()
    );

    let suggestion = Suggestion::for_segment(&policy, "segments", &observed, MONITORED)
        .context("suggesting rules")?;
    let yaml = suggestion.to_yaml();
    ensure!(
        suggestion.rules.len() == 1
            && suggestion.rules[0].from == [SuggestedSource::Segment("pharmacy".into())],
        "unexpected suggestion:\n{yaml}"
    );
    for (proto, port) in [(6, AUDITED_TCP), (17, AUDITED_UDP), (1, 8)] {
        ensure!(
            suggestion.flows.contains(&Flow {
                src: pharmacy,
                dst: icu,
                proto,
                port: Some(port),
            }),
            "proto {proto} port {port} is not suggested:\n{yaml}"
        );
    }

    eprintln!(
        "{} events in {} flow log files\n{}\n{yaml}",
        observed.events,
        files.len(),
        impact.to_table()
    );

    // Paste the suggestion at the end of icu-telemetry's allow list and enforce the segment.
    let file = policy_dir.join(format!("{MONITORED}.yaml"));
    let original = std::fs::read_to_string(&file)?;
    ensure!(
        original
            .trim_end()
            .ends_with("reason: EHR availability checks (ping)"),
        "{MONITORED}.yaml no longer ends with its allow list:\n{original}"
    );
    let edited = format!(
        "{}\n{yaml}",
        original
            .trim_end()
            .replacen("mode: monitor", "mode: enforce", 1)
    );
    std::fs::write(&file, &edited)?;
    let enforced = Policy::load_dir(&policy_dir)
        .map_err(|e| anyhow::anyhow!("the policy with the suggestion:\n{e}\n{edited}"))?;
    expect_verdict(&enforced, pharmacy, icu, 6, AUDITED_TCP, Verdict::Allow);
    expect_verdict(&enforced, pharmacy, icu, 6, UNOBSERVED_TCP, Verdict::Deny);
    gateway.reload().context("SIGHUP")?;
    let (reloaded, _) = metrics_until(&gateway, RELOAD_WITHIN, |m| {
        m.select(
            "enforcer_policy_revision_info",
            &[("revision", enforced.revision())],
        )
        .next()
        .is_some()
    })?;
    ensure!(
        reloaded,
        "the gateway did not load the policy with the suggestion (revision {}):\n{}",
        enforced.revision(),
        gateway.stderr()
    );

    // The suggested flows now pass by the new rule; what was never seen is dropped.
    ensure!(
        lab.tcp_connect("pharmacy", icu, AUDITED_TCP, PROBE_TIMEOUT),
        "pharmacy -> icu tcp/{AUDITED_TCP} is dropped with the suggested rule"
    );
    ensure!(
        lab.udp_probe("pharmacy", icu, AUDITED_UDP, PROBE_TIMEOUT),
        "pharmacy -> icu udp/{AUDITED_UDP} is dropped with the suggested rule"
    );
    ensure!(
        ping(&lab, "pharmacy", icu)?,
        "pharmacy cannot ping icu with the suggested rule"
    );
    ensure!(
        !lab.tcp_connect("pharmacy", icu, UNOBSERVED_TCP, DENIED_TIMEOUT),
        "pharmacy -> icu tcp/{UNOBSERVED_TCP} connected, though it was never suggested and \
         icu-telemetry is enforced"
    );
    let new_rule = enforced
        .evaluate(&Flow {
            src: pharmacy,
            dst: icu,
            proto: 6,
            port: Some(AUDITED_TCP),
        })
        .rule
        .context("no rule allows the suggested flow")?;
    ensure!(
        new_rule == format!("{MONITORED}/3"),
        "allowed by {new_rule}"
    );
    let by_new_rule = |e: &Value| {
        event_matches(e, pharmacy, icu, "tcp", "allow")
            && e["dport"] == AUDITED_TCP
            && e["rule"] == new_rule
            && e["revision"] == enforced.revision()
    };
    let now_denied = |e: &Value| {
        event_matches(e, pharmacy, icu, "tcp", "deny")
            && e["dport"] == UNOBSERVED_TCP
            && e["dst_segment"] == MONITORED
    };
    wait_for_events(
        &log,
        &[
            ("allowed by the suggested rule", &by_new_rule),
            ("tcp/22 denied", &now_denied),
        ],
    )?;

    // Against the new policy nothing in the whole log is impact any more.
    let observed = ObservedFlows::read_files(&flow_log_files(&log))?;
    let impact = Impact::of(&enforced, "segments", &observed);
    ensure!(
        impact.is_empty(),
        "impact after the switch:\n{}",
        impact.to_table()
    );

    let counters = gateway.stop_all().context("stopping the gateway")?;
    ensure!(
        counters.ingress.audit >= 3 && counters.ingress.policy_denied >= 2,
        "gateway counters: {:?}",
        counters.ingress
    );
    Ok(())
}
