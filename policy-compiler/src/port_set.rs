//! Exact sets of (protocol, port) as the policy sees traffic, for the review tools
//! (`diff`, `graph`): TCP/UDP destination ports and ICMP/ICMPv6 types as range sets, plus
//! "every other packet" (other IP protocols, and packets without port information), which only
//! `ports: [any]` can match.

use std::fmt;

use crate::model::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PortMatch, icmp_type_name};

/// A set of `u16` values as sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RangeSet(Vec<(u16, u16)>);

impl RangeSet {
    pub fn full(max: u16) -> RangeSet {
        RangeSet(vec![(0, max)])
    }

    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, value: u16) -> bool {
        self.0
            .iter()
            .any(|&(first, last)| first <= value && value <= last)
    }

    pub fn insert(&mut self, first: u16, last: u16) {
        let mut merged = Vec::with_capacity(self.0.len() + 1);
        let (mut new_first, mut new_last) = (first, last);
        let mut placed = false;
        for &(a, b) in &self.0 {
            // Ranges that overlap or touch the new one are absorbed into it.
            let touches =
                u32::from(a) <= u32::from(new_last) + 1 && u32::from(new_first) <= u32::from(b) + 1;
            if touches {
                new_first = new_first.min(a);
                new_last = new_last.max(b);
            } else if b < new_first {
                merged.push((a, b));
            } else {
                if !placed {
                    merged.push((new_first, new_last));
                    placed = true;
                }
                merged.push((a, b));
            }
        }
        if !placed {
            merged.push((new_first, new_last));
        }
        self.0 = merged;
    }

    pub fn union(&self, other: &RangeSet) -> RangeSet {
        let mut result = self.clone();
        for &(first, last) in &other.0 {
            result.insert(first, last);
        }
        result
    }

    /// The values of `0..=max` not in the set.
    pub fn complement(&self, max: u16) -> RangeSet {
        let mut result = Vec::new();
        let mut next: u32 = 0;
        for &(first, last) in &self.0 {
            if u32::from(first) > next {
                result.push((next as u16, first - 1));
            }
            next = u32::from(last) + 1;
        }
        if next <= u32::from(max) {
            result.push((next as u16, max));
        }
        RangeSet(result)
    }

    pub fn intersection(&self, other: &RangeSet) -> RangeSet {
        let mut result = Vec::new();
        for &(a, b) in &self.0 {
            for &(c, d) in &other.0 {
                let (first, last) = (a.max(c), b.min(d));
                if first <= last {
                    result.push((first, last));
                }
            }
        }
        // Pairwise intersections of two sorted disjoint lists come out sorted and disjoint.
        RangeSet(result)
    }

    pub fn difference(&self, other: &RangeSet, max: u16) -> RangeSet {
        self.intersection(&other.complement(max))
    }
}

/// The protocols whose packets carry a port (TCP/UDP) or a type (ICMP/ICMPv6), with the
/// largest value, in display order.
pub const PORT_PROTOCOLS: [(u8, u16); 4] = [
    (PROTO_TCP, u16::MAX),
    (PROTO_UDP, u16::MAX),
    (PROTO_ICMP, 255),
    (PROTO_ICMPV6, 255),
];

/// A set of packets by protocol and port/type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortSet {
    pub tcp: RangeSet,
    pub udp: RangeSet,
    pub icmp: RangeSet,
    pub icmpv6: RangeSet,
    /// Every packet of another IP protocol, or without port information (a later fragment).
    pub other: bool,
}

impl PortSet {
    /// Every packet.
    pub fn everything() -> PortSet {
        PortSet {
            tcp: RangeSet::full(u16::MAX),
            udp: RangeSet::full(u16::MAX),
            icmp: RangeSet::full(255),
            icmpv6: RangeSet::full(255),
            other: true,
        }
    }

    /// The packets a rule's `ports` list matches.
    pub fn from_port_matches(ports: &[PortMatch]) -> PortSet {
        let mut set = PortSet::default();
        for port in ports {
            match *port {
                PortMatch::Any => return PortSet::everything(),
                PortMatch::Range { proto, first, last } => {
                    if let Some(ranges) = set.ranges_mut(proto) {
                        ranges.insert(first, last);
                    }
                }
            }
        }
        set
    }

    pub fn ranges(&self, proto: u8) -> Option<&RangeSet> {
        match proto {
            PROTO_TCP => Some(&self.tcp),
            PROTO_UDP => Some(&self.udp),
            PROTO_ICMP => Some(&self.icmp),
            PROTO_ICMPV6 => Some(&self.icmpv6),
            _ => None,
        }
    }

