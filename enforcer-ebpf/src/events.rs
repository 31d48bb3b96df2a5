//! Events for the daemon's flow stream: denied, audited and (optionally) allowed first packets,
//! at most one per flow per interval on each CPU, so a flood cannot drown the daemon. Events
//! the ring buffer has no room for are counted as lost.
use enforcer_common::{Event, EventLimiterKey, event_counter};

use crate::{
    counters,
    maps::{EVENTS, RECENT_EVENTS},
};

const KEY_WORDS: usize = EventLimiterKey::WORDS;

#[inline(always)]
fn same(a: &[u64; KEY_WORDS], b: &[u64; KEY_WORDS]) -> bool {
    let mut diff = 0;
    for i in 0..KEY_WORDS {
        diff |= a[i] ^ b[i];
    }
    diff == 0
}

/// Whether an event about `key` may be reported at `now`: not when this CPU reported the same
/// key less than `interval_ns` ago (counted as rate-limited). Asked before the event is built,
/// which a flood of one flow then never pays for.
#[inline(always)]
pub fn admit(key: &EventLimiterKey, now: u64, interval_ns: u64) -> bool {
    let key_words = key.words();
    let first = key.first_slot();
    // Always readable (the index is masked into the array); the check is for the verifier. An
    // unreadable pair would leave the event unlimited rather than drop it silently.
    let (Some(a), Some(b)) = (
        RECENT_EVENTS.get_ptr_mut(first),
        RECENT_EVENTS.get_ptr_mut(first + 1),
    ) else {
        return true;
    };
    // SAFETY: this CPU's elements of a per-CPU array; a program runs to completion on it.
    let (a, b) = unsafe { (&mut *a, &mut *b) };
    let (in_a, in_b) = (
        same(a.key.words(), key_words),
        same(b.key.words(), key_words),
    );
    let own = if in_a {
        Some(&*a)
    } else if in_b {
        Some(&*b)
    } else {
        None
    };
    if let Some(recent) = own
        && recent.reported_ns != 0
        && now.saturating_sub(recent.reported_ns) < interval_ns
    {
        counters::event(event_counter::RATE_LIMITED);
        return false;
    }
    // The flow's own slot if it has one, else the one reported longer ago.
    let recent = if in_a || (!in_b && a.reported_ns <= b.reported_ns) {
        a
    } else {
        b
    };
    recent.key = *key;
    recent.reported_ns = now;
    true
}

/// Sends `event` to the daemon, counted as sent or lost.
#[inline(always)]
pub fn send(event: &Event) {
    // One helper call that copies the event in; reserving and writing it here would copy
    // it through a `memmove` subprogram.
    match EVENTS.output::<Event>(event, 0) {
        Ok(()) => counters::event(event_counter::SENT),
        Err(_) => counters::event(event_counter::LOST),
    }
}
