//! Break-glass grants as the daemon manages them: a request checked against the policy in
//! force, the record the state file keeps (wall-clock expiry, so a restart knows how much of
//! the TTL is left), the kernel's CLOCK_MONOTONIC_COARSE expiry, and which uses are audited.
//!
//! The kernel enforces the expiry by itself (see `policy_compiler::breakglass`); the daemon
//! removes expired grants, audits them and keeps the metrics.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use policy_compiler::{
    Grant, Mode, Policy, PortMatch,
    breakglass::{parse_ports, rule_id},
    error::closest,
    model::WORLD,
    overrides::QUARANTINE,
    settings::parse_duration,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{error, info, warn};

use crate::{
    LoadError,
    clock::monotonic_now_ns,
    control::{ControlError, Peer},
    daemon::Daemon,
    events::FlowEvent,
};

/// The longest `--reason` accepted, in characters.
pub const MAX_REASON_CHARS: usize = 1000;
/// Grants in force at once, at most (the kernel's map bounds them too: 16 port ranges per
/// segment pair).
pub const MAX_GRANTS: usize = 64;
/// Sources whose first use of a grant gets an audit record of its own; later ones are in the
/// flow log only, so a flood cannot flood the audit log.
pub const MAX_AUDITED_SOURCES: usize = 16;

/// A grant as the state file, `enforcer breakglass list` and the audit log show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub id: u32,
    pub from: String,
    pub to: String,
    /// Port entries as the policy language writes them (`tcp/104`, `udp/2000-2010`, `any`).
    pub ports: Vec<String>,
    pub reason: String,
    /// Who granted it (the control client's user name).
    pub granted_by: String,
    /// RFC 3339, UTC.
    pub granted_at: String,
    /// RFC 3339, UTC: the grant ends then, whatever happens to the daemon.
    pub expires_at: String,
}

impl GrantRecord {
    pub fn expires_at(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(&self.expires_at).ok()
    }

    /// Seconds left at `now` (0 once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at()
            .and_then(|end| end.duration_since(now).ok())
            .unwrap_or_default()
    }

    /// `policy_compiler::Grant` with the kernel's expiry, or `None` when the record is not
    /// valid any more (expired at `now`, or its ports no longer parse).
    pub fn to_grant(&self, now: SystemTime, monotonic_now_ns: u64) -> Option<Grant> {
        let left = self.remaining(now);
        if left.is_zero() {
            return None;
        }
        Some(Grant {
            id: self.id,
            from: self.from.clone(),
            to: self.to.clone(),
            ports: parse_ports(&self.ports).ok()?,
            expires_ns: monotonic_now_ns.saturating_add(left.as_nanos() as u64),
        })
    }

    /// The audit record's fields (without the actor).
    pub fn audit_fields(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "rule": rule_id(self.id),
            "from": self.from,
            "to": self.to,
            "ports": self.ports,
            "reason": self.reason,
            "granted_by": self.granted_by,
            "granted_at": self.granted_at,
            "expires_at": self.expires_at,
        })
    }

    /// A row of `enforcer breakglass list --output json`.
    pub fn list_entry(&self, now: SystemTime) -> serde_json::Value {
        let mut entry = self.audit_fields();
        entry["remaining_seconds"] = self.remaining(now).as_secs().into();
        entry
    }
}

/// A grant request that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidRequest {
    pub from: String,
    pub to: String,
    pub ports: Vec<PortMatch>,
    pub ttl: Duration,
    pub reason: String,
}

/// What `enforcer breakglass grant` asks for, as received.
#[derive(Clone, Copy, Debug)]
pub struct GrantRequest<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub ports: &'a [String],
    pub ttl: &'a str,
    pub reason: &'a str,
}

