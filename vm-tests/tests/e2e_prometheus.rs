//! A real Prometheus (Debian's `/usr/bin/prometheus`) scrapes the daemon in the daemon's
//! network namespace, with the alert rules of `deploy/kubernetes/monitoring` loaded: a denied
//! connection shows up in Prometheus's query API, every rule evaluates without error on the
//! real series, the violation alert goes pending, and every query of the Grafana dashboard runs.
//!
//! Needs root and a kernel with XDP; `cargo xtask test` provides both and sets `ENFORCER_BIN`.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};
use vm_tests::lab::{HostSpec, Lab};
use vm_tests::lab::{example_policy_dir, init_test};

/// Both listen inside the pacs host's namespace, which is private to this test.
const METRICS_PORT: u16 = 9477;
const PROMETHEUS_PORT: u16 = 9090;
/// The whole scenario must fit in this (the brief: under ~40 s with the lab).
const DEADLINE: Duration = Duration::from_secs(30);
/// The violation: radiology may reach pacs on DICOM and HTTPS only.
const DENIED_PORT: u16 = 22;
const VIOLATIONS: &str = r#"enforcer_policy_verdicts_total{source_segment="radiology",destination_segment="pacs",action="dropped"}"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The PrometheusRule's rule groups as a plain rules file (JSON is YAML), parsed by PyYAML
/// (installed with kubernetes-validate by `cargo xtask setup`).
fn alert_rules() -> Result<String> {
    let path = repo().join("deploy/kubernetes/monitoring/prometheusrule.yaml");
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             print(json.dumps({'groups': yaml.safe_load(open(sys.argv[1]))['spec']['groups']}))",
        ])
        .arg(&path)
        .output()
        .context("running python3 (installed by `cargo xtask setup`)")?;
    ensure!(
        out.status.success(),
        "reading {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).context("rules JSON")
}

/// Every query of the Grafana dashboard, with the segment variables set to "All".
fn dashboard_queries() -> Result<Vec<String>> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => map.iter().for_each(|(key, v)| match v {
                Value::String(expr) if key == "expr" => out.push(expr.clone()),
                _ => walk(v, out),
            }),
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let path = repo().join("deploy/grafana/enforcer-dashboard.json");
    let dashboard: Value = serde_json::from_str(&fs::read_to_string(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let mut queries = Vec::new();
    walk(&dashboard, &mut queries);
    Ok(queries
        .into_iter()
        .map(|q| q.replace("$source", ".*").replace("$destination", ".*"))
        .collect())
}

/// A Prometheus server in a lab host's namespace. Dropping it stops the server and removes its
/// configuration and data, also when the test fails.
struct Prometheus<'lab> {
    lab: &'lab Lab,
    host: String,
    child: Option<Child>,
    dir: PathBuf,
}

