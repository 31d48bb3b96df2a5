use std::{
    env,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use cargo_metadata::MetadataCommand;

/// The workspace being worked on, and how to run cargo in it.
pub(crate) struct Workspace {
    pub(crate) root: PathBuf,
    pub(crate) target_dir: PathBuf,
    /// Members left out of `default-members`: kernel crates that only build for the BPF
    /// target (their `bin` collides with the daemon's `target/debug/enforcer` on the host).
    pub(crate) bpf_only: Vec<String>,
    cargo: OsString,
}

impl Workspace {
    pub(crate) fn discover() -> Result<Self> {
        let metadata = MetadataCommand::new()
            .no_deps()
            .exec()
            .context("failed to run `cargo metadata`")?;
        let bpf_only = if metadata.workspace_default_members.is_available() {
            metadata
                .workspace_packages()
                .into_iter()
                .filter(|p| !metadata.workspace_default_members.contains(&p.id))
                .map(|p| p.name.to_string())
                .collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            bpf_only,
            root: metadata.workspace_root.into_std_path_buf(),
            target_dir: metadata.target_directory.into_std_path_buf(),
            // The cargo that runs us (`cargo xtask`), so `+toolchain` choices carry over.
            cargo: env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
        })
    }

    /// A `cargo` command run from the workspace root, with `~/.cargo/bin` on `PATH` so a
    /// freshly installed `bpf-linker` is found by aya-build.
    pub(crate) fn cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.cargo);
        cmd.args(args)
            .current_dir(&self.root)
            .env("PATH", path_with_cargo_bin());
        cmd
    }

    /// `--workspace` minus the BPF-only members, for host builds, lints and tests.
    pub(crate) fn host_packages(&self) -> Vec<String> {
        let mut args = vec!["--workspace".to_owned()];
        for name in &self.bpf_only {
            args.extend(["--exclude".to_owned(), name.clone()]);
        }
        args
    }

    /// Path of the `enforcer` binary built by `cargo build -p enforcer --bin enforcer`.
    pub(crate) fn enforcer_bin(&self) -> PathBuf {
        self.target_dir.join("debug").join("enforcer")
    }

    /// Builds the daemon and returns its absolute path, for `ENFORCER_BIN`.
    pub(crate) fn build_enforcer(&self) -> Result<PathBuf> {
        exec(&mut self.cargo(["build", "-p", "enforcer", "--bin", "enforcer"]))?;
        let bin = self.enforcer_bin();
        if !bin.is_file() {
            bail!(
                "`cargo build -p enforcer` succeeded but {} is missing",
                bin.display()
            );
        }
        Ok(bin)
    }
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`), where `cargo install` puts binaries.
pub(crate) fn cargo_bin_dir() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// `PATH` with the cargo bin directory appended when it is not there already.
pub(crate) fn path_with_cargo_bin() -> OsString {
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if let Some(bin) = cargo_bin_dir()
        && !dirs.contains(&bin)
    {
        dirs.push(bin);
    }
    env::join_paths(dirs).unwrap_or(path)
}

/// Runs `cmd` with inherited stdio; an error if it cannot start or exits non-zero.
pub(crate) fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to run {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout, or `None` if it could not run or exited non-zero. For
/// probes whose failure just means "not installed".
pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program arg arg`, for messages (`Command`'s Debug quotes every word; the program's
/// directory, e.g. `$CARGO`'s, is noise).
pub(crate) fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    std::iter::once(program.file_name().unwrap_or(program.as_os_str()))
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
