//! The reference frame parser: what the kernel program must make of a raw Ethernet frame before
//! the policy is consulted. `enforcer-ebpf` mirrors it module by module; the differential tests
//! feed the same bytes to both.
//!
//! - Ethernet, with at most one 802.1Q or 802.1ad tag. A second tag is refused
//!   ([`FrameOutcome::UnsupportedEncap`]) rather than passed, since it could hide an IP packet.
//! - Ethertypes other than IPv4 and IPv6 (ARP, LLDP, ...) pass ([`FrameOutcome::NonIp`]).
//! - IPv4: version 4, IHL ≥ 5, total length ≥ header length and within the frame (trailing
//!   Ethernet padding is fine). A later fragment (offset ≠ 0) has no transport header: it is a
//!   flow with `port: None`.
//! - IPv6: version 6, payload length within the frame. Extension headers are not walked: the
//!   next-header value is taken as the protocol, which carries no ports (`port: None`).
//! - Transport: TCP needs 20 bytes, UDP 8, ICMP/ICMPv6 8, inside the IP payload; the destination
//!   port (or the ICMP type) is the flow's port. Anything shorter is malformed, which also drops a
//!   first fragment too small to carry its transport header. Other protocols: `port: None`.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::Flow;

/// What a frame is, before the policy is consulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameOutcome {
    /// An IP packet to judge.
    Ip(Flow),
    /// Not IP: passes without judgement.
    NonIp,
    /// Too short for its headers, or lengths that contradict each other: dropped.
    Malformed,
    /// Stacked VLAN tags: dropped.
    UnsupportedEncap,
}

const ETH_HDR_LEN: usize = 14;
const VLAN_TAG_LEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV4_MIN_HDR_LEN: usize = 20;
const IPV6_HDR_LEN: usize = 40;

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;

fn be16(frame: &[u8], offset: usize) -> Option<u16> {
    let bytes = frame.get(offset..offset + 2)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Parses a raw Ethernet frame the way the kernel program does.
pub fn parse_frame(frame: &[u8]) -> FrameOutcome {
    let Some(mut ethertype) = be16(frame, 12) else {
        return FrameOutcome::Malformed;
    };
    let mut l3 = ETH_HDR_LEN;
    if is_vlan(ethertype) {
        let Some(inner) = be16(frame, ETH_HDR_LEN + 2) else {
            return FrameOutcome::Malformed;
        };
        if is_vlan(inner) {
            return FrameOutcome::UnsupportedEncap;
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
    let Some(hdr) = frame.get(l3..l3 + IPV4_MIN_HDR_LEN) else {
        return FrameOutcome::Malformed;
    };
    let version = hdr[0] >> 4;
    let hdr_len = usize::from(hdr[0] & 0x0f) * 4;
    if version != 4 || hdr_len < IPV4_MIN_HDR_LEN {
        return FrameOutcome::Malformed;
    }
    let total_len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    if total_len < hdr_len || l3 + total_len > frame.len() {
        return FrameOutcome::Malformed;
    }
    let src = IpAddr::V4(Ipv4Addr::new(hdr[12], hdr[13], hdr[14], hdr[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(hdr[16], hdr[17], hdr[18], hdr[19]));
    let proto = hdr[9];
    let frag_offset = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
    if frag_offset != 0 {
        return FrameOutcome::Ip(Flow {
            src,
            dst,
            proto,
            port: None,
        });
    }
    transport(frame, src, dst, proto, l3 + hdr_len, l3 + total_len)
}

fn parse_ipv6(frame: &[u8], l3: usize) -> FrameOutcome {
    let Some(hdr) = frame.get(l3..l3 + IPV6_HDR_LEN) else {
        return FrameOutcome::Malformed;
    };
    if hdr[0] >> 4 != 6 {
        return FrameOutcome::Malformed;
    }
    let payload_len = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    let l4 = l3 + IPV6_HDR_LEN;
    if l4 + payload_len > frame.len() {
        return FrameOutcome::Malformed;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    dst.copy_from_slice(&hdr[24..40]);
    let (src, dst) = (
        IpAddr::V6(Ipv6Addr::from(src)),
        IpAddr::V6(Ipv6Addr::from(dst)),
    );
    transport(frame, src, dst, hdr[6], l4, l4 + payload_len)
}

fn transport(
    frame: &[u8],
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: usize,
    l4_end: usize,
) -> FrameOutcome {
    let (needed, port) = match proto {
        PROTO_TCP => (20, be16(frame, l4 + 2)),
        PROTO_UDP => (8, be16(frame, l4 + 2)),
        PROTO_ICMP | PROTO_ICMPV6 => (8, frame.get(l4).map(|t| u16::from(*t))),
        _ => {
            return FrameOutcome::Ip(Flow {
                src,
                dst,
                proto,
                port: None,
            });
        }
    };
    match port {
        Some(port) if l4 + needed <= l4_end => FrameOutcome::Ip(Flow {
            src,
            dst,
            proto,
            port: Some(port),
        }),
        _ => FrameOutcome::Malformed,
    }
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
        frame.extend_from_slice(&tcp);
        frame
    }

    #[test]
    fn tcp_port_is_the_destination_port() {
        match parse_frame(&ipv4_tcp(104)) {
            FrameOutcome::Ip(flow) => {
                assert_eq!(flow.port, Some(104));
                assert_eq!(flow.proto, PROTO_TCP);
                assert_eq!(flow.dst, "10.30.0.10".parse::<IpAddr>().unwrap());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_tcp_is_malformed() {
        let frame = ipv4_tcp(104);
        assert_eq!(
            parse_frame(&frame[..frame.len() - 1]),
            FrameOutcome::Malformed
        );
        assert_eq!(parse_frame(&frame[..13]), FrameOutcome::Malformed);
    }

    #[test]
    fn ihl_below_five_is_malformed() {
        let mut frame = ipv4_tcp(104);
        frame[14] = 0x44;
        assert_eq!(parse_frame(&frame), FrameOutcome::Malformed);
    }

    #[test]
    fn later_fragment_has_no_port() {
        let mut frame = ipv4_tcp(104);
        frame[14 + 6] = 0x00;
        frame[14 + 7] = 0x10;
        match parse_frame(&frame) {
            FrameOutcome::Ip(flow) => assert_eq!(flow.port, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn arp_passes_and_stacked_vlan_is_refused() {
        let mut arp = eth(0x0806);
        arp.extend_from_slice(&[0u8; 28]);
        assert_eq!(parse_frame(&arp), FrameOutcome::NonIp);
        let mut qinq = eth(ETH_P_8021AD);
        qinq.extend_from_slice(&[0, 1, 0x81, 0x00, 0, 2, 0x08, 0x00]);
        assert_eq!(parse_frame(&qinq), FrameOutcome::UnsupportedEncap);
    }
}