/// Checks a request against the policy in force (read from `policy_dir`). The error is the
/// message for the person asking: what is wrong and how to fix it.
pub fn validate(
    policy: &Policy,
    policy_dir: &Path,
    request: GrantRequest<'_>,
) -> Result<ValidRequest, String> {
    let from = request.from.trim();
    let to = request.to.trim();
    segment(policy, "--from", from)?;
    segment(policy, "--to", to)?;
    if from == WORLD {
        return Err(format!(
            "--from {WORLD}: `{WORLD}` is every address in no segment (the internet included); \
             a grant names the segment of the devices that need access"
        ));
    }
    if to == WORLD && policy.world_mode() == Mode::Unenforced {
        return Err(format!(
            "--to {WORLD}: traffic to `{WORLD}` is not enforced by this policy, so there is \
             nothing to open"
        ));
    }
    let ports = parse_ports(request.ports).map_err(|problem| format!("--ports: {problem}"))?;
    let ttl = parse_duration(request.ttl).map_err(|problem| {
        let problem = problem.replace("a timeout must be", "a grant must last");
        format!(
            "--ttl {}: {problem}; write e.g. 30m, 2h or 90s",
            request.ttl
        )
    })?;
    let max_ttl = Duration::from_secs(policy.settings().breakglass_max_ttl);
    if ttl > max_ttl {
        return Err(format!(
            "--ttl {} is above the maximum of {}, set by `breakglass.max_ttl` in {} (default \
             4h); ask for at most {}, or raise the maximum there",
            request.ttl,
            humantime::format_duration(max_ttl),
            policy_dir.join("defaults.yaml").display(),
            humantime::format_duration(max_ttl),
        ));
    }
    let reason = request.reason.trim();
    if reason.is_empty() {
        return Err(
            "--reason is empty: say why access is needed (it goes to the audit log)".to_string(),
        );
    }
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(format!(
            "--reason is longer than {MAX_REASON_CHARS} characters"
        ));
    }
    Ok(ValidRequest {
        from: from.to_string(),
        to: to.to_string(),
        ports,
        ttl,
        reason: reason.to_string(),
    })
}

/// `name` must be `world` or a segment of the policy, and never `quarantine`.
fn segment(policy: &Policy, flag: &str, name: &str) -> Result<(), String> {
    if name == QUARANTINE {
        return Err(format!(
            "{flag} {QUARANTINE}: quarantine wins over break-glass; a grant can neither let a \
             quarantined host out nor let anyone in (release the host with `enforcer \
             quarantine remove` first)"
        ));
    }
    if name == WORLD || policy.segment(name).is_some() {
        return Ok(());
    }
    let names: Vec<String> = policy
        .segment_names()
        .into_iter()
        .filter(|known| known != QUARANTINE)
        .collect();
    let suggestion = closest(name, names.iter().map(String::as_str))
        .or_else(|| {
            names
                .iter()
                .map(String::as_str)
                .find(|known| !name.is_empty() && known.starts_with(name))
        })
        .map(|close| format!(" (did you mean `{close}`?)"))
        .unwrap_or_default();
    Err(format!(
        "{flag} {name}: no such segment in the policy in force{suggestion}; segments: {}",
        names.join(", ")
    ))
}

/// The port entries as the policy language writes them.
pub fn port_texts(ports: &[PortMatch]) -> Vec<String> {
    ports.iter().map(ToString::to_string).collect()
}

/// Which sources have had their first use of a grant audited.
#[derive(Debug, Default)]
pub struct UseAudit {
    sources: BTreeMap<u32, BTreeSet<IpAddr>>,
}

impl UseAudit {
    /// Whether the use of grant `grant` by `src` gets an audit record: the first use by each
    /// source, for the first [`MAX_AUDITED_SOURCES`] sources.
    pub fn first_use(&mut self, grant: u32, src: IpAddr) -> bool {
        let seen = self.sources.entry(grant).or_default();
        seen.len() < MAX_AUDITED_SOURCES && seen.insert(src)
    }

    /// Forgets a grant that ended.
    pub fn forget(&mut self, grant: u32) {
        self.sources.remove(&grant);
    }
}

/// RFC 3339, UTC, milliseconds: the times of grant records.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// The actions of `enforcer_breakglass_events_total`.
pub const ACTIONS: [&str; 4] = ["grant", "use", "expire", "revoke"];

