//! A lab of network namespaces on the real kernel: one router namespace and one namespace per
//! host, each host on a veth `eth0` behind a per-subnet bridge in the router.
//!
//! Everything the lab creates is removed when [`Lab`] is dropped, also while a test panics;
//! [`cleanup_on_signals`] covers Ctrl-C in binaries, and a new lab removes what a killed
//! process left behind. Traffic only ever flows between the lab's own namespaces.
//!
//! ```text
//!   host ns "…-pacs"            router ns "…-r"
//!   eth0 10.30.0.10/24  <-veth-> h2 ─┐
//!   host ns "…-pacs-ws"              ├─ bridge b2 10.30.0.1/24, fd00:30::1/64
//!   eth0 10.30.0.20/24  <-veth-> h3 ─┘
//! ```
//!
//! Neighbour entries (ARP and NDP) are installed statically on every link. The enforcer judges
//! every IP packet a host receives, ICMPv6 included, so dynamic neighbour discovery could be
//! dropped by the policy under test and would add packets the tests cannot account for.

mod enforcer;
mod http;
mod metrics;
mod netns;
mod observer;
mod probe;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

pub use enforcer::{
    Counters, DaemonFiles, Enforcer, NetnsEntry, ShutdownCounters, dies_with_this_process,
    enforcer_bin,
};
pub use metrics::{Metrics, Sample};
pub use netns::{
    cleanup_all, cleanup_on_signals, delete_tracked as delete_tracked_netns, in_netns,
    of_dead_process, remove_stale as remove_stale_netns, track as track_netns,
};
pub use observer::{ObservedLine, Observer};
pub use probe::{Probe, Proto, Services};

/// Errors from building or driving the lab. Messages carry the failing command's output.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid lab topology: {0}")]
    Topology(String),
    #[error("no host named {0:?} in this lab")]
    UnknownHost(String),
    #[error("enforcer binary: {0}")]
    EnforcerBinary(String),
    #[error("enforcer on {host}: {message}")]
    Enforcer { host: String, message: String },
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;

pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let context = context.into();
    move |source| LabError::Io { context, source }
}

/// A clinical segment of the example policy (`segments/`), by network address.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub name: &'static str,
    /// The /24 network.
    pub v4: Ipv4Addr,
    /// The /64 network.
    pub v6: Ipv6Addr,
}

/// The segments of the example policy, in the order the demo lists them.
pub const CLINICAL_SEGMENTS: [Segment; 7] = [
    segment("radiology", 10),
    segment("ehr-core", 20),
    segment("pacs", 30),
    segment("pharmacy", 40),
    segment("lab", 50),
    segment("billing", 60),
    segment("icu-telemetry", 70),
];

/// `10.N.0.0/24` and `fd00:N::/64`, where N is written in decimal in both (fd00:30:: for
/// 10.30.0.0), as in the example policy.
const fn segment(name: &'static str, n: u8) -> Segment {
    let hex = ((n / 10) as u16) << 4 | (n % 10) as u16;
    Segment {
        name,
        v4: Ipv4Addr::new(10, n, 0, 0),
        v6: Ipv6Addr::new(0xfd00, hex, 0, 0, 0, 0, 0, 0),
    }
}

/// Suffix of a segment's workstation host, the source of probes into other segments.
pub const WORKSTATION_SUFFIX: &str = "-ws";

/// Name of the host outside every segment (the network operations centre).
pub const NOC_HOST: &str = "noc";

/// Sets up test logging (`RUST_LOG`, default `warn`) and checks the test runs as root, which
/// every lab test needs (network namespaces, XDP and TC).
pub fn init_test() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the end-to-end tests create network namespaces and attach XDP and TC: run them as \
         root (`cargo xtask test`)"
    );
}

/// The example hospital policy, `segments/`.
pub fn example_policy_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../segments")
}

