//! Per-CPU counters: plain increments, no atomics needed.
use enforcer_common::counter;

use crate::maps::{COUNTERS, RULE_HITS};

#[inline(always)]
pub fn count(dir: u32, index: u32) -> Result<(), ()> {
    let slot = COUNTERS
        .get_ptr_mut(dir * counter::COUNT + index)
        .ok_or(())?;
    // SAFETY: the pointer is this CPU's slot of a per-CPU array element.
    unsafe { *slot += 1 };
    Ok(())
}

#[inline(always)]
pub fn rule_hit(rule: u32) {
    if let Some(slot) = RULE_HITS.get_ptr_mut(rule) {
        // SAFETY: as above.
        unsafe { *slot += 1 };
    }
}
