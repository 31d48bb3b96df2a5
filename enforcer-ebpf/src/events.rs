//! Events for the daemon's flow stream: denied, audited and (optionally) allowed first packets,
//! at most one per flow per interval, so a flood cannot drown the daemon. Events the ring
//! buffer has no room for are counted as lost.
use enforcer_common::{Event, EventLimiterKey, event_counter};

use crate::{
    counters,
    maps::{EVENT_LIMITER, EVENTS},
};

#[inline(always)]
pub fn emit(event: &Event, interval_ns: u64) {
    let key = EventLimiterKey {
        src: event.src,
        dst: event.dst,
        dport: event.dport,
        proto: event.proto,
        counter: event.counter,
    };
    // SAFETY: the value is copied out at once.
    if let Some(last) = unsafe { EVENT_LIMITER.get(key) }.copied()
        && event.time_ns.saturating_sub(last) < interval_ns
    {
        counters::event(event_counter::RATE_LIMITED);
        return;
    }
    let _ = EVENT_LIMITER.insert(key, event.time_ns, 0);
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(*event);
            entry.submit(0);
            counters::event(event_counter::SENT);
        }
        None => counters::event(event_counter::LOST),
    }
}