/// The standard hospital: for each clinical segment a server named after the segment at `.10`
/// (where the enforcer runs) and a workstation `<segment>-ws` at `.20`, plus a NOC host at
/// 10.99.0.10 / fd00:99::10 in no segment.
///
/// Sources (workstations) and destinations (servers) are separate hosts so that each server's
/// counters count only the probes sent to it; `e2e_stateful` covers hosts that both send and
/// receive while enforcing.
pub fn clinical_hosts() -> Vec<HostSpec> {
    let mut hosts = Vec::new();
    for seg in &CLINICAL_SEGMENTS {
        hosts.push(HostSpec::clinical(seg.name, seg.name, 10));
        hosts.push(HostSpec::clinical(
            format!("{}{WORKSTATION_SUFFIX}", seg.name),
            seg.name,
            20,
        ));
    }
    hosts.push(HostSpec::new(
        NOC_HOST,
        None,
        Ipv4Addr::new(10, 99, 0, 10),
        Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x10),
    ));
    hosts
}

/// What to build for one host. Data, so tests can add hosts outside the clinical segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSpec {
    /// Short name (`[a-z0-9-]`, at most 24 characters), unique in the lab.
    pub name: String,
    /// The policy segment the address belongs to, for reports; `None` for e.g. a NOC host.
    pub segment: Option<String>,
    pub v4: Ipv4Addr,
    pub v4_prefix: u8,
    pub v6: Ipv6Addr,
    pub v6_prefix: u8,
}

impl HostSpec {
    /// A host at `v4`/24 and `v6`/64; its gateway is the first address of each subnet.
    pub fn new(name: impl Into<String>, segment: Option<&str>, v4: Ipv4Addr, v6: Ipv6Addr) -> Self {
        Self {
            name: name.into(),
            segment: segment.map(str::to_owned),
            v4,
            v4_prefix: 24,
            v6,
            v6_prefix: 64,
        }
    }

    /// Host number `n` of a clinical segment: `10.30.0.n` and `fd00:30::n` (n in hex, so 10 is
    /// written `fd00:30::10` like its IPv4 twin).
    ///
    /// # Panics
    /// If `segment` is not in [`CLINICAL_SEGMENTS`].
    pub fn clinical(name: impl Into<String>, segment: &str, n: u8) -> Self {
        let seg = CLINICAL_SEGMENTS
            .iter()
            .find(|s| s.name == segment)
            .unwrap_or_else(|| panic!("{segment:?} is not a clinical segment"));
        let [a, b, c, _] = seg.v4.octets();
        let hex = u16::from(n / 10) << 4 | u16::from(n % 10);
        let v6 = u128::from(seg.v6) | u128::from(hex);
        Self::new(name, Some(segment), Ipv4Addr::new(a, b, c, n), v6.into())
    }

    fn v4_network(&self) -> u32 {
        u32::from(self.v4) & mask32(self.v4_prefix)
    }

    fn v6_network(&self) -> u128 {
        u128::from(self.v6) & mask128(self.v6_prefix)
    }

    fn gateway_v4(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.v4_network() + 1)
    }

    fn gateway_v6(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.v6_network() + 1)
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// A host of a running lab.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub segment: Option<String>,
    /// Name under /run/netns.
    pub netns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Host {
    /// The host's address in the family of `v6`.
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { self.v6.into() } else { self.v4.into() }
    }
}

/// Where the BPF file system is mounted; `--persist` daemons of the lab pin under it.
const BPFFS: &str = "/sys/fs/bpf";

/// Prefix of every namespace the lab creates: `msl<pid>x<n>-<role>`. The pid lets a later run
/// tell leftovers of a dead process from namespaces of a live one.
const NETNS_PREFIX: &str = "msl";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running lab. Dropping it stops what still runs in it and deletes its namespaces.
pub struct Lab {
    id: String,
    router: String,
    hosts: Vec<Host>,
}

