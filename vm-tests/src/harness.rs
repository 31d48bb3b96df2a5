//! Runs frames through the real kernel programs with `BPF_PROG_TEST_RUN` (XDP for ingress, TC
//! for egress) and compares every outcome with the reference model in `policy-compiler`
//! ([`StatefulEvaluator`]), which sees the same frames in the same order.
use std::collections::HashMap;

use aya::programs::{TestRun as _, TestRunOptions};
use enforcer::{Enforcer, clock::monotonic_now_ns, flow_filter::FlowFilter};
use enforcer_common::{counter, direction};
use policy_compiler::{
    Grant, Overrides, Policy,
    stateful::{PacketOutcome, StatefulEvaluator},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
/// `TC_ACT_UNSPEC` (-1): pass, and let later TC programs run.
pub const TC_PASS: u32 = u32::MAX;
pub const TC_DROP: u32 = 2;

/// Frames shorter than Ethernet plus an IPv6 header may be refused by `BPF_PROG_TEST_RUN` for
/// TC programs.
const RUNT_SKB_LEN: usize = 14 + 40;

/// Restricts the calling thread to the CPU it is running on.
fn stay_on_this_cpu() -> anyhow::Result<()> {
    // SAFETY: no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    anyhow::ensure!(
        cpu >= 0,
        "sched_getcpu: {}",
        std::io::Error::last_os_error()
    );
    pin(0, cpu as usize)
}

