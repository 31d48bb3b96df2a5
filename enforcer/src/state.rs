//! Run-time enforcement changes that must survive a daemon restart (quarantined hosts,
//! break-glass grants): one JSON file, `enforcer run --state-file PATH`, written atomically
//! (a temporary file in the same directory, synced, renamed over the old one) and read at
//! start.
use std::{
    fs::OpenOptions,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The default `--state-file`.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/enforcer/state.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {context}: {source}")]
    Io {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// A host in the `quarantine` segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    pub address: IpAddr,
    pub reason: String,
    /// Who quarantined it (the control client's user name).
    pub actor: String,
    /// When (RFC 3339, UTC).
    pub since: String,
}

/// Everything the state file holds. New fields take `#[serde(default)]`, so an older file
/// still loads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Quarantined hosts, in the order they were added.
    #[serde(default)]
    pub quarantine: Vec<QuarantineEntry>,
    /// Break-glass grants in force (an expired one until the daemon removes it), by id.
    #[serde(default)]
    pub breakglass: Vec<crate::breakglass::GrantRecord>,
    /// The id of the next break-glass grant: ids are never reused, so an audit record's
    /// `breakglass/<id>` names one grant.
    #[serde(default)]
    pub breakglass_next_id: u32,
}

/// Where the state lives.
#[derive(Clone, Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, context: &'static str) -> impl FnOnce(std::io::Error) -> StateError + '_ {
        move |source| StateError::Io {
            path: self.path.clone(),
            context,
            source,
        }
    }

    /// The saved state; empty when the file does not exist yet.
    pub fn load(&self) -> Result<State, StateError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State::default());
            }
            Err(error) => return Err(self.io("reading")(error)),
        };
        serde_json::from_str(&text).map_err(|source| StateError::Invalid {
            path: self.path.clone(),
            source,
        })
    }

    /// Replaces the saved state with `state`, atomically: after a crash the file holds either
    /// the old or the new state, never a mixture. Its directory is created (mode 0700) when
    /// missing; the file is mode 0600 (it names hosts and why they were isolated).
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let dir = self
            .path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(self.io("creating its directory"))?;
        let name = self
            .path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state.json".to_string());
        let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut text =
            serde_json::to_string_pretty(state).map_err(|source| StateError::Invalid {
                path: self.path.clone(),
                source,
            })?;
        text.push('\n');
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, &self.path)?;
            // The rename itself is durable once the directory is synced.
            std::fs::File::open(dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written.map_err(self.io("writing"))
    }

    /// Moves an unreadable state file aside (`PATH.unreadable-<unix time>`) so that the next
    /// save does not destroy it; returns where it went.
    pub fn move_aside(&self) -> Result<PathBuf, StateError> {
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut aside = self.path.clone().into_os_string();
        aside.push(format!(".unreadable-{seconds}"));
        let aside = PathBuf::from(aside);
        std::fs::rename(&self.path, &aside).map_err(self.io("moving it aside"))?;
        Ok(aside)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn saves_atomically_and_loads_back() {
        let dir = std::env::temp_dir().join(format!("enforcer-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = StateFile::new(dir.join("sub/state.json"));
        assert_eq!(file.load().unwrap(), State::default(), "missing = empty");
        let state = State {
            quarantine: vec![QuarantineEntry {
                address: "10.20.3.4".parse().unwrap(),
                reason: "EDR agent missing".into(),
                actor: "root".into(),
                since: "2024-05-01T10:00:00.000Z".into(),
            }],
            ..State::default()
        };
        file.save(&state).unwrap();
        assert_eq!(file.load().unwrap(), state);
        let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
        // Unknown fields (a newer daemon's) and missing ones (an older daemon's) load.
        std::fs::write(file.path(), r#"{"future": 1}"#).unwrap();
        assert_eq!(file.load().unwrap(), State::default());
        std::fs::write(file.path(), "{not json").unwrap();
        let error = file.load().unwrap_err().to_string();
        assert!(error.contains("is not valid"), "{error}");
        let aside = file.move_aside().unwrap();
        assert!(aside.exists() && !file.path().exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
