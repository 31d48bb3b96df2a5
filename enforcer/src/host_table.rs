//! The daemon's side of the host tables (`enforcer_common::host_table`): building a table from
//! a policy's host entries, and listing what a table read back from the kernel holds. The
//! kernel's lookup and this side share the layout, the hash and the probe code.
use enforcer_common::{
    AddrInfo,
    host_table::{self, HostBucket},
};

/// A table ready to be written: element 0 is the header, then the buckets.
pub struct Table<B: HostBucket> {
    pub elements: Vec<B>,
    /// Addresses that found no free entry in their buckets: they go into the family's trie.
    pub overflow: Vec<(B::Addr, AddrInfo)>,
}

/// The table of `map_entries` elements (as the loader sized the map, see
/// `host_table::map_entries`) holding `entries`, placed in their order.
pub fn build<B: HostBucket>(
    map_entries: u32,
    entries: impl Iterator<Item = (B::Addr, AddrInfo)>,
) -> Table<B> {
    // A map sized by another build may have any size: use the largest power of two it holds.
    let buckets = prev_power_of_two(map_entries.saturating_sub(1)).max(1);
    let mask = buckets - 1;
    let mut elements = vec![B::default(); host_table::index(buckets) as usize];
    elements[0] = B::header(buckets);
    let mut overflow = Vec::new();
    for (addr, info) in entries {
        let home = B::hash(&addr) & mask;
        let placed = (0..host_table::MAX_PROBES).any(|probe| {
            let bucket = host_table::index((home + probe) & mask) as usize;
            elements[bucket].place(&addr, info)
        });
        if !placed {
            overflow.push((addr, info));
        }
    }
    Table { elements, overflow }
}

fn prev_power_of_two(n: u32) -> u32 {
    if n == 0 {
        0
    } else {
        1 << (31 - n.leading_zeros())
    }
}

/// Every address in `elements` (a table as read back, header first), in table order.
pub fn entries<B: HostBucket>(elements: &[B]) -> Vec<(B::Addr, AddrInfo)> {
    let mut all = Vec::new();
    for bucket in elements.iter().skip(1) {
        bucket.for_each(|addr, info| all.push((addr, info)));
    }
    all
}

/// `addr` in `elements`, exactly as the kernel finds it.
pub fn find<B: HostBucket>(elements: &[B], addr: &B::Addr) -> Option<AddrInfo> {
    host_table::find(addr, |i| elements.get(i as usize))
}

#[cfg(test)]
mod tests {
    use enforcer_common::{HostBucketV4, HostBucketV6, host_table::map_entries};

    use super::*;

    fn info(i: u32) -> AddrInfo {
        AddrInfo {
            segment: i % 1000 + 1,
            class: i,
        }
    }

    /// Addresses that are not in the table must miss, those that are must be found, whatever the
    /// fill: checked at the daemon's load factor and, with a tiny table, when most overflow.
    #[test]
    fn every_host_is_found_in_the_table_or_listed_for_the_trie() {
        for (count, capacity) in [
            (100_000u32, 150_000u32),
            (131_072, 131_072),
            (1000, 1500),
            (300, 40),
        ] {
            let hosts: Vec<([u8; 4], AddrInfo)> = (0..count)
                .map(|i| ((0x0a00_0000u32 + i * 7919).to_be_bytes(), info(i)))
                .collect();
            let size = map_entries(capacity, HostBucketV4::ENTRIES);
            let table = build::<HostBucketV4>(size, hosts.iter().copied());
            assert_eq!(table.elements.len() as u32, size);
            let overflow: std::collections::HashMap<_, _> =
                table.overflow.iter().copied().collect();
            for (addr, want) in &hosts {
                match find(&table.elements, addr) {
                    Some(found) => assert_eq!(found, *want),
                    None => assert_eq!(overflow.get(addr), Some(want), "{addr:?} lost"),
                }
            }
            assert_eq!(
                entries(&table.elements).len() + table.overflow.len(),
                hosts.len()
            );
            for i in count..count + 10_000 {
                let absent = (0x0a00_0000u32 + i * 7919).to_be_bytes();
                assert_eq!(find(&table.elements, &absent), None);
            }
            if capacity >= count {
                // At most half full: a host left for the trie is rare (57 of 131,072 when
                // exactly half full, none at the daemon's usual fill).
                assert!(
                    table.overflow.len() * 1000 <= hosts.len(),
                    "{} of {} overflowed",
                    table.overflow.len(),
                    hosts.len()
                );
            } else {
                assert!(!table.overflow.is_empty());
            }
        }
    }

    #[test]
    fn ipv6_hosts_are_found_and_others_miss() {
        let host = |i: u32| {
            let mut addr = [0u8; 16];
            addr[..2].copy_from_slice(&[0xfd, 0x00]);
            addr[12..].copy_from_slice(&i.to_be_bytes());
            addr
        };
        let hosts: Vec<([u8; 16], AddrInfo)> = (0..50_000).map(|i| (host(i), info(i))).collect();
        let table = build::<HostBucketV6>(
            map_entries(75_000, HostBucketV6::ENTRIES),
            hosts.iter().copied(),
        );
        let overflow: std::collections::HashMap<_, _> = table.overflow.iter().copied().collect();
        for (addr, want) in &hosts {
            let found = find(&table.elements, addr).or_else(|| overflow.get(addr).copied());
            assert_eq!(found, Some(*want));
        }
        for i in 50_000..60_000 {
            assert_eq!(find(&table.elements, &host(i)), None);
        }
        assert!(table.overflow.len() * 1000 <= hosts.len());
    }

    #[test]
    fn sizes_round_trip() {
        for capacity in [0, 1, 64, 1000, 150_000, 1_500_000] {
            for per_bucket in [HostBucketV4::ENTRIES, HostBucketV6::ENTRIES] {
                let size = map_entries(capacity, per_bucket);
                assert!((size - 1).is_power_of_two());
                assert!(host_table::capacity_of(size, per_bucket) >= capacity);
            }
        }
    }
}