impl Lab {
    /// Builds the namespaces, links, addresses, routes and static neighbours for `specs`.
    pub fn new(specs: &[HostSpec]) -> Result<Self> {
        validate(specs)?;
        netns::remove_stale(NETNS_PREFIX);
        netns::remove_stale_pins(Path::new(BPFFS), NETNS_PREFIX);
        remove_stale_run_dirs();
        let id = format!(
            "{NETNS_PREFIX}{}x{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let hosts = specs
            .iter()
            .map(|spec| Host {
                name: spec.name.clone(),
                segment: spec.segment.clone(),
                netns: format!("{id}-{}", spec.name),
                v4: spec.v4,
                v6: spec.v6,
            })
            .collect();
        // From here on, Drop cleans up whatever part of the lab exists.
        let lab = Self {
            router: format!("{id}-r"),
            id,
            hosts,
        };
        lab.build(specs)?;
        tracing::info!(lab = %lab.id, hosts = lab.hosts.len(), "lab ready");
        Ok(lab)
    }

    fn build(&self, specs: &[HostSpec]) -> Result<()> {
        let all_netns: Vec<&str> = std::iter::once(self.router.as_str())
            .chain(self.hosts.iter().map(|h| h.netns.as_str()))
            .collect();
        for ns in &all_netns {
            netns::track(ns);
        }
        netns::ip_batch(None, all_netns.iter().map(|ns| format!("netns add {ns}")))?;

        // Addresses are added with `nodad`; these cover the link-local ones too.
        let dad_off = [
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
        ];
        for host in &self.hosts {
            netns::sysctls(&host.netns, &dad_off)?;
        }
        netns::sysctls(
            &self.router,
            &[
                dad_off[0],
                dad_off[1],
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv6/conf/all/forwarding", "1"),
            ],
        )?;

        // One bridge per IPv4 subnet; hosts of one subnet share an L2 segment.
        let mut subnets: BTreeMap<(u32, u8), usize> = BTreeMap::new();
        for spec in specs {
            let next = subnets.len();
            subnets
                .entry((spec.v4_network(), spec.v4_prefix))
                .or_insert(next);
        }
        let subnet_of = |spec: &HostSpec| subnets[&(spec.v4_network(), spec.v4_prefix)];

        let mut router = vec!["link set lo up".to_owned()];
        let mut bridge_done = vec![false; subnets.len()];
        for (i, (spec, host)) in specs.iter().zip(&self.hosts).enumerate() {
            let s = subnet_of(spec);
            if !std::mem::replace(&mut bridge_done[s], true) {
                router.extend([
                    format!(
                        "link add b{s} address {} type bridge mcast_snooping 0",
                        mac(bridge_mac(s))
                    ),
                    format!("addr add {}/{} dev b{s}", spec.gateway_v4(), spec.v4_prefix),
                    format!(
                        "addr add {}/{} dev b{s} nodad",
                        spec.gateway_v6(),
                        spec.v6_prefix
                    ),
                    format!("link set b{s} up"),
                ]);
            }
            router.extend([
                format!(
                    "link add h{i} type veth peer name eth0 address {} netns {}",
                    mac(host_mac(i)),
                    host.netns
                ),
                format!("link set h{i} master b{s}"),
                format!("link set h{i} up"),
                format!(
                    "neigh replace {} lladdr {} dev b{s} nud permanent",
                    spec.v4,
                    mac(host_mac(i))
                ),
                format!(
                    "neigh replace {} lladdr {} dev b{s} nud permanent",
                    spec.v6,
                    mac(host_mac(i))
                ),
            ]);
        }
        netns::ip_batch(Some(&self.router), router)?;

        for (i, (spec, host)) in specs.iter().zip(&self.hosts).enumerate() {
            let s = subnet_of(spec);
            let gw_mac = mac(bridge_mac(s));
            let mut cmds = vec![
                "link set lo up".to_owned(),
                format!("addr add {}/{} dev eth0", spec.v4, spec.v4_prefix),
                format!("addr add {}/{} dev eth0 nodad", spec.v6, spec.v6_prefix),
                "link set eth0 up".to_owned(),
                format!("route add default via {}", spec.gateway_v4()),
                format!("route add default via {}", spec.gateway_v6()),
                format!(
                    "neigh replace {} lladdr {gw_mac} dev eth0 nud permanent",
                    spec.gateway_v4()
                ),
                format!(
                    "neigh replace {} lladdr {gw_mac} dev eth0 nud permanent",
                    spec.gateway_v6()
                ),
            ];
            // Neighbours on the same bridge are reached directly, not through the router.
            for (j, peer) in specs.iter().enumerate() {
                if j != i && subnet_of(peer) == s {
                    for addr in [IpAddr::from(peer.v4), IpAddr::from(peer.v6)] {
                        cmds.push(format!(
                            "neigh replace {addr} lladdr {} dev eth0 nud permanent",
                            mac(host_mac(j))
                        ));
                    }
                }
            }
            netns::ip_batch(Some(&host.netns), cmds)?;
        }
        Ok(())
    }

    /// Unique id of this lab, the prefix of its namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where this lab's daemons keep their files ([`DaemonFiles`]).
    pub fn run_dir(&self) -> std::path::PathBuf {
        run_dir(&self.id)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| LabError::UnknownHost(name.to_owned()))
    }

