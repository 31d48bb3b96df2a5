//! Writing a compiled policy into the kernel maps.
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapError, lpm_trie::Key, lpm_trie::LpmTrie},
};
use enforcer_common::{AddrInfo, PairKey, PairValue, PortKey, PortValue, SegmentInfo, map_names};
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

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::maps::Map, PolicyMapError> {
    ebpf.map_mut(name).ok_or(PolicyMapError::MissingMap(name))
}

/// Fills freshly created (empty) maps with `artifact`.
pub fn write(ebpf: &mut Ebpf, artifact: &Artifact) -> Result<(), PolicyMapError> {
    {
        let name = map_names::ADDR_V4;
        let mut trie: LpmTrie<_, [u8; 4], AddrInfo> =
            LpmTrie::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        for (prefix_len, addr, info) in artifact.addr_v4_entries() {
            trie.insert(&Key::new(prefix_len, addr), info, 0)
                .map_err(map_err(name))?;
        }
    }
    {
        let name = map_names::ADDR_V6;
        let mut trie: LpmTrie<_, [u8; 16], AddrInfo> =
            LpmTrie::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        for (prefix_len, addr, info) in artifact.addr_v6_entries() {
            trie.insert(&Key::new(prefix_len, addr), info, 0)
                .map_err(map_err(name))?;
        }
    }
    {
        let name = map_names::SEGMENTS;
        let mut segments: Array<_, SegmentInfo> =
            Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        for (id, info) in artifact.segment_infos().into_iter().enumerate() {
            let id = u32::try_from(id).unwrap_or(u32::MAX);
            segments.set(id, info, 0).map_err(map_err(name))?;
        }
    }
    {
        let name = map_names::PAIRS;
        let mut pairs: HashMap<_, PairKey, PairValue> =
            HashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        for (key, value) in artifact.pair_entries() {
            pairs.insert(key, value, 0).map_err(map_err(name))?;
        }
    }
    {
        let name = map_names::PORTS;
        let mut ports: LpmTrie<_, PortKey, PortValue> =
            LpmTrie::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        for (prefix_len, key, value) in artifact.port_entries() {
            ports
                .insert(&Key::new(prefix_len, key), value, 0)
                .map_err(map_err(name))?;
        }
    }
    Ok(())
}