impl<'lab> Prometheus<'lab> {
    /// Scrapes `target` every second and evaluates `rules` every second.
    fn start(lab: &'lab Lab, host: &str, target: SocketAddr, rules: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("e2e-prometheus-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data"))?;
        // From here on, Drop removes the directory.
        let mut prometheus = Self {
            lab,
            host: host.to_owned(),
            child: None,
            dir,
        };
        fs::write(prometheus.dir.join("rules.yaml"), rules)?;
        let config = json!({
            "global": { "scrape_interval": "1s", "evaluation_interval": "1s" },
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{
                "job_name": "enforcer",
                "static_configs": [{ "targets": [target.to_string()], "labels": { "node": host } }],
            }],
        });
        let config_path = prometheus.dir.join("prometheus.yaml");
        fs::write(&config_path, config.to_string())?;
        // The configuration and the rules it loads, checked the way CI would check them.
        let check = Command::new("promtool")
            .args(["check", "config"])
            .arg(&config_path)
            .output()
            .context("running promtool (package prometheus, `cargo xtask setup`)")?;
        ensure!(
            check.status.success(),
            "promtool check config:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );

        let log = fs::File::create(prometheus.dir.join("prometheus.log"))?;
        let mut cmd = lab.command(host, "/usr/bin/prometheus")?;
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prometheus.dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // A test process killed without unwinding takes the server with it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        prometheus.child = Some(cmd.spawn().context("starting /usr/bin/prometheus")?);
        Ok(prometheus)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` from inside the namespace: status and body.
    fn get(&self, path: &str) -> Result<(u16, String)> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, PROMETHEUS_PORT));
        self.lab
            .in_host(&self.host, || http_get(addr, path))?
            .with_context(|| format!("GET http://{addr}{path}"))
    }

    fn wait_ready(&mut self, deadline: Instant) -> Result<()> {
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("prometheus exited ({status}):\n{}", self.log());
            }
            if matches!(self.get("/-/ready"), Ok((200, _))) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "prometheus not ready in time:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// An API call's `data`; an error unless Prometheus answers `"status": "success"`.
    fn api(&self, path: &str) -> Result<Value> {
        let (status, body) = self.get(path)?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("{path} answered {status}: {body}"))?;
        ensure!(
            status == 200 && answer["status"] == "success",
            "{path} answered {status}: {body}"
        );
        Ok(answer["data"].clone())
    }

    /// The instant vector of `query`.
    fn query(&self, query: &str) -> Result<Vec<Value>> {
        let data = self
            .api(&format!("/api/v1/query?query={}", percent_encode(query)))
            .with_context(|| format!("query {query}"))?;
        match &data["result"] {
            Value::Array(result) => Ok(result.clone()),
            // Scalars and strings: one value.
            other => Ok(vec![other.clone()]),
        }
    }

    /// The sum of the samples `query` returns; 0 when there are none.
    fn sum(&self, query: &str) -> Result<f64> {
        self.query(query)?.iter().try_fold(0.0, |sum, s| {
            let value = s["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("sample {s}"))?;
            Ok(sum + value)
        })
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first so that it closes its TSDB; SIGKILL if it does not stop.
            // SAFETY: our unreaped child, so the pid cannot have been reused.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// HTTP/1.0, so the answer comes unchunked and ends with the connection.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header end in {answer:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn rules_status(prometheus: &Prometheus<'_>) -> Result<Vec<(String, String, String)>> {
    let data = prometheus.api("/api/v1/rules")?;
    let groups = data["groups"].as_array().context("rule groups")?;
    Ok(groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            let text = |key: &str| r[key].as_str().unwrap_or_default().to_owned();
            (text("name"), text("health"), text("lastError"))
        })
        .collect())
}

#[test]
fn prometheus_scrapes_a_violation_and_evaluates_the_alerts() -> Result<()> {
    init_test();
    let started = Instant::now();
    let deadline = started + DEADLINE;
    let rules = alert_rules()?;
    let lab = Lab::new(&[
        HostSpec::clinical("pacs", "pacs", 10),
        HostSpec::clinical("radiology-ws", "radiology", 20),
    ])?;
    let pacs = lab.host("pacs")?.v4;
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT));
    let policy_dir = example_policy_dir();
    let enforcer = lab.start_enforcer_with(
        "pacs",
        &policy_dir,
        &["--metrics-addr", &target.to_string()],
    )?;
    let mut prometheus = Prometheus::start(&lab, "pacs", target, &rules)?;
    prometheus.wait_ready(deadline)?;

    // The first scrape gives the baseline (no series yet is a baseline of 0).
    while prometheus.sum(r#"up{job="enforcer"}"#)? < 1.0 {
        ensure!(
            Instant::now() < deadline,
            "Prometheus never scraped the daemon:\n{}\n{:?}",
            prometheus.log(),
            prometheus.query("up")
        );
        thread::sleep(Duration::from_millis(200));
    }
    let baseline = prometheus.sum(VIOLATIONS)?;

    // Denied connections until Prometheus has counted them and the alert sees the rate. The
    // rate needs two samples after the series exists, so the probes go on until then.
    let alert = r#"ALERTS{alertname="EnforcerPolicyViolations",source_segment="radiology",destination_segment="pacs"}"#;
    let (mut counted, mut alerting) = (None, false);
    while counted.is_none() || !alerting {
        ensure!(
            Instant::now() < deadline,
            "within {DEADLINE:?}: counted {counted:?} (baseline {baseline}), alert pending \
             {alerting}; daemon /metrics:\n{}\nprometheus log:\n{}",
            enforcer
                .http_get("/metrics", Duration::from_secs(2))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("enforcer_policy_verdicts_total"))
                .collect::<Vec<_>>()
                .join("\n"),
            prometheus.log()
        );
        let connected = lab.tcp_connect(
            "radiology-ws",
            pacs.into(),
            DENIED_PORT,
            Duration::from_millis(200),
        );
        ensure!(
            !connected,
            "radiology-ws reached pacs tcp/{DENIED_PORT}, which the policy denies"
        );
        if counted.is_none() {
            let now = prometheus.sum(VIOLATIONS)?;
            counted = (now > baseline).then_some(now);
        }
        alerting = !prometheus.query(alert)?.is_empty();
    }

    // Every rule has been evaluated on the real series without an error (a label clash or a
    // many-to-many match only shows on real data).
    let rules = loop {
        let rules = rules_status(&prometheus)?;
        if rules.iter().all(|(_, health, _)| health != "unknown") || Instant::now() >= deadline {
            break rules;
        }
        thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        rules.len() >= 6,
        "only {} rules loaded: {rules:?}",
        rules.len()
    );
    for (name, health, error) in &rules {
        ensure!(health == "ok", "rule {name} is {health}: {error}");
    }

    // Every dashboard query runs; the violations panel shows the pair.
    for query in dashboard_queries()? {
        prometheus.query(&query)?;
    }
    let pairs = prometheus.query(
        r#"sum by (source_segment, destination_segment) (rate(enforcer_policy_verdicts_total{action="dropped"}[5m]))"#,
    )?;
    ensure!(
        pairs
            .iter()
            .any(|s| s["metric"]["source_segment"] == "radiology"
                && s["metric"]["destination_segment"] == "pacs"),
        "no radiology -> pacs violations in {pairs:?}"
    );

    drop(prometheus);
    enforcer.stop()?;
    tracing::info!(elapsed = ?started.elapsed(), "prometheus scenario");
    Ok(())
}

#[test]
fn percent_encoding() {
    assert_eq!(
        percent_encode(r#"a{b="c"}[5m]"#),
        "a%7Bb%3D%22c%22%7D%5B5m%5D"
    );
}
