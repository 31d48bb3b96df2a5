//! End-to-end observability: flow events reach `enforcer observe` and `/metrics` promptly, and
//! a flood of denied packets neither bloats the daemon nor escapes the event accounting.
//!
//! Needs root and a kernel with XDP; `cargo xtask test` provides both and sets `ENFORCER_BIN`.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use policy_compiler::{Flow, Policy, Verdict};
use serde_json::Value;
use vm_tests::lab::{Enforcer, Host, HostSpec, Lab, Metrics, Observer};
use vm_tests::lab::{example_policy_dir, init_test};

/// The promise under test: an event is visible within this time of the packet.
const PROMPT: Duration = Duration::from_secs(1);
/// Fields of every JSON flow event (a fixed interface).
const EVENT_FIELDS: [&str; 15] = [
    "time",
    "iface",
    "direction",
    "src",
    "dst",
    "sport",
    "dport",
    "proto",
    "icmp_type",
    "src_segment",
    "dst_segment",
    "verdict",
    "reason",
    "rule",
    "revision",
];
/// A denied port (no rule opens udp/9 on pacs) whose events show that an observer is live.
const SENTINEL_UDP_PORT: u16 = 9;

fn load_policy() -> Result<Policy> {
    let dir = example_policy_dir();
    Policy::load_dir(&dir).map_err(|e| anyhow::anyhow!("example policy {}: {e}", dir.display()))
}

/// The pacs server (where the daemon runs) and a radiology workstation.
fn small_lab() -> Result<Lab> {
    Ok(Lab::new(&[
        HostSpec::clinical("pacs", "pacs", 10),
        HostSpec::clinical("radiology-ws", "radiology", 20),
    ])?)
}

fn send_udp(lab: &Lab, from: &str, to: SocketAddr) -> Result<()> {
    lab.in_host(from, || -> std::io::Result<()> {
        UdpSocket::bind("0.0.0.0:0")?.send_to(b"sentinel", to)?;
        Ok(())
    })?
    .with_context(|| format!("sending a datagram from {from} to {to}"))
}

