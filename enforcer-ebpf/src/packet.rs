//! Bounds-checked access to the frame and the parse result shared by the protocol modules.
use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// The frame as the program sees it: `[start, end)` in kernel memory.
pub struct Frame {
    start: usize,
    end: usize,
}

impl Frame {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self {
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// Length of the frame in bytes.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// A pointer to a `T` at `offset`, or `None` when the frame is too short for it.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Option<*const T> {
        if self.start + offset + size_of::<T>() > self.end {
            return None;
        }
        Some((self.start + offset) as *const T)
    }

    #[inline(always)]
    pub fn be16_at(&self, offset: usize) -> Option<u16> {
        // SAFETY: ptr_at checked the bounds; the read is unaligned-safe.
        self.ptr_at::<[u8; 2]>(offset)
            .map(|p| u16::from_be_bytes(unsafe { p.read_unaligned() }))
    }

    #[inline(always)]
    pub fn bytes_at<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // SAFETY: ptr_at checked the bounds; the read is unaligned-safe.
        self.ptr_at::<[u8; N]>(offset)
            .map(|p| unsafe { p.read_unaligned() })
    }
}

/// Source and destination address of an IP packet.
#[derive(Clone, Copy)]
pub enum Addrs {
    V4 { src: [u8; 4], dst: [u8; 4] },
    V6 { src: [u8; 16], dst: [u8; 16] },
}

/// What the policy needs to know about an IP packet.
#[derive(Clone, Copy)]
pub struct Flow {
    pub addrs: Addrs,
    /// One of `enforcer_common::proto_key`.
    pub proto_key: u8,
    /// Destination port (TCP/UDP), message type (ICMP/ICMPv6), 0 for `NO_PORT`.
    pub port: u16,
}

/// The outcome of parsing a frame. Mirrors `policy_compiler::packet`, the reference parser.
pub enum Parsed {
    Flow(Flow),
    NonIp,
    Malformed,
    UnsupportedEncap,
}
