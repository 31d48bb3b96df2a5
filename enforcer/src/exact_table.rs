//! The daemon's side of the exact-match tables (`enforcer_common::exact_table`): building a
//! table from a policy's entries, and listing what a table read back from the kernel holds. The
//! kernel's lookup and this side share the layout, the hash and the probe code.
use enforcer_common::exact_table::{self, Bucket, Lookup};

/// Keys and their values.
pub type Entries<B> = Vec<(<B as Bucket>::Key, <B as Bucket>::Value)>;

/// A table ready to be written: element 0 is the header, then the buckets.
pub struct Table<B: Bucket> {
    pub elements: Vec<B>,
    /// Keys that found no free entry in their buckets: they go into the table's fallback map.
    pub overflow: Entries<B>,
}

/// The table of `map_entries` elements (as the loader sized the map, see
/// `exact_table::map_entries`) holding `entries`, placed in their order.
pub fn build<B: Bucket>(
    map_entries: u32,
    entries: impl Iterator<Item = (B::Key, B::Value)>,
) -> Table<B> {
    let mut elements = vec![B::default(); map_entries as usize];
    let used = build_into(&mut elements, entries);
    elements.truncate(used.len);
    Table {
        elements,
        overflow: used.overflow,
    }
}

/// What [`build_into`] did.
pub struct Built<B: Bucket> {
    /// Elements written (header and buckets), from the first.
    pub len: usize,
    pub overflow: Entries<B>,
}

/// Writes the table holding `entries` over `elements` (all of a map's elements, for instance
/// the map itself, mapped into memory), placed in their order.
pub fn build_into<B: Bucket>(
    elements: &mut [B],
    entries: impl Iterator<Item = (B::Key, B::Value)>,
) -> Built<B> {
    // A map sized by another build may have any size: use the largest power of two it holds.
    let count = u32::try_from(elements.len()).unwrap_or(u32::MAX);
    let buckets = prev_power_of_two(count.saturating_sub(1)).max(1);
    let mask = buckets - 1;
    let len = exact_table::index(buckets) as usize;
    let elements = &mut elements[..len];
    elements.fill(B::default());
    elements[0] = B::header(buckets);
    let mut overflow = Vec::new();
    for (key, value) in entries {
        let home = B::hash(&key) & mask;
        let placed = (0..exact_table::MAX_PROBES).any(|probe| {
            let bucket = exact_table::index((home + probe) & mask) as usize;
            elements[bucket].place(&key, value)
        });
        if !placed {
            overflow.push((key, value));
        }
    }
    Built { len, overflow }
}

fn prev_power_of_two(n: u32) -> u32 {
    if n == 0 {
        0
    } else {
        1 << (31 - n.leading_zeros())
    }
}

/// Every key in `elements` (a table as read back, header first), in table order.
pub fn entries<B: Bucket>(elements: &[B]) -> Entries<B> {
    let mut all = Vec::new();
    for bucket in elements.iter().skip(1) {
        bucket.for_each(|key, value| all.push((key, value)));
    }
    all
}

