//! Loading the kernel programs with maps sized for the policy, and attaching them to
//! interfaces: XDP on ingress, TC on egress. Dropping an [`Enforcer`] detaches everything it
//! attached, except what `crate::persist` pinned (`enforcer run --persist`).
use std::time::{Duration, Instant};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{
        Program, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, tc, xdp::XdpLinkId,
    },
};
use enforcer_common::{
    Config, HOST_PREFIX_V4, HOST_PREFIX_V6, PORT_EXACT_PREFIX, PairVerdictKey, event_flags,
    exact_table, lookup_flags, map_names, program_names,
};
use policy_compiler::{
    Artifact, Grant,
    artifact::SUBNET_EXPANSION_BITS,
    breakglass::{self, CapacityError},
};
use tracing::{debug, info, warn};

use crate::{
    clock,
    conntrack::{self, SweepError},
    counters::{self, CounterError, Counters},
    policy_maps::{self, PolicyMapError},
    quiesce::{self, QuiesceError},
};

/// The kernel programs, built by `build.rs` for the BPF target.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer-ebpf"));

/// The eBPF object, for tools that load it themselves: `cargo xtask bench` loads a second copy
/// for its traffic generator and floor programs (`enforcer_common::bench`), with its own maps.
pub fn ebpf_object() -> &'static [u8] {
    EBPF_OBJECT
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object failed: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching to interface `{iface}` failed: {source}")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "the new policy needs {needed} entries in map {map}, which was sized for {capacity} when the enforcer started; restart the enforcer to load it"
    )]
    TooLarge {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error(transparent)]
    PolicyMaps(#[from] PolicyMapError),
    #[error(transparent)]
    BreakglassCapacity(#[from] CapacityError),
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
    #[error(transparent)]
    Counters(#[from] CounterError),
}

/// How the programs ended up attached to an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub iface: String,
    /// `native` (driver) or `generic` (skb) XDP.
    pub xdp_mode: &'static str,
}

/// How the daemon wants events reported (the rest of `CONFIG` comes from the policy).
#[derive(Clone, Copy, Debug)]
pub struct EventOptions {
    /// Report the first packet of every allowed flow too, not only denials and audits.
    pub report_allowed: bool,
    /// At most one event per flow per this interval.
    pub interval: Duration,
}

impl Default for EventOptions {
    fn default() -> Self {
        EventOptions {
            report_allowed: false,
            interval: Duration::from_secs(1),
        }
    }
}

/// Loaded kernel programs and maps holding one compiled policy.
pub struct Enforcer {
    ebpf: Ebpf,
    revision: String,
    generation: u32,
    /// The slot of the policy maps that judges packets (see `policy_maps`).
    active_slot: usize,
    /// Whether a program may still be judging a packet with the inactive slot: it has been
    /// active since the last wait for running programs (see `crate::quiesce`).
    inactive_slot_may_be_read: bool,
    /// Whether the inactive slot's segment-pair table holds nothing: the last take emptied it,
    /// and it has not been active since. Reading the counts then skips it (half a scrape).
    inactive_pair_table_empty: bool,
    config: Config,
    events: EventOptions,
    /// Capacity of each policy map, the same in both slots.
    sizes: Vec<(&'static [&'static str; 2], u32)>,
    /// Entries the loaded policy uses in each policy map (by slot-0 name).
    usage: Vec<(&'static str, usize)>,
    conntrack_capacity: u32,
    attachments: Vec<Attachment>,
    /// With `--persist`: the pin directory, locked while this enforcer runs.
    pub(crate) pins: Option<crate::persist::PinDir>,
    /// Break-glass grants in force (expiry in the kernel's clock); every reload writes them
    /// into the new slot with its segment numbering.
    grants: Vec<Grant>,
    /// Segment names of the active policy, indexed by segment id.
    segment_names: Vec<String>,
    /// Grants that name a segment the active policy does not have: not in the kernel.
    unplaced_grants: Vec<u32>,
}

/// Capacity for `entries` policy map entries, with headroom so that a somewhat larger policy
/// fits the same maps on reload.
pub(crate) fn with_headroom(entries: usize) -> u32 {
    let entries = u32::try_from(entries).unwrap_or(u32::MAX / 2);
    entries.saturating_add(entries / 2).max(64)
}

pub(crate) fn program_error(name: &'static str) -> impl Fn(ProgramError) -> LoadError {
    move |source| LoadError::Program { name, source }
}

/// The program `name` of `ebpf`, as its type `P` (`Xdp`, `SchedClassifier`).
pub(crate) fn program_mut<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name))
}

fn program<'a, P>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a P, LoadError>
where
    &'a P: TryFrom<&'a Program, Error = ProgramError>,
{
    ebpf.program(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name))
}

