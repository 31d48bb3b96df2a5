//! Builds Ethernet frames for the packet-level tests: well-formed ones from a [`PacketSpec`]
//! (TCP with flags, UDP, ICMP echo and errors, IPv6 extension headers, fragments, VLAN), and
//! adversarial variants (truncated, lying lengths, bad IHL, stacked VLAN tags) through
//! [`mutate`]. Checksums are left at zero: the enforcer does not verify them.
use std::net::IpAddr;

use rand::Rng;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// The smallest frame `BPF_PROG_TEST_RUN` accepts (an Ethernet header).
pub const MIN_TEST_RUN_FRAME: usize = 14;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP in IPv4, ICMPv6 in IPv6; `id` fills bytes 4-5 (the echo identifier).
    Icmp {
        icmp_type: u8,
        code: u8,
        id: u16,
    },
    /// An ICMP error quoting `quoted` (an IP packet without its Ethernet header).
    IcmpError {
        icmp_type: u8,
        code: u8,
        quoted: Vec<u8>,
    },
    /// Any other IP protocol number, with a payload of `len` bytes.
    Other {
        proto: u8,
        len: u16,
    },
}

impl Transport {
    pub fn tcp(sport: u16, dport: u16, flags: u8) -> Self {
        Transport::Tcp {
            sport,
            dport,
            flags,
        }
    }

    pub fn udp(sport: u16, dport: u16) -> Self {
        Transport::Udp { sport, dport }
    }

    pub fn icmp(icmp_type: u8, id: u16) -> Self {
        Transport::Icmp {
            icmp_type,
            code: 0,
            id,
        }
    }
}

/// Which fragment of a datagram a packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentSpec {
    pub id: u32,
    /// Offset in 8-byte units.
    pub offset: u16,
    pub more: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketSpec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
    pub vlan: Option<u16>,
    /// Extra IPv4 option bytes (a multiple of 4, at most 40); ignored for IPv6.
    pub ipv4_options: u8,
    /// IPv6 extension headers (next-header values: 0, 43, 60, 51, ...) before the transport
    /// header; ignored for IPv4.
    pub ext_headers: Vec<u8>,
    pub fragment: Option<FragmentSpec>,
}

impl PacketSpec {
    pub fn new(src: IpAddr, dst: IpAddr, transport: Transport) -> Self {
        Self {
            src,
            dst,
            transport,
            vlan: None,
            ipv4_options: 0,
            ext_headers: Vec::new(),
            fragment: None,
        }
    }

    pub fn with_vlan(mut self, vid: u16) -> Self {
        self.vlan = Some(vid);
        self
    }

    pub fn with_ipv4_options(mut self, bytes: u8) -> Self {
        self.ipv4_options = bytes;
        self
    }

    pub fn with_ext_headers(mut self, headers: &[u8]) -> Self {
        self.ext_headers = headers.to_vec();
        self
    }

    pub fn with_fragment(mut self, id: u32, offset: u16, more: bool) -> Self {
        self.fragment = Some(FragmentSpec { id, offset, more });
        self
    }

    /// The same flow in the other direction: addresses and ports swapped, and for ICMP echo a
    /// reply to a request (or a request to a reply).
    pub fn reversed(&self) -> Self {
        let mut reply = self.clone();
        reply.src = self.dst;
        reply.dst = self.src;
        reply.transport = match self.transport.clone() {
            Transport::Tcp {
                sport,
                dport,
                flags,
            } => Transport::Tcp {
                sport: dport,
                dport: sport,
                flags,
            },
            Transport::Udp { sport, dport } => Transport::Udp {
                sport: dport,
                dport: sport,
            },
            Transport::Icmp {
                icmp_type,
                code,
                id,
            } => Transport::Icmp {
                icmp_type: match icmp_type {
                    8 => 0,
                    0 => 8,
                    128 => 129,
                    129 => 128,
                    other => other,
                },
                code,
                id,
            },
            other => other,
        };
        reply
    }

    pub fn with_tcp_flags(mut self, new_flags: u8) -> Self {
        if let Transport::Tcp { flags, .. } = &mut self.transport {
            *flags = new_flags;
        }
        self
    }
}

