//! The reference frame parser: what the kernel programs must make of a raw Ethernet frame before
//! connection state and policy are consulted. `enforcer-ebpf` mirrors it module by module; the
//! differential tests feed the same bytes to both.
//!
//! - Ethernet, with at most one 802.1Q or 802.1ad tag. A second tag is refused
//!   ([`DropReason::UnsupportedEncap`]) rather than passed, since it could hide an IP packet.
//! - Ethertypes other than IPv4 and IPv6 (ARP, LLDP, ...) pass ([`FrameOutcome::NonIp`]).
//! - IPv4: version 4, IHL ≥ 5, total length ≥ header length and within the frame (trailing
//!   Ethernet padding is fine).
//! - IPv6: version 6, payload length within the frame; extension headers (hop-by-hop, routing,
//!   fragment, destination options, AH, mobility, HIP, shim6) are walked, at most
//!   [`MAX_EXT_HEADERS`] of them ([`DropReason::TooManyExtHeaders`] beyond). Two fragment headers
//!   of a first fragment are malformed.
//! - Fragments: a later fragment (offset ≠ 0) carries no transport header and is reported as
//!   [`FrameOutcome::LaterFragment`]; one whose offset would overlap a TCP header (< 20 bytes)
//!   is [`DropReason::FragmentOverlap`]. A first fragment (offset 0, more fragments) is parsed
//!   like a whole packet, and one too small for its transport header is
//!   [`DropReason::FragmentTooSmall`].
//! - Transport: TCP needs 20 bytes, UDP 8, ICMP/ICMPv6 8, inside the IP payload; anything
//!   shorter is malformed. The policy port is the destination port, or the ICMP type; other
//!   protocols have none. ICMP echo carries its identifier as both connection ports; an ICMP
//!   error (v4: 3, 11, 12; v6: 1-4) quotes a packet, whose connection key is read when the quote
//!   is well-formed and was sent by the error's destination.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer_common::{FlowKey, FragmentKey};

use crate::Flow;

/// Extension headers walked before a packet is refused.
pub const MAX_EXT_HEADERS: usize = 8;

/// Why a frame is dropped before connection state or policy are consulted. Each matches a
/// kernel counter (`enforcer_common::counter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Malformed,
    UnsupportedEncap,
    FragmentOverlap,
    FragmentTooSmall,
    TooManyExtHeaders,
}

/// An IP packet as the connection tracker and the policy see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// What the policy judges.
    pub flow: Flow,
    /// Connection-tracking ports: TCP/UDP ports, the ICMP echo identifier twice, else 0.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// ICMP echo request (ICMP 8 / ICMPv6 128): the only ICMP message that starts a flow.
    pub is_echo_request: bool,
    /// The first fragment of a datagram: (id, protocol as later fragments name it).
    pub first_fragment: Option<(u32, u8)>,
    /// For an ICMP error: the connection key of the packet it quotes.
    pub quoted: Option<FlowKey>,
}

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameOutcome {
    /// An IP packet to track and judge.
    Ip(Packet),
    /// A fragment other than the first: it follows its datagram's first fragment.
    LaterFragment(FragmentKey),
    /// Not IP: passes without judgement.
    NonIp,
    Drop(DropReason),
}

const ETH_HDR_LEN: usize = 14;
const VLAN_TAG_LEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV4_MIN_HDR_LEN: usize = 20;
const IPV6_HDR_LEN: usize = 40;
const HEAD_LEN: usize = 8;

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;

const EXT_HEADERS: [u8; 8] = [0, 43, 44, 51, 60, 135, 139, 140];

fn bytes<const N: usize>(frame: &[u8], offset: usize) -> Option<[u8; N]> {
    frame.get(offset..offset.checked_add(N)?)?.try_into().ok()
}

fn be16(frame: &[u8], offset: usize) -> Option<u16> {
    bytes::<2>(frame, offset).map(u16::from_be_bytes)
}

fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// An address widened to 16 bytes (IPv4 in the first 4) and its family (4 or 6), as the
/// connection and fragment keys hold it.
pub fn widen(addr: IpAddr) -> ([u8; 16], u8) {
    match addr {
        IpAddr::V4(v4) => {
            let mut wide = [0u8; 16];
            wide[..4].copy_from_slice(&v4.octets());
            (wide, 4)
        }
        IpAddr::V6(v6) => (v6.octets(), 6),
    }
}

/// The address a widened key address stands for.
pub fn narrow(addr: &[u8; 16], family: u8) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    }
}

