//! `cargo xtask demo`: a small hospital in network namespaces, the example policy enforced on
//! every clinical server, and a handful of named clinical flows checked against the policy.
//!
//! Exits non-zero if any flow is not handled as the policy says.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use policy_compiler::{Decision, Flow, Policy, Verdict};
use vm_tests::lab::{self, CLINICAL_SEGMENTS, Counters, Lab, Probe, Proto, clinical_hosts};

const TCP_PORTS: [u16; 6] = [104, 11112, 443, 2575, 5432, 22];
const UDP_PORTS: [u16; 2] = [161, 514];
const TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone, Copy)]
enum Kind {
    Tcp(u16),
    Udp(u16),
    Ping,
}

struct DemoFlow {
    name: &'static str,
    from: &'static str,
    to: &'static str,
    kind: Kind,
    v6: bool,
}

const fn flow(name: &'static str, from: &'static str, to: &'static str, kind: Kind) -> DemoFlow {
    DemoFlow {
        name,
        from,
        to,
        kind,
        v6: false,
    }
}

const fn flow_v6(name: &'static str, from: &'static str, to: &'static str, kind: Kind) -> DemoFlow {
    DemoFlow {
        name,
        from,
        to,
        kind,
        v6: true,
    }
}

const FLOWS: [DemoFlow; 12] = [
    flow(
        "DICOM store to PACS",
        "radiology-ws",
        "pacs",
        Kind::Tcp(104),
    ),
    flow(
        "Claims to billing DB",
        "ehr-core-ws",
        "billing",
        Kind::Tcp(5432),
    ),
    flow(
        "Radiology to billing DB",
        "radiology-ws",
        "billing",
        Kind::Tcp(5432),
    ),
    flow("Lab analyzer to PACS", "lab-ws", "pacs", Kind::Tcp(104)),
    flow(
        "HL7 lab results to EHR",
        "lab-ws",
        "ehr-core",
        Kind::Tcp(2575),
    ),
    flow("SNMP poll of PACS by NOC", "noc", "pacs", Kind::Udp(161)),
    flow(
        "SNMP poll of EHR by billing",
        "billing-ws",
        "ehr-core",
        Kind::Udp(161),
    ),
    flow(
        "Pharmacy to ICU monitors",
        "pharmacy-ws",
        "icu-telemetry",
        Kind::Tcp(443),
    ),
    flow_v6(
        "DICOM to PACS over IPv6",
        "radiology-ws",
        "pacs",
        Kind::Tcp(104),
    ),
    flow_v6("SSH to PACS over IPv6", "billing-ws", "pacs", Kind::Tcp(22)),
    flow("EHR pings the lab system", "ehr-core-ws", "lab", Kind::Ping),
    flow(
        "Radiology pings billing",
        "radiology-ws",
        "billing",
        Kind::Ping,
    ),
];