/// Each policy map (both slots' names) with the entries `artifact` may put into it. A host
/// table and its family's trie (the single-port table and the port trie) share the family's
/// entries in a proportion the policy decides: both get room for all of them, which costs the
/// tries nothing up front, as they allocate per entry; so does the pair table's overflow. The
/// block tables need nothing: a policy whose blocks they have no room for is judged by the trie
/// ([`Enforcer::config_for`]).
pub(crate) fn policy_needs(artifact: &Artifact) -> [(&'static [&'static str; 2], usize); 12] {
    let counts = artifact.entry_counts();
    [
        (&map_names::HOSTS_V4, counts.addr_v4),
        (&map_names::HOSTS_V6, counts.addr_v6),
        (&map_names::BLOCKS_V4, 0),
        (&map_names::BLOCKS_V6, 0),
        (&map_names::ADDR_V4, counts.addr_v4),
        (&map_names::ADDR_V6, counts.addr_v6),
        (&map_names::SEGMENTS, counts.segments),
        (&map_names::PAIRS, counts.pairs),
        (&map_names::PAIRS_OVERFLOW, counts.pairs),
        (&map_names::PORTS_EXACT, counts.ports),
        (&map_names::PORTS, counts.ports),
        (&map_names::RULE_HITS, counts.rules),
    ]
}

/// Addresses of `artifact`'s subnets that can go into the host tables, per family (IPv4,
/// IPv6); `None` where they cannot (see `Artifact::subnet_addresses_v4`).
pub(crate) fn subnet_address_counts(artifact: &Artifact) -> [Option<usize>; 2] {
    let v4 = if artifact.addr_v4_entries().any(|e| e.0 < HOST_PREFIX_V4) {
        artifact.subnet_addresses_v4().map(|a| a.len())
    } else {
        Some(0)
    };
    let v6 = if artifact.addr_v6_entries().any(|e| e.0 < HOST_PREFIX_V6) {
        artifact.subnet_addresses_v6().map(|a| a.len())
    } else {
        Some(0)
    };
    [v4, v6]
}

/// What to size the policy maps for when they are created: [`policy_needs`], with room in the
/// host tables for the subnets' addresses, and in the tries behind them for any of those the
/// tables have no room for (a trie allocates its entries as they come, so the limit costs
/// nothing unused); or, for subnets that cannot go there address by address, room in the
/// block tables for their blocks. A later policy that the tables have no such room for still
/// loads; its subnets are then found in the trie ([`Enforcer::config_for`]).
pub(crate) fn sizing_needs(artifact: &Artifact) -> [(&'static [&'static str; 2], usize); 12] {
    let mut needs = policy_needs(artifact);
    let [v4, v6] = subnet_address_counts(artifact);
    let blocks_v4 = || {
        artifact
            .prefix_blocks_v4(v4.is_some())
            .map_or(0, |b| b.blocks.len())
    };
    let blocks_v6 = || {
        artifact
            .prefix_blocks_v6(v6.is_some())
            .map_or(0, |b| b.blocks.len())
    };
    for (names, needed) in &mut needs {
        if *names == &map_names::HOSTS_V4 || *names == &map_names::ADDR_V4 {
            *needed += v4.unwrap_or(0);
        } else if *names == &map_names::HOSTS_V6 || *names == &map_names::ADDR_V6 {
            *needed += v6.unwrap_or(0);
        } else if *names == &map_names::BLOCKS_V4 {
            *needed = blocks_v4();
        } else if *names == &map_names::BLOCKS_V6 {
            *needed = blocks_v6();
        }
    }
    needs
}

/// The `max_entries` of policy map `name` for `capacity` entries: an exact-match table is an
/// array of buckets, at most half full, behind a header (see `enforcer_common::exact_table`).
pub(crate) fn map_size(name: &str, capacity: u32) -> u32 {
    match policy_maps::entries_per_bucket(name) {
        Some(per_bucket) => exact_table::map_entries(capacity, per_bucket),
        None => capacity,
    }
}

/// The entries policy map `name` holds with `max_entries`: the inverse of [`map_size`].
pub(crate) fn capacity_of(name: &str, max_entries: u32) -> u32 {
    match policy_maps::entries_per_bucket(name) {
        Some(per_bucket) => exact_table::capacity_of(max_entries, per_bucket),
        None => max_entries,
    }
}

/// Lines of the filter in front of the connection table (both halves), from its configured size.
pub(crate) fn flow_filter_lines(settings: &policy_compiler::KernelSettings) -> u32 {
    2 * enforcer_common::flow_filter::lines_per_half(settings.conntrack_max_entries)
}

