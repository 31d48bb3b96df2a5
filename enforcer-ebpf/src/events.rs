//! Events for the daemon's flow stream: denied, audited and (optionally) allowed first packets,
//! at most one per flow per interval on each CPU, so a flood cannot drown the daemon. Events
//! the ring buffer has no room for are counted as lost.
use core::mem::{align_of, size_of};

use enforcer_common::{Event, EventLimiterKey, RECENT_EVENT_SLOTS, event_counter};

use crate::{
    counters,
    maps::{EVENTS, RECENT_EVENTS},
};

const KEY_WORDS: usize = size_of::<EventLimiterKey>() / 4;

/// The key as words, to hash and compare it without byte loops or a `bcmp` subprogram.
#[inline(always)]
fn words(key: &EventLimiterKey) -> &[u32; KEY_WORDS] {
    const _: () = assert!(
        size_of::<EventLimiterKey>().is_multiple_of(4) && align_of::<EventLimiterKey>() >= 4
    );
    // SAFETY: same size; the key is 4-byte aligned and holds only integers.
    unsafe { &*(key as *const EventLimiterKey).cast::<[u32; KEY_WORDS]>() }
}

/// The first of the key's two slots in `RECENT_EVENTS`.
#[inline(always)]
fn slots_of(key: &[u32; KEY_WORDS]) -> u32 {
    let mut hash: u32 = 0;
    for word in key {
        hash = (hash ^ word).wrapping_mul(0x9e37_79b1);
    }
    (hash ^ (hash >> 16)) & (RECENT_EVENT_SLOTS - 2)
}

#[inline(always)]
fn same(a: &[u32; KEY_WORDS], b: &[u32; KEY_WORDS]) -> bool {
    let mut diff = 0;
    for i in 0..KEY_WORDS {
        diff |= a[i] ^ b[i];
    }
    diff == 0
}

#[inline(always)]
pub fn emit(event: &Event, interval_ns: u64) {
    let key = EventLimiterKey {
        src: event.src,
        dst: event.dst,
        dport: event.dport,
        proto: event.proto,
        counter: event.counter,
    };
    let key_words = words(&key);
    let first = slots_of(key_words);
    // Always readable (the index is masked into the array); the check is for the verifier. An
    // unreadable pair would leave the event unlimited rather than drop it silently.
    if let (Some(a), Some(b)) = (
        RECENT_EVENTS.get_ptr_mut(first),
        RECENT_EVENTS.get_ptr_mut(first + 1),
    ) {
        // SAFETY: this CPU's elements of a per-CPU array; a program runs to completion on it.
        let (a, b) = unsafe { (&mut *a, &mut *b) };
        let (in_a, in_b) = (
            same(words(&a.key), key_words),
            same(words(&b.key), key_words),
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
            && event.time_ns.saturating_sub(recent.reported_ns) < interval_ns
        {
            counters::event(event_counter::RATE_LIMITED);
            return;
        }
        // The flow's own slot if it has one, else the one reported longer ago.
        let recent = if in_a || (!in_b && a.reported_ns <= b.reported_ns) {
            a
        } else {
            b
        };
        recent.key = key;
        recent.reported_ns = event.time_ns;
    }
    // One helper call that copies the event in; reserving and writing it here would copy
    // it through a `memmove` subprogram.
    match EVENTS.output::<Event>(event, 0) {
        Ok(()) => counters::event(event_counter::SENT),
        Err(_) => counters::event(event_counter::LOST),
    }
}