    pub fn router_netns(&self) -> &str {
        &self.router
    }

    /// The router's end of `host`'s link (a bridge port): where the router receives what the
    /// host sends, like a gateway's NIC towards that host.
    pub fn router_port(&self, host: &str) -> Result<String> {
        let i = self
            .hosts
            .iter()
            .position(|h| h.name == host)
            .ok_or_else(|| LabError::UnknownHost(host.to_owned()))?;
        Ok(format!("h{i}"))
    }

    /// The router's end of every host link.
    pub fn router_ports(&self) -> Vec<String> {
        (0..self.hosts.len()).map(|i| format!("h{i}")).collect()
    }

    /// Runs `f` on a thread inside `host`'s namespace; sockets it opens live there.
    pub fn in_host<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.host(host)?.netns, f)
    }

    /// `ip netns exec <ns> <program>`: add arguments and run it (e.g. `ping`).
    pub fn command(&self, host: &str, program: &str) -> Result<Command> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.host(host)?.netns, program]);
        Ok(cmd)
    }

    /// Starts TCP echo listeners and UDP echo responders on `host`'s addresses; they stop when
    /// the returned guard is dropped.
    pub fn serve(&self, host: &str, tcp_ports: &[u16], udp_ports: &[u16]) -> Result<Services<'_>> {
        Services::start(self.host(host)?, tcp_ports, udp_ports)
    }

    /// Whether a TCP connection from `from` to `to:port` is set up and echoes a few bytes
    /// within `timeout`. A dropped SYN yields `false` after `timeout`.
    ///
    /// # Panics
    /// If `from` is not a host of this lab.
    pub fn tcp_connect(&self, from: &str, to: IpAddr, port: u16, timeout: Duration) -> bool {
        self.run_probes(&[Probe::new(from, Proto::Tcp, to, port)], timeout)[0]
    }

    /// Whether a UDP datagram from `from` to `to:port` is echoed within `timeout`.
    ///
    /// # Panics
    /// If `from` is not a host of this lab.
    pub fn udp_probe(&self, from: &str, to: IpAddr, port: u16, timeout: Duration) -> bool {
        self.run_probes(&[Probe::new(from, Proto::Udp, to, port)], timeout)[0]
    }

    /// Runs `probes` in parallel; result `i` says whether probe `i` got its echo.
    ///
    /// # Panics
    /// If a probe's source is not a host of this lab.
    pub fn run_probes(&self, probes: &[Probe], timeout: Duration) -> Vec<bool> {
        probe::run_all(self, probes, timeout)
    }

    /// Starts the daemon in `host`'s namespace on its `eth0` and waits until it is ready.
    ///
    /// The daemon gets SIGTERM when the calling thread exits, so that a killed test process
    /// leaves nothing attached: call this from a thread that outlives the returned guard.
    pub fn start_enforcer(&self, host: &str, policy_dir: &Path) -> Result<Enforcer<'_>> {
        self.start_enforcer_with(host, policy_dir, &[])
    }

    /// [`Lab::start_enforcer`] with `args` appended to `enforcer run` (e.g.
    /// `["--metrics-addr", "127.0.0.1:9478", "--report-allowed"]`). Same thread caveat.
    pub fn start_enforcer_with(
        &self,
        host: &str,
        policy_dir: &Path,
        args: &[&str],
    ) -> Result<Enforcer<'_>> {
        self.start_enforcer_entered(host, policy_dir, args, NetnsEntry::IpNetnsExec)
    }

    /// [`Lab::start_enforcer_with`], entering the host's namespace as `entry` says
    /// ([`NetnsEntry::NetOnly`] for `--persist`, whose pins must outlive the daemon). Same
    /// thread caveat.
    pub fn start_enforcer_entered(
        &self,
        host: &str,
        policy_dir: &Path,
        args: &[&str],
        entry: NetnsEntry,
    ) -> Result<Enforcer<'_>> {
        let bin = enforcer_bin()?;
        let host = self.host(host)?;
        let mut enforcer = Enforcer::spawn_in(
            &host.name,
            &host.netns,
            &self.id,
            &["eth0"],
            &bin,
            policy_dir,
            args,
            entry,
        )?;
        let timeout = ready_timeout();
        enforcer.wait_ready(std::time::Instant::now() + timeout, timeout)?;
        Ok(enforcer)
    }

    /// A pin directory for a `--persist` daemon on `host`, unique to this lab: under
    /// /sys/fs/bpf, named like the lab's namespaces so that a later lab removes it if this
    /// process dies without cleaning up. Not created.
    pub fn pin_dir(&self, host: &str) -> Result<std::path::PathBuf> {
        let host = self.host(host)?;
        Ok(Path::new(BPFFS).join(&host.netns))
    }

    /// What is attached to `iface` of `host`: XDP programs (`ip -d link`), TC egress filters
    /// (`tc filter show`) and TCX egress programs (`BPF_PROG_QUERY`, Linux 6.6 and later), one
    /// line each; empty when nothing is.
    pub fn bpf_attachments(&self, host: &str, iface: &str) -> Result<Vec<String>> {
        let netns = self.host(host)?.netns.clone();
        let run = |program: &str, args: &[&str]| -> Result<String> {
            let out = Command::new(program)
                .args(["-n", &netns])
                .args(args)
                .output()
                .map_err(io_error(format!("running {program} (iproute2)")))?;
            if !out.status.success() {
                return Err(LabError::Command {
                    command: format!("{program} -n {netns} {}", args.join(" ")),
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let mut found: Vec<String> = run("ip", &["-d", "link", "show", "dev", iface])?
            .lines()
            .filter(|line| line.contains("prog/xdp"))
            .map(|line| format!("xdp: {}", line.trim()))
            .collect();
        found.extend(
            run("tc", &["filter", "show", "dev", iface, "egress"])?
                .lines()
                .filter(|line| !line.trim().is_empty())
                .map(|line| format!("tc egress filter: {}", line.trim())),
        );
        let tcx = in_netns(&netns, || {
            aya::programs::SchedClassifier::query_tcx(iface, aya::programs::TcAttachType::Egress)
        })?;
        match tcx {
            Ok((_, programs)) => found.extend(programs.iter().map(|program| {
                format!(
                    "tcx egress: id {} {}",
                    program.id(),
                    program.name_as_str().unwrap_or("?")
                )
            })),
            // Kernels before 6.6 have no TCX to query.
            Err(error)
                if aya::util::KernelVersion::current()
                    .is_ok_and(|version| version >= aya::util::KernelVersion::new(6, 6, 0)) =>
            {
                return Err(LabError::Command {
                    command: format!("BPF_PROG_QUERY tcx egress {iface} in {netns}"),
                    status: "failed".into(),
                    stderr: error.to_string(),
                });
            }
            Err(_) => {}
        }
        Ok(found)
    }

    /// Runs `enforcer ARGS` (e.g. `detach --pin-dir DIR`) in `host`'s network namespace only,
    /// and waits for it.
    pub fn enforcer_command(&self, host: &str, args: &[&str]) -> Result<std::process::Output> {
        let bin = enforcer_bin()?;
        let mut cmd = enforcer::command_in(&self.host(host)?.netns, NetnsEntry::NetOnly, &bin)?;
        cmd.args(args)
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null());
        cmd.output()
            .map_err(io_error(format!("running enforcer {}", args.join(" "))))
    }

    /// Starts the daemon in the router namespace as a gateway on `ifaces` (see
    /// [`Lab::router_ports`]) and waits until it is ready. Same thread caveat as
    /// [`Lab::start_enforcer`].
    pub fn start_router_enforcer(
        &self,
        ifaces: &[&str],
        policy_dir: &Path,
    ) -> Result<Enforcer<'_>> {
        self.start_router_enforcer_with(ifaces, policy_dir, &[])
    }

    /// [`Lab::start_router_enforcer`] with `args` appended to `enforcer run` (e.g.
    /// `["--flow-log", PATH]`). Same thread caveat.
    pub fn start_router_enforcer_with(
        &self,
        ifaces: &[&str],
        policy_dir: &Path,
        args: &[&str],
    ) -> Result<Enforcer<'_>> {
        let bin = enforcer_bin()?;
        let mut enforcer = Enforcer::spawn_in(
            "router",
            &self.router,
            &self.id,
            ifaces,
            &bin,
            policy_dir,
            args,
            NetnsEntry::IpNetnsExec,
        )?;
        let timeout = ready_timeout();
        enforcer.wait_ready(std::time::Instant::now() + timeout, timeout)?;
        Ok(enforcer)
    }

    /// Starts daemons on several hosts at once (loading is the slow part), then waits for all.
    pub fn start_enforcers(&self, hosts: &[&str], policy_dir: &Path) -> Result<Vec<Enforcer<'_>>> {
        let bin = enforcer_bin()?;
        let mut started = Vec::with_capacity(hosts.len());
        for host in hosts {
            started.push(Enforcer::spawn(self.host(host)?, &bin, policy_dir, &[])?);
        }
        let timeout = ready_timeout();
        let deadline = std::time::Instant::now() + timeout;
        for enforcer in &mut started {
            enforcer.wait_ready(deadline, timeout)?;
        }
        Ok(started)
    }
}