/// Loads the two programs of a loaded object into the kernel (verification happens here), and
/// calibrates their clock.
pub(crate) fn load_programs(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    program_mut::<Xdp>(ebpf, program_names::XDP_INGRESS)?
        .load()
        .map_err(program_error(program_names::XDP_INGRESS))?;
    program_mut::<SchedClassifier>(ebpf, program_names::TC_EGRESS)?
        .load()
        .map_err(program_error(program_names::TC_EGRESS))?;
    match clock::calibrate(ebpf) {
        Ok(clock) => debug!(
            tick_ns = clock.tick_ns,
            "calibrated the kernel programs' clock"
        ),
        Err(error) => warn!(
            %error,
            "could not calibrate the kernel programs' clock: they read it with a helper call, \
             which is slower"
        ),
    }
    Ok(())
}

/// Whether TC egress attaches as a TCX link (Linux 6.6) rather than a netlink clsact filter.
/// Same test as aya's (an unreadable version means netlink).
pub(crate) fn tcx_available() -> bool {
    aya::util::KernelVersion::current()
        .is_ok_and(|version| version >= aya::util::KernelVersion::new(6, 6, 0))
}

impl Enforcer {
    /// Loads the programs with maps sized from `artifact` and fills the maps with it.
    pub fn load(artifact: &Artifact) -> Result<Self, LoadError> {
        Self::load_with(artifact, EventOptions::default())
    }

    pub fn load_with(artifact: &Artifact, events: EventOptions) -> Result<Self, LoadError> {
        Self::load_object(artifact, events, EBPF_OBJECT)
    }

    /// As [`Enforcer::load_with`], with the kernel programs of `object` instead of this build's:
    /// for measuring a change to them against the build before it, side by side in one process
    /// (`cargo xtask bench --baseline-object`). `object` needs this build's maps and programs.
    pub fn load_object(
        artifact: &Artifact,
        events: EventOptions,
        object: &[u8],
    ) -> Result<Self, LoadError> {
        raise_memlock_limit();
        let settings = &artifact.settings;
        let sizes: Vec<_> = sizing_needs(artifact)
            .into_iter()
            .map(|(names, entries)| (names, with_headroom(entries)))
            .collect();
        let mut loader = EbpfLoader::new();
        for &(names, size) in &sizes {
            for name in names {
                loader.map_max_entries(name, map_size(name, size));
            }
        }
        // Exactly as configured: "full" must mean what the policy says.
        loader.map_max_entries(map_names::CONNTRACK, settings.conntrack_max_entries);
        loader.map_max_entries(map_names::FRAGMENTS, settings.fragments_max_entries);
        loader.map_max_entries(map_names::FLOW_FILTER, flow_filter_lines(settings));
        let mut ebpf = loader.load(object)?;
        load_programs(&mut ebpf)?;
        let mut enforcer = Self::with_loaded(
            ebpf,
            artifact,
            events,
            sizes,
            settings.conntrack_max_entries,
        );
        enforcer.replace_policy(artifact)?;
        // This loader created the maps: the inactive slot's pair table has never counted.
        enforcer.inactive_pair_table_empty = true;
        Ok(enforcer)
    }

