//! Every kind of policy error: right file, line and hint; and no panic on garbage input.

mod common;

use common::{errors_of, example_sources, source};
use policy_compiler::model::Capacities;
use policy_compiler::{CompileError, Policy, PolicyErrorKind, compile_with_capacities};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const RADIOLOGY: &str = "segment: radiology\nmembers: [10.10.0.0/24]\n";

/// Asserts that validating `sources` reports an error in `file` at `line` whose message
/// contains `message` and whose hint contains `hint`.
#[track_caller]
fn expect_error(sources: &[(String, String)], file: &str, line: usize, message: &str, hint: &str) {
    let errors = errors_of(sources);
    let found = errors.iter().any(|e| {
        e.file == file
            && e.line == Some(line)
            && e.kind.to_string().contains(message)
            && e.hint.as_deref().unwrap_or("").contains(hint)
    });
    let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        found,
        "expected {file}:{line}: '{message}' (hint '{hint}'), got:\n{}",
        all.join("\n")
    );
}

fn with_pacs(pacs: &str) -> Vec<(String, String)> {
    vec![
        source("segments/radiology.yaml", RADIOLOGY),
        source("segments/pacs.yaml", pacs),
    ]
}

#[test]
fn yaml_syntax_error() {
    let sources = with_pacs("segment: pacs\nmembers: [10.30.0.0/24\nmode: enforce\n");
    let errors = errors_of(&sources);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].file, "segments/pacs.yaml");
    assert!(matches!(errors[0].kind, PolicyErrorKind::Syntax(_)));
    assert!(matches!(errors[0].line, Some(2..=3)), "{:?}", errors[0]);
    assert!(
        errors[0]
            .hint
            .as_deref()
            .unwrap_or("")
            .contains("indentation")
    );

    let tabs = with_pacs("segment: pacs\n\tmembers: [10.30.0.0/24]\n");
    assert!(matches!(
        errors_of(&tabs)[0].kind,
        PolicyErrorKind::Syntax(_)
    ));
}

#[test]
fn unknown_fields_everywhere() {
    let pacs = "segment: pacs\nmembers: [10.30.0.0/24]\nmdoe: monitor\nallow:\n  - from: radiology\n    port: [tcp/104]\n    ports: [tcp/104]\n";
    let sources = with_pacs(pacs);
    expect_error(
        &sources,
        "segments/pacs.yaml",
        3,
        "unknown field `mdoe`",
        "did you mean `mode`?",
    );
    expect_error(
        &sources,
        "segments/pacs.yaml",
        6,
        "unknown field `port` in a rule",
        "`ports`",
    );

    let mut sources = with_pacs("segment: pacs\nmembers: [10.30.0.0/24]\n");
    sources.push(source(
        "segments/defaults.yaml",
        "world:\n  mode: enforce\n  allwo: []\nworl: {}\n",
    ));
    expect_error(
        &sources,
        "segments/defaults.yaml",
        3,
        "unknown field `allwo` in `world`",
        "`allow`",
    );
    expect_error(
        &sources,
        "segments/defaults.yaml",
        4,
        "unknown field `worl`",
        "`world`",
    );
}

#[test]
fn missing_required_fields() {
    let sources = with_pacs("description: no name\nmembers: [10.30.0.0/24]\n");
    expect_error(
        &sources,
        "segments/pacs.yaml",
        1,
        "missing required field `segment`",
        "segment: pacs",
    );

    let sources = with_pacs("segment: pacs\ndescription: no members\n");
    expect_error(
        &sources,
        "segments/pacs.yaml",
        1,
        "missing required field `members`",
        "members:",
    );

    let pacs = "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - ports: [tcp/104]\n  - from: radiology\n";
    let sources = with_pacs(pacs);
    expect_error(
        &sources,
        "segments/pacs.yaml",
        4,
        "missing required field `from` in a rule",
        "from:",
    );
    expect_error(
        &sources,
        "segments/pacs.yaml",
        5,
        "missing required field `ports` in a rule",
        "ports:",
    );
}

