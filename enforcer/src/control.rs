//! The control interface of `enforcer run`: a local Unix socket (`--control-socket PATH`,
//! default [`DEFAULT_SOCKET`]) through which `enforcer quarantine …`, `enforcer breakglass …`
//! and `enforcer status` change or read what the running daemon enforces. Nothing that changes
//! enforcement listens on a TCP port.
//!
//! Security: the socket is mode 0600, owned by the daemon's user (root), or mode 0660 with the
//! group given by `--control-socket-group`; the file mode is the access control. The daemon
//! also checks the client's credentials (`SO_PEERCRED`) on every connection — root, the
//! daemon's own user, or a member of that group — so a socket whose mode was loosened by hand
//! still refuses others, and names each client in the audit log.
//!
//! Wire protocol: the client connects, writes one JSON object on one line
//! (`{"op":"<snake_case op>", …fields}`, see [`ControlRequest`]), reads one JSON line back —
//! `{"ok":true,"result":…}` or `{"ok":false,"error":"<message for a human>"}` — and the
//! connection ends.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{
        fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{debug, warn};

use crate::daemon::Daemon;

/// The default `--control-socket` of the daemon and of the client commands.
pub const DEFAULT_SOCKET: &str = "/run/enforcer/control.sock";

/// The longest request line the daemon reads.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// How long the daemon waits for a client's request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for the daemon's answer (cutting a quarantined host's flows walks
/// the connection table).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// A request, as the client writes it: `{"op":"quarantine_add","address":"10.20.3.4",…}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// What is in force: policy revision, quarantined hosts, active grants.
    Status,
    /// Move `address` into the `quarantine` segment.
    QuarantineAdd { address: String, reason: String },
    /// Give `address` back its own segment.
    QuarantineRemove {
        address: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The quarantined hosts.
    QuarantineList,
    /// Let members of segment `from` reach members of `to` on `ports` for `ttl`.
    BreakglassGrant {
        from: String,
        to: String,
        ports: Vec<String>,
        ttl: String,
        reason: String,
    },
    /// The break-glass grants in force.
    BreakglassList,
    /// End grant `id` now.
    BreakglassRevoke {
        id: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

/// The one place requests meet the daemon.
pub fn dispatch(
    daemon: &Daemon,
    request: ControlRequest,
    peer: &Peer,
) -> Result<Value, ControlError> {
    match request {
        ControlRequest::Status => daemon.status(peer),
        ControlRequest::QuarantineAdd { address, reason } => {
            daemon.quarantine_add(&address, &reason, peer)
        }
        ControlRequest::QuarantineRemove { address, reason } => {
            daemon.quarantine_remove(&address, reason.as_deref(), peer)
        }
        ControlRequest::QuarantineList => daemon.quarantine_list(peer),
        ControlRequest::BreakglassGrant {
            from,
            to,
            ports,
            ttl,
            reason,
        } => daemon.breakglass_grant(&from, &to, &ports, &ttl, &reason, peer),
        ControlRequest::BreakglassList => daemon.breakglass_list(peer),
        ControlRequest::BreakglassRevoke { id, reason } => {
            daemon.breakglass_revoke(id, reason.as_deref(), peer)
        }
    }
}

/// The answer line.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Response {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Who is on the other end of a connection, from `SO_PEERCRED`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// The user name of `uid` (`uid N` when it has none).
    pub user: String,
}

impl Peer {
    /// The peer as audit records name the actor.
    pub fn actor(&self) -> Value {
        serde_json::json!({
            "user": self.user,
            "uid": self.uid,
            "gid": self.gid,
            "pid": self.pid,
        })
    }
}

/// Errors of the control interface, on both ends. The `Display` text is what the client
/// shows.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    // The client's view.
    #[error(
        "no enforcer daemon is listening on {socket}: is `enforcer run` running? The daemon and \
         this command must use the same --control-socket PATH ({source})"
    )]
    NoDaemon {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "permission denied on the control socket {socket}: it belongs to root with mode 0600, or \
         to the group named by `enforcer run --control-socket-group` with mode 0660; run this \
         command as root (sudo) or as a member of that group"
    )]
    PermissionDenied { socket: PathBuf },
    /// The daemon refused or failed the request; its message.
    #[error("{0}")]
    Rejected(String),
    #[error("control socket {socket}: {context}: {source}")]
    Io {
        socket: PathBuf,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {socket}: the daemon's answer is not valid: {message}")]
    Protocol { socket: PathBuf, message: String },

    // The daemon's view (sent to the client as the error text).
    /// A request that is not one JSON object of a known op with the right fields.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A well-formed request with a bad value (address, reason, ...).
    #[error("{0}")]
    Invalid(String),
    /// The daemon could not carry out a valid request; nothing changed.
    #[error("{0}")]
    Failed(String),
    #[error(
        "permission denied: {user} (uid {uid}) may not use the enforcer's control socket (root, \
         the daemon's user and members of the --control-socket-group only)"
    )]
    NotAuthorized { user: String, uid: u32 },

    // Setting up the socket.
    #[error(
        "another enforcer daemon is already listening on {socket}; give each daemon its own \
         --control-socket"
    )]
    AlreadyListening { socket: PathBuf },
    #[error("{socket} exists and is not a socket; remove it or choose another --control-socket")]
    NotASocket { socket: PathBuf },
    #[error("--control-socket-group {group}: no such group")]
    UnknownGroup { group: String },
}

