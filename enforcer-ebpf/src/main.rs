//! Kernel side of the enforcer: XDP on ingress, TC on egress, one decision pipeline
//! (`verdict`). Entry points are thin; parsing lives in one module per protocol.
#![no_std]
#![no_main]

// Benchmark-only programs (`cargo xtask bench`); the loader never loads or attaches them.
mod bench;
mod clock;
mod conntrack;
mod counters;
mod eth;
mod events;
mod fragments;
mod icmp;
mod ipv4;
mod ipv6;
mod maps;
mod packet;
mod policy;
mod transport;
mod verdict;

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action, xdp_md},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use enforcer_common::{counter, direction};

use crate::{packet::Frame, verdict::Hook};

/// Bytes of an skb that egress makes readable before parsing: enough for Ethernet, VLAN, IPv6
/// with extension headers and the transport header of ordinary packets.
const TC_PULL_LEN: u32 = 512;

#[derive(Clone, Copy)]
struct Ingress(*mut xdp_md);

impl Hook for Ingress {
    const DIR: u32 = direction::INGRESS;
    #[inline(always)]
    fn ifindex(self) -> u32 {
        // SAFETY: reading a field of the context the kernel passed in.
        unsafe { (*self.0).ingress_ifindex }
    }
}

#[derive(Clone, Copy)]
struct Egress(*mut __sk_buff);

impl Hook for Egress {
    const DIR: u32 = direction::EGRESS;
    #[inline(always)]
    fn ifindex(self) -> u32 {
        // SAFETY: reading a field of the context the kernel passed in.
        unsafe { (*self.0).ifindex }
    }
}

/// Ingress: judges every frame that arrives on the interface.
#[xdp]
pub fn enforcer_xdp(ctx: XdpContext) -> u32 {
    match try_enforcer_xdp(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

fn try_enforcer_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let frame = Frame::new(ctx.data(), ctx.data_end(), ctx.data_end() - ctx.data());
    let outcome = verdict::decide(&frame, Ingress(ctx.ctx))?;
    counters::count(direction::INGRESS, outcome)?;
    Ok(if counter::is_drop(outcome) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    })
}

/// Egress: tracks the flows this host (or gateway) sends, and judges them when
/// `egress` enforcement is on. Passing returns "next" so that other TC programs still run.
#[classifier]
pub fn enforcer_tc_egress(ctx: TcContext) -> i32 {
    match try_enforcer_tc_egress(&ctx) {
        Ok(action) => action,
        Err(()) => TC_ACT_SHOT,
    }
}

fn try_enforcer_tc_egress(ctx: &TcContext) -> Result<i32, ()> {
    let len = ctx.len();
    let readable = len.min(TC_PULL_LEN) as usize;
    if ctx.data_end() - ctx.data() < readable {
        // Headers in paged data: make them readable. A failure leaves them unreadable, which
        // the parser reports as malformed.
        let _ = ctx.pull_data(readable as u32);
    }
    let frame = Frame::new(ctx.data(), ctx.data_end(), len as usize);
    let outcome = verdict::decide(&frame, Egress(ctx.skb.skb))?;
    counters::count(direction::EGRESS, outcome)?;
    Ok(if counter::is_drop(outcome) {
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
    })
}

/// Never attached: the daemon runs it to calibrate the programs' clock (see `clock`).
#[xdp]
pub fn enforcer_clock_probe(ctx: XdpContext) -> u32 {
    match clock::probe(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// Several helpers used by the programs are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
