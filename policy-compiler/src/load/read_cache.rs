//! Segment files read before, kept between reloads so that a reload parses only the files that
//! changed: most of a large policy's validation is reading YAML, and a change to a policy in Git
//! usually touches a file or two.
//!
//! A file is known by its name as shown in errors and the SHA-256 of its text; reading it is a
//! function of those two alone (`Loader::segment_file`), so a hit gives exactly what reading it
//! again would. Only files read without an error are kept (their errors must be reported every
//! time). What is kept is a compact byte encoding of the read file, a fifth of its size in
//! memory as read: the daemon keeps the cache for as long as it runs, within its memory budget.
use foldhash::HashMap;
use sha2::{Digest, Sha256};

use super::{RawRule, RawSegment, RawSource};
use crate::model::{Intra, Mode, PortMatch};
use crate::prefix::Prefix;
use crate::yaml::Pos;

/// Segment files read before (see the module documentation).
#[derive(Default)]
pub struct ReadCache {
    files: HashMap<String, Cached>,
    last_use: ReadCacheUse,
}

struct Cached {
    digest: [u8; 32],
    encoded: Box<[u8]>,
}

/// What the cache did during one read of a policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadCacheUse {
    /// Files taken from the cache.
    pub hits: usize,
    /// Files read (parsed) instead.
    pub misses: usize,
}

impl ReadCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the last read through the cache took from it.
    pub fn last_use(&self) -> ReadCacheUse {
        self.last_use
    }

    pub(super) fn set_last_use(&mut self, used: ReadCacheUse) {
        self.last_use = used;
    }

    /// Bytes the cached files take (their encodings).
    pub fn bytes(&self) -> usize {
        self.files.values().map(|cached| cached.encoded.len()).sum()
    }

    /// Files held.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub(super) fn get(&self, file: &str, digest: &[u8; 32]) -> Option<RawSegment> {
        let cached = self.files.get(file).filter(|c| &c.digest == digest)?;
        let mut reader = Reader {
            bytes: &cached.encoded,
        };
        let segment = reader.segment()?;
        (reader.bytes.is_empty() && segment.file == file).then_some(segment)
    }

    pub(super) fn put(&mut self, digest: [u8; 32], segment: &RawSegment) {
        let mut writer = Writer::default();
        writer.segment(segment);
        let encoded = writer.bytes.into_boxed_slice();
        self.files
            .insert(segment.file.clone(), Cached { digest, encoded });
    }

    /// Forgets every file but those of `keep`.
    pub(super) fn retain<'a>(&mut self, keep: impl Iterator<Item = &'a str>) {
        let keep: foldhash::HashSet<&str> = keep.collect();
        self.files.retain(|file, _| keep.contains(file.as_str()));
    }
}

pub(super) fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

#[derive(Default)]
struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    fn u16(&mut self, value: u16) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    fn u32(&mut self, value: usize) {
        let value = u32::try_from(value).expect("a policy file's counts fit 32 bits");
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    fn str(&mut self, text: &str) {
        self.u32(text.len());
        self.bytes.extend_from_slice(text.as_bytes());
    }

    fn opt_str(&mut self, text: &Option<String>) {
        match text {
            None => self.u8(0),
            Some(text) => {
                self.u8(1);
                self.str(text);
            }
        }
    }

    fn pos(&mut self, pos: Pos) {
        self.u32(pos.line);
        self.u32(pos.column);
    }

    fn prefix(&mut self, prefix: &Prefix) {
        match prefix.addr() {
            std::net::IpAddr::V4(addr) => {
                self.u8(4);
                self.bytes.extend_from_slice(&addr.octets());
            }
            std::net::IpAddr::V6(addr) => {
                self.u8(6);
                self.bytes.extend_from_slice(&addr.octets());
            }
        }
        self.u8(prefix.prefix_len());
    }

    fn port(&mut self, port: &PortMatch) {
        match *port {
            PortMatch::Any => self.u8(0),
            PortMatch::Range { proto, first, last } => {
                self.u8(1);
                self.u8(proto);
                self.u16(first);
                self.u16(last);
            }
        }
    }

    fn rule(&mut self, rule: &RawRule) {
        self.u32(rule.number);
        self.opt_str(&rule.name);
        self.u32(rule.from.len());
        for (source, pos) in &rule.from {
            match source {
                RawSource::Any => self.u8(0),
                RawSource::Name(name) => {
                    self.u8(1);
                    self.str(name);
                }
                RawSource::Cidr(prefix) => {
                    self.u8(2);
                    self.prefix(prefix);
                }
            }
            self.pos(*pos);
        }
        self.u32(rule.ports.len());
        for port in &rule.ports {
            self.port(port);
        }
        self.opt_str(&rule.reason);
        self.pos(rule.pos);
    }

    fn segment(&mut self, segment: &RawSegment) {
        self.str(&segment.file);
        self.str(&segment.name);
        self.pos(segment.name_pos);
        self.opt_str(&segment.description);
        self.u32(segment.members.len());
        for (prefix, pos) in &segment.members {
            self.prefix(prefix);
            self.pos(*pos);
        }
        self.u8(match segment.mode {
            Mode::Unenforced => 0,
            Mode::Enforce => 1,
            Mode::Monitor => 2,
        });
        self.u8(match segment.intra {
            Intra::Allow => 0,
            Intra::Deny => 1,
        });
        self.u32(segment.rules.len());
        for rule in &segment.rules {
            self.rule(rule);
        }
    }
}

