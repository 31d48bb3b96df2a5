//! Keeping enforcement in force while no daemon runs (`enforcer run --persist`): every map of
//! the eBPF object, both programs and every attachment are pinned in a directory of the BPF file
//! system, so they outlive the daemon whatever ends it (SIGKILL included). The next daemon
//! *adopts* them: it reuses the pinned maps (policy slots, connection table, counters, event
//! ring) and atomically replaces the program inside each existing attachment, so neither a
//! restart nor an upgrade leaves a moment without enforcement or forgets a connection.
//! `enforcer detach` removes everything.
//!
//! The pin directory (bpffs holds no regular files: markers are empty directories):
//!
//! ```text
//! <pin-dir>/                         default /sys/fs/bpf/enforcer
//!   layout-v<N>/                     enforcer_common::MAP_LAYOUT_VERSION of the maps
//!   netns-<inode>/                   the network namespace the interfaces belong to
//!   maps/<NAME>                      every map of the eBPF object, by its name
//!   programs/<NAME>                  enforcer_xdp, enforcer_tc_egress
//!   ifaces/<IFACE>/xdp-native        the XDP bpf_link (xdp-generic in skb mode)
//!   ifaces/<IFACE>/tcx               the TC egress bpf_link (TCX, Linux 6.6 and later)
//!   ifaces/<IFACE>/clsact-<PRIO>-<HANDLE>/   the TC egress netlink filter (before 6.6)
//! ```
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{MapData, MapInfo},
    programs::{
        SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, Link as _, PinnedLink},
        tc::{self, SchedClassifierLink, TcHandle},
        xdp::XdpLink,
    },
    util::KernelVersion,
};
use enforcer_common::{MAP_LAYOUT_VERSION, map_names, program_names};
use policy_compiler::Artifact;
use tracing::{debug, info, warn};

use crate::{
    Enforcer, EventOptions, LoadError,
    loader::{self, program_error, program_mut},
    policy_maps,
};

/// Where `--pin-dir` points unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/enforcer";

/// Where the daemon mounts the BPF file system when it is missing.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const MAPS: &str = "maps";
const PROGRAMS: &str = "programs";
const IFACES: &str = "ifaces";
const LAYOUT_PREFIX: &str = "layout-v";
const NETNS_PREFIX: &str = "netns-";
const TCX_PIN: &str = "tcx";
const XDP_PIN_PREFIX: &str = "xdp-";
const CLSACT_PREFIX: &str = "clsact-";

/// The programs the daemon loads, pinned under `programs/`.
const PROGRAMS_PINNED: [&str; 2] = [program_names::XDP_INGRESS, program_names::TC_EGRESS];

/// Whether map `name` is pinned: all but the filter and the per-CPU caches in front of the
/// connection table, which belong to one daemon's programs (see `crate::flow_filter` and
/// `crate::conntrack::forget_cached_flows`): the programs that adopt the pinned table start
/// with an empty cache.
fn pinned(name: &str) -> bool {
    ![
        map_names::FLOW_FILTER,
        map_names::FLOW_FILTER_STATE,
        map_names::FLOW_CACHE,
        map_names::FLOW_CACHE_EPOCH,
    ]
    .contains(&name)
}

/// Maps whose size the loader decides (from the policy and its settings): a pinned one may
/// differ in size from the object's definition.
fn sized_by_loader(name: &str) -> bool {
    [
        &map_names::HOSTS_V4,
        &map_names::HOSTS_V6,
        &map_names::BLOCKS_V4,
        &map_names::BLOCKS_V6,
        &map_names::ADDR_V4,
        &map_names::ADDR_V6,
        &map_names::SEGMENTS,
        &map_names::PAIRS,
        &map_names::PAIRS_OVERFLOW,
        &map_names::PORTS_EXACT,
        &map_names::PORTS,
        &map_names::RULE_HITS,
    ]
    .iter()
    .any(|names| names.contains(&name))
        || name == map_names::CONNTRACK
        || name == map_names::FRAGMENTS
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the pin directory {dir} is not on a BPF file system; the enforcer mounts one only at \
         {BPFFS_MOUNT}: choose a --pin-dir under {BPFFS_MOUNT}, or mount one (`mount -t bpf bpf \
         DIR`)"
    )]
    NotBpffs { dir: PathBuf },
    #[error(
        "mounting the BPF file system at {BPFFS_MOUNT} failed: {source}. It needs CAP_SYS_ADMIN; \
         mount it before starting the enforcer (`mount -t bpf bpf {BPFFS_MOUNT}`; systemd does \
         at boot)"
    )]
    Mount {
        #[source]
        source: io::Error,
    },
    #[error(
        "another enforcer is running with the pin directory {dir}: stop it first (its programs \
         stay attached; the next `enforcer run --persist` adopts them, `enforcer detach` removes \
         them)"
    )]
    Locked { dir: PathBuf },
    #[error(
        "an enforcer is running with the pin directory {dir}: stop it first (`systemctl stop \
         enforcer`, or remove the DaemonSet; its programs stay attached when it stops), then \
         run `enforcer detach` again"
    )]
    InUse { dir: PathBuf },
    #[error(
        "the enforcer pinned in {dir} was attached in another network namespace \
         (net:[{pinned}]; this process is in net:[{current}]): run this command in that \
         namespace (e.g. `nsenter --net=/run/netns/NAME enforcer ...`), or use another --pin-dir"
    )]
    OtherNetns {
        dir: PathBuf,
        pinned: u64,
        current: u64,
    },
    #[error(
        "cannot adopt the enforcer pinned in {dir}: {reason}. Its programs stay attached and \
         keep enforcing the policy they had. Either run the enforcer version that pinned them, \
         or remove them with `enforcer detach --pin-dir {dir}` and start again (the interfaces \
         are unenforced for the seconds loading takes, and connections are judged afresh)"
    )]
    Incompatible { dir: PathBuf, reason: String },
    #[error(
        "an enforcer started with --persist is in force from {dir}: run with --persist to adopt \
         it, or remove it first with `enforcer detach --pin-dir {dir}`"
    )]
    PinnedElsewhere { dir: PathBuf },
    #[error("--pin-dir {dir}: the enforcer needs a directory of its own, e.g. {DEFAULT_PIN_DIR}")]
    OwnDirectory { dir: PathBuf },
    #[error(
        "{dir} is not an enforcer pin directory (it has no layout-v* marker, and holds \
         {entries:?}): nothing removed; check --pin-dir"
    )]
    NotOurs { dir: PathBuf, entries: Vec<String> },
    #[error(
        "--persist needs Linux 5.9 or later (XDP attached as a BPF link, which can be pinned); \
         run without --persist on this kernel"
    )]
    KernelTooOld,
    #[error("interface `{iface}`: {message}")]
    Iface { iface: String, message: String },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Quarantine(#[from] crate::quarantine::QuarantineError),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> PersistError {
    let context = context.into();
    move |source| PersistError::Io { context, source }
}

