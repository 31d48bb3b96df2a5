//! Reachability assertions kept next to the policy, in `DIR/tests/*.yaml` (`policy-compiler
//! test DIR`): each case names a packet and the verdict the policy must give it, so that a
//! clinical flow cannot be cut, nor a lateral move opened, without a test noticing.
//!
//! ```yaml
//! - name: CT modality stores images in the PACS   # optional
//!   from: radiology        # a segment name, `world`, or an address
//!   to: pacs               # the same
//!   port: tcp/104          # tcp/N, udp/N, icmp/TYPE, icmpv6/TYPE (a name or a number)
//!   expect: allow          # allow, deny or audit
//!   quarantined: 10.10.0.20  # optional: addresses in the quarantine segment for this case
//! ```
//!
//! `quarantined` (one address or a list) judges the case as if those hosts had been moved into
//! the built-in `quarantine` segment with `enforcer quarantine add`: that segment has no members
//! in Git, so write the quarantined end as an address and list it there.
//!
//! A segment name stands for the first address of its first member prefix (`radiology` with
//! `members: [10.10.0.0/24, ...]` is 10.10.0.0); when the other end is an address, the first
//! member prefix of that address's IP version is used. `world` is the lowest address in no
//! member prefix (IPv4 if there is one). When that address belongs to another segment (a more
//! specific member prefix elsewhere), the case is an error: write an address instead.
//! Every verdict comes from the reference evaluator, [`Policy::evaluate_with`].

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use crate::error::closest;
use crate::evaluate::{Decision, Flow, Verdict};
use crate::load::parse_port;
use crate::model::{Policy, PortMatch, WORLD};
use crate::overrides::{Overrides, QUARANTINE};
use crate::prefix::{Family, Prefix};
use crate::reachability::world_address;
use crate::yaml::{self, Node, Pos, Value};

const CASE_FIELDS: &[&str] = &["name", "from", "to", "port", "expect", "quarantined"];

/// A test file that cannot be read or understood.
#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq)]
pub enum TestFileError {
    #[error("{path}: error: cannot read the tests: {message}")]
    Io { path: String, message: String },
    #[error("{dir}: error: no test files (*.yaml, *.yml)")]
    NoTests { dir: String },
    #[error("{file}:{line}:{column}: error: {message}{}", hint_text(.hint))]
    Malformed {
        file: String,
        line: usize,
        column: usize,
        message: String,
        hint: Option<String>,
    },
}

fn hint_text(hint: &Option<String>) -> String {
    hint.as_ref()
        .map(|hint| format!("\n  hint: {hint}"))
        .unwrap_or_default()
}

/// One end of a test case, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Segment(String),
    Address(IpAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Segment(name) => f.write_str(name),
            Endpoint::Address(address) => write!(f, "{address}"),
        }
    }
}

/// One assertion: the packet `flow` must get `expect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestCase {
    pub file: String,
    pub line: usize,
    pub name: Option<String>,
    pub from: Endpoint,
    pub to: Endpoint,
    /// As written, e.g. `icmp/echo-request`.
    pub port: String,
    pub expect: Verdict,
    /// The packet, with the addresses the endpoints stand for.
    pub flow: Flow,
    /// Hosts in the quarantine segment for this case (`quarantined:`).
    pub quarantined: BTreeSet<IpAddr>,
}

impl TestCase {
    /// `name`, or `from -> to port`.
    pub fn title(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => format!("{} -> {} {}", self.from, self.to, self.port),
        }
    }
}

/// A case and what the policy said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseOutcome<'a> {
    pub case: &'a TestCase,
    pub decision: Decision,
}

impl CaseOutcome<'_> {
    pub fn passed(&self) -> bool {
        self.decision.verdict == self.case.expect
    }

    /// `ok   FILE:LINE  TITLE (...)` or `FAIL FILE:LINE  TITLE: expected ..., got ...`.
    pub fn report_line(&self) -> String {
        let case = self.case;
        let end = |endpoint: &Endpoint, address: IpAddr| match endpoint {
            Endpoint::Segment(name) => format!("{name} {address}"),
            Endpoint::Address(_) => address.to_string(),
        };
        let mut packet = format!(
            "{} -> {} {}",
            end(&case.from, case.flow.src),
            end(&case.to, case.flow.dst),
            case.port
        );
        if !case.quarantined.is_empty() {
            let hosts: Vec<String> = case.quarantined.iter().map(IpAddr::to_string).collect();
            packet.push_str(&format!(", quarantined {}", hosts.join(" ")));
        }
        let verdict = verdict_name(self.decision.verdict);
        let rule = self
            .decision
            .rule
            .as_ref()
            .map(|rule| format!(" by {rule}"))
            .unwrap_or_default();
        if self.passed() {
            format!(
                "ok    {}:{}  {}  ({packet}: {verdict}{rule})",
                case.file,
                case.line,
                case.title()
            )
        } else {
            format!(
                "FAIL  {}:{}  {}  ({packet}): expected {}, got {verdict}: {}",
                case.file,
                case.line,
                case.title(),
                verdict_name(case.expect),
                self.decision.reason
            )
        }
    }
}

fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Audit => "audit",
    }
}

/// Every case of a policy's `tests/` directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestSuite {
    pub cases: Vec<TestCase>,
}

impl TestSuite {
    /// Reads every `*.yaml`/`*.yml` file of `tests_dir` (sorted by name, hidden files skipped)
    /// and resolves its cases against `policy`. Every problem of every file is reported.
    pub fn load(tests_dir: &Path, policy: &Policy) -> Result<TestSuite, Vec<TestFileError>> {
        let shown_dir = tests_dir.display().to_string();
        let io_error = |path: String, error: std::io::Error| TestFileError::Io {
            path,
            message: error.to_string(),
        };
        let entries =
            std::fs::read_dir(tests_dir).map_err(|e| vec![io_error(shown_dir.clone(), e)])?;
        let mut files = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| vec![io_error(shown_dir.clone(), e)])?
                .path();
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().to_string());
            let Some(name) = name else { continue };
            let is_test_file = name.ends_with(".yaml") || name.ends_with(".yml");
            if is_test_file && !name.starts_with('.') && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(vec![TestFileError::NoTests { dir: shown_dir }]);
        }
        let mut sources = Vec::new();
        let mut errors = Vec::new();
        for path in files {
            let shown = path.display().to_string();
            match std::fs::read_to_string(&path) {
                Ok(text) => sources.push((shown, text)),
                Err(e) => errors.push(io_error(shown, e)),
            }
        }
        match TestSuite::from_sources(&sources, policy) {
            Ok(suite) if errors.is_empty() => Ok(suite),
            Ok(_) => Err(errors),
            Err(more) => {
                errors.extend(more);
                Err(errors)
            }
        }
    }

    /// Parses test files given as (file name as shown in errors, content).
    pub fn from_sources(
        sources: &[(String, String)],
        policy: &Policy,
    ) -> Result<TestSuite, Vec<TestFileError>> {
        let mut reader = CaseReader {
            policy,
            errors: Vec::new(),
        };
        let mut cases = Vec::new();
        for (file, text) in sources {
            cases.extend(reader.file(file, text));
        }
        if reader.errors.is_empty() {
            Ok(TestSuite { cases })
        } else {
            Err(reader.errors)
        }
    }

    pub fn run<'a>(&'a self, policy: &Policy) -> Vec<CaseOutcome<'a>> {
        self.cases
            .iter()
            .map(|case| {
                let overrides = Overrides {
                    quarantined: case.quarantined.clone(),
                    ..Overrides::default()
                };
                CaseOutcome {
                    case,
                    decision: policy.evaluate_with(&case.flow, &overrides, 0),
                }
            })
            .collect()
    }
}

struct CaseReader<'p> {
    policy: &'p Policy,
    errors: Vec<TestFileError>,
}