/// Waits until every observer prints an event of a sentinel flow, so that the flows that follow
/// are observed live rather than missed before the subscription was made. The sentinel is
/// resent because the kernel reports one event per flow per second.
/// `observers` pairs each observer with a text its sentinel line contains.
fn wait_until_live(
    observers: &[(&Observer<'_>, String)],
    mut send: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut live = vec![false; observers.len()];
    while live.contains(&false) {
        ensure!(
            Instant::now() < deadline,
            "not every observer printed its sentinel event within 15 s: {:?}",
            observers
                .iter()
                .zip(&live)
                .map(|((_, marker), live)| (marker, live))
                .collect::<Vec<_>>()
        );
        send()?;
        for ((observer, marker), live) in observers.iter().zip(&mut live) {
            *live = *live
                || observer
                    .wait_for(Duration::from_millis(150), |line| line.contains(marker))
                    .is_some();
        }
    }
    Ok(())
}

/// Polls `/metrics` until `check` accepts it or `deadline` passes; the last snapshot either way.
fn metrics_until(
    enforcer: &Enforcer<'_>,
    deadline: Instant,
    mut check: impl FnMut(&Metrics) -> bool,
) -> Result<(bool, Metrics)> {
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

fn parse_event(line: &str) -> Result<Value> {
    let event: Value =
        serde_json::from_str(line).with_context(|| format!("not a JSON event: {line}"))?;
    for field in EVENT_FIELDS {
        ensure!(
            event.get(field).is_some(),
            "field {field:?} missing in {line}"
        );
    }
    Ok(event)
}

/// Checks `event` field by field against `expected` (JSON values), naming the first mismatch.
fn expect_fields(event: &Value, expected: &[(&str, Value)]) -> Result<()> {
    for (field, want) in expected {
        ensure!(
            event[field] == *want,
            "field {field:?} is {}, expected {want}; event: {event}",
            event[field]
        );
    }
    Ok(())
}

fn is_tcp_event_to(line: &str, port: u16) -> bool {
    serde_json::from_str::<Value>(line)
        .is_ok_and(|e| e["proto"] == "tcp" && e["dport"] == u64::from(port))
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

/// A denied connection shows up in `enforcer observe` (JSON and text) and in `/metrics` within
/// a second, named after the segments and the policy revision.
#[test]
fn denied_connection_is_observed_within_a_second() -> Result<()> {
    init_test();
    let policy = load_policy()?;
    let lab = small_lab()?;
    let pacs = lab.host("pacs")?.clone();
    let ws = lab.host("radiology-ws")?.clone();
    let enforcer = lab.start_enforcer_with(
        "pacs",
        &example_policy_dir(),
        &["--metrics-addr", "127.0.0.1:19471"],
    )?;
    let filter = ["--verdict", "deny", "--to", "pacs"];
    let json = enforcer.observe(&[&filter[..], &["--output", "json"]].concat())?;
    let text = enforcer.observe(&filter)?;
    let sentinel = SocketAddr::new(pacs.v4.into(), SENTINEL_UDP_PORT);
    wait_until_live(
        &[
            (&json, format!("\"dport\":{SENTINEL_UDP_PORT},")),
            (&text, format!("{sentinel} (pacs)")),
        ],
        || send_udp(&lab, "radiology-ws", sentinel),
    )?;
    let before = enforcer.metrics()?;
    // The daemon enabled the filter in front of the connection table once attached.
    ensure!(
        before.get("enforcer_conntrack_filter_enabled", &[]) == Some(1.0),
        "enforcer_conntrack_filter_enabled is not 1:\n{before}"
    );

    let attempt = Instant::now();
    let connected = lab.tcp_connect(
        "radiology-ws",
        pacs.v4.into(),
        22,
        Duration::from_millis(300),
    );
    ensure!(
        !connected,
        "radiology-ws reached pacs tcp/22, which the policy denies"
    );

    let event = json
        .wait_for(PROMPT.saturating_sub(attempt.elapsed()), |l| {
            is_tcp_event_to(l, 22)
        })
        .with_context(|| {
            format!(
                "no JSON event for radiology-ws -> pacs tcp/22 within {PROMPT:?}; observed:\n{}",
                lines(&json)
            )
        })?;
    let latency = event.at.duration_since(attempt);
    ensure!(latency <= PROMPT, "the event took {latency:?}");
    let event = parse_event(&event.line)?;
    expect_fields(
        &event,
        &[
            ("src", ws.v4.to_string().into()),
            ("dst", pacs.v4.to_string().into()),
            ("src_segment", "radiology".into()),
            ("dst_segment", "pacs".into()),
            ("verdict", "deny".into()),
            ("reason", "policy_denied".into()),
            ("rule", Value::Null),
            ("proto", "tcp".into()),
            ("dport", 22.into()),
            ("icmp_type", Value::Null),
            ("direction", "ingress".into()),
            ("iface", "eth0".into()),
            ("revision", policy.revision().into()),
        ],
    )?;
    ensure!(event["sport"].is_u64(), "sport is not a port: {event}");
    // The filter holds for everything printed, sentinels included.
    for line in json.lines() {
        let e = parse_event(&line.line)?;
        ensure!(
            e["verdict"] == "deny" && e["dst_segment"] == "pacs",
            "`--verdict deny --to pacs` printed {}",
            line.line
        );
    }

    let was = verdicts(&before, "radiology", "pacs", "dropped");
    let (counted, metrics) = metrics_until(&enforcer, attempt + PROMPT, |m| {
        verdicts(m, "radiology", "pacs", "dropped") >= was + 1.0
    })?;
    ensure!(
        counted,
        "enforcer_policy_verdicts_total for radiology -> pacs ingress dropped stayed at {was} \
         for {PROMPT:?} after the attempt:\n{metrics}"
    );
    let series = metrics
        .get(
            "enforcer_policy_verdicts_total",
            &[
                ("source_segment", "radiology"),
                ("destination_segment", "pacs"),
                ("direction", "ingress"),
                ("action", "dropped"),
                ("match", "none"),
            ],
        )
        .context("no single radiology -> pacs ingress dropped (match none) series")?;
    ensure!(series >= 1.0, "radiology -> pacs dropped counts {series}");

    let readable = text
        .wait_for(PROMPT, |l| l.contains(&format!("{}:22 ", pacs.v4)))
        .with_context(|| format!("no text line for tcp/22; observed:\n{}", lines(&text)))?;
    ensure!(
        readable.line.contains("(radiology)") && readable.line.contains("(pacs)"),
        "the text line does not name both segments: {}",
        readable.line
    );
    ensure!(
        serde_json::from_str::<Value>(&readable.line).is_err(),
        "the text output is JSON: {}",
        readable.line
    );
    eprintln!(
        "denied tcp/22 observed after {latency:?}: {event}\ntext: {}",
        readable.line
    );
    drop((json, text));
    enforcer.stop().context("stopping the daemon")?;
    Ok(())
}

/// With `--report-allowed`, the first packet of an allowed connection is reported with the id of
/// the rule that allowed it.
#[test]
fn allowed_connection_is_reported_with_its_rule() -> Result<()> {
    init_test();
    let policy = load_policy()?;
    let lab = small_lab()?;
    let pacs = lab.host("pacs")?.clone();
    let ws = lab.host("radiology-ws")?.clone();
    let decision = policy.evaluate(&Flow {
        src: ws.v4.into(),
        dst: pacs.v4.into(),
        proto: 6,
        port: Some(104),
    });
    ensure!(
        decision.verdict == Verdict::Allow,
        "the example policy no longer allows radiology -> pacs tcp/104: {decision:?}"
    );
    let rule = decision.rule.context("an allowed flow without a rule")?;
    let _services = lab.serve("pacs", &[104, 11112], &[])?;
    let enforcer = lab.start_enforcer_with(
        "pacs",
        &example_policy_dir(),
        &["--metrics-addr", "127.0.0.1:19472", "--report-allowed"],
    )?;
    let json = enforcer.observe(&["--verdict", "allow", "--output", "json"])?;
    // DICOM TLS (tcp/11112) is allowed by the same rule; a new connection each time.
    wait_until_live(&[(&json, "\"dport\":11112,".into())], || {
        lab.tcp_connect(
            "radiology-ws",
            pacs.v4.into(),
            11112,
            Duration::from_secs(1),
        );
        Ok(())
    })?;

    let attempt = Instant::now();
    ensure!(
        lab.tcp_connect("radiology-ws", pacs.v4.into(), 104, Duration::from_secs(2)),
        "radiology-ws could not reach pacs tcp/104"
    );
    let event = json
        .wait_for(PROMPT.saturating_sub(attempt.elapsed()), |l| {
            is_tcp_event_to(l, 104)
        })
        .with_context(|| format!("no allow event for tcp/104; observed:\n{}", lines(&json)))?;
    let event = parse_event(&event.line)?;
    expect_fields(
        &event,
        &[
            ("src", ws.v4.to_string().into()),
            ("dst", pacs.v4.to_string().into()),
            ("src_segment", "radiology".into()),
            ("dst_segment", "pacs".into()),
            ("verdict", "allow".into()),
            ("reason", "allowed".into()),
            ("rule", rule.as_str().into()),
            ("proto", "tcp".into()),
            ("dport", 104.into()),
            ("revision", policy.revision().into()),
        ],
    )?;
    eprintln!("allowed tcp/104 reported: {event}");
    drop(json);
    enforcer.stop().context("stopping the daemon")?;
    Ok(())
}

/// Resident memory of a process, from /proc.
fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS line")?;
    line.trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("VmRSS {line:?}"))
}

/// How long the flood lasts, and at most how many datagrams it sends.
const FLOOD_TIME: Duration = Duration::from_secs(2);
const FLOOD_MAX_PACKETS: u64 = 3_000_000;
/// More destination ports than fit in the ring buffer's events of a second or so.
const FLOOD_PORTS: u16 = 60_000;
const MAX_RSS_GROWTH_KIB: u64 = 50 * 1024;
const METRICS_TIMEOUT: Duration = Duration::from_secs(2);

/// Floods the daemon with denied datagrams to many ports: memory stays bounded, `/metrics`
/// answers throughout, and every denied packet is accounted for as an event sent, rate-limited
/// or lost.
#[test]
fn flood_of_denials_is_bounded_and_accounted() -> Result<()> {
    flood_test(false)
}

/// The same while a `/flows` client reads too slowly to keep up.
/// (Its misses are `enforcer_flow_subscriber_missed_total`, not kernel losses.)
#[test]
fn flood_with_a_slow_subscriber_is_accounted() -> Result<()> {
    flood_test(true)
}

fn flood_test(slow_subscriber: bool) -> Result<()> {
    init_test();
    let lab = small_lab()?;
    let pacs = lab.host("pacs")?.clone();
    let enforcer = lab.start_enforcer_with(
        "pacs",
        &example_policy_dir(),
        &["--metrics-addr", "127.0.0.1:19473"],
    )?;
    let pid = enforcer.pid().context("the daemon has no pid")?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    ensure!(
        comm.trim() == "enforcer",
        "pid {pid} is {comm:?}, not the daemon"
    );
    // Settle: the first /metrics read allocates too.
    enforcer.metrics()?;
    let rss_before = vm_rss_kib(pid)?;
    // Reads until the accounting below is final: the daemon notices a lag only when the client
    // takes the next event.
    let reading = Arc::new(AtomicBool::new(true));
    let subscriber = if slow_subscriber {
        let addr = enforcer.metrics_addr();
        let stream = lab
            .in_host("pacs", || subscribe_slowly(addr))?
            .context("connecting a /flows client")?;
        let reading = Arc::clone(&reading);
        Some(thread::spawn(move || read_slowly(stream, &reading)))
    } else {
        None
    };

    let done = AtomicBool::new(false);
    let (flood, polls) = thread::scope(|scope| -> Result<_> {
        let flood = scope.spawn(|| {
            let result = lab.in_host("radiology-ws", || flood(&pacs));
            done.store(true, Ordering::Relaxed);
            result
        });
        // `/metrics` while the daemon is busy with events.
        let mut polls = Vec::new();
        let mut peak_rss = rss_before;
        while !done.load(Ordering::Relaxed) {
            let asked = Instant::now();
            let answer = enforcer.http_get("/metrics", METRICS_TIMEOUT);
            polls.push(asked.elapsed());
            if let Err(error) = answer {
                done.store(true, Ordering::Relaxed);
                let _ = flood.join();
                bail!("/metrics did not answer during the flood: {error}");
            }
            peak_rss = peak_rss.max(vm_rss_kib(pid)?);
            thread::sleep(Duration::from_millis(100));
        }
        let flood = flood
            .join()
            .map_err(|_| anyhow::anyhow!("the flood thread panicked"))???;
        Ok((flood, (polls, peak_rss)))
    })?;
    let (polls, peak_rss) = polls;
    ensure!(
        polls.len() >= 3,
        "only {} /metrics polls during the flood",
        polls.len()
    );
    let slowest = polls.iter().max().copied().unwrap_or_default();

    // The event reader catches up; then the counters are final.
    let mut metrics = enforcer.metrics()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        thread::sleep(Duration::from_millis(300));
        let now = enforcer.metrics()?;
        let stable = accounting(&now) == accounting(&metrics);
        metrics = now;
        if stable || Instant::now() > deadline {
            break;
        }
    }
    reading.store(false, Ordering::Relaxed);
    if let Some(reader) = subscriber {
        let _ = reader.join();
    }
    let rss_after = vm_rss_kib(pid)?;
    let (events, drops) = accounting(&metrics);
    let [sent, rate_limited, lost] = events;
    eprintln!(
        "flood: {} datagrams in {:?} ({} send errors); denied {drops}; events sent {sent}, \
         rate-limited {rate_limited}, lost {lost}; VmRSS {rss_before} -> peak {peak_rss} -> \
         {rss_after} KiB; {} /metrics polls, slowest {slowest:?}",
        flood.sent,
        flood.took,
        flood.errors,
        polls.len()
    );

    ensure!(
        drops >= 10_000,
        "only {drops} denied packets counted for a flood of {} datagrams:\n{metrics}",
        flood.sent
    );
    ensure!(
        drops <= flood.sent,
        "{drops} denied packets counted, but only {} were sent:\n{metrics}",
        flood.sent
    );
    ensure!(
        sent + rate_limited + lost == drops,
        "events sent {sent} + rate-limited {rate_limited} + lost {lost} = {} != {drops} \
         denied packets:\n{metrics}",
        sent + rate_limited + lost
    );
    ensure!(
        rate_limited + lost > 0,
        "every one of {drops} denied packets was reported: the flood was not limited"
    );
    ensure!(
        peak_rss.max(rss_after) < rss_before + MAX_RSS_GROWTH_KIB,
        "the daemon grew from {rss_before} KiB to {} KiB",
        peak_rss.max(rss_after)
    );
    enforcer.stop().context("stopping the daemon")?;
    Ok(())
}

/// Event counters (sent, rate-limited, lost) and packets dropped as `policy_denied` (all
/// protocols: they all produce events).
fn accounting(metrics: &Metrics) -> ([u64; 3], u64) {
    let count = |name: &str, labels: &[(&str, &str)]| metrics.sum(name, labels) as u64;
    (
        [
            count("enforcer_events_total", &[("outcome", "sent")]),
            count("enforcer_events_total", &[("outcome", "rate_limited")]),
            count("enforcer_lost_events_total", &[]),
        ],
        count("enforcer_drop_total", &[("reason", "policy_denied")]),
    )
}

struct Flood {
    sent: u64,
    errors: u64,
    took: Duration,
}

/// Denied datagrams to `FLOOD_PORTS` ports of `to`, as fast as one socket sends them. Each
/// port gets two in a row: the second falls within the first's rate-limit interval however
/// slowly this machine sends.
fn flood(to: &Host) -> Result<Flood> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("binding the flood socket")?;
    let started = Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut port = 0u16;
    while sent + errors < FLOOD_MAX_PACKETS {
        // The clock is read once per batch: it costs more than a send.
        if (sent + errors) % 1024 == 0 && started.elapsed() >= FLOOD_TIME {
            break;
        }
        port = port % FLOOD_PORTS + 1;
        for _ in 0..2 {
            match socket.send_to(b"flood", SocketAddr::new(IpAddr::V4(to.v4), port)) {
                Ok(_) => sent += 1,
                // ENOBUFS and the like: the queue is full; the packet never left.
                Err(_) => errors += 1,
            }
        }
    }
    Ok(Flood {
        sent,
        errors,
        took: started.elapsed(),
    })
}

/// A `/flows` request. Call from inside the daemon's namespace.
fn subscribe_slowly(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.write_all(b"GET /flows HTTP/1.1\r\nHost: lab\r\n\r\n")?;
    Ok(stream)
}

/// Reads steadily but slower than a flood's events come (about 5,000 events a second) while
/// `reading`. A client that stops reading altogether is not noticed at all: its stream waits for
/// room before it takes the next event.
fn read_slowly(mut stream: TcpStream, reading: &AtomicBool) {
    let mut buf = [0u8; 8 * 1024];
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    while reading.load(Ordering::Relaxed) {
        if matches!(stream.read(&mut buf), Ok(0)) {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn lines(observer: &Observer<'_>) -> String {
    observer
        .lines()
        .iter()
        .map(|l| l.line.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}
