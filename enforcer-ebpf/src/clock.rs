//! The programs' clock: CLOCK_MONOTONIC_COARSE, the daemon's clock, computed from the jiffies
//! counter with the daemon's calibration (`enforcer_common::Clock`). It advances once per tick
//! (1-10 ms), plenty for timeouts and grants measured in seconds. Reading jiffies is one load
//! that the verifier inlines; the coarse clock's helper is a call, about 20 ns a packet on CPUs
//! whose mitigations make every call and return dear, and is used only until the daemon has
//! calibrated the clock.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    programs::XdpContext,
};

use crate::maps::CLOCK;

/// Bytes of the frame [`probe`] writes: the coarse clock, then jiffies (native byte order).
const PROBE_BYTES: usize = 16;

#[inline(always)]
pub fn now_ns() -> u64 {
    match CLOCK.get(0) {
        // SAFETY: no preconditions.
        Some(clock) if clock.tick_ns != 0 => clock.at(unsafe { bpf_jiffies64() }),
        // SAFETY: no preconditions.
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// Writes the coarse clock and then jiffies into the start of the frame, for the daemon's
/// calibration (`enforcer::clock`). In this order, a tick between the two reads can only make
/// the clock look earlier against jiffies than it is, never later.
#[inline(always)]
pub fn probe(ctx: &XdpContext) -> Result<u32, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + PROBE_BYTES > end {
        return Err(());
    }
    // SAFETY: no preconditions.
    let coarse_ns = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    let at = start as *mut u64;
    // SAFETY: the 16 bytes are inside the frame (checked above).
    unsafe {
        at.write_unaligned(coarse_ns);
        at.add(1).write_unaligned(jiffies);
    }
    Ok(xdp_action::XDP_PASS)
}