    pub fn ranges_mut(&mut self, proto: u8) -> Option<&mut RangeSet> {
        match proto {
            PROTO_TCP => Some(&mut self.tcp),
            PROTO_UDP => Some(&mut self.udp),
            PROTO_ICMP => Some(&mut self.icmp),
            PROTO_ICMPV6 => Some(&mut self.icmpv6),
            _ => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.other && self.parts().iter().all(|(_, _, ranges)| ranges.is_empty())
    }

    pub fn is_everything(&self) -> bool {
        *self == PortSet::everything()
    }

    /// (protocol, largest value, ranges) of each protocol with ports, in display order.
    fn parts(&self) -> [(u8, u16, &RangeSet); 4] {
        [
            (PROTO_TCP, u16::MAX, &self.tcp),
            (PROTO_UDP, u16::MAX, &self.udp),
            (PROTO_ICMP, 255, &self.icmp),
            (PROTO_ICMPV6, 255, &self.icmpv6),
        ]
    }

    /// Applies `op(self's ranges, other's ranges, largest value)` per protocol; `other` false.
    fn combine(&self, other: &PortSet, op: impl Fn(&RangeSet, &RangeSet, u16) -> RangeSet) -> Self {
        let [tcp, udp, icmp, icmpv6] = self.parts();
        let [other_tcp, other_udp, other_icmp, other_icmpv6] = other.parts();
        PortSet {
            tcp: op(tcp.2, other_tcp.2, tcp.1),
            udp: op(udp.2, other_udp.2, udp.1),
            icmp: op(icmp.2, other_icmp.2, icmp.1),
            icmpv6: op(icmpv6.2, other_icmpv6.2, icmpv6.1),
            other: false,
        }
    }

    pub fn union(&self, other: &PortSet) -> PortSet {
        PortSet {
            other: self.other || other.other,
            ..self.combine(other, |a, b, _| a.union(b))
        }
    }

    pub fn intersection(&self, other: &PortSet) -> PortSet {
        PortSet {
            other: self.other && other.other,
            ..self.combine(other, |a, b, _| a.intersection(b))
        }
    }

    pub fn difference(&self, other: &PortSet) -> PortSet {
        PortSet {
            other: self.other && !other.other,
            ..self.combine(other, |a, b, max| a.difference(b, max))
        }
    }

    pub fn complement(&self) -> PortSet {
        PortSet::everything().difference(self)
    }

    /// One entry per range, in the policy's notation: `tcp/104`, `tcp/8080-8090`, `udp/any`,
    /// `icmp/echo-request`, `other protocols`; `any` for every packet.
    pub fn entries(&self) -> Vec<String> {
        if self.is_everything() {
            return vec!["any".to_string()];
        }
        let mut entries = Vec::new();
        for (proto, max, ranges) in self.parts() {
            for &(first, last) in ranges.ranges() {
                entries.push(range_text(proto, first, last, max));
            }
        }
        if self.other {
            entries.push("other protocols".to_string());
        }
        entries
    }
}

fn range_text(proto: u8, first: u16, last: u16, max: u16) -> String {
    let name = crate::model::proto_name(proto).unwrap_or("?");
    if first == 0 && last == max {
        return format!("{name}/any");
    }
    let is_icmp = matches!(proto, PROTO_ICMP | PROTO_ICMPV6);
    match icmp_type_name(proto, first) {
        Some(type_name) if is_icmp && first == last => format!("{name}/{type_name}"),
        _ if first == last => format!("{name}/{first}"),
        _ => format!("{name}/{first}-{last}"),
    }
}

/// The compact form: the entries, or `any except ...` when that is shorter (what a monitored
/// segment passes as audit is usually "everything but the allowed ports").
impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("nothing");
        }
        if self.is_everything() {
            return f.write_str("any");
        }
        let entries = self.entries();
        let missing = self.complement().entries();
        if self.other && missing.len() < entries.len() {
            write!(f, "any except {}", missing.join(", "))
        } else {
            f.write_str(&entries.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[(u16, u16)]) -> RangeSet {
        let mut set = RangeSet::default();
        for &(first, last) in ranges {
            set.insert(first, last);
        }
        set
    }

    #[test]
    fn range_sets_merge_and_subtract() {
        assert_eq!(set(&[(5, 9), (1, 3), (4, 4)]).ranges(), &[(1, 9)]);
        assert_eq!(
            set(&[(10, 20), (1, 2), (30, 40)]).ranges(),
            &[(1, 2), (10, 20), (30, 40)]
        );
        assert_eq!(set(&[(10, 20), (15, 35), (30, 40)]).ranges(), &[(10, 40)]);
        assert_eq!(set(&[(0, 65535), (7, 9)]).ranges(), &[(0, 65535)]);
        assert_eq!(
            set(&[(10, 20)]).complement(u16::MAX).ranges(),
            &[(0, 9), (21, 65535)]
        );
        assert!(RangeSet::full(255).complement(255).is_empty());
        assert_eq!(
            set(&[(0, 100)])
                .difference(&set(&[(10, 20), (50, 200)]), u16::MAX)
                .ranges(),
            &[(0, 9), (21, 49)]
        );
        assert_eq!(
            set(&[(0, 10), (20, 30)])
                .intersection(&set(&[(5, 25)]))
                .ranges(),
            &[(5, 10), (20, 25)]
        );
    }

    #[test]
    fn port_sets_print_compactly() {
        let ports = PortSet::from_port_matches(&[
            crate::load::parse_port("tcp/8080-8090").unwrap(),
            crate::load::parse_port("tcp/104").unwrap(),
            crate::load::parse_port("icmp/echo-request").unwrap(),
            crate::load::parse_port("udp/any").unwrap(),
        ]);
        assert_eq!(
            ports.to_string(),
            "tcp/104, tcp/8080-8090, udp/any, icmp/echo-request"
        );
        assert_eq!(PortSet::everything().to_string(), "any");
        assert_eq!(PortSet::default().to_string(), "nothing");
        assert_eq!(
            ports.complement().to_string(),
            "any except tcp/104, tcp/8080-8090, udp/any, icmp/echo-request"
        );
        let everything_else = ports.union(&ports.complement());
        assert!(everything_else.is_everything());
    }
}
