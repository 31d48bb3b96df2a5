//! Writing a compiled policy into the kernel maps.
use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapError, lpm_trie::Key, lpm_trie::LpmTrie},
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
) -> Result<LpmTrie<&'a mut aya::maps::MapData, K, V>, PolicyMapError> {
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

/// Writes `artifact` into the policy maps and `CONFIG` (as policy generation `generation`),
/// replacing whatever policy they held. Not atomic: a packet judged while this runs may see
/// parts of both policies.
pub fn write(ebpf: &mut Ebpf, artifact: &Artifact, generation: u32) -> Result<(), PolicyMapError> {
    clear_trie::<[u8; 4], AddrInfo>(ebpf, map_names::ADDR_V4)?;
    clear_trie::<[u8; 16], AddrInfo>(ebpf, map_names::ADDR_V6)?;
    clear_trie::<PortKey, PortValue>(ebpf, map_names::PORTS)?;
    {
        let name = map_names::PAIRS;
        let mut pairs: HashMap<_, PairKey, PairValue> =
            HashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        let keys: Vec<PairKey> = pairs.keys().filter_map(Result::ok).collect();
        for key in &keys {
            pairs.remove(key).map_err(map_err(name))?;
        }
        for (key, value) in artifact.pair_entries() {
            pairs.insert(key, value, 0).map_err(map_err(name))?;
        }
    }
    fill_trie(ebpf, map_names::ADDR_V4, artifact.addr_v4_entries())?;
    fill_trie(ebpf, map_names::ADDR_V6, artifact.addr_v6_entries())?;
    fill_trie(ebpf, map_names::PORTS, artifact.port_entries())?;
    {
        let name = map_names::SEGMENTS;
        let mut segments: Array<_, SegmentInfo> =
            Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        let infos = artifact.segment_infos();
        for id in 0..segments.len() {
            let info = infos.get(id as usize).copied().unwrap_or_default();
            segments.set(id, info, 0).map_err(map_err(name))?;
        }
    }
    write_config(ebpf, &artifact.kernel_config(generation))
}

pub fn write_config(ebpf: &mut Ebpf, config: &Config) -> Result<(), PolicyMapError> {
    let name = map_names::CONFIG;
    let mut array: Array<_, Config> =
        Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    array.set(0, config, 0).map_err(map_err(name))
}
