//! BENCHMARK-ONLY programs, for `cargo xtask bench`: floors to compare the enforcer with, and a
//! traffic generator. The daemon's loader never loads or attaches them; their maps hold one
//! entry unless a benchmark sizes them.
use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use enforcer_common::BenchFlow;

use crate::{
    eth,
    maps::SCRATCH,
    packet::{Frame, Parsed},
};

#[map]
static BENCH_FLOWS: Array<BenchFlow> = Array::with_max_entries(1, 0);

#[map]
static BENCH_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map]
static BENCH_RX: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The floor: nothing but the program call.
#[xdp]
pub fn bench_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The enforcer's parser into the same scratch memory, then a verdict from the parse alone.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<bool> {
    let frame = Frame::new(ctx.data(), ctx.data_end(), ctx.data_end() - ctx.data());
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; a program runs to completion on one CPU.
    let scratch = unsafe { &mut *scratch };
    scratch.flow.clear();
    Some(!matches!(eth::parse(&frame, scratch), Parsed::Drop(_)))
}

/// Parse only: what the enforcer costs before any map lookup.
#[xdp]
pub fn bench_parse_only(ctx: XdpContext) -> u32 {
    match parse(&ctx) {
        Some(true) => xdp_action::XDP_PASS,
        Some(false) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn count_rx() {
    if let Some(count) = BENCH_RX.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *count += 1 };
    }
}

/// The end-to-end floor: parse, count, drop.
#[xdp]
pub fn bench_parse_drop(ctx: XdpContext) -> u32 {
    let _ = parse(&ctx);
    count_rx();
    xdp_action::XDP_DROP
}

/// In front of nftables: count what goes on to the stack (the netdev ingress hook runs in the
/// same NAPI poll, with no queue in between).
#[xdp]
pub fn bench_pass_count(_ctx: XdpContext) -> u32 {
    count_rx();
    xdp_action::XDP_PASS
}

const ETH_HDR_LEN: usize = 14;
const IPV4_SRC: usize = ETH_HDR_LEN + 12;
const IPV4_DST: usize = ETH_HDR_LEN + 16;
const UDP_DPORT: usize = ETH_HDR_LEN + 20 + 2;

/// Traffic generator for `BPF_F_TEST_XDP_LIVE_FRAMES`: the frame (Ethernet, IPv4, UDP) gets the
/// next flow of `BENCH_FLOWS`, then goes out of the interface it was injected on.
#[xdp]
pub fn bench_tx(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + UDP_DPORT + 2 > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(cursor) = BENCH_CURSOR.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's slot of a per-CPU array.
    let cursor = unsafe { &mut *cursor };
    let flow = match BENCH_FLOWS.get(*cursor) {
        Some(flow) => flow,
        None => {
            // Past the end of the table: wrap around.
            *cursor = 0;
            match BENCH_FLOWS.get(0) {
                Some(flow) => flow,
                None => return xdp_action::XDP_ABORTED,
            }
        }
    };
    *cursor += 1;
    // SAFETY: bounds checked above; unaligned writes into the frame.
    unsafe {
        ((start + IPV4_SRC) as *mut [u8; 4]).write_unaligned(flow.src);
        ((start + IPV4_DST) as *mut [u8; 4]).write_unaligned(flow.dst);
        ((start + UDP_DPORT) as *mut [u8; 2]).write_unaligned(flow.dport);
    }
    xdp_action::XDP_TX
}
