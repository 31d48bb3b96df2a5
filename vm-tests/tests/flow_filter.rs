//! The filter in front of the connection table (`enforcer_common::flow_filter`) skips the
//! table's probe when a flow's byte is 0, so it must never hold a 0 for a tracked flow: not for
//! a flow created while the daemon rebuilds it, nor for an old one whose half was rebuilt.
//! Packets go through the real XDP program and the reference model (every outcome is checked
//! against both) while another thread rebuilds the filter without pause. Needs root.
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use enforcer_common::{counter, direction::INGRESS};
use policy_compiler::Policy;
use rand::{Rng as _, SeedableRng as _, rngs::SmallRng};
use vm_tests::{
    harness::{KernelHarness, expect},
    packet_builder::{PacketSpec, TCP_ACK, TCP_SYN, Transport},
};

/// radiology may reach pacs on tcp/104 and udp/514; nobody may reach radiology.
fn policy() -> Policy {
    let sources = vec![
        (
            "segments/pacs.yaml".to_string(),
            "segment: pacs\nmembers: [10.30.0.0/24]\nallow:\n  - from: [radiology]\n    ports: [tcp/104, udp/514]\n"
                .to_string(),
        ),
        (
            "segments/radiology.yaml".to_string(),
            "segment: radiology\nmembers: [10.10.0.0/16]\n".to_string(),
        ),
    ];
    Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"))
}

const PACS: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 30, 0, 10));

/// The client side of connection `n`: a radiology address and port of its own.
fn client(n: u32) -> (IpAddr, u16) {
    let host = Ipv4Addr::new(10, 10, (n >> 8) as u8, n as u8);
    (IpAddr::V4(host), 1024 + (n >> 16) as u16)
}

fn to_pacs(n: u32, flags: u8) -> PacketSpec {
    let (addr, port) = client(n);
    PacketSpec::new(addr, PACS, Transport::tcp(port, 104, flags))
}

/// A syslog datagram of flow `n`: UDP, whose packets all look alike, so each one consults the
/// filter (a TCP segment with ACK goes straight to the table).
fn syslog(n: u32) -> PacketSpec {
    let (addr, port) = client(n);
    PacketSpec::new(addr, PACS, Transport::udp(port, 514))
}

#[test]
fn replies_pass_while_the_filter_is_rebuilt() {
    let mut h = KernelHarness::load(policy()).unwrap();
    let mut filter = h
        .flow_filter
        .take()
        .expect("the harness sets up the filter");
    assert!(filter.enabled(), "the harness's rebuild enables the filter");
    // Without state, pacs cannot open a connection to radiology: the filter's 0 is no pass.
    expect(
        &mut h,
        INGRESS,
        &to_pacs(0, TCP_SYN | TCP_ACK).reversed(),
        counter::DROP_POLICY_DENIED,
    );
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut rng = SmallRng::seed_from_u64(seed);
    let stop = AtomicBool::new(false);
    let rebuilds = AtomicUsize::new(0);
    let mut connections = 0u32;
    thread::scope(|scope| {
        let rebuilder = scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                filter.rebuild().expect("rebuild");
                rebuilds.fetch_add(1, Ordering::Relaxed);
            }
        });
        // A failed `expect` below must stop the rebuilder too, or the scope waits forever.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) || rebuilds.load(Ordering::Relaxed) < 30 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "only {} rebuilds in a minute",
                rebuilds.load(Ordering::Relaxed)
            );
            // A new flow, its state created while the filter may be mid-rebuild; the reply comes
            // from the side no rule lets open a flow, so only the state lets it pass.
            let n = connections;
            expect(&mut h, INGRESS, &syslog(n), counter::ALLOWED);
            expect(&mut h, INGRESS, &syslog(n).reversed(), counter::ESTABLISHED);
            // A TCP connection: its SYN, and a retransmitted SYN after the reply, consult the
            // filter; the second one finds the connection's state.
            if n.is_multiple_of(16) {
                expect(&mut h, INGRESS, &to_pacs(n, TCP_SYN), counter::ALLOWED);
                expect(
                    &mut h,
                    INGRESS,
                    &to_pacs(n, TCP_SYN | TCP_ACK).reversed(),
                    counter::ESTABLISHED,
                );
                expect(&mut h, INGRESS, &to_pacs(n, TCP_SYN), counter::ESTABLISHED);
            }
            connections += 1;
            // And an older one, whose byte a rebuild had to carry over from the listing.
            let old = rng.random_range(0..connections);
            expect(
                &mut h,
                INGRESS,
                &syslog(old).reversed(),
                counter::ESTABLISHED,
            );
        }
        drop(_stop);
        rebuilder.join().unwrap();
    });
    let rebuilds = rebuilds.into_inner();
    println!("{connections} flows opened during {rebuilds} rebuilds of the filter");
    let tcp = connections.div_ceil(16);
    assert_eq!(
        h.enforcer.tracked_flows().unwrap(),
        (connections + tcp) as usize
    );
}
