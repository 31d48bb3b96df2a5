//! A reload swaps the whole policy at once: while one CPU keeps judging packets with the real
//! XDP program, another keeps swapping between two policies that allow the same flow with
//! different segment and class numbering, emptying the old slot right after most switches and
//! rewriting it at once after the others. A packet judged by parts of both, or by a slot
//! emptied or rewritten under it, could find no rule and be dropped, or find its addresses in
//! no segment and pass unenforced; no packet may. Needs root.
use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use enforcer::Enforcer;
use policy_compiler::Policy;
use vm_tests::{
    harness::{XDP_DROP, XDP_PASS},
    packet_builder::{self, PacketSpec, TCP_SYN, Transport},
};

/// alpha allows beta on tcp/80. `extra` segments sort before the others and shift every id.
fn policy(extra: &[(&str, &str)]) -> Policy {
    let mut sources = vec![
        (
            "segments/alpha.yaml".to_string(),
            "segment: alpha\nmembers: [10.1.0.0/16]\nallow:\n  - from: [beta]\n    ports: [tcp/80]\n"
                .to_string(),
        ),
        (
            "segments/beta.yaml".to_string(),
            "segment: beta\nmembers: [10.2.0.0/16]\n".to_string(),
        ),
    ];
    for (name, cidr) in extra {
        sources.push((
            format!("segments/{name}.yaml"),
            format!("segment: {name}\nmembers: [{cidr}]\nallow:\n  - from: [10.2.7.0/24]\n    ports: [tcp/81]\n"),
        ));
    }
    Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"))
}

/// A private bpffs mounted on a temporary directory, unmounted and removed on drop (even when
/// the test fails), so the test neither needs nor touches /sys/fs/bpf.
struct PrivateBpffs(PathBuf);

impl PrivateBpffs {
    fn mount() -> Self {
        let dir = std::env::temp_dir().join(format!("enforcer-bpffs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mounting a bpffs: {}",
            std::io::Error::last_os_error()
        );
        PrivateBpffs(dir)
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn no_packet_is_judged_by_a_mixture_of_two_policies() {
    let a = policy_compiler::compile(&policy(&[])).unwrap();
    let b =
        policy_compiler::compile(&policy(&[("aa", "10.9.0.0/16"), ("ab", "10.8.0.0/16")])).unwrap();
    assert_ne!(a.segments[1].name, b.segments[1].name, "ids must differ");
    let mut enforcer = Enforcer::load(&a).expect("load");

    // A second handle on the same program, for the judging thread.
    let bpffs = PrivateBpffs::mount();
    let pin = bpffs.0.join("enforcer_xdp");
    enforcer.pin_xdp_program(&pin).expect("pin the program");
    let judge = Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface).unwrap();

    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let (allowed, _) = packet_builder::build(&PacketSpec::new(
        ip("10.2.0.5"),
        ip("10.1.0.5"),
        Transport::tcp(40000, 80, TCP_SYN),
    ));
    let (denied, _) = packet_builder::build(&PacketSpec::new(
        ip("10.2.0.5"),
        ip("10.1.0.5"),
        Transport::tcp(40000, 22, TCP_SYN),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let judging = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let (mut judged, mut wrong) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                // A varying source port: every packet is a new flow, judged by the policy.
                for (frame, want) in [(&allowed, XDP_PASS), (&denied, XDP_DROP)] {
                    let mut frame = frame.clone();
                    let sport = (judged % 60_000) as u16 + 1024;
                    frame[34..36].copy_from_slice(&sport.to_be_bytes());
                    let got = judge
                        .test_run(TestRunOptions {
                            data_in: Some(&frame),
                            ..TestRunOptions::default()
                        })
                        .unwrap()
                        .return_value;
                    if got != want {
                        wrong.push((judged, got, want));
                    }
                    judged += 1;
                }
            }
            (judged, wrong)
        })
    };