/// The daemon's break-glass bookkeeping besides the grants (which live in the state).
#[derive(Debug, Default)]
pub struct Runtime {
    uses: UseAudit,
    events: BTreeMap<&'static str, u64>,
    /// Segment pairs that have had a grant since the start: their gauge stays, at 0.
    pairs_seen: BTreeSet<(String, String)>,
}

impl Runtime {
    fn count(&mut self, action: &'static str) {
        *self.events.entry(action).or_default() += 1;
    }

    /// `enforcer_breakglass_events_total`, every action included.
    pub fn event_counts(&self) -> Vec<(String, u64)> {
        ACTIONS
            .iter()
            .map(|action| {
                let count = self.events.get(action).copied().unwrap_or(0);
                (action.to_string(), count)
            })
            .collect()
    }
}

/// The actor of what the daemon does by itself (expiry, revocation of a grant whose segment
/// left the policy).
fn daemon_actor() -> Value {
    Peer {
        // SAFETY: no preconditions.
        uid: unsafe { libc::geteuid() },
        // SAFETY: no preconditions.
        gid: unsafe { libc::getegid() },
        pid: std::process::id() as i32,
        user: "enforcer".to_string(),
    }
    .actor()
}

/// The kernel's grants for the live records of `records` at this moment.
fn kernel_grants(records: &[GrantRecord]) -> Vec<Grant> {
    let (now, monotonic) = (SystemTime::now(), monotonic_now_ns());
    records
        .iter()
        .filter_map(|record| record.to_grant(now, monotonic))
        .collect()
}

fn failed(what: &str) -> impl FnOnce(LoadError) -> ControlError + '_ {
    move |error| ControlError::Failed(format!("{what}: {error}"))
}

impl Daemon {
    /// `breakglass grant`: checks the request against the policy in force, saves the grant and
    /// puts it in the kernel, then audits it.
    pub fn breakglass_grant(
        &self,
        from: &str,
        to: &str,
        ports: &[String],
        ttl: &str,
        reason: &str,
        peer: &Peer,
    ) -> Result<Value, ControlError> {
        let request = GrantRequest {
            from,
            to,
            ports,
            ttl,
            reason,
        };
        let policy = self.policy();
        let valid = validate(&policy, self.policy_dir(), request).map_err(ControlError::Invalid)?;
        let mut state = self.state();
        let now = SystemTime::now();
        let live = state
            .breakglass
            .iter()
            .filter(|record| !record.remaining(now).is_zero())
            .count();
        if live >= MAX_GRANTS {
            return Err(ControlError::Invalid(format!(
                "{live} break-glass grants are in force, the most the enforcer keeps; revoke one \
                 first (`enforcer breakglass list`)"
            )));
        }
        let id = state.breakglass_next_id.max(1);
        let record = GrantRecord {
            id,
            from: valid.from,
            to: valid.to,
            ports: port_texts(&valid.ports),
            reason: valid.reason,
            granted_by: peer.user.clone(),
            granted_at: rfc3339(now),
            expires_at: rfc3339(now + valid.ttl),
        };
        let mut next = state.clone();
        next.breakglass.push(record.clone());
        next.breakglass_next_id = id + 1;
        let grants = kernel_grants(&next.breakglass);
        let unplaced = self
            .enforcer()
            .check_grants(&grants)
            .map_err(|error| ControlError::Invalid(error.to_string()))?;
        if unplaced.contains(&id) {
            return Err(ControlError::Invalid(format!(
                "the policy in force changed meanwhile and has no segment {} or {}; try again",
                record.from, record.to
            )));
        }
        self.save_state(&next)?;
        if let Err(error) = self.enforcer().set_grants(grants) {
            // Back to what is in force; the kernel still holds the previous grants.
            if let Err(save_error) = self.save_state(&state) {
                error!(%save_error, "restoring the state file after a failed grant");
            }
            return Err(failed(
                "nothing changed: writing the kernel's grants failed",
            )(error));
        }
        *state = next;
        drop(state);
        let mut fields = record.audit_fields();
        fields["ttl_seconds"] = valid.ttl.as_secs().into();
        fields["actor"] = peer.actor();
        self.audit("breakglass_grant", fields);
        info!(
            id,
            from = %record.from,
            to = %record.to,
            ports = %record.ports.join(","),
            expires_at = %record.expires_at,
            granted_by = %record.granted_by,
            reason = %record.reason,
            "break-glass grant in force"
        );
        {
            let mut runtime = self.breakglass_runtime();
            runtime.count("grant");
            runtime
                .pairs_seen
                .insert((record.from.clone(), record.to.clone()));
        }
        let mut result = record.list_entry(now);
        result["ttl_seconds"] = valid.ttl.as_secs().into();
        Ok(result)
    }

