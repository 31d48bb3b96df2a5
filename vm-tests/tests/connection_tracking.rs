//! Connection tracking, fragments and policy changes, packet by packet through the real XDP
//! (ingress) and TC (egress) programs. Every packet's outcome is stated by the test and checked
//! against the reference model too. Needs root.
use std::{net::IpAddr, thread, time::Duration};

use enforcer_common::{
    Event, FLOW_CACHE_WINDOW_NS, counter,
    direction::{EGRESS, INGRESS},
};
use policy_compiler::{Overrides, Policy};
use vm_tests::{
    harness::{KernelHarness, expect, expect_frame},
    packet_builder::{
        self, PacketSpec, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Transport, ip_packet,
    },
};

/// radiology may reach pacs on tcp/104 and udp/514; nobody may reach radiology.
fn policy(defaults: &str) -> Policy {
    let sources = vec![
        (
            "segments/pacs.yaml".to_string(),
            "segment: pacs\nmembers: [10.30.0.0/24, \"fd00:30::/64\"]\nallow:\n  - from: [radiology]\n    ports: [tcp/104, udp/514, icmp/echo-request, icmpv6/echo-request]\n".to_string(),
        ),
        (
            "segments/radiology.yaml".to_string(),
            "segment: radiology\nmembers: [10.10.0.0/24, \"fd00:10::/64\"]\n".to_string(),
        ),
        ("segments/defaults.yaml".to_string(), defaults.to_string()),
    ];
    Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const RADIOLOGY: &str = "10.10.0.10";
const PACS: &str = "10.30.0.10";

fn dicom(flags: u8) -> PacketSpec {
    PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::tcp(40000, 104, flags))
}

#[test]
fn tcp_replies_pass_and_a_closed_connection_is_forgotten() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    let reply = |flags| dicom(flags).reversed();
    // Before any connection, pacs cannot send to radiology.
    expect(
        &mut h,
        INGRESS,
        &reply(TCP_SYN | TCP_ACK),
        counter::DROP_POLICY_DENIED,
    );
    expect(&mut h, INGRESS, &dicom(TCP_SYN), counter::ALLOWED);
    expect(
        &mut h,
        INGRESS,
        &reply(TCP_SYN | TCP_ACK),
        counter::ESTABLISHED,
    );
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_ACK | TCP_PSH),
        counter::ESTABLISHED,
    );
    expect(
        &mut h,
        INGRESS,
        &reply(TCP_ACK | TCP_PSH),
        counter::ESTABLISHED,
    );
    assert_eq!(h.enforcer.tracked_flows().unwrap(), 1);
    // A reset starts the closing timeout: segments still in flight behind it pass.
    expect(&mut h, INGRESS, &reply(TCP_RST), counter::ESTABLISHED);
    expect(&mut h, INGRESS, &reply(TCP_ACK), counter::ESTABLISHED);
    expect(&mut h, INGRESS, &dicom(TCP_RST), counter::ESTABLISHED);
    assert_eq!(h.enforcer.tracked_flows().unwrap(), 1);
    // A new connection on the same ports is judged afresh: pacs may not open one, and its
    // denied SYN changes nothing: the closing connection's segments still pass...
    expect(
        &mut h,
        INGRESS,
        &reply(TCP_SYN),
        counter::DROP_POLICY_DENIED,
    );
    assert_eq!(h.enforcer.tracked_flows().unwrap(), 1);
    expect(&mut h, INGRESS, &reply(TCP_ACK), counter::ESTABLISHED);
    // ...radiology may open one, whose fresh state replaces the closing one: pacs's answer
    // passes.
    expect(&mut h, INGRESS, &dicom(TCP_SYN), counter::ALLOWED);
    assert_eq!(h.enforcer.tracked_flows().unwrap(), 1);
    expect(
        &mut h,
        INGRESS,
        &reply(TCP_SYN | TCP_ACK),
        counter::ESTABLISHED,
    );
}

