//! Builds Ethernet frames for the packet-level tests: well-formed ones from a [`PacketSpec`], and
//! adversarial variants (truncated, lying lengths, bad IHL, fragments, stacked VLAN tags) through
//! [`mutate`]. Checksums are left at zero: the enforcer does not verify them, the kernel stack does.
use std::net::IpAddr;

use rand::Rng;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// The smallest frame `BPF_PROG_TEST_RUN` accepts for XDP (an Ethernet header).
pub const MIN_TEST_RUN_FRAME: usize = 14;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp { sport: u16, dport: u16 },
    Udp { sport: u16, dport: u16 },
    /// ICMP when carried in IPv4, ICMPv6 in IPv6 (unless `proto` overrides, see `Other`).
    Icmp { icmp_type: u8, code: u8 },
    /// Any other IP protocol number, with a payload of `len` bytes.
    Other { proto: u8, len: u16 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketSpec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
    pub vlan: Option<u16>,
    /// Extra IPv4 option bytes (a multiple of 4, at most 40); ignored for IPv6.
    pub ipv4_options: u8,
}

impl PacketSpec {
    pub fn new(src: IpAddr, dst: IpAddr, transport: Transport) -> Self {
        Self {
            src,
            dst,
            transport,
            vlan: None,
            ipv4_options: 0,
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
}

/// Where the headers start in a frame built by [`build`], for targeted mutations.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub l3: usize,
    pub l4: usize,
    pub is_ipv6: bool,
}

fn transport_bytes(transport: Transport, v6: bool) -> (u8, Vec<u8>) {
    match transport {
        Transport::Tcp { sport, dport } => {
            let mut tcp = vec![0u8; 20];
            tcp[0..2].copy_from_slice(&sport.to_be_bytes());
            tcp[2..4].copy_from_slice(&dport.to_be_bytes());
            tcp[12] = 5 << 4;
            tcp[13] = 0x02; // SYN
            (6, tcp)
        }
        Transport::Udp { sport, dport } => {
            let mut udp = vec![0u8; 8];
            udp[0..2].copy_from_slice(&sport.to_be_bytes());
            udp[2..4].copy_from_slice(&dport.to_be_bytes());
            udp[4..6].copy_from_slice(&8u16.to_be_bytes());
            (17, udp)
        }
        Transport::Icmp { icmp_type, code } => {
            let mut icmp = vec![0u8; 8];
            icmp[0] = icmp_type;
            icmp[1] = code;
            (if v6 { 58 } else { 1 }, icmp)
        }
        Transport::Other { proto, len } => (proto, vec![0xab; usize::from(len)]),
    }
}

/// A well-formed frame for `spec`, and where its headers are.
pub fn build(spec: &PacketSpec) -> (Vec<u8>, Layout) {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    let (ethertype, v6) = match spec.dst {
        IpAddr::V4(_) => (ETH_P_IPV4, false),
        IpAddr::V6(_) => (ETH_P_IPV6, true),
    };
    if let Some(vid) = spec.vlan {
        frame.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        frame.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    frame.extend_from_slice(&ethertype.to_be_bytes());
    let l3 = frame.len();
    let (proto, payload) = transport_bytes(spec.transport, v6);
    match (spec.src, spec.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let options = usize::from(spec.ipv4_options.min(40) / 4 * 4);
            let hdr_len = 20 + options;
            let total = (hdr_len + payload.len()) as u16;
            frame.push(0x40 | (hdr_len / 4) as u8);
            frame.push(0);
            frame.extend_from_slice(&total.to_be_bytes());
            frame.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
            frame.extend_from_slice(&src.octets());
            frame.extend_from_slice(&dst.octets());
            // NOP options, ending with End of Options.
            frame.extend(std::iter::repeat_n(1u8, options));
            if options > 0 {
                let last = frame.len() - 1;
                frame[last] = 0;
            }
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            frame.push(proto);
            frame.push(64);
            frame.extend_from_slice(&src.octets());
            frame.extend_from_slice(&dst.octets());
        }
        _ => panic!("source and destination must be of one family"),
    }
    let l4 = frame.len();
    frame.extend_from_slice(&payload);
    (frame, Layout { l3, l4, is_ipv6: v6 })
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
            let offset = if layout.is_ipv6 { layout.l3 + 4 } else { layout.l3 + 2 };
            let bogus: u16 = match rng.random_range(0..3) {
                0 => rng.random_range(0..40),
                1 => rng.random(),
                _ => (frame.len() - layout.l3) as u16 + rng.random_range(1..8),
            };
            frame[offset..offset + 2].copy_from_slice(&bogus.to_be_bytes());
        }
        // IHL / version nibble.
        3 => frame[layout.l3] = rng.random(),
        // Fragment flags and offset (IPv4 only; for IPv6 scribble on the flow label).
        4 => {
            let frag: u16 = match rng.random_range(0..3) {
                0 => 0x2000,                              // MF, offset 0: a first fragment
                1 => rng.random_range(1..0x1fff),         // a later fragment
                _ => 0x2000 | rng.random_range(1..0x1fff), // a middle fragment
            };
            frame[layout.l3 + 6..layout.l3 + 8].copy_from_slice(&frag.to_be_bytes());
        }
        // Stacked VLAN tags (QinQ).
        5 => {
            let outer = if rng.random() { ETH_P_8021AD } else { ETH_P_8021Q };
            let mut tag = outer.to_be_bytes().to_vec();
            tag.extend_from_slice(&[0, 7]);
            frame.splice(12..12, tag);
        }
        // Another ethertype.
        6 => {
            let ethertype: u16 = rng.random();
            frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
        }
        // Another IP protocol number.
        7 => {
            let offset = if layout.is_ipv6 { layout.l3 + 6 } else { layout.l3 + 9 };
            frame[offset] = rng.random();
        }
        // Random bytes in the transport header.
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
