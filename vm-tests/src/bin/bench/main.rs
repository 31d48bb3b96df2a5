//! `cargo xtask bench`: every benchmark of the enforcer, side by side, into `bench/`
//! (`results.json`, `RESULTS.md`, `per-packet.svg`). Needs root and a real kernel. Run it
//! through `cargo xtask bench [--quick]`, which builds it in release mode.
//!
//! Options: `--quick` (CI smoke run, under two minutes), `--out DIR` (default `bench`),
//! `--only PART[,PART]` (per-packet, e2e, reload, events, tools), `--runs N`,
//! `--baseline-object FILE` (the per-packet and end-to-end benchmarks also run the kernel
//! programs of FILE, as one more arm), `--save-object FILE` (write this build's kernel programs to FILE and stop).
mod analysis;
mod common;
mod e2e;
mod events;
mod perpacket;
mod policy;
mod reload;
mod report;
mod tools;

use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};

pub struct Options {
    pub quick: bool,
    pub out: PathBuf,
    pub only: Option<Vec<String>>,
    /// Runs per figure; the median is reported.
    pub runs: usize,
    /// `policy-compiler` and `enforcer` binaries (release builds), for the child-process
    /// measurements.
    pub compiler_bin: Option<PathBuf>,
    pub enforcer_bin: Option<PathBuf>,
    /// An eBPF object saved from an earlier build (`--save-object`), measured beside this
    /// build's in the per-packet and end-to-end benchmarks.
    pub baseline_object: Option<PathBuf>,
    save_object: Option<PathBuf>,
}

impl Options {
    /// The bytes of `--baseline-object`, if given.
    pub fn read_baseline_object(&self) -> Result<Option<Vec<u8>>> {
        self.baseline_object
            .as_ref()
            .map(|file| std::fs::read(file).with_context(|| format!("reading {}", file.display())))
            .transpose()
    }

    fn wants(&self, part: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|p| p == part))
    }
}

fn parse_args() -> Result<Options> {
    let mut opts = Options {
        quick: false,
        out: PathBuf::from("bench"),
        only: None,
        runs: 10,
        compiler_bin: std::env::var_os("POLICY_COMPILER_BIN").map(PathBuf::from),
        enforcer_bin: std::env::var_os("ENFORCER_BIN").map(PathBuf::from),
        baseline_object: None,
        save_object: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--out" => opts.out = args.next().context("--out needs a directory")?.into(),
            "--only" => {
                let parts = args.next().context("--only needs a list")?;
                opts.only = Some(parts.split(',').map(str::to_string).collect());
            }
            "--runs" => opts.runs = args.next().context("--runs needs a number")?.parse()?,
            "--baseline-object" => {
                opts.baseline_object = Some(
                    args.next()
                        .context("--baseline-object needs a file")?
                        .into(),
                );
            }
            "--save-object" => {
                opts.save_object = Some(args.next().context("--save-object needs a file")?.into());
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if opts.runs < 10 {
        eprintln!("warning: fewer than 10 runs per figure");
    }
    Ok(opts)
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some(tools::MEASURE_CHILD) {
        return tools::measure_child();
    }
    let started = Instant::now();
    let opts = parse_args()?;
    if let Some(file) = &opts.save_object {
        std::fs::write(file, enforcer::loader::ebpf_object())
            .with_context(|| format!("writing {}", file.display()))?;
        println!("wrote this build's eBPF object to {}", file.display());
        return Ok(());
    }
    // Before any thread: an interrupted run removes its namespaces (and the programs attached
    // in them) on the way out; a killed one is cleaned up by the next run.
    vm_tests::lab::cleanup_on_signals()?;
    common::remove_leftovers();
    // Every measurement runs on one CPU; concurrent helpers pin themselves elsewhere.
    common::pin_to(common::bench_cpu())?;
    let mut report = report::Report {
        figures: Vec::new(),
        sections: Vec::new(),
        plot: Vec::new(),
    };
    type Part = fn(&Options, &mut report::Report) -> Result<()>;
    // The compiler and daemon measurements last: they allocate and free gigabytes and load
    // programs whose maps the kernel frees in the background, nothing a figure in nanoseconds
    // should be measured right after.
    let parts: [(&str, Part); 5] = [
        ("per-packet", perpacket::run),
        ("e2e", e2e::run),
        ("reload", reload::run),
        ("events", events::run),
        ("tools", tools::run),
    ];
    for (name, part) in parts {
        if !opts.wants(name) {
            continue;
        }
        let part_started = Instant::now();
        eprintln!("== bench {name}");
        part(&opts, &mut report).with_context(|| format!("benchmark {name}"))?;
        eprintln!(
            "== bench {name}: {:.1} s",
            part_started.elapsed().as_secs_f64()
        );
    }
    report.sections.push(analysis::misses(&report.figures));
    let mut command = String::from("cargo xtask bench");
    if opts.quick {
        command.push_str(" --quick");
    }
    if let Some(file) = &opts.baseline_object {
        command.push_str(&format!(" --baseline-object {}", file.display()));
    }
    report.write(&opts.out, &command, started.elapsed())?;
    for f in &report.figures {
        let met = match f.met {
            Some(true) => " [target met]",
            Some(false) => " [TARGET MISSED]",
            None => "",
        };
        let ratio = f
            .ratio
            .map(|r| format!(" ratio {r:.2}"))
            .unwrap_or_default();
        println!("{:<55} {:>12.2} {}{ratio}{met}", f.name, f.value, f.unit);
    }
    println!(
        "wrote {} in {:.0} s",
        opts.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