#[test]
fn a_reset_flow_is_forgotten_after_the_closing_timeout() {
    let mut h = KernelHarness::load(policy("conntrack:\n  tcp_closing_timeout: 1s\n")).unwrap();
    let reply = |flags| dicom(flags).reversed();
    expect(&mut h, INGRESS, &dicom(TCP_SYN), counter::ALLOWED);
    expect(
        &mut h,
        INGRESS,
        &reply(TCP_SYN | TCP_ACK),
        counter::ESTABLISHED,
    );
    expect(&mut h, INGRESS, &dicom(TCP_RST), counter::ESTABLISHED);
    expect(&mut h, INGRESS, &reply(TCP_ACK), counter::ESTABLISHED);
    thread::sleep(Duration::from_millis(1500));
    h.reference.set_time_ns(1_500_000_000);
    expect(
        &mut h,
        INGRESS,
        &reply(TCP_ACK),
        counter::DROP_POLICY_DENIED,
    );
    assert_eq!(h.enforcer.tracked_flows().unwrap(), 0);
}

#[test]
fn udp_and_icmp_echo_replies_pass() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    let syslog = PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::udp(5514, 514));
    expect(
        &mut h,
        INGRESS,
        &syslog.reversed(),
        counter::DROP_POLICY_DENIED,
    );
    expect(&mut h, INGRESS, &syslog, counter::ALLOWED);
    expect(&mut h, INGRESS, &syslog.reversed(), counter::ESTABLISHED);
    let ping = PacketSpec::new(
        ip("fd00:10::10"),
        ip("fd00:30::10"),
        Transport::icmp(128, 99),
    );
    expect(
        &mut h,
        INGRESS,
        &ping.reversed(),
        counter::DROP_POLICY_DENIED,
    );
    expect(&mut h, INGRESS, &ping, counter::ALLOWED);
    expect(&mut h, INGRESS, &ping.reversed(), counter::ESTABLISHED);
    // Another echo identifier is another flow.
    let other = PacketSpec::new(
        ip("fd00:30::10"),
        ip("fd00:10::10"),
        Transport::icmp(129, 100),
    );
    expect(&mut h, INGRESS, &other, counter::DROP_POLICY_DENIED);
}

#[test]
fn icmp_errors_about_tracked_flows_pass() {
    let mut h = KernelHarness::load(policy("essential_traffic: []\n")).unwrap();
    let (syn_frame, layout) = packet_builder::build(&dicom(TCP_SYN));
    // pacs (or a router on the way) answers radiology's SYN with "time exceeded".
    let error = PacketSpec::new(
        ip(PACS),
        ip(RADIOLOGY),
        Transport::IcmpError {
            icmp_type: 11,
            code: 0,
            quoted: ip_packet(&syn_frame, layout),
        },
    );
    expect(&mut h, INGRESS, &error, counter::DROP_POLICY_DENIED);
    expect_frame(&mut h, INGRESS, &syn_frame, counter::ALLOWED);
    expect(&mut h, INGRESS, &error, counter::RELATED);
}

#[test]
fn outgoing_flows_admit_their_replies() {
    // radiology's own host opens a connection to the internet: egress is not enforced, its
    // state admits the replies, which radiology's allow-list alone would deny.
    let mut h = KernelHarness::load(policy("")).unwrap();
    let web = PacketSpec::new(
        ip(RADIOLOGY),
        ip("192.0.2.80"),
        Transport::tcp(41000, 443, TCP_SYN),
    );
    expect(
        &mut h,
        INGRESS,
        &web.reversed().with_tcp_flags(TCP_SYN | TCP_ACK),
        counter::DROP_POLICY_DENIED,
    );
    expect(&mut h, EGRESS, &web, counter::UNENFORCED);
    expect(
        &mut h,
        INGRESS,
        &web.reversed().with_tcp_flags(TCP_SYN | TCP_ACK),
        counter::ESTABLISHED,
    );
    expect(
        &mut h,
        EGRESS,
        &web.with_tcp_flags(TCP_ACK),
        counter::ESTABLISHED,
    );
}

#[test]
fn gateway_forwarding_passes_both_ways_by_connection_state() {
    // On a gateway the same maps serve every interface: the forwarded SYN is judged on the
    // ingress of one interface, leaves through the egress of another, and the reply comes back
    // through the ingress of that other interface.
    let mut h = KernelHarness::load(policy("")).unwrap();
    expect(&mut h, INGRESS, &dicom(TCP_SYN), counter::ALLOWED);
    expect(&mut h, EGRESS, &dicom(TCP_SYN), counter::ESTABLISHED);
    let reply = dicom(TCP_SYN | TCP_ACK).reversed();
    expect(&mut h, INGRESS, &reply, counter::ESTABLISHED);
    expect(&mut h, EGRESS, &reply, counter::ESTABLISHED);
}

