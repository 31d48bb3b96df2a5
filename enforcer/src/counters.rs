//! Reading the per-CPU verdict counters.
use aya::{
    Ebpf,
    maps::{MapError, PerCpuArray},
};
use enforcer_common::{counter, map_names};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// Packets seen since the programs were loaded, by outcome (see `enforcer_common::counter`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub allowed: u64,
    pub audit: u64,
    pub unenforced: u64,
    pub non_ip: u64,
    pub policy_denied: u64,
    pub malformed: u64,
    pub unsupported_encap: u64,
}

impl Counters {
    /// Every packet the program saw.
    pub fn total(&self) -> u64 {
        self.allowed
            + self.audit
            + self.unenforced
            + self.non_ip
            + self.policy_denied
            + self.malformed
            + self.unsupported_encap
    }
}

fn per_cpu_sum(ebpf: &Ebpf, map: &'static str, index: u32) -> Result<u64, CounterError> {
    let array: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map(map).ok_or(CounterError::MissingMap(map))?)
            .map_err(|source| CounterError::Map { map, source })?;
    let values = array
        .get(&index, 0)
        .map_err(|source| CounterError::Map { map, source })?;
    Ok(values.iter().sum())
}

pub fn read(ebpf: &Ebpf) -> Result<Counters, CounterError> {
    let get = |index| per_cpu_sum(ebpf, map_names::COUNTERS, index);
    Ok(Counters {
        allowed: get(counter::ALLOWED)?,
        audit: get(counter::AUDIT)?,
        unenforced: get(counter::UNENFORCED)?,
        non_ip: get(counter::NON_IP)?,
        policy_denied: get(counter::DROP_POLICY_DENIED)?,
        malformed: get(counter::DROP_MALFORMED)?,
        unsupported_encap: get(counter::DROP_UNSUPPORTED_ENCAP)?,
    })
}

pub fn rule_hits(ebpf: &Ebpf, rule_index: u32) -> Result<u64, CounterError> {
    per_cpu_sum(ebpf, map_names::RULE_HITS, rule_index)
}