/// How long daemons get to load and attach: 30 s, or `ENFORCER_READY_TIMEOUT` seconds. Under
/// QEMU without KVM (`cargo xtask vm-test`) seven daemons verifying at once need longer.
fn ready_timeout() -> Duration {
    let secs = std::env::var("ENFORCER_READY_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Enforcer guards borrow the lab, so they are gone by now; a daemon that escaped its
        // guard (mem::forget) still dies before its namespace goes.
        netns::kill_daemons_in(&self.id);
        let names: Vec<String> = std::iter::once(self.router.clone())
            .chain(self.hosts.iter().map(|h| h.netns.clone()))
            .collect();
        // Pins a test left behind (its detach guard did not run): without them and without the
        // namespaces, nothing of the programs remains.
        for name in &names {
            let pins = Path::new(BPFFS).join(name);
            if pins.exists() {
                tracing::warn!(pins = %pins.display(), "removing pins the lab test left");
                let _ = std::fs::remove_dir_all(&pins);
            }
        }
        netns::delete(&names);
        let _ = std::fs::remove_dir_all(run_dir(&self.id));
        tracing::info!(lab = %self.id, "lab removed");
    }
}

/// Where the daemons of lab `id` keep their control sockets, state files and audit logs.
pub fn run_dir(id: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(id)
}

