//! Map layouts and constants shared by the kernel programs (`enforcer-ebpf`) and user space
//! (`enforcer`, `policy-compiler`). This is the only place where a map's key or value layout is
//! defined.
//!
//! # How a packet is judged
//!
//! 1. The destination and source addresses are looked up in the address trie of their family
//!    ([`ADDR_V4`], [`ADDR_V6`]): longest prefix wins, and the value ([`AddrInfo`]) gives the
//!    address's segment and its *source class*. A miss means segment [`SEGMENT_WORLD`] and class
//!    [`CLASS_WORLD`].
//! 2. The destination segment's [`SegmentInfo`] says whether it is enforced, monitored or not
//!    enforced at all.
//! 3. [`PAIRS`] maps (destination segment, source class) to a *port table*; a miss is a denial.
//! 4. [`PORTS`] is a trie over (port table, protocol key, port): the longest match names the first
//!    rule (in policy order) that allows the packet; a miss is a denial.
//!
//! A source class groups the source addresses that every rule treats alike: same segment, and
//! inside the same set of the rules' `from:` CIDRs. The compiler computes classes, so the kernel
//! never iterates over rules.
#![no_std]

/// Map names, as declared in the eBPF object. User space finds maps by these names.
pub mod map_names {
    pub const ADDR_V4: &str = "ADDR_V4";
    pub const ADDR_V6: &str = "ADDR_V6";
    pub const SEGMENTS: &str = "SEGMENTS";
    pub const PAIRS: &str = "PAIRS";
    pub const PORTS: &str = "PORTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const RULE_HITS: &str = "RULE_HITS";
}

/// Program names, as declared in the eBPF object.
pub mod program_names {
    pub const XDP_INGRESS: &str = "enforcer_xdp";
}

/// Segment id of `world`: every address that is in no segment.
pub const SEGMENT_WORLD: u32 = 0;
/// Source class of an address that matches no prefix in the address trie.
pub const CLASS_WORLD: u32 = 0;

/// Compile-time capacity of each map as declared in the eBPF object. The loader overrides these
/// with sizes computed from the compiled policy (plus headroom) before loading.
pub const DEFAULT_MAX_ENTRIES: u32 = 1024;

/// Value of [`ADDR_V4`] / [`ADDR_V6`] (keys are `Key<[u8; 4]>` / `Key<[u8; 16]>`, address in
/// network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrInfo {
    pub segment: u32,
    pub class: u32,
}

/// How a segment's incoming traffic is handled.
pub mod segment_mode {
    /// Traffic to the segment is not judged (the default for `world`).
    pub const UNENFORCED: u8 = 0;
    /// Traffic without an allow rule is dropped.
    pub const ENFORCE: u8 = 1;
    /// Traffic without an allow rule passes and is counted as audit.
    pub const MONITOR: u8 = 2;
}

/// Value of the [`SEGMENTS`] array, indexed by segment id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentInfo {
    /// One of [`segment_mode`].
    pub mode: u8,
    pub _pad: [u8; 3],
}

/// Key of the [`PAIRS`] hash map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairKey {
    pub dst_segment: u32,
    pub src_class: u32,
}

/// Value of the [`PAIRS`] hash map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairValue {
    pub port_table: u32,
}

/// Protocol keys used in [`PortKey`]. TCP and UDP match on the destination port, ICMP and
/// ICMPv6 on the message type (stored in the port field). Every other IP protocol, and a packet
/// whose transport header is not present (a non-first fragment), uses [`proto_key::NO_PORT`]
/// with port 0: only rules with `ports: [any]` match it.
pub mod proto_key {
    pub const NO_PORT: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// Data part of the [`PORTS`] LPM-trie key (`Key<PortKey>`). Bits are matched from the first
/// byte, so every field is big-endian and the prefix length is `48 + k` where `k` is the number
/// of leading port bits that are fixed (0..=16).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// Port table id, big-endian.
    pub table: [u8; 4],
    /// One of [`proto_key`].
    pub proto: u8,
    pub _pad: u8,
    /// Port (or ICMP type), big-endian.
    pub port: [u8; 2],
}

/// Number of key bits of a [`PortKey`] before the port: table (32), protocol (8), padding (8).
pub const PORT_KEY_FIXED_BITS: u32 = 48;

impl PortKey {
    pub const fn new(table: u32, proto: u8, port: u16) -> Self {
        Self {
            table: table.to_be_bytes(),
            proto,
            _pad: 0,
            port: port.to_be_bytes(),
        }
    }
}

/// Value of the [`PORTS`] trie: the global index of the rule that allows the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortValue {
    pub rule: u32,
}

/// Indexes of the per-CPU [`COUNTERS`] array. Every packet the program sees increments exactly
/// one of them.
pub mod counter {
    /// Allowed by a rule (or by `intra: allow`).
    pub const ALLOWED: u32 = 0;
    /// No rule allowed it, destination segment in monitor mode: passed.
    pub const AUDIT: u32 = 1;
    /// Destination not enforced (`world` by default): passed without judgement.
    pub const UNENFORCED: u32 = 2;
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passed.
    pub const NON_IP: u32 = 3;
    /// Dropped: no rule allowed it (`policy_denied`).
    pub const DROP_POLICY_DENIED: u32 = 4;
    /// Dropped: too short for its headers, or inconsistent lengths (`malformed`).
    pub const DROP_MALFORMED: u32 = 5;
    /// Dropped: encapsulation the parser does not look into, such as stacked VLAN tags
    /// (`unsupported_encap`).
    pub const DROP_UNSUPPORTED_ENCAP: u32 = 6;
    /// Number of counters.
    pub const COUNT: u32 = 7;

    /// Stable names, used for metrics and logs.
    pub const NAMES: [&str; COUNT as usize] = [
        "allowed",
        "audit",
        "unenforced",
        "non_ip",
        "policy_denied",
        "malformed",
        "unsupported_encap",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain only integers and have no implicit
    // padding (explicit `_pad` fields fill the gaps).
    unsafe impl aya::Pod for AddrInfo {}
    unsafe impl aya::Pod for SegmentInfo {}
    unsafe impl aya::Pod for PairKey {}
    unsafe impl aya::Pod for PairValue {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PortValue {}
}