/// Restricts thread or process `pid` (0: the calling thread) to `cpu`.
pub fn pin(pid: i32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; the calls only write into it or read it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::cpu_set_t>();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The return value a program gives for a packet that passes or is dropped.
pub fn action(dir: u32, passed: bool) -> u32 {
    match (dir == direction::INGRESS, passed) {
        (true, true) => XDP_PASS,
        (true, false) => XDP_DROP,
        (false, true) => TC_PASS,
        (false, false) => TC_DROP,
    }
}

/// A loaded (not attached) enforcer and the reference model, fed the same packets.
pub struct KernelHarness {
    pub enforcer: Enforcer,
    /// The filter in front of the connection table, enabled as the daemon enables it, so that
    /// every packet test runs with it.
    pub flow_filter: Option<FlowFilter>,
    pub reference: StatefulEvaluator,
    /// Counter values as last read, by direction and counter.
    shadow: [[u64; counter::COUNT as usize]; direction::COUNT as usize],
    /// Rule hit counts as last read.
    rule_shadow: HashMap<u32, u64>,
    /// The run-time overrides in force in both.
    overrides: Overrides,
    /// The kernel programs' clock (CLOCK_MONOTONIC_COARSE) when the harness was loaded: the reference model's
    /// time 0. Grant expiries are given in reference time and shifted by it for the kernel.
    epoch_ns: u64,
}

impl KernelHarness {
    /// Loads `policy` into the kernel and the reference, and keeps the calling thread on the
    /// CPU it runs on: `BPF_PROG_TEST_RUN` runs the program on the caller's CPU, and every
    /// packet of a test then meets the per-CPU state the previous ones left (the flow cache in
    /// front of the connection table, the event limiter), as the packets of one flow do.
    pub fn load(policy: Policy) -> anyhow::Result<Self> {
        stay_on_this_cpu()?;
        let artifact = policy_compiler::compile(&policy)?;
        let mut enforcer = Enforcer::load(&artifact)?;
        let mut flow_filter = enforcer.take_flow_filter()?;
        flow_filter.rebuild()?;
        let counters = enforcer.counters()?;
        let mut shadow = [[0; counter::COUNT as usize]; direction::COUNT as usize];
        for dir in 0..direction::COUNT {
            for index in 0..counter::COUNT {
                shadow[dir as usize][index as usize] = counters.get(dir, index);
            }
        }
        Ok(Self {
            enforcer,
            flow_filter: Some(flow_filter),
            reference: StatefulEvaluator::new(policy),
            shadow,
            rule_shadow: HashMap::new(),
            overrides: Overrides::default(),
            epoch_ns: monotonic_now_ns(),
        })
    }

    /// Puts `overrides` in force in the kernel, as the daemon writes them, and in the
    /// reference. Quarantine: a newly quarantined address goes into the QUARANTINE map and its
    /// tracked flows and fragments are removed (the daemon's second pass has nothing to find
    /// here: no packet runs concurrently); a released one leaves the map. Break-glass: the
    /// grants replace those in force, their expiries given in reference time (see
    /// [`KernelHarness::set_time_ns`]); returns the ids of grants the kernel did not place.
    pub fn set_overrides(&mut self, overrides: Overrides) -> anyhow::Result<Vec<u32>> {
        let kernel_grants: Vec<Grant> = overrides
            .grants
            .iter()
            .map(|grant| Grant {
                expires_ns: grant.expires_ns.saturating_add(self.epoch_ns),
                ..grant.clone()
            })
            .collect();
        let unplaced = self.enforcer.set_grants(kernel_grants)?;
        let ebpf = self.enforcer.ebpf_mut();
        for addr in overrides
            .quarantined
            .difference(&self.overrides.quarantined)
        {
            enforcer::quarantine::insert(ebpf, *addr)?;
            enforcer::quarantine::cut_flows(ebpf, *addr)?;
        }
        for addr in self
            .overrides
            .quarantined
            .difference(&overrides.quarantined)
        {
            enforcer::quarantine::remove(ebpf, *addr)?;
        }
        self.reference.set_overrides(overrides.clone());
        self.overrides = overrides;
        Ok(unplaced)
    }

    /// Revokes grant `id` as the daemon does: out of the overrides, then its flows expired.
    /// Returns how many flows it had admitted (the kernel and the reference must agree).
    pub fn revoke_grant(&mut self, id: u32) -> anyhow::Result<usize> {
        let mut overrides = self.overrides.clone();
        overrides.grants.retain(|grant| grant.id != id);
        self.set_overrides(overrides)?;
        let kernel = self.enforcer.expire_breakglass_flows(id)?;
        let reference = self.reference.expire_grant_flows(id);
        anyhow::ensure!(
            kernel == reference,
            "grant {id} had admitted {kernel} flows in the kernel, {reference} in the reference"
        );
        Ok(kernel)
    }

    /// Rebuilds the filter in front of the connection table, as the daemon does after every
    /// sweep.
    pub fn rebuild_flow_filter(&mut self) -> anyhow::Result<()> {
        if let Some(filter) = &mut self.flow_filter {
            filter.rebuild()?;
        }
        Ok(())
    }

    /// Sets the reference model's clock: `now_ns` after the harness was loaded. The kernel's
    /// clock runs by itself, so a test sleeps first.
    pub fn set_time_ns(&mut self, now_ns: u64) {
        self.reference.set_time_ns(now_ns);
    }

    /// The run-time overrides in force.
    pub fn overrides(&self) -> &Overrides {
        &self.overrides
    }

    /// Loads another policy into the same maps, and into the reference.
    pub fn replace_policy(&mut self, policy: Policy) -> anyhow::Result<()> {
        let artifact = policy_compiler::compile(&policy)?;
        self.enforcer.replace_policy(&artifact)?;
        self.reference.load(policy);
        self.rule_shadow.clear();
        Ok(())
    }

    fn rule_hits(&mut self, rule: u32) -> anyhow::Result<u64> {
        if let Some(hits) = self.rule_shadow.get(&rule) {
            return Ok(*hits);
        }
        let hits = self.enforcer.rule_hits(rule)?;
        self.rule_shadow.insert(rule, hits);
        Ok(hits)
    }

    /// Runs `frame` through the program of `dir`; returns its return value.
    pub fn run_kernel(&self, frame: &[u8], dir: u32) -> anyhow::Result<u32> {
        let options = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::default()
        };
        let result = if dir == direction::INGRESS {
            self.enforcer.xdp_program()?.test_run(options)?
        } else {
            self.enforcer.tc_program()?.test_run(options)?
        };
        Ok(result.return_value)
    }

    /// Runs `frame` in `dir` through the kernel and the reference, and checks that the kernel
    /// returned the reference's action, counted it under the reference's counter, and (for a
    /// new allowed flow) credited the reference's rule. `Err` describes a disagreement.
    pub fn check(&mut self, frame: &[u8], dir: u32) -> anyhow::Result<PacketOutcome> {
        let want = self.reference.process(frame, dir);
        let rule_before = match want.rule {
            Some(rule) => Some((rule, self.rule_hits(rule)?)),
            None => None,
        };
        let got_action = match self.run_kernel(frame, dir) {
            Ok(action) => action,
            // BPF_PROG_TEST_RUN refuses runt frames for skb programs; the stack never hands TC
            // one. Such a frame changes no state in the reference, and the kernel counted
            // nothing.
            Err(_)
                if dir == direction::EGRESS
                    && want.counter == counter::DROP_MALFORMED
                    && frame.len() < RUNT_SKB_LEN =>
            {
                return Ok(want);
            }
            Err(e) => anyhow::bail!(
                "{e:#} (frame of {} bytes on {}: {})",
                frame.len(),
                direction::NAMES[dir as usize],
                hex(frame)
            ),
        };
        let counted = self.enforcer.counter(dir, want.counter)?;
        let expected_count = self.shadow[dir as usize][want.counter as usize] + 1;
        let want_action = action(dir, want.passed());
        let mut problems = Vec::new();
        if got_action != want_action {
            problems.push(format!("action {got_action}, want {want_action}"));
        }
        if counted != expected_count {
            // Find where the kernel counted it instead.
            let counters = self.enforcer.counters()?;
            let moved: Vec<&str> = (0..counter::COUNT)
                .filter(|&c| counters.get(dir, c) != self.shadow[dir as usize][c as usize])
                .map(|c| counter::NAMES[c as usize])
                .collect();
            problems.push(format!("counted as {moved:?}"));
            for c in 0..counter::COUNT {
                self.shadow[dir as usize][c as usize] = counters.get(dir, c);
            }
        } else {
            self.shadow[dir as usize][want.counter as usize] = counted;
        }
        if let Some((rule, before)) = rule_before {
            let after = self.enforcer.rule_hits(rule)?;
            self.rule_shadow.insert(rule, after);
            if after != before + 1 {
                problems.push(format!("rule #{rule} not credited"));
            }
        }
        if problems.is_empty() {
            return Ok(want);
        }
        anyhow::bail!(
            "kernel and reference disagree on a packet seen on {}\n  frame:     {}\n  reference: {} {}\n  kernel:    {}",
            direction::NAMES[dir as usize],
            hex(frame),
            counter::NAMES[want.counter as usize],
            want.rule
                .map(|r| format!("(rule #{r})"))
                .unwrap_or_default(),
            problems.join("; "),
        )
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the frame built from `spec` through the kernel and the reference model (see
/// [`KernelHarness::check`]) and asserts the outcome is counter `want`.
#[track_caller]
pub fn expect(
    h: &mut KernelHarness,
    dir: u32,
    spec: &crate::packet_builder::PacketSpec,
    want: u32,
) {
    let (frame, _) = crate::packet_builder::build(spec);
    expect_frame(h, dir, &frame, want);
}

/// [`expect`] for a frame built by hand.
#[track_caller]
pub fn expect_frame(h: &mut KernelHarness, dir: u32, frame: &[u8], want: u32) {
    let got = h.check(frame, dir).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        counter::NAMES[got.counter as usize],
        counter::NAMES[want as usize],
        "frame {}",
        hex(frame)
    );
}
