//! The control socket without a kernel: protocol round trip, socket mode, clients of other
//! users, malformed requests. The handler is a closure that records what reached it, so "nothing
//! changes" means "the handler never ran".
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
};

use enforcer::control::{self, ControlError, ControlRequest, Handler, Peer};
use serde_json::{Value, json};

const NOBODY: u32 = 65534;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("enforcer-control-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Reachable by the unprivileged clients of these tests; the socket's own mode decides.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Seen = Arc<Mutex<Vec<(ControlRequest, Peer)>>>;

/// A handler that records each request and answers like a tiny daemon.
fn recording_handler() -> (Handler, Seen) {
    let seen: Seen = Arc::default();
    let recorded = Arc::clone(&seen);
    let handler: Handler = Arc::new(move |request: ControlRequest, peer: &Peer| {
        recorded
            .lock()
            .unwrap()
            .push((request.clone(), peer.clone()));
        match request {
            ControlRequest::Status => Ok(json!({"revision": "test-revision", "quarantined": 0})),
            ControlRequest::QuarantineAdd { address, .. }
                if address.parse::<std::net::IpAddr>().is_err() =>
            {
                Err(ControlError::Invalid(format!(
                    "{address:?} is not an IP address"
                )))
            }
            other => Ok(json!({"echo": format!("{other:?}")})),
        }
    });
    (handler, seen)
}

/// Binds `socket` and serves it on the test's runtime.
fn serve(socket: &Path, group: Option<&str>, handler: Handler) -> tokio::task::JoinHandle<()> {
    let bound = control::bind(socket, group).expect("binding the control socket");
    tokio::spawn(bound.serve(handler))
}

async fn request(socket: &Path, request: ControlRequest) -> Result<Value, ControlError> {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || control::request(&socket, &request))
        .await
        .unwrap()
}

/// One raw line to the socket, the raw answer back.
async fn raw(socket: &Path, line: &[u8]) -> Value {
    let socket = socket.to_path_buf();
    let line = line.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream.write_all(&line).unwrap();
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    })
    .await
    .unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `enforcer status --control-socket SOCKET` as user `nobody` (group `nogroup`, no others).