#[test]
fn unknown_segment_in_from_suggests_closest() {
    let pacs = "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: [radiolgy]\n    ports: [tcp/104]\n";
    let sources = with_pacs(pacs);
    expect_error(
        &sources,
        "segments/pacs.yaml",
        4,
        "unknown segment 'radiolgy' in `from`",
        "did you mean 'radiology'?",
    );
    let text = errors_of(&sources)[0].to_string();
    assert_eq!(
        text,
        "segments/pacs.yaml:4:12: error: unknown segment 'radiolgy' in `from`\n  hint: did you mean 'radiology'?"
    );

    let pacs =
        "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: finance\n    ports: [tcp/104]\n";
    expect_error(
        &with_pacs(pacs),
        "segments/pacs.yaml",
        4,
        "unknown segment 'finance'",
        "known segments: world, pacs, quarantine, radiology",
    );
}

#[test]
fn duplicate_segment_names() {
    let sources = vec![
        source(
            "segments/pacs.yaml",
            "segment: pacs\nmembers: [10.30.0.0/24]\n",
        ),
        source(
            "segments/pacs.yml",
            "segment: pacs\nmembers: [10.31.0.0/24]\n",
        ),
    ];
    expect_error(
        &sources,
        "segments/pacs.yml",
        1,
        "duplicate segment 'pacs'",
        "segments/pacs.yaml",
    );
}

#[test]
fn same_prefix_in_two_segments() {
    let sources = with_pacs("segment: pacs\nmembers:\n  - 10.30.0.0/24\n  - 10.10.0.0/24\n");
    expect_error(
        &sources,
        "segments/radiology.yaml",
        2,
        "10.10.0.0/24 is a member of both 'pacs' and 'radiology'",
        "segments/pacs.yaml:4",
    );

    let sources = with_pacs("segment: pacs\nmembers: [10.30.0.0/24, 10.30.0.0/24]\n");
    expect_error(
        &sources,
        "segments/pacs.yaml",
        2,
        "listed twice",
        "remove one",
    );
}

#[test]
fn host_bits_set() {
    let sources = with_pacs("segment: pacs\nmembers: [10.30.0.1/24]\n");
    expect_error(
        &sources,
        "segments/pacs.yaml",
        2,
        "host bits set in prefix '10.30.0.1/24'",
        "did you mean 10.30.0.0/24?",
    );
    let pacs = "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: \"fd00:99::1/64\"\n    ports: any\n";
    expect_error(
        &with_pacs(pacs),
        "segments/pacs.yaml",
        4,
        "host bits set",
        "did you mean fd00:99::/64?",
    );
    let sources = with_pacs("segment: pacs\nmembers: [10.30.0.0/33, radiology]\n");
    expect_error(
        &sources,
        "segments/pacs.yaml",
        2,
        "invalid address or prefix '10.30.0.0/33'",
        "0 to 32",
    );
    expect_error(
        &sources,
        "segments/pacs.yaml",
        2,
        "invalid address or prefix 'radiology'",
        "10.30.0.0/24",
    );
}

#[test]
fn bad_ports() {
    let cases = [
        (
            "tcp/90-80",
            "range start 90 is above its end 80",
            "tcp/80-90",
        ),
        ("udp/70000", "port 70000 is above 65535", "0 to 65535"),
        ("icmp/300", "icmp type 300 is above 255", "0 to 255"),
        (
            "icmp/echo-requets",
            "unknown icmp type 'echo-requets'",
            "did you mean icmp/echo-request?",
        ),
        (
            "icmpv6/router-advertisment",
            "unknown icmpv6 type",
            "icmpv6/router-advertisement",
        ),
        ("sctp/80", "unknown protocol 'sctp'", "tcp/N"),
        ("tpc/80", "unknown protocol 'tpc'", "did you mean tcp/80?"),
        ("443", "missing protocol", "tcp/443"),
        ("tcp/http", "'http' is not a port number", "tcp/N"),
    ];
    for (entry, message, hint) in cases {
        let pacs = format!(
            "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: radiology\n    ports: [tcp/1, {entry}]\n"
        );
        expect_error(&with_pacs(&pacs), "segments/pacs.yaml", 5, message, hint);
    }
}

