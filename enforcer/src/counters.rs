//! Reading the per-CPU outcome counters and rule hits.
use std::{collections::BTreeMap, os::fd::AsFd as _};

use aya::{
    Ebpf,
    maps::{Map, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues},
};
use enforcer_common::{PAIR_COUNT_SLOTS, PairCount, PairVerdictKey, counter, direction, map_names};
use serde::Serialize;
use tracing::warn;

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

/// Segment-pair verdict counts of every generation still in the kernel, summed over CPUs: the
/// tables of both slots and the hash behind them (a key can be counted in several places).
/// `empty_slot` names a slot whose table is known to hold nothing, which is then not read.
pub fn pair_verdicts(
    ebpf: &Ebpf,
    empty_slot: Option<usize>,
) -> Result<Vec<(PairVerdictKey, u64)>, CounterError> {
    let mut counts: BTreeMap<PairVerdictKey, u64> =
        hashed_pair_verdicts(ebpf)?.into_iter().collect();
    for (slot, map) in map_names::PAIR_COUNTS.into_iter().enumerate() {
        if empty_slot == Some(slot) {
            continue;
        }
        for (_, copies) in read_pair_table(ebpf, map)? {
            for count in copies.iter().filter(|count| count.key.generation != 0) {
                *counts.entry(count.key).or_default() += count.count;
            }
        }
    }
    Ok(counts.into_iter().collect())
}

/// The counts in the hash behind the tables, summed over CPUs.
fn hashed_pair_verdicts(ebpf: &Ebpf) -> Result<Vec<(PairVerdictKey, u64)>, CounterError> {
    let map = map_names::PAIR_VERDICTS;
    let hash: PerCpuHashMap<_, PairVerdictKey, u64> =
        PerCpuHashMap::try_from(ebpf.map(map).ok_or(CounterError::MissingMap(map))?)
            .map_err(|source| CounterError::Map { map, source })?;
    hash.iter()
        .map(|entry| {
            entry
                .map(|(key, values)| (key, values.iter().sum()))
                .map_err(|source| CounterError::Map { map, source })
        })
        .collect()
}

/// Takes the counts of generations before `current` out of the hash and out of the table of
/// `slot`, the previous policy's, which is left empty for the next one. Only while no program
/// judges with `slot` or with an earlier generation: a program counting meanwhile would lose
/// its counts. The active slot's table is never written: an old generation's counts there (a
/// daemon that stopped before taking them) stay until that slot is the previous one.
///
/// Returns exactly what left the kernel: an element that could not be emptied, or a key that
/// could not be removed, is logged and stays where it is, still read by [`pair_verdicts`], so
/// a count is neither lost nor counted twice. The flag says whether the table of `slot` was
/// left empty (every element that held a key was emptied).
pub(crate) fn take_old_pair_verdicts(
    ebpf: &mut Ebpf,
    slot: usize,
    current: u32,
) -> Result<(Vec<(PairVerdictKey, u64)>, bool), CounterError> {
    let mut counts: BTreeMap<PairVerdictKey, u64> = BTreeMap::new();
    let table = map_names::PAIR_COUNTS[slot];
    let elements = read_pair_table(ebpf, table)?;
    let hash = map_names::PAIR_VERDICTS;
    let old: Vec<(PairVerdictKey, u64)> = hashed_pair_verdicts(ebpf)?
        .into_iter()
        .filter(|(key, _)| key.generation < current)
        .collect();

    let mut array: PerCpuArray<_, PairCount> =
        PerCpuArray::try_from(ebpf.map_mut(table).ok_or(CounterError::MissingMap(table))?)
            .map_err(|source| CounterError::Map { map: table, source })?;
    let mut table_emptied = true;
    for (index, copies) in elements {
        let emptied = PerCpuValues::try_from(vec![PairCount::default(); copies.len()])
            .map_err(MapError::from)
            .and_then(|empty| array.set(index, empty, 0));
        match emptied {
            Ok(()) => {
                for count in copies.iter().filter(|count| count.key.generation != 0) {
                    *counts.entry(count.key).or_default() += count.count;
                }
            }
            Err(error) => {
                table_emptied = false;
                warn!(map = table, index, %error, "emptying an element failed");
            }
        }
    }
    let mut hashed: PerCpuHashMap<_, PairVerdictKey, u64> =
        PerCpuHashMap::try_from(ebpf.map_mut(hash).ok_or(CounterError::MissingMap(hash))?)
            .map_err(|source| CounterError::Map { map: hash, source })?;
    for (key, count) in old {
        match hashed.remove(&key) {
            Ok(()) => *counts.entry(key).or_default() += count,
            Err(error) => warn!(map = hash, ?key, %error, "removing an old key failed"),
        }
    }
    Ok((counts.into_iter().collect(), table_emptied))
}