    /// Loaded programs and maps that hold no policy yet.
    pub(crate) fn with_loaded(
        ebpf: Ebpf,
        artifact: &Artifact,
        events: EventOptions,
        sizes: Vec<(&'static [&'static str; 2], u32)>,
        conntrack_capacity: u32,
    ) -> Self {
        Self {
            ebpf,
            revision: artifact.revision.clone(),
            generation: 0,
            // Slot 1 "was" active, so the first policy goes into slot 0.
            active_slot: 1,
            // No program is attached yet.
            inactive_slot_may_be_read: false,
            inactive_pair_table_empty: false,
            config: Config::default(),
            events,
            sizes,
            usage: Vec::new(),
            conntrack_capacity,
            attachments: Vec::new(),
            pins: None,
            grants: Vec::new(),
            segment_names: Vec::new(),
            unplaced_grants: Vec::new(),
        }
    }

    /// The `CONFIG` entry of `artifact` as policy generation `generation`, with this daemon's
    /// event options.
    pub(crate) fn config_for(&self, artifact: &Artifact, generation: u32) -> Config {
        self.config_with(artifact, generation, |name| self.capacity(name))
    }

    /// [`Enforcer::config_for`] with the tables' capacities given by `capacity`.
    fn config_with(
        &self,
        artifact: &Artifact,
        generation: u32,
        capacity: impl Fn(&'static str) -> u32,
    ) -> Config {
        let mut config = artifact.kernel_config(generation);
        // A family's subnets at most 8 bits shorter than a host go into its host table, address
        // by address, when they fit there beside the hosts; the rest into its block table,
        // block by block, when they fit there. The kernel walks the trie, which holds every
        // subnet still, only for what neither holds (`policy_maps::address_entries`).
        let [v4, v6] = subnet_address_counts(artifact);
        let v4_entries = || artifact.addr_v4_entries().map(|e| e.0);
        let v6_entries = || artifact.addr_v6_entries().map(|e| e.0);
        place_subnets(
            &mut config,
            &FamilyTables::V4,
            SubnetCounts::of(v4_entries(), HOST_PREFIX_V4, v4),
            (
                capacity(map_names::HOSTS_V4[0]),
                capacity(map_names::BLOCKS_V4[0]),
            ),
            |in_hosts| artifact.prefix_blocks_v4(in_hosts).map(|b| b.summary()),
        );
        place_subnets(
            &mut config,
            &FamilyTables::V6,
            SubnetCounts::of(v6_entries(), HOST_PREFIX_V6, v6),
            (
                capacity(map_names::HOSTS_V6[0]),
                capacity(map_names::BLOCKS_V6[0]),
            ),
            |in_hosts| artifact.prefix_blocks_v6(in_hosts).map(|b| b.summary()),
        );
        config.event_interval_ns = self.events.interval.as_nanos() as u64;
        config.event_flags = if self.events.report_allowed {
            event_flags::REPORT_ALLOWED
        } else {
            0
        };
        config
    }

    /// Takes over the policy state of maps another daemon filled: `slot` judges packets with
    /// `config` (generation included).
    pub(crate) fn adopt_slot(&mut self, slot: usize, config: Config) {
        self.active_slot = slot;
        // The other daemon may have switched slots a moment ago.
        self.inactive_slot_may_be_read = true;
        self.inactive_pair_table_empty = false;
        self.generation = config.generation;
        self.config = config;
    }

    /// Records `artifact` as the policy in force, when the active slot already holds it.
    pub(crate) fn keep_policy(&mut self, artifact: &Artifact) -> Result<(), PolicyMapError> {
        let addresses = policy_maps::address_entries(artifact, &self.config)?;
        self.segment_names = artifact.segments.iter().map(|s| s.name.clone()).collect();
        self.revision = artifact.revision.clone();
        self.usage = usage_of(artifact, &addresses);
        Ok(())
    }

    /// Loads `artifact` as the next generation: writes it into the inactive slot while the
    /// active one keeps judging, then switches slots with one map write, so every packet is
    /// judged entirely by the old or the new policy. Tracked flows follow the new policy's
    /// `on_policy_change`. Returns how long the switch took from start to the new policy being
    /// live.
    pub fn replace_policy(&mut self, artifact: &Artifact) -> Result<Duration, LoadError> {
        let started = Instant::now();
        for (names, needed) in policy_needs(artifact) {
            let capacity = self.capacity(names[0]);
            if needed > capacity as usize {
                return Err(LoadError::TooLarge {
                    map: names[0],
                    needed,
                    capacity,
                });
            }
        }
        let target = 1 - self.active_slot;
        let generation = self.generation + 1;
        let config = self.config_for(artifact, generation);
        // Worked out again only when the trie is walked: placing blocks is dear for large
        // subnet policies, and nearly every reload walks no trie.
        if [&FamilyTables::V4, &FamilyTables::V6]
            .into_iter()
            .any(|tables| trie_walk(&config, tables) != TrieWalk::None)
        {
            warn_of_trie_walks(
                &config,
                &self.config_with(artifact, generation, |_| u32::MAX),
            );
        }
        let segment_names: Vec<String> = artifact.segments.iter().map(|s| s.name.clone()).collect();
        // Renumbering never puts more ranges on a pair, so grants that fit before fit now.
        let grants = breakglass::kernel_entries(&segment_names, &self.grants)?;
        self.wait_until_inactive_slot_unread()?;
        // From the switch on, programs count in that table, and the other one holds counts.
        self.inactive_pair_table_empty = false;
        let addresses = policy_maps::address_entries(artifact, &config)?;
        policy_maps::write(&mut self.ebpf, target, artifact, &config, &addresses)?;
        policy_maps::write_breakglass(&mut self.ebpf, target, &grants.entries)?;
        policy_maps::activate(&mut self.ebpf, target)?;
        self.inactive_slot_may_be_read = true;
        self.segment_names = segment_names;
        self.unplaced_grants = grants.unplaced;
        self.active_slot = target;
        self.generation = generation;
        self.config = config;
        self.revision = artifact.revision.clone();
        self.usage = usage_of(artifact, &addresses);
        Ok(started.elapsed())
    }

    /// Puts `grants` in force instead of the grants in force now, in the active slot: each
    /// segment pair's grants change with one map update. Refused, changing nothing, when they do
    /// not fit the kernel's map. Returns the ids of grants that name a segment the active
    /// policy does not have, which are not written. A revoked grant's flows must then be
    /// expired with [`Enforcer::expire_breakglass_flows`].
    pub fn set_grants(&mut self, grants: Vec<Grant>) -> Result<Vec<u32>, LoadError> {
        let entries = breakglass::kernel_entries(&self.segment_names, &grants)?;
        policy_maps::write_breakglass(&mut self.ebpf, self.active_slot, &entries.entries)?;
        self.grants = grants;
        self.unplaced_grants = entries.unplaced.clone();
        Ok(entries.unplaced)
    }

    /// Whether `grants` would fit the kernel's map under the active policy, without writing
    /// anything; returns the ids of those that name a segment it does not have.
    pub fn check_grants(&self, grants: &[Grant]) -> Result<Vec<u32>, CapacityError> {
        breakglass::kernel_entries(&self.segment_names, grants).map(|entries| entries.unplaced)
    }

    /// The break-glass grants in force (expired ones until they are removed).
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Grants that name a segment the active policy does not have (after a reload that removed
    /// it): they open nothing.
    pub fn unplaced_grants(&self) -> &[u32] {
        &self.unplaced_grants
    }

    /// Expires the tracked flows that break-glass grant `grant` admitted: their next packet is
    /// judged again, and dropped unless something else allows the flow. Returns how many. It
    /// first waits for programs still running with the grant as it was before
    /// [`Enforcer::set_grants`]: one may be about to create a flow's state under it.
    pub fn expire_breakglass_flows(&mut self, grant: u32) -> Result<usize, SweepError> {
        quiesce::wait_for_running_programs()?;
        conntrack::expire_breakglass_flows(&mut self.ebpf, grant)
    }

    /// Entries the loaded policy uses in each policy map (by slot-0 name).
    pub fn policy_map_usage(&self) -> &[(&'static str, usize)] {
        &self.usage
    }

    /// Capacity of the connection table.
    pub fn conntrack_capacity(&self) -> u32 {
        self.conntrack_capacity
    }

    /// Empties the inactive slot, so the next reload writes into empty maps. It first waits
    /// until no packet that was being judged by that slot when it was switched out is still
    /// running (milliseconds, once per reload).
    pub fn clear_inactive_slot(&mut self) -> Result<(), LoadError> {
        self.wait_until_inactive_slot_unread()?;
        policy_maps::clear(&mut self.ebpf, 1 - self.active_slot)?;
        Ok(())
    }

    /// Waits, if the inactive slot has been active since the last wait, until no program can
    /// still be judging with it: only then may its maps change.
    fn wait_until_inactive_slot_unread(&mut self) -> Result<(), LoadError> {
        if self.inactive_slot_may_be_read {
            let took = quiesce::wait_for_running_programs()?;
            debug!(?took, "waited for programs judging with the previous slot");
            self.inactive_slot_may_be_read = false;
        }
        Ok(())
    }

    /// The event ring buffer, for the daemon's reader (it can be taken once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.ebpf
            .take_map(map_names::EVENTS)
            .and_then(|map| RingBuf::try_from(map).ok())
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Capacity of a policy map (named by its slot-0 name).
    pub fn capacity(&self, map: &str) -> u32 {
        self.sizes
            .iter()
            .find(|(names, _)| names[0] == map)
            .map_or(0, |(_, size)| *size)
    }

    pub fn active_slot(&self) -> usize {
        self.active_slot
    }

    /// Attaches ingress XDP (native, or generic with a warning when the driver lacks it) and
    /// egress TC to `iface`.
    pub fn attach(&mut self, iface: &str) -> Result<Attachment, LoadError> {
        let attach_error = |source| LoadError::Attach {
            iface: iface.to_string(),
            source,
        };
        let (_, xdp_mode) = self.attach_xdp(iface)?;
        // aya uses TCX from 6.6 on (a link owned by this process) and a netlink clsact filter
        // before, which no process owns: it survives a daemon that dies without detaching.
        let tc_mode = if tcx_available() {
            "tcx"
        } else {
            if let Err(error) = tc::qdisc_add_clsact(iface) {
                debug!(%iface, %error, "clsact qdisc not added (present already)");
            }
            // A filter left by a daemon that died without detaching would keep judging with
            // its own orphaned maps, in front of ours.
            if tc::qdisc_detach_program(iface, TcAttachType::Egress, program_names::TC_EGRESS)
                .is_ok()
            {
                warn!(%iface, "removed a TC egress filter left by an earlier enforcer");
            }
            warn!(
                %iface,
                "kernel before 6.6 (no TCX): TC egress is a clsact filter that stays attached if \
                 the daemon is killed without its clean shutdown (SIGKILL, crash); the next start \
                 removes it, or `tc filter del dev {iface} egress` does"
            );
            "clsact"
        };
        program_mut::<SchedClassifier>(&mut self.ebpf, program_names::TC_EGRESS)?
            .attach(iface, TcAttachType::Egress)
            .map_err(attach_error)?;
        info!(%iface, xdp_mode, tc_mode, "attached (XDP ingress, TC egress)");
        Ok(self.record_attachment(iface, xdp_mode))
    }

    pub(crate) fn record_attachment(&mut self, iface: &str, xdp_mode: &'static str) -> Attachment {
        let attachment = Attachment {
            iface: iface.to_string(),
            xdp_mode,
        };
        self.attachments.push(attachment.clone());
        attachment
    }

    /// Attaches ingress XDP to `iface`: native, or generic with a warning when the driver lacks
    /// it. Returns the link and the mode.
    pub(crate) fn attach_xdp(
        &mut self,
        iface: &str,
    ) -> Result<(XdpLinkId, &'static str), LoadError> {
        let attach_error = |source| LoadError::Attach {
            iface: iface.to_string(),
            source,
        };
        let xdp = program_mut::<Xdp>(&mut self.ebpf, program_names::XDP_INGRESS)?;
        match xdp.attach(iface, XdpMode::Driver) {
            Ok(link) => Ok((link, "native")),
            Err(native_error) => {
                warn!(%iface, error = %native_error, "native XDP not available, falling back to generic XDP (slower)");
                let link = xdp.attach(iface, XdpMode::Skb).map_err(attach_error)?;
                Ok((link, "generic"))
            }
        }
    }

    /// The pin directory, when the programs are pinned (`--persist`).
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        self.pins.as_ref().map(|pins| pins.root())
    }

    /// The ingress XDP program, for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&self) -> Result<&Xdp, LoadError> {
        program(&self.ebpf, program_names::XDP_INGRESS)
    }

    /// Pins the ingress XDP program at `path` on a bpffs (for a second handle on it).
    pub fn pin_xdp_program(&mut self, path: &std::path::Path) -> Result<(), LoadError> {
        program_mut::<Xdp>(&mut self.ebpf, program_names::XDP_INGRESS)?
            .pin(path)
            .map_err(|error| LoadError::Program {
                name: program_names::XDP_INGRESS,
                source: ProgramError::IOError(std::io::Error::other(error.to_string())),
            })
    }

    /// The egress TC program, for `BPF_PROG_TEST_RUN`.
    pub fn tc_program(&self) -> Result<&SchedClassifier, LoadError> {
        program(&self.ebpf, program_names::TC_EGRESS)
    }

    /// Outcome counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, CounterError> {
        counters::read(&self.ebpf)
    }

    /// One outcome counter of one direction, summed over CPUs.
    pub fn counter(&self, dir: u32, counter: u32) -> Result<u64, CounterError> {
        counters::read_one(&self.ebpf, dir, counter)
    }

    /// Segment-pair verdict counts of every policy generation still in the kernel, summed over
    /// CPUs (see [`counters::pair_verdicts`]).
    pub fn pair_verdicts(&self) -> Result<Vec<(PairVerdictKey, u64)>, CounterError> {
        let empty_slot = self
            .inactive_pair_table_empty
            .then_some(1 - self.active_slot);
        counters::pair_verdicts(&self.ebpf, empty_slot)
    }

    /// Takes the segment-pair counts of earlier policy generations out of the kernel, once no
    /// program judges with them (see [`counters::take_old_pair_verdicts`]).
    pub fn take_old_pair_verdicts(&mut self) -> Result<Vec<(PairVerdictKey, u64)>, LoadError> {
        self.wait_until_inactive_slot_unread()?;
        let (taken, table_emptied) = counters::take_old_pair_verdicts(
            &mut self.ebpf,
            1 - self.active_slot,
            self.generation,
        )?;
        self.inactive_pair_table_empty = table_emptied;
        Ok(taken)
    }

    /// How many new flows rule `rule_index` of the active policy admitted, summed over CPUs.
    pub fn rule_hits(&self, rule_index: u32) -> Result<u64, CounterError> {
        counters::rule_hits(&self.ebpf, self.active_slot, rule_index)
    }

    /// Removes expired connection and fragment state; returns how many flows and fragments.
    /// Takes the filter in front of the connection table out of the loaded maps, set up and
    /// disabled; its first [`FlowFilter::rebuild`] enables it. The daemon does this once its
    /// programs are attached. Once only: later calls fail.
    ///
    /// [`FlowFilter::rebuild`]: crate::flow_filter::FlowFilter::rebuild
    pub fn take_flow_filter(
        &mut self,
    ) -> Result<crate::flow_filter::FlowFilter, crate::flow_filter::FlowFilterError> {
        crate::flow_filter::FlowFilter::take(&mut self.ebpf)
    }

    pub fn sweep_expired(&mut self) -> Result<(usize, usize), SweepError> {
        conntrack::sweep(&mut self.ebpf, &self.config)
    }

    /// Number of tracked flows.
    pub fn tracked_flows(&self) -> Result<usize, SweepError> {
        conntrack::tracked_flows(&self.ebpf)
    }

    pub fn revision(&self) -> &str {
        &self.revision
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }
}