/// The canonical connection key of a packet from (`src`, `sport`) to (`dst`, `dport`), and the
/// side of the key its source is (0 = `a`, 1 = `b`): endpoints ordered by address bytes, then
/// port, so a packet and its reply share the key.
pub fn flow_key(
    src: &[u8; 16],
    sport: u16,
    dst: &[u8; 16],
    dport: u16,
    proto: u8,
    family: u8,
) -> (FlowKey, u8) {
    let src_is_a = (src, sport) <= (dst, dport);
    let (addr_a, port_a, addr_b, port_b) = if src_is_a {
        (*src, sport, *dst, dport)
    } else {
        (*dst, dport, *src, sport)
    };
    let key = FlowKey {
        addr_a,
        addr_b,
        port_a,
        port_b,
        proto,
        family,
        _pad: [0; 2],
    };
    (key, u8::from(!src_is_a))
}

/// Parses a raw Ethernet frame the way the kernel programs do.
pub fn parse_frame(frame: &[u8]) -> FrameOutcome {
    let Some(mut ethertype) = be16(frame, 12) else {
        return FrameOutcome::Drop(DropReason::Malformed);
    };
    let mut l3 = ETH_HDR_LEN;
    if is_vlan(ethertype) {
        let Some(inner) = be16(frame, ETH_HDR_LEN + 2) else {
            return FrameOutcome::Drop(DropReason::Malformed);
        };
        if is_vlan(inner) {
            return FrameOutcome::Drop(DropReason::UnsupportedEncap);
        }
        ethertype = inner;
        l3 += VLAN_TAG_LEN;
    }
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(frame, l3),
        ETH_P_IPV6 => parse_ipv6(frame, l3),
        _ => FrameOutcome::NonIp,
    }
}