    /// `breakglass list`: the grants in force, oldest first.
    pub fn breakglass_list(&self, _peer: &Peer) -> Result<Value, ControlError> {
        let now = SystemTime::now();
        let grants: Vec<Value> = self
            .state()
            .breakglass
            .iter()
            .filter(|record| !record.remaining(now).is_zero())
            .map(|record| record.list_entry(now))
            .collect();
        Ok(json!({ "grants": grants }))
    }

    /// `breakglass revoke`: ends grant `id` now and cuts the flows it admitted.
    pub fn breakglass_revoke(
        &self,
        id: u32,
        reason: Option<&str>,
        peer: &Peer,
    ) -> Result<Value, ControlError> {
        let reason = reason.map(str::trim).filter(|reason| !reason.is_empty());
        let flows = self.revoke(id, reason, peer.actor())?;
        Ok(json!({ "id": id, "rule": rule_id(id), "flows_cut": flows }))
    }

    /// Removes grant `id` from the state and the kernel and expires its flows; audits it.
    fn revoke(&self, id: u32, reason: Option<&str>, actor: Value) -> Result<usize, ControlError> {
        let mut state = self.state();
        let Some(record) = state
            .breakglass
            .iter()
            .find(|record| record.id == id)
            .cloned()
        else {
            return Err(ControlError::Invalid(format!(
                "no break-glass grant {id} is in force; `enforcer breakglass list` shows the \
                 grants"
            )));
        };
        let mut next = state.clone();
        next.breakglass.retain(|record| record.id != id);
        self.save_state(&next)?;
        let mut enforcer = self.enforcer();
        if let Err(error) = enforcer.set_grants(kernel_grants(&next.breakglass)) {
            drop(enforcer);
            if let Err(save_error) = self.save_state(&state) {
                error!(%save_error, "restoring the state file after a failed revocation");
            }
            return Err(failed(
                "nothing changed: writing the kernel's grants failed",
            )(error));
        }
        *state = next;
        let flows = match enforcer.expire_breakglass_flows(id) {
            Ok(flows) => flows,
            Err(error) => {
                // The grant is gone from the kernel: no new flow. Admitted ones keep their
                // expiry, which still ends them.
                error!(%error, id, "cutting the flows of a revoked break-glass grant failed");
                0
            }
        };
        drop(enforcer);
        drop(state);
        let mut fields = record.audit_fields();
        fields["revoke_reason"] = reason.into();
        fields["flows_cut"] = flows.into();
        fields["actor"] = actor;
        self.audit("breakglass_revoke", fields);
        warn!(
            id,
            flows_cut = flows,
            reason = reason.unwrap_or("-"),
            "break-glass grant revoked"
        );
        let mut runtime = self.breakglass_runtime();
        runtime.count("revoke");
        runtime.uses.forget(id);
        Ok(flows)
    }

    /// Removes grants whose time is up (the kernel already ignores them); audits each.
    pub fn expire_grants(&self) {
        let mut state = self.state();
        let now = SystemTime::now();
        let (ended, live): (Vec<GrantRecord>, Vec<GrantRecord>) = state
            .breakglass
            .iter()
            .cloned()
            .partition(|record| record.remaining(now).is_zero());
        if ended.is_empty() {
            return;
        }
        let mut next = state.clone();
        next.breakglass = live;
        if let Err(error) = self.save_state(&next) {
            error!(%error, "saving the state after break-glass grants expired");
        }
        if let Err(error) = self.enforcer().set_grants(kernel_grants(&next.breakglass)) {
            error!(%error, "removing expired break-glass grants from the kernel (it ignores them)");
        }
        *state = next;
        drop(state);
        self.audit_expired(&ended, false);
    }

