//! Per-CPU counters: plain increments, no atomics needed.
use enforcer_common::{PairVerdictKey, counter, protocol_class};

use crate::maps::{COUNTERS, DROPS_BY_PROTOCOL, EVENT_COUNTERS, PAIR_VERDICTS, PolicySlot};

#[inline(always)]
fn bump(slot: Option<*mut u64>) {
    if let Some(slot) = slot {
        // SAFETY: this CPU's slot of a per-CPU map element.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count(dir: u32, index: u32) -> Result<(), ()> {
    let slot = COUNTERS
        .get_ptr_mut(dir * counter::COUNT + index)
        .ok_or(())?;
    bump(Some(slot));
    Ok(())
}

#[inline(always)]
pub fn drop_by_protocol(dir: u32, index: u32, class: u32) {
    let at = (dir * counter::COUNT + index) * protocol_class::COUNT + class;
    bump(DROPS_BY_PROTOCOL.get_ptr_mut(at));
}

#[inline(always)]
pub fn rule_hit<P: PolicySlot>(rule: u32) {
    bump(P::rule_hits().get_ptr_mut(rule));
}

#[inline(always)]
pub fn event(index: u32) {
    bump(EVENT_COUNTERS.get_ptr_mut(index));
}

/// Counts a judged packet for its segment pair: in the slot's table, at the first of the key's
/// two elements that this CPU counts that key in or has not used yet; otherwise in the shared
/// hash. Per CPU, so no other program writes the element meanwhile; the daemon writes a slot's
/// table only while no program judges with that slot, so an element once claimed stays its
/// key's and a key is never counted in two elements of one CPU.
#[inline(always)]
pub fn pair_verdict<P: PolicySlot>(key: &PairVerdictKey) {
    for slot in key.count_slots() {
        if let Some(entry) = P::pair_counts().get_ptr_mut(slot) {
            // SAFETY: this CPU's copy of an element of a per-CPU array.
            let entry = unsafe { &mut *entry };
            if entry.key == *key {
                entry.count += 1;
                return;
            }
            if entry.key.generation == 0 {
                entry.key = *key;
                entry.count = 1;
                return;
            }
        }
    }
    match PAIR_VERDICTS.get_ptr_mut(key) {
        Some(slot) => bump(Some(slot)),
        // A new pair: the first packet's CPU creates it; a race with another CPU loses one count
        // at most, never the entry.
        None => {
            let _ = PAIR_VERDICTS.insert(key, 1, 0);
        }
    }
}
