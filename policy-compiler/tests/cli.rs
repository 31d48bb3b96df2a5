//! The `policy-compiler` binary as scripts use it.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::example_dir;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_policy-compiler"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_string()
}

fn example() -> String {
    example_dir().display().to_string()
}

fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("policy-compiler-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn check_accepts_the_example() {
    let output = run(&["check", &example()]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.starts_with("ok: 9 segments, "), "{stdout}");
    assert!(stdout.contains(" rules, revision "), "{stdout}");
    assert_eq!(stdout.lines().count(), 1);
}

#[test]
fn check_rejects_a_broken_policy_with_every_error() {
    let dir = scratch_dir("broken");
    std::fs::write(
        dir.join("pacs.yaml"),
        "segment: pacs\nmembers: [10.30.0.1/24]\nallow:\n  - from: [radiolgy]\n    ports: [tcp/104]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("radiology.yaml"),
        "segment: radiology\nmembers: [10.10.0.0/24]\n",
    )
    .unwrap();
    // Ignored: hidden files and subdirectories.
    std::fs::write(dir.join(".draft.yaml"), "not: [valid").unwrap();
    std::fs::create_dir_all(dir.join("tests")).unwrap();
    std::fs::write(dir.join("tests/x.yaml"), "not: [valid").unwrap();
    let output = run(&["check", &dir.display().to_string()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    let pacs = dir.join("pacs.yaml").display().to_string();
    assert!(
        stderr.contains(&format!(
            "{pacs}:2:11: error: host bits set in prefix '10.30.0.1/24'"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint: did you mean 10.30.0.0/24?"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{pacs}:4:12: error: unknown segment 'radiolgy' in `from`"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint: did you mean 'radiology'?"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(".draft") && !stderr.contains("tests/x.yaml"),
        "{stderr}"
    );
    assert!(text(&output.stdout).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn trace_prints_one_json_decision() {
    let output = run(&[
        "trace",
        &example(),
        "--src",
        "10.10.0.5",
        "--dst",
        "10.30.0.9",
        "--proto",
        "tcp",
        "--dport",
        "104",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert_eq!(stdout.lines().count(), 1);
    let decision: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(decision["verdict"], "allow");
    assert_eq!(decision["rule"], "pacs/1");
    assert_eq!(decision["src_segment"], "radiology");
    assert_eq!(decision["dst_segment"], "pacs");
    assert!(decision["reason"].as_str().unwrap().contains("DICOM"));
    assert!(decision["rule_index"].is_u64());

    let output = run(&[
        "trace",
        &example(),
        "--src",
        "fd00:10::5",
        "--dst",
        "fd00:60::9",
        "--proto",
        "tcp",
        "--dport",
        "5432",
    ]);
    let decision: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(decision["verdict"], "deny");
    assert!(decision["rule"].is_null());

    let output = run(&[
        "trace",
        &example(),
        "--src",
        "10.50.0.5",
        "--dst",
        "10.70.0.9",
        "--proto",
        "icmp",
        "--icmp-type",
        "echo-request",
    ]);
    let decision: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(decision["verdict"], "audit");

    let output = run(&[
        "trace",
        &example(),
        "--src",
        "10.20.0.5",
        "--dst",
        "10.60.0.9",
        "--proto",
        "icmp",
        "--icmp-type",
        "8",
    ]);
    let decision: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(decision["rule"], "billing/2");
}

#[test]
fn trace_usage_errors_exit_2() {
    let base = ["trace", "DIR", "--src", "10.10.0.5", "--dst", "10.30.0.9"];
    let example = example();
    for extra in [
        &["--proto", "tcp"][..],
        &["--proto", "icmp"],
        &["--proto", "icmp", "--dport", "80"],
        &["--proto", "udp", "--icmp-type", "8"],
        &["--proto", "icmp", "--icmp-type", "echo"],
        &["--proto", "sctp", "--dport", "80"],
        &["--proto", "tcp", "--dport", "70000"],
    ] {
        let mut args: Vec<&str> = base.to_vec();
        args[1] = &example;
        args.extend_from_slice(extra);
        let output = run(&args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&output.stderr)
        );
        assert!(!text(&output.stderr).is_empty());
        assert!(text(&output.stdout).is_empty());
    }
    let output = run(&[
        "trace", &example, "--src", "nonsense", "--dst", "10.0.0.1", "--proto", "tcp", "--dport",
        "1",
    ]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn compile_writes_identical_bytes_twice() {
    let dir = scratch_dir("compile");
    let first = dir.join("first.json");
    let second = dir.join("second.json");
    for path in [&first, &second] {
        let output = run(&["compile", &example(), "-o", &path.display().to_string()]);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        assert!(text(&output.stdout).starts_with("ok: 9 segments"));
    }
    let bytes = std::fs::read(&first).unwrap();
    assert_eq!(bytes, std::fs::read(&second).unwrap());
    let artifact = policy_compiler::Artifact::from_json(&bytes).expect("valid artifact");
    assert_eq!(artifact.format_version, 2);
    assert!(!Path::new(&dir.join(".first.json.tmp")).exists());
    let _ = std::fs::remove_dir_all(&dir);
}