    let started = Instant::now();
    let mut reloads = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let next = if reloads % 2 == 0 { &b } else { &a };
        enforcer.replace_policy(next).expect("reload");
        // At once, sooner than the daemon does: the clear itself must wait for packets that
        // are still being judged by the old slot. Every third time not at all, as when two
        // reloads follow each other: the next one must wait before rewriting that slot.
        if reloads % 3 != 2 {
            enforcer.clear_inactive_slot().expect("clear");
        }
        reloads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (judged, wrong) = judging.join().unwrap();
    println!("{judged} packets judged during {reloads} reloads");
    assert!(reloads >= 50, "only {reloads} reloads");
    assert!(judged >= 10_000, "only {judged} packets judged");
    assert!(
        wrong.is_empty(),
        "{} of {judged} packets judged wrongly during reloads, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// `segments` segments of `hosts_each` member hosts, IPv6 in odd segments; every host is named
/// by one rule of the next segment of its family, on its own port: about as many host, pair and
/// single-port entries as hosts.
fn large_policy(segments: usize, hosts_each: usize) -> Policy {
    let host = |segment: usize, i: usize| -> String {
        if segment.is_multiple_of(2) {
            format!("10.{segment}.{}.{}/32", i / 256, i % 256)
        } else {
            format!("fd00:{segment}::{i:x}/128")
        }
    };
    let sources: Vec<(String, String)> = (0..segments)
        .map(|segment| {
            let members: Vec<String> = (0..hosts_each)
                .map(|i| format!("\"{}\"", host(segment, i)))
                .collect();
            let mut yaml = format!(
                "segment: s{segment}\nmembers: [{}]\nallow:\n",
                members.join(", ")
            );
            let source = (segment + 2) % segments;
            for i in 0..hosts_each {
                yaml.push_str(&format!(
                    "  - from: [\"{}\"]\n    ports: [tcp/{}]\n",
                    host(source, i),
                    1024 + i
                ));
            }
            (format!("segments/s{segment}.yaml"), yaml)
        })
        .collect();
    Policy::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"))
}

/// Entries in the hash map `name` (listed key by key, independently of how it was emptied).
fn hash_len<K: aya::Pod, V: aya::Pod>(enforcer: &Enforcer, name: &str) -> usize {
    let map = enforcer
        .ebpf()
        .map(name)
        .unwrap_or_else(|| panic!("map {name}"));
    let hash = aya::maps::HashMap::<_, K, V>::try_from(map).unwrap();
    hash.keys().collect::<Result<Vec<K>, _>>().unwrap().len()
}

#[test]
fn emptying_a_slot_of_a_large_policy_leaves_nothing_behind() {
    use enforcer_common::{PairKey, PairValue, map_names};

    // Several of the daemon's 8192-entry batches per map.
    let a = policy_compiler::compile(&large_policy(4, 9000)).unwrap();
    let b = policy_compiler::compile(&large_policy(4, 100)).unwrap();
    let mut enforcer = Enforcer::load(&a).expect("load");
    enforcer.replace_policy(&b).expect("reload");
    let old = 1 - enforcer.active_slot();
    // The exact-match tables are arrays that every write replaces whole: not emptied. The pair
    // table's overflow hash is, and holds nothing unless the table is crowded: filled here as a
    // crowded table would fill it, across several of the daemon's batches.
    {
        let map = enforcer
            .ebpf_mut()
            .map_mut(map_names::PAIRS_OVERFLOW[old])
            .unwrap();
        let mut overflow = aya::maps::HashMap::<_, PairKey, PairValue>::try_from(map).unwrap();
        for class in 0..3 * 8192 {
            let key = PairKey {
                dst_segment: 1,
                src_class: class,
            };
            overflow.insert(key, PairValue::default(), 0).unwrap();
        }
    }
    let sizes = |enforcer: &Enforcer| {
        [hash_len::<PairKey, PairValue>(
            enforcer,
            map_names::PAIRS_OVERFLOW[old],
        )]
    };
    let before = sizes(&enforcer);
    assert_eq!(before, [3 * 8192], "the overflow was not filled");
    enforcer.clear_inactive_slot().expect("clear");
    assert_eq!(
        sizes(&enforcer),
        [0],
        "left in the old slot (was {before:?})"
    );

    // The emptied slot takes policy A again and holds exactly it.
    enforcer.replace_policy(&a).expect("reload");
    assert_eq!(enforcer.active_slot(), old);
    assert!(
        enforcer::policy_maps::slot_holds(enforcer.ebpf(), old, &a).expect("read the slot"),
        "the slot holds more or less than policy A"
    );
}

fn map<'a>(enforcer: &'a mut Enforcer, name: &str) -> &'a mut aya::maps::Map {
    enforcer.ebpf_mut().map_mut(name).expect(name)
}