/// Run directories of labs whose process died without cleaning up.
fn remove_stale_run_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let lab_dir = rest[pid.len()..].starts_with('x');
        if lab_dir && !pid.is_empty() && !Path::new("/proc").join(&pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn validate(specs: &[HostSpec]) -> Result<()> {
    if specs.is_empty() || specs.len() > 200 {
        return Err(LabError::Topology("a lab has 1 to 200 hosts".into()));
    }
    let mut v6_of_subnet = BTreeMap::new();
    for (i, spec) in specs.iter().enumerate() {
        let name_ok = !spec.name.is_empty()
            && spec.name.len() <= 24
            && spec
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(LabError::Topology(format!(
                "host name {:?} must be 1-24 characters of [a-z0-9-]",
                spec.name
            )));
        }
        if specs[..i].iter().any(|s| s.name == spec.name) {
            return Err(LabError::Topology(format!(
                "duplicate host {:?}",
                spec.name
            )));
        }
        if !(8..=30).contains(&spec.v4_prefix) || !(64..=126).contains(&spec.v6_prefix) {
            return Err(LabError::Topology(format!(
                "{}: prefixes must be /8../30 and /64../126",
                spec.name
            )));
        }
        let (v4_net, v6_net) = (spec.v4_network(), spec.v6_network());
        if u32::from(spec.v4) <= v4_net + 1 || u128::from(spec.v6) <= v6_net + 1 {
            return Err(LabError::Topology(format!(
                "{}: the first two addresses of a subnet are the network and the gateway",
                spec.name
            )));
        }
        let subnet = (v4_net, spec.v4_prefix);
        let v6 = (v6_net, spec.v6_prefix);
        if *v6_of_subnet.entry(subnet).or_insert(v6) != v6 {
            return Err(LabError::Topology(format!(
                "{}: hosts sharing an IPv4 subnet must share the IPv6 subnet",
                spec.name
            )));
        }
        let clash = specs[..i]
            .iter()
            .any(|s| s.v4 == spec.v4 || s.v6 == spec.v6);
        if clash {
            return Err(LabError::Topology(format!("{}: address in use", spec.name)));
        }
    }
    Ok(())
}

