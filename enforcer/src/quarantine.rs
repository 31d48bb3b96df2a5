//! Quarantine: hosts moved into the built-in `quarantine` segment at run time
//! (`enforcer quarantine add|remove|list`), kept in the state file and audited.
use serde_json::Value;

use crate::{
    control::{ControlError, Peer},
    daemon::Daemon,
};

impl Daemon {
    /// `quarantine add`.
    pub fn quarantine_add(
        &self,
        _address: &str,
        _reason: &str,
        _peer: &Peer,
    ) -> Result<Value, ControlError> {
        Err(ControlError::Failed(
            "quarantine is not available in this build yet".into(),
        ))
    }

    /// `quarantine remove`.
    pub fn quarantine_remove(
        &self,
        _address: &str,
        _reason: Option<&str>,
        _peer: &Peer,
    ) -> Result<Value, ControlError> {
        Err(ControlError::Failed(
            "quarantine is not available in this build yet".into(),
        ))
    }

    /// `quarantine list`.
    pub fn quarantine_list(&self, _peer: &Peer) -> Result<Value, ControlError> {
        Ok(serde_json::to_value(&self.state().quarantine).unwrap_or_default())
    }
}