fn io_error(socket: &Path, context: &'static str) -> impl FnOnce(std::io::Error) -> ControlError {
    let socket = socket.to_path_buf();
    move |source| ControlError::Io {
        socket,
        context,
        source,
    }
}

/// Sends `request` to the daemon listening on `socket` and returns its result.
pub fn request(socket: &Path, request: &ControlRequest) -> Result<Value, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        std::io::ErrorKind::PermissionDenied => ControlError::PermissionDenied {
            socket: socket.to_path_buf(),
        },
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ControlError::NoDaemon {
                socket: socket.to_path_buf(),
                source,
            }
        }
        _ => io_error(socket, "connecting")(source),
    })?;
    stream
        .set_read_timeout(Some(RESPONSE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(RESPONSE_TIMEOUT)))
        .map_err(io_error(socket, "setting timeouts"))?;
    let mut line = serde_json::to_string(request).map_err(|error| ControlError::Protocol {
        socket: socket.to_path_buf(),
        message: error.to_string(),
    })?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(io_error(socket, "sending the request"))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(io_error(socket, "reading the answer"))?;
    if answer.trim().is_empty() {
        return Err(ControlError::Protocol {
            socket: socket.to_path_buf(),
            message: "the daemon closed the connection without answering (see its log)".into(),
        });
    }
    let response: Response =
        serde_json::from_str(answer.trim()).map_err(|error| ControlError::Protocol {
            socket: socket.to_path_buf(),
            message: format!("{error}: {}", answer.trim()),
        })?;
    match response {
        Response {
            ok: true, result, ..
        } => Ok(result.unwrap_or(Value::Null)),
        Response { error, .. } => Err(ControlError::Rejected(
            error.unwrap_or_else(|| "the daemon refused the request".into()),
        )),
    }
}

/// What handles a request on the daemon's side (the daemon: [`dispatch`]; tests: a closure).
pub type Handler = Arc<dyn Fn(ControlRequest, &Peer) -> Result<Value, ControlError> + Send + Sync>;

/// Who may use the socket besides root.
#[derive(Clone, Copy, Debug)]
struct Authorization {
    daemon_uid: u32,
    group: Option<u32>,
}

impl Authorization {
    fn allows(&self, peer: &Peer) -> bool {
        if peer.uid == 0 || peer.uid == self.daemon_uid {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        peer.gid == group || supplementary_groups(peer.pid).contains(&group)
    }
}

/// The supplementary groups of process `pid` (empty when it cannot be read).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    if pid <= 0 {
        return Vec::new();
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("Groups:").map(|groups| {
                    groups
                        .split_whitespace()
                        .filter_map(|g| g.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

/// The bound control socket. Dropping it removes the socket file (when it is still ours).
pub struct ControlSocket {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    inode: u64,
    authorization: Authorization,
}

impl std::fmt::Debug for ControlSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlSocket")
            .field("path", &self.path)
            .finish()
    }
}

/// Creates the socket at `path` (and its directory, mode 0755), mode 0600, or 0660 with group
/// `group` (a name or a number). A stale socket left by a daemon that died is replaced; a live
/// one is an error. Must be called inside a tokio runtime.
pub fn bind(path: &Path, group: Option<&str>) -> Result<ControlSocket, ControlError> {
    let gid = group.map(resolve_group).transpose()?;
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io_error(path, "creating its directory"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(ControlError::AlreadyListening {
                    socket: path.to_path_buf(),
                });
            }
            Err(_) => {
                debug!(socket = %path.display(), "removing a stale control socket");
                std::fs::remove_file(path).map_err(io_error(path, "removing a stale socket"))?;
            }
        },
        Ok(_) => {
            return Err(ControlError::NotASocket {
                socket: path.to_path_buf(),
            });
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error(path, "inspecting")(error)),
    }
    // Bound under a temporary name, given its mode and group, then renamed into place: the
    // socket never exists at PATH with the umask's permissions.
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "control.sock".into());
    let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let listener =
        std::os::unix::net::UnixListener::bind(&temporary).map_err(io_error(path, "binding"))?;
    let prepared = (|| {
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&temporary, None, Some(gid))?;
        }
        let mode = if gid.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&temporary, path)?;
        listener.set_nonblocking(true)?;
        std::fs::metadata(path).map(|meta| meta.ino())
    })();
    let inode = match prepared {
        Ok(inode) => inode,
        Err(error) => {
            let _ = std::fs::remove_file(&temporary);
            return Err(io_error(path, "setting its owner and mode")(error));
        }
    };
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(io_error(path, "listening"))?;
    Ok(ControlSocket {
        listener,
        path: path.to_path_buf(),
        inode,
        authorization: Authorization {
            // SAFETY: geteuid has no preconditions.
            daemon_uid: unsafe { libc::geteuid() },
            group: gid,
        },
    })
}

