//! Writing a compiled policy into one slot of the kernel's policy maps, and switching the slot
//! that judges packets. A reload writes the inactive slot while the active one keeps judging,
//! then flips [`map_names::ACTIVE`] with one write: every packet is judged entirely by the old
//! or entirely by the new policy.
use std::os::fd::AsFd as _;

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, lpm_trie::Key, lpm_trie::LpmTrie},
};
use enforcer_common::{
    AddrInfo, Config, PairKey, PairValue, PortKey, PortValue, SegmentInfo, map_names,
};
use policy_compiler::Artifact;

#[derive(Debug, thiserror::Error)]
pub enum PolicyMapError {
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map `{map}`: duplicating its file descriptor: {source}")]
    Duplicate {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> PolicyMapError {
    move |source| PolicyMapError::Map { map, source }
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map, PolicyMapError> {
    ebpf.map_mut(name).ok_or(PolicyMapError::MissingMap(name))
}

/// A second handle on map `name` (its own file descriptor), so that another thread can write
/// it while this one writes another map: the big maps of a slot are filled in parallel.
fn own_handle(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, PolicyMapError> {
    let data = match map_mut(ebpf, name)? {
        Map::LpmTrie(data) | Map::HashMap(data) => data,
        _ => return Err(PolicyMapError::MissingMap(name)),
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| PolicyMapError::Duplicate { map: name, source })?;
    let data = MapData::from_fd(fd).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

fn fill_trie<K: aya::Pod, V: aya::Pod>(
    map: Map,
    name: &'static str,
    entries: impl Iterator<Item = (u32, K, V)>,
) -> Result<(), PolicyMapError> {
    let mut trie: LpmTrie<MapData, K, V> = LpmTrie::try_from(map).map_err(map_err(name))?;
    for (prefix_len, key, value) in entries {
        trie.insert(&Key::new(prefix_len, key), value, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

fn clear_trie<K: aya::Pod, V: aya::Pod>(
    map: Map,
    name: &'static str,
) -> Result<(), PolicyMapError> {
    let mut trie: LpmTrie<MapData, K, V> = LpmTrie::try_from(map).map_err(map_err(name))?;
    let keys: Vec<Key<K>> = trie.keys().filter_map(Result::ok).collect();
    for key in &keys {
        trie.remove(key).map_err(map_err(name))?;
    }
    Ok(())
}

fn clear_hash<K: aya::Pod, V: aya::Pod>(
    map: Map,
    name: &'static str,
) -> Result<(), PolicyMapError> {
    let mut hash: HashMap<MapData, K, V> = HashMap::try_from(map).map_err(map_err(name))?;
    let keys: Vec<K> = hash.keys().filter_map(Result::ok).collect();
    for key in &keys {
        hash.remove(key).map_err(map_err(name))?;
    }
    Ok(())
}

/// Runs `jobs` on as many threads, and returns the first error.
fn in_parallel(
    jobs: Vec<Box<dyn FnOnce() -> Result<(), PolicyMapError> + Send + '_>>,
) -> Result<(), PolicyMapError> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs.into_iter().map(|job| scope.spawn(job)).collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .collect()
    })
}

/// Empties the policy maps of `slot` (which must not be the active one).
pub fn clear(ebpf: &mut Ebpf, slot: usize) -> Result<(), PolicyMapError> {
    let (v4, v6, ports, pairs) = (
        map_names::ADDR_V4[slot],
        map_names::ADDR_V6[slot],
        map_names::PORTS[slot],
        map_names::PAIRS[slot],
    );
    let (v4_map, v6_map) = (own_handle(ebpf, v4)?, own_handle(ebpf, v6)?);
    let (ports_map, pairs_map) = (own_handle(ebpf, ports)?, own_handle(ebpf, pairs)?);
    in_parallel(vec![
        Box::new(move || {
            clear_trie::<[u8; 4], AddrInfo>(v4_map, v4)?;
            clear_trie::<[u8; 16], AddrInfo>(v6_map, v6)?;
            clear_trie::<PortKey, PortValue>(ports_map, ports)
        }),
        Box::new(move || clear_hash::<PairKey, PairValue>(pairs_map, pairs)),
    ])
}

/// Writes `artifact` into the policy maps of `slot` (which must not be the active one) and its
/// settings into `CONFIG[slot]`.
pub fn write(
    ebpf: &mut Ebpf,
    slot: usize,
    artifact: &Artifact,
    config: &Config,
) -> Result<(), PolicyMapError> {
    clear(ebpf, slot)?;
    // The pair table and the port trie hold nearly all entries of a large policy: one thread
    // each halves the time a reload takes to go live.
    let (pairs, ports, v4, v6) = (
        map_names::PAIRS[slot],
        map_names::PORTS[slot],
        map_names::ADDR_V4[slot],
        map_names::ADDR_V6[slot],
    );
    let (pairs_map, ports_map) = (own_handle(ebpf, pairs)?, own_handle(ebpf, ports)?);
    let (v4_map, v6_map) = (own_handle(ebpf, v4)?, own_handle(ebpf, v6)?);
    in_parallel(vec![
        Box::new(move || {
            let mut map: HashMap<MapData, PairKey, PairValue> =
                HashMap::try_from(pairs_map).map_err(map_err(pairs))?;
            for (key, value) in artifact.pair_entries() {
                map.insert(key, value, 0).map_err(map_err(pairs))?;
            }
            Ok(())
        }),
        Box::new(move || {
            fill_trie(v4_map, v4, artifact.addr_v4_entries())?;
            fill_trie(v6_map, v6, artifact.addr_v6_entries())?;
            fill_trie(ports_map, ports, artifact.port_entries())
        }),
    ])?;
    {
        let name = map_names::SEGMENTS[slot];
        let mut segments: Array<_, SegmentInfo> =
            Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        for (id, info) in artifact.segment_infos().into_iter().enumerate() {
            let id = u32::try_from(id).unwrap_or(u32::MAX);
            segments.set(id, info, 0).map_err(map_err(name))?;
        }
    }
    write_config(ebpf, slot, config)
}

pub fn write_config(ebpf: &mut Ebpf, slot: usize, config: &Config) -> Result<(), PolicyMapError> {
    let name = map_names::CONFIG;
    let mut array: Array<_, Config> =
        Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    array.set(slot as u32, config, 0).map_err(map_err(name))
}

/// Makes `slot` the one that judges packets: the atomic step of a reload.
pub fn activate(ebpf: &mut Ebpf, slot: usize) -> Result<(), PolicyMapError> {
    let name = map_names::ACTIVE;
    let mut active: Array<_, u32> = Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    active.set(0, slot as u32, 0).map_err(map_err(name))
}
