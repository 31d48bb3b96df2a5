//! `cargo xtask`: the one entry point for developers and CI.
//!
//! Every command that builds or runs something calls [`setup`] first, so a fresh Debian machine
//! needs nothing but `cargo xtask test`.

mod bench;
mod build;
mod demo;
mod setup;
mod test;
mod util;
mod vm_test;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Developer tasks for the micro-segmentation enforcer")]
struct XtaskOptions {
    #[command(subcommand)]
    command: Subcommand,
}

#[derive(Parser)]
enum Subcommand {
    /// Installs the toolchain pieces and Debian packages the build and tests need.
    Setup,
    /// Sets up, then builds every crate and target of the workspace.
    Build,
    /// Sets up, then runs fmt, clippy and every test (needs root and a real kernel).
    Test(test::Options),
    /// Sets up, then runs the clinical-flows demo in network namespaces.
    Demo(demo::Options),
    /// Sets up, then runs the kernel-facing tests in QEMU on another kernel (default: Debian
    /// 12's 6.1).
    VmTest(vm_test::Options),
    /// Sets up, then runs every benchmark and writes bench/ (results.json, RESULTS.md, plot).
    Bench(bench::Options),
}

fn main() -> ExitCode {
    // Print the error chain ourselves: returning it from main would add a backtrace whenever
    // RUST_BACKTRACE is set, burying the one line that matters.
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let XtaskOptions { command } = Parser::parse();
    // Every command installs or runs something that needs root on Linux; say so up front.
    setup::check_platform()?;
    let ws = util::Workspace::discover()?;
    match command {
        Subcommand::Setup => setup::run(&ws),
        Subcommand::Build => build::run(&ws),
        Subcommand::Test(opts) => test::run(&ws, opts),
        Subcommand::Demo(opts) => demo::run(&ws, opts),
        Subcommand::VmTest(opts) => vm_test::run(&ws, opts),
        Subcommand::Bench(opts) => bench::run(&ws, opts),
    }
}
