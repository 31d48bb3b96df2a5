//! Loading the kernel programs with maps sized for the policy, and attaching them to
//! interfaces. Dropping an [`Enforcer`] detaches every program it attached.
use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, Xdp, XdpMode},
};
use enforcer_common::{map_names, program_names};
use policy_compiler::Artifact;
use tracing::{info, warn};

use crate::{
    counters::{self, Counters},
    policy_maps::{self, PolicyMapError},
};

/// The kernel programs, built by `build.rs` for the BPF target.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

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
    #[error(transparent)]
    PolicyMaps(#[from] PolicyMapError),
}

/// How a program ended up attached to an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub iface: String,
    /// `native` (driver) or `generic` (skb) XDP.
    pub mode: &'static str,
}

/// Loaded kernel programs and maps holding one compiled policy.
pub struct Enforcer {
    ebpf: Ebpf,
    revision: String,
    attachments: Vec<Attachment>,
}

/// Capacity for `entries` map entries, with headroom so that a somewhat larger policy fits
/// the same maps.
fn with_headroom(entries: usize) -> u32 {
    let entries = u32::try_from(entries).unwrap_or(u32::MAX / 2);
    entries.saturating_add(entries / 2).max(64)
}

impl Enforcer {
    /// Loads the programs with maps sized from `artifact` and fills the maps with it.
    pub fn load(artifact: &Artifact) -> Result<Self, LoadError> {
        raise_memlock_limit();
        let counts = artifact.entry_counts();
        let sizes = [
            (map_names::ADDR_V4, with_headroom(counts.addr_v4)),
            (map_names::ADDR_V6, with_headroom(counts.addr_v6)),
            (map_names::SEGMENTS, with_headroom(counts.segments)),
            (map_names::PAIRS, with_headroom(counts.pairs)),
            (map_names::PORTS, with_headroom(counts.ports)),
            (map_names::RULE_HITS, with_headroom(counts.rules)),
        ];
        let mut loader = EbpfLoader::new();
        for (name, size) in sizes {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let program: &mut Xdp = ebpf
            .program_mut(program_names::XDP_INGRESS)
            .ok_or(LoadError::MissingProgram(program_names::XDP_INGRESS))?
            .try_into()
            .map_err(|source| LoadError::Program {
                name: program_names::XDP_INGRESS,
                source,
            })?;
        program.load().map_err(|source| LoadError::Program {
            name: program_names::XDP_INGRESS,
            source,
        })?;
        policy_maps::write(&mut ebpf, artifact)?;
        Ok(Self {
            ebpf,
            revision: artifact.revision.clone(),
            attachments: Vec::new(),
        })
    }

    /// Attaches the ingress program to `iface`: native XDP, or generic XDP with a warning when
    /// the driver has no native support.
    pub fn attach(&mut self, iface: &str) -> Result<Attachment, LoadError> {
        let program = self.xdp_program_mut()?;
        let mode = match program.attach(iface, XdpMode::Driver) {
            Ok(_) => "native",
            Err(native_error) => {
                warn!(%iface, error = %native_error, "native XDP not available, falling back to generic XDP (slower)");
                program
                    .attach(iface, XdpMode::Skb)
                    .map_err(|source| LoadError::Attach {
                        iface: iface.to_string(),
                        source,
                    })?;
                "generic"
            }
        };
        info!(%iface, mode, "attached");
        let attachment = Attachment {
            iface: iface.to_string(),
            mode,
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
            .map_err(|source| LoadError::Program {
                name: program_names::XDP_INGRESS,
                source,
            })
    }

    fn xdp_program_mut(&mut self) -> Result<&mut Xdp, LoadError> {
        self.ebpf
            .program_mut(program_names::XDP_INGRESS)
            .ok_or(LoadError::MissingProgram(program_names::XDP_INGRESS))?
            .try_into()
            .map_err(|source| LoadError::Program {
                name: program_names::XDP_INGRESS,
                source,
            })
    }

    /// Verdict counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, counters::CounterError> {
        counters::read(&self.ebpf)
    }

    /// How many packets rule `rule_index` allowed, summed over CPUs.
    pub fn rule_hits(&self, rule_index: u32) -> Result<u64, counters::CounterError> {
        counters::rule_hits(&self.ebpf, rule_index)
    }

    pub fn revision(&self) -> &str {
        &self.revision
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