/// The elements of table `map` that hold a key on some CPU: index and every CPU's copy. One
/// batch lookup for the whole table where the kernel has it, else one lookup per element (a
/// scrape reads both tables: 8,192 syscalls that way).
fn read_pair_table(
    ebpf: &Ebpf,
    map: &'static str,
) -> Result<Vec<(u32, Vec<PairCount>)>, CounterError> {
    // Per-CPU values are laid out 8-byte aligned, one per possible CPU.
    const SIZE: usize = std::mem::size_of::<PairCount>();
    const _: () = assert!(SIZE.is_multiple_of(8));
    let used = |copies: &Vec<PairCount>| copies.iter().any(|count| count.key.generation != 0);
    if let (Ok(cpus), Some(Map::PerCpuArray(data))) = (aya::util::nr_cpus(), ebpf.map(map)) {
        let mut elements = Vec::new();
        let listed = crate::policy_maps::for_each_entry(
            data.fd().as_fd(),
            std::mem::size_of::<u32>(),
            SIZE * cpus,
            |key, value| {
                let index = u32::from_ne_bytes(key.try_into().unwrap_or_default());
                // SAFETY: `value` holds `cpus` values of `PairCount`'s size, written by the
                // kernel; `Pod` takes any bytes.
                let copies: Vec<PairCount> = (0..cpus)
                    .map(|cpu| unsafe {
                        value[cpu * SIZE..][..SIZE]
                            .as_ptr()
                            .cast::<PairCount>()
                            .read_unaligned()
                    })
                    .collect();
                if used(&copies) {
                    elements.push((index, copies));
                }
            },
        );
        if listed.is_ok() {
            return Ok(elements);
        }
    }
    let table: PerCpuArray<_, PairCount> =
        PerCpuArray::try_from(ebpf.map(map).ok_or(CounterError::MissingMap(map))?)
            .map_err(|source| CounterError::Map { map, source })?;
    let mut elements = Vec::new();
    for index in 0..table.len().min(PAIR_COUNT_SLOTS) {
        let copies: Vec<PairCount> = table
            .get(&index, 0)
            .map_err(|source| CounterError::Map { map, source })?
            .iter()
            .copied()
            .collect();
        if used(&copies) {
            elements.push((index, copies));
        }
    }
    Ok(elements)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use enforcer_common::{PAIR_COUNT_SLOTS, PairVerdictKey};

    /// The keys of a small policy spread over a table as random ones would: keys that differ
    /// only in direction or outcome must not share their elements (they would all but two be
    /// counted in the hash).
    #[test]
    fn the_keys_of_a_small_policy_spread_over_the_table() {
        let keys: Vec<PairVerdictKey> = (1..=10)
            .flat_map(|src| (1..=10).map(move |dst| (src, dst)))
            .flat_map(|(src, dst)| (0..2).map(move |direction| (src, dst, direction)))
            .flat_map(|(src, dst, direction)| {
                (0..5).map(move |counter| PairVerdictKey {
                    generation: 7,
                    src_segment: src,
                    dst_segment: dst,
                    direction,
                    counter,
                    _pad: [0; 2],
                })
            })
            .collect();
        // Placed as the programs place them: the first free of a key's two elements.
        let mut taken = BTreeSet::new();
        let mut hashed = 0;
        for key in &keys {
            let slots = key.count_slots();
            assert!(slots.iter().all(|&slot| slot < PAIR_COUNT_SLOTS));
            match slots.into_iter().find(|slot| !taken.contains(slot)) {
                Some(slot) => {
                    taken.insert(slot);
                }
                None => hashed += 1,
            }
        }
        // Random placement with two choices leaves about 2% of 1,000 keys in 4,096 elements
        // without one (with one choice, 11%).
        assert!(
            hashed * 100 <= keys.len() * 3,
            "{hashed} of {} keys counted in the hash",
            keys.len()
        );
    }
}
