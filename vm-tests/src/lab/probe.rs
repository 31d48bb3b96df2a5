//! Echo services and connection probes.
//!
//! A probe counts as connected only when its payload comes back, so a dropped SYN, a dropped
//! datagram, a dropped reply or a reset all read as "not connected".

use std::{
    collections::HashMap,
    fmt,
    fs::File,
    io::{ErrorKind, Read as _, Write as _},
    marker::PhantomData,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use super::{Host, Lab, Result, io_error, netns};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IANA protocol number, as the policy evaluator wants it.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One connection attempt from a lab host to an address and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Probe {
    /// Source host name.
    pub from: String,
    pub proto: Proto,
    pub to: IpAddr,
    pub port: u16,
}

impl Probe {
    pub fn new(from: impl Into<String>, proto: Proto, to: IpAddr, port: u16) -> Self {
        Self {
            from: from.into(),
            proto,
            to,
            port,
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let to = SocketAddr::new(self.to, self.port);
        write!(f, "{} -> {to} {}", self.from, self.proto)
    }
}

/// Enough workers that a few hundred probes with sub-second timeouts finish in seconds; each
/// mostly sleeps in connect or recv.
const MAX_WORKERS: usize = 64;

/// Makes payloads unique so a late echo of an earlier probe cannot be taken for this one.
static PAYLOAD_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(super) fn run_all(lab: &Lab, probes: &[Probe], timeout: Duration) -> Vec<bool> {
    let sources: Vec<&str> = probes
        .iter()
        .map(|p| {
            lab.host(&p.from)
                .unwrap_or_else(|e| panic!("probe {p}: {e}"))
                .netns
                .as_str()
        })
        .collect();
    let next = AtomicUsize::new(0);
    let results = Mutex::new(vec![false; probes.len()]);
    let workers = probes.len().min(MAX_WORKERS);
    thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                // setns is per thread and cheap; keep one open fd per namespace.
                let mut files: HashMap<&str, File> = HashMap::new();
                let mut current: Option<&str> = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(probe) = probes.get(i) else { break };
                    let ns = sources[i];
                    if current != Some(ns) {
                        let file = match files.entry(ns) {
                            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                                netns::open(ns).unwrap_or_else(|e| panic!("probe {probe}: {e}")),
                            ),
                        };
                        netns::enter(file, ns).unwrap_or_else(|e| panic!("probe {probe}: {e}"));
                        current = Some(ns);
                    }
                    let target = SocketAddr::new(probe.to, probe.port);
                    let ok = match probe.proto {
                        Proto::Tcp => tcp_echo(target, timeout),
                        Proto::Udp => udp_echo(target, timeout),
                    };
                    tracing::trace!(%probe, ok, "probe");
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = ok;
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|e| e.into_inner())
}

fn payload() -> [u8; 16] {
    let n = PAYLOAD_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut p = *b"msl-probe-\0\0\0\0\0\0";
    p[10..].copy_from_slice(&n.to_be_bytes()[2..]);
    p
}

fn tcp_echo(target: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let Ok(mut stream) = TcpStream::connect_timeout(&target, timeout) else {
        return false;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero()
        || stream.set_read_timeout(Some(left)).is_err()
        || stream.set_write_timeout(Some(left)).is_err()
    {
        return false;
    }
    let sent = payload();
    let mut got = [0u8; 16];
    stream.write_all(&sent).is_ok() && stream.read_exact(&mut got).is_ok() && got == sent
}

fn udp_echo(target: SocketAddr, timeout: Duration) -> bool {
    let bind: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let Ok(socket) = UdpSocket::bind(bind) else {
        return false;
    };
    // Connected, so an ICMP unreachable surfaces as an error and stray datagrams are filtered.
    if socket.connect(target).is_err() || socket.set_read_timeout(Some(timeout)).is_err() {
        return false;
    }
    let sent = payload();
    if socket.send(&sent).is_err() {
        return false;
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 64];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) if buf[..n] == sent => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
            return false;
        }
    }
}

/// TCP echo listeners and UDP echo responders on one host's addresses. Dropping it stops them.
pub struct Services<'lab> {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _lab: PhantomData<&'lab Lab>,
}

enum Socket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Socket {
    fn fd(&self) -> RawFd {
        match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Udp(s) => s.as_raw_fd(),
        }
    }
}

impl Services<'_> {
    pub(super) fn start(host: &Host, tcp_ports: &[u16], udp_ports: &[u16]) -> Result<Self> {
        let file = netns::open(&host.netns)?;
        let (netns_name, addrs) = (host.netns.clone(), [IpAddr::from(host.v4), host.v6.into()]);
        let (tcp_ports, udp_ports) = (tcp_ports.to_vec(), udp_ports.to_vec());
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name(format!("svc-{}", host.name))
            .spawn({
                let stop = Arc::clone(&stop);
                move || {
                    let sockets = netns::enter(&file, &netns_name)
                        .and_then(|()| bind_all(&addrs, &tcp_ports, &udp_ports));
                    match sockets {
                        Ok(sockets) => {
                            let _ = bound_tx.send(Ok(()));
                            serve(&sockets, &stop);
                        }
                        Err(e) => {
                            let _ = bound_tx.send(Err(e));
                        }
                    }
                }
            })
            .map_err(io_error("spawning a service thread"))?;
        let bound = bound_rx.recv().unwrap_or_else(|_| {
            Err(io_error("service thread")(std::io::Error::other(
                "exited early",
            )))
        });
        let services = Self {
            stop,
            thread: Some(thread),
            _lab: PhantomData,
        };
        bound.map(|()| services)
    }
}

impl Drop for Services<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn bind_all(addrs: &[IpAddr], tcp_ports: &[u16], udp_ports: &[u16]) -> Result<Vec<Socket>> {
    let mut sockets = Vec::new();
    for &addr in addrs {
        for &port in tcp_ports {
            let at = SocketAddr::new(addr, port);
            let listener = TcpListener::bind(at).map_err(io_error(format!("tcp bind {at}")))?;
            listener
                .set_nonblocking(true)
                .map_err(io_error("nonblocking"))?;
            sockets.push(Socket::Tcp(listener));
        }
        for &port in udp_ports {
            let at = SocketAddr::new(addr, port);
            let socket = UdpSocket::bind(at).map_err(io_error(format!("udp bind {at}")))?;
            socket
                .set_nonblocking(true)
                .map_err(io_error("nonblocking"))?;
            sockets.push(Socket::Udp(socket));
        }
    }
    Ok(sockets)
}

/// One thread polls every socket; each accepted connection gets its own short-lived thread so
/// a slow client cannot hold up the others.
fn serve(sockets: &[Socket], stop: &AtomicBool) {
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        if n <= 0 {
            continue;
        }
        for (pfd, socket) in fds.iter_mut().zip(sockets) {
            if pfd.revents == 0 {
                continue;
            }
            pfd.revents = 0;
            match socket {
                Socket::Tcp(listener) => loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            thread::spawn(move || echo_stream(stream));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "accept");
                            break;
                        }
                    }
                },
                Socket::Udp(socket) => {
                    let mut buf = [0u8; 2048];
                    loop {
                        match socket.recv_from(&mut buf) {
                            Ok((n, peer)) => {
                                let _ = socket.send_to(&buf[..n], peer);
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) => {
                                // e.g. ECONNREFUSED queued from an earlier ICMP error.
                                tracing::debug!(error = %e, "recv_from");
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
}

fn echo_stream(mut stream: TcpStream) {
    let timeout = Some(Duration::from_secs(2));
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(timeout).is_err()
        || stream.set_write_timeout(timeout).is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}
