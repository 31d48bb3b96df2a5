//! `enforcer`: the daemon and its CLI. A thin layer over the `enforcer` library.
use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use enforcer::Enforcer;
use enforcer_common::direction;
use policy_compiler::Policy;
use tokio::signal::unix::{SignalKind, signal};
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

#[derive(Subcommand)]
enum Command {
    /// Compile the policy, load it into the kernel, attach to the interfaces and enforce until
    /// SIGINT or SIGTERM; then detach.
    Run {
        /// Directory of segment policy files (e.g. `segments/`).
        #[arg(long)]
        policy: PathBuf,
        /// Interface to enforce on (repeat for several).
        #[arg(long = "iface", required = true)]
        ifaces: Vec<String>,
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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { policy, ifaces } => run(policy, ifaces),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(policy_dir: PathBuf, ifaces: Vec<String>) -> anyhow::Result<()> {
    let policy = match Policy::load_dir(&policy_dir) {
        Ok(policy) => policy,
        Err(errors) => bail!("policy in {} is invalid:\n{errors}", policy_dir.display()),
    };
    let artifact = policy_compiler::compile(&policy)
        .with_context(|| format!("compiling the policy in {}", policy_dir.display()))?;
    let mut enforcer = Enforcer::load(&artifact).context("loading the kernel programs")?;
    for iface in &ifaces {
        enforcer
            .attach(iface)
            .with_context(|| format!("attaching to {iface}"))?;
    }
    info!(
        revision = %enforcer.revision(),
        ifaces = ?ifaces,
        rules = artifact.rules.len(),
        "enforcer ready"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_until_shutdown(&mut enforcer))?;

    let counters = enforcer.counters().context("reading counters")?;
    drop(enforcer);
    info!("detached, exiting");
    // `counters` keeps the ingress counters at the top level, as scripts read them.
    let summary = serde_json::json!({
        "event": "shutdown",
        "counters": counters.named(direction::INGRESS),
        "egress_counters": counters.named(direction::EGRESS),
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{summary}").context("writing the shutdown summary")?;
    Ok(())
}

/// How often expired connection and fragment state is swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

async fn run_until_shutdown(enforcer: &mut Enforcer) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = interrupt.recv() => {
                info!("SIGINT received");
                return Ok(());
            }
            _ = terminate.recv() => {
                info!("SIGTERM received");
                return Ok(());
            }
            _ = sweep.tick() => match enforcer.sweep_expired() {
                Ok((0, 0)) => {}
                Ok((flows, fragments)) => debug!(flows, fragments, "swept expired state"),
                Err(error) => warn!(%error, "sweeping expired state failed"),
            },
        }
    }
}