#[test]
fn egress_enforcement_checks_the_destinations_rules() {
    let mut h = KernelHarness::load(policy("egress: enforce\n")).unwrap();
    let denied = PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::tcp(40000, 22, TCP_SYN));
    expect(&mut h, EGRESS, &denied, counter::DROP_POLICY_DENIED);
    expect(&mut h, EGRESS, &dicom(TCP_SYN), counter::ALLOWED);
    let mut h = KernelHarness::load(policy("egress: monitor\n")).unwrap();
    expect(&mut h, EGRESS, &denied, counter::AUDIT);
}

/// An event names the direction and the interface its packet was seen on: BPF_PROG_TEST_RUN
/// runs both programs on the loopback device.
#[test]
fn events_name_the_direction_and_interface_of_their_packet() {
    let mut h = KernelHarness::load(policy("egress: enforce\n")).unwrap();
    let mut ring = h.enforcer.take_events().expect("the event ring buffer");
    let denied = |dport| {
        PacketSpec::new(
            ip(RADIOLOGY),
            ip(PACS),
            Transport::tcp(40000, dport, TCP_SYN),
        )
    };
    expect(&mut h, INGRESS, &denied(22), counter::DROP_POLICY_DENIED);
    expect(&mut h, EGRESS, &denied(23), counter::DROP_POLICY_DENIED);
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<Event>());
        // SAFETY: the programs write whole `Event`s; `Pod` takes any bytes.
        events.push(unsafe { item.as_ptr().cast::<Event>().read_unaligned() });
    }
    let lo = std::ffi::CString::new("lo").unwrap();
    // SAFETY: a valid NUL-terminated name.
    let loopback = unsafe { libc::if_nametoindex(lo.as_ptr()) };
    assert_ne!(loopback, 0, "no loopback device");
    let seen: Vec<(u8, u16, u32)> = events
        .iter()
        .map(|event| (event.direction, event.dport, event.ifindex))
        .collect();
    assert_eq!(
        seen,
        [(INGRESS as u8, 22, loopback), (EGRESS as u8, 23, loopback)],
        "(direction, port, interface) of the events"
    );
}

#[test]
fn fragments_follow_their_first_fragment() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    let syslog = |id, offset, more| {
        PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::udp(5514, 514))
            .with_fragment(id, offset, more)
    };
    // A later fragment with no first fragment.
    expect(
        &mut h,
        INGRESS,
        &syslog(7, 3, false),
        counter::DROP_FRAGMENT_NO_STATE,
    );
    expect(&mut h, INGRESS, &syslog(7, 0, true), counter::ALLOWED);
    expect(&mut h, INGRESS, &syslog(7, 3, true), counter::FRAGMENT);
    expect(&mut h, INGRESS, &syslog(7, 6, false), counter::FRAGMENT);
    // A denied first fragment leaves its later fragments nothing to follow.
    let denied = |offset, more| {
        PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::udp(5514, 53))
            .with_fragment(8, offset, more)
    };
    expect(
        &mut h,
        INGRESS,
        &denied(0, true),
        counter::DROP_POLICY_DENIED,
    );
    expect(
        &mut h,
        INGRESS,
        &denied(3, false),
        counter::DROP_FRAGMENT_NO_STATE,
    );
    // IPv6, through the fragment extension header.
    let v6 = |offset, more| {
        PacketSpec::new(
            ip("fd00:10::10"),
            ip("fd00:30::10"),
            Transport::tcp(40000, 104, TCP_SYN),
        )
        .with_fragment(0x1234_5678, offset, more)
    };
    expect(
        &mut h,
        INGRESS,
        &v6(4, false),
        counter::DROP_FRAGMENT_NO_STATE,
    );
    expect(&mut h, INGRESS, &v6(0, true), counter::ALLOWED);
    expect(&mut h, INGRESS, &v6(4, false), counter::FRAGMENT);
    // A later TCP fragment that would overwrite the TCP header of the first.
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_SYN).with_fragment(9, 1, true),
        counter::DROP_FRAGMENT_OVERLAP,
    );
    // A first fragment too small to hold its TCP header.
    let (mut tiny, layout) = packet_builder::build(&dicom(TCP_SYN).with_fragment(10, 0, true));
    tiny.truncate(layout.l4 + 8);
    let total = (tiny.len() - layout.l3) as u16;
    tiny[layout.l3 + 2..layout.l3 + 4].copy_from_slice(&total.to_be_bytes());
    expect_frame(&mut h, INGRESS, &tiny, counter::DROP_FRAGMENT_TOO_SMALL);
}

