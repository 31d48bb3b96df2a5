//! The "targets missed" section of RESULTS.md: by how much, why, what would close it.
use std::fmt::Write as _;

use crate::report::{Figure, Section};

/// Why a target family is missed and what would close it, from what the benchmarks show.
fn explanation(name: &str) -> &'static str {
    if name.starts_with("per") {
        "Why: the parse-only arm (section 1 table) shows what the parser costs; the rest is the \
         decision and its accounting. A judged packet takes: a connection-table hash lookup (40-byte \
         key), two LPM-trie lookups (source and destination; IPv6 keys are 128 bits), the \
         segment array, one or two PAIRS hash lookups (the source class's table, then the \
         wildcard), the PORTS trie, and then the accounting: the per-CPU PAIR_VERDICTS hash, \
         DROPS_BY_PROTOCOL, and for a denial the EVENT_LIMITER LRU lookup (40-byte key) and a \
         ring-buffer reserve. The growth with policy size is the LPM tries: the kernel's trie is \
         a binary, path-compressed trie, so a lookup walks O(prefix length) nodes, more of them \
         as the trie fills, each a dependent load. What would close it (the lead's kernel \
         lookup work, not done here): a lookup that does not walk a binary trie (e.g. per-length \
         hash tables for the prefix lengths the policy uses, or a DIR-24-8-style array for \
         IPv4), one hash lookup for the (destination, class, proto, port) decision instead of \
         PAIRS + PORTS, and moving the per-packet accounting of denials (PAIR_VERDICTS and the \
         event limiter) off the per-packet path (per-CPU arrays indexed by segment pair)."
    } else if name.starts_with("e2e") {
        "Why (not profiled; what the figures point at): in front of a veth consecutive frames \
         are different flows, so unlike the repeated frame of BPF_PROG_TEST_RUN the maps are \
         not in cache, and the enforcer's cost grows with the policy far more than in section 1 \
         — at 100k rules most likely the dependent cache misses of the trie walks (two address \
         tries and the port trie, a node per bit level) on a shared 2-CPU VM; nftables' maps \
         degrade too, less steeply. Even at 10 rules the enforcer's denial path (connection \
         lookup, tries, PAIRS, accounting, event limiter) costs several times the \
         parse-and-drop floor. What would close it: the same kernel lookup work (fewer dependent \
         loads per decision: hashed or array lookups instead of bit-level tries), and cheaper \
         per-packet denial accounting."
    } else if name.starts_with("reload") {
        "Why: time to live is validation + compilation in user space (split in the section 3 \
         table) plus writing \
         every entry of three maps, one bpf() syscall per entry (ADDR tries, PAIRS, PORTS: \
         about 3 × N syscalls), and the inactive slot must be emptied first. What would close \
         it: batched map updates (BPF_MAP_UPDATE_BATCH for PAIRS; tries have no batch op), \
         map-in-map with fresh inner maps per reload (docs/design.md: no clearing, no size \
         limit), and incremental compilation of the changed segments only."
    } else if name.starts_with("events") {
        "Why: the packets here come through BPF_PROG_TEST_RUN one syscall each, so the event \
         rate is bounded by the syscall rate (see packets/s at 100% denied); the reader kept \
         up (0 lost). What would close it: measuring with a live-frames generator (as in \
         section 2) rather than one syscall per packet, and on the reader side batching \
         serialization; the kernel side is one LRU lookup and one ring-buffer reserve per \
         denial."
    } else if name.starts_with("daemon") {
        "Why (likely; not profiled): the daemon validates and compiles the policy in its own \
         process, and `Daemon` does not keep the compiled artifact, so what stays resident is \
         mostly the heap the compiler used (compare `compile_100000_peak_rss`), which the \
         allocator keeps rather than returning to the system (VmRSS stays close to VmHWM). What \
         would close it: compile in a short-lived child process (or `malloc_trim` after a \
         load), and a leaner compiler for large policies."
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
