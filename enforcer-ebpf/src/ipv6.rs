//! IPv6, walking extension headers to a bounded depth.
use enforcer_common::counter;

use crate::{
    packet::{Frame, Parsed, Scratch, opaque},
    transport::{self, MAX_L4_OFFSET},
};

const HDR_LEN: usize = 40;
/// Extension headers walked before a packet is refused as `too_many_ext_headers`.
pub const MAX_EXT_HEADERS: usize = 8;

const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_AUTH: u8 = 51;
const NEXT_DEST_OPTS: u8 = 60;
const NEXT_MOBILITY: u8 = 135;
const NEXT_HIP: u8 = 139;
const NEXT_SHIM6: u8 = 140;

#[inline(always)]
pub fn parse(frame: &Frame, l3: usize, scratch: &mut Scratch) -> Parsed {
    let Some(hdr) = frame.bytes_at::<8>(l3) else {
        return Parsed::Drop(counter::DROP_MALFORMED);
    };
    let (Some(src), Some(dst)) = (frame.addr_at(l3 + 8), frame.addr_at(l3 + 24)) else {
        return Parsed::Drop(counter::DROP_MALFORMED);
    };
    if hdr[0] >> 4 != 6 {
        return Parsed::Drop(counter::DROP_MALFORMED);
    }
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    let end = l3 + HDR_LEN + payload_len;
    if end > frame.len() {
        return Parsed::Drop(counter::DROP_MALFORMED);
    }
    scratch.flow.src = src;
    scratch.flow.dst = dst;
    scratch.flow.family = 6;
    let mut next = hdr[6];
    let mut offset = l3 + HDR_LEN;
    for _ in 0..MAX_EXT_HEADERS {
        let len = match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS | NEXT_MOBILITY | NEXT_HIP
            | NEXT_SHIM6 => {
                let Some(ext) = frame.bytes_at::<2>(offset) else {
                    return Parsed::Drop(counter::DROP_MALFORMED);
                };
                next = ext[0];
                (usize::from(ext[1]) + 1) * 8
            }
            NEXT_AUTH => {
                let Some(ext) = frame.bytes_at::<2>(offset) else {
                    return Parsed::Drop(counter::DROP_MALFORMED);
                };
                next = ext[0];
                (usize::from(ext[1]) + 2) * 4
            }
            NEXT_FRAGMENT => {
                let Some(ext) = frame.bytes_at::<8>(offset) else {
                    return Parsed::Drop(counter::DROP_MALFORMED);
                };
                if scratch.flow.first_fragment {
                    // Two fragment headers in one packet have no meaning.
                    return Parsed::Drop(counter::DROP_MALFORMED);
                }
                let frag_offset = usize::from(u16::from_be_bytes([ext[2], ext[3]]) >> 3) * 8;
                let more = ext[3] & 1 != 0;
                let id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                if frag_offset != 0 {
                    return transport::later_fragment(scratch, id, ext[0], frag_offset);
                }
                if more {
                    scratch.flow.first_fragment = true;
                    scratch.flow.frag_id = id;
                    scratch.flow.frag_proto = ext[0];
                }
                next = ext[0];
                8
            }
            _ => return transport::parse(frame, scratch, next, offset, end),
        };
        offset += len;
        if offset > end {
            return Parsed::Drop(counter::DROP_MALFORMED);
        }
        // Opaque, as in `transport::parse`: each kind of extension header leaves its own
        // offset. The cap changes nothing (see `MAX_L4_OFFSET`).
        offset = (opaque(&mut scratch.opaque.l4, offset as u32) as usize).min(MAX_L4_OFFSET);
    }
    if is_extension_header(next) {
        return Parsed::Drop(counter::DROP_TOO_MANY_EXT_HEADERS);
    }
    transport::parse(frame, scratch, next, offset, end)
}

#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        NEXT_HOP_BY_HOP
            | NEXT_ROUTING
            | NEXT_FRAGMENT
            | NEXT_AUTH
            | NEXT_DEST_OPTS
            | NEXT_MOBILITY
            | NEXT_HIP
            | NEXT_SHIM6
    )
}
