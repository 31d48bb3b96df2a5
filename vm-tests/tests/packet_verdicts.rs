//! Hand-picked packets through the real XDP program with `BPF_PROG_TEST_RUN` on the example
//! hospital policy. Each case states its expected outcome, and the harness also checks that the
//! kernel agrees with the reference model. Needs root.
use std::{net::IpAddr, path::PathBuf};

use enforcer_common::{counter, direction::INGRESS, proto_key, wildcard_bit};
use policy_compiler::Policy;
use vm_tests::{
    harness::{KernelHarness, hex},
    packet_builder::{self, PacketSpec, TCP_SYN, Transport},
};

fn example_policy() -> Policy {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../segments");
    Policy::load_dir(&dir).unwrap_or_else(|e| panic!("example policy: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn tcp(src: &str, dst: &str, dport: u16) -> PacketSpec {
    PacketSpec::new(ip(src), ip(dst), Transport::tcp(40000, dport, TCP_SYN))
}

fn udp(src: &str, dst: &str, dport: u16) -> PacketSpec {
    PacketSpec::new(ip(src), ip(dst), Transport::udp(40000, dport))
}

fn icmp(src: &str, dst: &str, icmp_type: u8) -> PacketSpec {
    PacketSpec::new(ip(src), ip(dst), Transport::icmp(icmp_type, 7))
}

/// Runs `frame` on ingress, asserts kernel and reference agree, and that both give `counter`,
/// so the test does not depend on the reference alone being right. Returns the rule id.
fn assert_case(h: &mut KernelHarness, name: &str, frame: &[u8], want: u32) -> Option<String> {
    let got = h
        .check(frame, INGRESS)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(
        counter::NAMES[got.counter as usize],
        counter::NAMES[want as usize],
        "{name}: kernel and reference agree, but not with the case; frame {}",
        hex(frame)
    );
    got.rule
        .map(|rule| h.reference.policy().rule(rule).unwrap().id.clone())
}

fn case(h: &mut KernelHarness, name: &str, spec: &PacketSpec, want: u32) -> Option<String> {
    let (frame, _) = packet_builder::build(spec);
    assert_case(h, name, &frame, want)
}

#[test]
fn example_policy_clinical_flows() {
    clinical_flows(KernelHarness::load(example_policy()).expect("load the enforcer"));
}

/// The same flows with every exact-match table of the active slot full of keys no packet has,
/// and the policy's own keys in the tables' fallback maps, as the daemon puts the keys a table
/// has no room for: every lookup ends crowded and takes the fallback path.
#[test]
fn example_policy_clinical_flows_through_crowded_tables() {
    clinical_flows(crowded_harness());
}

/// Crowded tables replaced by larger copies, as a daemon adopting pinned maps that a policy
/// outgrew does (here the same size, so that the keys from the fallback maps do not all fit):
/// the copies must take in the keys their old tables had crowded out.
#[test]
fn example_policy_clinical_flows_after_copying_crowded_tables() {
    use enforcer_common::map_names;
    use std::os::fd::AsFd as _;

    let mut h = crowded_harness();
    let slot = h.enforcer.active_slot();
    for name in [
        map_names::HOSTS_V4[slot],
        map_names::HOSTS_V6[slot],
        map_names::PAIRS[slot],
        map_names::PORTS_EXACT[slot],
    ] {
        let old = match h.enforcer.ebpf().map(name).unwrap() {
            aya::maps::Map::Array(data) => data.fd().as_fd().try_clone_to_owned().unwrap(),
            _ => panic!("{name} is not an array"),
        };
        let old = aya::maps::MapData::from_fd(old).unwrap();
        enforcer::policy_maps::copy_exact_table(h.enforcer.ebpf_mut(), name, old)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    clinical_flows(h);
}

/// The example policy with every exact-match table of the active slot full of keys no packet
/// has, and the policy's own keys in the tables' fallback maps.
fn crowded_harness() -> KernelHarness {
    use aya::maps::{HashMap, LpmTrie, lpm_trie::Key};
    use enforcer_common::{
        AddrInfo, HOST_PREFIX_V4, HOST_PREFIX_V6, HostBucketV4, HostBucketV6, PORT_EXACT_PREFIX,
        PairBucket, PairKey, PairValue, PortBucket, PortKey, PortValue, map_names,
    };

    let mut h = KernelHarness::load(example_policy()).expect("load the enforcer");
    let slot = h.enforcer.active_slot();
    let ebpf = h.enforcer.ebpf_mut();
    let hosts_v4 = crowd::<HostBucketV4>(ebpf, map_names::HOSTS_V4[slot], |n| {
        [255, 255, (n >> 8) as u8, n as u8]
    });
    let hosts_v6 = crowd::<HostBucketV6>(ebpf, map_names::HOSTS_V6[slot], |n| {
        let mut addr = [0xff; 16];
        addr[12..].copy_from_slice(&n.to_be_bytes());
        addr
    });
    let pairs = crowd::<PairBucket>(ebpf, map_names::PAIRS[slot], |n| PairKey {
        dst_segment: u32::MAX,
        src_class: n,
    });
    let ports = crowd::<PortBucket>(ebpf, map_names::PORTS_EXACT[slot], |n| {
        PortKey::new(u32::MAX, 255, n as u16)
    });
    assert!(!pairs.is_empty() && !ports.is_empty());

    let map = ebpf.map_mut(map_names::ADDR_V4[slot]).unwrap();
    let mut trie = LpmTrie::<_, [u8; 4], AddrInfo>::try_from(map).unwrap();
    for (addr, info) in hosts_v4 {
        trie.insert(&Key::new(HOST_PREFIX_V4, addr), info, 0)
            .unwrap();
    }
    let map = ebpf.map_mut(map_names::ADDR_V6[slot]).unwrap();
    let mut trie = LpmTrie::<_, [u8; 16], AddrInfo>::try_from(map).unwrap();
    for (addr, info) in hosts_v6 {
        trie.insert(&Key::new(HOST_PREFIX_V6, addr), info, 0)
            .unwrap();
    }
    let map = ebpf.map_mut(map_names::PORTS[slot]).unwrap();
    let mut trie = LpmTrie::<_, PortKey, PortValue>::try_from(map).unwrap();
    for (key, value) in ports {
        trie.insert(&Key::new(PORT_EXACT_PREFIX, key), value, 0)
            .unwrap();
    }
    let map = ebpf.map_mut(map_names::PAIRS_OVERFLOW[slot]).unwrap();
    let mut overflow = HashMap::<_, PairKey, PairValue>::try_from(map).unwrap();
    for (key, value) in pairs {
        overflow.insert(key, value, 0).unwrap();
    }
    h
}

/// Fills every bucket of table `name` with keys made by `dummy`, keeping its header, and returns
/// the keys it held.
fn crowd<B: enforcer_common::exact_table::Bucket + aya::Pod>(
    ebpf: &mut aya::Ebpf,
    name: &str,
    dummy: impl Fn(u32) -> B::Key,
) -> Vec<(B::Key, B::Value)>
where
    B::Value: Default,
{
    let map = ebpf.map_mut(name).unwrap();
    let mut array = aya::maps::Array::<_, B>::try_from(map).unwrap();
    let mut held = Vec::new();
    let mut n = 0;
    for index in 1..array.len() {
        array
            .get(&index, 0)
            .unwrap()
            .for_each(|key, value| held.push((key, value)));
        let mut full = B::default();
        for _ in 0..B::ENTRIES {
            assert!(full.place(&dummy(n), B::Value::default()));
            n += 1;
        }
        array.set(index, full, 0).unwrap();
    }
    held
}

fn clinical_flows(mut h: KernelHarness) {
    // Radiology to PACS, DICOM: allowed by a pacs rule, over IPv4, IPv6, VLAN and IP options.
    let rule = case(
        &mut h,
        "radiology->pacs dicom",
        &tcp("10.10.0.10", "10.30.0.10", 104),
        counter::ALLOWED,
    );
    assert_eq!(rule.as_deref(), Some("pacs/1"));
    let v6 = tcp("fd00:10::10", "fd00:30::10", 104);
    case(&mut h, "radiology->pacs dicom v6", &v6, counter::ALLOWED);
    let vlan = tcp("10.10.0.11", "10.30.0.10", 104).with_vlan(30);
    case(
        &mut h,
        "radiology->pacs dicom vlan",
        &vlan,
        counter::ALLOWED,
    );
    let options = tcp("10.10.0.12", "10.30.0.10", 104).with_ipv4_options(12);
    case(
        &mut h,
        "radiology->pacs with IP options",
        &options,
        counter::ALLOWED,
    );
    let ext = tcp("fd00:10::11", "fd00:30::10", 104).with_ext_headers(&[0, 60, 43, 51]);
    case(
        &mut h,
        "radiology->pacs v6 ext headers",
        &ext,
        counter::ALLOWED,
    );

    // Lateral movement that must stop.
    for (name, spec) in [
        (
            "radiology->billing db",
            tcp("10.10.0.10", "10.60.0.10", 5432),
        ),
        (
            "radiology->billing db v6",
            tcp("fd00:10::10", "fd00:60::10", 5432),
        ),
        ("radiology->pharmacy", tcp("10.10.0.10", "10.40.0.10", 443)),
        ("pacs->billing", tcp("10.30.0.10", "10.60.0.10", 5432)),
        ("lab->pacs dicom", tcp("10.50.0.10", "10.30.0.10", 104)),
        (
            "radiology->pacs wrong port",
            tcp("10.10.0.10", "10.30.0.10", 5432),
        ),
        ("world->ehr", tcp("192.0.2.7", "10.20.0.10", 443)),
        ("radiology->lab ping", icmp("10.10.0.10", "10.50.0.10", 8)),
        (
            "radiology->billing syslog",
            udp("10.10.0.10", "10.60.0.10", 514),
        ),
    ] {
        case(&mut h, name, &spec, counter::DROP_POLICY_DENIED);
    }

    // EHR to billing is the one way into billing; EHR pings the lab.
    case(
        &mut h,
        "ehr->billing claims",
        &tcp("10.20.0.10", "10.60.0.10", 5432),
        counter::ALLOWED,
    );
    case(
        &mut h,
        "ehr->lab ping",
        &icmp("10.20.0.10", "10.50.0.10", 8),
        counter::ALLOWED,
    );
    // Essential traffic: neighbour discovery reaches every segment.
    let ns = icmp("fd00:10::10", "fd00:60::10", 135);
    let rule = case(&mut h, "neighbour solicitation", &ns, counter::ALLOWED);
    assert_eq!(rule.as_deref(), Some("billing/essential"));

    // ICU telemetry is monitored: a would-be denial passes as audit.
    case(
        &mut h,
        "billing->icu (monitor)",
        &tcp("10.60.0.10", "10.70.0.10", 22),
        counter::AUDIT,
    );
    // Traffic to world is not enforced by default; inside a segment with intra: allow.
    case(
        &mut h,
        "radiology->world",
        &tcp("10.10.0.10", "192.0.2.7", 443),
        counter::UNENFORCED,
    );
    let rule = case(
        &mut h,
        "pacs intra",
        &tcp("10.30.0.10", "10.30.0.11", 9999),
        counter::ALLOWED,
    );
    assert_eq!(rule.as_deref(), Some("pacs/intra"));

    // Frames that are not IP, or not well-formed.
    assert_case(&mut h, "arp", &packet_builder::arp(), counter::NON_IP);
    let (frame, _) = packet_builder::build(&tcp("10.20.0.10", "10.60.0.11", 5432));
    assert_case(
        &mut h,
        "truncated tcp",
        &frame[..frame.len() - 1],
        counter::DROP_MALFORMED,
    );
    assert_case(
        &mut h,
        "ethernet only",
        &frame[..14],
        counter::DROP_MALFORMED,
    );
    let mut bad_ihl = frame.clone();
    bad_ihl[14] = 0x44;
    assert_case(&mut h, "ihl 4", &bad_ihl, counter::DROP_MALFORMED);
    let mut long_total = frame.clone();
    long_total[16..18].copy_from_slice(&1000u16.to_be_bytes());
    assert_case(
        &mut h,
        "total length past the frame",
        &long_total,
        counter::DROP_MALFORMED,
    );
    let mut qinq = frame.clone();
    qinq.splice(12..12, [0x88, 0xa8, 0x00, 0x07, 0x81, 0x00, 0x00, 0x08]);
    assert_case(
        &mut h,
        "stacked vlan",
        &qinq,
        counter::DROP_UNSUPPORTED_ENCAP,
    );
    let deep = tcp("fd00:10::10", "fd00:30::10", 104)
        .with_ext_headers(&[0, 60, 60, 60, 60, 60, 60, 60, 60]);
    case(
        &mut h,
        "nine extension headers",
        &deep,
        counter::DROP_TOO_MANY_EXT_HEADERS,
    );
}

/// The active slot's SEGMENTS array.
fn active_segments(
    h: &mut KernelHarness,
) -> aya::maps::Array<&mut aya::maps::MapData, enforcer_common::SegmentInfo> {
    let slot = h.enforcer.active_slot();
    let map = h
        .enforcer
        .ebpf_mut()
        .map_mut(enforcer_common::map_names::SEGMENTS[slot])
        .unwrap();
    aya::maps::Array::try_from(map).unwrap()
}

/// `SegmentInfo::no_wildcard_rules` of segment `id` in the active slot.
fn no_wildcard_rules(h: &mut KernelHarness, id: u32) -> u8 {
    active_segments(h).get(&id, 0).unwrap().no_wildcard_rules
}

#[test]
fn the_wildcard_probe_is_skipped_only_for_segments_without_rules_for_any_source() {
    let sources = [
        (
            "segments/dns.yaml",
            "segment: dns\nmembers: [10.1.0.0/24]\nallow:\n  - from: any\n    ports: [udp/53]\n",
        ),
        (
            "segments/ehr.yaml",
            "segment: ehr\nmembers: [10.2.0.0/24]\nallow:\n  - from: [ward]\n    ports: [tcp/443]\n",
        ),
        ("segments/ward.yaml", "segment: ward\nmembers: [10.3.0.0/24]\n"),
    ]
    .map(|(name, text)| (name.to_string(), text.to_string()));
    let policy = Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"));
    let artifact = policy_compiler::compile(&policy).unwrap();
    let id = |name: &str| {
        artifact
            .segments
            .iter()
            .position(|s| s.name == name)
            .unwrap() as u32
    };
    let (dns, ehr, ward) = (id("dns"), id("ehr"), id("ward"));
    let mut h = KernelHarness::load(policy).expect("load the enforcer");
    let skipped = |h: &mut KernelHarness, segment, proto| {
        no_wildcard_rules(h, segment) & wildcard_bit(proto) != 0
    };
    assert!(
        !skipped(&mut h, dns, proto_key::UDP),
        "dns admits any source on udp/53"
    );
    assert!(skipped(&mut h, dns, proto_key::TCP), "but on no TCP port");
    for segment in [ehr, ward] {
        assert!(
            skipped(&mut h, segment, proto_key::TCP),
            "{segment}: no TCP rule for any source"
        );
        assert!(
            skipped(&mut h, segment, proto_key::UDP),
            "{segment}: no UDP rule for any source"
        );
        assert!(
            skipped(&mut h, segment, proto_key::NO_PORT),
            "{segment}: nor for other protocols"
        );
        // The default essential traffic (ICMP "fragmentation needed", ICMPv6 "packet too big"
        // and neighbour discovery) is admitted from any source.
        assert!(
            !skipped(&mut h, segment, proto_key::ICMP),
            "{segment}: essential ICMP"
        );
        assert!(
            !skipped(&mut h, segment, proto_key::ICMPV6),
            "{segment}: essential ICMPv6"
        );
    }

    let (ward_host, ehr_host, dns_host) = ("10.3.0.5", "10.2.0.5", "10.1.0.5");
    case(
        &mut h,
        "ward to dns",
        &udp(ward_host, dns_host, 53),
        counter::ALLOWED,
    );
    case(
        &mut h,
        "ehr to dns",
        &udp(ehr_host, dns_host, 53),
        counter::ALLOWED,
    );
    case(
        &mut h,
        "outside to dns",
        &udp("192.0.2.9", dns_host, 53),
        counter::ALLOWED,
    );
    case(
        &mut h,
        "outside to dns, TCP",
        &tcp("192.0.2.9", dns_host, 53),
        counter::DROP_POLICY_DENIED,
    );
    case(
        &mut h,
        "ward to ehr",
        &tcp(ward_host, ehr_host, 443),
        counter::ALLOWED,
    );
    case(
        &mut h,
        "dns to ehr",
        &tcp(dns_host, ehr_host, 443),
        counter::DROP_POLICY_DENIED,
    );
    case(
        &mut h,
        "ward to ehr, other port",
        &tcp(ward_host, ehr_host, 53),
        counter::DROP_POLICY_DENIED,
    );
    case(
        &mut h,
        "outside to ehr, fragmentation needed",
        &icmp("192.0.2.9", ehr_host, 3),
        counter::ALLOWED,
    );

    // With the flag set by hand on dns, its rule for any source is no longer found: the flag
    // really gates the probe, so the compiler must leave it 0 wherever such a rule exists.
    {
        let mut segments = active_segments(&mut h);
        let mut info = segments.get(&dns, 0).unwrap();
        info.no_wildcard_rules |= wildcard_bit(proto_key::UDP);
        segments.set(dns, info, 0).unwrap();
    }
    let (frame, _) = packet_builder::build(&PacketSpec::new(
        ip(ehr_host),
        ip(dns_host),
        Transport::udp(40001, 53),
    ));
    assert_eq!(
        h.run_kernel(&frame, INGRESS).unwrap(),
        vm_tests::harness::action(INGRESS, false),
        "with the flag set, the rule for any source is skipped"
    );
}

/// Addresses whose hashes agree in their low 16 bits: in any table of up to 65,536 buckets they
/// share a home bucket, so more of them than its probed buckets hold are left for the trie.
fn crowded<A>(
    count: usize,
    mut candidate: impl FnMut(u32) -> A,
    hash: impl Fn(&A) -> u32,
) -> Vec<A> {
    let mut found = Vec::new();
    for i in 0u32.. {
        let addr = candidate(i);
        if hash(&addr) & 0xffff == 0x1234 {
            found.push(addr);
            if found.len() == count {
                break;
            }
        }
    }
    found
}

#[test]
fn hosts_their_table_has_no_room_for_are_judged_through_the_trie() {
    use enforcer_common::{
        AddrInfo, HostBucketV4, HostBucketV6,
        exact_table::{self, Bucket as _},
    };
    use std::net::{Ipv4Addr, Ipv6Addr};

    let per_probe = |entries: u32| (entries * exact_table::MAX_PROBES) as usize;
    let v4 = crowded(
        per_probe(HostBucketV4::ENTRIES) + 5,
        |i| Ipv4Addr::from(0x0a00_0000 + i),
        |a| exact_table::hash_v4(&a.octets()),
    );
    let v6 = crowded(
        per_probe(HostBucketV6::ENTRIES) + 5,
        |i| Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i)),
        |a| exact_table::hash_v6(&a.octets()),
    );
    let list = |addrs: Vec<String>| addrs.join(", ");
    let members = list(
        v4.iter()
            .map(|a| format!("{a}/32"))
            .chain(v6.iter().map(|a| format!("{a}/128")))
            .collect(),
    );
    let sources = vec![
        (
            "segments/crowd.yaml".to_string(),
            format!("segment: crowd\nmembers: [{members}]\n"),
        ),
        (
            "segments/target.yaml".to_string(),
            "segment: target\nmembers: [10.200.0.0/24, \"fd00:200::/64\"]\nallow:\n  - from: [crowd]\n    ports: [tcp/443]\n".to_string(),
        ),
    ];
    let policy = Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"));
    let mut h = KernelHarness::load(policy).expect("load the enforcer");

    // The premise: some hosts really are in the trie, not in their table.
    let slot = h.enforcer.active_slot();
    let trie_hosts = |name: &str, full: u32| {
        let map = h.enforcer.ebpf().map(name).unwrap();
        match full {
            32 => aya::maps::LpmTrie::<_, [u8; 4], AddrInfo>::try_from(map)
                .unwrap()
                .keys()
                .filter(|k| k.as_ref().unwrap().prefix_len() == full)
                .count(),
            _ => aya::maps::LpmTrie::<_, [u8; 16], AddrInfo>::try_from(map)
                .unwrap()
                .keys()
                .filter(|k| k.as_ref().unwrap().prefix_len() == full)
                .count(),
        }
    };
    use enforcer_common::map_names;
    assert!(
        trie_hosts(map_names::ADDR_V4[slot], 32) >= 5,
        "no IPv4 host overflowed"
    );
    assert!(
        trie_hosts(map_names::ADDR_V6[slot], 128) >= 5,
        "no IPv6 host overflowed"
    );

    for a in &v4 {
        let name = format!("{a} -> target");
        case(
            &mut h,
            &name,
            &tcp(&a.to_string(), "10.200.0.1", 443),
            counter::ALLOWED,
        );
        case(
            &mut h,
            &name,
            &tcp(&a.to_string(), "10.200.0.1", 80),
            counter::DROP_POLICY_DENIED,
        );
    }
    for a in &v6 {
        let name = format!("{a} -> target");
        case(
            &mut h,
            &name,
            &tcp(&a.to_string(), "fd00:200::1", 443),
            counter::ALLOWED,
        );
    }
    // Crowded addresses outside the policy are `world`, which target does not admit.
    let strangers = crowded(
        3,
        |i| Ipv4Addr::from(0x0b00_0000 + i),
        |a| exact_table::hash_v4(&a.octets()),
    );
    for a in &strangers {
        let name = format!("{a} (world) -> target");
        case(
            &mut h,
            &name,
            &tcp(&a.to_string(), "10.200.0.1", 443),
            counter::DROP_POLICY_DENIED,
        );
    }
}

/// Nested subnets, each at most `SUBNET_EXPANSION_BITS` short of a host, so that their
/// addresses go into the host tables one by one: hosts, a rule CIDR and segments inside segments.
fn nested_subnets(extra: bool) -> Policy {
    let mut sources = vec![
        (
            "segments/wards.yaml",
            "segment: wards\nmembers: [10.9.0.0/24, \"fd00:9::/120\"]\nallow:\n  - from: [lab]\n    ports: [tcp/22]\n  - from: [\"10.9.0.0/26\", \"fd00:9::/122\"]\n    ports: [tcp/80]\n",
        ),
        (
            "segments/lab.yaml",
            "segment: lab\nmembers: [10.9.0.16/28, \"fd00:9::10/124\"]\nallow:\n  - from: [wards]\n    ports: [tcp/443]\n",
        ),
        (
            "segments/pumps.yaml",
            "segment: pumps\nmembers: [10.9.0.20/30, 10.9.0.200/32, \"fd00:9::14/126\", \"fd00:9::c8/128\"]\nallow:\n  - from: [any]\n    ports: [udp/53]\n",
        ),
    ];
    if extra {
        sources.push((
            "segments/imaging.yaml",
            "segment: imaging\nmembers: [10.9.2.0/24, 10.9.3.0/24]\nallow:\n  - from: [wards]\n    ports: [tcp/104]\n",
        ));
    }
    policy_of(&sources)
}

/// The policy of segment files (path, YAML).
fn policy_of(sources: &[(&str, &str)]) -> Policy {
    let sources: Vec<(String, String)> = sources
        .iter()
        .map(|(file, text)| (file.to_string(), text.to_string()))
        .collect();
    Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"))
}

/// Packets from and to `addr`, each checked against the reference.
fn check_address(h: &mut KernelHarness, addr: IpAddr, sport: u16) {
    let (wards, lab, pumps) = if addr.is_ipv4() {
        (ip("10.9.0.5"), ip("10.9.0.17"), ip("10.9.0.21"))
    } else {
        (ip("fd00:9::5"), ip("fd00:9::11"), ip("fd00:9::15"))
    };
    for spec in [
        PacketSpec::new(addr, wards, Transport::tcp(sport, 80, TCP_SYN)),
        PacketSpec::new(addr, lab, Transport::tcp(sport, 443, TCP_SYN)),
        PacketSpec::new(addr, pumps, Transport::udp(sport, 53)),
        PacketSpec::new(lab, addr, Transport::tcp(sport, 22, TCP_SYN)),
        PacketSpec::new(wards, addr, Transport::tcp(sport, 104, TCP_SYN)),
    ] {
        let (frame, _) = packet_builder::build(&spec);
        h.check(&frame, INGRESS)
            .unwrap_or_else(|e| panic!("{addr}: {e:#}"));
    }
}

/// Every address of nested subnets is judged as the longest prefix holding it says, with the
/// subnets in the host tables (the tries never walked for an address the tables lack), and,
/// after a reload whose subnets no longer fit there, with them in the tries.
#[test]
fn subnets_in_the_host_tables_answer_as_the_longest_prefix_does() {
    use enforcer_common::lookup_flags::{V4_PREFIXES, V6_PREFIXES};

    // What a restarted daemon checks before keeping a pinned slot.
    let holds = |h: &KernelHarness, policy: &Policy| {
        let artifact = policy_compiler::compile(policy).unwrap();
        enforcer::policy_maps::slot_holds(h.enforcer.ebpf(), h.enforcer.active_slot(), &artifact)
            .unwrap()
    };
    let mut h = KernelHarness::load(nested_subnets(false)).expect("load the enforcer");
    assert_eq!(
        h.enforcer.config().lookup_flags & (V4_PREFIXES | V6_PREFIXES),
        0,
        "the subnets should be in the host tables"
    );
    assert!(
        holds(&h, &nested_subnets(false)),
        "the slot holds the policy"
    );
    assert!(
        !holds(&h, &nested_subnets(true)),
        "the slot holds another policy"
    );
    // What `enforcer_bpf_map_pressure` reports: the /24's 255 other addresses and the host
    // 10.9.0.200; the /120's 255 and fd00:9::c8.
    let used = |h: &KernelHarness, map: &str| {
        let usage = h.enforcer.policy_map_usage();
        usage.iter().find(|(name, _)| *name == map).map(|(_, n)| *n)
    };
    use enforcer_common::map_names::{HOSTS_V4, HOSTS_V6};
    assert_eq!(used(&h, HOSTS_V4[0]), Some(256));
    assert_eq!(used(&h, HOSTS_V6[0]), Some(256));
    let addresses = |last: u8| {
        [
            IpAddr::from([10, 9, 0, last]),
            IpAddr::from([0xfd00, 9, 0, 0, 0, 0, 0, u16::from(last)]),
        ]
    };
    for last in 0..=255u8 {
        for addr in addresses(last) {
            check_address(&mut h, addr, 1000 + u16::from(last));
        }
    }
    for outside in ["10.9.1.1", "10.8.255.255", "fd00:9::100", "fd00:8::1"] {
        check_address(&mut h, ip(outside), 3000);
    }

    h.replace_policy(nested_subnets(true)).expect("reload");
    assert_eq!(
        h.enforcer.config().lookup_flags & V4_PREFIXES,
        V4_PREFIXES,
        "the larger policy's IPv4 subnets should not fit the host table sized for the first"
    );
    assert!(
        holds(&h, &nested_subnets(true)),
        "the slot holds the reloaded policy"
    );
    assert_eq!(
        used(&h, HOSTS_V4[0]),
        Some(1),
        "only the IPv4 host is in the table"
    );
    for last in (0..=255u8).step_by(7) {
        for addr in addresses(last) {
            check_address(&mut h, addr, 5000 + u16::from(last));
        }
        check_address(&mut h, IpAddr::from([10, 9, 2, last]), 5000);
    }
}

/// Subnets too short for the host tables, nested in each other and around long ones: the long
/// ones' addresses in the host tables, the others' blocks in the block tables (/20 for IPv4;
/// /48 for IPv6, where the /16 is too many blocks and stays in the trie alone).
fn blocked_subnets(reloaded: bool) -> Policy {
    let campus = if reloaded {
        // No /8, and more /24s than the first policy's host tables have room for: every IPv4
        // subnet in blocks.
        "segment: campus\nmembers: [10.30.1.0/24, 10.30.2.0/24, 10.30.3.0/24, 10.30.4.0/24, \"fd00::/16\"]\nallow:\n  - from: [icu]\n    ports: [udp/53]\n"
    } else {
        "segment: campus\nmembers: [10.0.0.0/8, \"fd00::/16\"]\nallow:\n  - from: [icu]\n    ports: [udp/53]\n"
    };
    let sources = [
        ("segments/campus.yaml", campus),
        (
            "segments/radiology.yaml",
            "segment: radiology\nmembers: [10.20.0.0/16, \"fd00:20::/40\"]\nallow:\n  - from: [campus]\n    ports: [tcp/22]\n",
        ),
        (
            "segments/icu.yaml",
            "segment: icu\nmembers: [10.20.16.0/20, \"fd00:20:16::/48\"]\nallow:\n  - from: [wards]\n    ports: [tcp/443]\n",
        ),
        (
            "segments/wards.yaml",
            "segment: wards\nmembers: [10.20.16.0/24, 10.20.16.7/32, \"fd00:20:16::/120\", \"fd00:20:16::7/128\"]\nallow:\n  - from: [radiology, \"10.20.16.0/28\"]\n    ports: [tcp/104]\n",
        ),
    ];
    policy_of(&sources)
}

/// Every edge of the nested subnets of [`blocked_subnets`], judged through the block tables as
/// the longest prefix holding it says, before and after a reload that moves the IPv4 subnets
/// from the host table into the block table.
#[test]
fn subnets_in_the_block_tables_answer_as_the_longest_prefix_does() {
    use enforcer_common::lookup_flags::{
        V4_PREFIXES_OUTSIDE_BLOCKS, V4_SUBNETS_IN_HOSTS, V6_PREFIXES_OUTSIDE_BLOCKS,
        V6_SUBNETS_IN_HOSTS,
    };

    let holds = |h: &KernelHarness, policy: &Policy| {
        let artifact = policy_compiler::compile(policy).unwrap();
        enforcer::policy_maps::slot_holds(h.enforcer.ebpf(), h.enforcer.active_slot(), &artifact)
            .unwrap()
    };
    let v4 = [
        "10.20.16.0",
        "10.20.16.7",
        "10.20.16.8",
        "10.20.16.15",
        "10.20.16.16",
        "10.20.16.255",
        "10.20.17.0",
        "10.20.31.255",
        "10.20.32.0",
        "10.20.15.255",
        "10.20.0.0",
        "10.20.255.255",
        "10.19.255.255",
        "10.21.0.0",
        "10.0.0.0",
        "10.255.255.255",
        "9.255.255.255",
        "11.0.0.0",
        "10.30.1.0",
        "10.30.4.255",
        "10.30.5.0",
    ];
    let v6 = [
        "fd00:20:16::",
        "fd00:20:16::7",
        "fd00:20:16::ff",
        "fd00:20:16::100",
        "fd00:20:16:ffff:ffff:ffff:ffff:ffff",
        "fd00:20:17::",
        "fd00:20:15:ffff::1",
        "fd00:20::",
        "fd00:20:ff:ffff::1",
        "fd00:20:100::",
        "fd00:20:ffff::1",
        "fd00:21::",
        "fd00::",
        "fd00:ffff::1",
        "fcff::1",
        "fd01::",
    ];
    let peers = [
        "10.20.16.3",
        "10.20.16.7",
        "10.20.17.1",
        "10.20.99.1",
        "10.1.2.3",
    ];
    let peers_v6 = [
        "fd00:20:16::3",
        "fd00:20:16::7",
        "fd00:20:16:1::1",
        "fd00:20:99::1",
        "fd00:1::1",
    ];
    let check_all = |h: &mut KernelHarness| {
        for (addrs, peers) in [(&v4[..], &peers[..]), (&v6[..], &peers_v6[..])] {
            for addr in addrs.iter().map(|a| ip(a)) {
                for peer in peers.iter().map(|p| ip(p)) {
                    for port in [22, 443, 104] {
                        for (src, dst) in [(addr, peer), (peer, addr)] {
                            let spec =
                                PacketSpec::new(src, dst, Transport::tcp(40000, port, TCP_SYN));
                            let (frame, _) = packet_builder::build(&spec);
                            h.check(&frame, INGRESS)
                                .unwrap_or_else(|e| panic!("{src} -> {dst}: {e:#}"));
                        }
                    }
                    let spec = PacketSpec::new(peer, addr, Transport::udp(40000, 53));
                    let (frame, _) = packet_builder::build(&spec);
                    h.check(&frame, INGRESS)
                        .unwrap_or_else(|e| panic!("{peer} -> {addr}: {e:#}"));
                }
            }
        }
    };

    let mut h = KernelHarness::load(blocked_subnets(false)).expect("load the enforcer");
    let config = *h.enforcer.config();
    assert_eq!((config.block_len_v4, config.block_len_v6), (20, 48));
    let flags = config.lookup_flags;
    assert_eq!(
        flags & (V4_SUBNETS_IN_HOSTS | V6_SUBNETS_IN_HOSTS),
        V4_SUBNETS_IN_HOSTS | V6_SUBNETS_IN_HOSTS
    );
    assert_eq!(
        flags & V4_PREFIXES_OUTSIDE_BLOCKS,
        0,
        "every IPv4 subnet is in blocks"
    );
    assert_ne!(flags & V6_PREFIXES_OUTSIDE_BLOCKS, 0, "the IPv6 /16 is not");
    assert!(holds(&h, &blocked_subnets(false)));
    assert!(!holds(&h, &blocked_subnets(true)));
    let used = |h: &KernelHarness, map: &str| {
        let usage = h.enforcer.policy_map_usage();
        usage.iter().find(|(name, _)| *name == map).map(|(_, n)| *n)
    };
    use enforcer_common::map_names::{BLOCKS_V4, BLOCKS_V6};
    // The /8's 4,096 /20s (the /16's 16 and the /20 among them); the /40's 256 /48s.
    assert_eq!(used(&h, BLOCKS_V4[0]), Some(4096));
    assert_eq!(used(&h, BLOCKS_V6[0]), Some(256));
    check_all(&mut h);

    h.replace_policy(blocked_subnets(true)).expect("reload");
    let config = *h.enforcer.config();
    assert_eq!(
        (
            config.block_len_v4,
            config.lookup_flags & V4_SUBNETS_IN_HOSTS
        ),
        (28, 0),
        "the /24s do not fit the host table sized for the first policy: every IPv4 subnet in \
         blocks of the longest, the rule's /28"
    );
    assert!(holds(&h, &blocked_subnets(true)));
    check_all(&mut h);
}
