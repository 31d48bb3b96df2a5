//! Loading the kernel programs with maps sized for the policy, and attaching them to
//! interfaces: XDP on ingress, TC on egress. Dropping an [`Enforcer`] detaches everything it
//! attached.
use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, tc},
};
use enforcer_common::{Config, map_names, program_names};
use policy_compiler::Artifact;
use tracing::{debug, info, warn};

use crate::{
    conntrack::{self, SweepError},
    counters::{self, CounterError, Counters},
    policy_maps::{self, PolicyMapError},
};

/// The kernel programs, built by `build.rs` for the BPF target.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer-ebpf"));

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
}

/// How the programs ended up attached to an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub iface: String,
    /// `native` (driver) or `generic` (skb) XDP.
    pub xdp_mode: &'static str,
}

/// Loaded kernel programs and maps holding one compiled policy.
pub struct Enforcer {
    ebpf: Ebpf,
    revision: String,
    generation: u32,
    config: Config,
    sizes: Vec<(&'static str, u32)>,
    attachments: Vec<Attachment>,
}

/// Capacity for `entries` policy map entries, with headroom so that a somewhat larger policy
/// fits the same maps on reload.
fn with_headroom(entries: usize) -> u32 {
    let entries = u32::try_from(entries).unwrap_or(u32::MAX / 2);
    entries.saturating_add(entries / 2).max(64)
}

fn program_error(name: &'static str) -> impl Fn(ProgramError) -> LoadError {
    move |source| LoadError::Program { name, source }
}

impl Enforcer {
    /// Loads the programs with maps sized from `artifact` and fills the maps with it.
    pub fn load(artifact: &Artifact) -> Result<Self, LoadError> {
        raise_memlock_limit();
        let counts = artifact.entry_counts();
        let settings = &artifact.settings;
        let sizes = vec![
            (map_names::ADDR_V4, with_headroom(counts.addr_v4)),
            (map_names::ADDR_V6, with_headroom(counts.addr_v6)),
            (map_names::SEGMENTS, with_headroom(counts.segments)),
            (map_names::PAIRS, with_headroom(counts.pairs)),
            (map_names::PORTS, with_headroom(counts.ports)),
            (map_names::RULE_HITS, with_headroom(counts.rules)),
            // Exactly as configured: "full" must mean what the policy says.
            (map_names::CONNTRACK, settings.conntrack_max_entries),
            (map_names::FRAGMENTS, settings.fragments_max_entries),
        ];
        let mut loader = EbpfLoader::new();
        for &(name, size) in &sizes {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let xdp: &mut Xdp = ebpf
            .program_mut(program_names::XDP_INGRESS)
            .ok_or(LoadError::MissingProgram(program_names::XDP_INGRESS))?
            .try_into()
            .map_err(program_error(program_names::XDP_INGRESS))?;
        xdp.load()
            .map_err(program_error(program_names::XDP_INGRESS))?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(program_names::TC_EGRESS)
            .ok_or(LoadError::MissingProgram(program_names::TC_EGRESS))?
            .try_into()
            .map_err(program_error(program_names::TC_EGRESS))?;
        tc.load().map_err(program_error(program_names::TC_EGRESS))?;
        let generation = 1;
        policy_maps::write(&mut ebpf, artifact, generation)?;
        Ok(Self {
            ebpf,
            revision: artifact.revision.clone(),
            generation,
            config: artifact.kernel_config(generation),
            sizes,
            attachments: Vec::new(),
        })
    }

    /// Replaces the loaded policy with `artifact` (same maps, next generation). Tracked flows
    /// follow its `on_policy_change`. Not atomic yet: packets judged during the swap may see
    /// parts of both policies.
    pub fn replace_policy(&mut self, artifact: &Artifact) -> Result<(), LoadError> {
        let counts = artifact.entry_counts();
        for (map, needed) in [
            (map_names::ADDR_V4, counts.addr_v4),
            (map_names::ADDR_V6, counts.addr_v6),
            (map_names::SEGMENTS, counts.segments),
            (map_names::PAIRS, counts.pairs),
            (map_names::PORTS, counts.ports),
            (map_names::RULE_HITS, counts.rules),
        ] {
            let capacity = self.capacity(map);
            if needed > capacity as usize {
                return Err(LoadError::TooLarge {
                    map,
                    needed,
                    capacity,
                });
            }
        }
        self.generation += 1;
        policy_maps::write(&mut self.ebpf, artifact, self.generation)?;
        self.config = artifact.kernel_config(self.generation);
        self.revision = artifact.revision.clone();
        Ok(())
    }

    fn capacity(&self, map: &str) -> u32 {
        self.sizes
            .iter()
            .find(|(name, _)| *name == map)
            .map_or(0, |(_, size)| *size)
    }

    /// Attaches ingress XDP (native, or generic with a warning when the driver lacks it) and
    /// egress TC to `iface`.
    pub fn attach(&mut self, iface: &str) -> Result<Attachment, LoadError> {
        let attach_error = |source| LoadError::Attach {
            iface: iface.to_string(),
            source,
        };
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(program_names::XDP_INGRESS)
            .ok_or(LoadError::MissingProgram(program_names::XDP_INGRESS))?
            .try_into()
            .map_err(program_error(program_names::XDP_INGRESS))?;
        let xdp_mode = match xdp.attach(iface, XdpMode::Driver) {
            Ok(_) => "native",
            Err(native_error) => {
                warn!(%iface, error = %native_error, "native XDP not available, falling back to generic XDP (slower)");
                xdp.attach(iface, XdpMode::Skb).map_err(attach_error)?;
                "generic"
            }
        };
        // Kernels before 6.6 attach TC programs through a clsact qdisc.
        if let Err(error) = tc::qdisc_add_clsact(iface) {
            debug!(%iface, %error, "clsact qdisc not added (present already, or TCX in use)");
        }
        let egress: &mut SchedClassifier = self
            .ebpf
            .program_mut(program_names::TC_EGRESS)
            .ok_or(LoadError::MissingProgram(program_names::TC_EGRESS))?
            .try_into()
            .map_err(program_error(program_names::TC_EGRESS))?;
        egress
            .attach(iface, TcAttachType::Egress)
            .map_err(attach_error)?;
        // aya uses TCX from 6.6 on (a link owned by this process) and a netlink clsact filter
        // before, which no process owns: it survives a daemon that dies without detaching.
        // Same test as aya's (an unreadable version means netlink).
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|version| version >= aya::util::KernelVersion::new(6, 6, 0));
        let tc_mode = if tcx {
            "tcx"
        } else {
            warn!(
                %iface,
                "kernel before 6.6 (no TCX): TC egress is a clsact filter that stays attached if \
                 the daemon is killed without its clean shutdown (SIGKILL, crash); then remove it \
                 with `tc filter del dev {iface} egress`"
            );
            "clsact"
        };
        info!(%iface, xdp_mode, tc_mode, "attached (XDP ingress, TC egress)");
        let attachment = Attachment {
            iface: iface.to_string(),
            xdp_mode,
        };
        self.attachments.push(attachment.clone());
        Ok(attachment)
    }

