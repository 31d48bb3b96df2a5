//! Ethernet, with at most one 802.1Q / 802.1ad tag.
use enforcer_common::counter;

use crate::{
    ipv4, ipv6,
    packet::{Frame, Parsed, Scratch},
};

const ETH_HDR_LEN: usize = 14;
const VLAN_TAG_LEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Inlined into the decision (`verdict::decide_in`) rather than called: a call costs about as
/// much as the parsing itself on CPUs whose returns go through a mitigation thunk.
#[inline(always)]
pub fn parse(frame: &Frame, scratch: &mut Scratch) -> Parsed {
    let Some(mut ethertype) = frame.be16_at(12) else {
        return Parsed::Drop(counter::DROP_MALFORMED);
    };
    let mut l3 = ETH_HDR_LEN;
    if is_vlan(ethertype) {
        let Some(inner) = frame.be16_at(ETH_HDR_LEN + 2) else {
            return Parsed::Drop(counter::DROP_MALFORMED);
        };
        // A second tag could hide an IP packet from a parser that stops here: refuse it.
        if is_vlan(inner) {
            return Parsed::Drop(counter::DROP_UNSUPPORTED_ENCAP);
        }
        ethertype = inner;
        l3 += VLAN_TAG_LEN;
    }
    match ethertype {
        ETH_P_IPV4 => ipv4::parse(frame, l3, scratch),
        ETH_P_IPV6 => ipv6::parse(frame, l3, scratch),
        _ => Parsed::NonIp,
    }
}
