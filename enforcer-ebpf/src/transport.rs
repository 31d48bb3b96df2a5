//! TCP, UDP, ICMP and ICMPv6: the part of the transport header the policy matches on.
use enforcer_common::proto_key;

use crate::packet::{Addrs, Flow, Frame, Parsed};

const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const ICMP_HDR_LEN: usize = 8;
/// Every transport header the policy reads is at least this long, and its ports or type lie in
/// it: one bounds check reads them all. (An 8-byte read also keeps the bounds check in a form
/// the verifier understands at a variable offset; a 1-byte one does not.)
const HEAD_LEN: usize = 8;

/// `l4..l4_end` is the IP payload as the IP header declares it (already checked to lie inside
/// the frame). A transport header that does not fit in it is malformed, which also drops a
/// first fragment too small to carry the header it claims.
#[inline(always)]
pub fn parse(frame: &Frame, addrs: Addrs, proto: u8, l4: usize, l4_end: usize) -> Parsed {
    let needed = match proto {
        proto_key::TCP => TCP_HDR_LEN,
        proto_key::UDP => UDP_HDR_LEN,
        proto_key::ICMP | proto_key::ICMPV6 => ICMP_HDR_LEN,
        _ => return Parsed::Flow(without_ports(addrs)),
    };
    let Some(head) = frame.bytes_at::<HEAD_LEN>(l4) else {
        return Parsed::Malformed;
    };
    if l4 + needed > l4_end {
        return Parsed::Malformed;
    }
    let port = match proto {
        proto_key::TCP | proto_key::UDP => u16::from_be_bytes([head[2], head[3]]),
        _ => u16::from(head[0]),
    };
    Parsed::Flow(Flow {
        addrs,
        proto_key: proto,
        port,
    })
}

/// A packet whose transport header is absent or not understood.
#[inline(always)]
pub fn without_ports(addrs: Addrs) -> Flow {
    Flow {
        addrs,
        proto_key: proto_key::NO_PORT,
        port: 0,
    }
}