/// Locally administered MACs; unique within a lab, which is one L2 domain per bridge.
fn host_mac(i: usize) -> [u8; 6] {
    [0x02, 0x6d, 0x73, 0x6c, 0x00, i as u8]
}

fn bridge_mac(s: usize) -> [u8; 6] {
    [0x02, 0x6d, 0x73, 0x6c, 0x01, s as u8]
}

fn mac(bytes: [u8; 6]) -> String {
    bytes.map(|b| format!("{b:02x}")).join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clinical_addresses() {
        let pacs = HostSpec::clinical("pacs", "pacs", 10);
        assert_eq!(pacs.v4, Ipv4Addr::new(10, 30, 0, 10));
        assert_eq!(pacs.v6, "fd00:30::10".parse::<Ipv6Addr>().unwrap());
        assert_eq!(pacs.gateway_v4(), Ipv4Addr::new(10, 30, 0, 1));
        assert_eq!(pacs.gateway_v6(), "fd00:30::1".parse::<Ipv6Addr>().unwrap());
        let icu = HostSpec::clinical("icu", "icu-telemetry", 20);
        assert_eq!(icu.v6, "fd00:70::20".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn rejects_bad_topologies() {
        let a = HostSpec::clinical("a", "lab", 10);
        assert!(validate(&[a.clone(), a.clone()]).is_err());
        let mut b = HostSpec::clinical("b", "lab", 11);
        b.v6 = "fd00:99::11".parse().unwrap();
        assert!(validate(&[a.clone(), b]).is_err());
        let gw = HostSpec::clinical("gw", "lab", 1);
        assert!(validate(&[gw]).is_err());
        assert!(validate(&[a, HostSpec::clinical("Bad_Name", "lab", 12)]).is_err());
    }
}
