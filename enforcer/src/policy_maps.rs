//! Writing a compiled policy into one slot of the kernel's policy maps, and switching the slot
//! that judges packets. A reload writes the inactive slot while the active one keeps judging,
//! then flips [`map_names::ACTIVE`] with one write: every packet is judged entirely by the old
//! or entirely by the new policy.
use std::{collections::BTreeMap, os::fd::AsFd as _};

use aya::{
    Ebpf, Pod,
    maps::{
        Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray, lpm_trie::Key,
        lpm_trie::LpmTrie,
    },
};

use enforcer_common::{
    AddrInfo, BreakglassKey, BreakglassValue, Config, HOST_PREFIX_V4, HOST_PREFIX_V6, HostBucketV4,
    HostBucketV6, PORT_EXACT_PREFIX, PairBucket, PairKey, PairValue, PortBucket, PortKey,
    PortValue, SegmentInfo, exact_table::Bucket, lookup_flags, map_names,
};
use policy_compiler::{Artifact, artifact::PrefixBlocks};

use crate::{exact_table, mapped::Mapped};

#[derive(Debug, thiserror::Error)]
pub enum PolicyMapError {
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("`{0}` is not a policy map")]
    NotAPolicyMap(&'static str),
    #[error(
        "the settings say the IPv{0} host table holds the policy's subnets, which cannot be put there"
    )]
    SubnetsNotExpandable(u8),
    #[error(
        "the settings say the IPv{family} block table holds blocks of /{in_settings}, but the \
         policy's subnets make blocks of {policy}"
    )]
    BlocksDiffer {
        family: u8,
        in_settings: u8,
        policy: String,
    },
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map `{map}`: mapping it into memory: {source}")]
    Mapping {
        map: &'static str,
        #[source]
        source: std::io::Error,
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
        Map::LpmTrie(data) | Map::HashMap(data) | Map::Array(data) => data,
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

/// The entries of `entries` (prefix length, key, value) with every key bit fixed (`full`):
/// what the kernel keeps in an exact-match hash rather than in the trie.
fn exact<K, V>(
    entries: impl Iterator<Item = (u32, K, V)>,
    full: u32,
) -> impl Iterator<Item = (K, V)> {
    entries.filter_map(move |(prefix_len, key, value)| (prefix_len == full).then_some((key, value)))
}

/// The entries of `entries` with fewer than `full` fixed bits: what the trie keeps.
fn shorter<K, V>(
    entries: impl Iterator<Item = (u32, K, V)>,
    full: u32,
) -> impl Iterator<Item = (u32, K, V)> {
    entries.filter(move |(prefix_len, _, _)| *prefix_len < full)
}

/// A policy's address entries (prefix length, key, value) as a slot's host tables and tries
/// hold them ([`address_entries`]): the full-length ones in the table, the rest in the trie.
pub struct AddressEntries {
    pub v4: Vec<(u32, [u8; 4], AddrInfo)>,
    pub v6: Vec<(u32, [u8; 16], AddrInfo)>,
    /// The block tables' entries (first address, value); empty where the settings use none.
    pub blocks_v4: Vec<([u8; 4], AddrInfo)>,
    pub blocks_v6: Vec<([u8; 16], AddrInfo)>,
}

impl AddressEntries {
    /// Entries of the IPv4 and the IPv6 host table.
    pub fn in_host_tables(&self) -> (usize, usize) {
        (
            self.v4.iter().filter(|e| e.0 == HOST_PREFIX_V4).count(),
            self.v6.iter().filter(|e| e.0 == HOST_PREFIX_V6).count(),
        )
    }
}

/// The address entries of `artifact` as the host tables, block tables and tries of a slot with
/// `config` hold them: the artifact's; for a family whose prefix bit `config` clears or whose
/// subnets-in-hosts bit it sets, every address of its subnets at most 8 bits shorter than a
/// host as a host (see `Artifact::subnet_addresses_v4`); and the blocks of its block table
/// where `config` uses one (see `Artifact::prefix_blocks_v4`).
pub fn address_entries(
    artifact: &Artifact,
    config: &Config,
) -> Result<AddressEntries, PolicyMapError> {
    let in_hosts = |prefixes: u8, subnets_in_hosts: u8| {
        config.lookup_flags & prefixes == 0 || config.lookup_flags & subnets_in_hosts != 0
    };
    let v4_in_hosts = in_hosts(lookup_flags::V4_PREFIXES, lookup_flags::V4_SUBNETS_IN_HOSTS);
    let v6_in_hosts = in_hosts(lookup_flags::V6_PREFIXES, lookup_flags::V6_SUBNETS_IN_HOSTS);
    let v4 = with_subnet_addresses(
        artifact.addr_v4_entries().collect(),
        HOST_PREFIX_V4,
        v4_in_hosts,
        || artifact.subnet_addresses_v4(),
    )
    .ok_or(PolicyMapError::SubnetsNotExpandable(4))?;
    let v6 = with_subnet_addresses(
        artifact.addr_v6_entries().collect(),
        HOST_PREFIX_V6,
        v6_in_hosts,
        || artifact.subnet_addresses_v6(),
    )
    .ok_or(PolicyMapError::SubnetsNotExpandable(6))?;
    Ok(AddressEntries {
        v4,
        v6,
        blocks_v4: blocks_in_use(4, config.block_len_v4, || {
            artifact.prefix_blocks_v4(v4_in_hosts)
        })?,
        blocks_v6: blocks_in_use(6, config.block_len_v6, || {
            artifact.prefix_blocks_v6(v6_in_hosts)
        })?,
    })
}

/// The blocks of a family whose block table the settings use with blocks of `len` (none when
/// `len` is 0); an error when the policy's blocks are not of that length.
fn blocks_in_use<K>(
    family: u8,
    len: u8,
    blocks: impl FnOnce() -> Option<PrefixBlocks<K>>,
) -> Result<Vec<(K, AddrInfo)>, PolicyMapError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    match blocks() {
        Some(blocks) if blocks.len == u32::from(len) => Ok(blocks.blocks),
        other => Err(PolicyMapError::BlocksDiffer {
            family,
            in_settings: len,
            policy: other.map_or("none".to_string(), |b| format!("/{}", b.len)),
        }),
    }
}