fn without_dicom() -> Policy {
    let sources = vec![
        (
            "segments/pacs.yaml".to_string(),
            "segment: pacs\nmembers: [10.30.0.0/24, \"fd00:30::/64\"]\nallow:\n  - from: [radiology]\n    ports: [udp/514]\n".to_string(),
        ),
        (
            "segments/radiology.yaml".to_string(),
            "segment: radiology\nmembers: [10.10.0.0/24, \"fd00:10::/64\"]\n".to_string(),
        ),
    ];
    Policy::from_sources(&sources).unwrap()
}

#[test]
fn on_policy_change_recheck_cuts_flows_whose_rule_is_gone() {
    let mut h = KernelHarness::load(policy("on_policy_change: recheck\n")).unwrap();
    expect(&mut h, INGRESS, &dicom(TCP_SYN), counter::ALLOWED);
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_SYN | TCP_ACK).reversed(),
        counter::ESTABLISHED,
    );
    h.replace_policy(without_dicom()).unwrap();
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_ACK).reversed(),
        counter::DROP_FLOW_REVOKED,
    );
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_ACK),
        counter::DROP_POLICY_DENIED,
    );
}

#[test]
fn on_policy_change_keep_lets_running_flows_finish() {
    let mut h = KernelHarness::load(policy("on_policy_change: keep\n")).unwrap();
    expect(&mut h, INGRESS, &dicom(TCP_SYN), counter::ALLOWED);
    let mut without = without_dicom();
    // `keep` must be in the new policy too: it is the new policy's setting that applies.
    let keep_sources = vec![
        (
            "segments/pacs.yaml".to_string(),
            "segment: pacs\nmembers: [10.30.0.0/24]\n".to_string(),
        ),
        (
            "segments/radiology.yaml".to_string(),
            "segment: radiology\nmembers: [10.10.0.0/24]\n".to_string(),
        ),
        (
            "segments/defaults.yaml".to_string(),
            "on_policy_change: keep\n".to_string(),
        ),
    ];
    without = Policy::from_sources(&keep_sources).unwrap_or(without);
    h.replace_policy(without).unwrap();
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_ACK).reversed(),
        counter::ESTABLISHED,
    );
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_ACK | TCP_FIN),
        counter::ESTABLISHED,
    );
    // A new flow is judged by the new policy.
    let new_flow = PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::tcp(40001, 104, TCP_SYN));
    expect(&mut h, INGRESS, &new_flow, counter::DROP_POLICY_DENIED);
}

#[test]
fn a_full_table_refuses_new_flows_and_keeps_the_tracked_ones() {
    let mut h = KernelHarness::load(policy(
        "conntrack:\n  max_entries: 4\n  tcp_closing_timeout: 1s\n",
    ))
    .unwrap();
    let flow =
        |sport| PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::tcp(sport, 104, TCP_SYN));
    for sport in 1..=4 {
        expect(&mut h, INGRESS, &flow(sport), counter::ALLOWED);
    }
    expect(&mut h, INGRESS, &flow(5), counter::DROP_CONNTRACK_FULL);
    for sport in 1..=4 {
        expect(
            &mut h,
            INGRESS,
            &flow(sport).reversed().with_tcp_flags(TCP_SYN | TCP_ACK),
            counter::ESTABLISHED,
        );
    }
    // A reset keeps its slot for the closing timeout; once that has passed the sweeper frees it.
    expect(
        &mut h,
        INGRESS,
        &flow(1).with_tcp_flags(TCP_RST),
        counter::ESTABLISHED,
    );
    expect(&mut h, INGRESS, &flow(5), counter::DROP_CONNTRACK_FULL);
    thread::sleep(Duration::from_millis(1500));
    h.reference.set_time_ns(1_500_000_000);
    assert_eq!(h.enforcer.sweep_expired().unwrap(), (1, 0));
    assert_eq!(h.reference.sweep_expired(), 1);
    expect(&mut h, INGRESS, &flow(5), counter::ALLOWED);
}