fn status_as_nobody(socket: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(["status", "--output", "json", "--control-socket"])
        .arg(socket)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("running the enforcer client as nobody")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_goes_round_trip_with_the_peers_credentials() {
    let dir = TempDir::new("roundtrip");
    let socket = dir.0.join("run/control.sock");
    let (handler, seen) = recording_handler();
    let server = serve(&socket, None, handler);

    let status = request(&socket, ControlRequest::Status).await.unwrap();
    assert_eq!(status["revision"], "test-revision");
    let add = ControlRequest::QuarantineAdd {
        address: "10.20.3.4".into(),
        reason: "EDR agent missing".into(),
    };
    request(&socket, add.clone()).await.unwrap();
    let error = request(
        &socket,
        ControlRequest::QuarantineAdd {
            address: "10.20.3.4/24x".into(),
            reason: "r".into(),
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, ControlError::Rejected(text) if text == "\"10.20.3.4/24x\" is not an IP address"),
        "the daemon's message reaches the client as it is: {error}"
    );

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].0, add);
    let peer = &seen[0].1;
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    assert_eq!((peer.uid, peer.gid), (uid, gid));
    assert_eq!(peer.pid, std::process::id() as i32);
    assert_eq!(peer.user, control::user_name(uid));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_mode_0600_or_0660_with_its_group() {
    let dir = TempDir::new("mode");
    let socket = dir.0.join("control.sock");
    let (handler, _) = recording_handler();
    let server = serve(&socket, None, Arc::clone(&handler));
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    server.abort();
    drop(server);
    // The aborted server's socket may linger until its task is dropped; a new bind replaces a
    // stale one.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    if is_root() {
        let group_socket = dir.0.join("group.sock");
        let server = serve(&group_socket, Some("65534"), handler);
        let meta = std::fs::metadata(&group_socket).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), NOBODY);
        // A member of the group may use it.
        let output = status_as_nobody(&group_socket);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        server.abort();
    }
    assert!(matches!(
        control::bind(&dir.0.join("x.sock"), Some("no-such-group-enforcer-test")),
        Err(ControlError::UnknownGroup { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_permission_gets_a_clear_error_and_nothing_changes() {
    if !is_root() {
        eprintln!("SKIPPED: running a client as another user needs root");
        return;
    }
    let dir = TempDir::new("perm");
    let socket = dir.0.join("control.sock");
    let (handler, seen) = recording_handler();
    let server = serve(&socket, None, handler);

    // The file mode stops it.
    let output = status_as_nobody(&socket);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("permission denied on the control socket")
            && stderr.contains("mode 0600")
            && stderr.contains("sudo"),
        "{stderr}"
    );
    assert!(seen.lock().unwrap().is_empty(), "the handler never ran");

    // A socket whose mode was loosened by hand: the daemon's credential check stops it.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = status_as_nobody(&socket);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("permission denied: nobody (uid 65534) may not use"),
        "{stderr}"
    );
    assert!(seen.lock().unwrap().is_empty(), "the handler never ran");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_rejected_with_a_reason() {
    let dir = TempDir::new("malformed");
    let socket = dir.0.join("control.sock");
    let (handler, seen) = recording_handler();
    let server = serve(&socket, None, handler);
    let cases: [(&[u8], &str); 7] = [
        (b"not json\n", "malformed request: expected"),
        (b"{\"op\":\"launch_missiles\"}\n", "unknown variant `launch_missiles`"),
        (
            b"{\"op\":\"quarantine_add\",\"address\":\"10.0.0.1\"}\n",
            "missing field `reason`",
        ),
        (
            b"{\"op\":\"quarantine_add\",\"address\":\"10.0.0.1\",\"reason\":\"x\",\"ttl\":\"1h\"}\n",
            "unknown field `ttl`",
        ),
        (b"[1,2]\n", "malformed request"),
        (b"\n", "empty request"),
        (b"{\"address\":\"10.0.0.1\"}\n", "missing field `op`"),
    ];
    for (line, expected) in cases {
        let answer = raw(&socket, line).await;
        assert_eq!(answer["ok"], false, "{answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(
            error.contains(expected),
            "{:?}: {error}",
            String::from_utf8_lossy(line)
        );
    }
    let long = format!("{{\"op\":\"status\",\"x\":\"{}\"}}\n", "a".repeat(70_000));
    let answer = raw(&socket, long.as_bytes()).await;
    assert!(
        answer["error"].as_str().unwrap().contains("longer than"),
        "{answer}"
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "no malformed request reached the handler"
    );
    // A valid one, raw: one JSON line back.
    let answer = raw(&socket, b"{\"op\":\"status\"}\n").await;
    assert_eq!(
        answer,
        json!({"ok": true, "result": {"revision": "test-revision", "quarantined": 0}})
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_daemon_a_live_daemon_and_a_stale_socket() {
    let dir = TempDir::new("stale");
    let socket = dir.0.join("control.sock");
    let error = request(&socket, ControlRequest::Status).await.unwrap_err();
    assert!(matches!(error, ControlError::NoDaemon { .. }), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("is `enforcer run` running?") && text.contains("--control-socket"),
        "{text}"
    );

    let (handler, _) = recording_handler();
    let server = serve(&socket, None, Arc::clone(&handler));
    assert!(
        matches!(
            control::bind(&socket, None),
            Err(ControlError::AlreadyListening { .. })
        ),
        "a second daemon must not steal a live socket"
    );
    server.abort();
    let _ = server.await;

    // A socket file nobody listens on (a daemon that was killed): replaced.
    std::fs::remove_file(&socket).ok();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let server = serve(&socket, None, handler);
    request(&socket, ControlRequest::Status).await.unwrap();
    server.abort();

    let file = dir.0.join("plain-file");
    std::fs::write(&file, "").unwrap();
    assert!(matches!(
        control::bind(&file, None),
        Err(ControlError::NotASocket { .. })
    ));
}

#[test]
fn requests_are_one_json_object_tagged_by_op() {
    let add = ControlRequest::QuarantineAdd {
        address: "10.20.3.4".into(),
        reason: "EDR agent missing".into(),
    };
    assert_eq!(
        serde_json::to_value(&add).unwrap(),
        json!({"op": "quarantine_add", "address": "10.20.3.4", "reason": "EDR agent missing"})
    );
    assert_eq!(
        serde_json::to_value(ControlRequest::QuarantineList).unwrap(),
        json!({"op": "quarantine_list"})
    );
    let remove: ControlRequest =
        serde_json::from_str(r#"{"op":"quarantine_remove","address":"fd00::1"}"#).unwrap();
    assert_eq!(
        remove,
        ControlRequest::QuarantineRemove {
            address: "fd00::1".into(),
            reason: None
        }
    );
}