#[test]
fn empty_lists() {
    let sources = with_pacs("segment: pacs\nmembers: []\n");
    expect_error(
        &sources,
        "segments/pacs.yaml",
        2,
        "empty `members` list",
        "10.30.0.0/24",
    );
    let sources = with_pacs("segment: pacs\nmembers:\n");
    expect_error(
        &sources,
        "segments/pacs.yaml",
        2,
        "empty `members` list",
        "",
    );
    let pacs = "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: []\n    ports: []\n";
    expect_error(
        &with_pacs(pacs),
        "segments/pacs.yaml",
        4,
        "empty `from` list",
        "any",
    );
    expect_error(
        &with_pacs(pacs),
        "segments/pacs.yaml",
        5,
        "empty `ports` list",
        "tcp/443",
    );
}

#[test]
fn duplicate_rule_ids() {
    let pacs = "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - name: noc\n    from: any\n    ports: any\n";
    let radiology = "segment: radiology\nmembers: [10.10.0.0/24]\nallow:\n  - from: any\n    ports: any\n  - name: noc\n    from: any\n    ports: any\n";
    let sources = vec![
        source("segments/pacs.yaml", pacs),
        source("segments/radiology.yaml", radiology),
    ];
    expect_error(
        &sources,
        "segments/radiology.yaml",
        6,
        "duplicate rule id 'noc'",
        "segments/pacs.yaml:4",
    );

    // A name may not take the id of another rule, including the intra pseudo-rule.
    let pacs = "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - name: pacs/intra\n    from: any\n    ports: any\n";
    let errors = errors_of(&with_pacs(pacs));
    assert!(
        errors
            .iter()
            .any(|e| e.kind == PolicyErrorKind::DuplicateRuleId("pacs/intra".into()))
    );
}

#[test]
fn segment_names_and_file_names() {
    let sources = vec![source(
        "segments/world.yaml",
        "segment: world\nmembers: [10.0.0.0/8]\n",
    )];
    expect_error(
        &sources,
        "segments/world.yaml",
        1,
        "segment name 'world' is reserved",
        "quarantine",
    );
    let sources = vec![source(
        "segments/Pacs.yaml",
        "segment: Pacs\nmembers: [10.0.0.0/8]\n",
    )];
    expect_error(
        &sources,
        "segments/Pacs.yaml",
        1,
        "invalid segment name 'Pacs'",
        "lowercase",
    );
    let sources = vec![source(
        "segments/imaging.yaml",
        "segment: pacs\nmembers: [10.0.0.0/8]\n",
    )];
    expect_error(
        &sources,
        "segments/imaging.yaml",
        1,
        "file name 'imaging' does not match segment name 'pacs'",
        "rename the file to pacs.yaml",
    );
}

#[test]
fn bad_values_and_types() {
    let sources = with_pacs("segment: pacs\nmembers: [10.30.0.0/24]\nmode: block\nintra: maybe\n");
    expect_error(
        &sources,
        "segments/pacs.yaml",
        3,
        "invalid value 'block' for `mode`",
        "enforce, monitor",
    );
    expect_error(
        &sources,
        "segments/pacs.yaml",
        4,
        "invalid value 'maybe' for `intra`",
        "allow, deny",
    );
    let sources = with_pacs("segment: [pacs]\nmembers: {a: b}\nallow: yes\n");
    expect_error(
        &sources,
        "segments/pacs.yaml",
        1,
        "`segment` must be a string, found a list",
        "",
    );
    expect_error(
        &sources,
        "segments/pacs.yaml",
        2,
        "`members` must be a list, found a mapping",
        "",
    );
    expect_error(
        &sources,
        "segments/pacs.yaml",
        3,
        "`allow` must be a list of rules",
        "",
    );
    let sources = with_pacs("");
    expect_error(
        &sources,
        "segments/pacs.yaml",
        1,
        "empty file",
        "segment: pacs",
    );
    let sources = with_pacs("- just\n- a list\n");
    expect_error(&sources, "segments/pacs.yaml", 1, "must be a mapping", "");
}

#[test]
fn collects_all_errors_across_files() {
    let sources = vec![
        source(
            "segments/pacs.yaml",
            "segment: pacs\nmembers: [10.30.0.1/24]\nallow:\n  - from: radiolgy\n    ports: [tcp/99999]\n",
        ),
        source("segments/lab.yaml", "segment: lab\nmembers: []\nfoo: 1\n"),
        source("segments/defaults.yaml", "world:\n  mode: sometimes\n"),
    ];
    let errors = errors_of(&sources);
    assert_eq!(errors.len(), 6, "{errors:#?}");
    // Sorted by file, then line.
    let places: Vec<(&str, Option<usize>)> =
        errors.iter().map(|e| (e.file.as_str(), e.line)).collect();
    let mut sorted = places.clone();
    sorted.sort();
    assert_eq!(places, sorted);
}

