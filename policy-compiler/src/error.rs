//! Policy validation errors: every problem found, each with its place and a hint.

use std::fmt;

/// What is wrong.
#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq)]
pub enum PolicyErrorKind {
    #[error("cannot read the policy: {0}")]
    Io(String),
    #[error("{0}")]
    Syntax(String),
    #[error("empty file")]
    EmptyFile,
    #[error("more than one defaults file")]
    DuplicateDefaults,
    #[error("unknown field `{field}` in {context}")]
    UnknownField {
        field: String,
        context: &'static str,
    },
    #[error("missing required field `{field}` in {context}")]
    MissingField {
        field: &'static str,
        context: &'static str,
    },
    #[error("`{field}` must be {expected}, found {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("invalid value '{value}' for `{field}`")]
    InvalidValue { field: &'static str, value: String },
    #[error("invalid segment name '{0}'")]
    InvalidSegmentName(String),
    #[error("segment name '{0}' is reserved")]
    ReservedSegmentName(String),
    #[error("`{0}` is not allowed in the quarantine segment")]
    QuarantineSetting(String),
    #[error("file name '{file_stem}' does not match segment name '{segment}'")]
    FileNameMismatch { file_stem: String, segment: String },
    #[error("duplicate segment '{0}'")]
    DuplicateSegment(String),
    #[error("unknown segment '{0}' in `from`")]
    UnknownSegment(String),
    #[error("prefix {prefix} is a member of both '{first}' and '{second}'")]
    DuplicatePrefix {
        prefix: String,
        first: String,
        second: String,
    },
    #[error("prefix {0} is listed twice in `members`")]
    DuplicateMember(String),
    #[error("host bits set in prefix '{0}'")]
    HostBitsSet(String),
    #[error("invalid address or prefix '{0}'")]
    BadPrefix(String),
    #[error("invalid port entry '{entry}': {problem}")]
    BadPort { entry: String, problem: String },
    #[error("empty `{0}` list")]
    EmptyList(&'static str),
    #[error("invalid rule name '{0}'")]
    InvalidRuleName(String),
    #[error("duplicate rule id '{0}'")]
    DuplicateRuleId(String),
    #[error(
        "the policy does not fit the {map} map: it needs {needed} entries, {} more than its capacity of {capacity}",
        needed - capacity
    )]
    OverCapacity {
        map: &'static str,
        needed: u64,
        capacity: u64,
    },
}

/// One problem, located in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// The file as it should appear in messages, e.g. `segments/pacs.yaml`.
    pub file: String,
    /// 1-based; `None` when the problem is not tied to one place (e.g. map capacity).
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub kind: PolicyErrorKind,
    pub hint: Option<String>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": error: {}", self.kind)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

/// Every problem found in a policy (never empty when returned as an error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (position, error) in self.0.iter().enumerate() {
            if position > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// The candidate closest to `wanted`, if it is close enough to be a plausible typo.
pub fn closest<'a>(wanted: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let wanted_lower = wanted.to_lowercase();
    let limit = (wanted.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|candidate| (edit_distance(&wanted_lower, candidate), candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min()
        .map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let known = ["radiology", "ehr-core", "pacs"];
        assert_eq!(closest("radiolgy", known), Some("radiology"));
        assert_eq!(closest("PACS", known), Some("pacs"));
        assert_eq!(closest("finance", known), None);
    }

    #[test]
    fn display_has_position_and_hint() {
        let error = PolicyError {
            file: "segments/pacs.yaml".into(),
            line: Some(7),
            column: Some(11),
            kind: PolicyErrorKind::UnknownSegment("radiolgy".into()),
            hint: Some("did you mean 'radiology'?".into()),
        };
        assert_eq!(
            error.to_string(),
            "segments/pacs.yaml:7:11: error: unknown segment 'radiolgy' in `from`\n  hint: did you mean 'radiology'?"
        );
    }
}
