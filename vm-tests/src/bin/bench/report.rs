//! `bench/results.json`, `bench/RESULTS.md` and the SVG plot.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

/// One figure of `results.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// What `ratio` compares `value` with.
    pub baseline: String,
    pub ratio: Option<f64>,
    pub target: Option<String>,
    pub met: Option<bool>,
}

impl Figure {
    pub fn new(name: impl Into<String>, value: f64, unit: &str) -> Self {
        Figure {
            name: name.into(),
            value,
            unit: unit.to_string(),
            baseline: String::new(),
            ratio: None,
            target: None,
            met: None,
        }
    }

    pub fn vs(mut self, baseline: impl Into<String>, ratio: f64) -> Self {
        self.baseline = baseline.into();
        self.ratio = Some(ratio);
        self
    }

    pub fn target(mut self, target: impl Into<String>, met: bool) -> Self {
        self.target = Some(target.into());
        self.met = Some(met);
        self
    }
}

/// A section of RESULTS.md: its figures plus free text (method, tables, explanations).
#[derive(Default)]
pub struct Section {
    pub title: String,
    pub text: String,
}

pub struct Report {
    pub figures: Vec<Figure>,
    pub sections: Vec<Section>,
    /// Per-packet cost (ns) by arm and policy size, for the plot.
    pub plot: Vec<(String, Vec<(usize, f64)>)>,
}

fn fmt_value(value: f64) -> String {
    if !value.is_finite() {
        "n/a".to_string()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn machine() -> (String, String) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let kernel = std::process::Command::new("uname")
        .arg("-srvm")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    (cpu, kernel)
}

fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Report {
    pub fn write(&self, dir: &Path, command: &str, took: std::time::Duration) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(&self.figures)?;
        std::fs::write(dir.join("results.json"), json + "\n")?;
        std::fs::write(dir.join("per-packet.svg"), self.svg())?;

        let (cpu, kernel) = machine();
        let mut md = String::new();
        let _ = writeln!(md, "# Benchmark results\n");
        let _ = writeln!(
            md,
            "- Command: `{command}` (took {:.0} s)",
            took.as_secs_f64()
        );
        let _ = writeln!(
            md,
            "- Machine: {cpu}, {} CPUs, kernel `{kernel}`",
            super::common::cpu_count()
        );
        let _ = writeln!(md, "- Date: {}", date());
        let _ = writeln!(
            md,
            "- Every figure is the median of the runs listed with it; arms of one comparison are \
             measured side by side in one run, alternated (A B C A B C ...), and ratios are taken \
             per run before the median. The machine is shared with other builds: absolute \
             numbers are noisy, ratios much less so.\n"
        );
        let _ = writeln!(md, "## Headline figures\n");
        let _ = writeln!(
            md,
            "| figure | value | compared with | ratio | target | met |\n|---|---|---|---|---|---|"
        );
        for f in &self.figures {
            let _ = writeln!(
                md,
                "| {} | {} {} | {} | {} | {} | {} |",
                f.name,
                fmt_value(f.value),
                f.unit,
                if f.baseline.is_empty() {
                    "—"
                } else {
                    &f.baseline
                },
                f.ratio.map_or("—".to_string(), |r| format!("{r:.2}")),
                f.target.as_deref().unwrap_or("—"),
                match f.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "—",
                }
            );
        }
        md.push('\n');
        md.push_str("![per-packet cost against policy size](per-packet.svg)\n\n");
        for section in &self.sections {
            let _ = writeln!(md, "## {}\n\n{}\n", section.title, section.text.trim_end());
        }
        std::fs::write(dir.join("RESULTS.md"), md)?;
        Ok(())
    }

    /// Per-packet ns against policy size (log x axis), one line per arm.
    pub fn svg(&self) -> String {
        let (w, h) = (720.0, 420.0);
        let (left, right, top, bottom) = (70.0, 180.0, 30.0, 50.0);
        let sizes: Vec<usize> = self
            .plot
            .iter()
            .flat_map(|(_, points)| points.iter().map(|p| p.0))
            .collect();
        let (min_x, max_x) = (
            sizes.iter().copied().min().unwrap_or(10).max(1) as f64,
            sizes.iter().copied().max().unwrap_or(1_000_000).max(10) as f64,
        );
        let max_y = self
            .plot
            .iter()
            .flat_map(|(_, points)| points.iter().map(|p| p.1))
            .filter(|v| v.is_finite())
            .fold(1.0f64, f64::max)
            * 1.15;
        let x = |size: usize| {
            let t = ((size as f64).log10() - min_x.log10()) / (max_x.log10() - min_x.log10());
            left + t.clamp(0.0, 1.0) * (w - left - right)
        };
        let y = |ns: f64| top + (1.0 - ns / max_y) * (h - top - bottom);
        let colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"];
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="18" text-anchor="middle" font-size="14">Per-packet cost under BPF_PROG_TEST_RUN against policy size</text>"#,
            (w - right + left) / 2.0
        );
        // Axes, grid and ticks.
        let (x0, x1, y0, y1) = (left, w - right, h - bottom, top);
        let _ = writeln!(
            svg,
            r#"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="black"/>"#
        );
        let mut tick = 10usize;
        while (tick as f64) <= max_x * 1.01 {
            if (tick as f64) >= min_x * 0.99 {
                let label = match tick {
                    t if t >= 1_000_000 => format!("{}M", t / 1_000_000),
                    t if t >= 1_000 => format!("{}k", t / 1_000),
                    t => t.to_string(),
                };
                let _ = writeln!(
                    svg,
                    r##"<line x1="{0}" y1="{y0}" x2="{0}" y2="{y1}" stroke="#ddd"/><text x="{0}" y="{1}" text-anchor="middle">{label}</text>"##,
                    x(tick),
                    y0 + 16.0
                );
            }
            tick *= 10;
        }
        let step = nice_step(max_y / 5.0);
        let mut v = 0.0;
        while v <= max_y {
            let _ = writeln!(
                svg,
                r##"<line x1="{x0}" y1="{0}" x2="{x1}" y2="{0}" stroke="#eee"/><text x="{1}" y="{2}" text-anchor="end">{v:.0}</text>"##,
                y(v),
                x0 - 6.0,
                y(v) + 4.0
            );
            v += step;
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">policy size (prefixes = rules), log scale</text>"#,
            (x0 + x1) / 2.0,
            h - 12.0
        );
        let _ = writeln!(
            svg,
            r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">ns per packet (median)</text>"#,
            (y0 + y1) / 2.0
        );
        for (i, (name, points)) in self.plot.iter().enumerate() {
            let color = colors[i % colors.len()];
            let path: Vec<String> = points
                .iter()
                .filter(|p| p.1.is_finite())
                .map(|&(size, ns)| format!("{:.1},{:.1}", x(size), y(ns)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
            for &(size, ns) in points.iter().filter(|p| p.1.is_finite()) {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{name}: {ns:.1} ns at {size}</title></circle>"#,
                    x(size),
                    y(ns)
                );
            }
            let ly = top + 10.0 + 18.0 * i as f64;
            let _ = writeln!(
                svg,
                r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{2}" y="{3}">{name}</text>"#,
                x1 + 10.0,
                x1 + 30.0,
                x1 + 35.0,
                ly + 4.0
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.max(1e-9).log10().floor());
    let norm = raw / magnitude;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}
