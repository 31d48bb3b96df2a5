//! Reading the policy files and validating them into a [`Policy`].
//!
//! Validation never stops at the first problem: every file is checked and every error collected,
//! so one run of `policy-compiler check` shows everything to fix.

use std::collections::BTreeMap;
use std::path::Path;

use foldhash::{HashMap, HashMapExt as _, HashSet};
use sha2::{Digest, Sha256};

use crate::error::{PolicyError, PolicyErrorKind, PolicyErrors, closest};
use crate::model::{
    Capacities, ICMP_TYPE_NAMES, ICMPV6_TYPE_NAMES, Intra, Mode, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_TCP, PROTO_UDP, Policy, PortMatch, RESERVED_SEGMENT_NAMES, Rule, RuleKind, Segment,
    Source, WORLD, icmp_type_by_name,
};
use crate::overrides::QUARANTINE;
use crate::prefix::{Family, Prefix, PrefixParseError};
use crate::settings::{OnPolicyChange, Settings, parse_duration};
use crate::yaml::{self, Node, Pos, Value};

mod read_cache;
pub use read_cache::{ReadCache, ReadCacheUse};

/// The `file` of the built-in quarantine segment when the policy has no `quarantine.yaml`.
pub(crate) const BUILT_IN_FILE: &str = "(built-in)";

const SEGMENT_FIELDS: &[&str] = &[
    "segment",
    "description",
    "members",
    "mode",
    "intra",
    "allow",
];
const RULE_FIELDS: &[&str] = &["name", "from", "ports", "reason"];
const DEFAULTS_FIELDS: &[&str] = &[
    "world",
    "on_policy_change",
    "egress",
    "essential_traffic",
    "conntrack",
    "fragments",
    "breakglass",
];
const CONNTRACK_FIELDS: &[&str] = &[
    "max_entries",
    "tcp_syn_timeout",
    "tcp_established_timeout",
    "tcp_closing_timeout",
    "udp_timeout",
    "icmp_timeout",
    "other_timeout",
];
const FRAGMENTS_FIELDS: &[&str] = &["max_entries", "timeout"];
const BREAKGLASS_FIELDS: &[&str] = &["max_ttl"];
const WORLD_FIELDS: &[&str] = &["mode", "allow"];
const DEFAULTS_STEM: &str = "defaults";

/// Reads every top-level `*.yaml` / `*.yml` file of `dir` (hidden files and subdirectories
/// are ignored) and validates them.
pub(crate) fn load_dir(
    dir: &Path,
    capacities: &Capacities,
    cache: Option<&mut ReadCache>,
) -> Result<Policy, PolicyErrors> {
    let dir_shown = dir.display().to_string();
    let io_error = |file: String, message: String| PolicyError {
        file,
        line: None,
        column: None,
        kind: PolicyErrorKind::Io(message),
        hint: None,
    };
    let entries = std::fs::read_dir(dir)
        .map_err(|e| PolicyErrors(vec![io_error(dir_shown.clone(), e.to_string())]))?;
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                errors.push(io_error(dir_shown.clone(), e.to_string()));
                continue;
            }
        };
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            tracing::warn!(file = ?file_name, "ignoring a file whose name is not UTF-8");
            continue;
        };
        let path = entry.path();
        if name.starts_with('.') || !is_policy_file_name(name) || !path.is_file() {
            continue;
        }
        let shown = path.display().to_string();
        match std::fs::read(&path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => sources.push((shown, text)),
                Err(_) => errors.push(io_error(shown, "the file is not valid UTF-8".into())),
            },
            Err(e) => errors.push(io_error(shown, e.to_string())),
        }
    }
    sources.sort();
    tracing::debug!(dir = %dir_shown, files = sources.len(), "read policy files");
    match load_sources(&sources, capacities, cache) {
        Ok(policy) if errors.is_empty() => Ok(policy),
        Ok(_) => Err(PolicyErrors(errors)),
        Err(PolicyErrors(more)) => {
            errors.extend(more);
            Err(PolicyErrors(errors))
        }
    }
}

fn is_policy_file_name(name: &str) -> bool {
    name.ends_with(".yaml") || name.ends_with(".yml")
}

/// The last path component of a file name as shown in errors.
fn base_name(file: &str) -> &str {
    file.rsplit(['/', '\\']).next().unwrap_or(file)
}

fn file_stem(file: &str) -> &str {
    let base = base_name(file);
    base.strip_suffix(".yaml")
        .or_else(|| base.strip_suffix(".yml"))
        .unwrap_or(base)
}

