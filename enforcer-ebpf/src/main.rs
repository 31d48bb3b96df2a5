//! Kernel side of the enforcer. Entry points are thin: parsing lives in one module per protocol,
//! the policy lookup in `policy`, and the counters in `counters`.
#![no_std]
#![no_main]

mod counters;
mod eth;
mod ipv4;
mod ipv6;
mod maps;
mod packet;
mod policy;
mod transport;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use enforcer_common::counter;

use crate::{
    packet::{Frame, Parsed},
    policy::Judgement,
};

/// Ingress enforcement: judges every frame that arrives on the interface.
#[xdp]
pub fn enforcer_xdp(ctx: XdpContext) -> u32 {
    match try_enforcer_xdp(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

fn try_enforcer_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let frame = Frame::new(ctx);
    let (counter_index, action) = match eth::parse(&frame) {
        Parsed::Flow(flow) => match policy::judge(&flow) {
            Judgement::Allowed { rule } => {
                counters::rule_hit(rule);
                (counter::ALLOWED, xdp_action::XDP_PASS)
            }
            Judgement::Audit => (counter::AUDIT, xdp_action::XDP_PASS),
            Judgement::Unenforced => (counter::UNENFORCED, xdp_action::XDP_PASS),
            Judgement::Denied => (counter::DROP_POLICY_DENIED, xdp_action::XDP_DROP),
        },
        Parsed::NonIp => (counter::NON_IP, xdp_action::XDP_PASS),
        Parsed::Malformed => (counter::DROP_MALFORMED, xdp_action::XDP_DROP),
        Parsed::UnsupportedEncap => (counter::DROP_UNSUPPORTED_ENCAP, xdp_action::XDP_DROP),
    };
    counters::count(counter_index)?;
    Ok(action)
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
