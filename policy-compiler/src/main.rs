//! `policy-compiler`: check, compile and trace a segment policy directory.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use policy_compiler::model::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, icmp_type_by_name};
use policy_compiler::{Flow, Policy, PolicyErrors, compile};

/// Exit code for a policy that does not validate or compile.
const EXIT_INVALID: u8 = 1;
/// Exit code for a wrong command line (the same as clap's).
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(version, about = "Validate, compile and trace a segment policy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a policy directory and print a one-line summary.
    Check { dir: PathBuf },
    /// Compile a policy directory into the artifact the enforcer loads.
    Compile {
        dir: PathBuf,
        /// Where to write the artifact (JSON).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Show how the policy judges one packet (one JSON object on stdout).
    Trace {
        dir: PathBuf,
        #[arg(long)]
        src: IpAddr,
        #[arg(long)]
        dst: IpAddr,
        #[arg(long, value_enum)]
        proto: Proto,
        /// TCP/UDP destination port.
        #[arg(long, conflicts_with = "icmp_type")]
        dport: Option<u16>,
        /// ICMP/ICMPv6 type: a name such as echo-request, or a number.
        #[arg(long)]
        icmp_type: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

/// A failure with its exit code; the message is already printed where it belongs.
enum Failure {
    Invalid(PolicyErrors),
    Usage(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::Other(error)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Invalid(errors)) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.0.len());
            ExitCode::from(EXIT_INVALID)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Other(error)) => {
            eprintln!("error: {error:#}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}

fn load(dir: &Path) -> Result<Policy, Failure> {
    Policy::load_dir(dir).map_err(Failure::Invalid)
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Check { dir } => {
            let policy = load(&dir)?;
            // Compiling also checks the PAIRS/PORTS capacities, which only compilation knows.
            compile(&policy)
                .with_context(|| format!("compiling the policy in {}", dir.display()))?;
            println!("ok: {}", policy.summary());
        }
        Command::Compile { dir, output } => {
            let policy = load(&dir)?;
            let artifact = compile(&policy)
                .with_context(|| format!("compiling the policy in {}", dir.display()))?;
            write_atomically(&output, &artifact.to_json())
                .with_context(|| format!("writing {}", output.display()))?;
            let counts = artifact.entry_counts();
            println!(
                "ok: {}; wrote {} (addr_v4 {}, addr_v6 {}, pairs {}, ports {})",
                policy.summary(),
                output.display(),
                counts.addr_v4,
                counts.addr_v6,
                counts.pairs,
                counts.ports
            );
        }
        Command::Trace {
            dir,
            src,
            dst,
            proto,
            dport,
            icmp_type,
        } => {
            let (proto, port) = flow_protocol(proto, dport, icmp_type.as_deref())?;
            let policy = load(&dir)?;
            let decision = policy.evaluate(&Flow {
                src,
                dst,
                proto,
                port: Some(port),
            });
            let json = serde_json::to_string(&decision).context("encoding the decision")?;
            println!("{json}");
        }
    }
    Ok(())
}

/// The IP protocol number and port (or ICMP type) from the trace options.
fn flow_protocol(
    proto: Proto,
    dport: Option<u16>,
    icmp_type: Option<&str>,
) -> Result<(u8, u16), Failure> {
    match proto {
        Proto::Tcp | Proto::Udp => {
            let (number, name) = match proto {
                Proto::Tcp => (PROTO_TCP, "tcp"),
                _ => (PROTO_UDP, "udp"),
            };
            if icmp_type.is_some() {
                return Err(Failure::Usage(format!(
                    "--icmp-type does not apply to {name}; use --dport"
                )));
            }
            let port =
                dport.ok_or_else(|| Failure::Usage(format!("--proto {name} needs --dport N")))?;
            Ok((number, port))
        }
        Proto::Icmp | Proto::Icmpv6 => {
            let (number, name) = match proto {
                Proto::Icmp => (PROTO_ICMP, "icmp"),
                _ => (PROTO_ICMPV6, "icmpv6"),
            };
            if dport.is_some() {
                return Err(Failure::Usage(format!(
                    "--dport does not apply to {name}; use --icmp-type"
                )));
            }
            let text = icmp_type
                .ok_or_else(|| Failure::Usage(format!("--proto {name} needs --icmp-type TYPE")))?;
            let icmp_type = match text.parse::<u8>() {
                Ok(number) => number,
                Err(_) => icmp_type_by_name(number, text).ok_or_else(|| {
                    Failure::Usage(format!(
                        "unknown {name} type '{text}': use a number 0-255 or a name such as echo-request"
                    ))
                })?,
            };
            Ok((number, u16::from(icmp_type)))
        }
    }
}

/// Writes through a temporary file and a rename, so a watcher never sees half an artifact.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let Some(file_name) = path.file_name() else {
        bail!("{} is not a file path", path.display());
    };
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(file_name);
    temporary_name.push(".tmp");
    let temporary = path.with_file_name(temporary_name);
    let mut file = std::fs::File::create(&temporary)
        .with_context(|| format!("creating {}", temporary.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)
        .with_context(|| format!("renaming {} to {}", temporary.display(), path.display()))?;
    Ok(())
}
