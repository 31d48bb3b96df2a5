use std::ffi::OsString;

use anyhow::{Context as _, Result};
use clap::Parser;

use crate::{setup, util::Workspace, util::exec};

#[derive(Parser)]
pub(crate) struct Options {
    /// Arguments passed to the demo binary.
    #[arg(last = true)]
    args: Vec<OsString>,
}

pub(crate) fn run(ws: &Workspace, opts: Options) -> Result<()> {
    let Options { args } = opts;
    setup::run(ws)?;
    let enforcer = ws
        .build_enforcer()
        .context("failed to build the enforcer daemon")?;
    exec(
        ws.cargo(["run", "--quiet", "-p", "vm-tests", "--bin", "demo", "--"])
            .args(args)
            .env("ENFORCER_BIN", enforcer),
    )
}
