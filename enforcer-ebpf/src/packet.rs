//! Bounds-checked access to the packet, and the parse result shared by the protocol modules.
//!
//! The parsed packet lives in a per-CPU scratch map ([`crate::maps::SCRATCH`]) and parsers fill
//! it in place: passed by value, it and the keys derived from it would not fit the 512-byte BPF
//! stack together.
use core::mem::{align_of, offset_of, size_of};

use enforcer_common::{Event, FlowKey, FragmentKey, leading_words};

/// The packet as a program sees it: readable bytes `[start, end)`, and `len`, the length of the
/// whole packet (for TC, the part past `end` is in the skb's paged data).
pub struct Frame {
    start: usize,
    end: usize,
    len: usize,
}

impl Frame {
    #[inline(always)]
    pub fn new(start: usize, end: usize, len: usize) -> Self {
        Self { start, end, len }
    }

    /// `(start, end, len)`, to pass a frame to a function that takes only scalars.
    #[inline(always)]
    pub fn parts(&self) -> (usize, usize, usize) {
        (self.start, self.end, self.len)
    }

    /// Length of the whole packet in bytes.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// A pointer to a `T` at `offset`, or `None` when the readable bytes are too short for it.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Option<*const T> {
        if self.start + offset + size_of::<T>() > self.end {
            return None;
        }
        Some((self.start + offset) as *const T)
    }

    /// The 16 bytes at `offset` as an address, read as two words: a 16-byte array stored into
    /// the scratch memory becomes a `memmove` call, a byte-by-byte subprogram in BPF.
    #[inline(always)]
    pub fn addr_at(&self, offset: usize) -> Option<Addr> {
        let words = self.ptr_at::<[u64; 2]>(offset)?.cast::<u64>();
        // SAFETY: ptr_at checked the bounds; the reads are unaligned-safe.
        let (first, second) = unsafe { (words.read_unaligned(), words.add(1).read_unaligned()) };
        let value = u128::from(u64::from_le(first)) | (u128::from(u64::from_le(second)) << 64);
        Some(Addr(value.to_le_bytes()))
    }

    #[inline(always)]
    pub fn be16_at(&self, offset: usize) -> Option<u16> {
        self.bytes_at::<2>(offset).map(u16::from_be_bytes)
    }

    #[inline(always)]
    pub fn bytes_at<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // SAFETY: ptr_at checked the bounds; the read is unaligned-safe.
        self.ptr_at::<[u8; N]>(offset)
            .map(|p| unsafe { p.read_unaligned() })
    }
}

/// An address as the programs hold it: 16 bytes, IPv4 in the first 4 and the rest zero. Its
/// alignment lets the compiler copy and compare it as two words: a plain `[u8; 16]` behind a
/// reference is copied byte by byte.
#[repr(C, align(8))]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Addr(pub [u8; 16]);

impl Addr {
    /// The two addresses of a connection-tracking key.
    #[inline(always)]
    pub fn of_key(key: &FlowKey) -> (&Addr, &Addr) {
        const _: () = assert!(
            align_of::<FlowKey>() >= align_of::<Addr>()
                && offset_of!(FlowKey, addr_a).is_multiple_of(align_of::<Addr>())
                && offset_of!(FlowKey, addr_b).is_multiple_of(align_of::<Addr>())
        );
        let a = (&key.addr_a as *const [u8; 16]).cast::<Addr>();
        let b = (&key.addr_b as *const [u8; 16]).cast::<Addr>();
        // SAFETY: `Addr` is a `[u8; 16]` with a stricter alignment, which both fields have (see
        // the assertion above); the borrows last as long as `key`'s.
        unsafe { (&*a, &*b) }
    }

    /// The address as two little-endian words, read whole (see
    /// `enforcer_common::exact_table::find_v6`).
    #[inline(always)]
    pub fn words_le(&self) -> [u64; 2] {
        leading_words(self)
    }

    /// Half `i` (0 or 1) of the address as a big-endian number, read as one word.
    #[inline(always)]
    pub fn half_be(&self, i: usize) -> u64 {
        self.words_le()[i & 1].swap_bytes()
    }
}

