//! Sweeping expired connection and fragment state. The kernel removes a flow's state when a
//! packet finds it expired or the TCP connection is reset; flows that simply stop are removed
//! here, so the (non-LRU) tables do not fill with the dead.
use aya::{
    Ebpf,
    maps::{HashMap, MapError},
};
use enforcer_common::{
    Config, FlowKey, FlowState, FragmentKey, FragmentState, counter, map_names, proto_key,
    tcp_state, timeout,
};

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
}

/// The kernel programs' clock (`bpf_ktime_get_coarse_ns`): CLOCK_MONOTONIC_COARSE, which
/// advances once per tick. Reading the fine CLOCK_MONOTONIC here instead would put the daemon up
/// to a tick ahead of the kernel, and a sweep could remove a flow the kernel still counts live.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
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
pub fn sweep(ebpf: &mut Ebpf, config: &Config) -> Result<(usize, usize), SweepError> {
    let now = monotonic_now_ns();
    let flows = {
        let map = map_names::CONNTRACK;
        let mut table: HashMap<_, FlowKey, FlowState> =
            HashMap::try_from(ebpf.map_mut(map).ok_or(SweepError::MissingMap(map))?)
                .map_err(|source| SweepError::Map { map, source })?;
        let expired: Vec<FlowKey> = table
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, state)| {
                now.saturating_sub(state.last_seen_ns) > idle_timeout_ns(key, state, config)
            })
            .map(|(key, _)| key)
            .collect();
        for key in &expired {
            // A packet may have refreshed or removed it meanwhile: either is fine.
            let _ = table.remove(key);
        }
        expired.len()
    };
    let fragments = {
        let map = map_names::FRAGMENTS;
        let mut table: HashMap<_, FragmentKey, FragmentState> =
            HashMap::try_from(ebpf.map_mut(map).ok_or(SweepError::MissingMap(map))?)
                .map_err(|source| SweepError::Map { map, source })?;
        let limit = config.timeouts_ns[timeout::FRAGMENT];
        let expired: Vec<FragmentKey> = table
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, state)| now.saturating_sub(state.first_seen_ns) > limit)
            .map(|(key, _)| key)
            .collect();
        for key in &expired {
            let _ = table.remove(key);
        }
        expired.len()
    };
    Ok((flows, fragments))
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