/// `slot_holds` (the check that lets a restarted daemon keep a pinned slot) compares every map
/// of the slot, the fallbacks of the exact-match tables included: one entry more in any of them
/// and the slot no longer holds the policy.
#[test]
fn a_slot_with_one_more_fallback_entry_does_not_hold_the_policy() {
    use aya::maps::{HashMap, LpmTrie, lpm_trie::Key};
    use enforcer_common::{
        AddrInfo, PORT_EXACT_PREFIX, PairKey, PairValue, PortKey, PortValue, map_names,
    };

    let dir = vm_tests::lab::example_policy_dir();
    let policy = Policy::load_dir(&dir).unwrap_or_else(|e| panic!("example policy: {e}"));
    let artifact = policy_compiler::compile(&policy).unwrap();
    let mut enforcer = Enforcer::load(&artifact).expect("load");
    let slot = enforcer.active_slot();
    let holds = |enforcer: &Enforcer| {
        enforcer::policy_maps::slot_holds(enforcer.ebpf(), slot, &artifact).expect("read the slot")
    };
    assert!(
        holds(&enforcer),
        "the slot does not hold the policy it was loaded with"
    );

    // A host, a single port and a pair, as a crowded table would put them in its fallback.
    let info = AddrInfo {
        segment: 1,
        class: 1,
    };
    {
        let name = map_names::ADDR_V4[slot];
        let key = Key::new(32, [192, 0, 2, 1]);
        let mut trie = LpmTrie::<_, [u8; 4], AddrInfo>::try_from(map(&mut enforcer, name)).unwrap();
        trie.insert(&key, info, 0).unwrap();
        assert!(!holds(&enforcer), "one more host in {name} went unnoticed");
        let mut trie = LpmTrie::<_, [u8; 4], AddrInfo>::try_from(map(&mut enforcer, name)).unwrap();
        trie.remove(&key).unwrap();
    }
    {
        let name = map_names::ADDR_V6[slot];
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        addr[15] = 1;
        let key = Key::new(128, addr);
        let mut trie =
            LpmTrie::<_, [u8; 16], AddrInfo>::try_from(map(&mut enforcer, name)).unwrap();
        trie.insert(&key, info, 0).unwrap();
        assert!(!holds(&enforcer), "one more host in {name} went unnoticed");
        let mut trie =
            LpmTrie::<_, [u8; 16], AddrInfo>::try_from(map(&mut enforcer, name)).unwrap();
        trie.remove(&key).unwrap();
    }
    {
        let name = map_names::PORTS[slot];
        let key = Key::new(PORT_EXACT_PREFIX, PortKey::new(0, 6, 1));
        let mut trie =
            LpmTrie::<_, PortKey, PortValue>::try_from(map(&mut enforcer, name)).unwrap();
        trie.insert(&key, PortValue { rule: 0 }, 0).unwrap();
        assert!(!holds(&enforcer), "one more port in {name} went unnoticed");
        let mut trie =
            LpmTrie::<_, PortKey, PortValue>::try_from(map(&mut enforcer, name)).unwrap();
        trie.remove(&key).unwrap();
    }
    {
        let name = map_names::PAIRS_OVERFLOW[slot];
        let key = PairKey {
            dst_segment: 1,
            src_class: 1_000_000,
        };
        let mut hash =
            HashMap::<_, PairKey, PairValue>::try_from(map(&mut enforcer, name)).unwrap();
        hash.insert(key, PairValue::default(), 0).unwrap();
        assert!(!holds(&enforcer), "one more pair in {name} went unnoticed");
        let mut hash =
            HashMap::<_, PairKey, PairValue>::try_from(map(&mut enforcer, name)).unwrap();
        hash.remove(&key).unwrap();
    }
    assert!(
        holds(&enforcer),
        "the slot, restored, does not hold the policy"
    );
}