/// What the programs need to know about an IP packet. Every field is written for every packet.
///
/// Aligned like the keys built from it, so that the compiler copies and clears it eight bytes
/// at a time; at alignment 1 it does so byte by byte, or calls a byte-wise `memset`.
#[repr(C, align(8))]
pub struct Flow {
    /// Addresses, IPv4 in the first 4 bytes.
    pub src: Addr,
    pub dst: Addr,
    /// For an ICMP error whose `has_quoted` is set: the connection-tracking key of the packet
    /// it quotes.
    pub quoted: FlowKey,
    /// Datagram id of a first fragment.
    pub frag_id: u32,
    /// Destination port (TCP/UDP) or message type (ICMP/ICMPv6) for the policy; 0 for `NO_PORT`.
    pub port: u16,
    /// Ports for connection tracking: TCP/UDP ports, the ICMP echo identifier twice, else 0.
    pub sport: u16,
    pub dport: u16,
    /// 4 or 6.
    pub family: u8,
    /// IP protocol number.
    pub proto: u8,
    /// One of `enforcer_common::proto_key`: what the policy matches on.
    pub proto_key: u8,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// ICMP echo request (ICMP 8 / ICMPv6 128): the only ICMP that starts a flow.
    pub is_echo_request: bool,
    pub has_quoted: bool,
    /// The first fragment of a datagram (`frag_id`, with `frag_proto` as later fragments will
    /// name the protocol).
    pub first_fragment: bool,
    pub frag_proto: u8,
}

impl Flow {
    /// Resets every field to zero (`false`, no port, no protocol).
    #[inline(always)]
    pub fn clear(&mut self) {
        const WORDS: usize = size_of::<Flow>() / 8;
        const _: () = assert!(size_of::<Flow>().is_multiple_of(8) && align_of::<Flow>() == 8);
        let words = (self as *mut Flow).cast::<u64>();
        for i in 0..WORDS {
            // SAFETY: inside `self`, which is 8-byte aligned and a whole number of words; zero
            // is a valid value of every field. Volatile, because plain zero writes are merged
            // into a `memset` call, which BPF runs byte by byte in a subprogram.
            unsafe { words.add(i).write_volatile(0) };
        }
    }
}

/// Per-CPU working memory of one packet's decision.
#[repr(C)]
pub struct Scratch {
    pub flow: Flow,
    /// The fragment key of a later fragment, or of a first fragment being remembered.
    pub fragment: FragmentKey,
    /// The connection-tracking key of the packet.
    pub flow_key: FlowKey,
    /// The event being reported for the packet.
    pub event: Event,
    pub opaque: Opaque,
}

/// Values the programs pass through memory so that the verifier stops telling them apart (see
/// [`opaque`]).
#[repr(C)]
pub struct Opaque {
    /// The two ends of a tracked flow judged again, initiator first.
    pub recheck_src: Addr,
    pub recheck_dst: Addr,
    /// Where the transport header starts (while IPv6 extension headers are walked: the next
    /// one), and where the IP payload ends.
    pub l4: u32,
    pub l4_end: u32,
    /// A decision's counter and rule, before they are accounted.
    pub outcome: u32,
    pub rule: u32,
    /// Whether a tracked flow's break-glass grant has ended, across its judgement.
    pub grant_ended: u32,
    /// Whether the flow cache may pass or fill for the packet, and the epoch read for it (see
    /// `conntrack::flow_cache`), across the connection table's lookup and a recheck.
    pub cache_usable: u32,
    pub cache_epoch: u32,
    /// Whether the packet reopens a closing connection, across its judgement.
    pub reopened: u32,
}

/// `value`, written to `slot` (scratch memory) and read back. The verifier does not track what
/// map memory holds, so from here on it knows only the value's type: paths that differ only in
/// it meet at the verifier's next pruning point instead of each being checked on to the end of
/// the program. Used where many paths meet (after parsing a header, after a decision), this
/// more than halves the instructions the verifier processes, and so the time to load the
/// programs (see `docs/design.md`). It costs one store and one load.
#[inline(always)]
pub fn opaque<T: Copy>(slot: &mut T, value: T) -> T {
    // SAFETY: `slot` is a valid, aligned, exclusive reference. Volatile, so that the compiler
    // neither drops the round trip nor keeps the value in a register across it.
    unsafe {
        core::ptr::write_volatile(slot, value);
        core::ptr::read_volatile(slot)
    }
}

/// The outcome of parsing a frame. Mirrors `policy_compiler::packet`, the reference parser.
pub enum Parsed {
    /// An IP packet, described in `Scratch::flow`.
    Flow,
    /// A fragment other than the first, described in `Scratch::fragment`.
    LaterFragment,
    NonIp,
    /// Dropped while parsing, counted under this counter.
    Drop(u32),
}