/// Where the headers start in a frame built by [`build`], for targeted mutations.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub l3: usize,
    pub l4: usize,
    pub is_ipv6: bool,
}

fn transport_bytes(transport: &Transport, v6: bool) -> (u8, Vec<u8>) {
    let icmp_proto = if v6 { 58 } else { 1 };
    match transport {
        Transport::Tcp {
            sport,
            dport,
            flags,
        } => {
            let mut tcp = vec![0u8; 20];
            tcp[0..2].copy_from_slice(&sport.to_be_bytes());
            tcp[2..4].copy_from_slice(&dport.to_be_bytes());
            tcp[12] = 5 << 4;
            tcp[13] = *flags;
            (6, tcp)
        }
        Transport::Udp { sport, dport } => {
            let mut udp = vec![0u8; 8];
            udp[0..2].copy_from_slice(&sport.to_be_bytes());
            udp[2..4].copy_from_slice(&dport.to_be_bytes());
            udp[4..6].copy_from_slice(&8u16.to_be_bytes());
            (17, udp)
        }
        Transport::Icmp {
            icmp_type,
            code,
            id,
        } => {
            let mut icmp = vec![0u8; 8];
            icmp[0] = *icmp_type;
            icmp[1] = *code;
            icmp[4..6].copy_from_slice(&id.to_be_bytes());
            (icmp_proto, icmp)
        }
        Transport::IcmpError {
            icmp_type,
            code,
            quoted,
        } => {
            let mut icmp = vec![*icmp_type, *code, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(quoted);
            (icmp_proto, icmp)
        }
        Transport::Other { proto, len } => (*proto, vec![0xab; usize::from(*len)]),
    }
}

/// A frame for `spec`, and where its headers are.
pub fn build(spec: &PacketSpec) -> (Vec<u8>, Layout) {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    let v6 = spec.dst.is_ipv6();
    if let Some(vid) = spec.vlan {
        frame.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        frame.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    frame.extend_from_slice(&(if v6 { ETH_P_IPV6 } else { ETH_P_IPV4 }).to_be_bytes());
    let l3 = frame.len();
    let (proto, mut payload) = transport_bytes(&spec.transport, v6);
    // A later fragment carries payload bytes, not a transport header.
    if spec.fragment.is_some_and(|f| f.offset != 0) {
        payload = vec![0xcd; payload.len().max(8)];
    }
    match (spec.src, spec.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let options = usize::from(spec.ipv4_options.min(40) / 4 * 4);
            let hdr_len = 20 + options;
            let total = (hdr_len + payload.len()) as u16;
            let (id, flags_offset) = match spec.fragment {
                Some(f) => (
                    f.id as u16,
                    (f.offset & 0x1fff) | if f.more { 0x2000 } else { 0 },
                ),
                None => (0x1234, 0x4000),
            };
            frame.push(0x40 | (hdr_len / 4) as u8);
            frame.push(0);
            frame.extend_from_slice(&total.to_be_bytes());
            frame.extend_from_slice(&id.to_be_bytes());
            frame.extend_from_slice(&flags_offset.to_be_bytes());
            frame.extend_from_slice(&[64, proto, 0, 0]);
            frame.extend_from_slice(&src.octets());
            frame.extend_from_slice(&dst.octets());
            frame.extend(std::iter::repeat_n(1u8, options));
            if options > 0 {
                let last = frame.len() - 1;
                frame[last] = 0;
            }
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            // The chain: extension headers, then the fragment header, then the payload.
            let mut chain: Vec<u8> = spec.ext_headers.clone();
            if spec.fragment.is_some() {
                chain.push(44);
            }
            let mut ext = Vec::new();
            for (i, header) in chain.iter().enumerate() {
                let next = chain.get(i + 1).copied().unwrap_or(proto);
                match (*header, spec.fragment) {
                    (44, Some(f)) => {
                        ext.extend_from_slice(&[next, 0]);
                        ext.extend_from_slice(&((f.offset << 3) | u16::from(f.more)).to_be_bytes());
                        ext.extend_from_slice(&f.id.to_be_bytes());
                    }
                    // AH: length in 4-byte units minus 2; 12 bytes here.
                    (51, _) => ext.extend_from_slice(&[next, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                    _ => ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
                }
            }
            let first_next = chain.first().copied().unwrap_or(proto);
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&((ext.len() + payload.len()) as u16).to_be_bytes());
            frame.push(first_next);
            frame.push(64);
            frame.extend_from_slice(&src.octets());
            frame.extend_from_slice(&dst.octets());
            frame.extend_from_slice(&ext);
        }
        _ => panic!("source and destination must be of one family"),
    }
    let l4 = frame.len();
    frame.extend_from_slice(&payload);
    (
        frame,
        Layout {
            l3,
            l4,
            is_ipv6: v6,
        },
    )
}

/// The IP packet of `frame` (Ethernet and VLAN header removed), as an ICMP error quotes it.
pub fn ip_packet(frame: &[u8], layout: Layout) -> Vec<u8> {
    frame[layout.l3..].to_vec()
}

/// An ARP request: the kind of non-IP frame that must pass untouched.
pub fn arp() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0u8; 20]);
    frame
}

