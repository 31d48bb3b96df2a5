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

/// The first of the key's two slots in `RECENT_EVENTS`. Multilinear: the products are
/// independent of one another, so the CPU overlaps them, where a chain of multiplies (the hash
/// this replaced) waits for each in turn, some 10 ns a denial.
#[inline(always)]
fn slots_of(key: &[u32; KEY_WORDS]) -> u32 {
    const K: [u64; KEY_WORDS] = [
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
        0x85eb_ca77_c2b2_ae63,
        0x27d4_eb2f_1656_67c5,
        0xd6e8_feb8_6659_fd93,
        0xa076_1d64_78bd_642f,
        0xe703_7ed1_a0b4_28db,
        0x8ebc_6af0_9c88_c6e3,
    ];
    let mut hash: u64 = 0;
    for i in 0..KEY_WORDS {
        hash = hash.wrapping_add(u64::from(key[i]).wrapping_mul(K[i]));
    }
    ((hash >> 32) as u32) & (RECENT_EVENT_SLOTS - 2)
}

#[inline(always)]
fn same(a: &[u32; KEY_WORDS], b: &[u32; KEY_WORDS]) -> bool {
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
    let key_words = words(key);
    let first = slots_of(key_words);
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
