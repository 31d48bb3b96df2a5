//! ICMP and ICMPv6: the message type for the policy, the echo identifier for connection
//! tracking, and for errors the flow of the packet they quote.
use enforcer_common::proto_key;

use crate::{
    conntrack,
    ipv4::{self, widen},
    packet::{Addr, Flow, Frame},
    transport::HEAD_LEN,
};

pub const HDR_LEN: usize = 8;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAM_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAM_PROBLEM: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

#[inline(always)]
fn is_echo(proto: u8, icmp_type: u8) -> bool {
    if proto == proto_key::ICMPV6 {
        icmp_type == ICMPV6_ECHO_REQUEST || icmp_type == ICMPV6_ECHO_REPLY
    } else {
        icmp_type == ICMP_ECHO_REQUEST || icmp_type == ICMP_ECHO_REPLY
    }
}

/// Fills the ICMP part of `flow` from its 8-byte header `head` at `l4`.
#[inline(always)]
pub fn fill(frame: &Frame, flow: &mut Flow, head: &[u8; HEAD_LEN], l4: usize, l4_end: usize) {
    let icmp_type = head[0];
    flow.port = u16::from(icmp_type);
    let v6 = flow.proto == proto_key::ICMPV6;
    if is_echo(flow.proto, icmp_type) {
        let id = u16::from_be_bytes([head[4], head[5]]);
        flow.sport = id;
        flow.dport = id;
        flow.is_echo_request = icmp_type
            == if v6 {
                ICMPV6_ECHO_REQUEST
            } else {
                ICMP_ECHO_REQUEST
            };
        return;
    }
    let is_error = if v6 {
        (ICMPV6_DEST_UNREACH..=ICMPV6_PARAM_PROBLEM).contains(&icmp_type)
    } else {
        matches!(
            icmp_type,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM
        )
    };
    if is_error {
        flow.has_quoted = quote(frame, flow, l4 + HDR_LEN, l4_end);
    }
}

/// Fills `flow.quoted` with the connection-tracking key of the packet an ICMP error quotes at
/// `q`. The quoted packet must have been sent by the error's destination, or the error relates
/// to nothing of ours.
#[inline(always)]
fn quote(frame: &Frame, flow: &mut Flow, q: usize, end: usize) -> bool {
    let (src, dst, proto, ql4) = if flow.family == 4 {
        let Some(hdr) = frame.bytes_at::<{ ipv4::MIN_HDR_LEN }>(q) else {
            return false;
        };
        let hdr_len = usize::from(hdr[0] & 0x0f) * 4;
        if hdr[0] >> 4 != 4 || hdr_len < ipv4::MIN_HDR_LEN {
            return false;
        }
        let src = Addr(widen([hdr[12], hdr[13], hdr[14], hdr[15]]));
        let dst = Addr(widen([hdr[16], hdr[17], hdr[18], hdr[19]]));
        (src, dst, hdr[9], q + hdr_len)
    } else {
        // One 40-byte copy: smaller reads let LLVM keep parts in registers in a shape the
        // verifier rejects on this path.
        let Some(hdr) = frame.bytes_at::<40>(q) else {
            return false;
        };
        if hdr[0] >> 4 != 6 {
            return false;
        }
        let mut src = Addr([0; 16]);
        let mut dst = Addr([0; 16]);
        src.0.copy_from_slice(&hdr[8..24]);
        dst.0.copy_from_slice(&hdr[24..40]);
        (src, dst, hdr[6], q + 40)
    };
    if src != flow.dst {
        return false;
    }
    let Some(head) = frame.bytes_at::<HEAD_LEN>(ql4) else {
        return false;
    };
    if ql4 + HEAD_LEN > end {
        return false;
    }
    let (sport, dport) = match proto {
        proto_key::TCP | proto_key::UDP => (
            u16::from_be_bytes([head[0], head[1]]),
            u16::from_be_bytes([head[2], head[3]]),
        ),
        proto_key::ICMP | proto_key::ICMPV6 => {
            if !is_echo(proto, head[0]) {
                return false;
            }
            let id = u16::from_be_bytes([head[4], head[5]]);
            (id, id)
        }
        _ => (0, 0),
    };
    conntrack::fill_key(
        &mut flow.quoted,
        &src,
        sport,
        &dst,
        dport,
        proto,
        flow.family,
    );
    true
}