/// `key` in `elements` and, when the table says so, in `overflow`: exactly as the kernel looks
/// for it.
pub fn find<B: Bucket>(
    elements: &[B],
    overflow: &[(B::Key, B::Value)],
    key: &B::Key,
) -> Option<B::Value>
where
    B::Key: PartialEq,
{
    match exact_table::find(key, |i| elements.get(i as usize)) {
        Lookup::Found(value) => Some(value),
        Lookup::Absent => None,
        Lookup::Crowded => overflow
            .iter()
            .find(|(held, _)| held == key)
            .map(|(_, value)| *value),
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use enforcer_common::{
        AddrInfo, HostBucketV4, HostBucketV6, PairBucket, PairKey, PairValue, PortBucket, PortKey,
        PortValue,
        exact_table::{capacity_of, map_entries},
    };

    use super::*;

    /// Builds a table of `capacity` holding `present`, and checks that each key is found with
    /// its value (in the table or its overflow, as the kernel looks), that `absent` keys miss,
    /// and that nothing is lost or held twice. Returns how many keys overflowed.
    fn check<B: Bucket>(capacity: u32, present: &[(B::Key, B::Value)], absent: &[B::Key]) -> usize
    where
        B::Key: PartialEq + Debug,
        B::Value: PartialEq + Debug,
    {
        let size = map_entries(capacity, B::ENTRIES);
        let table = build::<B>(size, present.iter().copied());
        assert_eq!(table.elements.len() as u32, size);
        for (key, value) in present {
            assert_eq!(
                find(&table.elements, &table.overflow, key).as_ref(),
                Some(value),
                "{key:?} lost"
            );
        }
        for key in absent {
            assert_eq!(find(&table.elements, &table.overflow, key), None);
        }
        assert_eq!(
            entries(&table.elements).len() + table.overflow.len(),
            present.len()
        );
        table.overflow.len()
    }

    fn info(i: u32) -> AddrInfo {
        AddrInfo {
            segment: i % 1000 + 1,
            class: i,
        }
    }

    #[test]
    fn ipv4_hosts_are_found_and_others_miss_at_any_fill() {
        let host = |i: u32| (0x0a00_0000u32 + i * 7919).to_be_bytes();
        for (count, capacity) in [
            (100_000u32, 150_000u32),
            (131_072, 131_072),
            (1000, 1500),
            (300, 40),
        ] {
            let present: Vec<_> = (0..count).map(|i| (host(i), info(i))).collect();
            let absent: Vec<_> = (count..count + 10_000).map(host).collect();
            let overflowed = check::<HostBucketV4>(capacity, &present, &absent);
            if capacity >= count {
                // At most half full: a key left for the fallback is rare (57 of 131,072 when
                // exactly half full, none at the daemon's usual fill).
                assert!(
                    overflowed * 1000 <= present.len(),
                    "{overflowed} overflowed"
                );
            } else {
                assert!(overflowed > 0);
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
        let present: Vec<_> = (0..50_000).map(|i| (host(i), info(i))).collect();
        let absent: Vec<_> = (50_000..60_000).map(host).collect();
        let overflowed = check::<HostBucketV6>(75_000, &present, &absent);
        assert!(overflowed * 1000 <= present.len());
        assert!(check::<HostBucketV6>(10, &present[..100], &absent) > 0);
    }

    /// The kernel's IPv6 lookup by words answers as the generic one, crowded tables included.
    #[test]
    fn ipv6_lookups_by_words_answer_as_lookups_by_bytes() {
        let host = |i: u32| {
            let mut addr = [0u8; 16];
            addr[..2].copy_from_slice(&[0xfd, 0x00]);
            addr[4..8].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
            addr[12..].copy_from_slice(&i.to_be_bytes());
            addr
        };
        let words = |addr: &[u8; 16]| {
            [
                u64::from_le_bytes(addr[..8].try_into().unwrap()),
                u64::from_le_bytes(addr[8..].try_into().unwrap()),
            ]
        };
        for (count, capacity) in [(5_000u32, 8_000u32), (300, 40)] {
            let present: Vec<_> = (0..count).map(|i| (host(i), info(i))).collect();
            let table = build::<HostBucketV6>(
                map_entries(capacity, HostBucketV6::ENTRIES),
                present.iter().copied(),
            );
            let element = |i: u32| table.elements.get(i as usize);
            let (mut found, mut crowded) = (0, 0);
            for i in 0..count + 2_000 {
                let addr = host(i);
                let by_bytes = enforcer_common::exact_table::find(&addr, element);
                let by_words = enforcer_common::exact_table::find_v6(words(&addr), element);
                use enforcer_common::exact_table::Lookup;
                match (by_bytes, by_words) {
                    (Lookup::Found(a), Lookup::Found(b)) => {
                        assert_eq!(a, b);
                        found += 1;
                    }
                    (Lookup::Absent, Lookup::Absent) => {}
                    (Lookup::Crowded, Lookup::Crowded) => crowded += 1,
                    _ => panic!("{addr:?}: the two lookups differ"),
                }
            }
            assert!(found > 0);
            if capacity < count {
                assert!(crowded > 0, "an overfull table was never crowded");
            }
        }
    }

    #[test]
    fn pairs_and_ports_are_found_and_others_miss() {
        let pair = |i: u32| PairKey {
            dst_segment: i % 997,
            src_class: i / 997,
        };
        let table = |i: u32| PairValue {
            port_table: i,
            has_ranges: i & 1,
        };
        let present: Vec<_> = (0..100_000).map(|i| (pair(i), table(i))).collect();
        let absent: Vec<_> = (100_000..110_000).map(pair).collect();
        assert!(check::<PairBucket>(150_000, &present, &absent) * 1000 <= present.len());
        assert!(check::<PairBucket>(100, &present[..1000], &absent) > 0);

        let port = |i: u32| PortKey::new(i / 300, [6, 17, 1][(i % 3) as usize], (i % 100) as u16);
        let rule = |i: u32| PortValue { rule: i };
        let present: Vec<_> = (0..170_000).map(|i| (port(i), rule(i))).collect();
        let absent: Vec<_> = (0..10_000)
            .map(|i| PortKey::new(i, 6, 40_000 + i as u16))
            .collect();
        assert!(check::<PortBucket>(255_000, &present, &absent) * 1000 <= present.len());
    }

    #[test]
    fn sizes_round_trip() {
        for capacity in [0, 1, 64, 1000, 150_000, 1_500_000] {
            for per_bucket in [
                HostBucketV4::ENTRIES,
                HostBucketV6::ENTRIES,
                PairBucket::ENTRIES,
                PortBucket::ENTRIES,
            ] {
                let size = map_entries(capacity, per_bucket);
                assert!((size - 1).is_power_of_two());
                assert!(capacity_of(size, per_bucket) >= capacity);
            }
        }
    }

    #[test]
    fn buckets_are_one_cache_line() {
        assert_eq!(size_of::<HostBucketV4>(), 64);
        assert_eq!(size_of::<HostBucketV6>(), 64);
        assert_eq!(size_of::<PairBucket>(), 64);
        assert_eq!(size_of::<PortBucket>(), 64);
    }
}
