//! `policy-compiler`: check, compile and trace a segment policy directory; review changes to it
//! (diff, test, graph, schema); roll out monitored segments from the flow log (impact, suggest).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use policy_compiler::diff::PolicyDiff;
use policy_compiler::flow_log::ObservedFlows;
use policy_compiler::graph::Graph;
use policy_compiler::impact::Impact;
use policy_compiler::model::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, icmp_type_by_name};
use policy_compiler::policy_source::PolicySource;
use policy_compiler::reachability_tests::TestSuite;
use policy_compiler::suggest::Suggestion;
use policy_compiler::{Flow, Policy, PolicyErrors, compile};

/// Exit code for a policy that does not validate or compile.
const EXIT_INVALID: u8 = 1;
/// Exit code for a wrong command line (the same as clap's).
const EXIT_USAGE: u8 = 2;
/// `diff` and `test`: reachability changed, or a test case failed; for review, not an error.
const EXIT_FINDINGS: u8 = 1;
/// `diff` and `test`: anything that stopped the answer (1 is taken by "findings").
const EXIT_REVIEW_ERROR: u8 = 2;
/// Unreadable flow log lines printed on standard error (all are counted).
const SHOWN_UNREADABLE_LINES: usize = 10;

#[derive(Parser)]
#[command(
    version,
    about = "Validate, compile and trace a segment policy; review changes to it"
)]
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
    /// Show which (source, destination, port) verdicts change between two policies.
    ///
    /// OLD and NEW are directories, or `REV:DIR` for a directory of a Git revision (read with
    /// git in the current directory; DIR from the repository's top level, as `git show REV:DIR`).
    /// Exit code: 0 nothing changes, 1 something changes, 2 error (e.g. an invalid policy).
    Diff {
        /// The policy before: a directory or REV:DIR (e.g. origin/main:segments).
        old: String,
        /// The policy after: a directory or REV:DIR (e.g. HEAD:segments).
        new: String,
        #[arg(long, value_enum, default_value_t = DiffFormat::Table)]
        format: DiffFormat,
    },
    /// Run the reachability assertions in DIR/tests/*.yaml against the policy in DIR.
    ///
    /// Exit code: 0 every case passes, 1 a case fails, 2 error (invalid policy or test file).
    Test { dir: PathBuf },
    /// Draw the segment connectivity: segments as nodes, edges with the allowed ports.
    Graph {
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Print the JSON Schema (draft 2020-12) of the policy files, for editors.
    Schema,
    /// Show which observed flows would be denied once the monitored segments are enforced.
    ///
    /// Every event of the flow log (what `enforcer run --flow-log FILE` writes, or `enforcer
    /// observe --output json` prints) is judged again with the policy in DIR, its segments
    /// derived from the addresses; the flows that pass today only as audit are listed per
    /// destination segment. Exit code: 0 nothing would be denied, 1 some flows would be denied,
    /// 2 error.
    Impact {
        /// The policy: a directory, or REV:DIR (e.g. HEAD:segments).
        dir: String,
        /// Flow log files, rotated ones too (`--flows flows.jsonl*`); `-` reads standard input.
        #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
        flows: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = DiffFormat::Table)]
        format: DiffFormat,
    },
    /// Propose allow rules (YAML, for review) for what a monitored segment received as audit.
    ///
    /// The flow log's events to SEGMENT that the policy in DIR passes only as audit become
    /// `allow:` entries to append to the segment's file: grouped by source segment, consecutive
    /// ports as ranges, counts and first/last seen as comments, `reason:` left as a TODO.
    Suggest {
        /// The policy: a directory, or REV:DIR (e.g. HEAD:segments).
        dir: String,
        /// Flow log files, rotated ones too (`--flows flows.jsonl*`); `-` reads standard input.
        #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
        flows: Vec<PathBuf>,
        /// The monitored segment to propose rules for.
        #[arg(long)]
        segment: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DiffFormat {
    /// Aligned columns for a terminal.
    Table,
    /// For a pull-request comment.
    Markdown,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    /// Graphviz.
    Dot,
    Mermaid,
    /// Drawn here, no Graphviz needed.
    Svg,
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
    let error_exit = match cli.command {
        Command::Diff { .. }
        | Command::Test { .. }
        | Command::Impact { .. }
        | Command::Suggest { .. } => EXIT_REVIEW_ERROR,
        _ => EXIT_INVALID,
    };
    match run(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Invalid(errors)) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.0.len());
            ExitCode::from(error_exit)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Other(error)) => {
            eprintln!("error: {error:#}");
            ExitCode::from(error_exit)
        }
    }
}

fn load(dir: &Path) -> Result<Policy, Failure> {
    Policy::load_dir(dir).map_err(Failure::Invalid)
}