impl CaseReader<'_> {
    fn error(&mut self, file: &str, pos: Pos, message: String, hint: Option<String>) {
        self.errors.push(TestFileError::Malformed {
            file: file.to_string(),
            line: pos.line,
            column: pos.column,
            message,
            hint,
        });
    }

    fn file(&mut self, file: &str, text: &str) -> Vec<TestCase> {
        let example = "- from: radiology\n  to: pacs\n  port: tcp/104\n  expect: allow";
        let root = match yaml::parse(text) {
            Ok(Some(root)) => root,
            Ok(None) => {
                let hint = Some(format!("a test file is a list of cases:\n{example}"));
                self.error(
                    file,
                    Pos { line: 1, column: 1 },
                    "no test cases".into(),
                    hint,
                );
                return Vec::new();
            }
            Err(e) => {
                self.error(file, e.pos, e.message, e.hint);
                return Vec::new();
            }
        };
        let Value::Seq(items) = &root.value else {
            let message = format!(
                "a test file must be a list of cases, found {}",
                root.kind_name()
            );
            let hint = Some(format!("write each case as a list item:\n{example}"));
            self.error(file, root.pos, message, hint);
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|item| self.case(file, item))
            .collect()
    }

    fn case(&mut self, file: &str, node: &Node) -> Option<TestCase> {
        let Value::Map(entries) = &node.value else {
            let message = format!("a test case must be a mapping, found {}", node.kind_name());
            let hint = Some("give `from`, `to`, `port` and `expect`".to_string());
            self.error(file, node.pos, message, hint);
            return None;
        };
        let mut fields: Vec<(&str, &str, Pos)> = Vec::new();
        let mut quarantined = BTreeSet::new();
        let mut complete = true;
        for (key, value) in entries {
            let key_text = match &key.value {
                Value::Scalar(text) => text.as_str(),
                _ => "",
            };
            let Some(field) = CASE_FIELDS.iter().find(|field| **field == key_text) else {
                let hint = match closest(key_text, CASE_FIELDS.iter().copied()) {
                    Some(close) => format!("did you mean `{close}`?"),
                    None => format!("known fields: {}", CASE_FIELDS.join(", ")),
                };
                self.error(
                    file,
                    key.pos,
                    format!("unknown field `{key_text}` in a test case"),
                    Some(hint),
                );
                complete = false;
                continue;
            };
            if *field == "quarantined" {
                complete &= self.quarantined(file, value, &mut quarantined);
                continue;
            }
            match &value.value {
                Value::Scalar(text) => fields.push((field, text, value.pos)),
                _ => {
                    let message =
                        format!("`{field}` must be a string, found {}", value.kind_name());
                    self.error(file, value.pos, message, None);
                    complete = false;
                }
            }
        }
        let get = |name: &str| fields.iter().find(|(field, _, _)| *field == name).copied();
        for required in ["from", "to", "port", "expect"] {
            if get(required).is_none()
                && !entries
                    .iter()
                    .any(|(key, _)| key.value == Value::Scalar(required.into()))
            {
                let hint = Some(match required {
                    "from" | "to" => "a segment name, `world`, or an address".to_string(),
                    "port" => "e.g. tcp/104 or icmp/echo-request".to_string(),
                    _ => "allow, deny or audit".to_string(),
                });
                self.error(
                    file,
                    node.pos,
                    format!("missing required field `{required}` in a test case"),
                    hint,
                );
                complete = false;
            }
        }
        let from = get("from").and_then(|(_, text, pos)| self.endpoint(file, text, pos));
        let to = get("to").and_then(|(_, text, pos)| self.endpoint(file, text, pos));
        let port = get("port").and_then(|(_, text, pos)| self.port(file, text, pos));
        let expect = get("expect").and_then(|(_, text, pos)| self.expect(file, text, pos));
        let (Some(from), Some(to), Some((proto, port_value)), Some(expect)) =
            (from, to, port, expect)
        else {
            return None;
        };
        if !complete {
            return None;
        }
        let from_pos = get("from").map_or(node.pos, |(_, _, pos)| pos);
        let to_pos = get("to").map_or(node.pos, |(_, _, pos)| pos);
        let family_of = |endpoint: &Endpoint| match endpoint {
            Endpoint::Address(address) => Some(Family::of(*address)),
            Endpoint::Segment(_) => None,
        };
        let src = self.address(file, &from, family_of(&to), from_pos)?;
        let dst = self.address(file, &to, family_of(&from), to_pos)?;
        let flow = Flow {
            src,
            dst,
            proto,
            port: Some(port_value),
        };
        let decision = self.policy.evaluate(&flow);
        for (endpoint, address, segment, pos) in [
            (&from, src, &decision.src_segment, from_pos),
            (&to, dst, &decision.dst_segment, to_pos),
        ] {
            if let Endpoint::Segment(name) = endpoint
                && name != segment
            {
                let message = format!(
                    "`{name}` stands for {address}, the first address of its first member, but that address belongs to {segment}"
                );
                let hint = Some(format!("write an address of {name} instead"));
                self.error(file, pos, message, hint);
                return None;
            }
        }
        Some(TestCase {
            file: file.to_string(),
            line: node.pos.line,
            name: get("name").map(|(_, text, _)| text.to_string()),
            from,
            to,
            port: get("port")
                .map(|(_, text, _)| text.to_string())
                .unwrap_or_default(),
            expect,
            flow,
            quarantined,
        })
    }

    /// `quarantined:`, one address or a list of them; `false` on an error.
    fn quarantined(&mut self, file: &str, node: &Node, into: &mut BTreeSet<IpAddr>) -> bool {
        let items: Vec<&Node> = match &node.value {
            Value::Scalar(_) => vec![node],
            Value::Seq(items) => items.iter().collect(),
            _ => Vec::new(),
        };
        let texts: Vec<(&str, Pos)> = items
            .iter()
            .filter_map(|item| match &item.value {
                Value::Scalar(text) => Some((text.as_str(), item.pos)),
                _ => None,
            })
            .collect();
        if texts.is_empty() || texts.len() != items.len() {
            let message = format!(
                "`quarantined` must be an address or a list of addresses, found {}",
                node.kind_name()
            );
            self.error(file, node.pos, message, None);
            return false;
        }
        let mut ok = true;
        for (text, pos) in texts {
            match text.parse::<IpAddr>() {
                Ok(address) => {
                    into.insert(address);
                }
                Err(_) => {
                    let hint = Some("one address or a list of addresses, no prefixes".into());
                    let message = format!("invalid address '{text}' in `quarantined`");
                    self.error(file, pos, message, hint);
                    ok = false;
                }
            }
        }
        ok
    }

    fn endpoint(&mut self, file: &str, text: &str, pos: Pos) -> Option<Endpoint> {
        if let Ok(address) = text.parse::<IpAddr>() {
            return Some(Endpoint::Address(address));
        }
        if text == WORLD || self.policy.segment(text).is_some() {
            return Some(Endpoint::Segment(text.to_string()));
        }
        let names = self.policy.segment_names();
        let hint = match closest(text, names.iter().map(String::as_str)) {
            Some(close) => format!("did you mean '{close}'?"),
            None if text.contains('/') => "write one address, not a prefix".to_string(),
            None => format!("a segment name ({}) or an address", names.join(", ")),
        };
        self.error(
            file,
            pos,
            format!("unknown segment or address '{text}'"),
            Some(hint),
        );
        None
    }

    /// The address an endpoint stands for (see the module documentation).
    fn address(
        &mut self,
        file: &str,
        endpoint: &Endpoint,
        family: Option<Family>,
        pos: Pos,
    ) -> Option<IpAddr> {
        let found = match endpoint {
            Endpoint::Address(address) => Some(*address),
            Endpoint::Segment(name) if name == WORLD => world_address(self.policy, family),
            Endpoint::Segment(name) => self.policy.segment(name).and_then(|segment| {
                segment
                    .members
                    .iter()
                    .find(|prefix| family.is_none_or(|family| prefix.family() == family))
                    .map(Prefix::addr)
            }),
        };
        if found.is_none() {
            let version = match family {
                Some(Family::V4) => "IPv4 ",
                Some(Family::V6) => "IPv6 ",
                None => "",
            };
            let message = format!("{endpoint} has no {version}address to stand for it");
            let hint = Some(
                if matches!(endpoint, Endpoint::Segment(name) if name == QUARANTINE) {
                    "quarantine has no members in Git: write the quarantined host's address and \
                 list it in `quarantined:`"
                        .to_string()
                } else {
                    "write both ends as addresses".to_string()
                },
            );
            self.error(file, pos, message, hint);
        }
        found
    }

    /// `(protocol, port or ICMP type)` of a one-packet port entry.
    fn port(&mut self, file: &str, text: &str, pos: Pos) -> Option<(u8, u16)> {
        match parse_port(text) {
            Ok(PortMatch::Range { proto, first, last }) if first == last => Some((proto, first)),
            Ok(_) => {
                let hint = Some("name one port or type, e.g. tcp/104 or icmp/echo-request".into());
                let message =
                    format!("`{text}` is not one packet: a test case checks a single port");
                self.error(file, pos, message, hint);
                None
            }
            Err((problem, hint)) => {
                let message = format!("invalid port '{text}': {problem}");
                self.error(file, pos, message, hint);
                None
            }
        }
    }

    fn expect(&mut self, file: &str, text: &str, pos: Pos) -> Option<Verdict> {
        match text {
            "allow" => Some(Verdict::Allow),
            "deny" => Some(Verdict::Deny),
            "audit" => Some(Verdict::Audit),
            _ => {
                let hint = Some("use one of: allow, deny, audit".to_string());
                self.error(
                    file,
                    pos,
                    format!("invalid value '{text}' for `expect`"),
                    hint,
                );
                None
            }
        }
    }
}