/// Applies one random adversarial change to a frame built by [`build`]. The result may be
/// anything; the reference parser says what it is.
pub fn mutate(rng: &mut impl Rng, frame: &mut Vec<u8>, layout: Layout) {
    match rng.random_range(0..10) {
        // Truncate anywhere after the Ethernet header.
        0 => {
            let len = rng.random_range(MIN_TEST_RUN_FRAME..=frame.len());
            frame.truncate(len);
        }
        // Trailing bytes beyond the IP length (Ethernet padding, or a smuggling attempt).
        1 => frame.extend(std::iter::repeat_n(0u8, rng.random_range(1..40))),
        // A lying IP length.
        2 => {
            let offset = if layout.is_ipv6 {
                layout.l3 + 4
            } else {
                layout.l3 + 2
            };
            let bogus: u16 = match rng.random_range(0..3) {
                0 => rng.random_range(0..40),
                1 => rng.random(),
                _ => (frame.len() - layout.l3) as u16 + rng.random_range(1..8),
            };
            frame[offset..offset + 2].copy_from_slice(&bogus.to_be_bytes());
        }
        // IHL / version nibble.
        3 => frame[layout.l3] = rng.random(),
        // Fragment flags and offset (IPv4; for IPv6 this scribbles on the flow label).
        4 => {
            let frag: u16 = match rng.random_range(0..4) {
                0 => 0x2000,
                1 => rng.random_range(1..4),
                2 => rng.random_range(1..0x1fff),
                _ => 0x2000 | rng.random_range(1..0x1fff),
            };
            frame[layout.l3 + 6..layout.l3 + 8].copy_from_slice(&frag.to_be_bytes());
        }
        // Stacked VLAN tags (QinQ).
        5 => {
            let outer = if rng.random() {
                ETH_P_8021AD
            } else {
                ETH_P_8021Q
            };
            let mut tag = outer.to_be_bytes().to_vec();
            tag.extend_from_slice(&[0, 7]);
            frame.splice(12..12, tag);
        }
        // Another ethertype.
        6 => {
            let ethertype: u16 = rng.random();
            frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
        }
        // Another IP protocol number (or first next-header).
        7 => {
            let offset = if layout.is_ipv6 {
                layout.l3 + 6
            } else {
                layout.l3 + 9
            };
            frame[offset] = if rng.random() {
                *[0u8, 43, 44, 51, 60, 135]
                    .get(rng.random_range(0..6))
                    .unwrap()
            } else {
                rng.random()
            };
        }
        // Random bytes in the transport header or beyond.
        8 => {
            if frame.len() > layout.l4 {
                let i = rng.random_range(layout.l4..frame.len());
                frame[i] = rng.random();
            }
        }
        // Cut exactly inside the transport header: the tiny-header case.
        _ => {
            let cut = (layout.l4 + rng.random_range(0..8)).min(frame.len());
            frame.truncate(cut.max(MIN_TEST_RUN_FRAME));
        }
    }
}