fn resolve_group(group: &str) -> Result<u32, ControlError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let unknown = || ControlError::UnknownGroup {
        group: group.to_string(),
    };
    let name = std::ffi::CString::new(group).map_err(|_| unknown())?;
    let mut entry = std::mem::MaybeUninit::<libc::group>::uninit();
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer outlives the use of `entry`.
    let status = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            entry.as_mut_ptr(),
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if status != 0 || found.is_null() {
        return Err(unknown());
    }
    // SAFETY: getgrnam_r filled `entry` (found is not null).
    Ok(unsafe { entry.assume_init() }.gr_gid)
}

/// The name of user `uid`, or `uid N`.
pub fn user_name(uid: u32) -> String {
    let mut entry = std::mem::MaybeUninit::<libc::passwd>::uninit();
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer outlives the use of `entry`.
    let status = unsafe {
        libc::getpwuid_r(
            uid,
            entry.as_mut_ptr(),
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if status != 0 || found.is_null() {
        return format!("uid {uid}");
    }
    // SAFETY: getpwuid_r filled `entry`, whose name points into `buffer`.
    unsafe { std::ffi::CStr::from_ptr(entry.assume_init().pw_name) }
        .to_string_lossy()
        .into_owned()
}

impl ControlSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until the task is dropped; each request runs `handler` on a
    /// blocking thread.
    pub async fn serve(self, handler: Handler) {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!(%error, "accepting a control connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = Arc::clone(&handler);
            let authorization = self.authorization;
            tokio::spawn(async move {
                if let Err(error) = connection(stream, handler, authorization).await {
                    debug!(%error, "control connection ended early");
                }
            });
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // Only our own socket: a newer daemon may have replaced it.
        if std::fs::metadata(&self.path).is_ok_and(|meta| meta.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn connection(
    stream: tokio::net::UnixStream,
    handler: Handler,
    authorization: Authorization,
) -> std::io::Result<()> {
    let credentials = stream.peer_cred()?;
    let peer = Peer {
        uid: credentials.uid(),
        gid: credentials.gid(),
        pid: credentials.pid().unwrap_or(0),
        user: user_name(credentials.uid()),
    };
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST_BYTES + 1);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let outcome = match read {
        Err(_) => Err(ControlError::Malformed(format!(
            "no request line within {REQUEST_TIMEOUT:?}"
        ))),
        Ok(Err(error)) => return Err(error),
        Ok(Ok(_)) if line.len() as u64 > MAX_REQUEST_BYTES => Err(ControlError::Malformed(
            format!("the request is longer than {MAX_REQUEST_BYTES} bytes"),
        )),
        Ok(Ok(_)) if !authorization.allows(&peer) => {
            warn!(user = %peer.user, uid = peer.uid, pid = peer.pid, "control request refused: not authorized");
            Err(ControlError::NotAuthorized {
                user: peer.user.clone(),
                uid: peer.uid,
            })
        }
        Ok(Ok(_)) => match parse_request(&line) {
            Err(error) => Err(error),
            Ok(request) => {
                debug!(user = %peer.user, ?request, "control request");
                let peer = peer.clone();
                tokio::task::spawn_blocking(move || handler(request, &peer))
                    .await
                    .unwrap_or_else(|error| {
                        Err(ControlError::Failed(format!(
                            "the daemon failed handling the request: {error}"
                        )))
                    })
            }
        },
    };
    let response = match outcome {
        Ok(result) => Response {
            ok: true,
            result: Some(result),
            error: None,
        },
        Err(error) => Response {
            ok: false,
            result: None,
            error: Some(error.to_string()),
        },
    };
    let mut answer = serde_json::to_vec(&response).unwrap_or_default();
    answer.push(b'\n');
    write.write_all(&answer).await?;
    write.shutdown().await
}

fn parse_request(line: &[u8]) -> Result<ControlRequest, ControlError> {
    let text = std::str::from_utf8(line)
        .map_err(|_| ControlError::Malformed("the request is not UTF-8".into()))?
        .trim();
    if text.is_empty() {
        return Err(ControlError::Malformed(
            "empty request; send one JSON object on one line, e.g. {\"op\":\"status\"}".into(),
        ));
    }
    serde_json::from_str(text).map_err(|error| {
        ControlError::Malformed(format!(
            "{error}; send one JSON object on one line, e.g. {{\"op\":\"status\"}}"
        ))
    })
}