fn pin_error(what: impl Into<String>) -> impl FnOnce(aya::pin::PinError) -> PersistError {
    let context = what.into();
    move |error| PersistError::Io {
        context,
        source: io::Error::other(error.to_string()),
    }
}

fn iface_error(iface: &str, message: impl std::fmt::Display) -> PersistError {
    PersistError::Iface {
        iface: iface.to_string(),
        message: message.to_string(),
    }
}

/// A pin directory in use: locked for as long as this value lives.
#[derive(Debug)]
pub struct PinDir {
    root: PathBuf,
    /// An exclusive `flock` on the directory: a second daemon and `enforcer detach` see that
    /// this one runs, and the kernel releases it however the process ends.
    _lock: File,
}

impl PinDir {
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn map(&self, name: &str) -> PathBuf {
        self.root.join(MAPS).join(name)
    }

    fn program(&self, name: &str) -> PathBuf {
        self.root.join(PROGRAMS).join(name)
    }

    fn iface(&self, iface: &str) -> PathBuf {
        self.root.join(IFACES).join(iface)
    }
}

/// Takes the directory's lock without waiting; `None` when another process holds it.
fn try_lock(dir: &Path) -> Result<Option<File>, PersistError> {
    let file = File::open(dir).map_err(io_error(format!("opening {}", dir.display())))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(io_error(format!("locking {}", dir.display()))(error))
    }
}

fn is_bpffs(path: &Path) -> Result<bool, PersistError> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|error| io_error(path.display().to_string())(io::Error::other(error)))?;
    // SAFETY: statfs is plain data; a valid path and buffer.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io_error(format!("statfs {}", path.display()))(
            io::Error::last_os_error(),
        ));
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

/// The deepest existing directory at or above `path`.
fn existing_ancestor(path: &Path) -> &Path {
    path.ancestors()
        .find(|dir| dir.is_dir())
        .unwrap_or(Path::new("/"))
}

