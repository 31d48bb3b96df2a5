use anyhow::Result;

use crate::{setup, util::Workspace, util::exec};

pub(crate) fn run(ws: &Workspace) -> Result<()> {
    // enforcer's build.rs compiles the eBPF program with aya-build, which needs bpf-linker and
    // nightly rust-src.
    setup::run(ws)?;
    exec(
        ws.cargo(["build"])
            .args(ws.host_packages())
            .arg("--all-targets"),
    )
}
