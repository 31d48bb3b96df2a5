//! The daemon's side of the filter in front of the connection table
//! (`enforcer_common::flow_filter`): the programs set a flow's byte before they insert it and
//! never clear one, so bytes of ended flows pile up; [`FlowFilter::rebuild`] rebuilds the
//! inactive half from a listing of the table and makes it the active one. The first rebuild
//! enables the filter; until then every probe goes to the table.
//!
//! The filter is not pinned: a daemon that adopts pinned maps (`run --persist`) starts with its
//! own, disabled, and enables it with its first rebuild, once its programs are attached.
use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    sync::atomic::{Ordering, fence},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, MapData, MapError},
};
use enforcer_common::{FlowFilterState, FlowKey, FlowState, flow_filter, map_names};

use crate::{
    mapped::Mapped,
    quiesce::{self, QuiesceError},
};

#[derive(Debug, thiserror::Error)]
pub enum FlowFilterError {
    #[error("the eBPF object has no map `{0}` (or it was taken already)")]
    MissingMap(&'static str),
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map `{map}`: {source}")]
    Io {
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("map `FLOW_FILTER` has {entries} lines; it needs twice a power of two, at least 128")]
    Shape { entries: u32 },
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
}

/// What one rebuild did.
#[derive(Clone, Copy, Debug)]
pub struct Rebuilt {
    /// Tracked flows listed into the new half.
    pub flows: usize,
    /// From the first wait to the switch, waits included.
    pub took: Duration,
}

/// The filter's maps, taken out of the [`Ebpf`] they were loaded with, so that a rebuild needs
/// no lock on the rest of the enforcer.
pub struct FlowFilter {
    state: Array<MapData, FlowFilterState>,
    /// The lines (`BPF_F_MMAPABLE`): a half is mapped into this process only while it is
    /// rebuilt, so that the daemon's resident memory does not carry the filter.
    lines: MapData,
    lines_per_half: u32,
    /// The connection table, for listing.
    conntrack: OwnedFd,
    /// The state as last written.
    current: FlowFilterState,
}

impl FlowFilter {
    /// Takes the filter's maps out of `ebpf` (once) and sets the filter up, disabled: from now
    /// on the programs set bytes, and [`FlowFilter::rebuild`] enables it.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, FlowFilterError> {
        let conntrack = {
            let map = map_names::CONNTRACK;
            let data = match ebpf.map(map).ok_or(FlowFilterError::MissingMap(map))? {
                aya::maps::Map::HashMap(data) => data,
                _ => return Err(FlowFilterError::MissingMap(map)),
            };
            data.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| FlowFilterError::Io { map, source })?
        };
        let state = {
            let map = map_names::FLOW_FILTER_STATE;
            let taken = ebpf.take_map(map).ok_or(FlowFilterError::MissingMap(map))?;
            Array::try_from(taken).map_err(|source| FlowFilterError::Map { map, source })?
        };
        let map = map_names::FLOW_FILTER;
        let lines_map = match ebpf.take_map(map).ok_or(FlowFilterError::MissingMap(map))? {
            aya::maps::Map::Array(data) => data,
            _ => return Err(FlowFilterError::MissingMap(map)),
        };
        let entries = lines_map
            .info()
            .map_err(|source| FlowFilterError::Map { map, source })?
            .max_entries();
        let lines_per_half = entries / 2;
        if entries % 2 != 0 || !lines_per_half.is_power_of_two() || lines_per_half < 64 {
            return Err(FlowFilterError::Shape { entries });
        }
        let mut filter = FlowFilter {
            state,
            lines: lines_map,
            lines_per_half,
            conntrack,
            current: FlowFilterState::default(),
        };
        filter.write_state(FlowFilterState {
            flags: 0,
            lines: lines_per_half,
        })?;
        Ok(filter)
    }

    /// Whether probes use the filter (after the first successful rebuild).
    pub fn enabled(&self) -> bool {
        self.current.flags & flow_filter::ENABLED != 0
    }

    /// Rebuilds the inactive half from the connection table and switches to it (enabling the
    /// filter the first time). Takes two waits for running programs (milliseconds each) and a
    /// listing of the table. On an error the active half stays in force, still correct.
    pub fn rebuild(&mut self) -> Result<Rebuilt, FlowFilterError> {
        let started = Instant::now();
        let active = u32::from(self.current.flags & flow_filter::SECOND_HALF_ACTIVE != 0);
        let target = 1 - active;
        // No program still probes the target half (it may have been the active one).
        quiesce::wait_for_running_programs()?;
        let half_len = self.lines_per_half as usize * flow_filter::LINE_BYTES as usize;
        let half = Mapped::map(
            self.lines.fd().as_fd(),
            target as usize * half_len,
            half_len,
        )
        .map_err(|source| FlowFilterError::Io {
            map: map_names::FLOW_FILTER,
            source,
        })?;
        // SAFETY: the mapped half; programs may set its bytes meanwhile, which the listing
        // below makes up for.
        unsafe { std::ptr::write_bytes(half.as_ptr(), 0, half_len) };
        fence(Ordering::SeqCst);
        // Every program that may have set a byte before or during the zeroing has inserted its
        // flow by now, so the listing finds it; later ones set their bytes after the zeroing.
        quiesce::wait_for_running_programs()?;
        let flows =
            crate::policy_maps::for_each_key::<FlowKey, FlowState>(self.conntrack.as_fd(), |key| {
                // Positions in half 0 are offsets into any half.
                let (line, byte) =
                    flow_filter::position(flow_filter::hash(key), 0, self.lines_per_half);
                let offset = line as usize * flow_filter::LINE_BYTES as usize + byte as usize;
                // SAFETY: `position` stays inside one half.
                unsafe { half.as_ptr().add(offset).write_volatile(1) };
            })
            .map_err(|source| FlowFilterError::Io {
                map: map_names::CONNTRACK,
                source,
            })?;
        fence(Ordering::SeqCst);
        let flags = flow_filter::ENABLED
            | if target == 1 {
                flow_filter::SECOND_HALF_ACTIVE
            } else {
                0
            };
        self.write_state(FlowFilterState {
            flags,
            lines: self.lines_per_half,
        })?;
        Ok(Rebuilt {
            flows,
            took: started.elapsed(),
        })
    }

    fn write_state(&mut self, state: FlowFilterState) -> Result<(), FlowFilterError> {
        self.state
            .set(0, state, 0)
            .map_err(|source| FlowFilterError::Map {
                map: map_names::FLOW_FILTER_STATE,
                source,
            })?;
        self.current = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use enforcer_common::{FlowKey, flow_filter};

    /// The hash as first written, from each address's bytes: reading the addresses as words
    /// must not change it. The filter is not pinned, so only the programs and the daemon of one
    /// build share it; another hash would need no migration, only this test changed with it.
    fn bytewise_hash(key: &FlowKey) -> u32 {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let word = |addr: &[u8; 16], i: usize| {
            u64::from_le_bytes(addr[i..i + 8].try_into().expect("8 bytes"))
        };
        let mut h = u64::from(key.port_a)
            | u64::from(key.port_b) << 16
            | u64::from(key.proto) << 32
            | u64::from(key.family) << 40;
        for w in [
            word(&key.addr_a, 0),
            word(&key.addr_a, 8),
            word(&key.addr_b, 0),
            word(&key.addr_b, 8),
        ] {
            h = (h ^ w).wrapping_mul(K);
            h ^= h >> 29;
        }
        h = h.wrapping_mul(K);
        (h >> 32) as u32
    }

    #[test]
    fn the_hash_of_a_key_is_the_bytewise_hash() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..10_000 {
            let mut key = FlowKey::default();
            key.addr_a[..8].copy_from_slice(&next().to_ne_bytes());
            key.addr_a[8..].copy_from_slice(&next().to_ne_bytes());
            key.addr_b[..8].copy_from_slice(&next().to_ne_bytes());
            key.addr_b[8..].copy_from_slice(&next().to_ne_bytes());
            let ports = next();
            (key.port_a, key.port_b, key.proto) = (ports as u16, (ports >> 16) as u16, 17);
            key.family = if ports & 1 == 0 { 4 } else { 6 };
            assert_eq!(flow_filter::hash(&key), bytewise_hash(&key), "{key:?}");
        }
    }
}