/// Decodes what [`Writer`] wrote; `None` for anything else (a cache miss, never a wrong read).
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.bytes.split_first_chunk::<N>()?;
        self.bytes = rest;
        Some(*head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take::<1>()?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take()?))
    }

    fn u32(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.take()?) as usize)
    }

    fn str(&mut self) -> Option<String> {
        let len = self.u32()?;
        if len > self.bytes.len() {
            return None;
        }
        let (text, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        String::from_utf8(text.to_vec()).ok()
    }

    fn opt_str(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.str()?)),
            _ => None,
        }
    }

    fn pos(&mut self) -> Option<Pos> {
        Some(Pos {
            line: self.u32()?,
            column: self.u32()?,
        })
    }

    fn prefix(&mut self) -> Option<Prefix> {
        let addr = match self.u8()? {
            4 => std::net::IpAddr::from(self.take::<4>()?),
            6 => std::net::IpAddr::from(self.take::<16>()?),
            _ => return None,
        };
        Some(Prefix::containing(addr, self.u8()?))
    }

    fn port(&mut self) -> Option<PortMatch> {
        match self.u8()? {
            0 => Some(PortMatch::Any),
            1 => Some(PortMatch::Range {
                proto: self.u8()?,
                first: self.u16()?,
                last: self.u16()?,
            }),
            _ => None,
        }
    }

    /// A count of items that each take at least one byte: never more than the bytes left, so
    /// that a corrupt count cannot make a huge allocation.
    fn count(&mut self) -> Option<usize> {
        self.u32().filter(|&count| count <= self.bytes.len())
    }

    fn rule(&mut self) -> Option<RawRule> {
        let number = self.u32()?;
        let name = self.opt_str()?;
        let count = self.count()?;
        let mut from = Vec::with_capacity(count);
        for _ in 0..count {
            let source = match self.u8()? {
                0 => RawSource::Any,
                1 => RawSource::Name(self.str()?),
                2 => RawSource::Cidr(self.prefix()?),
                _ => return None,
            };
            from.push((source, self.pos()?));
        }
        let count = self.count()?;
        let mut ports = Vec::with_capacity(count);
        for _ in 0..count {
            ports.push(self.port()?);
        }
        Some(RawRule {
            number,
            name,
            from,
            ports,
            reason: self.opt_str()?,
            pos: self.pos()?,
        })
    }

    fn segment(&mut self) -> Option<RawSegment> {
        let file = self.str()?;
        let name = self.str()?;
        let name_pos = self.pos()?;
        let description = self.opt_str()?;
        let count = self.count()?;
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            members.push((self.prefix()?, self.pos()?));
        }
        let mode = match self.u8()? {
            0 => Mode::Unenforced,
            1 => Mode::Enforce,
            2 => Mode::Monitor,
            _ => return None,
        };
        let intra = match self.u8()? {
            0 => Intra::Allow,
            1 => Intra::Deny,
            _ => return None,
        };
        let count = self.count()?;
        let mut rules = Vec::with_capacity(count);
        for _ in 0..count {
            rules.push(self.rule()?);
        }
        Some(RawSegment {
            file,
            name,
            name_pos,
            description,
            members,
            mode,
            intra,
            rules,
        })
    }
}
