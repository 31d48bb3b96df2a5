//! The "targets missed" section of RESULTS.md: by how much, why, what would close it.
use std::fmt::Write as _;

use crate::report::{Figure, Section};

/// Why a target family is missed and what would close it, from what the benchmarks show.
fn explanation(name: &str) -> &'static str {
    if name.starts_with("per") {
        "Why: the per-packet cost no longer grows with the policy (1M against 1k: 1.06 for the \
         mixed corpus, 1.15 for the judged one; it was 1.30 and 1.51 with one LPM trie per \
         address), because a host address and a single port are now found by one exact-match hash \
         lookup whatever the policy size, and the tries are walked only for the subnets and port \
         ranges a policy has (none in these policies). What is left is a fixed cost per packet: \
         the parser (the parse-only arm, about 60 ns above the empty program, most of it \
         resetting and filling the per-CPU scratch record), then for a judged packet about ten \
         map operations at 15-50 ns each on this VM: the connection-table lookup (40-byte key), \
         two quarantine probes, two host lookups, the segment array, one or two PAIRS and \
         PORTS_EXACT lookups, the break-glass probe of a denied pair, and the accounting (per-CPU \
         PAIR_VERDICTS hash, DROPS_BY_PROTOCOL, the EVENT_LIMITER LRU lookup of a denial). 50 ns \
         above the empty program leaves room for two or three of them. What would close more of \
         it: fewer map operations per judged packet (one hash keyed by (destination segment, \
         class, protocol, port) instead of PAIRS then PORTS_EXACT; skipping the quarantine and \
         break-glass probes while nothing is quarantined or granted, with a generation-checked \
         flag so a new quarantine can never be missed; per-CPU arrays indexed by segment pair \
         instead of the PAIR_VERDICTS hash), and a parser that fills only the fields a decision \
         reads."
    } else if name.starts_with("e2e") {
        "Why (not profiled; what the figures point at): in front of a veth every frame is a \
         different flow, so unlike the repeated frame of BPF_PROG_TEST_RUN the maps are not in \
         cache. The hash lookups made the 100k arm 1.6 times faster than with tries (0.24 to 0.39 \
         Mpps) and the enforcer now matches nftables' hash maps (1.24) and nearly its interval \
         sets (0.87), but every judged packet still makes about ten map accesses, several of them \
         cache misses at 100k entries on a shared 2-CPU VM (host, pair and port hashes, the \
         connection table, PAIR_VERDICTS, the event limiter), where the parse-and-drop floor \
         makes one. What would close it: the same reduction of map operations per judged packet \
         as for the per-packet cost, above all for denials, which this benchmark sends \
         exclusively: count them per segment pair in a per-CPU array and check the event limiter \
         only for the first denial of a flow per interval."
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
        "Why: the packets here come through BPF_PROG_TEST_RUN one syscall each, so the event rate \
         is bounded by the syscall rate (see packets/s at 100% denied); the reader kept up (0 \
         lost). What would close it: measuring with a live-frames generator (as in section 2) \
         rather than one syscall per packet, and on the reader side batching serialization; the \
         kernel side is one LRU lookup and one ring-buffer reserve per denial."
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