/// `entries` with the subnets' addresses added as hosts when `expanded` and there are subnets;
/// `None` when they cannot be.
fn with_subnet_addresses<K>(
    mut entries: Vec<(u32, K, AddrInfo)>,
    full: u32,
    expanded: bool,
    addresses: impl FnOnce() -> Option<Vec<(K, AddrInfo)>>,
) -> Option<Vec<(u32, K, AddrInfo)>> {
    if expanded && entries.iter().any(|(len, _, _)| *len < full) {
        let addresses = addresses()?;
        entries.extend(addresses.into_iter().map(|(key, info)| (full, key, info)));
    }
    Some(entries)
}

/// Entries per `BPF_MAP_UPDATE_BATCH` call: large enough that the syscall cost vanishes, small
/// enough that the kernel's copy of one batch stays modest.
const BATCH_ENTRIES: usize = 8192;

/// `union bpf_attr` as the `BPF_MAP_*_BATCH` commands read it (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Writes `keys[i] -> values[i]` into the hash map `fd` (`BPF_MAP_UPDATE_BATCH`), or with
/// `values` `None` deletes `keys` (`BPF_MAP_DELETE_BATCH`), one syscall per [`BATCH_ENTRIES`]
/// (Linux 5.6): a reload of a large policy writes hundreds of thousands of entries, and one
/// syscall each was most of its time. `Err` with the number of entries done when the kernel
/// refuses.
fn batch<K: Pod, V: Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: Option<&[V]>,
) -> Result<(), (usize, std::io::Error)> {
    use std::os::fd::AsRawFd as _;
    let mut done = 0;
    for (index, keys) in keys.chunks(BATCH_ENTRIES).enumerate() {
        let values = values.map(|values| &values[index * BATCH_ENTRIES..][..keys.len()]);
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.map_or(0, |values| values.as_ptr() as u64),
            count: keys.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let command = if values.is_some() {
            BPF_MAP_UPDATE_BATCH
        } else {
            BPF_MAP_DELETE_BATCH
        };
        // SAFETY: `attr` points at `count` keys (and values) of the map's key and value sizes
        // (the `Pod` types the map was opened with), alive for the call.
        if let Err(error) = unsafe { batch_syscall(command, &mut attr) } {
            return Err((done + attr.count as usize, error));
        }
        done += keys.len();
    }
    Ok(())
}

/// One `BPF_MAP_*_BATCH` command; the kernel writes the entries it did back into `attr.count`.
///
/// # Safety
/// `attr`'s buffers must be valid for its `count` entries of the map's key and value sizes.
unsafe fn batch_syscall(command: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: the caller vouches for the buffers; `attr` itself is a valid `bpf_attr` prefix.
    unsafe { crate::bpf_syscall::bpf(command, attr) }.map(|_| ())
}

/// Empties the hash map `fd` with `BPF_MAP_LOOKUP_AND_DELETE_BATCH`, up to [`BATCH_ENTRIES`]
/// per syscall (Linux 5.6), and discards what it reads: listing the keys of a large slot one
/// `BPF_MAP_GET_NEXT_KEY` syscall at a time took about half of emptying it. `Err` when the
/// kernel refuses part way; what is left is still in the map. Only for plain (not per-CPU)
/// hashes, whose values are `V` as is: `HashMap::try_from` in the caller refuses the others.
fn drain<K: Pod, V: Pod>(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), std::io::Error> {
    let (key_size, value_size) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    walk_batches(
        fd,
        BPF_MAP_LOOKUP_AND_DELETE_BATCH,
        key_size,
        value_size,
        |_, _| {},
    )
    .map(|_| ())
}