#[test]
fn a_flow_recreated_after_the_sweeper_listed_its_predecessor_is_not_swept() {
    let mut h = KernelHarness::load(policy("conntrack:\n  udp_timeout: 1s\n")).unwrap();
    let syslog = PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::udp(5514, 514));
    expect(&mut h, INGRESS, &syslog, counter::ALLOWED);
    thread::sleep(Duration::from_millis(1500));
    // The sweeper lists the flow as expired at this time ...
    let listed_at = enforcer::clock::monotonic_now_ns();
    let config = *h.enforcer.config();
    let key = {
        let map = h
            .enforcer
            .ebpf_mut()
            .map_mut(enforcer_common::map_names::CONNTRACK)
            .unwrap();
        let table: aya::maps::HashMap<_, enforcer_common::FlowKey, enforcer_common::FlowState> =
            aya::maps::HashMap::try_from(map).unwrap();
        let keys: Vec<_> = table.keys().map(Result::unwrap).collect();
        assert_eq!(keys.len(), 1);
        keys[0]
    };
    // ... then, before it removes it, the next datagram finds it expired and starts a new flow
    // under the same key.
    h.reference.set_time_ns(1_600_000_000);
    expect(&mut h, INGRESS, &syslog, counter::ALLOWED);
    let map = h
        .enforcer
        .ebpf_mut()
        .map_mut(enforcer_common::map_names::CONNTRACK)
        .unwrap();
    let mut table: aya::maps::HashMap<_, enforcer_common::FlowKey, enforcer_common::FlowState> =
        aya::maps::HashMap::try_from(map).unwrap();
    assert!(
        !enforcer::conntrack::remove_flow_if_expired(&mut table, &key, listed_at, &config),
        "the new flow was swept with the old one"
    );
    // Its replies pass.
    expect(&mut h, INGRESS, &syslog.reversed(), counter::ESTABLISHED);
}

#[test]
fn idle_flows_expire_and_the_sweeper_removes_them() {
    let mut h = KernelHarness::load(policy("conntrack:\n  udp_timeout: 1s\n")).unwrap();
    let syslog = PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::udp(5514, 514));
    expect(&mut h, INGRESS, &syslog, counter::ALLOWED);
    expect(&mut h, INGRESS, &syslog.reversed(), counter::ESTABLISHED);
    thread::sleep(Duration::from_millis(1500));
    h.reference.set_time_ns(1_500_000_000);
    assert_eq!(h.enforcer.sweep_expired().unwrap(), (1, 0));
    assert_eq!(h.enforcer.tracked_flows().unwrap(), 0);
    expect(
        &mut h,
        INGRESS,
        &syslog.reversed(),
        counter::DROP_POLICY_DENIED,
    );
}

