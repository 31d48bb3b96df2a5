//! Reading the per-CPU outcome counters and rule hits.
use std::collections::BTreeMap;

use aya::{
    Ebpf,
    maps::{MapError, PerCpuArray},
};
use enforcer_common::{counter, direction, map_names};
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

/// Packets seen since the programs were loaded, by direction and outcome
/// (`enforcer_common::direction`, `enforcer_common::counter`), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    values: [[u64; counter::COUNT as usize]; direction::COUNT as usize],
}

impl Counters {
    pub fn get(&self, dir: u32, counter: u32) -> u64 {
        self.values[dir as usize][counter as usize]
    }

    /// Every packet seen in `dir`.
    pub fn total(&self, dir: u32) -> u64 {
        self.values[dir as usize].iter().sum()
    }

    /// `{counter name: value}` for one direction.
    pub fn named(&self, dir: u32) -> BTreeMap<&'static str, u64> {
        counter::NAMES
            .iter()
            .copied()
            .zip(self.values[dir as usize])
            .collect()
    }
}

/// The JSON form: `{"ingress": {...}, "egress": {...}}`.
impl Serialize for Counters {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let by_direction: BTreeMap<&str, BTreeMap<&str, u64>> = direction::NAMES
            .iter()
            .copied()
            .zip(0..)
            .map(|(name, dir)| (name, self.named(dir)))
            .collect();
        by_direction.serialize(serializer)
    }
}

pub(crate) fn per_cpu_sum(ebpf: &Ebpf, map: &'static str, index: u32) -> Result<u64, CounterError> {
    let array: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map(map).ok_or(CounterError::MissingMap(map))?)
            .map_err(|source| CounterError::Map { map, source })?;
    let values = array
        .get(&index, 0)
        .map_err(|source| CounterError::Map { map, source })?;
    Ok(values.iter().sum())
}

/// One counter of one direction.
pub fn read_one(ebpf: &Ebpf, dir: u32, counter: u32) -> Result<u64, CounterError> {
    per_cpu_sum(ebpf, map_names::COUNTERS, dir * counter::COUNT + counter)
}

pub fn read(ebpf: &Ebpf) -> Result<Counters, CounterError> {
    let mut counters = Counters::default();
    for dir in 0..direction::COUNT {
        for index in 0..counter::COUNT {
            counters.values[dir as usize][index as usize] = read_one(ebpf, dir, index)?;
        }
    }
    Ok(counters)
}

pub fn rule_hits(ebpf: &Ebpf, slot: usize, rule_index: u32) -> Result<u64, CounterError> {
    per_cpu_sum(ebpf, map_names::RULE_HITS[slot], rule_index)
}