/// Calls `each` with every key of the hash map `fd` (plain, not per-CPU, values `V`), listed
/// with `BPF_MAP_LOOKUP_BATCH`, up to [`BATCH_ENTRIES`] per syscall (Linux 5.6); returns how
/// many. A key present for the whole listing is listed; one inserted or removed meanwhile may
/// or may not be. `Err` when the kernel refuses.
pub(crate) fn for_each_key<K: Pod, V: Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    mut each: impl FnMut(&K),
) -> Result<usize, std::io::Error> {
    let (key_size, value_size) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    walk_batches(fd, BPF_MAP_LOOKUP_BATCH, key_size, value_size, |key, _| {
        // SAFETY: `key` holds `K`'s size of bytes the kernel wrote; `Pod` takes any bytes.
        each(&unsafe { key.as_ptr().cast::<K>().read_unaligned() })
    })
}

/// Calls `each` with the bytes of every key and value of map `fd`, listed with
/// `BPF_MAP_LOOKUP_BATCH` (Linux 5.6), up to [`BATCH_ENTRIES`] per syscall; returns how many.
/// A per-CPU map's value is every possible CPU's copy, each rounded up to 8 bytes.
pub(crate) fn for_each_entry(
    fd: std::os::fd::BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    each: impl FnMut(&[u8], &[u8]),
) -> Result<usize, std::io::Error> {
    walk_batches(fd, BPF_MAP_LOOKUP_BATCH, key_size, value_size, each)
}

/// Walks map `fd` with the batch lookup `command` (`BPF_MAP_LOOKUP_BATCH`, or
/// `BPF_MAP_LOOKUP_AND_DELETE_BATCH`, which also removes what it reads), up to [`BATCH_ENTRIES`]
/// per syscall, calling `each` with the bytes of every key and value read; returns how many.
fn walk_batches(
    fd: std::os::fd::BorrowedFd<'_>,
    command: libc::c_long,
    key_size: usize,
    value_size: usize,
    mut each: impl FnMut(&[u8], &[u8]),
) -> Result<usize, std::io::Error> {
    use std::os::fd::AsRawFd as _;
    // A per-CPU map's entries are large on a large machine: at most about 1 MiB per batch.
    let batch = BATCH_ENTRIES
        .min((1 << 20) / (key_size + value_size).max(1))
        .max(1);
    let mut keys = vec![0u8; key_size * batch];
    let mut values = vec![0u8; value_size * batch];
    // The kernel's position in the map (a bucket index for a hash, the last key for an array),
    // opaque here; room for either.
    let (mut position, mut next) = (0u64, 0u64);
    let mut first = true;
    let mut read = 0;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &position as *const u64 as u64
            },
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at room for `count` keys and values of the sizes the caller
        // gives for the map, and at two 8-byte positions, alive for the call.
        let result = unsafe { batch_syscall(command, &mut attr) };
        // ENOENT: the end of the table; this call's entries were still read.
        let end = match result {
            Ok(()) => false,
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => true,
            Err(error) => return Err(error),
        };
        let count = (attr.count as usize).min(batch);
        for index in 0..count {
            each(
                &keys[index * key_size..][..key_size],
                &values[index * value_size..][..value_size],
            );
        }
        read += count;
        if end {
            return Ok(read);
        }
        if count == 0 {
            return Err(std::io::Error::other("no entries read and not at the end"));
        }
        position = next;
        first = false;
    }
}

/// Entries a batch operation did, or the error to report: a kernel without batch operations
/// for the map leaves the rest to one syscall per entry.
fn batch_done(
    name: &'static str,
    call: &'static str,
    result: Result<(), (usize, std::io::Error)>,
    all: usize,
) -> Result<usize, PolicyMapError> {
    match result {
        Ok(()) => Ok(all),
        Err((done, error))
            if matches!(
                error.raw_os_error(),
                Some(libc::EINVAL | libc::ENOTSUP | 524)
            ) =>
        {
            Ok(done)
        }
        Err((_, io_error)) => Err(PolicyMapError::Map {
            map: name,
            source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
        }),
    }
}