#[test]
fn over_capacity_names_the_map_and_the_excess() {
    let small = Capacities {
        addr_v4: 2,
        segments: 2,
        rules: 2,
        ..Capacities::KERNEL
    };
    let pacs =
        "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: 10.99.0.0/16\n    ports: any\n";
    let errors = match Policy::from_sources_with_capacities(&with_pacs(pacs), &small) {
        Ok(_) => panic!("policy fits"),
        Err(errors) => errors.0,
    };
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let text = text.join("\n");
    // world, pacs, radiology and the built-in quarantine.
    assert!(text.contains("segments: error: the policy does not fit the SEGMENTS map: it needs 4 entries, 2 more than its capacity of 2"), "{text}");
    assert!(
        text.contains("ADDR_V4 map: it needs 3 entries, 1 more"),
        "{text}"
    );
    assert!(
        // One written rule, two intra and three essential-traffic pseudo-rules (pacs, the
        // other segment of `with_pacs` and the built-in quarantine).
        text.contains("rules (RULE_HITS) map: it needs 6 entries, 4 more"),
        "{text}"
    );

    // PAIRS and PORTS sizes are only known after compiling.
    let policy = Policy::from_sources(&with_pacs(pacs)).expect("valid");
    let tiny = Capacities {
        ports: 3,
        pairs: 1,
        ..Capacities::KERNEL
    };
    let error = compile_with_capacities(&policy, &tiny).expect_err("does not fit");
    let CompileError::OverCapacity(overflows) = &error else {
        panic!("{error}")
    };
    assert!(overflows.iter().any(|o| o.map == "PORTS"), "{error}");
    assert!(overflows.iter().any(|o| o.map == "PAIRS"), "{error}");
    assert!(error.to_string().contains("PORTS needs"), "{error}");
}

#[test]
fn example_policy_is_valid() {
    let policy = Policy::from_sources(&example_sources()).unwrap_or_else(|e| panic!("{e}"));
    // Seven clinical segments, remediation and quarantine.
    assert_eq!(policy.segments().len(), 9);
}

/// Mutated example files (truncated, bytes flipped, lines deleted or duplicated, junk inserted)
/// must give errors or a policy, never a panic.
#[test]
fn mutated_inputs_never_panic() {
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (set FUZZ_SEED to replay)");
    let mut rng = SmallRng::seed_from_u64(seed);
    let originals = example_sources();
    const JUNK: &[u8] = b":-[]{}&*!|>'\"#%@` \n\t,?0123456789/.abcxyz";
    let iterations: usize = std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut valid = 0;
    for _ in 0..iterations {
        let mut sources = originals.clone();
        let victim = rng.random_range(0..sources.len());
        let mut bytes = sources[victim].1.clone().into_bytes();
        for _ in 0..rng.random_range(1..4) {
            if bytes.is_empty() {
                break;
            }
            let at = rng.random_range(0..bytes.len());
            match rng.random_range(0..6) {
                0 => bytes.truncate(at),
                1 => bytes[at] ^= 1 << rng.random_range(0..8),
                2 => bytes[at] = JUNK[rng.random_range(0..JUNK.len())],
                3 => bytes.insert(at, JUNK[rng.random_range(0..JUNK.len())]),
                4 | 5 => {
                    let text = String::from_utf8_lossy(&bytes).to_string();
                    let mut lines: Vec<&str> = text.lines().collect();
                    if !lines.is_empty() {
                        let line = rng.random_range(0..lines.len());
                        if rng.random_bool(0.5) {
                            lines.remove(line);
                        } else {
                            lines.insert(line, lines[line]);
                        }
                    }
                    bytes = lines.join("\n").into_bytes();
                }
                _ => unreachable!(),
            }
        }
        sources[victim].1 = String::from_utf8_lossy(&bytes).to_string();
        match Policy::from_sources(&sources) {
            Ok(policy) => {
                valid += 1;
                let artifact = policy_compiler::compile(&policy).expect("compiles");
                assert!(!artifact.to_json().is_empty());
            }
            Err(errors) => {
                assert!(!errors.0.is_empty());
                for error in &errors.0 {
                    assert!(error.file.starts_with("segments/"), "{error}");
                }
                let _ = errors.to_string();
            }
        }
    }
    println!("{valid} of {iterations} mutants were valid policies");

    // Pure junk built from YAML's special characters.
    for _ in 0..iterations {
        let length = rng.random_range(0..120);
        let junk: Vec<u8> = (0..length)
            .map(|_| JUNK[rng.random_range(0..JUNK.len())])
            .collect();
        let junk = String::from_utf8_lossy(&junk).to_string();
        let sources = vec![
            source("segments/junk.yaml", &junk),
            source("segments/defaults.yaml", &junk),
        ];
        if let Err(errors) = Policy::from_sources(&sources) {
            let _ = errors.to_string();
        }
    }
}

