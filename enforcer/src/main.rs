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
    },
    /// Remove an enforcer started with --persist: its attachments, programs, maps and pin
    /// directory. Run it in the network namespace the daemon ran in, after stopping the daemon.
    Detach {
        /// The --pin-dir the daemon was started with.
        #[arg(long, default_value = persist::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
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
        }),
        Command::Detach { pin_dir } => detach(&pin_dir),
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
/// How often idle connection state is swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// How long after a reload the previous policy's maps are emptied: every packet judged by them
/// has long finished by then.
const RELOAD_GRACE: Duration = Duration::from_secs(1);

fn run(options: RunOptions) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let _guard = runtime.enter();
    let hub = Arc::new(EventHub::new(16_384, 10_000));
    let daemon = Daemon::start(&options, Arc::clone(&hub))?;
    let mut tasks = vec![daemon.spawn_event_reader()?];
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
    let result = runtime.block_on(run_until_shutdown(&daemon, signals));
    for task in tasks {
        task.abort();
    }
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
    result
}

/// Empties the inactive slot and folds old counts once packets judged by the previous policy
/// have finished.
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

async fn run_until_shutdown(daemon: &Arc<Daemon>, signals: Signals) -> anyhow::Result<()> {
    let Signals {
        mut interrupt,
        mut terminate,
        mut hangup,
    } = signals;
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut seen = daemon::fingerprint(daemon.policy_dir());
    // Adopted maps may hold a previous daemon's policy in the inactive slot and counts of
    // generations it loaded: the same clean-up as after a reload.
    schedule_after_reload(daemon);
    loop {
        let reload = tokio::select! {
            _ = interrupt.recv() => {
                info!("SIGINT received");
                return Ok(());
            }
            _ = terminate.recv() => {
                info!("SIGTERM received");
                return Ok(());
            }
            _ = hangup.recv() => {
                info!("SIGHUP received: reloading the policy");
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
