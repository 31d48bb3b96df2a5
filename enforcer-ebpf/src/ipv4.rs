//! IPv4, options included. Lengths are checked against the frame so that a lying header cannot
//! move the transport header outside the packet.
use crate::{
    packet::{Addrs, Frame, Parsed},
    transport,
};

const MIN_HDR_LEN: usize = 20;
const FRAG_OFFSET_MASK: u16 = 0x1fff;

#[inline(always)]
pub fn parse(frame: &Frame, l3: usize) -> Parsed {
    let Some(hdr) = frame.bytes_at::<MIN_HDR_LEN>(l3) else {
        return Parsed::Malformed;
    };
    let version = hdr[0] >> 4;
    let hdr_len = ((hdr[0] & 0x0f) as usize) * 4;
    if version != 4 || hdr_len < MIN_HDR_LEN {
        return Parsed::Malformed;
    }
    let total_len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if total_len < hdr_len || l3 + total_len > frame.len() {
        return Parsed::Malformed;
    }
    let addrs = Addrs::V4 {
        src: [hdr[12], hdr[13], hdr[14], hdr[15]],
        dst: [hdr[16], hdr[17], hdr[18], hdr[19]],
    };
    let proto = hdr[9];
    let frag_offset = u16::from_be_bytes([hdr[6], hdr[7]]) & FRAG_OFFSET_MASK;
    if frag_offset != 0 {
        // A later fragment carries no transport header.
        return Parsed::Flow(transport::without_ports(addrs));
    }
    transport::parse(frame, addrs, proto, l3 + hdr_len, l3 + total_len)
}