#[test]
fn the_quarantine_file_holds_an_allow_list_and_nothing_else() {
    // Members, monitor mode and intra: allow are refused, each at its line, with why.
    let sources = vec![
        source("segments/radiology.yaml", RADIOLOGY),
        source(
            "segments/quarantine.yaml",
            "segment: quarantine\nmembers: [10.66.0.0/24]\nmode: monitor\nintra: allow\nallow:\n  - from: [radiology]\n    ports: [tcp/22]\n",
        ),
    ];
    expect_error(
        &sources,
        "segments/quarantine.yaml",
        2,
        "`members` is not allowed in the quarantine segment",
        "enforcer quarantine add",
    );
    expect_error(
        &sources,
        "segments/quarantine.yaml",
        3,
        "`mode: monitor` is not allowed in the quarantine segment",
        "always enforced",
    );
    expect_error(
        &sources,
        "segments/quarantine.yaml",
        4,
        "`intra: allow` is not allowed in the quarantine segment",
        "must not reach each other",
    );
    assert_eq!(errors_of(&sources).len(), 3);

    // Its allow-list alone (and the settings it always has) is valid, and so is naming it.
    let valid = vec![
        source(
            "segments/radiology.yaml",
            &format!("{RADIOLOGY}allow:\n  - from: [quarantine]\n    ports: [tcp/443]\n"),
        ),
        source(
            "segments/quarantine.yaml",
            "segment: quarantine\nmode: enforce\nintra: deny\nallow:\n  - from: [radiology]\n    ports: [tcp/22]\n",
        ),
    ];
    let policy = Policy::from_sources(&valid).unwrap_or_else(|e| panic!("{e}"));
    let quarantine = policy.segment("quarantine").expect("quarantine segment");
    assert!(quarantine.members.is_empty());
    assert_eq!(quarantine.intra, policy_compiler::Intra::Deny);
    assert_eq!(quarantine.mode, policy_compiler::Mode::Enforce);
    assert_eq!(quarantine.rules.len(), 2, "its rule and essential traffic");
    assert_eq!(policy.summary().split(',').next(), Some("2 segments"));
}

#[test]
fn the_quarantine_segment_exists_without_its_file() {
    let sources = vec![source(
        "segments/radiology.yaml",
        &format!("{RADIOLOGY}allow:\n  - from: [quarantine]\n    ports: [tcp/443]\n"),
    )];
    let policy = Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"));
    let quarantine = policy.segment("quarantine").expect("built in");
    assert!(quarantine.members.is_empty());
    assert_eq!(quarantine.intra, policy_compiler::Intra::Deny);
    assert_eq!(quarantine.mode, policy_compiler::Mode::Enforce);
    // Only essential traffic reaches it; the summary counts the segments written.
    let ids: Vec<&str> = quarantine
        .rules
        .iter()
        .map(|&index| policy.rule(index).unwrap().id.as_str())
        .collect();
    assert_eq!(ids, ["quarantine/essential"]);
    assert_eq!(policy.summary().split(',').next(), Some("1 segments"));
    // `any` and `world` stay reserved.
    for reserved in ["any", "world"] {
        let sources = vec![source(
            &format!("segments/{reserved}.yaml"),
            &format!("segment: {reserved}\nmembers: [10.0.0.0/8]\n"),
        )];
        expect_error(
            &sources,
            &format!("segments/{reserved}.yaml"),
            1,
            &format!("segment name '{reserved}' is reserved"),
            "quarantine",
        );
    }
}
