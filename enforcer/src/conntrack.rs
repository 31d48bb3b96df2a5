//! Sweeping expired connection and fragment state. The kernel removes a flow's state when a
//! packet finds it expired or the TCP connection is reset; flows that simply stop are removed
//! here, so the (non-LRU) tables do not fill with the dead.
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapError},
};
use enforcer_common::{
    Config, FlowKey, FlowState, FragmentKey, FragmentState, counter, map_names, proto_key,
    tcp_state, timeout,
};

use crate::clock;

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Quiesce(#[from] crate::quiesce::QuiesceError),
}

/// The idle timeout of a tracked flow, as the kernel computes it.
pub fn idle_timeout_ns(key: &FlowKey, state: &FlowState, config: &Config) -> u64 {
    let index = match key.proto {
        proto_key::TCP => match state.tcp {
            tcp_state::SYN_SENT => timeout::TCP_SYN,
            tcp_state::CLOSING => timeout::TCP_CLOSING,
            _ => timeout::TCP_ESTABLISHED,
        },
        proto_key::UDP => timeout::UDP,
        proto_key::ICMP | proto_key::ICMPV6 => timeout::ICMP,
        _ => timeout::OTHER,
    };
    config.timeouts_ns[index]
}

/// Removes expired flows and fragments; returns how many of each.
///
/// Listing a large table takes a while, and meanwhile a packet may find a listed flow expired
/// (the kernel then removes it itself) and create fresh state under the same key. Each entry
/// is therefore read again just before its removal and removed only if still expired, so that
/// a new flow's state is not swept with the old one's (its replies would be judged as new).
pub fn sweep(ebpf: &mut Ebpf, config: &Config) -> Result<(usize, usize), SweepError> {
    // What the programs' clock reads at the latest: an entry they would still count live is
    // never removed.
    let now = clock::monotonic_now_ns().saturating_sub(clock::KERNEL_LAG_NS);
    let flows = {
        let map = map_names::CONNTRACK;
        let mut table: HashMap<_, FlowKey, FlowState> =
            HashMap::try_from(ebpf.map_mut(map).ok_or(SweepError::MissingMap(map))?)
                .map_err(|source| SweepError::Map { map, source })?;
        let expired: Vec<FlowKey> = table
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, state)| flow_expired(key, state, now, config))
            .map(|(key, _)| key)
            .collect();
        let mut removed = 0;
        for key in &expired {
            if remove_flow_if_expired(&mut table, key, now, config) {
                removed += 1;
            }
        }
        removed
    };
    let fragments = {
        let map = map_names::FRAGMENTS;
        let mut table: HashMap<_, FragmentKey, FragmentState> =
            HashMap::try_from(ebpf.map_mut(map).ok_or(SweepError::MissingMap(map))?)
                .map_err(|source| SweepError::Map { map, source })?;
        let limit = config.timeouts_ns[timeout::FRAGMENT];
        let is_expired = |state: &FragmentState| now.saturating_sub(state.first_seen_ns) > limit;
        let expired: Vec<FragmentKey> = table
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, state)| is_expired(state))
            .map(|(key, _)| key)
            .collect();
        let mut removed = 0;
        for key in &expired {
            // As for flows: a new first fragment may have reused the key.
            if remove_if_still(&mut table, key, is_expired) {
                removed += 1;
            }
        }
        removed
    };
    Ok((flows, fragments))
}

fn flow_expired(key: &FlowKey, state: &FlowState, now: u64, config: &Config) -> bool {
    now.saturating_sub(state.last_seen_ns) > idle_timeout_ns(key, state, config)
}

/// Removes the flow `key` if its state, read now, is expired at `now`; `true` if it did. A
/// flow a packet refreshed or recreated since it was listed stays. (A packet between this read
/// and the removal remains possible, in a window of microseconds rather than a whole listing.)
pub fn remove_flow_if_expired<T>(
    table: &mut HashMap<T, FlowKey, FlowState>,
    key: &FlowKey,
    now: u64,
    config: &Config,
) -> bool
where
    T: std::borrow::BorrowMut<aya::maps::MapData>,
{
    remove_if_still(table, key, |state| flow_expired(key, state, now, config))
}

/// Removes `key` if its value, read now, still satisfies `expired`; `true` if it did.
fn remove_if_still<T, K, V>(
    table: &mut HashMap<T, K, V>,
    key: &K,
    expired: impl Fn(&V) -> bool,
) -> bool
where
    T: std::borrow::BorrowMut<aya::maps::MapData>,
    K: aya::Pod,
    V: aya::Pod,
{
    table.get(key, 0).is_ok_and(|state| expired(&state)) && table.remove(key).is_ok()
}