    /// The ingress XDP program, for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&self) -> Result<&Xdp, LoadError> {
        self.ebpf
            .program(program_names::XDP_INGRESS)
            .ok_or(LoadError::MissingProgram(program_names::XDP_INGRESS))?
            .try_into()
            .map_err(program_error(program_names::XDP_INGRESS))
    }

    /// The egress TC program, for `BPF_PROG_TEST_RUN`.
    pub fn tc_program(&self) -> Result<&SchedClassifier, LoadError> {
        self.ebpf
            .program(program_names::TC_EGRESS)
            .ok_or(LoadError::MissingProgram(program_names::TC_EGRESS))?
            .try_into()
            .map_err(program_error(program_names::TC_EGRESS))
    }

    /// Outcome counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, CounterError> {
        counters::read(&self.ebpf)
    }

    /// One outcome counter of one direction, summed over CPUs.
    pub fn counter(&self, dir: u32, counter: u32) -> Result<u64, CounterError> {
        counters::read_one(&self.ebpf, dir, counter)
    }

    /// How many new flows rule `rule_index` admitted, summed over CPUs.
    pub fn rule_hits(&self, rule_index: u32) -> Result<u64, CounterError> {
        counters::rule_hits(&self.ebpf, rule_index)
    }

    /// Removes expired connection and fragment state; returns how many flows and fragments.
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

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones to the memory cgroup.
fn raise_memlock_limit() {
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
