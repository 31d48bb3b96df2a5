//! Quarantine: hosts moved into the built-in `quarantine` segment at run time
//! (`enforcer quarantine add|remove|list`), without a policy change in Git.
//!
//! - Kernel: the global `QUARANTINE` hash holds the addresses; each policy slot's `CONFIG`
//!   carries the quarantine segment's id and source class, so a reload that renumbers segments
//!   needs no rewrite. A quarantined address is looked up as that segment and class, as source
//!   and as destination, whenever a packet is judged.
//! - Isolation in seconds: after the map insert, the host's tracked flows and fragment state
//!   are removed, so its established connections are judged again at their next packet (and
//!   denied unless the quarantine rules allow them). A packet judged just before the insert may
//!   still be running and create state, so the cut first waits until every program that was
//!   running at the insert has ended ([`crate::quiesce`]). (A flow the quarantine rules allow
//!   that starts within that moment is cut too and re-admitted at its next packet in the
//!   allowed direction.)
//! - State: kept in the state file (written before the kernel changes, so a restart never
//!   forgets an isolation it reported), put back into the map at start before the programs are
//!   attached, audited with the client's identity.
//! - Releasing a host gives it back its own segment for new flows; flows the quarantine rules
//!   admitted run on until they end.
use std::{net::IpAddr, time::Instant};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapError},
};
use enforcer_common::{QUARANTINE_MAX_ENTRIES, QuarantineKey, map_names};
use serde_json::{Value, json};
use tracing::{error, info, warn};

use crate::{
    conntrack::{self, SweepError},
    control::{ControlError, Peer},
    daemon::Daemon,
    quiesce::{self, QuiesceError},
    state::QuarantineEntry,
};

/// The longest reason kept, in characters.
const MAX_REASON_CHARS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cutting the flows of {addr}: {source}")]
    Cut {
        addr: IpAddr,
        #[source]
        source: SweepError,
    },
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
}

fn widen(addr: IpAddr) -> ([u8; 16], u8) {
    let mut wide = [0u8; 16];
    match addr {
        IpAddr::V4(v4) => {
            wide[..4].copy_from_slice(&v4.octets());
            (wide, 4)
        }
        IpAddr::V6(v6) => (v6.octets(), 6),
    }
}

