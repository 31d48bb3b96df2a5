//! IPv4, options included. Lengths are checked against the packet so that a lying header cannot
//! move the transport header outside it.
use enforcer_common::counter;

use crate::{
    packet::{Addr, Frame, Parsed, Scratch},
    transport,
};

pub const MIN_HDR_LEN: usize = 20;
const FRAG_OFFSET_MASK: u16 = 0x1fff;
const MORE_FRAGMENTS: u16 = 0x2000;

#[inline(always)]
pub fn parse(frame: &Frame, l3: usize, scratch: &mut Scratch) -> Parsed {
    let Some(hdr) = frame.bytes_at::<MIN_HDR_LEN>(l3) else {
        return Parsed::Drop(counter::DROP_MALFORMED);
    };
    let version = hdr[0] >> 4;
    let hdr_len = ((hdr[0] & 0x0f) as usize) * 4;
    if version != 4 || hdr_len < MIN_HDR_LEN {
        return Parsed::Drop(counter::DROP_MALFORMED);
    }
    let total_len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if total_len < hdr_len || l3 + total_len > frame.len() {
        return Parsed::Drop(counter::DROP_MALFORMED);
    }
    let flow = &mut scratch.flow;
    flow.src = Addr(widen([hdr[12], hdr[13], hdr[14], hdr[15]]));
    flow.dst = Addr(widen([hdr[16], hdr[17], hdr[18], hdr[19]]));
    flow.family = 4;
    let proto = hdr[9];
    let flags_offset = u16::from_be_bytes([hdr[6], hdr[7]]);
    let frag_offset = usize::from(flags_offset & FRAG_OFFSET_MASK) * 8;
    let id = u32::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    if frag_offset != 0 {
        return transport::later_fragment(scratch, id, proto, frag_offset);
    }
    if flags_offset & MORE_FRAGMENTS != 0 {
        flow.first_fragment = true;
        flow.frag_id = id;
        flow.frag_proto = proto;
    }
    transport::parse(frame, scratch, proto, l3 + hdr_len, l3 + total_len)
}

/// The 16-byte form of an IPv4 address: the address, then zeros. Built as one integer: zeros
/// written as bytes are merged into a `memset` call, a byte-by-byte loop in BPF.
#[inline(always)]
pub fn widen(addr: [u8; 4]) -> [u8; 16] {
    u128::from(u32::from_le_bytes(addr)).to_le_bytes()
}
