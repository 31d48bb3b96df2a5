//! Policy-wide settings from `defaults.yaml`, besides `world`:
//!
//! ```yaml
//! on_policy_change: recheck   # recheck (default): a tracked flow whose rule was removed is cut
//!                             # at its next packet; keep: running flows finish under old rules
//! egress: unenforced          # unenforced (default) | monitor | enforce: whether packets a host
//!                             # sends are judged by the destination's allow-list too
//! essential_traffic:          # allowed to every judged segment from any source, after its own
//!   - icmp/destination-unreachable   # rules (ids SEGMENT/essential); [] turns it off
//!   - icmpv6/packet-too-big
//!   - icmpv6/neighbor-solicitation
//!   - icmpv6/neighbor-advertisement
//!   - icmpv6/router-solicitation
//!   - icmpv6/router-advertisement
//! conntrack:
//!   max_entries: 262144       # when full, new flows are dropped and counted (conntrack_full)
//!   tcp_syn_timeout: 30s
//!   tcp_established_timeout: 5d
//!   tcp_closing_timeout: 10s
//!   udp_timeout: 60s
//!   icmp_timeout: 30s
//!   other_timeout: 60s
//! fragments:
//!   max_entries: 16384
//!   timeout: 30s
//! breakglass:
//!   max_ttl: 4h               # longest TTL `enforcer breakglass grant --ttl` accepts
//! ```
use std::time::Duration;

use enforcer_common::timeout;
use serde::{Deserialize, Serialize};

use crate::model::{Mode, PortMatch};

/// What happens to tracked flows when a new policy is loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPolicyChange {
    /// A flow whose rule was removed is cut at its next packet.
    #[default]
    Recheck,
    /// Running flows finish (a running imaging transfer is not cut mid-study).
    Keep,
}

/// Idle timeouts of tracked flows and fragments, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    pub tcp_syn: u64,
    pub tcp_established: u64,
    pub tcp_closing: u64,
    pub udp: u64,
    pub icmp: u64,
    pub other: u64,
    pub fragment: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn: 30,
            // As Linux conntrack: long-lived idle clinical connections (HL7 MLLP, DICOM
            // associations, telemetry) must not lose their state overnight.
            tcp_established: 5 * 24 * 3600,
            tcp_closing: 10,
            udp: 60,
            icmp: 30,
            other: 60,
            fragment: 30,
        }
    }
}

impl Timeouts {
    /// In the kernel's layout (`enforcer_common::timeout`), in nanoseconds.
    pub fn as_kernel_ns(&self) -> [u64; timeout::COUNT] {
        let mut ns = [0u64; timeout::COUNT];
        let ns_of = |seconds: u64| seconds.saturating_mul(1_000_000_000);
        ns[timeout::TCP_SYN] = ns_of(self.tcp_syn);
        ns[timeout::TCP_ESTABLISHED] = ns_of(self.tcp_established);
        ns[timeout::TCP_CLOSING] = ns_of(self.tcp_closing);
        ns[timeout::UDP] = ns_of(self.udp);
        ns[timeout::ICMP] = ns_of(self.icmp);
        ns[timeout::OTHER] = ns_of(self.other);
        ns[timeout::FRAGMENT] = ns_of(self.fragment);
        ns
    }
}

/// Policy-wide settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub on_policy_change: OnPolicyChange,
    pub egress: Mode,
    pub essential_traffic: Vec<PortMatch>,
    pub conntrack_max_entries: u32,
    pub fragments_max_entries: u32,
    pub timeouts: Timeouts,
    /// `breakglass.max_ttl`: the longest a break-glass grant may last, in seconds.
    pub breakglass_max_ttl: u64,
}

/// Default of `breakglass.max_ttl`: long enough for an emergency procedure and the handover
/// after it, short enough that a forgotten grant does not outlive a shift.
pub const DEFAULT_BREAKGLASS_MAX_TTL_SECONDS: u64 = 4 * 3600;

/// ICMP 3; ICMPv6 2, 133, 134, 135, 136: path-MTU discovery and neighbour discovery.
pub fn default_essential_traffic() -> Vec<PortMatch> {
    let icmp = |proto: u8, t: u16| PortMatch::Range {
        proto,
        first: t,
        last: t,
    };
    vec![
        icmp(1, 3),
        icmp(58, 2),
        icmp(58, 133),
        icmp(58, 134),
        icmp(58, 135),
        icmp(58, 136),
    ]
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            on_policy_change: OnPolicyChange::Recheck,
            egress: Mode::Unenforced,
            essential_traffic: default_essential_traffic(),
            conntrack_max_entries: 262_144,
            fragments_max_entries: 16_384,
            timeouts: Timeouts::default(),
            breakglass_max_ttl: DEFAULT_BREAKGLASS_MAX_TTL_SECONDS,
        }
    }
}

/// Parses `30s`, `5m`, `2h`, `5d` or a number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(split) => text.split_at(split),
        None => (text, "s"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration"))?;
    let seconds = match unit {
        "s" => value,
        "m" => value.saturating_mul(60),
        "h" => value.saturating_mul(3600),
        "d" => value.saturating_mul(86_400),
        _ => return Err(format!("`{text}` has an unknown unit `{unit}`")),
    };
    if seconds == 0 {
        return Err("a timeout must be at least 1s".to_string());
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap().as_secs(), 30);
        assert_eq!(parse_duration("5m").unwrap().as_secs(), 300);
        assert_eq!(parse_duration("2h").unwrap().as_secs(), 7200);
        assert_eq!(parse_duration("5d").unwrap().as_secs(), 432_000);
        assert_eq!(parse_duration("45").unwrap().as_secs(), 45);
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
