//! `cargo xtask bench`: builds the enforcer, the compiler and the benchmark runner in release
//! mode and runs every benchmark (`vm-tests/src/bin/bench`), writing `bench/`.
//!
//! The runner is a binary of `vm-tests`, not part of xtask: xtask must build on a fresh machine
//! before `setup` has installed bpf-linker, and the runner links the enforcer (and so its
//! eBPF build). Its traffic generator is the benchmark-only `bench_tx` XDP program.
use anyhow::{Context as _, Result};
use clap::Parser;

use crate::{setup, util::Workspace, util::exec};

#[derive(Parser)]
pub(crate) struct Options {
    /// A CI smoke run: fewer sizes and shorter samples, under two minutes.
    #[arg(long)]
    quick: bool,
    /// Only these parts (per-packet, e2e, reload, events, tools), comma-separated.
    #[arg(long)]
    only: Option<String>,
    /// Where to write results.json, RESULTS.md and the plot.
    #[arg(long, default_value = "bench")]
    out: String,
    /// Also measure the kernel programs of FILE (saved from an earlier build with
    /// --save-object) in the per-packet and end-to-end benchmarks, side by side with this
    /// build's.
    #[arg(long, value_name = "FILE")]
    baseline_object: Option<String>,
    /// Build, write this build's kernel programs to FILE and stop (no benchmark): the baseline
    /// for measuring a change to them.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["quick", "only", "baseline_object"])]
    save_object: Option<String>,
}

pub(crate) fn run(ws: &Workspace, opts: Options) -> Result<()> {
    setup::run(ws)?;
    exec(&mut ws.cargo([
        "build",
        "--release",
        "-p",
        "enforcer",
        "-p",
        "policy-compiler",
        "-p",
        "vm-tests",
        "--bin",
        "enforcer",
        "--bin",
        "policy-compiler",
        "--bin",
        "bench",
    ]))
    .context("building the benchmarks")?;
    let release = ws.target_dir.join("release");
    let mut cmd = std::process::Command::new(release.join("bench"));
    cmd.current_dir(&ws.root)
        .arg("--out")
        .arg(&opts.out)
        .env("POLICY_COMPILER_BIN", release.join("policy-compiler"))
        .env("ENFORCER_BIN", release.join("enforcer"));
    if opts.quick {
        cmd.arg("--quick");
    }
    if let Some(only) = &opts.only {
        cmd.args(["--only", only]);
    }
    if let Some(file) = &opts.baseline_object {
        cmd.args(["--baseline-object", file]);
    }
    if let Some(file) = &opts.save_object {
        cmd.args(["--save-object", file]);
    }
    exec(&mut cmd)
}