/// A family's bits of [`Config::lookup_flags`] and its block length's place in [`Config`].
struct FamilyTables {
    prefixes: u8,
    subnets_in_hosts: u8,
    outside_blocks: u8,
    block_len: fn(&mut Config) -> &mut u8,
}

impl FamilyTables {
    const V4: Self = Self {
        prefixes: lookup_flags::V4_PREFIXES,
        subnets_in_hosts: lookup_flags::V4_SUBNETS_IN_HOSTS,
        outside_blocks: lookup_flags::V4_PREFIXES_OUTSIDE_BLOCKS,
        block_len: |config| &mut config.block_len_v4,
    };
    const V6: Self = Self {
        prefixes: lookup_flags::V6_PREFIXES,
        subnets_in_hosts: lookup_flags::V6_SUBNETS_IN_HOSTS,
        outside_blocks: lookup_flags::V6_PREFIXES_OUTSIDE_BLOCKS,
        block_len: |config| &mut config.block_len_v6,
    };
}

/// How much of a family's subnets a slot's settings leave to the trie walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TrieWalk {
    /// The host and block tables answer for every address.
    None,
    /// Addresses in no block walk the trie (the blocks left some subnets out).
    OutsideBlocks,
    /// Every address not in the host table walks the trie.
    AllSubnets,
}

