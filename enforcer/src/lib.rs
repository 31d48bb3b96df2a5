//! The enforcer daemon as a library, split by duty: `loader` (load the kernel programs and
//! attach them), `policy_maps` (write a compiled policy into a slot and switch slots),
//! `conntrack` (sweep idle flow state), `flow_filter` (rebuild the filter in front of the
//! connection table), `exact_table` (build the host, pair and
//! single-port tables), `counters` (read the outcome counters), `events` (the
//! flow stream), `metrics` (Prometheus), `daemon` (the running enforcer: reload, metrics,
//! events), `persist` (pinning for `run --persist`, adoption, `enforcer detach`), `control`
//! (the Unix control socket), `audit` (the hash-chained audit log), `state` (what survives a
//! restart), `quarantine`, `quiesce` (waiting for programs still running with what a change
//! replaced). `main.rs` is a thin CLI over it.
pub mod audit;
mod bpf_syscall;
pub mod breakglass;
pub mod clock;
pub mod conntrack;
pub mod control;
pub mod counters;
pub mod daemon;
pub mod events;
pub mod exact_table;
pub mod flow_filter;
pub mod loader;
mod mapped;
pub mod metrics;
pub mod persist;
pub mod policy_maps;
pub mod quarantine;
pub mod quiesce;
pub mod state;

pub use counters::Counters;
pub use loader::{Attachment, Enforcer, EventOptions, LoadError};
// Observability (issue 4 helper): the HTTP endpoints, the flow log and `enforcer observe`.
pub mod flow_log;
pub mod http;
pub mod observe;
