//! Enforcement changes made at run time rather than in Git: hosts moved into the built-in
//! `quarantine` segment and break-glass grants. They are part of the specification: the
//! reference evaluator ([`Policy::evaluate_with`]) and the stateful model take them into account
//! exactly as the kernel must.

use std::{collections::BTreeSet, net::IpAddr};

use crate::{Decision, Flow, Policy, model::PortMatch};

/// The built-in segment that quarantined hosts are moved into.
pub const QUARANTINE: &str = "quarantine";

/// Run-time overrides of the policy in Git.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Addresses moved into the `quarantine` segment.
    pub quarantined: BTreeSet<IpAddr>,
    /// Break-glass grants, expired ones included until they are removed.
    pub grants: Vec<Grant>,
}

/// A break-glass grant: members of segment `from` may reach members of segment `to` on `ports`
/// until `expires_ns` (see [`crate::breakglass`] for the exact semantics). Ids are unique and
/// never 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub id: u32,
    pub from: String,
    pub to: String,
    pub ports: Vec<PortMatch>,
    /// CLOCK_MONOTONIC_COARSE time (the kernel programs' clock) at which it ends.
    pub expires_ns: u64,
}

impl Policy {
    /// The reference verdict on `flow` at CLOCK_MONOTONIC_COARSE time `now_ns`, with run-time
    /// overrides in force. With no overrides it is [`Policy::evaluate`].
    pub fn evaluate_with(&self, flow: &Flow, overrides: &Overrides, now_ns: u64) -> Decision {
        // Quarantine: a quarantined address is in the quarantine segment, as source and as
        // destination (see `crate::model` for what it matches as a source).
        let src = self.placement(flow.src, &overrides.quarantined);
        let dst = self.placement(flow.dst, &overrides.quarantined);
        let decision = self.evaluate_placed(flow, src, dst);
        // Break-glass grants last: they only turn a denial (or audit) into an allow, and see
        // the segments after quarantine (quarantine wins: no grant names it).
        self.apply_grants(decision, flow, overrides, now_ns)
    }
}
