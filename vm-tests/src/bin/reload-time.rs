//! Measures how long a reload of a large policy takes: validate + compile in user space, then
//! write the inactive slot and switch (the time until the new policy is live), then empty the old
//! slot. Run it in release mode as root:
//! `cargo run --release -p vm-tests --bin reload-time -- 1000 100` (segments, rules each).
use std::{fmt::Write as _, time::Instant};

use anyhow::Context as _;
use enforcer::Enforcer;
use policy_compiler::Policy;

/// `segments` segments of one /24 each, each with `rules` rules from other segments on ports
/// that differ per rule.
fn policy(segments: usize, rules: usize, variant: u16) -> anyhow::Result<Policy> {
    let mut sources = Vec::new();
    for s in 0..segments {
        let mut yaml = format!(
            "segment: s{s}\nmembers: [10.{}.{}.0/24]\nallow:\n",
            s / 256,
            s % 256
        );
        for r in 0..rules {
            let from = (s + r + 1) % segments;
            let port = 1000 + (r as u16) * 7 + variant;
            let _ = writeln!(yaml, "  - from: [s{from}]\n    ports: [tcp/{port}]");
        }
        sources.push((format!("segments/s{s}.yaml"), yaml));
    }
    Policy::from_sources(&sources).map_err(|e| anyhow::anyhow!("{e}"))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let segments: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let rules: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);
    let first = policy_compiler::compile(&policy(segments, rules, 0)?)?;
    let mut enforcer = Enforcer::load(&first).context("load")?;

    let started = Instant::now();
    let second = policy(segments, rules, 3)?;
    let validated = started.elapsed();
    let artifact = policy_compiler::compile(&second)?;
    let compiled = started.elapsed();
    let swap = enforcer.replace_policy(&artifact)?;
    let live = started.elapsed();
    enforcer.clear_inactive_slot()?;
    let cleared = started.elapsed();
    println!(
        "{} rules ({} PAIRS, {} PORTS entries): validated {:.0} ms, compiled {:.0} ms, \
         maps written and switched in {:.0} ms => live after {:.0} ms; old slot emptied after {:.0} ms",
        segments * rules,
        artifact.entry_counts().pairs,
        artifact.entry_counts().ports,
        validated.as_secs_f64() * 1e3,
        (compiled - validated).as_secs_f64() * 1e3,
        swap.as_secs_f64() * 1e3,
        live.as_secs_f64() * 1e3,
        (cleared - live).as_secs_f64() * 1e3,
    );
    Ok(())
}
