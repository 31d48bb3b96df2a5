//! Where a policy is read from: a directory, or a directory of a Git revision (`REV:DIR`, e.g.
//! `origin/main:segments`), so that a pull request can be compared with its base without a
//! second checkout.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::PolicyErrors;
use crate::model::Policy;

#[derive(thiserror::Error, Debug)]
pub enum PolicySourceError {
    #[error("the policy in {policy} is invalid:\n{errors}")]
    Invalid {
        policy: String,
        errors: PolicyErrors,
    },
    #[error("cannot run git: {0}")]
    GitUnavailable(std::io::Error),
    #[error("`git {command}` failed: {message}")]
    Git { command: String, message: String },
    #[error("{file} is not valid UTF-8")]
    NotUtf8 { file: String },
}

/// A policy directory on disk or in Git.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    Directory(PathBuf),
    /// `DIR` as Git reads `REV:DIR`: from the repository's top level (`REV:./DIR` from the
    /// current directory).
    GitTree {
        revision: String,
        dir: String,
    },
}

impl PolicySource {
    /// A path that exists is a directory (even with a `:` in its name); otherwise `REV:DIR` is
    /// a Git revision and a directory in it. Anything else is taken as a directory, so that
    /// reading it reports it missing.
    pub fn parse(text: &str) -> PolicySource {
        if Path::new(text).exists() {
            return PolicySource::Directory(PathBuf::from(text));
        }
        match text.split_once(':') {
            Some((revision, dir)) if !revision.is_empty() => PolicySource::GitTree {
                revision: revision.to_string(),
                dir: dir.trim_end_matches('/').to_string(),
            },
            _ => PolicySource::Directory(PathBuf::from(text)),
        }
    }

    /// Reads and validates the policy; `git` runs in the current directory.
    pub fn load(&self) -> Result<Policy, PolicySourceError> {
        let invalid = |errors| PolicySourceError::Invalid {
            policy: self.to_string(),
            errors,
        };
        match self {
            PolicySource::Directory(dir) => Policy::load_dir(dir).map_err(invalid),
            PolicySource::GitTree { .. } => {
                Policy::from_sources(&self.git_sources()?).map_err(invalid)
            }
        }
    }

    /// The policy files of a Git tree as (`REV:DIR/NAME.yaml`, content), with the same
    /// selection as [`Policy::load_dir`]: top-level `*.yaml`/`*.yml` files, hidden ones skipped.
    fn git_sources(&self) -> Result<Vec<(String, String)>, PolicySourceError> {
        let PolicySource::GitTree { revision, dir } = self else {
            return Ok(Vec::new());
        };
        let tree = format!("{revision}:{dir}");
        // `--full-tree`: without it, ls-tree run in a subdirectory lists only that part.
        let listing = git(&["ls-tree", "--full-tree", "-z", &tree])?;
        let mut sources = Vec::new();
        for entry in listing.split(|&byte| byte == 0) {
            let entry = String::from_utf8_lossy(entry);
            // `MODE TYPE HASH\tNAME`
            let Some((meta, name)) = entry.split_once('\t') else {
                continue;
            };
            let mut fields = meta.split(' ');
            let (Some(_mode), Some(kind), Some(hash)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let is_policy_file = name.ends_with(".yaml") || name.ends_with(".yml");
            if kind != "blob" || name.starts_with('.') || !is_policy_file {
                continue;
            }
            let shown = if dir.is_empty() {
                format!("{revision}:{name}")
            } else {
                format!("{tree}/{name}")
            };
            let bytes = git(&["cat-file", "blob", hash])?;
            let text = String::from_utf8(bytes).map_err(|_| PolicySourceError::NotUtf8 {
                file: shown.clone(),
            })?;
            sources.push((shown, text));
        }
        sources.sort();
        Ok(sources)
    }
}

impl fmt::Display for PolicySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicySource::Directory(dir) => write!(f, "{}", dir.display()),
            PolicySource::GitTree { revision, dir } => write!(f, "{revision}:{dir}"),
        }
    }
}

fn git(args: &[&str]) -> Result<Vec<u8>, PolicySourceError> {
    let output = Command::new("git")
        .args(args)
        .output()
        .map_err(PolicySourceError::GitUnavailable)?;
    if !output.status.success() {
        return Err(PolicySourceError::Git {
            command: args.join(" "),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_paths_are_directories_and_the_rest_git_trees() {
        let here = env!("CARGO_MANIFEST_DIR");
        assert_eq!(
            PolicySource::parse(here),
            PolicySource::Directory(PathBuf::from(here))
        );
        assert_eq!(
            PolicySource::parse("origin/main:segments/"),
            PolicySource::GitTree {
                revision: "origin/main".into(),
                dir: "segments".into()
            }
        );
        assert_eq!(
            PolicySource::parse("no/such/dir"),
            PolicySource::Directory(PathBuf::from("no/such/dir"))
        );
        assert_eq!(
            PolicySource::parse("HEAD~1:segments").to_string(),
            "HEAD~1:segments"
        );
    }
}
