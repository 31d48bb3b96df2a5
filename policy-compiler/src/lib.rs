//! Validates the segment policy (one YAML file per segment) and compiles it into the contents
//! of the enforcer's kernel maps (`enforcer-common` defines their layout).
//!
//! - [`Policy::load_dir`] / [`Policy::from_sources`] read and validate a policy; see
//!   [`model`] for the language and its semantics.
//! - [`Policy::evaluate`] is the reference evaluator the kernel is tested against.
//! - [`compile()`] produces the deterministic [`Artifact`] that the daemon loads.
//! - Review tools, all built on the reference evaluator: [`reachability`] (who may reach whom,
//!   exactly), [`diff`] (what a change opens or closes), [`reachability_tests`] (assertions kept
//!   next to the policy), [`graph`] (the connectivity picture), [`schema`] (JSON Schema for
//!   editors), [`policy_source`] (a directory, or `REV:DIR` in Git).
//! - Monitor-mode rollout, from the enforcer's flow log ([`flow_log`]): [`impact`] (which
//!   observed flows enforcing would deny) and [`suggest`] (allow rules for what a monitored
//!   segment received).
//!
//! This crate never depends on aya and makes no Linux-specific calls, so it runs in plain CI.

pub mod artifact;
pub mod breakglass;
pub mod compile;
pub mod diff;
pub mod error;
pub mod evaluate;
pub mod flow_log;
pub mod graph;
pub mod impact;
mod load;
pub mod model;
pub mod overrides;
pub mod packet;
pub mod policy_source;
pub mod port_set;
pub mod prefix;
pub mod reachability;
pub mod reachability_tests;
pub mod schema;
pub mod settings;
pub mod stateful;
pub mod suggest;
mod yaml;

use std::path::Path;

pub use artifact::{Artifact, ArtifactError, EntryCounts, KernelSettings, QuarantineIds};
pub use compile::{CompileError, compile, compile_with_capacities};
pub use error::{PolicyError, PolicyErrorKind, PolicyErrors};
pub use evaluate::{Decision, Flow, Verdict};
pub use load::{ReadCache, ReadCacheUse};
pub use model::{Capacities, Intra, Mode, Policy, PortMatch, Rule, RuleKind, Segment, Source};
pub use overrides::{Grant, Overrides};
pub use prefix::Prefix;
pub use settings::{OnPolicyChange, Settings, Timeouts};

impl Policy {
    /// Reads and validates every top-level `*.yaml` / `*.yml` file of `dir` (hidden files and
    /// subdirectories such as `tests/` are ignored).
    pub fn load_dir(dir: &Path) -> Result<Policy, PolicyErrors> {
        load::load_dir(dir, &Capacities::KERNEL, None)
    }

    /// [`Policy::load_dir`], parsing only the files that `cache` does not hold as they are
    /// now; it then holds the files of `dir` that were read without an error (see
    /// [`ReadCache`]). The result is the same with or without the cache.
    pub fn load_dir_cached(dir: &Path, cache: &mut ReadCache) -> Result<Policy, PolicyErrors> {
        load::load_dir(dir, &Capacities::KERNEL, Some(cache))
    }

    /// Validates policy files given as (file name as it should appear in errors, e.g.
    /// `segments/pacs.yaml`, content).
    pub fn from_sources(sources: &[(String, String)]) -> Result<Policy, PolicyErrors> {
        load::load_sources(sources, &Capacities::KERNEL, None)
    }

    /// [`Policy::from_sources`] with a [`ReadCache`], as [`Policy::load_dir_cached`].
    pub fn from_sources_cached(
        sources: &[(String, String)],
        cache: &mut ReadCache,
    ) -> Result<Policy, PolicyErrors> {
        load::load_sources(sources, &Capacities::KERNEL, Some(cache))
    }

    /// Like [`Policy::from_sources`], with other map capacities (used to test the check).
    pub fn from_sources_with_capacities(
        sources: &[(String, String)],
        capacities: &Capacities,
    ) -> Result<Policy, PolicyErrors> {
        load::load_sources(sources, capacities, None)
    }
}
