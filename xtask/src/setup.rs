//! Idempotent installation of everything the build and the tests need. Each step checks first
//! and only acts when something is missing, so a second run is fast and prints one line.

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{Workspace, cargo_bin_dir, exec, output, path_with_cargo_bin};

const BPF_LINKER_VERSION: &str = "0.10.4";

/// Debian packages used by the tests and the demo: `ip` for the namespace lab, `ping` for the
/// demo's ICMP flows, `bpftool` to inspect attached programs, `nft` and `iperf3` for comparing
/// against netfilter and measuring throughput in the lab, package `prometheus` for `promtool`
/// (checks the metrics exposition and the alert rules) and the Prometheus server the
/// deployment test scrapes the daemon with, `git` for policy revisions taken from a Git
/// checkout, `systemd-analyze` (package `systemd`, absent from some container images) to
/// verify the systemd unit in `deploy/`; QEMU, cpio and objcopy (binutils) to boot another
/// kernel with an initramfs of the tests (`cargo xtask vm-test`).
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "bpftool",
    "nftables",
    "iperf3",
    "prometheus",
    "git",
    "qemu-system-x86",
    "cpio",
    "binutils",
    "systemd",
];

/// Validates the Kubernetes manifests in `deploy/` offline: it bundles the API schemas.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

pub(crate) fn run(ws: &Workspace) -> Result<()> {
    let mut done = Vec::new();
    done.extend(rust_components()?);
    done.extend(bpf_linker(ws)?);
    done.extend(debian_packages()?);
    done.extend(python_packages()?);
    if done.is_empty() {
        println!("setup: ok");
    } else {
        println!("setup: installed {}", done.join(", "));
    }
    Ok(())
}

pub(crate) fn check_platform() -> Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("this project needs Linux (XDP and network namespaces); this is not Linux");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "must run as root: setup installs Debian packages, and the tests create network \
             namespaces and attach XDP programs (try `sudo -E cargo xtask ...`)"
        );
    }
    Ok(())
}

/// `rust-src` for the nightly toolchain (aya-build builds the eBPF crate with `-Z build-std`),
/// and clippy/rustfmt for the default one (`cargo xtask test` runs both).
fn rust_components() -> Result<Vec<String>> {
    let mut done = Vec::new();
    match output(Command::new("rustup").args(installed_components(Some("nightly")))) {
        Some(list) if has_component(&list, "rust-src") => {}
        Some(_) => {
            println!("setup: adding rust-src to the nightly toolchain");
            exec(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))?;
            done.push("rust-src (nightly)".to_owned());
        }
        None => {
            println!("setup: installing the nightly toolchain with rust-src");
            exec(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
            done.push("nightly toolchain".to_owned());
        }
    }

    let Some(list) = output(Command::new("rustup").args(installed_components(None))) else {
        bail!("`rustup` is required (https://rustup.rs) but `rustup component list` failed");
    };
    let missing: Vec<&str> = ["clippy", "rustfmt"]
        .into_iter()
        .filter(|c| !has_component(&list, c))
        .collect();
    if !missing.is_empty() {
        println!("setup: adding {}", missing.join(", "));
        exec(
            Command::new("rustup")
                .args(["component", "add"])
                .args(&missing),
        )?;
        done.extend(missing.iter().map(|c| c.to_string()));
    }
    Ok(done)
}

fn installed_components(toolchain: Option<&str>) -> Vec<&str> {
    let mut args = vec!["component", "list", "--installed"];
    if let Some(toolchain) = toolchain {
        args.extend(["--toolchain", toolchain]);
    }
    args
}

/// Component lines are `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
fn has_component(list: &str, name: &str) -> bool {
    list.lines().map(str::trim).any(|line| {
        line == name
            || line
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('-'))
    })
}

fn bpf_linker(ws: &Workspace) -> Result<Vec<String>> {
    // Look in ~/.cargo/bin too: `cargo install` puts it there even when it is not on PATH.
    let version = output(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", path_with_cargo_bin()),
    )
    .or_else(|| {
        let bin = cargo_bin_dir()?.join("bpf-linker");
        output(Command::new(bin).arg("--version"))
    });
    // Output is `bpf-linker 0.10.4`.
    if version.is_some_and(|v| v.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION)) {
        return Ok(Vec::new());
    }
    println!("setup: installing bpf-linker {BPF_LINKER_VERSION} (takes a minute or two)");
    exec(&mut ws.cargo([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
    ]))?;
    Ok(vec![format!("bpf-linker {BPF_LINKER_VERSION}")])
}

fn debian_packages() -> Result<Vec<String>> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !deb_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    apt_install(&missing)?;
    Ok(missing.iter().map(|p| p.to_string()).collect())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    if output(Command::new("apt-get").arg("--version")).is_none() {
        bail!(
            "packages {} are missing and apt-get is not available; install them by hand",
            packages.join(" ")
        );
    }
    println!("setup: installing Debian packages {}", packages.join(" "));
    exec(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Python packages, installed with the pip of the `python3` on `PATH` (the one the tests run).
fn python_packages() -> Result<Vec<String>> {
    if output(Command::new("python3").args(["-c", "import kubernetes_validate"])).is_some() {
        return Ok(Vec::new());
    }
    // Debian's python3 comes without pip.
    if output(Command::new("python3").args(["-m", "pip", "--version"])).is_none() {
        apt_install(&["python3", "python3-pip"])?;
    }
    println!("setup: installing {KUBERNETES_VALIDATE} with pip");
    exec(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", KUBERNETES_VALIDATE])
            // Debian marks its Python as externally managed (PEP 668) and pip then refuses to
            // install outside a virtualenv; this machine is set up for the tests, so allow it.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    )?;
    Ok(vec![KUBERNETES_VALIDATE.to_owned()])
}

/// `dpkg-query` reports `install ok installed` for an installed package; a removed package
/// whose config files remain is `deinstall ok config-files`.
fn deb_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|status| status.trim() == "install ok installed")
}

#[cfg(test)]
mod tests {
    use super::has_component;

    #[test]
    fn component_names() {
        let list = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustfmt-x86_64-unknown-linux-gnu\n";
        assert!(has_component(list, "rust-src"));
        assert!(has_component(list, "rustfmt"));
        assert!(!has_component(list, "clippy"));
        assert!(!has_component(
            "rust-docs-x86_64-unknown-linux-gnu\n",
            "rust-src"
        ));
    }
}