fn trie_walk(config: &Config, tables: &FamilyTables) -> TrieWalk {
    let block_len = *(tables.block_len)(&mut { *config });
    if config.lookup_flags & tables.prefixes == 0 {
        TrieWalk::None
    } else if block_len == 0 {
        TrieWalk::AllSubnets
    } else if config.lookup_flags & tables.outside_blocks != 0 {
        TrieWalk::OutsideBlocks
    } else {
        TrieWalk::None
    }
}

/// The families (4, 6) for which `config` leaves more subnets to the trie walk than tables with
/// room for them (`roomy`) would.
fn trie_walks(config: &Config, roomy: &Config) -> Vec<u8> {
    [(4, &FamilyTables::V4), (6, &FamilyTables::V6)]
        .into_iter()
        .filter(|(_, tables)| trie_walk(config, tables) > trie_walk(roomy, tables))
        .map(|(family, _)| family)
        .collect()
}

/// Warns when `config` leaves subnets to the trie walk that tables with room for them
/// (`roomy`) would have taken: the tables were sized for the policy the enforcer started with.
/// Never wrong, only slower, and a restart (with `--persist` too) sizes them anew.
fn warn_of_trie_walks(config: &Config, roomy: &Config) {
    for family in trie_walks(config, roomy) {
        warn!(
            family,
            "the IPv{family} host and block tables sized when the enforcer started have no \
             room for this policy's subnets: some are judged by a walk of the prefix trie \
             (the same verdicts, more time per packet) until the enforcer is restarted, which \
             sizes the tables for the policy (with --persist too, without a gap)"
        );
    }
}

