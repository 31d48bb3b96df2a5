//! Runs frames through the real XDP program with `BPF_PROG_TEST_RUN` and states, for the same
//! frame, what the reference parser and evaluator in `policy-compiler` expect.
use std::fmt;

use aya::programs::{TestRun as _, TestRunOptions};
use enforcer::{Counters, Enforcer};
use enforcer_common::counter;
use policy_compiler::{
    Policy, Verdict,
    packet::{FrameOutcome, parse_frame},
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// What happened to one frame: the XDP action, which counter it was counted under, and for an
/// allowed packet the rule that allowed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: u32,
    pub counter: u32,
    pub rule: Option<u32>,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            XDP_PASS => "PASS",
            XDP_DROP => "DROP",
            XDP_ABORTED => "ABORTED",
            _ => "?",
        };
        let counter = counter::NAMES
            .get(self.counter as usize)
            .copied()
            .unwrap_or("?");
        write!(f, "{action}/{counter}")?;
        if let Some(rule) = self.rule {
            write!(f, " rule #{rule}")?;
        }
        Ok(())
    }
}

/// The reference answer for `frame` under `policy`, with the evaluator's reason.
pub fn expected(policy: &Policy, frame: &[u8]) -> (Outcome, String) {
    let outcome = |action, counter, rule| Outcome {
        action,
        counter,
        rule,
    };
    match parse_frame(frame) {
        FrameOutcome::NonIp => (outcome(XDP_PASS, counter::NON_IP, None), "non-IP".into()),
        FrameOutcome::Malformed => (
            outcome(XDP_DROP, counter::DROP_MALFORMED, None),
            "malformed".into(),
        ),
        FrameOutcome::UnsupportedEncap => (
            outcome(XDP_DROP, counter::DROP_UNSUPPORTED_ENCAP, None),
            "stacked VLAN".into(),
        ),
        FrameOutcome::Ip(flow) => {
            let decision = policy.evaluate(&flow);
            let result = match (decision.verdict, decision.rule_index) {
                (Verdict::Allow, Some(rule)) => outcome(XDP_PASS, counter::ALLOWED, Some(rule)),
                (Verdict::Allow, None) => outcome(XDP_PASS, counter::UNENFORCED, None),
                (Verdict::Audit, _) => outcome(XDP_PASS, counter::AUDIT, None),
                (Verdict::Deny, _) => outcome(XDP_DROP, counter::DROP_POLICY_DENIED, None),
            };
            let reason = format!(
                "{flow:?}: {} -> {}: {}",
                decision.src_segment, decision.dst_segment, decision.reason
            );
            (result, reason)
        }
    }
}

fn counter_values(counters: &Counters) -> [u64; counter::COUNT as usize] {
    let mut values = [0; counter::COUNT as usize];
    values[counter::ALLOWED as usize] = counters.allowed;
    values[counter::AUDIT as usize] = counters.audit;
    values[counter::UNENFORCED as usize] = counters.unenforced;
    values[counter::NON_IP as usize] = counters.non_ip;
    values[counter::DROP_POLICY_DENIED as usize] = counters.policy_denied;
    values[counter::DROP_MALFORMED as usize] = counters.malformed;
    values[counter::DROP_UNSUPPORTED_ENCAP as usize] = counters.unsupported_encap;
    values
}

/// A loaded (not attached) enforcer holding one policy, driven with `BPF_PROG_TEST_RUN`.
pub struct KernelHarness {
    pub policy: Policy,
    pub enforcer: Enforcer,
    last_counters: Counters,
}

impl KernelHarness {
    pub fn load(policy: Policy) -> anyhow::Result<Self> {
        let artifact = policy_compiler::compile(&policy)?;
        let enforcer = Enforcer::load(&artifact)?;
        let last_counters = enforcer.counters()?;
        Ok(Self {
            policy,
            enforcer,
            last_counters,
        })
    }

    /// Runs one frame through the XDP program and reads back which counter moved and, for an
    /// allowed packet, whether the expected rule's hit counter moved.
    pub fn run(&mut self, frame: &[u8], expected_rule: Option<u32>) -> anyhow::Result<Outcome> {
        let rule_before = match expected_rule {
            Some(rule) => Some(self.enforcer.rule_hits(rule)?),
            None => None,
        };
        let result = self.enforcer.xdp_program()?.test_run(TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::default()
        })?;
        let counters = self.enforcer.counters()?;
        let before = counter_values(&self.last_counters);
        let after = counter_values(&counters);
        self.last_counters = counters;
        let moved: Vec<u32> = (0..counter::COUNT)
            .filter(|&i| after[i as usize] != before[i as usize])
            .collect();
        let counter = match moved.as_slice() {
            [one] if after[*one as usize] == before[*one as usize] + 1 => *one,
            _ => anyhow::bail!(
                "expected exactly one counter to move by one, got {moved:?} (before {before:?}, after {after:?})"
            ),
        };
        // The hit counter of the rule the evaluator names must have moved; since every allowed
        // packet counts exactly one rule hit, no other rule's did.
        let rule = match (expected_rule, rule_before) {
            (Some(rule), Some(before)) if counter == counter::ALLOWED => {
                let after = self.enforcer.rule_hits(rule)?;
                (after == before + 1).then_some(rule)
            }
            _ => None,
        };
        Ok(Outcome {
            action: result.return_value,
            counter,
            rule,
        })
    }

    /// Runs `frame` and compares with the reference; `Err` describes a disagreement.
    pub fn check(&mut self, frame: &[u8]) -> anyhow::Result<Outcome> {
        let (want, reason) = expected(&self.policy, frame);
        let got = self.run(frame, want.rule)?;
        if got != want {
            anyhow::bail!(
                "kernel and reference disagree\n  frame:     {}\n  reference: {want} ({reason})\n  kernel:    {got}",
                hex(frame)
            );
        }
        Ok(got)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
