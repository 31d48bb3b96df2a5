//! `cargo xtask test`: the cheap checks first so style slips fail in seconds, then the daemon
//! build, then every test with `ENFORCER_BIN` pointing at that build.

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

use crate::{
    setup,
    util::{Workspace, display, exec, path_with_cargo_bin},
    vm_test,
};

#[derive(Parser)]
pub(crate) struct Options {
    /// Skip the last step, the kernel-facing tests on Debian 12's 6.1 kernel in QEMU
    /// (`cargo xtask vm-test`), e.g. while iterating on host tests.
    #[arg(long)]
    skip_vm: bool,
    /// Arguments appended to `cargo test --workspace --no-fail-fast`, e.g.
    /// `--test e2e -- --nocapture`, or a test name filter.
    #[arg(last = true)]
    args: Vec<OsString>,
}

struct Step {
    name: &'static str,
    took: Duration,
    ok: bool,
}

/// Sums of cargo test's `test result:` lines over all test binaries.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
    binaries: u64,
}

impl Tally {
    /// `test result: ok. 14 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; …`
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        self.binaries += 1;
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

pub(crate) fn run(ws: &Workspace, opts: Options) -> Result<()> {
    let Options { skip_vm, args } = opts;
    let started = Instant::now();
    let mut steps = Vec::new();
    let mut tally = Tally::default();
    let result = run_steps(ws, &args, skip_vm, &mut steps, &mut tally);

    println!("\n== cargo xtask test summary");
    for Step { name, took, ok } in &steps {
        let status = if *ok { "ok" } else { "FAILED" };
        println!("  {name:<11} {status:<6} {:>6.1}s", took.as_secs_f64());
    }
    let verdict = if result.is_ok() { "passed" } else { "FAILED" };
    println!("  {verdict} in {:.1}s", started.elapsed().as_secs_f64());
    if tally.binaries > 0 {
        println!(
            "tests: {} passed, {} failed, {} skipped",
            tally.passed, tally.failed, tally.ignored
        );
    }
    result
}

fn run_steps(
    ws: &Workspace,
    args: &[OsString],
    skip_vm: bool,
    steps: &mut Vec<Step>,
    tally: &mut Tally,
) -> Result<()> {
    step(steps, "setup", || setup::run(ws))?;
    step(steps, "fmt", || {
        exec(&mut ws.cargo(["fmt", "--all", "--", "--check"]))
    })?;
    step(steps, "clippy", || {
        exec(ws.cargo(["clippy"]).args(ws.host_packages()).args([
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    if !ws.bpf_only.is_empty() {
        step(steps, "clippy-bpf", || {
            // Kernel crates are no_std/no_main: they can only be linted for their own target,
            // which needs nightly's build-std like aya-build does.
            let mut cmd = Command::new("rustup");
            cmd.args(["run", "nightly", "cargo", "clippy"])
                .args(ws.bpf_only.iter().flat_map(|name| ["-p", name]))
                .args([
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ])
                .current_dir(&ws.root)
                .env("PATH", path_with_cargo_bin());
            exec(&mut cmd)
        })?;
    }
    let mut enforcer = None;
    step(steps, "enforcer", || {
        enforcer = Some(ws.build_enforcer()?);
        Ok(())
    })?;
    let Some(enforcer) = enforcer else {
        bail!("the enforcer build step returned no path");
    };
    // `cargo xtask bench --quick` is not a step: about 1.75 minutes plus a release build is not
    // "well under two minutes" on these machines. CI can run it on its own.
    step(steps, "tests", || cargo_test(ws, args, &enforcer, tally))?;
    if skip_vm {
        println!("== vm-test 6.1 skipped (--skip-vm)");
        return Ok(());
    }
    // The fleet's oldest kernel: the verifier, helpers and TC attach path of Debian 12. A
    // kernel that cannot be fetched fails the step, it is never skipped silently.
    step(steps, "vm-test 6.1", || {
        let kernel = vm_test::resolve_kernel(ws, vm_test::DEBIAN_6_1, None)?;
        let mut results = Vec::new();
        let outcome =
            vm_test::run_suite(ws, &kernel, &vm_test::RunOptions::default(), &mut results);
        for line in &results {
            tally.add_line(line);
        }
        outcome
    })
}

/// Runs cargo test with its stdout passed through line by line, counting results on the way.
fn cargo_test(ws: &Workspace, args: &[OsString], enforcer: &Path, tally: &mut Tally) -> Result<()> {
    let mut cmd = ws.cargo(["test"]);
    cmd.args(ws.host_packages())
        .arg("--no-fail-fast")
        .args(args)
        .env("ENFORCER_BIN", enforcer)
        .stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to run {}", display(&cmd)))?;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            tally.add_line(&line);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for {}", display(&cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", display(&cmd));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn tally_sums_result_lines() {
        let mut tally = Tally::default();
        for line in [
            "test result: ok. 14 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; \
             finished in 0.00s",
            "running 3 tests",
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; \
             finished in 4.42s",
        ] {
            tally.add_line(line);
        }
        assert_eq!(
            (tally.passed, tally.failed, tally.ignored, tally.binaries),
            (16, 1, 1, 2)
        );
    }
}
