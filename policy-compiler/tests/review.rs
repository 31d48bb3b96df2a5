//! The review tools: `diff`, `test`, `graph`, `schema` (library and command line).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{example_dir, example_policy, example_sources};
use policy_compiler::Policy;
use policy_compiler::diff::{ChangeKind, PolicyDiff, SegmentChange};
use policy_compiler::evaluate::Verdict;
use policy_compiler::graph::Graph;
use policy_compiler::model::{Mode, RuleKind};
use policy_compiler::reachability::{Access, Reachability};
use policy_compiler::reachability_tests::TestSuite;

fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_policy-compiler"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("binary runs")
}

fn run(args: &[&str]) -> Output {
    run_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_string()
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "policy-compiler-review-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A copy of the example policy (with its tests) in a scratch directory.
fn example_copy(name: &str) -> PathBuf {
    let dir = scratch_dir(name);
    for (file, content) in example_sources() {
        let base = file.rsplit('/').next().unwrap();
        std::fs::write(dir.join(base), content).unwrap();
    }
    std::fs::create_dir_all(dir.join("tests")).unwrap();
    for entry in std::fs::read_dir(example_dir().join("tests")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join("tests").join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn edit(path: &Path, from: &str, to: &str) {
    let content = std::fs::read_to_string(path).unwrap();
    assert!(content.contains(from), "{} lacks {from:?}", path.display());
    std::fs::write(path, content.replacen(from, to, 1)).unwrap();
}

fn policy_with(edits: &[(&str, &str, &str)]) -> Policy {
    let mut sources = example_sources();
    for (file, from, to) in edits {
        let (_, content) = sources
            .iter_mut()
            .find(|(name, _)| name.ends_with(&format!("/{file}")))
            .expect("file exists");
        assert!(content.contains(from), "{file} lacks {from:?}");
        *content = content.replacen(from, to, 1);
    }
    Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"))
}

fn diff_of(new: &Policy) -> PolicyDiff {
    PolicyDiff::between(&example_policy(), "old", new, "new")
}

// ---------------------------------------------------------------------------------------------
// Reachability model

#[test]
fn reachability_matches_the_evaluator_on_every_port() {
    let policy = example_policy();
    let reachability = Reachability::of(&policy);
    let labels: Vec<&str> = reachability
        .sources
        .iter()
        .map(|s| s.label.as_str())
        .collect();
    assert_eq!(
        labels,
        [
            "billing",
            "ehr-core",
            "icu-telemetry",
            "lab",
            "pacs",
            "pharmacy",
            "quarantine",
            "radiology",
            "remediation",
            "world",
            "10.99.0.0/16",
            "fd00:99::/64"
        ]
    );
    // Exhaustive over TCP ports and ICMP types for a few pairs: the range sets are exact.
    let radiology = &reachability.sources[7];
    let pacs = reachability
        .destinations
        .iter()
        .position(|d| d.name == "pacs")
        .unwrap();
    let access = &reachability.access[7][pacs];
    for port in 0..=u16::MAX {
        let verdict = policy
            .evaluate(&policy_compiler::Flow {
                src: radiology.address,
                dst: reachability.destinations[pacs].address,
                proto: 6,
                port: Some(port),
            })
            .verdict;
        assert_eq!(
            access.allowed.tcp.contains(port),
            verdict == Verdict::Allow,
            "tcp/{port}"
        );
    }
    assert_eq!(
        access.allowed.to_string(),
        "tcp/104, tcp/443, tcp/11112, icmp/destination-unreachable, icmpv6/packet-too-big, icmpv6/133-136"
    );
    let icu = reachability
        .destinations
        .iter()
        .position(|d| d.name == "icu-telemetry")
        .unwrap();
    let to_icu = &reachability.access[7][icu];
    assert!(to_icu.allowed.union(&to_icu.audited).is_everything());
    assert_eq!(
        reachability.access[7][7],
        Access {
            allowed: policy_compiler::port_set::PortSet::everything(),
            audited: Default::default()
        },
        "radiology to itself: intra allow"
    );
    // Quarantined hosts, as sources and as a destination: only the remediation servers, both
    // ways, and essential traffic.
    let quarantine = 6;
    assert!(reachability.sources[quarantine].quarantined);
    let to = |name: &str| {
        reachability
            .destinations
            .iter()
            .position(|d| d.name == name)
            .unwrap()
    };
    assert_eq!(
        reachability.destinations[to("quarantine")].name,
        "quarantine"
    );
    let essential =
        "icmp/destination-unreachable, icmpv6/packet-too-big, icmpv6/133-136".to_string();
    assert_eq!(
        reachability.access[quarantine][to("remediation")]
            .allowed
            .to_string(),
        format!("tcp/443, {essential}")
    );
    assert_eq!(
        reachability.access[quarantine][to("pacs")]
            .allowed
            .to_string(),
        essential
    );
    assert_eq!(
        reachability.access[quarantine][to("quarantine")]
            .allowed
            .to_string(),
        essential,
        "quarantined hosts do not reach each other"
    );
    assert_eq!(
        reachability.access[8][to("quarantine")].allowed.to_string(),
        format!("tcp/22, tcp/5986, {essential}"),
        "remediation repairs quarantined hosts"
    );
    assert_eq!(
        reachability.access[7][to("quarantine")].allowed.to_string(),
        essential,
        "radiology does not reach a quarantined host"
    );
}

// ---------------------------------------------------------------------------------------------
// diff

#[test]
fn diff_of_a_policy_with_itself_is_empty() {
    let diff = diff_of(&example_policy());
    assert!(diff.is_empty());
    assert_eq!(diff.summary(), "no reachability change");
    assert!(diff.to_markdown().contains("No reachability change"));
}

#[test]
fn diff_shows_an_added_rule_and_nothing_else() {
    let new = policy_with(&[(
        "billing.yaml",
        "allow:\n",
        "allow:\n  - from: [radiology]\n    ports: [tcp/5432]\n",
    )]);
    let diff = diff_of(&new);
    assert_eq!(diff.reachability.len(), 1, "{}", diff.to_table());
    let change = &diff.reachability[0];
    assert_eq!(
        (change.from.as_str(), change.to.as_str(), change.change),
        ("radiology", "billing", ChangeKind::Added)
    );
    assert_eq!(change.ports.to_string(), "tcp/5432");
    assert!(diff.modes.is_empty() && diff.segments.is_empty());
}

#[test]
fn diff_shows_a_removed_rule() {
    let new = policy_with(&[(
        "pacs.yaml",
        "  - from: [radiology]\n    ports: [tcp/443]\n",
        "  - from: [radiology]\n    ports: [tcp/8443]\n",
    )]);
    let diff = diff_of(&new);
    let kinds: Vec<(ChangeKind, String)> = diff
        .reachability
        .iter()
        .map(|c| (c.change, format!("{} -> {} {}", c.from, c.to, c.ports)))
        .collect();
    assert_eq!(
        kinds,
        [
            (ChangeKind::Added, "radiology -> pacs tcp/8443".to_string()),
            (ChangeKind::Removed, "radiology -> pacs tcp/443".to_string()),
        ]
    );
}

#[test]
fn diff_shows_exactly_the_widened_ports() {
    let new = policy_with(&[(
        "ehr-core.yaml",
        "    ports: [tcp/2575]",
        "    ports: [tcp/2570-2590, udp/2575]",
    )]);
    let diff = diff_of(&new);
    let rows: Vec<String> = diff
        .reachability
        .iter()
        .map(|c| format!("{:?} {} -> {} {}", c.change, c.from, c.to, c.ports))
        .collect();
    assert_eq!(
        rows,
        [
            "Added icu-telemetry -> ehr-core tcp/2570-2574, tcp/2576-2590, udp/2575",
            "Added lab -> ehr-core tcp/2570-2574, tcp/2576-2590, udp/2575",
            "Added radiology -> ehr-core tcp/2570-2574, tcp/2576-2590, udp/2575",
        ]
    );
}

#[test]
fn diff_marks_enforce_to_monitor_as_would_be_denials_passing() {
    let new = policy_with(&[("billing.yaml", "mode: enforce", "mode: monitor")]);
    let diff = diff_of(&new);
    assert_eq!(diff.modes.len(), 1);
    assert_eq!(diff.modes[0].segment, "billing");
    assert_eq!(
        (diff.modes[0].before, diff.modes[0].after),
        (Mode::Enforce, Mode::Monitor)
    );
    assert!(diff.modes[0].effect.contains("would-be denials now pass"));
    let radiology = diff
        .reachability
        .iter()
        .find(|c| c.from == "radiology" && c.to == "billing")
        .expect("radiology to billing changes");
    assert_eq!(radiology.change, ChangeKind::NowAudited);
    assert!(radiology.ports.to_string().starts_with("any except"));
    assert!(radiology.ports.tcp.contains(5432));
    assert!(
        diff.reachability
            .iter()
            .all(|c| c.to == "billing" && c.change == ChangeKind::NowAudited)
    );
    let markdown = diff.to_markdown();
    assert!(markdown.contains("passes as audit"), "{markdown}");
    assert!(
        markdown.contains("| `billing` | enforce | **monitor** |"),
        "{markdown}"
    );
    let table = diff.to_table();
    assert!(table.contains("+ AUDIT"), "{table}");
}

#[test]
fn diff_reports_segments_added_removed_and_members() {
    let mut sources = example_sources();
    sources.retain(|(file, _)| !file.ends_with("/lab.yaml"));
    for (file, content) in &mut sources {
        if file.ends_with("/ehr-core.yaml") {
            *content = content.replace(
                "[lab, radiology, icu-telemetry]",
                "[radiology, icu-telemetry]",
            );
            *content = content.replace("[radiology, lab, pharmacy,", "[radiology, pharmacy,");
        }
        if file.ends_with("/remediation.yaml") {
            *content = content.replace(" lab,", "");
        }
        if file.ends_with("/pacs.yaml") {
            *content = content.replace(
                "members: [10.30.0.0/24,",
                "members: [10.30.0.0/24, 10.31.0.0/24,",
            );
        }
    }
    sources.push((
        "segments/imaging-ai.yaml".into(),
        "segment: imaging-ai\nmembers: [10.81.0.0/24]\nallow:\n  - from: [pacs]\n    ports: [tcp/443]\n"
            .into(),
    ));
    let new = Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"));
    let diff = diff_of(&new);
    assert_eq!(
        diff.segments,
        [
            SegmentChange::Added {
                segment: "imaging-ai".into(),
                members: vec!["10.81.0.0/24".into()]
            },
            SegmentChange::Removed {
                segment: "lab".into(),
                members: vec!["10.50.0.0/24".into(), "fd00:50::/64".into()]
            },
            SegmentChange::Members {
                segment: "pacs".into(),
                added: vec!["10.31.0.0/24".into()],
                removed: vec![]
            },
        ]
    );
    // The new segment's addresses were `world` (unenforced): now only pacs may reach it.
    let pacs_to_ai = diff
        .reachability
        .iter()
        .find(|c| c.from == "pacs" && c.to == "imaging-ai")
        .expect("pacs to imaging-ai");
    assert_eq!(pacs_to_ai.change, ChangeKind::Removed);
    assert!(!pacs_to_ai.ports.tcp.contains(443), "tcp/443 stays allowed");
    // The lab's machines are `world` now: they lose their EHR access.
    assert!(diff.reachability.iter().any(|c| c.from == "lab"
        && c.to == "ehr-core"
        && c.change == ChangeKind::Removed
        && c.ports.to_string() == "tcp/443, tcp/2575"));
    let json: serde_json::Value = serde_json::from_str(&diff.to_json()).unwrap();
    assert_eq!(json["segments"][0]["change"], "added");
    assert!(json["reachability"][0]["ports"].is_array());
}

#[test]
fn diff_of_a_new_cidr_rule_shows_only_what_it_opens() {
    let new = policy_with(&[(
        "billing.yaml",
        "allow:\n",
        "allow:\n  - from: [10.10.0.128/25]\n    ports: [tcp/5432]\n",
    )]);
    let diff = diff_of(&new);
    let rows: Vec<String> = diff
        .reachability
        .iter()
        .map(|c| format!("{:?} {} -> {} {}", c.change, c.from, c.to, c.ports))
        .collect();
    assert_eq!(
        rows,
        ["Added 10.10.0.128/25 (radiology) -> billing tcp/5432"]
    );
}

#[test]
fn diff_command_exit_codes_and_formats() {
    let example = example_dir().display().to_string();
    let output = run(&["diff", &example, &example]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("no reachability change"));

    let changed = example_copy("diff-cli");
    edit(
        &changed.join("pharmacy.yaml"),
        "ports: [tcp/443]",
        "ports: [tcp/443, tcp/8080-8090]",
    );
    let changed_dir = changed.display().to_string();
    let output = run(&["diff", &example, &changed_dir]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let table = text(&output.stdout);
    assert!(table.contains("CHANGE"), "{table}");
    let row = table
        .lines()
        .find(|line| line.contains("+ allow"))
        .expect("an added row");
    assert!(
        row.contains("ehr-core") && row.contains("pharmacy") && row.contains("tcp/8080-8090"),
        "{row}"
    );

    let output = run(&["diff", &example, &changed_dir, "--format", "markdown"]);
    assert_eq!(output.status.code(), Some(1));
    let markdown = text(&output.stdout);
    assert!(
        markdown.starts_with("<!-- policy-compiler diff -->"),
        "{markdown}"
    );
    assert!(
        markdown.contains("| ➕ **allowed** | `ehr-core` | `pharmacy` | `tcp/8080-8090` |"),
        "{markdown}"
    );

    let output = run(&["diff", &example, &changed_dir, "--format", "json"]);
    assert_eq!(output.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json["reachability"][0]["change"], "added");
    assert_eq!(json["reachability"][0]["ports"][0], "tcp/8080-8090");

    // An invalid policy: exit 2 with its errors.
    edit(
        &changed.join("pacs.yaml"),
        "from: [radiology]",
        "from: [radiolgy]",
    );
    let output = run(&["diff", &example, &changed_dir]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("unknown segment 'radiolgy'"), "{stderr}");
    assert!(text(&output.stdout).is_empty());
    let output = run(&["diff", &example, "/no/such/policy"]);
    assert_eq!(output.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&changed);
}

#[test]
fn diff_reads_git_revisions() {
    let repo = scratch_dir("git");
    let git = |args: &[&str]| {
        let output = Command::new("git")
            .args([
                "-c",
                "user.name=Test",
                "-c",
                "user.email=test@example.invalid",
            ])
            .args(args)
            .current_dir(&repo)
            .output()
            .expect("git runs");
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            text(&output.stderr)
        );
    };
    git(&["init", "-q", "-b", "main"]);
    let segments = repo.join("policy/segments");
    std::fs::create_dir_all(&segments).unwrap();
    for (file, content) in example_sources() {
        std::fs::write(segments.join(file.rsplit('/').next().unwrap()), content).unwrap();
    }
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "base"]);
    edit(
        &segments.join("lab.yaml"),
        "ports: [tcp/2575]",
        "ports: [tcp/2575, tcp/22]",
    );
    git(&["commit", "-q", "-am", "ssh to the lab"]);

    let output = run_in(
        &repo,
        &["diff", "HEAD~1:policy/segments", "HEAD:policy/segments"],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let table = text(&output.stdout);
    assert!(
        table.contains("HEAD~1:policy/segments -> HEAD:policy/segments"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.contains("+ allow")
            && l.contains("ehr-core")
            && l.contains("lab")
            && l.contains("tcp/22")),
        "{table}"
    );
    // From a subdirectory too (DIR is from the top level, as in `git show REV:DIR`).
    let output = run_in(
        &segments,
        &["diff", "HEAD:policy/segments", "HEAD:policy/segments"],
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    // A revision against the work tree.
    let output = run_in(
        &repo,
        &["diff", "main~1:policy/segments", "policy/segments"],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    // Unknown revision or directory: exit 2 and git's message.
    let output = run_in(
        &repo,
        &["diff", "nosuchrev:policy/segments", "HEAD:policy/segments"],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("git"),
        "{}",
        text(&output.stderr)
    );
    // An invalid policy in a revision names the file as REV:DIR/FILE.
    edit(
        &segments.join("lab.yaml"),
        "mode: enforce",
        "mode: enforcing",
    );
    git(&["commit", "-q", "-am", "typo"]);
    let output = run_in(
        &repo,
        &["diff", "HEAD~1:policy/segments", "HEAD:policy/segments"],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("HEAD:policy/segments/lab.yaml:4:7: error: invalid value 'enforcing'"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&repo);
}

// ---------------------------------------------------------------------------------------------
// test

#[test]
fn the_example_tests_pass_and_exercise_every_rule() {
    let policy = example_policy();
    let suite = TestSuite::load(&example_dir().join("tests"), &policy)
        .unwrap_or_else(|errors| panic!("{errors:?}"));
    let outcomes = suite.run(&policy);
    let failures: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| o.report_line())
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    // Every written rule and every intra pseudo-rule allows at least one case, so the suite
    // cannot silently fall behind the policy. Essential traffic is the same for every segment.
    let exercised: Vec<u32> = outcomes
        .iter()
        .filter(|o| o.case.expect == Verdict::Allow)
        .filter_map(|o| o.decision.rule_index)
        .collect();
    let missing: Vec<String> = policy
        .rules()
        .iter()
        .filter(|rule| !rule.is_essential())
        .filter(|rule| !exercised.contains(&rule.index))
        .map(|rule| format!("{} ({}:{})", rule.id, rule.file, rule.line))
        .collect();
    assert!(
        missing.is_empty(),
        "rules without an allow case in segments/tests: {missing:?}"
    );
    assert!(
        policy
            .rules()
            .iter()
            .any(|rule| matches!(rule.kind, RuleKind::Intra))
    );
    for (from, to) in [
        ("radiology", "billing"),
        ("radiology", "pharmacy"),
        ("pacs", "billing"),
        ("lab", "pacs"),
        ("billing", "ehr-core"),
    ] {
        assert!(
            suite.cases.iter().any(|case| case.expect == Verdict::Deny
                && case.from.to_string() == from
                && case.to.to_string() == to),
            "no lateral-move case {from} -> {to}"
        );
    }
}

#[test]
fn test_command_reports_passes_and_failures() {
    let output = run(&["test", &example_dir().display().to_string()]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let last = stdout.lines().last().unwrap();
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
    assert!(
        stdout
            .lines()
            .all(|line| line.starts_with("ok ") || line == last)
    );

    let dir = example_copy("test-fail");
    std::fs::write(
        dir.join("tests/extra.yaml"),
        "- name: billing must not reach the PACS\n  from: billing\n  to: pacs\n  port: tcp/104\n  expect: deny\n\
         - from: radiology\n  to: 10.60.0.7\n  port: tcp/5432\n  expect: allow\n",
    )
    .unwrap();
    let output = run(&["test", &dir.display().to_string()]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let extra = dir.join("tests/extra.yaml").display().to_string();
    assert!(
        stdout.contains(&format!("ok    {extra}:1  billing must not reach the PACS")),
        "{stdout}"
    );
    let failure = stdout
        .lines()
        .find(|line| line.starts_with("FAIL"))
        .expect("a failure line");
    assert!(failure.contains(&format!("{extra}:6")), "{failure}");
    assert!(
        failure.contains("radiology 10.10.0.0 -> 10.60.0.7 tcp/5432"),
        "{failure}"
    );
    assert!(failure.contains("expected allow, got deny"), "{failure}");
    assert!(stdout.trim_end().ends_with(" passed, 1 failed"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_command_reports_malformed_files_with_their_place() {
    let dir = example_copy("test-bad");
    std::fs::write(
        dir.join("tests/bad.yaml"),
        "- from: radiolgy\n  to: pacs\n  port: tcp/104\n  expect: allow\n\
         - from: radiology\n  to: pacs\n  port: tcp/100-200\n  expect: maybe\n\
         - from: radiology\n  too: pacs\n  port: tcp/104\n  expect: deny\n",
    )
    .unwrap();
    std::fs::write(dir.join("tests/syntax.yml"), "- from: [radiology\n").unwrap();
    let output = run(&["test", &dir.display().to_string()]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    let bad = dir.join("tests/bad.yaml").display().to_string();
    for expected in [
        format!("{bad}:1:9: error: unknown segment or address 'radiolgy'"),
        "hint: did you mean 'radiology'?".to_string(),
        format!("{bad}:7:9: error: `tcp/100-200` is not one packet"),
        format!("{bad}:8:11: error: invalid value 'maybe' for `expect`"),
        format!("{bad}:10:3: error: unknown field `too` in a test case"),
        "hint: did you mean `to`?".to_string(),
        format!("{bad}:9:3: error: missing required field `to`"),
        "syntax.yml:".to_string(),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(text(&output.stdout).is_empty());

    // No test files at all is an error too: a CI step must not pass by testing nothing.
    let empty = scratch_dir("test-none");
    for (file, content) in example_sources() {
        std::fs::write(empty.join(file.rsplit('/').next().unwrap()), content).unwrap();
    }
    let output = run(&["test", &empty.display().to_string()]);
    assert_eq!(output.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn a_segment_name_stands_for_the_first_address_of_its_first_member() {
    let policy = example_policy();
    let sources = [(
        "t.yaml".to_string(),
        "- from: pacs\n  to: fd00:10::9\n  port: tcp/104\n  expect: allow\n\
         - from: world\n  to: ehr-core\n  port: tcp/443\n  expect: deny\n"
            .to_string(),
    )];
    let suite = TestSuite::from_sources(&sources, &policy).unwrap();
    assert_eq!(
        suite.cases[0].flow.src.to_string(),
        "fd00:30::",
        "IPv6, like the other end"
    );
    assert_eq!(suite.cases[1].flow.src.to_string(), "0.0.0.0");
    assert_eq!(suite.cases[1].flow.dst.to_string(), "10.20.0.0");
}

// ---------------------------------------------------------------------------------------------
// graph

#[test]
fn graph_dot_and_mermaid_have_the_expected_edges() {
    let graph = Graph::of(&example_policy());
    let dot = graph.to_dot();
    for expected in [
        "\"radiology\" -> \"pacs\" [label=\"tcp/104, tcp/443, tcp/11112\"];",
        "\"ehr-core\" -> \"billing\" [label=\"tcp/5432, icmp/echo-request, icmpv6/echo-request\"];",
        "\"10.99.0.0/16\" -> \"ehr-core\" [label=\"tcp/22, udp/161, icmp/echo-request, icmpv6/echo-request\"];",
        "\"icu-telemetry\" [label=\"icu-telemetry\\n(monitor)\", style=\"rounded,dashed\"];",
    ] {
        assert!(dot.contains(expected), "missing {expected} in\n{dot}");
    }
    // No lateral edges, and essential traffic is in the legend, not on edges.
    assert!(!dot.contains("\"radiology\" -> \"billing\""));
    assert!(!dot.contains("\"pacs\" -> \"ehr-core\""));
    assert_eq!(dot.matches(" -> ").count(), 26, "{dot}");
    // The built-in quarantine segment: reached only by the remediation servers, reaching only
    // them; quarantined hosts do not reach each other.
    assert!(dot.contains("\"quarantine\" -> \"remediation\" [label=\"tcp/443\"];"));
    assert!(dot.contains("\"remediation\" -> \"quarantine\" [label=\"tcp/22, tcp/5986\"];"));
    assert!(dot.contains("\"quarantine\" [label=\"quarantine\\nintra: deny\"];"));
    assert_eq!(dot.matches("\"quarantine\" -> ").count(), 1);
    assert!(!dot.contains("label=\"icmp/destination-unreachable"));

    let mermaid = graph.to_mermaid();
    let id = |name: &str| {
        let index = graph
            .nodes
            .iter()
            .position(|node| node.name == name)
            .unwrap();
        format!("n{index}")
    };
    assert!(
        mermaid.starts_with("---\ntitle: Segment connectivity"),
        "{mermaid}"
    );
    assert!(mermaid.contains("flowchart LR"));
    assert!(mermaid.contains(&format!(
        "{} -->|\"tcp/104, tcp/11112\"| {}",
        id("pacs"),
        id("radiology")
    )));
    assert!(mermaid.contains(&format!(
        "{}[\"icu-telemetry<br/>(monitor)\"]:::monitor",
        id("icu-telemetry")
    )));
    assert!(mermaid.contains("classDef monitor stroke-dasharray"));
}

#[test]
fn graph_shows_world_when_judged_and_intra_deny() {
    let new = policy_with(&[
        (
            "defaults.yaml",
            "mode: unenforced",
            "mode: enforce\n  allow:\n    - from: [ehr-core]\n      ports: [tcp/443]",
        ),
        ("lab.yaml", "intra: allow", "intra: deny"),
    ]);
    let dot = Graph::of(&new).to_dot();
    assert!(
        dot.contains("\"ehr-core\" -> \"world\" [label=\"tcp/443\"];"),
        "{dot}"
    );
    assert!(
        dot.contains("\"world\" [label=\"world\\n(enforce)\", shape=ellipse];"),
        "{dot}"
    );
    assert!(
        dot.contains("\"lab\" [label=\"lab\\nintra: deny\"];"),
        "{dot}"
    );
}

#[test]
fn graph_svg_is_well_formed_and_names_every_node() {
    let output = run(&[
        "graph",
        &example_dir().display().to_string(),
        "--format",
        "svg",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let svg = text(&output.stdout);
    let document = roxmltree::Document::parse(&svg).expect("well-formed XML");
    assert_eq!(document.root_element().tag_name().name(), "svg");
    let texts: Vec<String> = document
        .descendants()
        .filter(|node| node.is_element() && node.tag_name().name() == "text")
        .map(|node| {
            node.descendants()
                .filter(|n| n.is_text())
                .filter_map(|n| n.text())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    for name in [
        "billing",
        "ehr-core",
        "icu-telemetry",
        "lab",
        "pacs",
        "pharmacy",
        "quarantine",
        "radiology",
        "remediation",
        "10.99.0.0/16",
    ] {
        assert!(texts.iter().any(|t| t == name), "no node {name}");
    }
    assert!(texts.iter().any(|t| t.contains("tcp/5432")));
    let edges = document
        .descendants()
        .filter(|node| node.tag_name().name() == "path" && node.attribute("marker-end").is_some())
        .count();
    assert_eq!(edges, 26);
    for format in ["dot", "mermaid"] {
        let output = run(&[
            "graph",
            &example_dir().display().to_string(),
            "--format",
            format,
        ]);
        assert_eq!(output.status.code(), Some(0));
        assert!(text(&output.stdout).contains("ehr-core"));
    }
}

// ---------------------------------------------------------------------------------------------
// schema

/// YAML to JSON with YAML's own types (integers stay integers), as an editor's YAML plugin does.
fn yaml_to_json(text: &str) -> serde_json::Value {
    use yaml_rust2::Yaml;
    fn convert(yaml: &Yaml) -> serde_json::Value {
        match yaml {
            Yaml::Null | Yaml::BadValue => serde_json::Value::Null,
            Yaml::Boolean(b) => (*b).into(),
            Yaml::Integer(i) => (*i).into(),
            Yaml::Real(r) => r.parse::<f64>().map_or(serde_json::Value::Null, Into::into),
            Yaml::String(s) => s.clone().into(),
            Yaml::Array(items) => items.iter().map(convert).collect(),
            Yaml::Hash(map) => map
                .iter()
                .map(|(key, value)| {
                    let key = match key {
                        Yaml::String(s) => s.clone(),
                        other => format!("{other:?}"),
                    };
                    (key, convert(value))
                })
                .collect::<serde_json::Map<_, _>>()
                .into(),
            Yaml::Alias(_) => serde_json::Value::Null,
        }
    }
    let documents = yaml_rust2::YamlLoader::load_from_str(text).expect("YAML");
    documents.first().map_or(serde_json::Value::Null, convert)
}

fn schema_validator() -> jsonschema::Validator {
    let output = run(&["schema"]);
    assert_eq!(output.status.code(), Some(0));
    let schema: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    jsonschema::draft202012::new(&schema).expect("a valid draft 2020-12 schema")
}

#[test]
fn schema_accepts_the_example_policy() {
    let validator = schema_validator();
    for (file, content) in example_sources() {
        let document = yaml_to_json(&content);
        let errors: Vec<String> = validator
            .iter_errors(&document)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{file}: {errors:?}");
    }
    let full_defaults = "on_policy_change: keep\negress: monitor\nessential_traffic: []\n\
        conntrack:\n  max_entries: 262144\n  tcp_established_timeout: 5d\n  udp_timeout: 60\n\
        fragments:\n  max_entries: 16384\n  timeout: 30s\nworld:\n  mode: enforce\n  allow:\n\
        \x20   - from: [ehr-core, 10.99.0.0/16]\n      ports: [tcp/443, icmp/8, icmpv6/any, any]\n";
    let document = yaml_to_json(full_defaults);
    assert!(
        validator.is_valid(&document),
        "{:?}",
        validator
            .iter_errors(&document)
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
    );
}

#[test]
fn schema_rejects_invalid_documents() {
    let validator = schema_validator();
    for (why, document) in [
        (
            "unknown field",
            "segment: pacs\nmembers: [10.30.0.0/24]\nowner: it\n",
        ),
        ("missing members", "segment: pacs\n"),
        (
            "bad mode",
            "segment: pacs\nmembers: [10.30.0.0/24]\nmode: enforcing\n",
        ),
        (
            "bad intra",
            "segment: pacs\nmembers: [10.30.0.0/24]\nintra: sometimes\n",
        ),
        ("reserved name", "segment: world\nmembers: [10.30.0.0/24]\n"),
        ("bad name", "segment: PACS\nmembers: [10.30.0.0/24]\n"),
        (
            "bad port",
            "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: [radiology]\n    ports: [tcp/http]\n",
        ),
        (
            "port without protocol",
            "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: any\n    ports: [104]\n",
        ),
        (
            "rule without ports",
            "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: [radiology]\n",
        ),
        (
            "empty from",
            "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: []\n    ports: [any]\n",
        ),
        ("bad world mode", "world:\n  mode: sometimes\n"),
        ("bad egress", "egress: yes-please\n"),
        ("bad on_policy_change", "on_policy_change: restart\n"),
        ("bad duration", "conntrack:\n  udp_timeout: 1 minute\n"),
        (
            "unknown defaults field",
            "conntrack:\n  max_entries: 10\nlogging: true\n",
        ),
    ] {
        let document = yaml_to_json(document);
        assert!(!validator.is_valid(&document), "{why}: accepted {document}");
    }
}

#[test]
fn diff_shows_what_a_change_opens_to_and_from_quarantined_hosts() {
    let new = policy_with(&[(
        "quarantine.yaml",
        "ports: [tcp/22, tcp/5986]",
        "ports: [tcp/22, tcp/3389, tcp/5986]",
    )]);
    let diff = diff_of(&new);
    let rows: Vec<(String, String, ChangeKind, String)> = diff
        .reachability
        .iter()
        .map(|c| (c.from.clone(), c.to.clone(), c.change, c.ports.to_string()))
        .collect();
    assert_eq!(
        rows,
        [(
            "remediation".to_string(),
            "quarantine".to_string(),
            ChangeKind::Added,
            "tcp/3389".to_string()
        )]
    );
    let new = policy_with(&[(
        "pacs.yaml",
        "  - from: [radiology]\n    ports: [tcp/443]",
        "  - from: [radiology, quarantine]\n    ports: [tcp/443]",
    )]);
    let rows: Vec<(String, String, String)> = diff_of(&new)
        .reachability
        .iter()
        .map(|c| (c.from.clone(), c.to.clone(), c.ports.to_string()))
        .collect();
    assert_eq!(
        rows,
        [(
            "quarantine".to_string(),
            "pacs".to_string(),
            "tcp/443".to_string()
        )]
    );
}

#[test]
fn test_cases_can_quarantine_hosts() {
    let policy = example_policy();
    let sources = [(
        "q.yaml".to_string(),
        "- from: 10.10.0.20\n  to: pacs\n  port: tcp/104\n  quarantined: 10.10.0.20\n  expect: deny\n\
         - from: 10.10.0.20\n  to: pacs\n  port: tcp/104\n  expect: allow\n\
         - from: 10.10.0.20\n  to: 10.10.0.21\n  port: tcp/445\n  quarantined: [10.10.0.20, 10.10.0.21]\n  expect: deny\n"
            .to_string(),
    )];
    let suite = TestSuite::from_sources(&sources, &policy).unwrap();
    let outcomes = suite.run(&policy);
    assert!(outcomes.iter().all(|o| o.passed()), "{outcomes:#?}");
    assert_eq!(outcomes[0].decision.src_segment, "quarantine");
    assert!(
        outcomes[0].report_line().contains("quarantined 10.10.0.20"),
        "{}",
        outcomes[0].report_line()
    );
    assert_eq!(suite.cases[2].quarantined.len(), 2);

    let bad = [(
        "bad.yaml".to_string(),
        "- from: 10.10.0.20\n  to: pacs\n  port: tcp/104\n  quarantined: 10.10.0.0/24\n  expect: deny\n\
         - from: quarantine\n  to: pacs\n  port: tcp/104\n  expect: deny\n"
            .to_string(),
    )];
    let errors: Vec<String> = TestSuite::from_sources(&bad, &policy)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    let errors = errors.join("\n");
    assert!(
        errors.contains("bad.yaml:4:16: error: invalid address '10.10.0.0/24' in `quarantined`"),
        "{errors}"
    );
    assert!(
        errors.contains("quarantine has no address to stand for it")
            && errors.contains("list it in `quarantined:`"),
        "{errors}"
    );
}