/// The programs tell the time from jiffies with the loader's calibration, or, uncalibrated, with
/// the coarse clock's helper: either way a flow's stamp reads the daemon's clock.
#[test]
fn flow_stamps_read_the_daemons_clock_calibrated_or_not() {
    use enforcer::clock::{KERNEL_LAG_NS, monotonic_now_ns, read_map};
    use enforcer_common::{Clock, FlowKey, FlowState, map_names};

    let mut h = KernelHarness::load(policy("")).unwrap();
    let calibrated = read_map(h.enforcer.ebpf()).unwrap();
    assert!(
        [10_000_000, 4_000_000, 3_333_333, 1_000_000].contains(&calibrated.tick_ns),
        "not calibrated to a CONFIG_HZ: {calibrated:?}"
    );
    for (round, clock) in [calibrated, Clock::default()].into_iter().enumerate() {
        let map = h.enforcer.ebpf_mut().map_mut(map_names::CLOCK).unwrap();
        let mut clock_map: aya::maps::Array<_, Clock> = aya::maps::Array::try_from(map).unwrap();
        clock_map.set(0, clock, 0).unwrap();
        let sport = 6000 + round as u16;
        let before = monotonic_now_ns();
        expect(
            &mut h,
            INGRESS,
            &PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::udp(sport, 514)),
            counter::ALLOWED,
        );
        let after = monotonic_now_ns();
        let map = h.enforcer.ebpf().map(map_names::CONNTRACK).unwrap();
        let table: aya::maps::HashMap<_, FlowKey, FlowState> =
            aya::maps::HashMap::try_from(map).unwrap();
        let stamps: Vec<u64> = table
            .iter()
            .map(Result::unwrap)
            .filter(|(key, _)| key.port_a == sport || key.port_b == sport)
            .map(|(_, state)| state.last_seen_ns)
            .collect();
        assert_eq!(stamps.len(), 1, "{clock:?}");
        assert!(
            stamps[0] + KERNEL_LAG_NS >= before && stamps[0] <= after + 1_000_000,
            "{clock:?}: stamped {} between {before} and {after}",
            stamps[0]
        );
    }
}

// The per-CPU flow cache in front of the connection table (`enforcer_common::FlowCacheEntry`)
// passes only what the table would pass. `KernelHarness` keeps a test on one CPU, so the tests
// above run through it too; these change what the table holds in the ways an entry must not
// outlive, right after entries have passed packets.

fn syslog() -> PacketSpec {
    PacketSpec::new(ip(RADIOLOGY), ip(PACS), Transport::udp(40001, 514))
}

#[test]
fn a_quarantine_cuts_a_flow_its_cache_entry_was_passing() {
    let mut h = KernelHarness::load(policy("")).unwrap();
    expect(&mut h, INGRESS, &dicom(TCP_SYN), counter::ALLOWED);
    for flags in [TCP_SYN | TCP_ACK, TCP_ACK | TCP_PSH, TCP_ACK | TCP_PSH] {
        expect(
            &mut h,
            INGRESS,
            &dicom(flags).reversed(),
            counter::ESTABLISHED,
        );
        expect(&mut h, INGRESS, &dicom(TCP_ACK), counter::ESTABLISHED);
    }
    let mut overrides = Overrides::default();
    overrides.quarantined.insert(ip(RADIOLOGY));
    h.set_overrides(overrides).unwrap();
    assert_eq!(h.enforcer.tracked_flows().unwrap(), 0);
    // Both sides' segments are judged now, and denied.
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_ACK | TCP_PSH),
        counter::DROP_POLICY_DENIED,
    );
    expect(
        &mut h,
        INGRESS,
        &dicom(TCP_ACK | TCP_PSH).reversed(),
        counter::DROP_POLICY_DENIED,
    );
}

#[test]
fn an_idle_flow_expires_though_its_cache_entry_passed_its_last_packets() {
    let mut h = KernelHarness::load(policy("conntrack:\n  udp_timeout: 1s\n")).unwrap();
    expect(&mut h, INGRESS, &syslog(), counter::ALLOWED);
    for _ in 0..3 {
        expect(&mut h, INGRESS, &syslog().reversed(), counter::ESTABLISHED);
    }
    thread::sleep(Duration::from_millis(1500));
    h.set_time_ns(1_500_000_000);
    expect(
        &mut h,
        INGRESS,
        &syslog().reversed(),
        counter::DROP_POLICY_DENIED,
    );
}

#[test]
fn a_busy_flow_stays_while_its_cache_entries_pass_its_packets() {
    // A packet every 50 ms for three timeouts: most pass from an entry, which does not refresh
    // the table; the entry's window is what keeps the table's idle time short.
    let mut h = KernelHarness::load(policy("conntrack:\n  udp_timeout: 1s\n")).unwrap();
    expect(&mut h, INGRESS, &syslog(), counter::ALLOWED);
    const { assert!(FLOW_CACHE_WINDOW_NS < 500_000_000) };
    for step in 1..=60u64 {
        thread::sleep(Duration::from_millis(50));
        h.set_time_ns(step * 50_000_000);
        expect(&mut h, INGRESS, &syslog().reversed(), counter::ESTABLISHED);
    }
}
