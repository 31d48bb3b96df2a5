//! IPv4/IPv6 prefixes (CIDRs) with the few operations the policy needs.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IPv4 sorts before IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn width(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// A network prefix with no host bits set. Ordered by family, address, then length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    family: Family,
    /// The address as an integer of the family's width.
    bits: u128,
    len: u8,
}

/// Why a prefix text was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrefixParseError {
    BadAddress,
    BadLength { max: u8 },
    HostBitsSet { network: Prefix },
}

fn addr_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn mask(family: Family, len: u8) -> u128 {
    let width = u32::from(family.width());
    let len = u32::from(len).min(width);
    if len == 0 {
        return 0;
    }
    let all = u128::MAX >> (128 - width);
    // `checked_shr`: a shift by the full width (a /128) would overflow.
    all & !all.checked_shr(len).unwrap_or(0)
}

impl Prefix {
    /// The prefix of `len` bits containing `addr` (host bits cleared). `len` is clamped.
    pub fn containing(addr: IpAddr, len: u8) -> Prefix {
        let family = Family::of(addr);
        let len = len.min(family.width());
        Prefix {
            family,
            bits: addr_bits(addr) & mask(family, len),
            len,
        }
    }

    /// The single-address prefix (/32 or /128).
    pub fn host(addr: IpAddr) -> Prefix {
        Prefix::containing(addr, Family::of(addr).width())
    }

    /// Parses `ADDR/LEN`, or a bare address meaning a host prefix. Host bits must be clear.
    pub fn parse(text: &str) -> Result<Prefix, PrefixParseError> {
        let (addr_text, len_text) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .trim()
            .parse()
            .map_err(|_| PrefixParseError::BadAddress)?;
        let max = Family::of(addr).width();
        let len = match len_text {
            None => max,
            Some(len_text) => match len_text.trim().parse::<u8>() {
                Ok(len) if len <= max && !len_text.trim().starts_with('+') => len,
                _ => return Err(PrefixParseError::BadLength { max }),
            },
        };
        let network = Prefix::containing(addr, len);
        if network.bits != addr_bits(addr) {
            return Err(PrefixParseError::HostBitsSet { network });
        }
        Ok(network)
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_host(&self) -> bool {
        self.len == self.family.width()
    }

    pub fn addr(&self) -> IpAddr {
        match self.family {
            // Only the low 32 bits are ever set for IPv4.
            Family::V4 => IpAddr::V4(Ipv4Addr::from(self.bits as u32)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(self.bits)),
        }
    }

    pub fn contains_addr(&self, addr: IpAddr) -> bool {
        Family::of(addr) == self.family
            && addr_bits(addr) & mask(self.family, self.len) == self.bits
    }

    /// Whether `other` lies inside `self` (a prefix contains itself).
    pub fn contains(&self, other: &Prefix) -> bool {
        other.family == self.family
            && other.len >= self.len
            && other.bits & mask(self.family, self.len) == self.bits
    }

    /// The prefix of `len` bits containing this one (`len` clamped to this prefix's length).
    pub fn truncate(&self, len: u8) -> Prefix {
        let len = len.min(self.len);
        Prefix {
            family: self.family,
            bits: self.bits & mask(self.family, len),
            len,
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_host_bits() {
        let p = Prefix::parse("10.30.0.0/24").unwrap();
        assert_eq!(p.to_string(), "10.30.0.0/24");
        assert_eq!(
            Prefix::parse("10.30.0.1/24"),
            Err(PrefixParseError::HostBitsSet { network: p })
        );
        assert_eq!(Prefix::parse("10.30.0.1").unwrap().prefix_len(), 32);
        assert_eq!(Prefix::parse("fd00:30::").unwrap().prefix_len(), 128);
        assert_eq!(Prefix::parse("0.0.0.0/0").unwrap().prefix_len(), 0);
        assert_eq!(Prefix::parse("::/0").unwrap().prefix_len(), 0);
        assert!(Prefix::parse("10.0.0.0/33").is_err());
        assert!(Prefix::parse("10.0.0/8").is_err());
        assert!(Prefix::parse("fd00::/129").is_err());
        let v6 = Prefix::parse("fd00:30::/64").unwrap();
        assert!(v6.contains_addr("fd00:30::5".parse().unwrap()));
        assert!(!v6.contains_addr("fd00:31::5".parse().unwrap()));
        assert!(!v6.contains_addr("10.0.0.1".parse().unwrap()));
        assert!(Prefix::parse("0.0.0.0/0").unwrap().contains(&p));
        assert!(p.contains(&Prefix::parse("10.30.0.128/25").unwrap()));
        assert!(!p.contains(&Prefix::parse("10.0.0.0/8").unwrap()));
    }
}
