//! `enforcer`: the daemon and its CLI. A thin layer over the `enforcer` library.
use std::{
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use enforcer::{
    audit,
    control::{self, ControlRequest},
    daemon::{self, Daemon, RunOptions},
    events::EventHub,
    flow_log::{self, FlowLogTarget},
    http,
    observe::{self, ObserveOptions},
    persist,
};
use enforcer_common::direction;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{debug, error, info, warn};

#[derive(Parser)]
#[command(
    version,
    about = "eBPF micro-segmentation enforcer for hospital networks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    /// One readable line per flow.
    Text,
    /// One JSON event per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Compile the policy, load it into the kernel, attach to the interfaces and enforce until
    /// SIGINT or SIGTERM; then detach (with --persist: stay attached). Reloads when the policy
    /// directory changes or on SIGHUP.
    Run {
        /// Directory of segment policy files (e.g. `segments/`).
        #[arg(long)]
        policy: PathBuf,
        /// Interface to enforce on (repeat for several; on a gateway, name every interface
        /// traffic is forwarded between).
        #[arg(long = "iface", required = true)]
        ifaces: Vec<String>,
        /// Where `/metrics`, `/healthz`, `/readyz` and `/flows` are served.
        #[arg(long, default_value = "0.0.0.0:9477")]
        metrics_addr: SocketAddr,
        /// Write every flow event as a JSON line to FILE (`-` for stdout).
        #[arg(long)]
        flow_log: Option<PathBuf>,
        /// Rotate the flow log file when it reaches this many bytes.
        #[arg(long, default_value_t = 100 * 1024 * 1024)]
        flow_log_max_bytes: u64,
        /// Rotated flow log files to keep (FILE.1 ... FILE.N).
        #[arg(long, default_value_t = 5)]
        flow_log_keep: usize,
        /// Report the first packet of every allowed flow too, not only denials and audits.
        #[arg(long)]
        report_allowed: bool,
        /// Pin maps, programs and attachments in --pin-dir so that enforcement stays in force
        /// when the daemon exits for any reason; adopt what is pinned there at start (restarts
        /// and upgrades without a gap). `enforcer detach` removes it.
        #[arg(long)]
        persist: bool,
        /// Directory on the BPF file system for --persist (one per daemon on a machine). The
        /// file system is mounted at /sys/fs/bpf when missing.
        #[arg(long, default_value = persist::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The Unix socket `enforcer quarantine`, `breakglass` and `status` talk to (mode 0600;
        /// its directory is created).
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
        /// Let members of GROUP use the control socket too (mode 0660, that group).
        #[arg(long, value_name = "GROUP")]
        control_socket_group: Option<String>,
        /// Append the tamper-evident audit log (JSON lines, each with the SHA-256 of the
        /// previous one) to FILE; check it with `enforcer audit verify FILE`.
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
        /// How often the audit log gets a summary of denied packets per segment pair.
        #[arg(long, default_value = "5m", value_parser = parse_interval)]
        audit_summary_interval: Duration,
        /// Where run-time changes (quarantined hosts, break-glass grants) are kept across
        /// restarts.
        #[arg(long, default_value = enforcer::state::DEFAULT_STATE_FILE)]
        state_file: PathBuf,
    },
    /// Remove an enforcer started with --persist: its attachments, programs, maps and pin
    /// directory. Run it in the network namespace the daemon ran in, after stopping the daemon.
    Detach {
        /// The --pin-dir the daemon was started with.
        #[arg(long, default_value = persist::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// What the running daemon enforces: policy revision, quarantined hosts, active grants.
    Status {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Break-glass access: let a segment reach another on named ports for a limited time.
    Breakglass {
        #[command(subcommand)]
        command: BreakglassCommand,
    },
    /// Move hosts into the built-in `quarantine` segment of the running daemon (isolated in
    /// seconds, no policy change in Git), list them, give them back their segment.
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
    },
    /// Follow a running enforcer's flow stream, in the spirit of `hubble observe`.
    Observe {
        /// The enforcer's `--metrics-addr`.
        #[arg(long, default_value = "http://127.0.0.1:9477")]
        addr: String,
        /// Only flows with this verdict: allow, deny or audit.
        #[arg(long)]
        verdict: Option<String>,
        /// Only flows from this segment.
        #[arg(long)]
        from: Option<String>,
        /// Only flows to this segment.
        #[arg(long)]
        to: Option<String>,
        /// First show the kept flows of this period (e.g. 30s, 5m, 1h).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        /// Stop after the kept flows instead of following live ones.
        #[arg(long)]
        no_follow: bool,
    },
}

#[derive(Subcommand)]
enum QuarantineCommand {
    /// Quarantine ADDRESS: it reaches and is reached only as the quarantine segment's rules
    /// allow; its established connections are cut. Kept across restarts and reloads, audited.
    Add {
        /// One IPv4 or IPv6 host address.
        address: String,
        /// Why (kept in the state file and the audit log).
        #[arg(long)]
        reason: String,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The quarantined hosts.
    List {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Give ADDRESS its own segment back (for new flows).
    Remove {
        address: String,
        /// Why (kept in the audit log).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum BreakglassCommand {
    /// Open FROM -> TO on PORTS for TTL (at most `breakglass.max_ttl` of defaults.yaml);
    /// prints the grant's id and expiry. Audited; the kernel ends it on time even if the
    /// daemon is down.
    Grant {
        /// The segment of the devices that need access (e.g. icu-telemetry).
        #[arg(long)]
        from: String,
        /// The segment they must reach (e.g. pacs).
        #[arg(long)]
        to: String,
        /// Ports as a rule writes them: tcp/104, tcp/8080-8090, udp/any, icmp/echo-request,
        /// any; comma-separated or repeated.
        #[arg(long, required = true, value_delimiter = ',', num_args = 1..)]
        ports: Vec<String>,
        /// How long: 90s, 30m, 2h.
        #[arg(long)]
        ttl: String,
        /// Why (goes to the audit log), e.g. "code blue bed 12".
        #[arg(long)]
        reason: String,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The grants in force.
    List {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// End a grant now and cut the connections it admitted.
    Revoke {
        /// The grant's id (from `grant` or `list`).
        id: u32,
        /// Why (goes to the audit log).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of an audit log. Exit code 0: intact; 1: a record was edited,
    /// deleted, reordered or inserted (the line is named); 2: the file cannot be read.
    Verify {
        file: PathBuf,
        /// The log must reach at least this seq (one an external system saw): records deleted
        /// from the end cannot be seen by the chain alone.
        #[arg(long, value_name = "N")]
        expect_seq: Option<u64>,
        /// SEQ:SHA256 — record SEQ must have this hash (as reported by an earlier verify).
        #[arg(long, value_name = "SEQ:HASH", value_parser = parse_anchor)]
        anchor: Option<(u64, String)>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if interval < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(interval)
}

fn parse_anchor(text: &str) -> Result<(u64, String), String> {
    let (seq, hash) = text
        .split_once(':')
        .ok_or("expected SEQ:SHA256, e.g. 42:3f1c…")?;
    let seq = seq
        .parse()
        .map_err(|_| format!("{seq:?} is not a seq number"))?;
    if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{hash:?} is not a SHA-256 in hex (64 characters)"));
    }
    Ok((seq, hash.to_ascii_lowercase()))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match Cli::parse().command {
        // Client commands print their own errors and choose their exit codes.
        Command::Run {
            policy,
            ifaces,
            metrics_addr,
            flow_log,
            flow_log_max_bytes,
            flow_log_keep,
            report_allowed,
            persist,
            pin_dir,
            control_socket,
            control_socket_group,
            audit_log,
            audit_summary_interval,
            state_file,
        } => run(RunOptions {
            policy_dir: policy,
            ifaces,
            metrics_addr,
            flow_log,
            flow_log_max_bytes,
            flow_log_keep,
            report_allowed,
            persist,
            pin_dir,
            control_socket,
            control_socket_group,
            audit_log,
            audit_summary_interval,
            state_file,
        }),
        Command::Detach { pin_dir } => detach(&pin_dir),
        Command::Status {
            control_socket,
            output,
        } => return status(&control_socket, output),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    file,
                    expect_seq,
                    anchor,
                    output,
                },
        } => return audit_verify(&file, expect_seq, anchor, output),
        Command::Quarantine { command } => return quarantine(command),
        Command::Breakglass { command } => return breakglass(command),
        Command::Observe {
            addr,
            verdict,
            from,
            to,
            since,
            output,
            no_follow,
        } => observe(ObserveOptions {
            addr,
            verdict,
            from,
            to,
            since,
            output_json: matches!(output, Output::Json),
            follow: !no_follow,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn detach(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let report = persist::detach(pin_dir)
        .with_context(|| format!("detaching the enforcer pinned in {}", pin_dir.display()))?;
    let mut stdout = std::io::stdout().lock();
    for line in &report.lines {
        writeln!(stdout, "{line}").context("writing to stdout")?;
    }
    Ok(())
}

/// Sends one request to the daemon; prints the error and exits 1 when it fails.
fn control_request(
    socket: &std::path::Path,
    request: &ControlRequest,
) -> Result<serde_json::Value, ExitCode> {
    control::request(socket, request).map_err(|error| {
        eprintln!("error: {error}");
        ExitCode::FAILURE
    })
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn status(socket: &std::path::Path, output: Output) -> ExitCode {
    let status = match control_request(socket, &ControlRequest::Status) {
        Ok(status) => status,
        Err(code) => return code,
    };
    match output {
        Output::Json => print_json(&status),
        Output::Text => {
            let field = |name: &str| match &status[name] {
                serde_json::Value::String(text) => text.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            };
            println!("revision:      {}", field("revision"));
            println!("commit:        {}", field("commit"));
            println!("rules:         {}", field("rules"));
            println!("quarantined:   {}", field("quarantined"));
            println!("active grants: {}", field("active_grants"));
            if status["reload_failing"] == serde_json::Value::Bool(true) {
                println!("the newest policy on disk is rejected; an older one is in force");
            }
        }
    }
    ExitCode::SUCCESS
}

fn quarantine(command: QuarantineCommand) -> ExitCode {
    let (socket, request, output) = match command {
        QuarantineCommand::Add {
            address,
            reason,
            control_socket,
            output,
        } => (
            control_socket,
            ControlRequest::QuarantineAdd { address, reason },
            output,
        ),
        QuarantineCommand::List {
            control_socket,
            output,
        } => (control_socket, ControlRequest::QuarantineList, output),
        QuarantineCommand::Remove {
            address,
            reason,
            control_socket,
            output,
        } => (
            control_socket,
            ControlRequest::QuarantineRemove { address, reason },
            output,
        ),
    };
    let result = match control_request(&socket, &request) {
        Ok(result) => result,
        Err(code) => return code,
    };
    if matches!(output, Output::Json) {
        print_json(&result);
        return ExitCode::SUCCESS;
    }
    let text = |value: &serde_json::Value| value.as_str().unwrap_or("-").to_string();
    match request {
        ControlRequest::QuarantineAdd { .. } if result["already_quarantined"] == true => {
            let entry = &result["entry"];
            println!(
                "{} is already quarantined (since {} by {}: {})",
                text(&result["address"]),
                text(&entry["since"]),
                text(&entry["actor"]),
                text(&entry["reason"])
            );
        }
        ControlRequest::QuarantineAdd { .. } => {
            println!(
                "{} quarantined; {} established flows cut",
                text(&result["address"]),
                result["flows_cut"]
            );
            if let Some(error) = result["cut_error"].as_str() {
                eprintln!("warning: cutting its established flows failed: {error}");
            }
        }
        ControlRequest::QuarantineRemove { .. } => {
            println!(
                "{} released from quarantine (quarantined since {} by {})",
                text(&result["address"]),
                text(&result["released"]["since"]),
                text(&result["released"]["actor"])
            );
        }
        _ => {
            let hosts = result["quarantined"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if hosts.is_empty() {
                println!("no host is quarantined");
            }
            for host in hosts {
                println!(
                    "{:<40} since {}  by {:<12} {}",
                    text(&host["address"]),
                    text(&host["since"]),
                    text(&host["actor"]),
                    text(&host["reason"])
                );
            }
        }
    }
    ExitCode::SUCCESS
}

fn breakglass(command: BreakglassCommand) -> ExitCode {
    use enforcer::breakglass::{format_grant, format_list, format_revoke};
    let (socket, request, output, format): (_, _, _, fn(&serde_json::Value) -> String) =
        match command {
            BreakglassCommand::Grant {
                from,
                to,
                ports,
                ttl,
                reason,
                control_socket,
                output,
            } => (
                control_socket,
                ControlRequest::BreakglassGrant {
                    from,
                    to,
                    ports,
                    ttl,
                    reason,
                },
                output,
                format_grant,
            ),
            BreakglassCommand::List {
                control_socket,
                output,
            } => (
                control_socket,
                ControlRequest::BreakglassList,
                output,
                format_list,
            ),
            BreakglassCommand::Revoke {
                id,
                reason,
                control_socket,
                output,
            } => (
                control_socket,
                ControlRequest::BreakglassRevoke { id, reason },
                output,
                format_revoke,
            ),
        };
    let result = match control_request(&socket, &request) {
        Ok(result) => result,
        Err(code) => return code,
    };
    match output {
        Output::Json => print_json(&result),
        Output::Text => print!("{}", format(&result)),
    }
    ExitCode::SUCCESS
}

fn audit_verify(
    file: &std::path::Path,
    expect_seq: Option<u64>,
    anchor: Option<(u64, String)>,
    output: Output,
) -> ExitCode {
    let expect = audit::Expectations {
        seq: expect_seq,
        anchor,
    };
    let verification = match audit::verify(file, &expect) {
        Ok(verification) => verification,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string(&verification).unwrap_or_default()
        ),
        Output::Text => match &verification.problem {
            None => println!(
                "{}: intact, {} records, last seq {}, last record SHA-256 {}",
                file.display(),
                verification.records,
                verification
                    .last_seq
                    .map_or("-".to_string(), |seq| seq.to_string()),
                verification.last_hash
            ),
            Some(problem) => println!(
                "{}: TAMPERED at line {}: {}",
                file.display(),
                problem.line,
                problem.message
            ),
        },
    }
    if verification.intact() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn observe(options: ObserveOptions) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        observe::run(options, tokio::io::stdout())
            .await
            .context("observing flows")
    })
}

/// How often the policy directory is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the daemon looks for break-glass grants whose time is up (the kernel stops
/// honouring them on time by itself; this removes, logs and audits them).
const GRANT_EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often idle connection state is swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// How long after a reload the previous policy's maps are emptied: after the reload has been
/// answered, so it goes live without waiting for that. (The emptying itself first waits for
/// packets still being judged by them: `enforcer::quiesce`.)
const RELOAD_GRACE: Duration = Duration::from_secs(1);

fn run(options: RunOptions) -> anyhow::Result<()> {
    // glibc gives every thread that allocates its own heap arena, and the reload threads and
    // the parser's threads each leave one holding fragments. With two, the daemon's resident
    // memory after a start depended on which arena the kept read cache landed in (37 to 57 MB
    // with a 100k-rule policy); with one it stays near what the daemon uses, for a parse that
    // waits on the arena's lock a little (a start about 0.1-0.2 s slower at 100k rules).
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let runtime = runtime()?;
    let _guard = runtime.enter();
    let hub = Arc::new(EventHub::new(16_384, 10_000));
    let daemon = Daemon::start(&options, Arc::clone(&hub))?;
    let mut tasks = vec![daemon.spawn_event_reader()?];
    let control_socket = control::bind(
        &options.control_socket,
        options.control_socket_group.as_deref(),
    )
    .with_context(|| {
        format!(
            "serving the control socket {}",
            options.control_socket.display()
        )
    })?;
    info!(socket = %control_socket.path().display(), "serving the control socket");
    let handler: control::Handler = {
        let daemon = Arc::clone(&daemon);
        Arc::new(move |request, peer| control::dispatch(&daemon, request, peer))
    };
    tasks.push(tokio::spawn(control_socket.serve(handler)));
    let state = daemon.shared_state();
    let listener = runtime
        .block_on(http::bind(options.metrics_addr))
        .with_context(|| format!("serving metrics on {}", options.metrics_addr))?;
    info!(addr = %listener.1, "serving /metrics, /healthz, /readyz, /flows");
    tasks.push(tokio::spawn(http::serve_on(listener.0, state)));
    if let Some(path) = &options.flow_log {
        let target = if path.as_os_str() == "-" {
            FlowLogTarget::Stdout
        } else {
            FlowLogTarget::File {
                path: path.clone(),
                max_bytes: options.flow_log_max_bytes,
                keep: options.flow_log_keep,
            }
        };
        let events = hub.subscribe();
        let hub = Arc::clone(&hub);
        tasks.push(tokio::spawn(async move {
            if let Err(error) = flow_log::run(target, events, hub).await {
                error!(%error, "the flow log stopped");
            }
        }));
    }
    // Before "ready": a SIGTERM that follows it at once must find the handler, not the default
    // action (which would skip the shutdown summary and, without --persist, the detaching).
    let signals = Signals::install()?;
    info!(
        revision = %daemon.revision(),
        ifaces = ?options.ifaces,
        "enforcer ready"
    );
    let result = runtime.block_on(run_until_shutdown(
        &daemon,
        signals,
        options.audit_summary_interval,
    ));
    for task in tasks {
        task.abort();
    }
    daemon.audit_violations_summary();
    daemon.audit(
        "daemon_stop",
        serde_json::json!({
            "reason": result.as_ref().map_or_else(|error| format!("{error:#}"), |signal| signal.to_string()),
        }),
    );
    let counters = daemon.counters().context("reading counters")?;
    let pin_dir = daemon.pin_dir();
    drop(daemon);
    drop(runtime);
    match pin_dir {
        Some(dir) => info!(
            pin_dir = %dir.display(),
            "exiting; the programs stay attached and keep enforcing (the next `enforcer run \
             --persist` adopts them, `enforcer detach --pin-dir {}` removes them)",
            dir.display()
        ),
        None => info!("detached, exiting"),
    }
    // `counters` keeps the ingress counters at the top level, as scripts read them.
    let summary = serde_json::json!({
        "event": "shutdown",
        "counters": counters.named(direction::INGRESS),
        "egress_counters": counters.named(direction::EGRESS),
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{summary}").context("writing the shutdown summary")?;
    result.map(|_| ())
}

/// Empties the inactive slot and folds old counts, [`RELOAD_GRACE`] after a reload.
fn schedule_after_reload(daemon: &Arc<Daemon>) {
    let daemon = Arc::clone(daemon);
    let generation = daemon.generation();
    tokio::spawn(async move {
        tokio::time::sleep(RELOAD_GRACE).await;
        let _ = tokio::task::spawn_blocking(move || daemon.after_reload(generation)).await;
    });
}

/// The signals the daemon acts on.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    /// Needs the runtime entered.
    fn install() -> anyhow::Result<Self> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            hangup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }
}

/// Runs until a signal asks to stop; returns its name.
async fn run_until_shutdown(
    daemon: &Arc<Daemon>,
    signals: Signals,
    summary_interval: Duration,
) -> anyhow::Result<&'static str> {
    let Signals {
        mut interrupt,
        mut terminate,
        mut hangup,
    } = signals;
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut grant_expiry = tokio::time::interval(GRANT_EXPIRY_INTERVAL);
    let mut summary = tokio::time::interval_at(
        tokio::time::Instant::now() + summary_interval,
        summary_interval,
    );
    let mut seen = daemon::fingerprint(daemon.policy_dir());
    // Adopted maps may hold a previous daemon's policy in the inactive slot and counts of
    // generations it loaded: the same clean-up as after a reload.
    schedule_after_reload(daemon);
    loop {
        let reload = tokio::select! {
            _ = interrupt.recv() => {
                info!("SIGINT received");
                return Ok("SIGINT");
            }
            _ = terminate.recv() => {
                info!("SIGTERM received");
                return Ok("SIGTERM");
            }
            _ = hangup.recv() => {
                info!("SIGHUP received: reloading the policy");
                // The files this reload reads: the watcher must not load them a second time.
                seen = daemon::fingerprint(daemon.policy_dir());
                true
            }
            _ = watch.tick() => {
                let now = daemon::fingerprint(daemon.policy_dir());
                let changed = now != seen;
                if changed {
                    info!("policy directory changed: reloading");
                    seen = now;
                }
                changed
            }
            _ = sweep.tick() => {
                let daemon = Arc::clone(daemon);
                let _ = tokio::task::spawn_blocking(move || daemon.sweep()).await;
                false
            }
            _ = grant_expiry.tick() => {
                let daemon = Arc::clone(daemon);
                let _ = tokio::task::spawn_blocking(move || daemon.expire_grants()).await;
                false
            }
            _ = summary.tick() => {
                let daemon = Arc::clone(daemon);
                let _ = tokio::task::spawn_blocking(move || daemon.audit_violations_summary()).await;
                false
            }
        };
        if reload {
            let reloading = Arc::clone(daemon);
            let outcome = tokio::task::spawn_blocking(move || reloading.reload()).await;
            if let Ok(Ok(took)) = outcome {
                debug!(took_ms = took.as_secs_f64() * 1000.0, "reload live");
                schedule_after_reload(daemon);
            } else if let Err(error) = outcome {
                warn!(%error, "the reload task failed");
            }
        }
    }
}
