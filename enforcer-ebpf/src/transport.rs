//! The transport header: TCP and UDP here, ICMP and ICMPv6 in `icmp`. Only what the policy and
//! connection tracking need is read.
use enforcer_common::{counter, proto_key};

use crate::{
    icmp,
    packet::{Frame, Parsed, Scratch, opaque},
};

const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
/// Every transport header the policy reads is at least this long and holds its ports or type:
/// one bounds check reads them all. (An 8-byte read also keeps the check in a form the verifier
/// understands at a variable offset; a 1-byte one does not.)
pub const HEAD_LEN: usize = 8;

/// A cap on the transport header's offset, so that the verifier accepts an offset it knows
/// nothing else about. No header chain the parsers accept reaches it (at most a VLAN tag, 60
/// bytes of IPv4 header, or 40 of IPv6 and `ipv6::MAX_EXT_HEADERS` extension headers of at
/// most 2,048 bytes each), so capping never changes an offset.
pub const MAX_L4_OFFSET: usize = 0x7fff;
const _: () = assert!(14 + 4 + 40 + crate::ipv6::MAX_EXT_HEADERS * 2048 < MAX_L4_OFFSET);

/// `l4..l4_end` is the IP payload as the IP header declares it (already checked to lie inside
/// the packet). A transport header that does not fit in it is malformed; in a first fragment it
/// is the tiny-fragment attack.
#[inline(always)]
pub fn parse(frame: &Frame, scratch: &mut Scratch, proto: u8, l4: usize, l4_end: usize) -> Parsed {
    // Every way through the IP headers (options, VLAN tag, each number of IPv6 extension
    // headers) ends here with its own known offsets; made opaque, they are checked once.
    // The cap changes nothing (see `MAX_L4_OFFSET`); a bound on the value itself, not a check
    // beside it, is what older verifiers follow into the copies the compiler makes of it.
    let l4 = (opaque(&mut scratch.opaque.l4, l4 as u32) as usize).min(MAX_L4_OFFSET);
    let l4_end = opaque(&mut scratch.opaque.l4_end, l4_end as u32) as usize;
    let flow = &mut scratch.flow;
    flow.proto = proto;
    let needed = match proto {
        proto_key::TCP => TCP_HDR_LEN,
        proto_key::UDP => UDP_HDR_LEN,
        proto_key::ICMP | proto_key::ICMPV6 => icmp::HDR_LEN,
        // No ports: only `ports: [any]` matches (proto_key and ports stay 0).
        _ => return Parsed::Flow,
    };
    let too_small = if flow.first_fragment {
        counter::DROP_FRAGMENT_TOO_SMALL
    } else {
        counter::DROP_MALFORMED
    };
    let Some(head) = frame.bytes_at::<HEAD_LEN>(l4) else {
        return Parsed::Drop(too_small);
    };
    if l4 + needed > l4_end {
        return Parsed::Drop(too_small);
    }
    flow.proto_key = proto;
    match proto {
        proto_key::TCP | proto_key::UDP => {
            flow.sport = u16::from_be_bytes([head[0], head[1]]);
            flow.dport = u16::from_be_bytes([head[2], head[3]]);
            flow.port = flow.dport;
            if proto == proto_key::TCP {
                let Some(rest) = frame.bytes_at::<HEAD_LEN>(l4 + HEAD_LEN) else {
                    return Parsed::Drop(too_small);
                };
                flow.tcp_flags = rest[13 - HEAD_LEN];
            }
        }
        _ => icmp::fill(frame, flow, &head, l4, l4_end),
    }
    Parsed::Flow
}

/// A fragment other than the first, `offset` bytes into its datagram's payload. One that would
/// overwrite part of a TCP header is the overlapping-fragment attack.
#[inline(always)]
pub fn later_fragment(scratch: &mut Scratch, id: u32, proto: u8, offset: usize) -> Parsed {
    if proto == proto_key::TCP && offset < TCP_HDR_LEN {
        return Parsed::Drop(counter::DROP_FRAGMENT_OVERLAP);
    }
    let key = &mut scratch.fragment;
    key.src = scratch.flow.src.0;
    key.dst = scratch.flow.dst.0;
    key.id = id;
    key.proto = proto;
    key.family = scratch.flow.family;
    key._pad = [0; 2];
    Parsed::LaterFragment
}
