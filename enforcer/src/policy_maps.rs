//! Writing a compiled policy into one slot of the kernel's policy maps, and switching the slot
//! that judges packets. A reload writes the inactive slot while the active one keeps judging,
//! then flips [`map_names::ACTIVE`] with one write: every packet is judged entirely by the old
//! or entirely by the new policy.
use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, lpm_trie::Key, lpm_trie::LpmTrie},
};
use std::collections::BTreeMap;

use enforcer_common::{
    AddrInfo, BreakglassKey, BreakglassValue, Config, PairKey, PairValue, PortKey, PortValue,
    SegmentInfo, map_names,
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
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> PolicyMapError {
    move |source| PolicyMapError::Map { map, source }
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map, PolicyMapError> {
    ebpf.map_mut(name).ok_or(PolicyMapError::MissingMap(name))
}

fn trie<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<LpmTrie<&'a mut MapData, K, V>, PolicyMapError> {
    LpmTrie::try_from(map_mut(ebpf, name)?).map_err(map_err(name))
}

fn fill_trie<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: impl Iterator<Item = (u32, K, V)>,
) -> Result<(), PolicyMapError> {
    let mut trie = trie::<K, V>(ebpf, name)?;
    for (prefix_len, key, value) in entries {
        trie.insert(&Key::new(prefix_len, key), value, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

fn clear_trie<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<(), PolicyMapError> {
    let mut trie = trie::<K, V>(ebpf, name)?;
    let keys: Vec<Key<K>> = trie.keys().filter_map(Result::ok).collect();
    for key in &keys {
        trie.remove(key).map_err(map_err(name))?;
    }
    Ok(())
}

fn pairs(
    ebpf: &mut Ebpf,
    slot: usize,
) -> Result<HashMap<&mut MapData, PairKey, PairValue>, PolicyMapError> {
    let name = map_names::PAIRS[slot];
    HashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))
}

/// Empties the policy maps of `slot` (which must not be the active one).
pub fn clear(ebpf: &mut Ebpf, slot: usize) -> Result<(), PolicyMapError> {
    clear_trie::<[u8; 4], AddrInfo>(ebpf, map_names::ADDR_V4[slot])?;
    clear_trie::<[u8; 16], AddrInfo>(ebpf, map_names::ADDR_V6[slot])?;
    clear_trie::<PortKey, PortValue>(ebpf, map_names::PORTS[slot])?;
    let mut pairs = pairs(ebpf, slot)?;
    let keys: Vec<PairKey> = pairs.keys().filter_map(Result::ok).collect();
    for key in &keys {
        pairs.remove(key).map_err(map_err(map_names::PAIRS[slot]))?;
    }
    write_breakglass(ebpf, slot, &BTreeMap::new())
}

/// Makes the break-glass map of `slot` hold exactly `entries` (see
/// `policy_compiler::breakglass::kernel_entries`). Only changed pairs are written, each with one
/// update that packets see entirely or not at all, so this may write the active slot.
pub fn write_breakglass(
    ebpf: &mut Ebpf,
    slot: usize,
    entries: &BTreeMap<BreakglassKey, BreakglassValue>,
) -> Result<(), PolicyMapError> {
    let name = map_names::BREAKGLASS[slot];
    let mut map: HashMap<_, BreakglassKey, BreakglassValue> =
        HashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    let present: Vec<(BreakglassKey, BreakglassValue)> =
        map.iter().filter_map(Result::ok).collect();
    for (key, value) in entries {
        if !present.contains(&(*key, *value)) {
            map.insert(key, value, 0).map_err(map_err(name))?;
        }
    }
    for (key, _) in &present {
        if !entries.contains_key(key) {
            map.remove(key).map_err(map_err(name))?;
        }
    }
    Ok(())
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
    {
        let name = map_names::PAIRS[slot];
        let mut pairs = pairs(ebpf, slot)?;
        for (key, value) in artifact.pair_entries() {
            pairs.insert(key, value, 0).map_err(map_err(name))?;
        }
    }
    fill_trie(ebpf, map_names::ADDR_V4[slot], artifact.addr_v4_entries())?;
    fill_trie(ebpf, map_names::ADDR_V6[slot], artifact.addr_v6_entries())?;
    fill_trie(ebpf, map_names::PORTS[slot], artifact.port_entries())?;
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
