//! `cargo xtask test`: the cheap checks first so style slips fail in seconds, then the daemon
//! build, then every test with `ENFORCER_BIN` pointing at that build.

use std::{
    ffi::OsString,
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::Parser;

use crate::{setup, util::Workspace, util::exec};

#[derive(Parser)]
pub(crate) struct Options {
    /// Arguments passed to `cargo test` (e.g. `-- --nocapture`, or a test name filter).
    #[arg(last = true)]
    args: Vec<OsString>,
}

struct Step {
    name: &'static str,
    took: Duration,
    ok: bool,
}

pub(crate) fn run(ws: &Workspace, opts: Options) -> Result<()> {
    let Options { args } = opts;
    let started = Instant::now();
    let mut steps = Vec::new();
    let result = run_steps(ws, args, &mut steps);

    let mut summary = String::from("\n== cargo xtask test summary ==\n");
    for Step { name, took, ok } in &steps {
        let status = if *ok { "ok" } else { "FAILED" };
        let _ = writeln!(
            summary,
            "  {name:<8} {status:<6} {:>6.1}s",
            took.as_secs_f64()
        );
    }
    let verdict = if result.is_ok() { "passed" } else { "FAILED" };
    let _ = writeln!(
        summary,
        "  {verdict} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    println!("{summary}");
    result
}

fn run_steps(ws: &Workspace, args: Vec<OsString>, steps: &mut Vec<Step>) -> Result<()> {
    step(steps, "setup", || setup::run(ws))?;
    step(steps, "fmt", || {
        exec(&mut ws.cargo(["fmt", "--all", "--", "--check"]))
    })?;
    step(steps, "clippy", || {
        exec(&mut ws.cargo([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    let mut enforcer = None;
    step(steps, "enforcer", || {
        enforcer = Some(ws.build_enforcer()?);
        Ok(())
    })?;
    let Some(enforcer) = enforcer else {
        bail!("enforcer build step returned no path");
    };
    step(steps, "tests", || {
        exec(
            ws.cargo(["test", "--workspace", "--no-fail-fast"])
                .args(&args)
                .env("ENFORCER_BIN", &enforcer),
        )
    })
}

fn step(steps: &mut Vec<Step>, name: &'static str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("== {name}");
    let started = Instant::now();
    let result = f();
    steps.push(Step {
        name,
        took: started.elapsed(),
        ok: result.is_ok(),
    });
    result
}
