//! IPv6. Extension headers are not walked yet: their next-header value is treated as the
//! protocol, which carries no ports, so only `ports: [any]` rules admit such packets.
use crate::{
    packet::{Addrs, Frame, Parsed},
    transport,
};

const HDR_LEN: usize = 40;

#[inline(always)]
pub fn parse(frame: &Frame, l3: usize) -> Parsed {
    let Some(hdr) = frame.bytes_at::<8>(l3) else {
        return Parsed::Malformed;
    };
    let (Some(src), Some(dst)) = (frame.bytes_at::<16>(l3 + 8), frame.bytes_at::<16>(l3 + 24))
    else {
        return Parsed::Malformed;
    };
    if hdr[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    let l4 = l3 + HDR_LEN;
    if l4 + payload_len > frame.len() {
        return Parsed::Malformed;
    }
    transport::parse(frame, Addrs::V6 { src, dst }, hdr[6], l4, l4 + payload_len)
}