/// Makes sure `dir` will be on a BPF file system, mounting one at /sys/fs/bpf when that is
/// where it belongs and none is mounted there.
fn ensure_bpffs(dir: &Path) -> Result<(), PersistError> {
    if is_bpffs(existing_ancestor(dir))? {
        return Ok(());
    }
    let mount_point = Path::new(BPFFS_MOUNT);
    if !dir.starts_with(mount_point) || is_bpffs(mount_point)? {
        return Err(PersistError::NotBpffs {
            dir: dir.to_path_buf(),
        });
    }
    // Two daemons starting at once would stack two file systems, the second hiding the first's
    // pins: whoever holds the lock on the bare mount point mounts, the others find it mounted.
    let bare = File::open(mount_point).map_err(io_error(format!("opening {BPFFS_MOUNT}")))?;
    // SAFETY: flock on a file descriptor we own; released when `bare` is closed.
    if unsafe { libc::flock(bare.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_error(format!("locking {BPFFS_MOUNT}"))(
            io::Error::last_os_error(),
        ));
    }
    if is_bpffs(mount_point)? {
        return Ok(());
    }
    // SAFETY: NUL-terminated constant strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(PersistError::Mount {
            source: io::Error::last_os_error(),
        });
    }
    info!("mounted the BPF file system at {BPFFS_MOUNT} (it was missing; the pins live there)");
    let own = fs::read_link("/proc/self/ns/mnt").ok();
    if own.is_some() && own != fs::read_link("/proc/1/ns/mnt").ok() {
        warn!(
            "this process runs in a mount namespace of its own: the BPF file system it mounted, \
             and the pins on it, vanish when that namespace ends (`ip netns exec` creates one; \
             enter only the network namespace, e.g. `nsenter --net=/run/netns/NAME`)"
        );
    }
    if !is_bpffs(existing_ancestor(dir))? {
        return Err(PersistError::NotBpffs {
            dir: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// The inode of this thread's network namespace: what `net:[N]` in /proc names.
fn current_netns() -> Result<u64, PersistError> {
    fs::metadata("/proc/thread-self/ns/net")
        .map(|meta| meta.ino())
        .map_err(io_error("reading /proc/thread-self/ns/net"))
}

/// Names in `dir` (empty when it does not exist).
fn entries(dir: &Path) -> Result<Vec<String>, PersistError> {
    match fs::read_dir(dir) {
        Ok(read) => {
            let mut names: Vec<String> = read
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            Ok(names)
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(io_error(format!("reading {}", dir.display()))(error)),
    }
}

fn marker(root: &Path, prefix: &str) -> Result<Option<String>, PersistError> {
    Ok(entries(root)?
        .into_iter()
        .find_map(|name| name.strip_prefix(prefix).map(str::to_owned)))
}

/// Whether the network namespace with inode `ino` still exists (a process or a name in
/// /run/netns holds it). Namespaces kept alive only by a bind mount elsewhere or an open file
/// descriptor are not seen.
fn netns_exists(ino: u64) -> bool {
    let holds = |path: PathBuf| fs::metadata(path).is_ok_and(|meta| meta.ino() == ino);
    let named = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .any(|entry| holds(entry.path()));
    named
        || fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
            .any(|entry| holds(entry.path().join("ns/net")))
}

/// What a directory's markers say, checked against this process and binary.
fn check_markers(root: &Path, adopting: bool) -> Result<(), PersistError> {
    let current = current_netns()?;
    if let Some(pinned) = marker(root, NETNS_PREFIX)? {
        let pinned: u64 = pinned.parse().unwrap_or(0);
        if pinned != current {
            return Err(PersistError::OtherNetns {
                dir: root.to_path_buf(),
                pinned,
                current,
            });
        }
    }
    if adopting {
        let layout = marker(root, LAYOUT_PREFIX)?;
        if layout.as_deref() != Some(MAP_LAYOUT_VERSION.to_string().as_str()) {
            return Err(PersistError::Incompatible {
                dir: root.to_path_buf(),
                reason: match layout {
                    Some(version) => format!(
                        "its maps have layout version {version}, this enforcer's have version \
                         {MAP_LAYOUT_VERSION}"
                    ),
                    None => "it records no map layout version".into(),
                },
            });
        }
    }
    Ok(())
}

fn create_dir(path: &Path) -> Result<(), PersistError> {
    fs::create_dir_all(path).map_err(io_error(format!("creating {}", path.display())))
}

/// Prepares `root` for `run --persist`: the BPF file system mounted, the directory created and
/// locked, its markers checked. Returns whether it holds pinned maps to adopt.
fn open_for_run(root: &Path) -> Result<(PinDir, bool), PersistError> {
    if root.parent().is_none() || root.components().eq(Path::new(BPFFS_MOUNT).components()) {
        return Err(PersistError::OwnDirectory {
            dir: root.to_path_buf(),
        });
    }
    ensure_bpffs(root)?;
    create_dir(root)?;
    let lock = try_lock(root)?.ok_or_else(|| PersistError::Locked {
        dir: root.to_path_buf(),
    })?;
    let adopting = !entries(&root.join(MAPS))?.is_empty();
    check_markers(root, adopting)?;
    if !adopting {
        // A fresh directory, or one whose first start died before pinning a map.
        for name in entries(root)? {
            if name.starts_with(LAYOUT_PREFIX) || name.starts_with(NETNS_PREFIX) {
                let _ = fs::remove_dir(root.join(name));
            }
        }
        create_dir(&root.join(format!("{LAYOUT_PREFIX}{MAP_LAYOUT_VERSION}")))?;
        create_dir(&root.join(format!("{NETNS_PREFIX}{}", current_netns()?)))?;
    }
    for sub in [MAPS, PROGRAMS, IFACES] {
        create_dir(&root.join(sub))?;
    }
    Ok((
        PinDir {
            root: root.to_path_buf(),
            _lock: lock,
        },
        adopting,
    ))
}

/// Without `--persist`: refuses to start over an enforcer pinned in `root`, which would keep
/// the interfaces busy (and is most likely what the operator meant to adopt).
pub fn ensure_not_pinned(root: &Path) -> Result<(), PersistError> {
    if !root.is_dir() || !is_bpffs(root)? {
        return Ok(());
    }
    if entries(&root.join(MAPS))?.is_empty() && entries(&root.join(IFACES))?.is_empty() {
        return Ok(());
    }
    Err(PersistError::PinnedElsewhere {
        dir: root.to_path_buf(),
    })
}

/// The facts about one map that must agree before a pinned map is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// Why a pinned map cannot stand in for the object's definition, if it cannot.
pub(crate) fn shape_mismatch(
    name: &str,
    defined: MapShape,
    pinned: MapShape,
    sized: bool,
) -> Option<String> {
    let mut differences = Vec::new();
    let mut compare = |what: &str, defined: u32, pinned: u32| {
        if defined != pinned {
            differences.push(format!("{what} {pinned} pinned, {defined} defined"));
        }
    };
    compare("type", defined.map_type, pinned.map_type);
    compare("key size", defined.key_size, pinned.key_size);
    compare("value size", defined.value_size, pinned.value_size);
    compare("flags", defined.flags, pinned.flags);
    if !sized {
        compare("max entries", defined.max_entries, pinned.max_entries);
    }
    (!differences.is_empty()).then(|| format!("map {name}: {}", differences.join(", ")))
}

/// The maps of the eBPF object that live in a `maps` section (global-data sections are
/// neither shared nor pinned), with their definitions.
fn object_maps() -> Result<BTreeMap<String, MapShape>, PersistError> {
    let object = aya_obj::Object::parse(loader::ebpf_object()).map_err(|error| {
        PersistError::Load(LoadError::Object(aya::EbpfError::ParseError(error)))
    })?;
    Ok(object
        .maps
        .iter()
        .filter(|(_, map)| {
            matches!(
                map.section_kind(),
                aya_obj::EbpfSectionKind::Maps | aya_obj::EbpfSectionKind::BtfMaps
            )
        })
        .map(|(name, map)| {
            let shape = MapShape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: map.max_entries(),
                flags: map.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect())
}

fn pinned_info(path: &Path) -> Result<MapInfo, PersistError> {
    MapInfo::from_pin(path).map_err(|error| PersistError::Io {
        context: format!("opening the pinned map {}", path.display()),
        source: io::Error::other(error.to_string()),
    })
}

fn pinned_shape(path: &Path) -> Result<MapShape, PersistError> {
    let info = pinned_info(path)?;
    let map_type = info
        .map_type()
        .map(|map_type| map_type as u32)
        .unwrap_or(u32::MAX);
    Ok(MapShape {
        map_type,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// Refuses pinned maps this binary would misread.
fn check_maps(pins: &PinDir, defined: &BTreeMap<String, MapShape>) -> Result<(), PersistError> {
    let mut problems = Vec::new();
    for (name, shape) in defined {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let pinned = pinned_shape(&path)?;
        problems.extend(shape_mismatch(name, *shape, pinned, sized_by_loader(name)));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PersistError::Incompatible {
            dir: pins.root.clone(),
            reason: format!(
                "its maps differ from this enforcer's ({})",
                problems.join("; ")
            ),
        })
    }
}

/// How `run --persist` found and left one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceOutcome {
    pub iface: String,
    /// `native` or `generic`.
    pub xdp_mode: &'static str,
    /// `tcx` or `clsact`.
    pub tc_mode: &'static str,
    /// The interface already had pinned attachments whose program was replaced in place.
    pub adopted: bool,
}

/// What `run --persist` did at start.
#[derive(Clone, Debug, Default)]
pub struct StartReport {
    /// The generation in force in the pinned maps, when there were pinned maps.
    pub adopted_generation: Option<u32>,
    /// The active slot already held this policy: kept, with its generation.
    pub policy_kept: bool,
    pub ifaces: Vec<IfaceOutcome>,
    /// Pinned interfaces no longer named by `--iface`, detached.
    pub released: Vec<String>,
    /// Policy maps the policy outgrew, replaced by larger copies.
    pub resized: Vec<String>,
}

/// Loads the programs for `run --persist` and attaches them to `ifaces`, adopting what is
/// pinned in `root` (see the module documentation).
pub fn start(
    artifact: &Artifact,
    events: EventOptions,
    root: &Path,
    ifaces: &[String],
) -> Result<(Enforcer, StartReport), PersistError> {
    if KernelVersion::current().is_ok_and(|version| version < KernelVersion::new(5, 9, 0)) {
        return Err(PersistError::KernelTooOld);
    }
    loader::raise_memlock_limit();
    let (pins, adopting) = open_for_run(root)?;
    let defined = object_maps()?;
    if adopting {
        check_maps(&pins, &defined)?;
    }
    let mut report = StartReport::default();

    // Sizes: as a fresh load would make them, except that pinned maps keep theirs unless the
    // policy outgrew them.
    let settings = &artifact.settings;
    let mut sizes = Vec::new();
    let mut resized: BTreeSet<&'static str> = BTreeSet::new();
    for (names, sized_for) in loader::sizing_needs(artifact) {
        let mut size = loader::with_headroom(sized_for);
        if adopting {
            let pinned: Vec<u32> = names
                .iter()
                .filter(|name| pins.map(name).exists())
                .map(|name| {
                    pinned_info(&pins.map(name))
                        .map(|info| loader::capacity_of(name, info.max_entries()))
                })
                .collect::<Result<_, _>>()?;
            if let Some(&capacity) = pinned.iter().min() {
                // What a fresh load makes room for, the subnets' addresses in the host tables
                // and their blocks in the block tables included, so that an upgrade keeps a
                // grown subnet policy off the trie walk.
                if sized_for > capacity as usize {
                    size = size.max(pinned.iter().copied().max().unwrap_or(0));
                    resized.extend(names.iter().copied().filter(|name| pins.map(name).exists()));
                } else {
                    size = capacity;
                }
            }
        }
        sizes.push((names, size));
    }
    let mut loader = EbpfLoader::new();
    for &(names, size) in &sizes {
        for name in names {
            loader.map_max_entries(name, loader::map_size(name, size));
        }
    }
    loader.map_max_entries(map_names::CONNTRACK, settings.conntrack_max_entries);
    loader.map_max_entries(map_names::FRAGMENTS, settings.fragments_max_entries);
    loader.map_max_entries(map_names::FLOW_FILTER, loader::flow_filter_lines(settings));
    // Every map by name: aya opens a pinned map, or creates the map and pins it.
    for name in defined.keys().filter(|name| pinned(name)) {
        if !resized.contains(name.as_str()) {
            loader.map_pin_path(name, pins.map(name));
        }
    }
    let mut ebpf = loader
        .load(loader::ebpf_object())
        .map_err(LoadError::from)?;
    loader::load_programs(&mut ebpf)?;
    // Adopted quarantine entries must be probed for from the first packet on.
    crate::quarantine::sync_in_use(&mut ebpf)?;
    // Likewise adopted break-glass grants.
    policy_maps::sync_breakglass_in_use(&mut ebpf).map_err(LoadError::PolicyMaps)?;

    // A policy that outgrew the pinned maps: larger maps holding the same entries, so the new
    // programs judge exactly as the old ones until the policy switch below. The exact-match
    // tables last: they take in what their fallback maps hold. A block table is not copied:
    // the blocks it had no room for are nowhere else as blocks, so a larger copy would miss
    // them. The adopted slot stops using it instead (`stop_using_blocks`), and the switch
    // below fills the other slot's larger one.
    let (tables, others): (Vec<&str>, Vec<&str>) = resized
        .iter()
        .copied()
        .partition(|name| policy_maps::is_exact_table(name));
    let blocks_resized = stop_using_blocks(&mut ebpf, &resized)?;
    for name in others.into_iter().chain(tables) {
        let path = pins.map(name);
        // A block table is left empty; see above.
        if !policy_maps::is_block_table(name) {
            let old = MapData::from_pin(&path).map_err(|error| PersistError::Io {
                context: format!("opening the pinned map {}", path.display()),
                source: io::Error::other(error.to_string()),
            })?;
            if policy_maps::is_exact_table(name) {
                policy_maps::copy_exact_table(&mut ebpf, name, old).map_err(LoadError::from)?;
            } else {
                let new = ebpf.map_mut(name).ok_or(LoadError::PolicyMaps(
                    policy_maps::PolicyMapError::MissingMap(name),
                ))?;
                policy_maps::copy_policy_map(name, old, new).map_err(LoadError::from)?;
            }
        }
        let new = ebpf.map_mut(name).ok_or(LoadError::PolicyMaps(
            policy_maps::PolicyMapError::MissingMap(name),
        ))?;
        fs::remove_file(&path).map_err(io_error(format!("unpinning {}", path.display())))?;
        new.pin(&path)
            .map_err(pin_error(format!("pinning {}", path.display())))?;
        report.resized.push(name.to_string());
    }
    if !report.resized.is_empty() {
        info!(
            maps = ?report.resized,
            "the policy outgrew the pinned maps: replaced them with larger copies"
        );
    }
    if blocks_resized {
        info!(
            "the adopted policy's subnets are judged by the prefix trie until the switch to the \
             new policy, which uses the larger block tables"
        );
    }

    let conntrack_capacity = pinned_info(&pins.map(map_names::CONNTRACK))?.max_entries();
    if conntrack_capacity != settings.conntrack_max_entries {
        warn!(
            pinned = conntrack_capacity,
            configured = settings.conntrack_max_entries,
            "conntrack.max_entries changed, but the pinned connection table keeps its size (and \
             the connections it tracks); `enforcer detach` and a new start apply the new size"
        );
    }
    let fragments_capacity = pinned_info(&pins.map(map_names::FRAGMENTS))?.max_entries();
    if fragments_capacity != settings.fragments_max_entries {
        warn!(
            pinned = fragments_capacity,
            configured = settings.fragments_max_entries,
            "fragments.max_entries changed, but the pinned fragment table keeps its size"
        );
    }
    let mut actual_sizes = Vec::new();
    for (names, _) in &sizes {
        let capacity = names
            .iter()
            .map(|name| {
                pinned_info(&pins.map(name))
                    .map(|info| loader::capacity_of(name, info.max_entries()))
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .min()
            .unwrap_or(0);
        actual_sizes.push((*names, capacity));
    }

    let mut enforcer =
        Enforcer::with_loaded(ebpf, artifact, events, actual_sizes, conntrack_capacity);
    if adopting {
        let slot = policy_maps::read_active(enforcer.ebpf()).map_err(LoadError::from)?;
        let config = policy_maps::read_config(enforcer.ebpf(), slot).map_err(LoadError::from)?;
        enforcer.adopt_slot(slot, config);
        report.adopted_generation = Some(config.generation);
    } else {
        // Programs are attached only once they have a policy.
        enforcer.replace_policy(artifact)?;
    }

    for iface in ifaces {
        let outcome = attach_pinned(&mut enforcer, &pins, iface)?;
        enforcer.record_attachment(iface, outcome.xdp_mode);
        report.ifaces.push(outcome);
    }
    for iface in entries(&pins.root.join(IFACES))? {
        if !ifaces.contains(&iface) {
            for line in detach_iface(&pins.root, &iface) {
                warn!(%iface, "not named by --iface any more: {line}");
            }
            report.released.push(iface);
        }
    }

    if adopting {
        // Every attachment now runs this binary's programs on the adopted maps; a changed
        // policy goes in with the usual switch of slots.
        let slot = enforcer.active_slot();
        let current = *enforcer.config();
        let wanted = enforcer.config_for(artifact, current.generation);
        if wanted == current
            && policy_maps::slot_holds(enforcer.ebpf(), slot, artifact).map_err(LoadError::from)?
        {
            enforcer.keep_policy(artifact).map_err(LoadError::from)?;
            report.policy_kept = true;
        } else {
            enforcer.replace_policy(artifact)?;
        }
    }

    for name in PROGRAMS_PINNED {
        let path = pins.program(name);
        if path.exists() {
            fs::remove_file(&path).map_err(io_error(format!("unpinning {}", path.display())))?;
        }
        let pinned = if name == program_names::XDP_INGRESS {
            program_mut::<Xdp>(enforcer.ebpf_mut(), name)?.pin(&path)
        } else {
            program_mut::<SchedClassifier>(enforcer.ebpf_mut(), name)?.pin(&path)
        };
        pinned.map_err(pin_error(format!("pinning {}", path.display())))?;
    }
    // Maps an older build had and this one does not: no program uses them any more.
    for name in entries(&pins.root.join(MAPS))? {
        if !defined.contains_key(&name) {
            debug!(map = %name, "unpinning a map this enforcer does not have");
            let _ = fs::remove_file(pins.map(&name));
        }
    }
    enforcer.pins = Some(pins);
    Ok((enforcer, report))
}

/// Before a block table in `resized` is replaced by a larger, empty one: the active slot's
/// settings stop sending lookups of that family to its block table, so the programs (the old
/// ones still attached, and the new ones once attached) walk the trie, which holds every
/// subnet, until the switch to a slot written for the larger table. Returns whether any block
/// table is resized.
fn stop_using_blocks(
    ebpf: &mut aya::Ebpf,
    resized: &BTreeSet<&'static str>,
) -> Result<bool, PersistError> {
    let v4 = map_names::BLOCKS_V4
        .iter()
        .any(|name| resized.contains(name));
    let v6 = map_names::BLOCKS_V6
        .iter()
        .any(|name| resized.contains(name));
    if !v4 && !v6 {
        return Ok(false);
    }
    let slot = policy_maps::read_active(ebpf).map_err(LoadError::from)?;
    let mut config = policy_maps::read_config(ebpf, slot).map_err(LoadError::from)?;
    if v4 {
        config.block_len_v4 = 0;
    }
    if v6 {
        config.block_len_v6 = 0;
    }
    policy_maps::write_config(ebpf, slot, &config).map_err(LoadError::from)?;
    Ok(true)
}

/// Pinned attachments of `iface`: (XDP link pin and its mode, TCX link pin, clsact filter
/// marker with its priority and handle).
struct IfacePins {
    xdp: Option<(PathBuf, &'static str)>,
    tcx: Option<PathBuf>,
    clsact: Option<(PathBuf, u16, u32)>,
}

fn iface_pins(dir: &Path) -> Result<IfacePins, PersistError> {
    let mut pins = IfacePins {
        xdp: None,
        tcx: None,
        clsact: None,
    };
    for name in entries(dir)? {
        let path = dir.join(&name);
        if let Some(mode) = name.strip_prefix(XDP_PIN_PREFIX) {
            let mode = if mode == "generic" {
                "generic"
            } else {
                "native"
            };
            pins.xdp = Some((path, mode));
        } else if name == TCX_PIN {
            pins.tcx = Some(path);
        } else if let Some(rest) = name.strip_prefix(CLSACT_PREFIX) {
            let mut parts = rest.split('-');
            let priority = parts.next().and_then(|p| p.parse().ok());
            let handle = parts.next().and_then(|h| h.parse().ok());
            if let (Some(priority), Some(handle)) = (priority, handle) {
                pins.clsact = Some((path, priority, handle));
            }
        }
    }
    Ok(pins)
}

fn pin_link(link: FdLink, path: &Path) -> Result<(), PersistError> {
    // The pin holds the link; dropping our descriptor keeps it attached.
    link.pin(path)
        .map(drop)
        .map_err(pin_error(format!("pinning {}", path.display())))
}

/// Attaches `iface` (XDP ingress, TC egress), replacing the program of attachments that are
/// already pinned, and pins what is new.
fn attach_pinned(
    enforcer: &mut Enforcer,
    pins: &PinDir,
    iface: &str,
) -> Result<IfaceOutcome, PersistError> {
    let dir = pins.iface(iface);
    create_dir(&dir)?;
    let pinned = iface_pins(&dir)?;
    let mut adopted = false;

    let mut xdp_mode = None;
    if let Some((path, mode)) = &pinned.xdp {
        match replace_xdp(enforcer, path) {
            Ok(()) => {
                xdp_mode = Some(*mode);
                adopted = true;
            }
            Err(error) => {
                warn!(
                    %iface,
                    %error,
                    "the pinned XDP link cannot be reused (the interface was recreated?); \
                     attaching anew"
                );
                let _ = fs::remove_file(path);
            }
        }
    }
    let xdp_mode = match xdp_mode {
        Some(mode) => mode,
        None => {
            let (link_id, mode) = enforcer.attach_xdp(iface)?;
            let xdp = program_mut::<Xdp>(enforcer.ebpf_mut(), program_names::XDP_INGRESS)?;
            let link = xdp
                .take_link(link_id)
                .map_err(program_error(program_names::XDP_INGRESS))?;
            // Only a BPF link can be pinned. aya falls back to netlink only where the kernel has
            // no XDP links (before 5.9, refused above).
            let link = FdLink::try_from(link).map_err(|error| {
                iface_error(
                    iface,
                    format!(
                        "XDP was attached through netlink, which --persist cannot keep ({error}); \
                         remove it with `ip link set dev {iface} xdp off`"
                    ),
                )
            })?;
            pin_link(link, &dir.join(format!("{XDP_PIN_PREFIX}{mode}")))?;
            mode
        }
    };

    let mut tc_mode = None;
    if let Some(path) = &pinned.tcx {
        match replace_tcx(enforcer, path) {
            Ok(()) => {
                tc_mode = Some("tcx");
                adopted = true;
            }
            Err(error) => {
                warn!(%iface, %error, "the pinned TCX link cannot be reused; attaching anew");
                let _ = fs::remove_file(path);
            }
        }
    } else if let Some((path, priority, handle)) = &pinned.clsact {
        match replace_clsact(enforcer, iface, *priority, *handle) {
            Ok(()) => {
                tc_mode = Some("clsact");
                adopted = true;
            }
            Err(error) => {
                warn!(
                    %iface,
                    %error,
                    "the pinned clsact filter cannot be replaced; attaching anew"
                );
                let _ = fs::remove_dir(path);
            }
        }
    }
    let tc_mode = match tc_mode {
        Some(mode) => mode,
        None => attach_tc(enforcer, iface, &dir)?,
    };
    info!(
        %iface,
        xdp_mode,
        tc_mode,
        adopted,
        pins = %dir.display(),
        "attached and pinned (XDP ingress, TC egress)"
    );
    Ok(IfaceOutcome {
        iface: iface.to_string(),
        xdp_mode,
        tc_mode,
        adopted,
    })
}

fn link_error(path: &Path, error: impl std::fmt::Display) -> PersistError {
    PersistError::Io {
        context: format!("the pinned link {}", path.display()),
        source: io::Error::other(error.to_string()),
    }
}

/// Swaps this enforcer's XDP program into the pinned link (`bpf_link_update`: every packet
/// sees either the old or the new program).
fn replace_xdp(enforcer: &mut Enforcer, path: &Path) -> Result<(), PersistError> {
    let link = PinnedLink::from_pin(path).map_err(|error| link_error(path, error))?;
    let link = XdpLink::try_from(FdLink::from(link)).map_err(|error| link_error(path, error))?;
    let xdp = program_mut::<Xdp>(enforcer.ebpf_mut(), program_names::XDP_INGRESS)?;
    let id = xdp
        .attach_to_link(link)
        .map_err(|error| link_error(path, error))?;
    // Our descriptor goes; the pin keeps the link.
    drop(xdp.take_link(id));
    Ok(())
}

fn replace_tcx(enforcer: &mut Enforcer, path: &Path) -> Result<(), PersistError> {
    let link = PinnedLink::from_pin(path).map_err(|error| link_error(path, error))?;
    let link = SchedClassifierLink::try_from(FdLink::from(link))
        .map_err(|error| link_error(path, error))?;
    let tc = program_mut::<SchedClassifier>(enforcer.ebpf_mut(), program_names::TC_EGRESS)?;
    let id = tc
        .attach_to_link(link)
        .map_err(|error| link_error(path, error))?;
    drop(tc.take_link(id));
    Ok(())
}

/// Replaces the program of the clsact filter at `priority`/`handle` (a netlink request without
/// NLM_F_CREATE, which `cls_bpf` carries out as an RCU swap of the program).
fn replace_clsact(
    enforcer: &mut Enforcer,
    iface: &str,
    priority: u16,
    handle: u32,
) -> Result<(), PersistError> {
    let link = SchedClassifierLink::attached(
        iface,
        TcAttachType::Egress,
        priority,
        TcHandle::from(handle),
        None,
    )
    .map_err(|error| iface_error(iface, error))?;
    let tc = program_mut::<SchedClassifier>(enforcer.ebpf_mut(), program_names::TC_EGRESS)?;
    let id = tc
        .attach_to_link(link)
        .map_err(|error| iface_error(iface, error))?;
    let link = tc
        .take_link(id)
        .map_err(|error| iface_error(iface, error))?;
    // Nobody owns a netlink filter: forgetting the handle keeps it attached.
    std::mem::forget(link);
    Ok(())
}

/// Attaches TC egress anew and pins it: a TCX link, or before 6.6 a clsact filter recorded by
/// its priority and handle.
fn attach_tc(
    enforcer: &mut Enforcer,
    iface: &str,
    dir: &Path,
) -> Result<&'static str, PersistError> {
    let attach_error = |source| LoadError::Attach {
        iface: iface.to_string(),
        source,
    };
    if loader::tcx_available() {
        let tc = program_mut::<SchedClassifier>(enforcer.ebpf_mut(), program_names::TC_EGRESS)?;
        let id = tc
            .attach(iface, TcAttachType::Egress)
            .map_err(attach_error)?;
        let link = tc
            .take_link(id)
            .map_err(program_error(program_names::TC_EGRESS))?;
        let link = FdLink::try_from(link).map_err(|error| iface_error(iface, error))?;
        pin_link(link, &dir.join(TCX_PIN))?;
        return Ok("tcx");
    }
    if let Err(error) = tc::qdisc_add_clsact(iface) {
        debug!(%iface, %error, "clsact qdisc not added (present already)");
    }
    // A filter left by a daemon without --persist that died, judging with orphaned maps.
    if tc::qdisc_detach_program(iface, TcAttachType::Egress, program_names::TC_EGRESS).is_ok() {
        warn!(%iface, "removed a TC egress filter left by an earlier enforcer");
    }
    let tc = program_mut::<SchedClassifier>(enforcer.ebpf_mut(), program_names::TC_EGRESS)?;
    let id = tc
        .attach(iface, TcAttachType::Egress)
        .map_err(attach_error)?;
    let link = tc
        .take_link(id)
        .map_err(program_error(program_names::TC_EGRESS))?;
    let (priority, handle) = match (link.priority(), link.handle()) {
        (Ok(priority), Ok(handle)) => (priority, u32::from(handle)),
        _ => {
            drop(link);
            return Err(iface_error(
                iface,
                "the clsact filter has no priority/handle",
            ));
        }
    };
    create_dir(&dir.join(format!("{CLSACT_PREFIX}{priority}-{handle}")))?;
    std::mem::forget(link);
    info!(
        %iface,
        "kernel before 6.6 (no TCX): TC egress is a clsact filter, recorded in the pin directory"
    );
    Ok("clsact")
}

/// Removes `iface`'s pinned attachments (run in the namespace they were made in). Returns what
/// was done, one line each.
fn detach_iface(root: &Path, iface: &str) -> Vec<String> {
    let dir = root.join(IFACES).join(iface);
    let mut done = Vec::new();
    let pins = match iface_pins(&dir) {
        Ok(pins) => pins,
        Err(error) => return vec![format!("{iface}: {error}")],
    };
    let mut unpin = |path: &Path, what: &str| {
        // Holding the link while unpinning it makes closing our descriptor the last release,
        // which detaches it before we go on.
        let link = PinnedLink::from_pin(path).ok();
        match fs::remove_file(path) {
            Ok(()) => done.push(format!("{iface}: {what} removed")),
            Err(error) => done.push(format!("{iface}: removing {what} failed: {error}")),
        }
        drop(link);
    };
    if let Some((path, mode)) = &pins.xdp {
        unpin(path, &format!("XDP link ({mode})"));
    }
    if let Some(path) = &pins.tcx {
        unpin(path, "TC egress link (tcx)");
    }
    if let Some((path, priority, handle)) = &pins.clsact {
        let removed = SchedClassifierLink::attached(
            iface,
            TcAttachType::Egress,
            *priority,
            TcHandle::from(*handle),
            None,
        )
        .map_err(|error| error.to_string())
        .and_then(|link| link.detach().map_err(|error| error.to_string()));
        match removed {
            Ok(()) => done.push(format!(
                "{iface}: TC egress clsact filter (priority {priority}) removed"
            )),
            Err(error) => done.push(format!(
                "{iface}: TC egress clsact filter (priority {priority}) not found ({error}): \
                 the interface or the filter is gone"
            )),
        }
        let _ = fs::remove_dir(path);
    }
    let _ = fs::remove_dir(&dir);
    done
}

/// What `enforcer detach` did.
#[derive(Clone, Debug, Default)]
pub struct DetachReport {
    /// Nothing was pinned there.
    pub nothing: bool,
    /// One line per action.
    pub lines: Vec<String>,
}

/// `enforcer detach`: removes the attachments, programs, maps and directory pinned in `root`.
/// Refuses while a daemon uses the directory, and from another network namespace than the
/// one the interfaces are in (unless that namespace is gone).
pub fn detach(root: &Path) -> Result<DetachReport, PersistError> {
    let mut report = DetachReport::default();
    if !root.is_dir() || !is_bpffs(existing_ancestor(root))? {
        report.nothing = true;
        report.lines.push(format!(
            "nothing pinned at {}: nothing to detach",
            root.display()
        ));
        return Ok(report);
    }
    let _lock = try_lock(root)?.ok_or_else(|| PersistError::InUse {
        dir: root.to_path_buf(),
    })?;
    // Never unpin what another program keeps in a directory of the same name.
    if marker(root, LAYOUT_PREFIX)?.is_none() {
        let names = entries(root)?;
        if !names.is_empty() {
            return Err(PersistError::NotOurs {
                dir: root.to_path_buf(),
                entries: names,
            });
        }
        fs::remove_dir(root).map_err(io_error(format!("removing {}", root.display())))?;
        report.nothing = true;
        report.lines.push(format!(
            "nothing pinned at {} (an empty directory, removed): nothing to detach",
            root.display()
        ));
        return Ok(report);
    }
    if let Err(PersistError::OtherNetns {
        pinned, current, ..
    }) = check_markers(root, false)
    {
        if netns_exists(pinned) {
            return Err(PersistError::OtherNetns {
                dir: root.to_path_buf(),
                pinned,
                current,
            });
        }
        report.lines.push(format!(
            "the network namespace net:[{pinned}] the interfaces were in is gone (and with it \
             their attachments)"
        ));
    }
    for iface in entries(&root.join(IFACES))? {
        report.lines.extend(detach_iface(root, &iface));
    }
    let mut counts = Vec::new();
    for (sub, what) in [(PROGRAMS, "programs"), (MAPS, "maps")] {
        let dir = root.join(sub);
        let names = entries(&dir)?;
        for name in &names {
            let path = dir.join(name);
            fs::remove_file(&path).map_err(io_error(format!("unpinning {}", path.display())))?;
        }
        counts.push(format!("{} pinned {what}", names.len()));
    }
    report
        .lines
        .push(format!("removed {}", counts.join(" and ")));
    for name in entries(root)? {
        let path = root.join(&name);
        if [IFACES, PROGRAMS, MAPS].contains(&name.as_str())
            || name.starts_with(LAYOUT_PREFIX)
            || name.starts_with(NETNS_PREFIX)
        {
            let _ = fs::remove_dir(&path);
        }
    }
    match fs::remove_dir(root) {
        Ok(()) => report.lines.push(format!(
            "removed {}: the enforcer is detached",
            root.display()
        )),
        Err(error) => {
            return Err(io_error(format!(
                "removing {} (left: {:?})",
                root.display(),
                entries(root).unwrap_or_default()
            ))(error));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: MapShape = MapShape {
        map_type: 1,
        key_size: 8,
        value_size: 16,
        max_entries: 1024,
        flags: 0,
    };

    #[test]
    fn a_pinned_map_must_have_the_defined_key_value_and_type() {
        assert_eq!(shape_mismatch("M", SHAPE, SHAPE, false), None);
        let bigger_value = MapShape {
            value_size: 24,
            ..SHAPE
        };
        let problem = shape_mismatch("CONFIG", SHAPE, bigger_value, true).unwrap();
        assert!(
            problem.contains("CONFIG") && problem.contains("value size 24 pinned, 16 defined"),
            "{problem}"
        );
        let other_type = MapShape {
            map_type: 2,
            ..SHAPE
        };
        assert!(shape_mismatch("M", SHAPE, other_type, true).is_some());
    }

    #[test]
    fn only_maps_the_loader_sizes_may_differ_in_size() {
        let larger = MapShape {
            max_entries: 4096,
            ..SHAPE
        };
        assert_eq!(shape_mismatch("CONNTRACK", SHAPE, larger, true), None);
        assert!(shape_mismatch("COUNTERS", SHAPE, larger, false).is_some());
        assert!(sized_by_loader(map_names::CONNTRACK));
        assert!(sized_by_loader(map_names::PORTS[1]));
        assert!(sized_by_loader(map_names::HOSTS_V6[0]));
        assert!(sized_by_loader(map_names::PORTS_EXACT[1]));
        assert!(!sized_by_loader(map_names::COUNTERS));
        assert!(!sized_by_loader(map_names::ACTIVE));
    }

    #[test]
    fn clsact_markers_name_priority_and_handle() {
        let dir = std::env::temp_dir().join(format!("enforcer-pins-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("clsact-49152-1")).unwrap();
        fs::create_dir_all(dir.join("xdp-generic")).unwrap();
        let pins = iface_pins(&dir).unwrap();
        assert_eq!(pins.clsact.map(|(_, p, h)| (p, h)), Some((49152, 1)));
        assert_eq!(pins.xdp.map(|(_, mode)| mode), Some("generic"));
        assert!(pins.tcx.is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}