fn main() -> ExitCode {
    // Before any thread exists, so Ctrl-C tears the lab down instead of leaving it behind.
    if let Err(e) = lab::cleanup_on_signals() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Returns whether every flow was handled as the policy says.
fn run() -> Result<bool> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and attaches XDP: run it as root");
    }
    let policy_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../segments");
    let policy = Policy::load_dir(&policy_dir)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("loading the example policy from {}", policy_dir.display()))?;

    let started = Instant::now();
    let lab = Lab::new(&clinical_hosts()).context("building the lab")?;
    println!(
        "Lab {}: {} hosts in network namespaces, one server (.10) and one workstation (.20) \
         per segment, plus a NOC host",
        lab.id(),
        lab.hosts().len()
    );
    let servers: Vec<&str> = CLINICAL_SEGMENTS.iter().map(|s| s.name).collect();
    let _services = servers
        .iter()
        .map(|s| lab.serve(s, &TCP_PORTS, &UDP_PORTS))
        .collect::<Result<Vec<_>, _>>()
        .context("starting echo services")?;
    let enforcers = lab
        .start_enforcers(&servers, &policy_dir)
        .context("starting the enforcer")?;
    println!(
        "Enforcer running on the eth0 of {} servers ({:.1}s)\n",
        enforcers.len(),
        started.elapsed().as_secs_f64()
    );

    let observed = drive(&lab)?;
    let mut mismatches = 0;
    println!(
        "{:<3} {:<28} {:<37} {:<29} {:<10} RESULT",
        "#", "FLOW", "PATH", "EXPECTED", "OBSERVED"
    );
    for (i, (f, connected)) in FLOWS.iter().zip(&observed).enumerate() {
        let (src, dst) = (lab.host(f.from)?.addr(f.v6), lab.host(f.to)?.addr(f.v6));
        let decision = policy.evaluate(&policy_flow(f.kind, src, dst));
        let ok = *connected == (decision.verdict != Verdict::Deny);
        mismatches += usize::from(!ok);
        println!(
            "{:<3} {:<28} {:<37} {:<29} {:<10} {}",
            i + 1,
            f.name,
            format!("{} -> {} {}", f.from, dst, describe(f.kind)),
            expected(&decision),
            if *connected { "connected" } else { "blocked" },
            if ok { "OK" } else { "MISMATCH" }
        );
        println!("    {}", decision.reason);
    }

    let mut counters: BTreeMap<String, Counters> = BTreeMap::new();
    for enforcer in enforcers {
        let host = enforcer.host().to_owned();
        counters.insert(host, enforcer.stop()?);
    }
    println!(
        "\nEnforcer counters (packets seen on each server's eth0)\n{:<15} {:>8} {:>6} {:>8} {:>7} {:>11} {:>10} {:>8}",
        "SERVER", "allowed", "audit", "denied", "non_ip", "unenforced", "malformed", "encap"
    );
    for (host, c) in &counters {
        println!(
            "{host:<15} {:>8} {:>6} {:>8} {:>7} {:>11} {:>10} {:>8}",
            c.allowed,
            c.audit,
            c.policy_denied,
            c.non_ip,
            c.unenforced,
            c.malformed,
            c.unsupported_encap
        );
    }
    println!(
        "\n{} of {} flows as the policy says{}; removing the lab.",
        FLOWS.len() - mismatches,
        FLOWS.len(),
        if mismatches == 0 { "" } else { " -- MISMATCH" }
    );
    Ok(mismatches == 0)
}

/// Observed outcome of every flow: TCP and UDP in parallel, pings with `ping`.
fn drive(lab: &Lab) -> Result<Vec<bool>> {
    let mut probes = Vec::new();
    let mut probe_index = Vec::new();
    for f in &FLOWS {
        let dst = lab.host(f.to)?.addr(f.v6);
        let probe = match f.kind {
            Kind::Tcp(port) => Some(Probe::new(f.from, Proto::Tcp, dst, port)),
            Kind::Udp(port) => Some(Probe::new(f.from, Proto::Udp, dst, port)),
            Kind::Ping => None,
        };
        probe_index.push(probe.map(|p| {
            probes.push(p);
            probes.len() - 1
        }));
    }
    let probed = lab.run_probes(&probes, TIMEOUT);
    let mut observed = Vec::new();
    for (f, index) in FLOWS.iter().zip(probe_index) {
        observed.push(match index {
            Some(i) => probed[i],
            None => ping(lab, f.from, lab.host(f.to)?.addr(f.v6))?,
        });
    }
    Ok(observed)
}

fn ping(lab: &Lab, from: &str, to: IpAddr) -> Result<bool> {
    let status = lab
        .command(from, "ping")?
        .args(["-c", "1", "-W", "1", "-q"])
        .arg(to.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running ping (iputils-ping; `cargo xtask setup` installs it)")?;
    Ok(status.success())
}

fn policy_flow(kind: Kind, src: IpAddr, dst: IpAddr) -> Flow {
    let (proto, port) = match kind {
        Kind::Tcp(port) => (6, port),
        Kind::Udp(port) => (17, port),
        // Echo request: ICMP type 8, ICMPv6 type 128.
        Kind::Ping if src.is_ipv6() => (58, 128),
        Kind::Ping => (1, 8),
    };
    Flow {
        src,
        dst,
        proto,
        port: Some(port),
    }
}

fn describe(kind: Kind) -> String {
    match kind {
        Kind::Tcp(port) => format!("tcp/{port}"),
        Kind::Udp(port) => format!("udp/{port}"),
        Kind::Ping => "ping".into(),
    }
}

fn expected(decision: &Decision) -> String {
    let verdict = match decision.verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Audit => "audit",
    };
    match &decision.rule {
        Some(rule) => format!("{verdict} ({rule})"),
        None => verdict.to_owned(),
    }
}