/// The exit code on success (0, or [`EXIT_FINDINGS`] for `diff` and `test`).
fn run(command: Command) -> Result<u8, Failure> {
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
        Command::Diff { old, new, format } => return diff(&old, &new, format),
        Command::Test { dir } => return run_tests(&dir),
        Command::Impact { dir, flows, format } => return impact(&dir, &flows, format),
        Command::Suggest {
            dir,
            flows,
            segment,
        } => return suggest(&dir, &flows, &segment),
        Command::Graph {
            dir,
            format,
            output,
        } => {
            let graph = Graph::of(&load(&dir)?);
            let text = match format {
                GraphFormat::Dot => graph.to_dot(),
                GraphFormat::Mermaid => graph.to_mermaid(),
                GraphFormat::Svg => graph.to_svg(),
            };
            match output {
                Some(path) => write_atomically(&path, text.as_bytes())
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
        }
        Command::Schema => {
            let schema = policy_compiler::schema::policy_schema();
            let text = serde_json::to_string_pretty(&schema).context("encoding the schema")?;
            println!("{text}");
        }
    }
    Ok(0)
}

fn diff(old: &str, new: &str, format: DiffFormat) -> Result<u8, Failure> {
    let (old_source, new_source) = (PolicySource::parse(old), PolicySource::parse(new));
    let old_policy = old_source.load().context("reading the old policy")?;
    let new_policy = new_source.load().context("reading the new policy")?;
    let diff = PolicyDiff::between(
        &old_policy,
        &old_source.to_string(),
        &new_policy,
        &new_source.to_string(),
    );
    let text = match format {
        DiffFormat::Table => diff.to_table(),
        DiffFormat::Markdown => diff.to_markdown(),
        DiffFormat::Json => diff.to_json() + "\n",
    };
    print!("{text}");
    Ok(if diff.is_empty() { 0 } else { EXIT_FINDINGS })
}

/// The flow log files, with their unreadable lines reported on standard error.
fn read_flows(paths: &[PathBuf]) -> Result<ObservedFlows, Failure> {
    let observed = ObservedFlows::read_files(paths).context("reading the flow log")?;
    for line in observed.unreadable.iter().take(SHOWN_UNREADABLE_LINES) {
        eprintln!(
            "{}:{}: warning: line skipped: {}",
            line.file, line.line, line.error
        );
    }
    let unshown = observed
        .unreadable_count
        .saturating_sub(SHOWN_UNREADABLE_LINES as u64);
    if unshown > 0 {
        eprintln!("warning: {unshown} more unreadable line(s) skipped");
    }
    Ok(observed)
}

fn impact(dir: &str, flows: &[PathBuf], format: DiffFormat) -> Result<u8, Failure> {
    let source = PolicySource::parse(dir);
    let policy = source.load().context("reading the policy")?;
    let observed = read_flows(flows)?;
    let impact = Impact::of(&policy, &source.to_string(), &observed);
    let text = match format {
        DiffFormat::Table => impact.to_table(),
        DiffFormat::Markdown => impact.to_markdown(),
        DiffFormat::Json => impact.to_json() + "\n",
    };
    print!("{text}");
    Ok(if impact.is_empty() { 0 } else { EXIT_FINDINGS })
}

fn suggest(dir: &str, flows: &[PathBuf], segment: &str) -> Result<u8, Failure> {
    let source = PolicySource::parse(dir);
    let policy = source.load().context("reading the policy")?;
    let observed = read_flows(flows)?;
    let suggestion = Suggestion::for_segment(&policy, &source.to_string(), &observed, segment)
        .map_err(anyhow::Error::from)?;
    if suggestion.audited_events == 0 {
        eprintln!(
            "note: no audited flow to {segment} in the flow log ({} event(s) read){}: nothing \
             to suggest",
            observed.events,
            if suggestion.denied_events > 0 {
                format!(
                    "; {} event(s) to it were denied when logged",
                    suggestion.denied_events
                )
            } else {
                String::new()
            }
        );
        return Ok(0);
    }
    print!("{}", suggestion.to_yaml());
    if suggestion.is_empty() {
        eprintln!(
            "note: every audited flow to {segment} looks like a reply or has no ports: no rule \
             suggested (see the comments)"
        );
    }
    Ok(0)
}

fn run_tests(dir: &Path) -> Result<u8, Failure> {
    let policy = load(dir)?;
    let tests_dir = dir.join("tests");
    let suite = match TestSuite::load(&tests_dir, &policy) {
        Ok(suite) => suite,
        Err(errors) => {
            for error in &errors {
                eprintln!("{error}");
            }
            return Err(Failure::Other(anyhow::anyhow!(
                "{} error(s) in the tests of {}",
                errors.len(),
                dir.display()
            )));
        }
    };
    let outcomes = suite.run(&policy);
    for outcome in &outcomes {
        println!("{}", outcome.report_line());
    }
    let failed = outcomes.iter().filter(|outcome| !outcome.passed()).count();
    println!("{} passed, {failed} failed", outcomes.len() - failed);
    Ok(if failed == 0 { 0 } else { EXIT_FINDINGS })
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
