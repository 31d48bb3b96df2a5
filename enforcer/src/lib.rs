//! The enforcer daemon as a library, split by duty: `loader` (load the kernel programs and
//! attach them), `policy_maps` (write a compiled policy into the kernel maps), `conntrack`
//! (sweep expired flow state), `counters` (read the outcome counters). `main.rs` is a thin CLI
//! over it.
pub mod conntrack;
pub mod counters;
pub mod loader;
pub mod policy_maps;

pub use counters::Counters;
pub use loader::{Attachment, Enforcer, LoadError};