fn parse_ipv4(frame: &[u8], l3: usize) -> FrameOutcome {
    let Some(hdr) = bytes::<IPV4_MIN_HDR_LEN>(frame, l3) else {
        return FrameOutcome::Drop(DropReason::Malformed);
    };
    let version = hdr[0] >> 4;
    let hdr_len = usize::from(hdr[0] & 0x0f) * 4;
    if version != 4 || hdr_len < IPV4_MIN_HDR_LEN {
        return FrameOutcome::Drop(DropReason::Malformed);
    }
    let total_len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    if total_len < hdr_len || l3 + total_len > frame.len() {
        return FrameOutcome::Drop(DropReason::Malformed);
    }
    let src = IpAddr::V4(Ipv4Addr::new(hdr[12], hdr[13], hdr[14], hdr[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(hdr[16], hdr[17], hdr[18], hdr[19]));
    let proto = hdr[9];
    let flags_offset = u16::from_be_bytes([hdr[6], hdr[7]]);
    let frag_offset = usize::from(flags_offset & 0x1fff) * 8;
    let id = u32::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    if frag_offset != 0 {
        return later_fragment(src, dst, id, proto, frag_offset);
    }
    let first_fragment = (flags_offset & 0x2000 != 0).then_some((id, proto));
    transport(
        frame,
        src,
        dst,
        proto,
        l3 + hdr_len,
        l3 + total_len,
        first_fragment,
    )
}

fn parse_ipv6(frame: &[u8], l3: usize) -> FrameOutcome {
    let Some(hdr) = bytes::<IPV6_HDR_LEN>(frame, l3) else {
        return FrameOutcome::Drop(DropReason::Malformed);
    };
    if hdr[0] >> 4 != 6 {
        return FrameOutcome::Drop(DropReason::Malformed);
    }
    let payload_len = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    let end = l3 + IPV6_HDR_LEN + payload_len;
    if end > frame.len() {
        return FrameOutcome::Drop(DropReason::Malformed);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    dst.copy_from_slice(&hdr[24..40]);
    let (src, dst) = (
        IpAddr::V6(Ipv6Addr::from(src)),
        IpAddr::V6(Ipv6Addr::from(dst)),
    );
    let mut next = hdr[6];
    let mut offset = l3 + IPV6_HDR_LEN;
    let mut first_fragment = None;
    for _ in 0..MAX_EXT_HEADERS {
        let len = match next {
            0 | 43 | 60 | 135 | 139 | 140 => {
                let Some(ext) = bytes::<2>(frame, offset) else {
                    return FrameOutcome::Drop(DropReason::Malformed);
                };
                next = ext[0];
                (usize::from(ext[1]) + 1) * 8
            }
            51 => {
                let Some(ext) = bytes::<2>(frame, offset) else {
                    return FrameOutcome::Drop(DropReason::Malformed);
                };
                next = ext[0];
                (usize::from(ext[1]) + 2) * 4
            }
            44 => {
                let Some(ext) = bytes::<8>(frame, offset) else {
                    return FrameOutcome::Drop(DropReason::Malformed);
                };
                if first_fragment.is_some() {
                    return FrameOutcome::Drop(DropReason::Malformed);
                }
                let frag_offset = usize::from(u16::from_be_bytes([ext[2], ext[3]]) >> 3) * 8;
                let id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                if frag_offset != 0 {
                    return later_fragment(src, dst, id, ext[0], frag_offset);
                }
                if ext[3] & 1 != 0 {
                    first_fragment = Some((id, ext[0]));
                }
                next = ext[0];
                8
            }
            _ => return transport(frame, src, dst, next, offset, end, first_fragment),
        };
        offset += len;
        if offset > end {
            return FrameOutcome::Drop(DropReason::Malformed);
        }
    }
    if EXT_HEADERS.contains(&next) {
        return FrameOutcome::Drop(DropReason::TooManyExtHeaders);
    }
    transport(frame, src, dst, next, offset, end, first_fragment)
}

fn later_fragment(src: IpAddr, dst: IpAddr, id: u32, proto: u8, offset: usize) -> FrameOutcome {
    if proto == PROTO_TCP && offset < 20 {
        return FrameOutcome::Drop(DropReason::FragmentOverlap);
    }
    let (src, family) = widen(src);
    let (dst, _) = widen(dst);
    FrameOutcome::LaterFragment(FragmentKey {
        src,
        dst,
        id,
        proto,
        family,
        _pad: [0; 2],
    })
}

fn is_echo(proto: u8, icmp_type: u8) -> bool {
    if proto == PROTO_ICMPV6 {
        icmp_type == 128 || icmp_type == 129
    } else {
        icmp_type == 8 || icmp_type == 0
    }
}

fn transport(
    frame: &[u8],
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: usize,
    l4_end: usize,
    first_fragment: Option<(u32, u8)>,
) -> FrameOutcome {
    let mut packet = Packet {
        flow: Flow {
            src,
            dst,
            proto,
            port: None,
        },
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        is_echo_request: false,
        first_fragment,
        quoted: None,
    };
    let needed = match proto {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => 8,
        _ => return FrameOutcome::Ip(packet),
    };
    let too_small = if first_fragment.is_some() {
        DropReason::FragmentTooSmall
    } else {
        DropReason::Malformed
    };
    let Some(head) = bytes::<HEAD_LEN>(frame, l4) else {
        return FrameOutcome::Drop(too_small);
    };
    if l4 + needed > l4_end {
        return FrameOutcome::Drop(too_small);
    }
    match proto {
        PROTO_TCP | PROTO_UDP => {
            packet.sport = u16::from_be_bytes([head[0], head[1]]);
            packet.dport = u16::from_be_bytes([head[2], head[3]]);
            packet.flow.port = Some(packet.dport);
            if proto == PROTO_TCP {
                let Some(rest) = bytes::<HEAD_LEN>(frame, l4 + HEAD_LEN) else {
                    return FrameOutcome::Drop(too_small);
                };
                packet.tcp_flags = rest[13 - HEAD_LEN];
            }
        }
        _ => {
            let icmp_type = head[0];
            packet.flow.port = Some(u16::from(icmp_type));
            if is_echo(proto, icmp_type) {
                let id = u16::from_be_bytes([head[4], head[5]]);
                packet.sport = id;
                packet.dport = id;
                packet.is_echo_request = icmp_type == if proto == PROTO_ICMPV6 { 128 } else { 8 };
            } else {
                let is_error = if proto == PROTO_ICMPV6 {
                    (1..=4).contains(&icmp_type)
                } else {
                    matches!(icmp_type, 3 | 11 | 12)
                };
                if is_error {
                    packet.quoted = quote(frame, dst, l4 + 8, l4_end);
                }
            }
        }
    }
    FrameOutcome::Ip(packet)
}

/// The connection key of the packet an ICMP error quotes at `q`, when the quote is well-formed
/// and its source is the error's destination `outer_dst`.
fn quote(frame: &[u8], outer_dst: IpAddr, q: usize, end: usize) -> Option<FlowKey> {
    let (outer_dst, family) = widen(outer_dst);
    let (src, dst, proto, ql4) = if family == 4 {
        let hdr = bytes::<IPV4_MIN_HDR_LEN>(frame, q)?;
        let hdr_len = usize::from(hdr[0] & 0x0f) * 4;
        if hdr[0] >> 4 != 4 || hdr_len < IPV4_MIN_HDR_LEN {
            return None;
        }
        let (src, _) = widen(IpAddr::V4(Ipv4Addr::new(
            hdr[12], hdr[13], hdr[14], hdr[15],
        )));
        let (dst, _) = widen(IpAddr::V4(Ipv4Addr::new(
            hdr[16], hdr[17], hdr[18], hdr[19],
        )));
        (src, dst, hdr[9], q + hdr_len)
    } else {
        let hdr = bytes::<IPV6_HDR_LEN>(frame, q)?;
        if hdr[0] >> 4 != 6 {
            return None;
        }
        let src: [u8; 16] = hdr[8..24].try_into().ok()?;
        let dst: [u8; 16] = hdr[24..40].try_into().ok()?;
        (src, dst, hdr[6], q + IPV6_HDR_LEN)
    };
    if src != outer_dst {
        return None;
    }
    let head = bytes::<HEAD_LEN>(frame, ql4)?;
    if ql4 + HEAD_LEN > end {
        return None;
    }
    let (sport, dport) = match proto {
        PROTO_TCP | PROTO_UDP => (
            u16::from_be_bytes([head[0], head[1]]),
            u16::from_be_bytes([head[2], head[3]]),
        ),
        PROTO_ICMP | PROTO_ICMPV6 => {
            if !is_echo(proto, head[0]) {
                return None;
            }
            let id = u16::from_be_bytes([head[4], head[5]]);
            (id, id)
        }
        _ => (0, 0),
    };
    Some(flow_key(&src, sport, &dst, dport, proto, family).0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame
    }

    fn ipv4_tcp(dport: u16) -> Vec<u8> {
        let mut frame = eth(ETH_P_IPV4);
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, PROTO_TCP, 0, 0];
        ip.extend_from_slice(&[10, 10, 0, 10, 10, 30, 0, 10]);
        frame.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[13] = 0x02;
        frame.extend_from_slice(&tcp);
        frame
    }

    fn packet(outcome: FrameOutcome) -> Packet {
        match outcome {
            FrameOutcome::Ip(packet) => packet,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tcp_port_is_the_destination_port() {
        let packet = packet(parse_frame(&ipv4_tcp(104)));
        assert_eq!(packet.flow.port, Some(104));
        assert_eq!(packet.flow.proto, PROTO_TCP);
        assert_eq!(
            (packet.sport, packet.dport, packet.tcp_flags),
            (40000, 104, 0x02)
        );
        assert_eq!(packet.flow.dst, "10.30.0.10".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn truncated_tcp_is_malformed() {
        let frame = ipv4_tcp(104);
        let malformed = FrameOutcome::Drop(DropReason::Malformed);
        assert_eq!(parse_frame(&frame[..frame.len() - 1]), malformed);
        assert_eq!(parse_frame(&frame[..13]), malformed);
    }

    #[test]
    fn ihl_below_five_is_malformed() {
        let mut frame = ipv4_tcp(104);
        frame[14] = 0x44;
        assert_eq!(
            parse_frame(&frame),
            FrameOutcome::Drop(DropReason::Malformed)
        );
    }

    #[test]
    fn fragments() {
        let mut later = ipv4_tcp(104);
        later[14 + 6..14 + 8].copy_from_slice(&0x0003u16.to_be_bytes());
        assert!(matches!(
            parse_frame(&later),
            FrameOutcome::LaterFragment(_)
        ));
        let mut overlapping = ipv4_tcp(104);
        overlapping[14 + 6..14 + 8].copy_from_slice(&0x0001u16.to_be_bytes());
        assert_eq!(
            parse_frame(&overlapping),
            FrameOutcome::Drop(DropReason::FragmentOverlap)
        );
        let mut first = ipv4_tcp(104);
        first[14 + 6..14 + 8].copy_from_slice(&0x2000u16.to_be_bytes());
        assert_eq!(
            packet(parse_frame(&first)).first_fragment,
            Some((0, PROTO_TCP))
        );
        // A first fragment that cuts the TCP header short.
        first[14 + 2..14 + 4].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(
            parse_frame(&first[..14 + 30]),
            FrameOutcome::Drop(DropReason::FragmentTooSmall)
        );
    }

    #[test]
    fn arp_passes_and_stacked_vlan_is_refused() {
        let mut arp = eth(0x0806);
        arp.extend_from_slice(&[0u8; 28]);
        assert_eq!(parse_frame(&arp), FrameOutcome::NonIp);
        let mut qinq = eth(ETH_P_8021AD);
        qinq.extend_from_slice(&[0, 1, 0x81, 0x00, 0, 2, 0x08, 0x00]);
        assert_eq!(
            parse_frame(&qinq),
            FrameOutcome::Drop(DropReason::UnsupportedEncap)
        );
    }

    #[test]
    fn reply_shares_the_key() {
        let a: [u8; 16] = widen("10.0.0.1".parse().unwrap()).0;
        let b: [u8; 16] = widen("10.0.0.2".parse().unwrap()).0;
        let (forward, forward_side) = flow_key(&a, 40000, &b, 104, 6, 4);
        let (reply, reply_side) = flow_key(&b, 104, &a, 40000, 6, 4);
        assert_eq!(forward, reply);
        assert_ne!(forward_side, reply_side);
    }
}