    fn audit_expired(&self, ended: &[GrantRecord], while_stopped: bool) {
        for record in ended {
            let mut fields = record.audit_fields();
            fields["while_stopped"] = while_stopped.into();
            fields["actor"] = daemon_actor();
            self.audit("breakglass_expire", fields);
            info!(id = record.id, from = %record.from, to = %record.to, "break-glass grant expired");
            let mut runtime = self.breakglass_runtime();
            runtime.count("expire");
            runtime.uses.forget(record.id);
        }
    }

    /// At start: puts the saved grants back in force with the time they have left; those that
    /// ended while the daemon was stopped are audited as expired.
    pub(crate) fn restore_grants(&self) {
        let mut state = self.state();
        if state.breakglass.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let (ended, live): (Vec<GrantRecord>, Vec<GrantRecord>) = state
            .breakglass
            .iter()
            .cloned()
            .partition(|record| record.remaining(now).is_zero());
        let mut next = state.clone();
        next.breakglass = live;
        if !ended.is_empty()
            && let Err(error) = self.save_state(&next)
        {
            error!(%error, "saving the state after break-glass grants expired");
        }
        match self.enforcer().set_grants(kernel_grants(&next.breakglass)) {
            Ok(_) => {
                for record in &next.breakglass {
                    info!(
                        id = record.id,
                        from = %record.from,
                        to = %record.to,
                        expires_at = %record.expires_at,
                        "break-glass grant restored"
                    );
                }
            }
            Err(error) => error!(%error, "restoring break-glass grants failed"),
        }
        {
            let mut runtime = self.breakglass_runtime();
            for record in &next.breakglass {
                runtime
                    .pairs_seen
                    .insert((record.from.clone(), record.to.clone()));
            }
        }
        *state = next;
        drop(state);
        self.audit_expired(&ended, true);
        let revision = self.revision();
        self.revoke_unplaced_grants(&revision);
    }

