//! The observability surface without the kernel: the Prometheus text checked by the real
//! `promtool`, the HTTP endpoints and `enforcer observe` against a server on loopback fed with
//! synthetic flow events. Runs without root.
use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use enforcer::{
    daemon::SharedState,
    events::{EventHub, FlowEvent},
    http,
    metrics::{MetricsSnapshot, VerdictLabels},
    observe::{self, ObserveError, ObserveOptions},
};
use http_body_util::{BodyExt as _, Empty};
use hyper::{
    Request, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    net::TcpStream,
    time::timeout,
};

/// No step of these tests should take long; a hang is a failure.
const LIMIT: Duration = Duration::from_secs(10);

fn populated_snapshot() -> MetricsSnapshot {
    let verdict = |src: &str, dst: &str, action: &str, match_: &str| VerdictLabels {
        source_segment: src.into(),
        destination_segment: dst.into(),
        direction: "ingress".into(),
        action: action.into(),
        match_: match_.into(),
    };
    MetricsSnapshot {
        policy_verdicts: vec![
            (verdict("radiology", "billing", "dropped", "none"), 7),
            (verdict("radiology", "pacs", "forwarded", "rule"), 120),
            // Label values that need every escape of the format.
            (
                verdict("odd \"seg\"", "back\\slash\nline", "audit", "none"),
                1,
            ),
        ],
        drops: vec![
            (("policy_denied".into(), "tcp".into()), 7),
            (("conntrack_full".into(), "udp".into()), 2),
        ],
        forwarded: vec![("ingress".into(), 1000), ("egress".into(), 900)],
        lost_events: 3,
        subscriber_missed: 11,
        events: vec![("sent".into(), 50), ("rate_limited".into(), 4)],
        revision: "3f2a9c".into(),
        commit: Some("d34db33f".into()),
        reloads_success: 5,
        reloads_failure: 1,
        rules: 42,
        map_pressure: vec![("conntrack".into(), 0.125), ("policy_rules".into(), 0.5)],
        conntrack_entries: 1234,
        conntrack_filter_enabled: true,
        reload_failing: true,
        quarantined_hosts: 2,
        audit_write_failures: 1,
        breakglass_active: vec![
            (("icu-telemetry".into(), "pacs".into()), 1),
            (("lab".into(), "pacs".into()), 0),
        ],
        breakglass_events: vec![
            ("grant".into(), 3),
            ("use".into(), 2),
            ("expire".into(), 1),
            ("revoke".into(), 1),
        ],
    }
}

