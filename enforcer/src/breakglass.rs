//! Break-glass grants as the daemon manages them: a request checked against the policy in
//! force, the record the state file keeps (wall-clock expiry, so a restart knows how much of
//! the TTL is left), the kernel's CLOCK_MONOTONIC expiry, and which uses are audited.
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
    breakglass::parse_ports,
    error::closest,
    model::WORLD,
    overrides::QUARANTINE,
    settings::parse_duration,
};
use serde::{Deserialize, Serialize};

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
            "rule": policy_compiler::breakglass::rule_id(self.id),
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
        format!("--ttl {}: {problem}; write e.g. 30m, 2h or 90s", request.ttl)
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
    let names = policy.segment_names();
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

/// RFC 3339, UTC, seconds: the times of grant records.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example_policy() -> Policy {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../segments");
        Policy::load_dir(&dir).expect("the example policy is valid")
    }

    fn request<'a>(from: &'a str, to: &'a str, ports: &'a [String], ttl: &'a str) -> GrantRequest<'a> {
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
        assert!(error.contains("--ports") && error.contains("tcp/104"), "{error}");
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
        assert_eq!(record.remaining(now + Duration::from_secs(30)).as_secs(), 60);
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