/// Hashes base names rather than paths, so the revision does not depend on where the policy
/// directory is or how it was named on the command line.
fn revision(sources: &[(String, String)]) -> String {
    let mut files: Vec<(&str, &str)> = sources
        .iter()
        .map(|(file, text)| (base_name(file), text.as_str()))
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    for (name, text) in files {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
        hasher.update([0]);
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Validates policy files given as (file name as shown in errors, content).
pub(crate) fn load_sources(
    sources: &[(String, String)],
    capacities: &Capacities,
    cache: Option<&mut ReadCache>,
) -> Result<Policy, PolicyErrors> {
    let mut loader = Loader::default();
    let mut world: Option<RawWorld> = None;
    let mut segment_files = Vec::new();
    for (file, text) in sources {
        if file_stem(file) != DEFAULTS_STEM {
            segment_files.push((file.as_str(), text.as_str()));
        } else if let Some(first) = &world {
            let hint = format!("keep only one of {} and {file}", first.file);
            loader.error(file, None, PolicyErrorKind::DuplicateDefaults, Some(hint));
        } else {
            world = loader.defaults_file(file, text);
        }
    }
    let segments = match cache {
        Some(cache) => loader.segment_files_cached(&segment_files, cache),
        None => loader.segment_files(&segment_files),
    };
    let world = world.unwrap_or(RawWorld {
        file: String::new(),
        mode: Mode::Unenforced,
        rules: Vec::new(),
        settings: Settings::default(),
    });
    let policy_label = policy_label(sources);
    let policy = loader.build(
        segments,
        world,
        revision(sources),
        &policy_label,
        capacities,
    );
    if loader.errors.is_empty() {
        Ok(policy)
    } else {
        let mut errors = loader.errors;
        errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        Err(PolicyErrors(errors))
    }
}

/// What to name in errors about the policy as a whole: its directory if the files share one.
fn policy_label(sources: &[(String, String)]) -> String {
    sources
        .first()
        .and_then(|(file, _)| {
            let base = base_name(file);
            file.strip_suffix(base)
                .map(|dir| dir.trim_end_matches(['/', '\\']))
        })
        .filter(|dir| !dir.is_empty())
        .unwrap_or("policy")
        .to_string()
}

#[derive(Debug, PartialEq)]
enum RawSource {
    Any,
    Name(String),
    Cidr(Prefix),
}

#[derive(Debug, PartialEq)]
struct RawRule {
    /// 1-based position in the allow-list, for the default id.
    number: usize,
    name: Option<String>,
    from: Vec<(RawSource, Pos)>,
    ports: Vec<PortMatch>,
    reason: Option<String>,
    pos: Pos,
}

#[derive(Debug, PartialEq)]
struct RawSegment {
    file: String,
    name: String,
    name_pos: Pos,
    description: Option<String>,
    members: Vec<(Prefix, Pos)>,
    mode: Mode,
    intra: Intra,
    rules: Vec<RawRule>,
}

struct RawWorld {
    file: String,
    mode: Mode,
    rules: Vec<RawRule>,
    settings: Settings,
}

#[derive(Default)]
struct Loader {
    errors: Vec<PolicyError>,
}

impl Loader {
    fn error(&mut self, file: &str, pos: Option<Pos>, kind: PolicyErrorKind, hint: Option<String>) {
        self.errors.push(PolicyError {
            file: file.to_string(),
            line: pos.map(|pos| pos.line),
            column: pos.map(|pos| pos.column),
            kind,
            hint,
        });
    }

    fn wrong_type(&mut self, file: &str, field: &str, expected: &'static str, node: &Node) {
        self.error(
            file,
            Some(node.pos),
            PolicyErrorKind::WrongType {
                field: field.to_string(),
                expected,
                found: node.kind_name(),
            },
            None,
        );
    }

    /// The root node of a file, or `None` (with the error recorded) when it cannot be parsed.
    fn parse_yaml(&mut self, file: &str, text: &str, empty_hint: &str) -> Option<Node> {
        match yaml::parse(text) {
            Ok(Some(root)) => Some(root),
            Ok(None) => {
                let hint = Some(empty_hint.to_string());
                self.error(
                    file,
                    Some(Pos { line: 1, column: 1 }),
                    PolicyErrorKind::EmptyFile,
                    hint,
                );
                None
            }
            Err(e) => {
                self.error(
                    file,
                    Some(e.pos),
                    PolicyErrorKind::Syntax(e.message),
                    e.hint,
                );
                None
            }
        }
    }

    /// The (key, value) pairs of a mapping whose keys are all in `allowed`; unknown keys and a
    /// node that is no mapping are reported.
    fn fields<'n>(
        &mut self,
        file: &str,
        node: &'n Node,
        context: &'static str,
        allowed: &[&'static str],
    ) -> Option<Vec<(&'static str, &'n Node)>> {
        let Value::Map(entries) = &node.value else {
            self.wrong_type(file, context, "a mapping", node);
            return None;
        };
        let mut fields = Vec::new();
        for (key, value) in entries {
            let key_text = match &key.value {
                Value::Scalar(text) => text.as_str(),
                _ => "",
            };
            if let Some(known) = allowed.iter().find(|known| **known == key_text) {
                fields.push((*known, value));
                continue;
            }
            let hint = match closest(key_text, allowed.iter().copied()) {
                Some(close) => format!("did you mean `{close}`?"),
                None => format!("known fields: {}", allowed.join(", ")),
            };
            let kind = PolicyErrorKind::UnknownField {
                field: key_text.to_string(),
                context,
            };
            self.error(file, Some(key.pos), kind, Some(hint));
        }
        Some(fields)
    }

    fn string(&mut self, file: &str, field: &str, node: &Node) -> Option<String> {
        match &node.value {
            Value::Scalar(text) => Some(text.clone()),
            _ => {
                self.wrong_type(file, field, "a string", node);
                None
            }
        }
    }

    /// A list (or a single scalar) of scalars; an empty one is reported.
    fn scalar_items<'n>(
        &mut self,
        file: &str,
        field: &'static str,
        node: &'n Node,
        empty_hint: &str,
    ) -> Vec<(&'n str, Pos)> {
        let items: Vec<&Node> = match &node.value {
            Value::Scalar(_) => vec![node],
            Value::Seq(items) => items.iter().collect(),
            Value::Null => Vec::new(),
            Value::Map(_) => {
                self.wrong_type(file, field, "a list", node);
                return Vec::new();
            }
        };
        if items.is_empty() {
            let hint = Some(empty_hint.to_string());
            self.error(
                file,
                Some(node.pos),
                PolicyErrorKind::EmptyList(field),
                hint,
            );
        }
        let mut scalars = Vec::new();
        for item in items {
            match &item.value {
                Value::Scalar(text) => scalars.push((text.as_str(), item.pos)),
                _ => self.wrong_type(file, &format!("an entry of `{field}`"), "a string", item),
            }
        }
        scalars
    }

    /// Reads segment files, in order. Files are independent until [`Loader::build`] links
    /// them, so a large policy is read on every core: most of a reload's time is spent here.
    fn segment_files(&mut self, files: &[(&str, &str)]) -> Vec<RawSegment> {
        const FILES_PER_THREAD: usize = 64;
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(files.len().div_ceil(FILES_PER_THREAD));
        self.segment_files_on(files, threads)
    }

    /// [`Loader::segment_files`], reading only the files `cache` does not hold as they are now,
    /// and keeping those read without an error. The cache then holds only files of `files`.
    fn segment_files_cached(
        &mut self,
        files: &[(&str, &str)],
        cache: &mut ReadCache,
    ) -> Vec<RawSegment> {
        let names: HashSet<&str> = files.iter().map(|(file, _)| *file).collect();
        if names.len() != files.len() {
            // Two sources under one name: not a directory's files; read them all.
            cache.set_last_use(ReadCacheUse {
                hits: 0,
                misses: files.len(),
            });
            return self.segment_files(files);
        }
        let digests: Vec<[u8; 32]> = files
            .iter()
            .map(|(_, text)| read_cache::digest(text))
            .collect();
        let mut found: Vec<Option<RawSegment>> = files
            .iter()
            .zip(&digests)
            .map(|((file, _), digest)| cache.get(file, digest))
            .collect();
        let missing: Vec<(&str, &str)> = files
            .iter()
            .zip(&found)
            .filter(|(_, hit)| hit.is_none())
            .map(|(file, _)| *file)
            .collect();
        cache.set_last_use(ReadCacheUse {
            hits: files.len() - missing.len(),
            misses: missing.len(),
        });
        let errors_before = self.errors.len();
        let mut read: HashMap<String, RawSegment> = self
            .segment_files(&missing)
            .into_iter()
            .map(|segment| (segment.file.clone(), segment))
            .collect();
        let with_errors: HashSet<&str> = self.errors[errors_before..]
            .iter()
            .map(|error| error.file.as_str())
            .collect();
        for (i, (file, _)) in files.iter().enumerate() {
            if found[i].is_none()
                && let Some(segment) = read.remove(*file)
            {
                if !with_errors.contains(file) {
                    cache.put(digests[i], &segment);
                }
                found[i] = Some(segment);
            }
        }
        cache.retain(names.into_iter());
        found.into_iter().flatten().collect()
    }

    fn segment_files_on(&mut self, files: &[(&str, &str)], threads: usize) -> Vec<RawSegment> {
        if threads <= 1 {
            return files
                .iter()
                .filter_map(|(file, text)| self.segment_file(file, text))
                .collect();
        }
        let chunks: Vec<(Vec<RawSegment>, Vec<PolicyError>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = files
                .chunks(files.len().div_ceil(threads))
                .map(|chunk| {
                    scope.spawn(move || {
                        let mut loader = Loader::default();
                        let segments = chunk
                            .iter()
                            .filter_map(|(file, text)| loader.segment_file(file, text))
                            .collect();
                        (segments, loader.errors)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| {
                    worker
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        let mut segments = Vec::with_capacity(files.len());
        for (chunk_segments, errors) in chunks {
            segments.extend(chunk_segments);
            self.errors.extend(errors);
        }
        segments
    }

    fn segment_file(&mut self, file: &str, text: &str) -> Option<RawSegment> {
        let stem = file_stem(file);
        let example = format!("segment: {stem}\nmembers: [10.30.0.0/24]");
        let root = self.parse_yaml(
            file,
            text,
            &format!("a segment file looks like:\n{example}"),
        )?;
        let fields = self.fields(file, &root, "a segment file", SEGMENT_FIELDS)?;
        let mut name = None;
        let mut description = None;
        let mut members = None;
        let mut mode = Mode::Enforce;
        let mut intra = None;
        let mut rules = Vec::new();
        let mut positions: HashMap<&str, Pos> = HashMap::new();
        for (field, value) in fields {
            positions.insert(field, value.pos);
            match field {
                "segment" => {
                    name = self
                        .string(file, field, value)
                        .map(|name| (name, value.pos))
                }
                "description" if value.value != Value::Null => {
                    description = self.string(file, field, value);
                }
                "members" => members = Some(self.members(file, value)),
                "mode" => {
                    mode = self
                        .keyword(
                            file,
                            "mode",
                            value,
                            &[("enforce", Mode::Enforce), ("monitor", Mode::Monitor)],
                        )
                        .unwrap_or(mode);
                }
                "intra" => {
                    intra = self.keyword(
                        file,
                        "intra",
                        value,
                        &[("allow", Intra::Allow), ("deny", Intra::Deny)],
                    );
                }
                "allow" => rules = self.rules(file, value),
                _ => {}
            }
        }
        let quarantine = name.as_ref().is_some_and(|(name, _)| name == QUARANTINE);
        if quarantine {
            self.check_quarantine_file(file, &positions, members.is_some(), mode, intra);
        } else if members.is_none() {
            let hint = Some("list the segment's addresses, e.g. `members: [10.30.0.0/24]`".into());
            let kind = PolicyErrorKind::MissingField {
                field: "members",
                context: "a segment file",
            };
            self.error(file, Some(root.pos), kind, hint);
        }
        let Some((name, name_pos)) = name else {
            let hint = Some(format!("add `segment: {stem}`"));
            let kind = PolicyErrorKind::MissingField {
                field: "segment",
                context: "a segment file",
            };
            self.error(file, Some(root.pos), kind, hint);
            return None;
        };
        self.check_segment_name(file, &name, name_pos);
        if name != stem {
            let hint = format!(
                "each segment lives in NAME.yaml: rename the file to {name}.yaml or set `segment: {stem}`"
            );
            let kind = PolicyErrorKind::FileNameMismatch {
                file_stem: stem.to_string(),
                segment: name.clone(),
            };
            self.error(file, Some(name_pos), kind, Some(hint));
        }
        Some(RawSegment {
            file: file.to_string(),
            name,
            name_pos,
            description,
            members: if quarantine {
                Vec::new()
            } else {
                members.unwrap_or_default()
            },
            mode: if quarantine { Mode::Enforce } else { mode },
            intra: if quarantine {
                Intra::Deny
            } else {
                intra.unwrap_or(Intra::Allow)
            },
            rules,
        })
    }

    /// `quarantine.yaml` holds an allow-list only: members come at run time, and quarantined
    /// hosts are always isolated (enforced, not from each other).
    fn check_quarantine_file(
        &mut self,
        file: &str,
        positions: &HashMap<&str, Pos>,
        has_members: bool,
        mode: Mode,
        intra: Option<Intra>,
    ) {
        if has_members {
            let hint = Some(
                "hosts are quarantined at run time (`enforcer quarantine add ADDRESS --reason \
                 TEXT`), not in Git; remove `members:` and keep the allow-list of who may reach \
                 quarantined hosts"
                    .to_string(),
            );
            let kind = PolicyErrorKind::QuarantineSetting("members".into());
            self.error(file, positions.get("members").copied(), kind, hint);
        }
        if mode == Mode::Monitor {
            let hint = Some(
                "quarantine is always enforced: a quarantined host must be isolated, not \
                 watched; remove `mode:`"
                    .to_string(),
            );
            let kind = PolicyErrorKind::QuarantineSetting("mode: monitor".into());
            self.error(file, positions.get("mode").copied(), kind, hint);
        }
        if intra == Some(Intra::Allow) {
            let hint = Some(
                "quarantined hosts must not reach each other: quarantine is always `intra: \
                 deny` (a rule `from: quarantine` in its allow-list can still open single ports)"
                    .to_string(),
            );
            let kind = PolicyErrorKind::QuarantineSetting("intra: allow".into());
            self.error(file, positions.get("intra").copied(), kind, hint);
        }
    }

    fn check_segment_name(&mut self, file: &str, name: &str, pos: Pos) {
        if RESERVED_SEGMENT_NAMES.contains(&name) {
            let hint = Some(format!(
                "{} are reserved; choose another name ({QUARANTINE} is the built-in segment of \
                 quarantined hosts: its file holds only an allow-list)",
                RESERVED_SEGMENT_NAMES.join(" and ")
            ));
            let kind = PolicyErrorKind::ReservedSegmentName(name.to_string());
            self.error(file, Some(pos), kind, hint);
        } else if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            let hint = Some("use lowercase letters, digits and `-`, e.g. `ehr-core`".into());
            let kind = PolicyErrorKind::InvalidSegmentName(name.to_string());
            self.error(file, Some(pos), kind, hint);
        }
    }

    fn keyword<T: Copy>(
        &mut self,
        file: &str,
        field: &'static str,
        node: &Node,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let text = self.string(file, field, node)?;
        if let Some((_, value)) = choices.iter().find(|(word, _)| *word == text) {
            return Some(*value);
        }
        let words: Vec<&str> = choices.iter().map(|(word, _)| *word).collect();
        let hint = Some(format!("use one of: {}", words.join(", ")));
        let kind = PolicyErrorKind::InvalidValue { field, value: text };
        self.error(file, Some(node.pos), kind, hint);
        None
    }

    fn prefix(&mut self, file: &str, text: &str, pos: Pos, usage_hint: &str) -> Option<Prefix> {
        match Prefix::parse(text) {
            Ok(prefix) => Some(prefix),
            Err(PrefixParseError::HostBitsSet { network }) => {
                let hint = Some(format!("did you mean {network}?"));
                let kind = PolicyErrorKind::HostBitsSet(text.to_string());
                self.error(file, Some(pos), kind, hint);
                None
            }
            Err(PrefixParseError::BadLength { max }) => {
                let hint = Some(format!("the prefix length must be 0 to {max}"));
                let kind = PolicyErrorKind::BadPrefix(text.to_string());
                self.error(file, Some(pos), kind, hint);
                None
            }
            Err(PrefixParseError::BadAddress) => {
                let kind = PolicyErrorKind::BadPrefix(text.to_string());
                self.error(file, Some(pos), kind, Some(usage_hint.to_string()));
                None
            }
        }
    }

    fn members(&mut self, file: &str, node: &Node) -> Vec<(Prefix, Pos)> {
        let hint = "members are addresses or prefixes, e.g. 10.30.0.0/24 or \"fd00:30::/64\"";
        let items = self.scalar_items(file, "members", node, hint);
        items
            .into_iter()
            .filter_map(|(text, pos)| Some((self.prefix(file, text, pos, hint)?, pos)))
            .collect()
    }

    fn rules(&mut self, file: &str, node: &Node) -> Vec<RawRule> {
        let items = match &node.value {
            Value::Null => return Vec::new(),
            Value::Seq(items) => items,
            _ => {
                self.wrong_type(file, "allow", "a list of rules", node);
                return Vec::new();
            }
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(position, item)| self.rule(file, item, position + 1))
            .collect()
    }

    fn rule(&mut self, file: &str, node: &Node, number: usize) -> Option<RawRule> {
        let fields = self.fields(file, node, "a rule", RULE_FIELDS)?;
        let mut name = None;
        let mut from = None;
        let mut ports = None;
        let mut reason = None;
        for (field, value) in fields {
            match field {
                "name" => {
                    name = self.string(file, field, value);
                    if let Some(text) = &name {
                        self.check_rule_name(file, text, value.pos);
                    }
                }
                "from" => from = Some(self.sources(file, value)),
                "ports" => ports = Some(self.ports(file, value)),
                "reason" if value.value != Value::Null => {
                    reason = self.string(file, field, value);
                }
                _ => {}
            }
        }
        for (field, present, hint) in [
            (
                "from",
                from.is_some(),
                "say who may connect: `from: [radiology]`, a CIDR, or `any`",
            ),
            (
                "ports",
                ports.is_some(),
                "say what is allowed: `ports: [tcp/443]`, or `any`",
            ),
        ] {
            if !present {
                let kind = PolicyErrorKind::MissingField {
                    field,
                    context: "a rule",
                };
                self.error(file, Some(node.pos), kind, Some(hint.into()));
            }
        }
        Some(RawRule {
            number,
            name,
            from: from?,
            ports: ports?,
            reason,
            pos: node.pos,
        })
    }

    fn check_rule_name(&mut self, file: &str, name: &str, pos: Pos) {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if name.starts_with("breakglass/") {
            let hint = Some("`breakglass/N` names break-glass grant N; choose another name".into());
            self.error(
                file,
                Some(pos),
                PolicyErrorKind::InvalidRuleName(name.into()),
                hint,
            );
        } else if !valid {
            let hint = Some("use letters, digits and `-`, `_`, `.`, `/`".into());
            self.error(
                file,
                Some(pos),
                PolicyErrorKind::InvalidRuleName(name.into()),
                hint,
            );
        }
    }

    fn sources(&mut self, file: &str, node: &Node) -> Vec<(RawSource, Pos)> {
        let empty_hint = "list at least one source: a segment name, a CIDR, or `any`";
        let usage_hint = "a source is a segment name, an address or prefix, or `any`";
        let items = self.scalar_items(file, "from", node, empty_hint);
        let mut sources = Vec::new();
        for (text, pos) in items {
            let source = if text == "any" {
                RawSource::Any
            } else if text.contains(['.', ':', '/']) {
                match self.prefix(file, text, pos, usage_hint) {
                    Some(prefix) => RawSource::Cidr(prefix),
                    None => continue,
                }
            } else {
                RawSource::Name(text.to_string())
            };
            sources.push((source, pos));
        }
        sources
    }

    fn ports(&mut self, file: &str, node: &Node) -> Vec<PortMatch> {
        let empty_hint = "list at least one entry such as tcp/443, or `any`";
        let items = self.scalar_items(file, "ports", node, empty_hint);
        let mut ports = Vec::new();
        for (text, pos) in items {
            match parse_port(text) {
                Ok(port) => ports.push(port),
                Err((problem, hint)) => {
                    let kind = PolicyErrorKind::BadPort {
                        entry: text.to_string(),
                        problem,
                    };
                    self.error(file, Some(pos), kind, hint);
                }
            }
        }
        ports
    }

    fn defaults_file(&mut self, file: &str, text: &str) -> Option<RawWorld> {
        let mut world = RawWorld {
            file: file.to_string(),
            mode: Mode::Unenforced,
            rules: Vec::new(),
            settings: Settings::default(),
        };
        let root = match yaml::parse(text) {
            Ok(Some(root)) => root,
            // Every setting is optional: an empty defaults file is fine.
            Ok(None) => return Some(world),
            Err(e) => {
                self.error(
                    file,
                    Some(e.pos),
                    PolicyErrorKind::Syntax(e.message),
                    e.hint,
                );
                return None;
            }
        };
        if root.value == Value::Null {
            return Some(world);
        }
        for (setting, world_node) in self.fields(file, &root, "defaults.yaml", DEFAULTS_FIELDS)? {
            if world_node.value == Value::Null {
                continue;
            }
            if setting != "world" {
                self.setting(file, setting, world_node, &mut world.settings);
                continue;
            }
            for (field, value) in self.fields(file, world_node, "`world`", WORLD_FIELDS)? {
                match field {
                    "mode" => {
                        let choices = [
                            ("unenforced", Mode::Unenforced),
                            ("enforce", Mode::Enforce),
                            ("monitor", Mode::Monitor),
                        ];
                        world.mode = self
                            .keyword(file, "mode", value, &choices)
                            .unwrap_or(world.mode);
                    }
                    "allow" => world.rules = self.rules(file, value),
                    _ => {}
                }
            }
        }
        Some(world)
    }

    /// One policy-wide setting of `defaults.yaml` (see [`crate::settings`]).
    fn setting(&mut self, file: &str, setting: &'static str, node: &Node, settings: &mut Settings) {
        match setting {
            "on_policy_change" => {
                let choices = [
                    ("recheck", OnPolicyChange::Recheck),
                    ("keep", OnPolicyChange::Keep),
                ];
                if let Some(value) = self.keyword(file, setting, node, &choices) {
                    settings.on_policy_change = value;
                }
            }
            "egress" => {
                let choices = [
                    ("unenforced", Mode::Unenforced),
                    ("enforce", Mode::Enforce),
                    ("monitor", Mode::Monitor),
                ];
                if let Some(value) = self.keyword(file, setting, node, &choices) {
                    settings.egress = value;
                }
            }
            "essential_traffic" => {
                settings.essential_traffic = match &node.value {
                    Value::Seq(items) if items.is_empty() => Vec::new(),
                    _ => self.ports(file, node),
                };
            }
            "conntrack" => {
                let Some(fields) = self.fields(file, node, "`conntrack`", CONNTRACK_FIELDS) else {
                    return;
                };
                let timeouts = &mut settings.timeouts;
                for (field, value) in fields {
                    let slot = match field {
                        "max_entries" => {
                            if let Some(n) = self.count(file, field, value) {
                                settings.conntrack_max_entries = n;
                            }
                            continue;
                        }
                        "tcp_syn_timeout" => &mut timeouts.tcp_syn,
                        "tcp_established_timeout" => &mut timeouts.tcp_established,
                        "tcp_closing_timeout" => &mut timeouts.tcp_closing,
                        "udp_timeout" => &mut timeouts.udp,
                        "icmp_timeout" => &mut timeouts.icmp,
                        _ => &mut timeouts.other,
                    };
                    if let Some(seconds) = self.duration(file, field, value) {
                        *slot = seconds;
                    }
                }
            }
            "breakglass" => {
                let Some(fields) = self.fields(file, node, "`breakglass`", BREAKGLASS_FIELDS)
                else {
                    return;
                };
                for (field, value) in fields {
                    if let Some(seconds) = self.duration(file, field, value) {
                        settings.breakglass_max_ttl = seconds;
                    }
                }
            }
            _ => {
                let Some(fields) = self.fields(file, node, "`fragments`", FRAGMENTS_FIELDS) else {
                    return;
                };
                for (field, value) in fields {
                    if field == "max_entries" {
                        if let Some(n) = self.count(file, field, value) {
                            settings.fragments_max_entries = n;
                        }
                    } else if let Some(seconds) = self.duration(file, field, value) {
                        settings.timeouts.fragment = seconds;
                    }
                }
            }
        }
    }

    /// A table size: 1 to 16,777,216.
    fn count(&mut self, file: &str, field: &'static str, node: &Node) -> Option<u32> {
        let text = self.string(file, field, node)?;
        match text.parse::<u32>() {
            Ok(n) if (1..=16_777_216).contains(&n) => Some(n),
            _ => {
                let hint = Some("a whole number from 1 to 16777216".to_string());
                let kind = PolicyErrorKind::InvalidValue { field, value: text };
                self.error(file, Some(node.pos), kind, hint);
                None
            }
        }
    }

    /// A timeout in seconds, written `30s`, `5m`, `2h`, `5d` or as seconds.
    fn duration(&mut self, file: &str, field: &'static str, node: &Node) -> Option<u64> {
        let text = self.string(file, field, node)?;
        match parse_duration(&text) {
            Ok(duration) => Some(duration.as_secs()),
            Err(problem) => {
                let hint = Some(format!("{problem}; write e.g. 30s, 5m, 2h or 5d"));
                let kind = PolicyErrorKind::InvalidValue { field, value: text };
                self.error(file, Some(node.pos), kind, hint);
                None
            }
        }
    }

    /// Cross-file checks, rule ids and global rule order.
    fn build(
        &mut self,
        raw_segments: Vec<RawSegment>,
        world: RawWorld,
        revision: String,
        policy_label: &str,
        capacities: &Capacities,
    ) -> Policy {
        let mut by_name: BTreeMap<String, RawSegment> = BTreeMap::new();
        for segment in raw_segments {
            if let Some(first) = by_name.get(&segment.name) {
                let hint = Some(format!(
                    "'{}' is already defined in {}",
                    segment.name, first.file
                ));
                let kind = PolicyErrorKind::DuplicateSegment(segment.name.clone());
                self.error(&segment.file, Some(segment.name_pos), kind, hint);
                continue;
            }
            by_name.insert(segment.name.clone(), segment);
        }
        // The built-in quarantine segment exists without a file: no rules, nobody may reach
        // quarantined hosts (but essential traffic).
        by_name
            .entry(QUARANTINE.to_string())
            .or_insert_with(|| RawSegment {
                file: BUILT_IN_FILE.to_string(),
                name: QUARANTINE.to_string(),
                name_pos: Pos { line: 1, column: 1 },
                description: Some(
                    "Built-in: hosts isolated at run time by `enforcer quarantine add`".into(),
                ),
                members: Vec::new(),
                mode: Mode::Enforce,
                intra: Intra::Deny,
                rules: Vec::new(),
            });

        self.check_member_prefixes(&by_name);

        let known: Vec<&str> = std::iter::once(WORLD)
            .chain(by_name.keys().map(String::as_str))
            .collect();
        let known_set: HashSet<&str> = known.iter().copied().collect();

        let mut rules: Vec<Rule> = Vec::new();
        let mut segments = Vec::new();
        for segment in by_name.values() {
            let indexes = self.add_rules(
                &mut rules,
                &segment.name,
                &segment.file,
                &segment.rules,
                &known,
                &known_set,
            );
            segments.push(Segment {
                name: segment.name.clone(),
                description: segment.description.clone(),
                members: segment.members.iter().map(|(prefix, _)| *prefix).collect(),
                mode: segment.mode,
                intra: segment.intra,
                rules: indexes,
                intra_rule: None,
                file: segment.file.clone(),
            });
        }
        let mut world_rules = self.add_rules(
            &mut rules,
            WORLD,
            &world.file,
            &world.rules,
            &known,
            &known_set,
        );
        if world.mode == Mode::Unenforced && !world_rules.is_empty() {
            tracing::warn!(
                file = %world.file,
                "world rules have no effect while world.mode is unenforced"
            );
        }
        for (segment, raw) in segments.iter_mut().zip(by_name.values()) {
            if segment.intra == Intra::Allow {
                let index = index_u32(rules.len());
                segment.intra_rule = Some(index);
                rules.push(Rule {
                    index,
                    id: format!("{}/intra", segment.name),
                    segment: segment.name.clone(),
                    kind: RuleKind::Intra,
                    reason: Some(format!(
                        "traffic between members of {} (intra: allow)",
                        segment.name
                    )),
                    file: segment.file.clone(),
                    line: raw.name_pos.line,
                });
            }
        }
        // Essential traffic last in every judged allow-list: the segment's own rules name it
        // first when they allow it too.
        let essential = &world.settings.essential_traffic;
        if !essential.is_empty() {
            let mut add_essential = |segment_name: &str, file: &str, line: usize| {
                let index = index_u32(rules.len());
                rules.push(Rule {
                    index,
                    id: format!("{segment_name}/essential"),
                    segment: segment_name.to_string(),
                    kind: RuleKind::Allow {
                        from: vec![Source::Any],
                        ports: essential.clone(),
                    },
                    reason: Some(
                        "essential traffic (defaults.yaml essential_traffic: path-MTU and neighbour discovery)"
                            .to_string(),
                    ),
                    file: file.to_string(),
                    line,
                });
                index
            };
            for (segment, raw) in segments.iter_mut().zip(by_name.values()) {
                let index = add_essential(&segment.name, &segment.file, raw.name_pos.line);
                segment.rules.push(index);
            }
            if world.mode != Mode::Unenforced {
                let index = add_essential(WORLD, &world.file, 1);
                world_rules.push(index);
            }
        }
        let mut rule_places: HashMap<&str, (&str, usize)> = HashMap::with_capacity(rules.len());
        for rule in &rules {
            match rule_places.get(rule.id.as_str()) {
                Some((file, line)) => {
                    let hint = Some(format!(
                        "'{}' is already the id of a rule at {file}:{line}; give one of them another `name:`",
                        rule.id
                    ));
                    let pos = Pos {
                        line: rule.line,
                        column: 1,
                    };
                    let kind = PolicyErrorKind::DuplicateRuleId(rule.id.clone());
                    self.error(&rule.file, Some(pos), kind, hint);
                }
                None => {
                    rule_places.insert(&rule.id, (&rule.file, rule.line));
                }
            }
        }

        let policy = Policy {
            segments,
            world_mode: world.mode,
            world_rules,
            rules,
            revision,
            settings: world.settings,
        };
        self.check_capacities(&policy, policy_label, capacities);
        policy
    }

    fn check_member_prefixes(&mut self, by_name: &BTreeMap<String, RawSegment>) {
        let mut owners: HashMap<Prefix, (&str, &str, Pos)> = HashMap::new();
        for segment in by_name.values() {
            for (prefix, pos) in &segment.members {
                match owners.get(prefix) {
                    Some((owner, file, first_pos)) if *owner == segment.name => {
                        let hint = Some(format!(
                            "first listed on line {}; remove one",
                            first_pos.line
                        ));
                        let kind = PolicyErrorKind::DuplicateMember(prefix.to_string());
                        let file = file.to_string();
                        self.error(&file, Some(*pos), kind, hint);
                    }
                    Some((owner, file, first_pos)) => {
                        let hint = Some(format!(
                            "an address belongs to one segment; {prefix} is also in {file}:{}. Use a more specific prefix in one of them",
                            first_pos.line
                        ));
                        let kind = PolicyErrorKind::DuplicatePrefix {
                            prefix: prefix.to_string(),
                            first: owner.to_string(),
                            second: segment.name.clone(),
                        };
                        self.error(&segment.file, Some(*pos), kind, hint);
                    }
                    None => {
                        owners.insert(*prefix, (&segment.name, &segment.file, *pos));
                    }
                }
            }
        }
    }

    /// Resolves a segment's rules, appends them to `rules` and returns their global indexes.
    fn add_rules(
        &mut self,
        rules: &mut Vec<Rule>,
        segment: &str,
        file: &str,
        raw_rules: &[RawRule],
        known: &[&str],
        known_set: &HashSet<&str>,
    ) -> Vec<u32> {
        let mut indexes = Vec::new();
        for raw in raw_rules {
            let mut from = Vec::new();
            for (source, pos) in &raw.from {
                from.push(match source {
                    RawSource::Any => Source::Any,
                    RawSource::Cidr(prefix) => Source::Cidr(*prefix),
                    RawSource::Name(name) => {
                        if !known_set.contains(name.as_str()) {
                            let hint = match closest(name, known.iter().copied()) {
                                Some(close) => format!("did you mean '{close}'?"),
                                None => format!("known segments: {}", shorten_list(known)),
                            };
                            let kind = PolicyErrorKind::UnknownSegment(name.clone());
                            self.error(file, Some(*pos), kind, Some(hint));
                        }
                        Source::Segment(name.clone())
                    }
                });
            }
            let index = index_u32(rules.len());
            indexes.push(index);
            rules.push(Rule {
                index,
                id: raw
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{segment}/{}", raw.number)),
                segment: segment.to_string(),
                kind: RuleKind::Allow {
                    from,
                    ports: raw.ports.clone(),
                },
                reason: raw.reason.clone(),
                file: file.to_string(),
                line: raw.pos.line,
            });
        }
        indexes
    }

    fn check_capacities(&mut self, policy: &Policy, label: &str, capacities: &Capacities) {
        let mut prefixes: HashSet<Prefix> = policy.members().map(|(prefix, _)| prefix).collect();
        for rule in &policy.rules {
            if let RuleKind::Allow { from, .. } = &rule.kind {
                prefixes.extend(from.iter().filter_map(|source| match source {
                    Source::Cidr(prefix) => Some(*prefix),
                    _ => None,
                }));
            }
        }
        let v4 = prefixes.iter().filter(|p| p.family() == Family::V4).count();
        let v6 = prefixes.len() - v4;
        let checks = [
            ("SEGMENTS", policy.segments.len() + 1, capacities.segments),
            ("rules (RULE_HITS)", policy.rules.len(), capacities.rules),
            ("ADDR_V4", v4, capacities.addr_v4),
            ("ADDR_V6", v6, capacities.addr_v6),
        ];
        for (map, needed, capacity) in checks {
            let needed = needed as u64;
            if needed > capacity {
                let hint = Some("split the policy, or merge prefixes and rules".into());
                let kind = PolicyErrorKind::OverCapacity {
                    map,
                    needed,
                    capacity,
                };
                self.error(label, None, kind, hint);
            }
        }
    }
}

/// Rule counts are bounded by the capacity check long before `u32` overflows; saturate rather
/// than panic if a caller bypasses it.
fn index_u32(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
}

fn shorten_list(names: &[&str]) -> String {
    const SHOWN: usize = 12;
    let mut text = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

const PORT_USAGE: &str =
    "use tcp/N, tcp/A-B, tcp/any, the same for udp, icmp/TYPE, icmpv6/TYPE, or any";

/// Parses one `ports` entry; the error is (problem, hint).
pub(crate) fn parse_port(text: &str) -> Result<PortMatch, (String, Option<String>)> {
    if text == "any" {
        return Ok(PortMatch::Any);
    }
    let Some((proto_text, spec)) = text.split_once('/') else {
        let hint = if text.parse::<u32>().is_ok() {
            format!("write tcp/{text} or udp/{text}")
        } else {
            PORT_USAGE.to_string()
        };
        return Err(("missing protocol".into(), Some(hint)));
    };
    match proto_text {
        "tcp" | "udp" => {
            let proto = if proto_text == "tcp" {
                PROTO_TCP
            } else {
                PROTO_UDP
            };
            let (first, last) = if spec == "any" {
                (0, u16::MAX)
            } else if let Some((first, last)) = spec.split_once('-') {
                let (first, last) = (parse_port_number(first)?, parse_port_number(last)?);
                if first > last {
                    return Err((
                        format!("range start {first} is above its end {last}"),
                        Some(format!("write {proto_text}/{last}-{first}")),
                    ));
                }
                (first, last)
            } else {
                let port = parse_port_number(spec)?;
                (port, port)
            };
            Ok(PortMatch::Range { proto, first, last })
        }
        "icmp" | "icmpv6" => {
            let (proto, names) = if proto_text == "icmp" {
                (PROTO_ICMP, &ICMP_TYPE_NAMES)
            } else {
                (PROTO_ICMPV6, &ICMPV6_TYPE_NAMES)
            };
            if spec == "any" {
                return Ok(PortMatch::Range {
                    proto,
                    first: 0,
                    last: 255,
                });
            }
            let icmp_type = if spec.bytes().all(|b| b.is_ascii_digit()) && !spec.is_empty() {
                match spec.parse::<u16>() {
                    Ok(value) if value <= 255 => value,
                    _ => {
                        return Err((
                            format!("{proto_text} type {spec} is above 255"),
                            Some("ICMP types are 0 to 255".into()),
                        ));
                    }
                }
            } else if let Some(value) = icmp_type_by_name(proto, spec) {
                u16::from(value)
            } else {
                let known = names.iter().map(|(name, _)| *name);
                let hint = match closest(spec, known) {
                    Some(close) => format!("did you mean {proto_text}/{close}?"),
                    None => format!(
                        "known {proto_text} types: {} (or a number 0-255)",
                        names
                            .iter()
                            .map(|(name, _)| *name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                return Err((format!("unknown {proto_text} type '{spec}'"), Some(hint)));
            };
            Ok(PortMatch::Range {
                proto,
                first: icmp_type,
                last: icmp_type,
            })
        }
        _ => {
            // Only swapped letters get a suggestion: other short names are too close to all.
            let mut letters: Vec<char> = proto_text.chars().collect();
            letters.sort_unstable();
            let anagram = ["tcp", "udp", "icmp", "icmpv6"].into_iter().find(|known| {
                let mut known_letters: Vec<char> = known.chars().collect();
                known_letters.sort_unstable();
                known_letters == letters
            });
            let hint = match anagram {
                Some(known) => format!("did you mean {known}/{spec}?"),
                None => PORT_USAGE.to_string(),
            };
            Err((format!("unknown protocol '{proto_text}'"), Some(hint)))
        }
    }
}

fn parse_port_number(text: &str) -> Result<u16, (String, Option<String>)> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err((
            format!("'{text}' is not a port number"),
            Some(PORT_USAGE.to_string()),
        ));
    }
    text.parse::<u16>().map_err(|_| {
        (
            format!("port {text} is above 65535"),
            Some("ports are 0 to 65535".into()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_entries() {
        assert_eq!(parse_port("any"), Ok(PortMatch::Any));
        assert_eq!(
            parse_port("tcp/104"),
            Ok(PortMatch::Range {
                proto: 6,
                first: 104,
                last: 104
            })
        );
        assert_eq!(
            parse_port("udp/any"),
            Ok(PortMatch::Range {
                proto: 17,
                first: 0,
                last: 65535
            })
        );
        assert_eq!(
            parse_port("icmpv6/echo-request"),
            Ok(PortMatch::Range {
                proto: 58,
                first: 128,
                last: 128
            })
        );
        assert!(parse_port("tcp/90-80").is_err());
        assert!(parse_port("tcp/65536").is_err());
        assert!(parse_port("icmp/256").is_err());
        assert!(parse_port("icmp/echo").is_err());
        assert!(parse_port("sctp/80").is_err());
        assert!(parse_port("80").is_err());
        assert!(parse_port("tcp/").is_err());
        assert!(parse_port("tcp/-5").is_err());
    }

    #[test]
    fn reading_files_in_parallel_gives_what_reading_them_in_turn_gives() {
        let sources: Vec<(String, String)> = (0..300)
            .map(|i| {
                let body = match i % 97 {
                    13 => "segment: [broken\n".to_string(),
                    50 => format!("segment: s{i}\nmembers: [10.0.{i}.0/33]\n"),
                    _ => format!(
                        "segment: s{i}\nmembers: [10.{}.{}.0/24]\nallow:\n  - from: [s{}]\n    ports: [tcp/{}]\n",
                        i / 256,
                        i % 256,
                        (i + 1) % 300,
                        1000 + i
                    ),
                };
                (format!("segments/s{i}.yaml"), body)
            })
            .collect();
        let files: Vec<(&str, &str)> = sources
            .iter()
            .map(|(file, text)| (file.as_str(), text.as_str()))
            .collect();
        let summary = |threads| {
            let mut loader = Loader::default();
            let segments = loader.segment_files_on(&files, threads);
            let segments: Vec<(String, usize)> = segments
                .iter()
                .map(|segment| (segment.name.clone(), segment.rules.len()))
                .collect();
            let errors: Vec<String> = loader.errors.iter().map(ToString::to_string).collect();
            (segments, errors)
        };
        let (in_turn, in_turn_errors) = summary(1);
        // Unparsable files yield no segment; a bad prefix is reported, and the segment kept.
        assert_eq!(in_turn.len(), 300 - 3, "{in_turn_errors:?}");
        assert!(in_turn_errors.len() >= 6, "{in_turn_errors:?}");
        for threads in [2, 3, 7] {
            assert_eq!(summary(threads), (in_turn.clone(), in_turn_errors.clone()));
        }
    }

    /// The example policy's files.
    fn example_sources() -> Vec<(String, String)> {
        let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../segments");
        let mut sources = Vec::new();
        for entry in std::fs::read_dir(example).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            if is_policy_file_name(&name) && !name.starts_with('.') {
                sources.push((
                    format!("segments/{name}"),
                    std::fs::read_to_string(&path).unwrap(),
                ));
            }
        }
        sources.sort();
        sources
    }

    /// Files using every part of the language a segment file can hold, and the example
    /// policy's.
    fn cache_sources() -> Vec<(String, String)> {
        let mut sources = vec![
            (
                "other/lab.yaml".to_string(),
                "segment: lab\ndescription: Laboratory\nmode: monitor\nintra: deny\nmembers: [10.40.0.0/24, \"fd00:40::/64\", 10.41.0.7]\nallow:\n  - name: analysers\n    from: [pacs, 10.9.0.0/16, \"fd00:9::1\"]\n    ports: [tcp/8000-8100, udp/514, icmp/echo-request]\n    reason: results upload\n  - from: [any]\n    ports: [any]\n".to_string(),
            ),
            (
                "other/quarantine.yaml".to_string(),
                "segment: quarantine\nallow:\n  - from: [pacs]\n    ports: [udp/53]\n".to_string(),
            ),
        ];
        sources.extend(example_sources());
        sources
    }

    #[test]
    fn a_cached_file_reads_back_as_reading_it_gives() {
        let mut cache = ReadCache::new();
        for (file, text) in cache_sources() {
            if file_stem(&file) == DEFAULTS_STEM {
                continue;
            }
            let mut loader = Loader::default();
            let read = loader.segment_file(&file, text.as_str()).unwrap();
            assert!(loader.errors.is_empty(), "{file}: {:?}", loader.errors);
            let digest = read_cache::digest(&text);
            cache.put(digest, &read);
            assert_eq!(cache.get(&file, &digest).as_ref(), Some(&read), "{file}");
            // Another text, or another name, is not the cached file.
            assert!(
                cache
                    .get(&file, &read_cache::digest(&format!("{text} ")))
                    .is_none()
            );
            assert!(cache.get("segments/other.yaml", &digest).is_none());
        }
    }

    #[test]
    fn a_policy_read_through_the_cache_is_the_policy_read_without_it() {
        let sources = example_sources();
        let uncached = load_sources(&sources, &Capacities::KERNEL, None).unwrap();
        let mut cache = ReadCache::new();
        let first = load_sources(&sources, &Capacities::KERNEL, Some(&mut cache)).unwrap();
        let segment_files = sources.len() - 1;
        assert_eq!(first, uncached);
        assert_eq!(
            cache.last_use(),
            ReadCacheUse {
                hits: 0,
                misses: segment_files
            }
        );
        assert_eq!(cache.len(), segment_files);
        let second = load_sources(&sources, &Capacities::KERNEL, Some(&mut cache)).unwrap();
        assert_eq!(second, uncached);
        assert_eq!(
            cache.last_use(),
            ReadCacheUse {
                hits: segment_files,
                misses: 0
            }
        );

        // One file changed, two removed: only the changed one is read, the removed ones
        // forgotten.
        let mut changed = sources.clone();
        changed.retain(|(file, _)| {
            file != "segments/remediation.yaml" && file != "segments/quarantine.yaml"
        });
        let pacs = changed
            .iter_mut()
            .find(|(file, _)| file == "segments/pacs.yaml")
            .unwrap();
        pacs.1 = pacs.1.replace("tcp/443", "tcp/8443");
        let third = load_sources(&changed, &Capacities::KERNEL, Some(&mut cache)).unwrap();
        assert_eq!(
            third,
            load_sources(&changed, &Capacities::KERNEL, None).unwrap()
        );
        assert_ne!(third, uncached);
        assert_eq!(
            cache.last_use(),
            ReadCacheUse {
                hits: segment_files - 3,
                misses: 1
            }
        );
        assert_eq!(cache.len(), segment_files - 2);
    }

    #[test]
    fn a_file_with_errors_is_read_and_reported_every_time() {
        let mut sources = example_sources();
        let pacs = sources
            .iter_mut()
            .find(|(file, _)| file == "segments/pacs.yaml")
            .unwrap();
        pacs.1 = pacs.1.replace("10.30.0.0/24", "10.30.0.1/24");
        let uncached = load_sources(&sources, &Capacities::KERNEL, None).unwrap_err();
        let mut cache = ReadCache::new();
        for _ in 0..2 {
            let errors = load_sources(&sources, &Capacities::KERNEL, Some(&mut cache)).unwrap_err();
            assert_eq!(errors.to_string(), uncached.to_string());
            assert!(
                errors.to_string().contains("segments/pacs.yaml"),
                "{errors}"
            );
        }
        assert_eq!(cache.last_use().misses, 1);
        assert_eq!(cache.len(), sources.len() - 2);
    }

    #[test]
    fn revision_ignores_directory() {
        let a = revision(&[("segments/a.yaml".into(), "x".into())]);
        let b = revision(&[("/elsewhere/a.yaml".into(), "x".into())]);
        let c = revision(&[("segments/a.yaml".into(), "y".into())]);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 64);
    }
}