/// The `QUARANTINE` key of `addr`.
pub fn key_of(addr: IpAddr) -> QuarantineKey {
    let (addr, family) = widen(addr);
    QuarantineKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

fn table(
    ebpf: &mut Ebpf,
) -> Result<HashMap<&mut aya::maps::MapData, QuarantineKey, u32>, QuarantineError> {
    let map = map_names::QUARANTINE;
    HashMap::try_from(ebpf.map_mut(map).ok_or(QuarantineError::MissingMap(map))?)
        .map_err(|source| QuarantineError::Map { map, source })
}

/// Says whether the kernel must probe the quarantine for every judged address.
fn set_in_use(ebpf: &mut Ebpf, in_use: bool) -> Result<(), QuarantineError> {
    let map = map_names::QUARANTINE_IN_USE;
    let mut flag: Array<_, u32> =
        Array::try_from(ebpf.map_mut(map).ok_or(QuarantineError::MissingMap(map))?)
            .map_err(|source| QuarantineError::Map { map, source })?;
    flag.set(0, u32::from(in_use), 0)
        .map_err(|source| QuarantineError::Map { map, source })
}

/// Sets the in-use flag from what the quarantine map holds: for maps another daemon pinned.
pub fn sync_in_use(ebpf: &mut Ebpf) -> Result<(), QuarantineError> {
    let in_use = table(ebpf)?.keys().next().is_some();
    set_in_use(ebpf, in_use)
}

/// Puts `addr` into the kernel's quarantine (no flows are cut: see [`cut_flows`]).
pub fn insert(ebpf: &mut Ebpf, addr: IpAddr) -> Result<(), QuarantineError> {
    // The flag first: a program that sees the address in the map must also probe for it.
    set_in_use(ebpf, true)?;
    let map = map_names::QUARANTINE;
    table(ebpf)?
        .insert(key_of(addr), 1, 0)
        .map_err(|source| QuarantineError::Map { map, source })
}

/// Takes `addr` out of the kernel's quarantine; absent is fine.
pub fn remove(ebpf: &mut Ebpf, addr: IpAddr) -> Result<(), QuarantineError> {
    let map = map_names::QUARANTINE;
    match table(ebpf)?.remove(&key_of(addr)) {
        Ok(()) | Err(MapError::KeyNotFound) => {}
        Err(MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) => {}
        Err(source) => return Err(QuarantineError::Map { map, source }),
    }
    // Cleared only once the map is seen empty: callers hold `ebpf` mutably, so no insert can
    // run in between.
    if table(ebpf)?.keys().next().is_none() {
        set_in_use(ebpf, false)?;
    }
    Ok(())
}

/// The addresses in the kernel's quarantine.
pub fn addresses(ebpf: &mut Ebpf) -> Result<Vec<IpAddr>, QuarantineError> {
    Ok(table(ebpf)?
        .keys()
        .filter_map(Result::ok)
        .map(|key| policy_compiler::packet::narrow(&key.addr, key.family))
        .collect())
}

/// Removes the tracked flows and fragments of `addr`; returns how many. After [`insert`] while
/// packets flow, call it only once [`quiesce::wait_for_running_programs`] has returned, or a
/// packet judged just before the insert can create state after the cut.
pub fn cut_flows(ebpf: &mut Ebpf, addr: IpAddr) -> Result<(usize, usize), QuarantineError> {
    conntrack::remove_state_of(ebpf, &[widen(addr)])
        .map_err(|source| QuarantineError::Cut { addr, source })
}

/// The address of a request: one IPv4 or IPv6 address (an IPv4-mapped IPv6 address is its IPv4
/// address, as the kernel sees it), not a prefix, not a wildcard or multicast address.
pub fn parse_address(text: &str) -> Result<IpAddr, ControlError> {
    let text = text.trim();
    if text.contains('/') {
        return Err(ControlError::Invalid(format!(
            "{text:?} is a prefix: quarantine takes one host address (quarantine each host, or \
             change the policy in Git for a whole network)"
        )));
    }
    let addr = text
        .parse::<IpAddr>()
        .map_err(|_| {
            ControlError::Invalid(format!(
                "{text:?} is not an IP address (e.g. 10.20.3.4 or fd00:20::4)"
            ))
        })?
        .to_canonical();
    let broadcast = matches!(addr, IpAddr::V4(v4) if v4.is_broadcast());
    if addr.is_unspecified() || addr.is_multicast() || broadcast || addr.is_loopback() {
        return Err(ControlError::Invalid(format!(
            "{addr} is not a host address (unspecified, loopback, broadcast or multicast): \
             nothing to quarantine"
        )));
    }
    Ok(addr)
}

/// A reason as kept: trimmed, required when `required`, one line, at most
/// [`MAX_REASON_CHARS`] characters.
pub fn parse_reason(text: Option<&str>, required: bool) -> Result<Option<String>, ControlError> {
    let text = text.map(str::trim).filter(|text| !text.is_empty());
    let Some(text) = text else {
        return if required {
            Err(ControlError::Invalid(
                "a reason is required (--reason \"EDR agent missing\"): the audit log must say \
                 why a host was isolated"
                    .into(),
            ))
        } else {
            Ok(None)
        };
    };
    if text.chars().any(char::is_control) {
        return Err(ControlError::Invalid(
            "the reason must be one line of text (no control characters)".into(),
        ));
    }
    if text.chars().count() > MAX_REASON_CHARS {
        return Err(ControlError::Invalid(format!(
            "the reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    Ok(Some(text.to_string()))
}

fn failed(what: &str, error: impl std::fmt::Display) -> ControlError {
    ControlError::Failed(format!("{what}: {error}"))
}

impl Daemon {
    /// `quarantine add`: validates, saves the state, isolates the host in the kernel, audits.
    /// Adding a host that is already quarantined changes nothing and says so.
    pub fn quarantine_add(
        &self,
        address: &str,
        reason: &str,
        peer: &Peer,
    ) -> Result<Value, ControlError> {
        let addr = parse_address(address)?;
        let reason = parse_reason(Some(reason), true)?.unwrap_or_default();
        let started = Instant::now();
        let mut state = self.state();
        if let Some(entry) = state.quarantine.iter().find(|entry| entry.address == addr) {
            return Ok(json!({
                "address": addr,
                "already_quarantined": true,
                "entry": entry,
            }));
        }
        if state.quarantine.len() >= QUARANTINE_MAX_ENTRIES as usize {
            return Err(ControlError::Failed(format!(
                "the quarantine holds {QUARANTINE_MAX_ENTRIES} hosts already; remove some first"
            )));
        }
        let entry = QuarantineEntry {
            address: addr,
            reason: reason.clone(),
            actor: peer.user.clone(),
            since: crate::audit::now_rfc3339(),
        };
        let mut next = state.clone();
        next.quarantine.push(entry.clone());
        self.save_state(&next)?;
        if let Err(error) = insert(self.enforcer().ebpf_mut(), addr) {
            if let Err(restore) = self.save_state(&state) {
                error!(%restore, "restoring the state file after a failed quarantine");
            }
            return Err(failed(
                &format!("nothing changed: quarantining {addr}"),
                error,
            ));
        }
        *state = next;
        // From here on the host is isolated for new flows; a failure to cut its flows is
        // reported, not rolled back. The enforcer lock is not held while waiting for packets
        // judged before the insert: metrics and sweeps go on.
        let cut = quiesce::wait_for_running_programs()
            .map_err(QuarantineError::from)
            .and_then(|_| cut_flows(self.enforcer().ebpf_mut(), addr));
        drop(state);
        let (flows_cut, cut_error) = match cut {
            Ok((flows, _)) => (flows, None),
            Err(error) => {
                error!(%addr, %error, "quarantined, but its established flows could not all be cut");
                (0, Some(error.to_string()))
            }
        };
        info!(%addr, %reason, user = %peer.user, flows_cut, "host quarantined");
        self.audit(
            "quarantine_add",
            json!({
                "address": addr,
                "reason": reason,
                "actor": peer.actor(),
                "flows_cut": flows_cut,
                "cut_error": cut_error,
            }),
        );
        Ok(json!({
            "address": addr,
            "already_quarantined": false,
            "entry": entry,
            "flows_cut": flows_cut,
            "cut_error": cut_error,
            "took_ms": started.elapsed().as_millis() as u64,
        }))
    }

    /// `quarantine remove`: the host gets its own segment back for new flows.
    pub fn quarantine_remove(
        &self,
        address: &str,
        reason: Option<&str>,
        peer: &Peer,
    ) -> Result<Value, ControlError> {
        let addr = parse_address(address)?;
        let reason = parse_reason(reason, false)?;
        let mut state = self.state();
        let Some(position) = state.quarantine.iter().position(|e| e.address == addr) else {
            return Err(ControlError::Invalid(format!(
                "{addr} is not quarantined (`enforcer quarantine list` shows who is)"
            )));
        };
        let mut next = state.clone();
        let removed = next.quarantine.remove(position);
        self.save_state(&next)?;
        if let Err(error) = remove(self.enforcer().ebpf_mut(), addr) {
            if let Err(restore) = self.save_state(&state) {
                error!(%restore, "restoring the state file after a failed release");
            }
            return Err(failed(&format!("nothing changed: releasing {addr}"), error));
        }
        *state = next;
        drop(state);
        info!(%addr, user = %peer.user, "host released from quarantine");
        self.audit(
            "quarantine_remove",
            json!({
                "address": addr,
                "reason": reason,
                "actor": peer.actor(),
                "quarantined": removed,
            }),
        );
        Ok(json!({ "address": addr, "released": removed }))
    }

    /// `quarantine list`: the quarantined hosts, oldest first.
    pub fn quarantine_list(&self, _peer: &Peer) -> Result<Value, ControlError> {
        Ok(json!({ "quarantined": self.state().quarantine }))
    }

    /// Puts the saved quarantine into the kernel (at start, before attaching). A host that
    /// cannot be put back is logged and audited; the others still are.
    pub(crate) fn restore_quarantine(&self) {
        let entries = self.state().quarantine.clone();
        let mut enforcer = self.enforcer();
        for entry in &entries {
            if let Err(error) = insert(enforcer.ebpf_mut(), entry.address) {
                error!(address = %entry.address, %error, "a saved quarantine could not be restored: the host is NOT isolated");
                self.audit(
                    "quarantine_restore_failed",
                    json!({"address": entry.address, "error": error.to_string()}),
                );
            }
        }
        if !entries.is_empty() {
            warn!(
                hosts = entries.len(),
                "quarantined hosts restored from the state file"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_hosts() {
        assert_eq!(
            parse_address(" 10.20.3.4 ").unwrap(),
            "10.20.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            parse_address("fd00:20::4").unwrap(),
            "fd00:20::4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            parse_address("::ffff:10.20.3.4").unwrap(),
            "10.20.3.4".parse::<IpAddr>().unwrap(),
            "the kernel sees IPv4"
        );
        for (bad, why) in [
            ("10.20.3.0/24", "is a prefix"),
            ("10.20.3", "is not an IP address"),
            ("radiology", "is not an IP address"),
            ("", "is not an IP address"),
            ("0.0.0.0", "not a host address"),
            ("255.255.255.255", "not a host address"),
            ("224.0.0.1", "not a host address"),
            ("::1", "not a host address"),
        ] {
            let error = parse_address(bad).unwrap_err().to_string();
            assert!(error.contains(why), "{bad:?}: {error}");
        }
    }

    #[test]
    fn reasons_are_one_line_and_required_for_add() {
        assert_eq!(
            parse_reason(Some("  EDR agent missing "), true).unwrap(),
            Some("EDR agent missing".into())
        );
        assert!(
            parse_reason(Some("   "), true)
                .unwrap_err()
                .to_string()
                .contains("a reason is required")
        );
        assert!(parse_reason(None, true).is_err());
        assert_eq!(parse_reason(None, false).unwrap(), None);
        assert!(parse_reason(Some("a\nb"), true).is_err());
        assert!(parse_reason(Some(&"x".repeat(1001)), true).is_err());
    }

    #[test]
    fn keys_widen_ipv4_like_the_kernel() {
        let key = key_of("10.20.3.4".parse().unwrap());
        assert_eq!(key.family, 4);
        assert_eq!(&key.addr[..4], &[10, 20, 3, 4]);
        assert!(key.addr[4..].iter().all(|&b| b == 0));
        assert_eq!(key_of("fd00::1".parse().unwrap()).family, 6);
    }
}