/// A family's address entries as [`place_subnets`] needs them counted.
struct SubnetCounts {
    hosts: usize,
    /// Subnets more than `SUBNET_EXPANSION_BITS` shorter than a host.
    short_subnets: usize,
    /// The addresses of the others, if the host table can take them (`subnet_address_counts`).
    long_subnet_addresses: Option<usize>,
}

impl SubnetCounts {
    fn of(prefix_lens: impl Iterator<Item = u32>, full: u32, long: Option<usize>) -> Self {
        let (mut hosts, mut short_subnets) = (0, 0);
        for len in prefix_lens {
            if len == full {
                hosts += 1;
            } else if full - len > SUBNET_EXPANSION_BITS {
                short_subnets += 1;
            }
        }
        Self {
            hosts,
            short_subnets,
            long_subnet_addresses: long,
        }
    }
}

/// Sets in `config` where a family's subnets are for the kernel: the long ones' addresses in
/// the host table when they fit its capacity (`capacities.0`), the others' blocks in the block
/// table when they fit its (`capacities.1`). `blocks(long_subnets_in_hosts)` gives the blocks'
/// (length, count, complete).
fn place_subnets(
    config: &mut Config,
    family: &FamilyTables,
    counts: SubnetCounts,
    (host_capacity, block_capacity): (u32, u32),
    blocks: impl FnOnce(bool) -> Option<(u32, usize, bool)>,
) {
    if config.lookup_flags & family.prefixes == 0 {
        return;
    }
    let in_hosts = counts
        .long_subnet_addresses
        .is_some_and(|n| n > 0 && counts.hosts + n <= host_capacity as usize);
    if in_hosts {
        config.lookup_flags |= family.subnets_in_hosts;
        if counts.short_subnets == 0 {
            config.lookup_flags &= !family.prefixes;
            return;
        }
    }
    if let Some((len, count, complete)) = blocks(in_hosts)
        && count <= block_capacity as usize
    {
        *(family.block_len)(config) = len as u8;
        if !complete {
            config.lookup_flags |= family.outside_blocks;
        }
    }
}