/// `promtool check metrics` on `text`: panics with promtool's complaints if it rejects it.
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed (Debian package `prometheus`): run `cargo xtask setup`"
        ),
        Err(error) => panic!("cannot run promtool: {error}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool rejects the metrics ({}):\n{}{}\n--- text ---\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

#[test]
fn promtool_accepts_the_exposition() {
    let text = populated_snapshot().render();
    promtool_check(&text);
    promtool_check(&MetricsSnapshot::default().render());
    // Deterministic: the same snapshot renders the same text.
    assert_eq!(text, populated_snapshot().render());
}

#[test]
fn exposition_has_the_stable_names() {
    let text = populated_snapshot().render();
    for line in [
        "# TYPE enforcer_policy_verdicts_total counter",
        r#"enforcer_policy_verdicts_total{source_segment="radiology",destination_segment="billing",direction="ingress",action="dropped",match="none"} 7"#,
        r#"enforcer_policy_verdicts_total{source_segment="odd \"seg\"",destination_segment="back\\slash\nline",direction="ingress",action="audit",match="none"} 1"#,
        r#"enforcer_drop_total{reason="policy_denied",protocol="tcp"} 7"#,
        r#"enforcer_forward_total{direction="egress"} 900"#,
        "enforcer_lost_events_total 3",
        "enforcer_flow_subscriber_missed_total 11",
        r#"enforcer_events_total{outcome="rate_limited"} 4"#,
        "# TYPE enforcer_policy_revision_info gauge",
        r#"enforcer_policy_revision_info{revision="3f2a9c",commit="d34db33f"} 1"#,
        r#"enforcer_policy_reload_total{outcome="success"} 5"#,
        r#"enforcer_policy_reload_total{outcome="failure"} 1"#,
        "# TYPE enforcer_policy_reload_failing gauge",
        "enforcer_policy_reload_failing 1",
        "enforcer_policy_rules 42",
        r#"enforcer_bpf_map_pressure{map_name="conntrack"} 0.125"#,
        "enforcer_conntrack_entries 1234",
        "# TYPE enforcer_conntrack_filter_enabled gauge",
        "enforcer_conntrack_filter_enabled 1",
        "# TYPE enforcer_breakglass_active gauge",
        r#"enforcer_breakglass_active{source_segment="icu-telemetry",destination_segment="pacs"} 1"#,
        r#"enforcer_breakglass_active{source_segment="lab",destination_segment="pacs"} 0"#,
        "# TYPE enforcer_breakglass_events_total counter",
        r#"enforcer_breakglass_events_total{action="grant"} 3"#,
        r#"enforcer_breakglass_events_total{action="revoke"} 1"#,
        "# TYPE enforcer_quarantined_hosts gauge",
        "enforcer_quarantined_hosts 2",
        "# TYPE enforcer_audit_write_failures_total counter",
        "enforcer_audit_write_failures_total 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}

fn flow(
    age: Duration,
    verdict: &str,
    src_segment: &str,
    dst_segment: &str,
    sport: u16,
) -> FlowEvent {
    let reason = match verdict {
        "allow" => "allowed",
        "deny" => "policy_denied",
        _ => "audit",
    };
    FlowEvent {
        time: humantime::format_rfc3339_millis(SystemTime::now() - age).to_string(),
        iface: "eth0".into(),
        direction: "ingress".into(),
        src: IpAddr::V4(Ipv4Addr::new(10, 10, 0, 20)),
        dst: IpAddr::V4(Ipv4Addr::new(10, 60, 0, 10)),
        sport: Some(sport),
        dport: Some(5432),
        proto: "tcp".into(),
        icmp_type: None,
        src_segment: src_segment.into(),
        dst_segment: dst_segment.into(),
        verdict: verdict.into(),
        reason: reason.into(),
        rule: (verdict == "allow").then(|| "pacs-to-ris".into()),
        revision: "3f2a9c".into(),
    }
}

/// A server on 127.0.0.1 with an empty hub; dropped with the test's runtime.
async fn start(channel_capacity: usize) -> (SocketAddr, Arc<SharedState>) {
    let state = Arc::new(SharedState {
        hub: Arc::new(EventHub::new(channel_capacity, 1000)),
        metrics: Box::new(populated_snapshot),
        ready: AtomicBool::new(false),
    });
    let (listener, addr) = http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    tokio::spawn(http::serve_on(listener, state.clone()));
    (addr, state)
}

async fn get(addr: SocketAddr, path: &str) -> hyper::Response<Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    timeout(LIMIT, sender.send_request(request))
        .await
        .expect("no response")
        .unwrap()
}

async fn text_of(response: hyper::Response<Incoming>) -> (StatusCode, String, String) {
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = timeout(LIMIT, response.into_body().collect())
        .await
        .expect("body never ended")
        .unwrap()
        .to_bytes();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

/// The next NDJSON line of a streaming body.
async fn next_event(body: &mut Incoming, pending: &mut Vec<u8>) -> FlowEvent {
    loop {
        if let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            return serde_json::from_slice(&line).unwrap();
        }
        let frame = timeout(LIMIT, body.frame())
            .await
            .expect("no event arrived")
            .expect("the stream ended")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            pending.extend_from_slice(&data);
        }
    }
}

fn ndjson(text: &str) -> Vec<FlowEvent> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let (addr, state) = start(16).await;

    let (status, _, body) = text_of(get(addr, "/healthz").await).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));

    let (status, _, _) = text_of(get(addr, "/readyz").await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    state.ready.store(true, Ordering::Release);
    let (status, _, _) = text_of(get(addr, "/readyz").await).await;
    assert_eq!(status, StatusCode::OK);

    let (status, content_type, body) = text_of(get(addr, "/metrics").await).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert_eq!(body, populated_snapshot().render());

    let (status, _, _) = text_of(get(addr, "/nope").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn flows_filters_and_since() {
    let (addr, state) = start(16).await;
    let hub = &state.hub;
    let old = flow(Duration::from_secs(600), "deny", "radiology", "billing", 1);
    let denied = flow(Duration::from_secs(60), "deny", "radiology", "billing", 2);
    let allowed = flow(Duration::from_secs(30), "allow", "radiology", "pacs", 3);
    let audited = flow(Duration::from_secs(10), "audit", "guest", "billing", 4);
    for event in [&old, &denied, &allowed, &audited] {
        hub.publish(event.clone());
    }

    let finite = async |query: &str| {
        let (status, content_type, body) =
            text_of(get(addr, &format!("/flows?follow=false&{query}")).await).await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        assert_eq!(content_type, "application/x-ndjson");
        ndjson(&body)
    };
    assert_eq!(
        finite("since=5m").await,
        [denied.clone(), allowed.clone(), audited.clone()]
    );
    assert_eq!(
        finite("since=5m&verdict=deny").await,
        std::slice::from_ref(&denied)
    );
    assert_eq!(finite("verdict=deny").await, [old.clone(), denied.clone()]);
    assert_eq!(
        finite("to=billing&since=5m").await,
        [denied.clone(), audited.clone()]
    );
    assert_eq!(
        finite("from=radiology&to=pacs").await,
        std::slice::from_ref(&allowed)
    );
    assert_eq!(finite("from=nobody").await, []);

    for (query, expected) in [
        ("verdict=drop", "bad verdict"),
        ("since=soon", "bad since"),
        ("colour=red", "unknown parameter"),
    ] {
        let (status, _, body) = text_of(get(addr, &format!("/flows?{query}")).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(body.contains(expected), "{query}: {body}");
    }

    // Live, after the kept ones: the response headers arrive once the stream is subscribed.
    let response = get(addr, "/flows?since=5m&verdict=deny").await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut pending = Vec::new();
    assert_eq!(next_event(&mut body, &mut pending).await, denied);
    let live_allowed = flow(Duration::ZERO, "allow", "radiology", "pacs", 5);
    let live_denied = flow(Duration::ZERO, "deny", "guest", "billing", 6);
    hub.publish(live_allowed);
    hub.publish(live_denied.clone());
    assert_eq!(next_event(&mut body, &mut pending).await, live_denied);
}

#[tokio::test]
async fn a_lagging_stream_counts_the_loss_and_goes_on() {
    let (addr, state) = start(4).await;
    let response = get(addr, "/flows").await;
    let mut body = response.into_body();
    // On this single-threaded runtime the stream task cannot run while these are published,
    // so its receiver (capacity 4) misses all but the last four.
    for n in 0..20 {
        state.hub.publish(flow(Duration::ZERO, "deny", "a", "b", n));
    }
    let mut pending = Vec::new();
    for n in 16..20 {
        assert_eq!(next_event(&mut body, &mut pending).await.sport, Some(n));
    }
    assert_eq!(state.hub.lagged(), 16);
}

#[tokio::test]
async fn observe_prints_json_and_text() {
    let (addr, state) = start(16).await;
    let denied = flow(
        Duration::from_secs(60),
        "deny",
        "radiology",
        "billing",
        40000,
    );
    let allowed = flow(Duration::from_secs(30), "allow", "radiology", "pacs", 40001);
    state.hub.publish(denied.clone());
    state.hub.publish(allowed.clone());
    let options = ObserveOptions {
        addr: format!("http://{addr}"),
        since: Some("5m".into()),
        follow: false,
        ..Default::default()
    };

    let mut out = Vec::new();
    observe::run(
        ObserveOptions {
            output_json: true,
            ..options.clone()
        },
        &mut out,
    )
    .await
    .unwrap();
    assert_eq!(
        ndjson(&String::from_utf8(out).unwrap()),
        [denied.clone(), allowed.clone()]
    );

    let mut out = Vec::new();
    observe::run(
        ObserveOptions {
            verdict: Some("deny".into()),
            ..options.clone()
        },
        &mut out,
    )
    .await
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains("  10.10.0.20:40000 (radiology) -> 10.60.0.10:5432 (billing)  tcp  DENIED  policy_denied  rule=-  eth0 ingress\n"),
        "{text}"
    );
    assert_eq!(text, format!("{}\n", observe::format_flow(&denied)));

    // The server's refusal reaches the user.
    let error = observe::run(
        ObserveOptions {
            from: Some(String::new()),
            ..options.clone()
        },
        Vec::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, ObserveError::Status { status, .. } if *status == StatusCode::BAD_REQUEST),
        "{error}"
    );
    assert!(error.to_string().contains("empty segment name"), "{error}");
}

#[tokio::test]
async fn observe_follows_live_flows() {
    let (addr, state) = start(16).await;
    let first = flow(Duration::from_secs(1), "deny", "radiology", "billing", 1);
    state.hub.publish(first.clone());
    let (writer, reader) = tokio::io::duplex(4096);
    let options = ObserveOptions {
        addr: addr.to_string(),
        since: Some("1m".into()),
        output_json: true,
        ..Default::default()
    };
    let client = tokio::spawn(observe::run(options, writer));
    let mut lines = BufReader::new(reader).lines();
    let mut next = async || {
        let line = timeout(LIMIT, lines.next_line())
            .await
            .expect("no line")
            .unwrap()
            .unwrap();
        serde_json::from_str::<FlowEvent>(&line).unwrap()
    };
    // The kept event arrives after the subscription: what comes next is live.
    assert_eq!(next().await, first);
    let live = flow(Duration::ZERO, "audit", "guest", "billing", 2);
    state.hub.publish(live.clone());
    assert_eq!(next().await, live);
    client.abort();
}

#[tokio::test]
async fn observe_explains_bad_options_and_refused_connections() {
    let error = observe::run(
        ObserveOptions {
            verdict: Some("drop".into()),
            ..Default::default()
        },
        Vec::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, ObserveError::BadVerdict(_)), "{error}");

    let error = observe::run(
        ObserveOptions {
            since: Some("a while".into()),
            ..Default::default()
        },
        Vec::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, ObserveError::BadSince { .. }), "{error}");

    // A port that was just free: nothing listens there.
    let (listener, addr) = http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    drop(listener);
    let url = format!("http://{addr}");
    let error = observe::run(
        ObserveOptions {
            addr: url.clone(),
            ..Default::default()
        },
        Vec::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, ObserveError::Connect { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains(&url) && message.contains("--addr"),
        "{message}"
    );
}

#[tokio::test]
async fn bind_errors_are_returned() {
    let (_listener, addr) = http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let state = Arc::new(SharedState {
        hub: Arc::new(EventHub::new(1, 1)),
        metrics: Box::new(MetricsSnapshot::default),
        ready: AtomicBool::new(false),
    });
    let error = http::serve(addr, state).await.unwrap_err();
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
}
