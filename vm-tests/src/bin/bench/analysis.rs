//! The "targets missed" section of RESULTS.md: by how much, why, what would close it.
use std::fmt::Write as _;

use crate::report::{Figure, Section};

/// Why a target family is missed and what would close it, from what the benchmarks show.
fn explanation(name: &str) -> &'static str {
    if name.starts_with("per") {
        "Why: the per-packet cost does not grow with the policy (1M against 1k, in the table \
         above), because a host address and a single port are found by one exact-match hash \
         lookup whatever the policy size, and the tries are walked only for the subnets and port \
         ranges a policy has. What is left is a fixed cost per packet, which session 5 cut by \
         about a third (side by side with the previous build, `cargo xtask bench --only \
         per-packet`: at 100k, 325 to 210-220 ns above the empty program for the mixed corpus, \
         773 to 465-510 ns for the judged one; the parse-only arm 78 to 30-40 ns): every \
         map of a policy slot is now a constant in its code, so the verifier inlines the hash \
         and array lookups (a slot picked at run time made each one a helper call through a \
         retpoline); no byte-by-byte `memset` subprogram to clear the per-packet record or widen \
         IPv4 addresses; addresses and keys aligned, so they are copied as words; the coarse \
         clock (a TSC read costs about 30 ns in this VM); the break-glass probe only while a slot \
         holds a grant; the event rate limiter a per-CPU array instead of an LRU hash. `perf` over \
         a loop of the judged corpus now shows about a third of the time in the kernel's hash \
         code (jhash and the bucket walk) for the six to eight hash lookups of a judged packet \
         (connection table, two hosts, one or two PAIRS and PORTS_EXACT, PAIR_VERDICTS) and a \
         quarter in the program body; 50 ns above the empty program leaves room for about two \
         lookups. What would close more of it: one hash keyed by (destination segment, class, \
         protocol, port) with the wildcard class merged into every class's table by the \
         compiler, instead of PAIRS then PORTS_EXACT twice; a DIR-24-8 table for IPv4 hosts and \
         prefixes (an array index, no hashing); PAIR_VERDICTS as a per-CPU array over dense pair \
         ids."
    } else if name.starts_with("e2e") {
        "Why: in front of a veth every frame is a different flow, so unlike the repeated frame \
         of BPF_PROG_TEST_RUN the maps are not in cache, and each hash lookup of a judged packet \
         costs a cache miss or two (the bucket array, then the element): the host hashes of a \
         100k policy (allocated per element), the 1M-bucket connection table of these policies, \
         PAIRS and PORTS_EXACT, PAIR_VERDICTS. The parse-and-drop floor touches no map. Session 5 \
         moved the enforcer from 0.24 to 0.3-0.4 of the floor at 10 and 1k rules and from 0.87 to \
         1.2-1.8 times nftables' interval sets at 100k (same benchmark, previous build; the \
         range is across today's runs). \
         What would close it: fewer map accesses per judged packet, as for the per-packet cost, \
         above all for denials, which this benchmark sends exclusively."
    } else if name.starts_with("reload") {
        "Why: time to live is validation + compilation in user space (split in the section 3 \
         table: about 1 s of the 1.3 s at 100k rules) plus writing the maps. The writes are now \
         batched (BPF_MAP_UPDATE_BATCH for the host, pair and single-port hashes; the tries, \
         which have no batch operation, hold only subnets and port ranges), which took \
         write+switch from 678 to 328 ms at 100k and from 6.3 to 2.7 s at 1M, with the benchmark \
         pinned to one CPU. The daemon reads and parses the segment files on every core (measured \
         by hand: live 0.55-0.6 s after reading the files on this machine when idle). What would \
         close it: a faster YAML front end and rule construction (validation is now most of the \
         time), incremental compilation of the segments that changed, and map-in-map slots so a \
         reload writes fresh inner maps and never clears."
    } else if name.starts_with("events") {
        "Why: in the live-frames measurement every event the kernel sent was a denied packet and \
         the kernel side is the bound: the generator, the veth transmit and the enforcer's denial \
         (connection-table miss, policy lookups, PAIR_VERDICTS, the limiter slot, the ring-buffer \
         copy) share one CPU, about 0.9 µs per event; session 5 raised it from about 0.56M to \
         0.9-1.14M events/s (quick and full runs) by replacing the LRU limiter (its insert and eviction were a sixth of \
         the time) and copying events with one `bpf_ringbuf_output`. The reader, on the other \
         CPU, names and serializes an event in about 330 ns and loses some (counted) at this \
         rate when it sleeps between polls of the ring. What would close it: fewer map \
         operations per denial, as for the per-packet cost, and a reader woken by the ring \
         buffer's epoll rather than polling. The BPF_PROG_TEST_RUN figures are bounded by one \
         syscall per packet."
    } else if name.starts_with("daemon") {
        "Why: the daemon keeps only the outline of the policy in force and returns the compiler's \
         heap to the system after every load (`malloc_trim`, two malloc arenas); VmHWM, the peak \
         while compiling, stays well above the resident figure."
    } else {
        ""
    }
}

pub fn misses(figures: &[Figure]) -> Section {
    let mut text = String::new();
    let mut explained = Vec::new();
    for f in figures.iter().filter(|f| f.met == Some(false)) {
        let _ = writeln!(
            text,
            "- **{}**: {:.2} {} against target \"{}\"{}.",
            f.name,
            f.value,
            f.unit,
            f.target.as_deref().unwrap_or(""),
            f.ratio
                .map(|r| format!(" (ratio {r:.2} to {})", f.baseline))
                .unwrap_or_default()
        );
        let family = f.name.split('_').next().unwrap_or("");
        if !explained.contains(&family) {
            explained.push(family);
        }
    }
    if text.is_empty() {
        text.push_str("Every target is met.\n");
    } else {
        text.push('\n');
        for family in explained {
            let _ = writeln!(text, "{}\n", explanation(family));
        }
    }
    Section {
        title: "Targets missed: by how much, why, and what would close it".to_string(),
        text,
    }
}