/// Entries each policy map holds: unlike [`policy_needs`], split between a host table and its
/// trie as `policy_maps::write` splits `addresses` (the subnets' addresses in the host table
/// too, where the slot's settings say so).
fn usage_of(
    artifact: &Artifact,
    addresses: &policy_maps::AddressEntries,
) -> Vec<(&'static str, usize)> {
    let full = |prefix_len: u32, full: u32| prefix_len == full;
    let (hosts_v4, hosts_v6) = addresses.in_host_tables();
    let trie_v4 = artifact
        .addr_v4_entries()
        .filter(|e| !full(e.0, HOST_PREFIX_V4))
        .count();
    let trie_v6 = artifact
        .addr_v6_entries()
        .filter(|e| !full(e.0, HOST_PREFIX_V6))
        .count();
    let ports_exact = artifact
        .port_entries()
        .filter(|e| full(e.0, PORT_EXACT_PREFIX))
        .count();
    let counts = artifact.entry_counts();
    policy_needs(artifact)
        .iter()
        // Holds only what the pair table had no room for: nearly always nothing.
        .filter(|(names, _)| names[0] != map_names::PAIRS_OVERFLOW[0])
        .map(|&(names, needed)| {
            let used = match names[0] {
                name if name == map_names::HOSTS_V4[0] => hosts_v4,
                name if name == map_names::HOSTS_V6[0] => hosts_v6,
                name if name == map_names::BLOCKS_V4[0] => addresses.blocks_v4.len(),
                name if name == map_names::BLOCKS_V6[0] => addresses.blocks_v6.len(),
                name if name == map_names::ADDR_V4[0] => trie_v4,
                name if name == map_names::ADDR_V6[0] => trie_v6,
                name if name == map_names::PORTS_EXACT[0] => ports_exact,
                name if name == map_names::PORTS[0] => counts.ports - ports_exact,
                _ => needed,
            };
            (names[0], used)
        })
        .collect()
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones to the memory cgroup.
pub(crate) fn raise_memlock_limit() {
    let charged_to_memlock = aya::util::KernelVersion::current()
        .map(|version| version < aya::util::KernelVersion::new(5, 11, 0))
        .unwrap_or(true);
    if !charged_to_memlock {
        return;
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        warn!("could not raise RLIMIT_MEMLOCK; loading large policies may fail on this kernel");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Config` of 10 IPv4 hosts and four /24s (1,024 addresses, or 4 blocks of /24) placed
    /// in tables of `hosts` and `blocks` entries.
    fn placed(hosts: u32, blocks: u32) -> Config {
        let mut config = Config {
            lookup_flags: lookup_flags::V4_PREFIXES,
            ..Config::default()
        };
        let entries = (0..10).map(|_| HOST_PREFIX_V4).chain((0..4).map(|_| 24));
        place_subnets(
            &mut config,
            &FamilyTables::V4,
            SubnetCounts::of(entries, HOST_PREFIX_V4, Some(1024)),
            (hosts, blocks),
            |_| Some((24, 4, true)),
        );
        config
    }

    #[test]
    fn subnets_left_to_the_trie_for_lack_of_room_are_reported() {
        let roomy = placed(u32::MAX, u32::MAX);
        assert_eq!(trie_walk(&roomy, &FamilyTables::V4), TrieWalk::None);
        // Addresses do not fit, blocks do: no walk either way.
        assert_eq!(trie_walks(&placed(100, 100), &roomy), Vec::<u8>::new());
        // Neither fits: every subnet walks the trie.
        assert_eq!(trie_walks(&placed(100, 3), &roomy), vec![4]);
        // A policy that walks the trie with room too is not reported.
        assert_eq!(
            trie_walks(&placed(100, 3), &placed(100, 3)),
            Vec::<u8>::new()
        );
    }
}