/// Sets the break-glass expiry of every flow that grant `grant` admitted to 0: the kernel judges
/// such a flow again at its next packet (in either direction) and drops it, keeping the state,
/// unless something else allows it. Removing the state instead would let the responder's next
/// packet recreate it through unenforced egress. Returns how many flows.
pub fn expire_breakglass_flows(ebpf: &mut Ebpf, grant: u32) -> Result<usize, SweepError> {
    let map = map_names::CONNTRACK;
    let mut table: HashMap<_, FlowKey, FlowState> =
        HashMap::try_from(ebpf.map_mut(map).ok_or(SweepError::MissingMap(map))?)
            .map_err(|source| SweepError::Map { map, source })?;
    let admitted: Vec<(FlowKey, FlowState)> = table
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, state)| state.admitted == counter::BREAKGLASS as u8 && state.rule == grant)
        .collect();
    for (key, mut state) in admitted.iter().copied() {
        state.breakglass_expires_ns = 0;
        // BPF_EXIST: a flow that ended meanwhile stays ended.
        match table.insert(key, state, BPF_EXIST) {
            Ok(()) => {}
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => return Err(SweepError::Map { map, source }),
        }
    }
    Ok(admitted.len())
}

/// `BPF_EXIST`: update an element only if it exists.
const BPF_EXIST: u64 = 2;

/// Number of tracked flows.
pub fn tracked_flows(ebpf: &Ebpf) -> Result<usize, SweepError> {
    let map = map_names::CONNTRACK;
    let table: HashMap<_, FlowKey, FlowState> =
        HashMap::try_from(ebpf.map(map).ok_or(SweepError::MissingMap(map))?)
            .map_err(|source| SweepError::Map { map, source })?;
    Ok(table.keys().filter(Result::is_ok).count())
}

/// Makes the programs stop passing packets by their flow caches' entries
/// (`enforcer_common::FlowCacheEntry`), for flows just removed from the connection table: waits
/// until no program that could have seen them there still runs (it may have filled an entry),
/// then moves `FLOW_CACHE_EPOCH` on. The sweeper needs none of this: an entry never outlives the
/// idle timeout of its flow.
pub fn forget_cached_flows(ebpf: &mut Ebpf) -> Result<(), SweepError> {
    crate::quiesce::wait_for_running_programs()?;
    let map = map_names::FLOW_CACHE_EPOCH;
    let mut epoch: Array<_, u32> =
        Array::try_from(ebpf.map_mut(map).ok_or(SweepError::MissingMap(map))?)
            .map_err(|source| SweepError::Map { map, source })?;
    let current = epoch
        .get(&0, 0)
        .map_err(|source| SweepError::Map { map, source })?;
    epoch
        .set(0, current.wrapping_add(1), 0)
        .map_err(|source| SweepError::Map { map, source })
}

/// Removes the tracked flows and fragment state that have one of `addrs` (widened, with their
/// family) as an endpoint; returns how many flows and fragments. Used when a host is
/// quarantined: its established connections are cut, and its next packets are judged afresh.
pub fn remove_state_of(
    ebpf: &mut Ebpf,
    addrs: &[([u8; 16], u8)],
) -> Result<(usize, usize), SweepError> {
    let involves = |a: &[u8; 16], b: &[u8; 16], family: u8| {
        addrs
            .iter()
            .any(|(addr, f)| *f == family && (addr == a || addr == b))
    };
    let flows = {
        let map = map_names::CONNTRACK;
        let mut table: HashMap<_, FlowKey, FlowState> =
            HashMap::try_from(ebpf.map_mut(map).ok_or(SweepError::MissingMap(map))?)
                .map_err(|source| SweepError::Map { map, source })?;
        let doomed: Vec<FlowKey> = table
            .keys()
            .filter_map(Result::ok)
            .filter(|key| involves(&key.addr_a, &key.addr_b, key.family))
            .collect();
        for key in &doomed {
            // Gone already (expired, reset): fine.
            let _ = table.remove(key);
        }
        doomed.len()
    };
    if flows > 0 {
        forget_cached_flows(ebpf)?;
    }
    let fragments = {
        let map = map_names::FRAGMENTS;
        let mut table: HashMap<_, FragmentKey, FragmentState> =
            HashMap::try_from(ebpf.map_mut(map).ok_or(SweepError::MissingMap(map))?)
                .map_err(|source| SweepError::Map { map, source })?;
        let doomed: Vec<FragmentKey> = table
            .keys()
            .filter_map(Result::ok)
            .filter(|key| involves(&key.src, &key.dst, key.family))
            .collect();
        for key in &doomed {
            let _ = table.remove(key);
        }
        doomed.len()
    };
    Ok((flows, fragments))
}