    /// Revokes grants that name a segment the policy in force does not have (after a reload
    /// removed it): a grant must not come back by itself if the segment returns.
    pub(crate) fn revoke_unplaced_grants(&self, revision: &str) {
        let unplaced = self.enforcer().unplaced_grants().to_vec();
        let policy = self.policy();
        for id in unplaced {
            let missing = self
                .state()
                .breakglass
                .iter()
                .find(|record| record.id == id)
                .map(|record| {
                    [&record.from, &record.to]
                        .into_iter()
                        .filter(|name| *name != WORLD && policy.segment(name).is_none())
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let reason =
                format!("segment {missing} is not in the policy any more (revision {revision})");
            warn!(id, %reason, "revoking a break-glass grant");
            if let Err(error) = self.revoke(id, Some(&reason), daemon_actor()) {
                error!(%error, id, "revoking a break-glass grant whose segment left the policy");
            }
        }
    }

    /// Audits the first use of grant `grant` by each source (see [`MAX_AUDITED_SOURCES`]).
    pub(crate) fn audit_breakglass_use(&self, grant: u32, flow: &FlowEvent) {
        let record = self
            .state()
            .breakglass
            .iter()
            .find(|record| record.id == grant)
            .cloned();
        if !self.breakglass_runtime().uses.first_use(grant, flow.src) {
            return;
        }
        let mut fields = json!({
            "id": grant,
            "rule": rule_id(grant),
            "src": flow.src,
            "dst": flow.dst,
            "proto": flow.proto,
            "sport": flow.sport,
            "dport": flow.dport,
            "icmp_type": flow.icmp_type,
            "src_segment": flow.src_segment,
            "dst_segment": flow.dst_segment,
            "iface": flow.iface,
            "direction": flow.direction,
            "flow_time": flow.time,
        });
        if let Some(record) = record {
            fields["granted_by"] = record.granted_by.into();
            fields["reason"] = record.reason.into();
        }
        self.audit("breakglass_use", fields);
        info!(grant, src = %flow.src, dst = %flow.dst, "break-glass grant used");
        self.breakglass_runtime().count("use");
    }

    /// Grants in force now.
    pub fn active_grants(&self) -> usize {
        let now = SystemTime::now();
        self.state()
            .breakglass
            .iter()
            .filter(|record| !record.remaining(now).is_zero())
            .count()
    }

    /// `enforcer_breakglass_active` by (from, to).
    pub(crate) fn breakglass_active_metric(&self) -> Vec<((String, String), u64)> {
        let now = SystemTime::now();
        let mut active: BTreeMap<(String, String), u64> = BTreeMap::new();
        for record in &self.state().breakglass {
            if !record.remaining(now).is_zero() {
                *active
                    .entry((record.from.clone(), record.to.clone()))
                    .or_default() += 1;
            }
        }
        for pair in &self.breakglass_runtime().pairs_seen {
            active.entry(pair.clone()).or_default();
        }
        active.into_iter().collect()
    }
}

/// `enforcer breakglass grant`'s text output.
pub fn format_grant(result: &Value) -> String {
    format!(
        "break-glass grant {id} in force: {from} -> {to} on {ports} until {expires} ({ttl})\n\
         flows it admits show rule {rule}; end it early with `enforcer breakglass revoke {id}`\n",
        id = result["id"],
        from = text(&result["from"]),
        to = text(&result["to"]),
        ports = ports_text(&result["ports"]),
        expires = text(&result["expires_at"]),
        ttl = humantime::format_duration(Duration::from_secs(
            result["ttl_seconds"].as_u64().unwrap_or(0)
        )),
        rule = text(&result["rule"]),
    )
}

/// `enforcer breakglass list`'s text output: one line per grant.
pub fn format_list(result: &Value) -> String {
    let grants = result["grants"].as_array().cloned().unwrap_or_default();
    if grants.is_empty() {
        return "no break-glass grant in force\n".to_string();
    }
    let mut rows = vec![
        [
            "ID",
            "FROM",
            "TO",
            "PORTS",
            "GRANTED BY",
            "GRANTED AT",
            "EXPIRES AT",
            "REMAINING",
            "REASON",
        ]
        .map(String::from),
    ];
    for grant in &grants {
        rows.push([
            grant["id"].to_string(),
            text(&grant["from"]),
            text(&grant["to"]),
            ports_text(&grant["ports"]),
            text(&grant["granted_by"]),
            text(&grant["granted_at"]),
            text(&grant["expires_at"]),
            humantime::format_duration(Duration::from_secs(
                grant["remaining_seconds"].as_u64().unwrap_or(0),
            ))
            .to_string(),
            text(&grant["reason"]),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let last = row.len() - 1;
        for (column, cell) in row.iter().enumerate() {
            if column == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[column]));
            }
        }
        out.push('\n');
    }
    out
}

/// `enforcer breakglass revoke`'s text output.
pub fn format_revoke(result: &Value) -> String {
    format!(
        "break-glass grant {} revoked; {} connection(s) it admitted cut\n",
        result["id"], result["flows_cut"]
    )
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn ports_text(value: &Value) -> String {
    value
        .as_array()
        .map(|ports| ports.iter().map(text).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example_policy() -> Policy {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../segments");
        Policy::load_dir(&dir).expect("the example policy is valid")
    }

    fn request<'a>(
        from: &'a str,
        to: &'a str,
        ports: &'a [String],
        ttl: &'a str,
    ) -> GrantRequest<'a> {
        GrantRequest {
            from,
            to,
            ports,
            ttl,
            reason: "code blue bed 12",
        }
    }

    #[test]
    fn a_valid_request() {
        let policy = example_policy();
        let ports = vec!["tcp/104".to_string(), "tcp/11112".to_string()];
        let valid = validate(
            &policy,
            Path::new("/etc/enforcer/segments"),
            request("icu-telemetry", "pacs", &ports, "30m"),
        )
        .unwrap();
        assert_eq!(valid.ttl, Duration::from_secs(1800));
        assert_eq!(port_texts(&valid.ports), ports);
        assert_eq!(valid.reason, "code blue bed 12");
    }

    #[test]
    fn bad_requests_are_refused_with_what_to_do() {
        let policy = example_policy();
        let dir = Path::new("/etc/enforcer/segments");
        let tcp104 = vec!["tcp/104".to_string()];
        let refused = |from, to, ports: &[String], ttl, reason| {
            validate(
                &policy,
                dir,
                GrantRequest {
                    from,
                    to,
                    ports,
                    ttl,
                    reason,
                },
            )
            .unwrap_err()
        };
        let error = refused("icu", "pacs", &tcp104, "30m", "x");
        assert!(error.contains("did you mean `icu-telemetry`"), "{error}");
        let error = refused("icu-telemetry", "pacs", &tcp104, "5h", "x");
        assert!(
            error.contains("maximum of 4h")
                && error.contains("breakglass.max_ttl")
                && error.contains("/etc/enforcer/segments/defaults.yaml"),
            "{error}"
        );
        let error = refused("icu-telemetry", "pacs", &tcp104, "0s", "x");
        assert!(error.contains("at least 1s"), "{error}");
        let error = refused("icu-telemetry", "pacs", &tcp104, "soon", "x");
        assert!(error.contains("--ttl soon"), "{error}");
        let error = refused("icu-telemetry", "pacs", &["104".to_string()], "30m", "x");
        assert!(
            error.contains("--ports") && error.contains("tcp/104"),
            "{error}"
        );
        let error = refused("icu-telemetry", "pacs", &[], "30m", "x");
        assert!(error.contains("--ports"), "{error}");
        let error = refused("icu-telemetry", "pacs", &tcp104, "30m", "  ");
        assert!(error.contains("--reason"), "{error}");
        let error = refused("quarantine", "pacs", &tcp104, "30m", "x");
        assert!(error.contains("quarantine wins"), "{error}");
        let error = refused("icu-telemetry", "quarantine", &tcp104, "30m", "x");
        assert!(error.contains("quarantine wins"), "{error}");
        let error = refused("world", "pacs", &tcp104, "30m", "x");
        assert!(error.contains("--from world"), "{error}");
        let error = refused("pacs", "world", &tcp104, "30m", "x");
        assert!(error.contains("not enforced"), "{error}");
    }

    #[test]
    fn records_convert_to_the_kernel_clock() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let record = GrantRecord {
            id: 3,
            from: "icu-telemetry".into(),
            to: "pacs".into(),
            ports: vec!["tcp/104".into()],
            reason: "code blue".into(),
            granted_by: "root".into(),
            granted_at: rfc3339(now),
            expires_at: rfc3339(now + Duration::from_secs(90)),
        };
        let grant = record.to_grant(now, 5_000_000_000).unwrap();
        assert_eq!(grant.expires_ns, 95_000_000_000);
        assert_eq!(
            record.remaining(now + Duration::from_secs(30)).as_secs(),
            60
        );
        assert!(record.to_grant(now + Duration::from_secs(90), 0).is_none());
        assert_eq!(record.list_entry(now)["remaining_seconds"], 90);
    }

    #[test]
    fn uses_are_audited_once_per_source_and_bounded() {
        let mut audit = UseAudit::default();
        let src = |n: u8| IpAddr::from([10, 70, 0, n]);
        assert!(audit.first_use(1, src(1)));
        assert!(!audit.first_use(1, src(1)));
        assert!(audit.first_use(2, src(1)));
        for n in 2..=MAX_AUDITED_SOURCES as u8 {
            assert!(audit.first_use(1, src(n)));
        }
        assert!(!audit.first_use(1, src(200)));
        audit.forget(1);
        assert!(audit.first_use(1, src(200)));
    }
}
