//! Fragment tracking: later fragments of a datagram follow its first fragment, which carried the
//! transport header and got the verdict. A later fragment with no known first fragment is
//! dropped (it may be reordered before its first one, or be an attempt to slip past the policy).
use enforcer_common::{Config, FragmentKey, FragmentState, counter, timeout};

use crate::{maps::FRAGMENTS, packet::Flow};

/// The counter for the later fragment `key`.
#[inline(always)]
pub fn follow(key: &FragmentKey, now: u64, config: &Config) -> u32 {
    // SAFETY: the value is copied out at once.
    match unsafe { FRAGMENTS.get(key) }.copied() {
        Some(state)
            if now.saturating_sub(state.first_seen_ns) <= config.timeouts_ns[timeout::FRAGMENT] =>
        {
            counter::FRAGMENT
        }
        Some(_) => {
            let _ = FRAGMENTS.remove(key);
            counter::DROP_FRAGMENT_NO_STATE
        }
        None => counter::DROP_FRAGMENT_NO_STATE,
    }
}

/// Records that the first fragment `flow` passed, using `key` as working memory. `false` when
/// the table is full.
#[inline(always)]
pub fn remember(key: &mut FragmentKey, flow: &Flow, now: u64) -> bool {
    key.src = flow.src.0;
    key.dst = flow.dst.0;
    key.id = flow.frag_id;
    key.proto = flow.frag_proto;
    key.family = flow.family;
    key._pad = [0; 2];
    FRAGMENTS
        .insert(*key, FragmentState { first_seen_ns: now }, 0)
        .is_ok()
}