fn fill_hash<K: aya::Pod, V: aya::Pod>(
    map: Map,
    name: &'static str,
    entries: impl Iterator<Item = (K, V)>,
) -> Result<(), PolicyMapError> {
    let mut hash: HashMap<MapData, K, V> = HashMap::try_from(map).map_err(map_err(name))?;
    let (keys, values): (Vec<K>, Vec<V>) = entries.unzip();
    let result = batch(hash.map().fd().as_fd(), &keys, Some(&values));
    let written = batch_done(name, "bpf_map_update_batch", result, keys.len())?;
    for (key, value) in keys.iter().zip(&values).skip(written) {
        hash.insert(key, value, 0).map_err(map_err(name))?;
    }
    Ok(())
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
    if let Err(error) = drain::<K, V>(hash.map().fd().as_fd()) {
        tracing::debug!(map = name, %error, "batch drain refused; deleting by key");
    }
    // Normally nothing is left; what is (an older kernel, a refusal) is listed and deleted.
    let keys: Vec<K> = hash.keys().filter_map(Result::ok).collect();
    let result = batch::<K, V>(hash.map().fd().as_fd(), &keys, None);
    let deleted = batch_done(name, "bpf_map_delete_batch", result, keys.len())?;
    for key in keys.iter().skip(deleted) {
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

/// Empties the policy maps of `slot` (which must not be the active one). The exact-match
/// tables are arrays, allocated whole up front: they are not emptied, as the next write
/// replaces every element and nothing reads them before.
pub fn clear(ebpf: &mut Ebpf, slot: usize) -> Result<(), PolicyMapError> {
    let (v4, v6) = (map_names::ADDR_V4[slot], map_names::ADDR_V6[slot]);
    let (ports, overflow) = (map_names::PORTS[slot], map_names::PAIRS_OVERFLOW[slot]);
    let (v4_map, v6_map) = (own_handle(ebpf, v4)?, own_handle(ebpf, v6)?);
    let (ports_map, overflow_map) = (own_handle(ebpf, ports)?, own_handle(ebpf, overflow)?);
    in_parallel(vec![
        Box::new(move || {
            clear_trie::<[u8; 4], AddrInfo>(v4_map, v4)?;
            clear_trie::<[u8; 16], AddrInfo>(v6_map, v6)
        }),
        Box::new(move || {
            clear_trie::<PortKey, PortValue>(ports_map, ports)?;
            clear_hash::<PairKey, PairValue>(overflow_map, overflow)
        }),
    ])?;
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
    // The flag first: a program that finds a grant must also have looked for it.
    if !entries.is_empty() {
        set_breakglass_in_use(ebpf, slot, true)?;
    }
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
    // Cleared only once the map is seen empty.
    if map.keys().next().is_none() {
        set_breakglass_in_use(ebpf, slot, false)?;
    }
    Ok(())
}

/// Says whether the kernel must look up grants in slot `slot`'s break-glass map.
fn set_breakglass_in_use(ebpf: &mut Ebpf, slot: usize, in_use: bool) -> Result<(), PolicyMapError> {
    let name = map_names::BREAKGLASS_IN_USE;
    let mut flags: Array<_, u32> = Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    flags
        .set(slot as u32, u32::from(in_use), 0)
        .map_err(map_err(name))
}

/// Sets both slots' break-glass flags from what their maps hold: for maps another daemon
/// pinned, possibly before the flags existed.
pub fn sync_breakglass_in_use(ebpf: &mut Ebpf) -> Result<(), PolicyMapError> {
    for (slot, name) in map_names::BREAKGLASS.into_iter().enumerate() {
        let map: HashMap<_, BreakglassKey, BreakglassValue> =
            HashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        let in_use = map.keys().next().is_some();
        set_breakglass_in_use(ebpf, slot, in_use)?;
    }
    Ok(())
}

/// Writes `artifact` into the policy maps of `slot` (which must not be the active one) and its
/// settings into `CONFIG[slot]`; `addresses` are its address entries under `config`
/// ([`address_entries`]).
pub fn write(
    ebpf: &mut Ebpf,
    slot: usize,
    artifact: &Artifact,
    config: &Config,
    addresses: &AddressEntries,
) -> Result<(), PolicyMapError> {
    clear(ebpf, slot)?;
    // Host addresses, pairs and single ports hold nearly all entries of a large policy: one
    // thread each shortens the time a reload takes to go live. A table's overflow goes into its
    // fallback map (see `enforcer_common::exact_table`).
    let (hosts_v4, hosts_v6, v4, v6) = (
        map_names::HOSTS_V4[slot],
        map_names::HOSTS_V6[slot],
        map_names::ADDR_V4[slot],
        map_names::ADDR_V6[slot],
    );
    let (ports_exact, ports) = (map_names::PORTS_EXACT[slot], map_names::PORTS[slot]);
    let (pairs, pairs_overflow) = (map_names::PAIRS[slot], map_names::PAIRS_OVERFLOW[slot]);
    let (hosts_v4_map, hosts_v6_map) = (own_handle(ebpf, hosts_v4)?, own_handle(ebpf, hosts_v6)?);
    let (blocks_v4, blocks_v6) = (map_names::BLOCKS_V4[slot], map_names::BLOCKS_V6[slot]);
    let (blocks_v4_map, blocks_v6_map) =
        (own_handle(ebpf, blocks_v4)?, own_handle(ebpf, blocks_v6)?);
    let (v4_map, v6_map) = (own_handle(ebpf, v4)?, own_handle(ebpf, v6)?);
    let (ports_exact_map, ports_map) = (own_handle(ebpf, ports_exact)?, own_handle(ebpf, ports)?);
    let (pairs_map, overflow_map) = (own_handle(ebpf, pairs)?, own_handle(ebpf, pairs_overflow)?);
    in_parallel(vec![
        Box::new(move || {
            let left = fill_table::<PairBucket>(pairs_map, pairs, artifact.pair_entries())?;
            fill_hash(overflow_map, pairs_overflow, left.into_iter())
        }),
        Box::new(move || {
            fill_table_and_trie::<PortBucket, _>(
                (ports_exact_map, ports_exact),
                (ports_map, ports),
                PORT_EXACT_PREFIX,
                || artifact.port_entries(),
            )
        }),
        Box::new(move || {
            fill_blocks::<HostBucketV4>(blocks_v4_map, blocks_v4, &addresses.blocks_v4)?;
            fill_blocks::<HostBucketV6>(blocks_v6_map, blocks_v6, &addresses.blocks_v6)
        }),
        Box::new(move || {
            fill_table_and_trie::<HostBucketV4, _>(
                (hosts_v4_map, hosts_v4),
                (v4_map, v4),
                HOST_PREFIX_V4,
                || addresses.v4.iter().copied(),
            )?;
            fill_table_and_trie::<HostBucketV6, _>(
                (hosts_v6_map, hosts_v6),
                (v6_map, v6),
                HOST_PREFIX_V6,
                || addresses.v6.iter().copied(),
            )
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

/// Writes a block table that is in use (`blocks` not empty; an unused one is never read). A
/// block the table has no room for is found in the trie, which holds every subnet.
fn fill_blocks<B: Bucket + Pod>(
    map: Map,
    name: &'static str,
    blocks: &[(B::Key, B::Value)],
) -> Result<(), PolicyMapError>
where
    B::Key: Copy,
    B::Value: Copy,
{
    if !blocks.is_empty() {
        fill_table::<B>(map, name, blocks.iter().copied())?;
    }
    Ok(())
}

/// Writes the full-length keys of `entries` (a trie's worth, every prefix length) into a
/// table, and the shorter ones with those the table had no room for into its fallback trie.
/// Each map comes with its name.
fn fill_table_and_trie<B, I>(
    (table_map, table): (Map, &'static str),
    (trie_map, trie): (Map, &'static str),
    full: u32,
    entries: impl Fn() -> I,
) -> Result<(), PolicyMapError>
where
    B: Bucket + Pod,
    B::Key: Pod,
    B::Value: Pod,
    I: Iterator<Item = (u32, B::Key, B::Value)>,
{
    let left = fill_table::<B>(table_map, table, exact(entries(), full))?;
    fill_trie(
        trie_map,
        trie,
        shorter(entries(), full).chain(as_prefixes(left, full)),
    )
}

/// Keys a table had no room for, as full-length trie entries.
fn as_prefixes<K, V>(left: Vec<(K, V)>, prefix_len: u32) -> impl Iterator<Item = (u32, K, V)> {
    left.into_iter()
        .map(move |(key, value)| (prefix_len, key, value))
}

/// The elements (header first) of table `map`: as many as it has.
fn map_entries(map: &MapData, name: &'static str) -> Result<u32, PolicyMapError> {
    map.info()
        .map(|info| info.max_entries())
        .map_err(map_err(name))
}

/// Writes the table of `entries` into `map` (which no program reads: an inactive slot, or a
/// copy not yet in use), in place through a mapping of it; returns the keys it had no room for,
/// which belong in its fallback map.
fn fill_table<B: Bucket + Pod>(
    map: Map,
    name: &'static str,
    entries: impl Iterator<Item = (B::Key, B::Value)>,
) -> Result<exact_table::Entries<B>, PolicyMapError> {
    let array: Array<MapData, B> = Array::try_from(map).map_err(map_err(name))?;
    let count = map_entries(array.map(), name)? as usize;
    let mut mapped = Mapped::map(
        array.map().fd().as_fd(),
        0,
        count * std::mem::size_of::<B>(),
    )
    .map_err(|source| PolicyMapError::Mapping { map: name, source })?;
    // SAFETY: this is the only mapping of the array, and no program reads it (see above).
    let elements = unsafe { mapped.elements_mut::<B>(count) };
    let built = exact_table::build_into(elements, entries);
    // Before the switch of slots that makes programs read it.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(built.overflow)
}

/// Every element of the array `map`, read through a mapping of it.
fn read_elements<B: Pod>(map: &Map, name: &'static str) -> Result<Vec<B>, PolicyMapError> {
    let array: Array<_, B> = Array::try_from(map).map_err(map_err(name))?;
    let count = array.len() as usize;
    let mapped = Mapped::map(
        array.map().fd().as_fd(),
        0,
        count * std::mem::size_of::<B>(),
    )
    .map_err(|source| PolicyMapError::Mapping { map: name, source })?;
    Ok(mapped.read(count))
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

/// The slot that judges packets, as the maps say (a daemon adopting pinned maps reads it back).
pub fn read_active(ebpf: &Ebpf) -> Result<usize, PolicyMapError> {
    let name = map_names::ACTIVE;
    let map = ebpf.map(name).ok_or(PolicyMapError::MissingMap(name))?;
    let active: Array<_, u32> = Array::try_from(map).map_err(map_err(name))?;
    let slot = active.get(&0, 0).map_err(map_err(name))?;
    Ok(usize::from(slot == 1))
}

/// `CONFIG[slot]`: the settings and generation of the policy in `slot`.
pub fn read_config(ebpf: &Ebpf, slot: usize) -> Result<Config, PolicyMapError> {
    let name = map_names::CONFIG;
    let map = ebpf.map(name).ok_or(PolicyMapError::MissingMap(name))?;
    let array: Array<_, Config> = Array::try_from(map).map_err(map_err(name))?;
    array.get(&(slot as u32), 0).map_err(map_err(name))
}

fn trie_entries<K: Pod + Ord, V: Pod>(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<BTreeMap<(u32, K), V>, PolicyMapError> {
    let map = ebpf.map(name).ok_or(PolicyMapError::MissingMap(name))?;
    let trie: LpmTrie<_, K, V> = LpmTrie::try_from(map).map_err(map_err(name))?;
    trie.iter()
        .map(|entry| {
            entry
                .map(|(key, value)| ((key.prefix_len(), key.data()), value))
                .map_err(map_err(name))
        })
        .collect()
}

fn expected<K: Ord, V>(entries: impl Iterator<Item = (u32, K, V)>) -> BTreeMap<(u32, K), V> {
    entries
        .map(|(prefix_len, key, value)| ((prefix_len, key), value))
        .collect()
}

fn hash_entries<K: Pod + Ord, V: Pod>(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<BTreeMap<K, V>, PolicyMapError> {
    let map = ebpf.map(name).ok_or(PolicyMapError::MissingMap(name))?;
    let hash: HashMap<_, K, V> = HashMap::try_from(map).map_err(map_err(name))?;
    hash.iter()
        .map(|entry| entry.map_err(map_err(name)))
        .collect()
}

/// Whether the policy maps of `slot` hold exactly `artifact` (a restarted daemon whose policy
/// did not change keeps the slot, its generation and the flows judged under it).
pub fn slot_holds(ebpf: &Ebpf, slot: usize, artifact: &Artifact) -> Result<bool, PolicyMapError> {
    // As written with the slot's own settings (which say whether subnets are in the tables).
    let Ok(AddressEntries {
        v4,
        v6,
        blocks_v4,
        blocks_v6,
    }) = address_entries(artifact, &read_config(ebpf, slot)?)
    else {
        return Ok(false);
    };
    if !blocks_hold::<HostBucketV4>(ebpf, map_names::BLOCKS_V4[slot], blocks_v4)?
        || !blocks_hold::<HostBucketV6>(ebpf, map_names::BLOCKS_V6[slot], blocks_v6)?
    {
        return Ok(false);
    }
    let ports: Vec<_> = artifact.port_entries().collect();
    let (held_pairs, want_pairs) =
        table_of::<PairBucket>(ebpf, map_names::PAIRS[slot], artifact.pair_entries())?;
    if !table_and_trie_hold::<HostBucketV4>(
        ebpf,
        map_names::HOSTS_V4[slot],
        map_names::ADDR_V4[slot],
        HOST_PREFIX_V4,
        &v4,
    )? || !table_and_trie_hold::<HostBucketV6>(
        ebpf,
        map_names::HOSTS_V6[slot],
        map_names::ADDR_V6[slot],
        HOST_PREFIX_V6,
        &v6,
    )? || !table_and_trie_hold::<PortBucket>(
        ebpf,
        map_names::PORTS_EXACT[slot],
        map_names::PORTS[slot],
        PORT_EXACT_PREFIX,
        &ports,
    )? || !held_pairs.starts_with(&want_pairs.elements)
    {
        return Ok(false);
    }
    let pair = |(key, value): (PairKey, PairValue)| (key, (value.port_table, value.has_ranges));
    let held: BTreeMap<PairKey, (u32, u32)> =
        hash_entries::<PairKey, PairValue>(ebpf, map_names::PAIRS_OVERFLOW[slot])?
            .into_iter()
            .map(pair)
            .collect();
    let wanted: BTreeMap<PairKey, (u32, u32)> = want_pairs.overflow.into_iter().map(pair).collect();
    if held != wanted {
        return Ok(false);
    }
    // Entries past the policy's segments are never read (no address maps to them).
    let name = map_names::SEGMENTS[slot];
    let map = ebpf.map(name).ok_or(PolicyMapError::MissingMap(name))?;
    let segments: Array<_, SegmentInfo> = Array::try_from(map).map_err(map_err(name))?;
    for (id, info) in artifact.segment_infos().into_iter().enumerate() {
        let id = u32::try_from(id).unwrap_or(u32::MAX);
        match segments.get(&id, 0) {
            Ok(held) if held == info => {}
            Ok(_) | Err(MapError::OutOfBounds { .. }) => return Ok(false),
            Err(source) => return Err(PolicyMapError::Map { map: name, source }),
        }
    }
    Ok(true)
}

/// Whether table `table` holds the full-length keys of `entries` (a trie's worth, every prefix
/// length), and its fallback trie `trie` the shorter ones and those the table had no room for.
fn table_and_trie_hold<B>(
    ebpf: &Ebpf,
    table: &'static str,
    trie: &'static str,
    full: u32,
    entries: &[(u32, B::Key, B::Value)],
) -> Result<bool, PolicyMapError>
where
    B: Bucket + Pod + PartialEq,
    B::Key: Pod + Ord,
    B::Value: Pod + PartialEq,
{
    let (held, want) = table_of::<B>(ebpf, table, exact(entries.iter().copied(), full))?;
    Ok(held.starts_with(&want.elements)
        && trie_entries::<B::Key, B::Value>(ebpf, trie)?
            == expected(
                shorter(entries.iter().copied(), full).chain(as_prefixes(want.overflow, full)),
            ))
}

/// Whether block table `name` holds `blocks`, as far as it had room for them (the trie has the
/// rest); a table not in use (no blocks) is never read.
fn blocks_hold<B>(
    ebpf: &Ebpf,
    name: &'static str,
    blocks: Vec<(B::Key, B::Value)>,
) -> Result<bool, PolicyMapError>
where
    B: Bucket + Pod + PartialEq,
{
    if blocks.is_empty() {
        return Ok(true);
    }
    let (held, want) = table_of::<B>(ebpf, name, blocks.into_iter())?;
    Ok(held.starts_with(&want.elements))
}

/// The table `name` holds, and the one `entries` make at its size.
fn table_of<B: Bucket + Pod>(
    ebpf: &Ebpf,
    name: &'static str,
    entries: impl Iterator<Item = (B::Key, B::Value)>,
) -> Result<(Vec<B>, exact_table::Table<B>), PolicyMapError> {
    let map = ebpf.map(name).ok_or(PolicyMapError::MissingMap(name))?;
    let held = read_elements::<B>(map, name)?;
    let want = exact_table::build::<B>(held.len() as u32, entries);
    Ok((held, want))
}

/// Entries per bucket when `name` is one of a slot's exact-match tables (see
/// `enforcer_common::exact_table`).
pub fn entries_per_bucket(name: &str) -> Option<u32> {
    if map_names::HOSTS_V4.contains(&name) || map_names::BLOCKS_V4.contains(&name) {
        Some(HostBucketV4::ENTRIES)
    } else if map_names::HOSTS_V6.contains(&name) || map_names::BLOCKS_V6.contains(&name) {
        Some(HostBucketV6::ENTRIES)
    } else if map_names::PAIRS.contains(&name) {
        Some(PairBucket::ENTRIES)
    } else if map_names::PORTS_EXACT.contains(&name) {
        Some(PortBucket::ENTRIES)
    } else {
        None
    }
}

/// Whether `name` is one of a slot's exact-match tables.
pub fn is_exact_table(name: &str) -> bool {
    entries_per_bucket(name).is_some()
}

/// Whether `name` is one of a slot's block tables.
pub fn is_block_table(name: &str) -> bool {
    map_names::BLOCKS_V4.contains(&name) || map_names::BLOCKS_V6.contains(&name)
}

/// Fills the exact-match table `name` of `ebpf`, larger than the pinned one it replaces
/// (`from`), with the keys `from` held and the keys its fallback map holds, rebuilt at the new
/// size; keys it has no room for go into the fallback map. Run once the fallback maps are in
/// place (copied first when they were resized too): a key that was crowded out of the old
/// table would otherwise be missed by the new one, which is not crowded where the old one was.
pub fn copy_exact_table(
    ebpf: &mut Ebpf,
    name: &'static str,
    from: MapData,
) -> Result<(), PolicyMapError> {
    let from = Map::from_map_data(from).map_err(map_err(name))?;
    let slot = [
        map_names::HOSTS_V4,
        map_names::HOSTS_V6,
        map_names::PAIRS,
        map_names::PORTS_EXACT,
    ]
    .iter()
    .find_map(|names| names.iter().position(|n| *n == name))
    .ok_or(PolicyMapError::NotAPolicyMap(name))?;
    if map_names::HOSTS_V4.contains(&name) {
        refill_over_trie::<HostBucketV4>(
            ebpf,
            name,
            &from,
            map_names::ADDR_V4[slot],
            HOST_PREFIX_V4,
        )
    } else if map_names::HOSTS_V6.contains(&name) {
        refill_over_trie::<HostBucketV6>(
            ebpf,
            name,
            &from,
            map_names::ADDR_V6[slot],
            HOST_PREFIX_V6,
        )
    } else if map_names::PORTS_EXACT.contains(&name) {
        refill_over_trie::<PortBucket>(ebpf, name, &from, map_names::PORTS[slot], PORT_EXACT_PREFIX)
    } else if map_names::PAIRS.contains(&name) {
        let overflow = map_names::PAIRS_OVERFLOW[slot];
        let crowded = hash_entries::<PairKey, PairValue>(ebpf, overflow)?
            .into_iter()
            .collect();
        let left = refill::<PairBucket>(ebpf, name, &from, crowded)?;
        fill_hash(own_handle(ebpf, overflow)?, overflow, left.into_iter())
    } else {
        Err(PolicyMapError::NotAPolicyMap(name))
    }
}

/// [`refill`] for a table whose fallback is trie `trie`, holding its keys at length `full`.
fn refill_over_trie<B>(
    ebpf: &mut Ebpf,
    name: &'static str,
    from: &Map,
    trie: &'static str,
    full: u32,
) -> Result<(), PolicyMapError>
where
    B: Bucket + Pod,
    B::Key: Pod + Ord,
    B::Value: Pod,
{
    let crowded = full_length::<B::Key, B::Value>(ebpf, trie, full)?;
    let left = refill::<B>(ebpf, name, from, crowded)?;
    fill_trie(own_handle(ebpf, trie)?, trie, as_prefixes(left, full))
}

/// The entries of trie `name` with every key bit fixed.
fn full_length<K: Pod + Ord, V: Pod>(
    ebpf: &Ebpf,
    name: &'static str,
    full: u32,
) -> Result<Vec<(K, V)>, PolicyMapError> {
    Ok(trie_entries::<K, V>(ebpf, name)?
        .into_iter()
        .filter(|((prefix_len, _), _)| *prefix_len == full)
        .map(|((_, key), value)| (key, value))
        .collect())
}

/// Writes table `name` of `ebpf` with the keys of `from` and `crowded`; returns those it had no
/// room for.
fn refill<B: Bucket + Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    from: &Map,
    crowded: exact_table::Entries<B>,
) -> Result<exact_table::Entries<B>, PolicyMapError> {
    let held = read_elements::<B>(from, name)?;
    let entries = exact_table::entries(&held).into_iter().chain(crowded);
    fill_table::<B>(own_handle(ebpf, name)?, name, entries)
}

fn copy_trie<K: Pod, V: Pod>(
    name: &'static str,
    from: Map,
    to: &mut Map,
) -> Result<(), PolicyMapError> {
    let from: LpmTrie<_, K, V> = LpmTrie::try_from(from).map_err(map_err(name))?;
    let mut to: LpmTrie<_, K, V> = LpmTrie::try_from(to).map_err(map_err(name))?;
    for entry in from.iter() {
        let (key, value) = entry.map_err(map_err(name))?;
        to.insert(&key, value, 0).map_err(map_err(name))?;
    }
    Ok(())
}

fn copy_hash<K: Pod, V: Pod>(
    name: &'static str,
    from: Map,
    to: &mut Map,
) -> Result<(), PolicyMapError> {
    let from: HashMap<_, K, V> = HashMap::try_from(from).map_err(map_err(name))?;
    let mut to: HashMap<_, K, V> = HashMap::try_from(to).map_err(map_err(name))?;
    for entry in from.iter() {
        let (key, value) = entry.map_err(map_err(name))?;
        to.insert(key, value, 0).map_err(map_err(name))?;
    }
    Ok(())
}

/// Copies every entry of policy map `name` (one of a slot's maps that the loader sizes, not an
/// exact-match table: see [`copy_exact_table`]) from `from` into `to`, a larger map of the same
/// kind. Used when a policy has outgrown pinned maps: the new programs get larger maps holding
/// what the old ones judge by.
pub fn copy_policy_map(
    name: &'static str,
    from: MapData,
    to: &mut Map,
) -> Result<(), PolicyMapError> {
    let from = Map::from_map_data(from).map_err(map_err(name))?;
    if map_names::ADDR_V4.contains(&name) {
        copy_trie::<[u8; 4], AddrInfo>(name, from, to)
    } else if map_names::ADDR_V6.contains(&name) {
        copy_trie::<[u8; 16], AddrInfo>(name, from, to)
    } else if map_names::PORTS.contains(&name) {
        copy_trie::<PortKey, PortValue>(name, from, to)
    } else if map_names::PAIRS_OVERFLOW.contains(&name) {
        copy_hash::<PairKey, PairValue>(name, from, to)
    } else if map_names::SEGMENTS.contains(&name) {
        let from: Array<_, SegmentInfo> = Array::try_from(from).map_err(map_err(name))?;
        let mut to: Array<_, SegmentInfo> = Array::try_from(to).map_err(map_err(name))?;
        for index in 0..from.len().min(to.len()) {
            let value = from.get(&index, 0).map_err(map_err(name))?;
            to.set(index, value, 0).map_err(map_err(name))?;
        }
        Ok(())
    } else if map_names::RULE_HITS.contains(&name) {
        let from: PerCpuArray<_, u64> = PerCpuArray::try_from(from).map_err(map_err(name))?;
        let mut to: PerCpuArray<_, u64> = PerCpuArray::try_from(to).map_err(map_err(name))?;
        for index in 0..from.len().min(to.len()) {
            let values = from.get(&index, 0).map_err(map_err(name))?;
            to.set(index, values, 0).map_err(map_err(name))?;
        }
        Ok(())
    } else {
        Err(PolicyMapError::NotAPolicyMap(name))
    }
}
