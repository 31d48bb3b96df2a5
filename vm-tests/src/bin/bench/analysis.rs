//! The "targets missed" section of RESULTS.md: by how much, why, what would close it.
use std::fmt::Write as _;

use crate::report::{Figure, Section};

/// Why a target family is missed and what would close it, from what the benchmarks show.
fn explanation(name: &str) -> &'static str {
    if name.starts_with("per") {
        "Why: for a policy of host addresses the per-packet cost does not grow with the policy \
         (1M against 1k, in the table above), because a host address, a segment pair and a \
         single port are each found by one exact-match lookup whatever the policy size, and the \
         tries are walked only for the subnets and port ranges a policy has. A policy written \
         with subnets, as most hospital policies are (a VLAN per segment), is another matter: \
         the judged_subnets rows, added in session 14, are the judged corpus on the same policy \
         with every member and rule source a /31 (/127), so every address misses the host \
         table and walks the prefix trie, a call into the kernel's trie code per address whose \
         walk grows with the number of prefixes: in session 14's first full run, 115, 174, 250 \
         and 299 ns above the empty program at 10, 1k, 100k and 1M, against 92 for the host \
         policy at 100k. The same session puts the addresses of subnets at most 8 bits shorter \
         than a host into the host table (the value of the longest prefix holding each; \
         `docs/design.md`), when there are at most 262,144 of them per family and they fit the \
         table: the kernel is unchanged, a hit is the longest match and a miss needs no trie \
         walk. At 1M the benchmark's /31 and /127 subnets are 1.5 million IPv4 addresses, past that \
         limit, so until session 16 they stayed in the trie (274 ns above the empty program in \
         session 15's run, 3.5 times the cost at 1k). Session 16 adds a block table per family \
         (`BLOCKS_V4`/`BLOCKS_V6`, the host tables' bucket type): the subnets that are not in \
         the host table are written as blocks of the longest one's length, each with the value \
         of the longest subnet over it, up to 4 blocks per subnet (so a policy's short subnets \
         cost it memory in proportion to the policy); a host-table miss is probed there with \
         the address masked to the block length, and the trie is walked only for what the \
         blocks leave out. A /16 VLAN, which kept a whole policy out of the host table before, \
         is now one block. The two builds one after the other (`bench --only per-packet \
         --runs 10`; the new maps keep the old object from loading under `--baseline-object`): \
         judged_subnets at 1M 10.86 times the empty program before, 3.65 after (1.20 times the \
         cost at 1k); every other row 0.99-1.03 times its ratio in the build before. \
         For the host policy, what is left \
         is a fixed cost per packet. Session 5 cut it by about \
         a third (side by side with the previous build, `cargo xtask bench --only per-packet`: \
         at 100k, 325 to 210-220 ns above the empty program for the mixed corpus, 773 to \
         465-510 ns for the judged one; the parse-only arm 78 to 30-40 ns): every map of a \
         policy slot is a constant in its code, so the verifier inlines the hash and array \
         lookups; no byte-by-byte `memset` subprogram; aligned addresses and keys; the coarse \
         clock; the break-glass probe only while a slot holds a grant; a per-CPU array as the \
         event rate limiter. Session 6 skips the probe of a destination's wildcard table for a \
         protocol that no rule admits from every source (most segments' wildcard table holds \
         only essential ICMP), one or two hash lookups fewer for a denied TCP or UDP packet. \
         Where the rest goes (`perf` over a loop of the judged corpus at 10 rules): a third in \
         the program body, a third in the kernel's hash code (jhash 13%, the bucket walk 13%, \
         the lookup wrapper 7%, memcmp 2%) for the five or six hash lookups of a judged packet \
         (connection table, two hosts, PAIRS, PORTS_EXACT when the pair has a table, \
         PAIR_VERDICTS). This CPU runs with retpolines and the SRSO \"Safe RET\" mitigation \
         (`/sys/devices/system/cpu/vulnerabilities`), so each call into that code and each \
         return is dear; 50 ns above the empty program leaves room for about one hash lookup. \
         What would close more of it: array lookups, which the verifier inlines completely, in \
         place of hashes where the keys can be made dense (PAIRS and PAIR_VERDICTS over dense \
         pair ids; a DIR-24-8-style table for IPv4 prefixes, though a table for 100k scattered \
         /32 hosts costs tens of MiB per slot); one hash keyed by (destination segment, class, \
         protocol, port) instead of PAIRS then PORTS_EXACT. Session 10 put a filter in front of \
         the connection table (`enforcer_common::flow_filter`): one byte per hash of a flow, \
         set before its state is created and never cleared by a removal, rebuilt by the daemon \
         after every sweep, so a 0 proves a flow untracked and its packet skips the table's \
         probe. Side by side with the build before it (`cargo xtask bench --only per-packet \
         --baseline-object`, 10 runs): 0.91-0.95 of the judged corpus's cost at every size, \
         and 1.01-1.04 of the mixed one's, whose repeated frames are mostly of tracked flows, \
         which pay the filter's probe on top of the table's (a TCP segment with ACK, most of \
         real traffic, skips the filter). Session 11 replaced the BPF hashes of hosts, segment \
         pairs and single ports by open-addressing tables in plain arrays \
         (`enforcer_common::exact_table`): a multiply, then nearly always one 64-byte bucket, \
         all inlined, with no call into the kernel's hash code; a key a table has no room for \
         goes into a fallback map (a trie, or a small hash for pairs) that is probed only when \
         all four buckets of a lookup are full. The two builds, run one after the other \
         (`bench --only per-packet --runs 5`; these maps changed type, so the old object cannot \
         be loaded by this build's loader for `--baseline-object`): enforcer / empty 10.5-11.4 \
         before, 7.3-8.2 after for the judged corpus; 7.0-7.2 before, 6.5-7.1 after for the \
         mixed one, whose packets mostly find their flow in the connection table. What is left \
         of the hash lookups: the connection table (for tracked flows, and for new ones that \
         pass the filter) and PAIR_VERDICTS, a per-CPU hash of segment-pair counters. \
         Session 12 measured the parts of a judged packet by taking each out of the program \
         (`--only per-packet --baseline-object` with the part removed, side by side, at every \
         size): PAIR_VERDICTS is about 17% of it (some 35 ns), the policy lookups of `judge` \
         20-25%, the connection table's filter and lookup 8-14%, the flow event (rate-limited, \
         so mostly the limiter) 6-9%; the rest is parsing, the scratch memory and the counters. \
         No one part is the 130-odd ns too many: reaching 50 ns would take the segment-pair \
         counters out of the per-packet path (dense arrays need pair ids the compiler does not \
         have for 1,000 segments) and parsing and judging in fewer instructions together. The \
         same session cut the instructions the verifier processes by 63% (see section 5) with \
         no change per packet: side by side with the build before it, 10 runs, 0.95 to 1.02 of \
         its cost at every size and corpus. Runs of one build an hour apart differ far more \
         than that (the judged corpus at 100k: 7.3 to 9.2 times the empty program in four runs \
         of session 12, as other work on the machine came and went): compare builds side by \
         side, not across runs. Session 13 took the hash out of the segment-pair counts: each \
         slot has a per-CPU array (`PAIR_COUNTS_*`, 4,096 elements of key and count) in which a \
         CPU claims the element its key hashes to, and only a key whose element another key \
         holds is counted in PAIR_VERDICTS. Side by side with the build before it (`--only \
         per-packet --runs 10 --baseline-object`): 0.86-0.90 of the judged corpus's cost at \
         every size, 0.95-0.97 of the mixed one's. The same session profiled the JIT-compiled \
         programs instruction by instruction (`perf` samples on the benchmark's CPU, mapped to \
         source lines through the programs' jited line info): about half of a packet's time in \
         the program is the decision (`decide_ip`: the array lookups, the tables' buckets, the \
         event limiter, the counters), a sixth each parsing and the entry program (the clock, \
         two calls), the rest the kernel's hash code; no single instruction site has more than \
         4% of it. Session 14 found that every call returns through the SRSO mitigation's thunk \
         and costs about 10 ns here: the parse-only program with the parser inlined cost 10 ns \
         above the empty one instead of 20. The parser is now inlined into the per-slot \
         decision (both fit the 512-byte stack together), and an IPv6 address is read as two \
         words instead of being copied by a `memmove` call: side by side with the build before \
         (`--only per-packet --runs 10 --baseline-object`), 0.89-0.92 of its cost for the judged \
         corpus and 0.91-0.92 for the mixed one at every size. The floors inline the parser \
         too. What a judged packet still calls: the clock and the per-slot decision (inlining \
         the decision as well measured no better, and took the verifier to 300k instructions). \
         Taking parts out (session 14, same method): the flow event and its rate limiter are \
         about 7% of a judged packet, the rest of the accounting (segment-pair count, building \
         the event) another 7%. Session 15 took the clock out the same way: its helper call was \
         about 20 ns of every packet. The programs now compute the coarse clock from the \
         jiffies counter, one load that the verifier inlines, with a tick and an offset the \
         loader calibrates (`enforcer::clock`, `docs/design.md`); and the event limiter is asked \
         before the event is built, with a multilinear hash in place of a chain of nine \
         multiplies. Side by side with the build before (`--only per-packet --quick --runs 10 \
         --baseline-object`): 0.81-0.84 of its cost for the judged corpus, 0.83-0.85 for the \
         mixed one, at every size; the limiter's part of that was 0.97-0.98. Taken out of the \
         program after that, all the accounting (segment-pair count, event limiter, counters) \
         was about 17 ns of a judged packet, and the connection table's filter probe about 10%. \
         `perf` on the JIT-compiled program then showed the filter's hash building each address \
         word from eight byte loads, and the IPv6 host lookups comparing keys the same way: read \
         as whole words (same hash values, same layouts), 0.93-0.97 and then 0.97-0.99 of the \
         cost. What is left is mostly map lookups: a judged packet makes about 23 inlined array \
         lookups (the slot, its settings, scratch, clock, the filter's state and line, the \
         quarantine flag, the headers and buckets of both addresses, the pair and the port, the \
         segment, the grant flag, and five per-CPU counters and limiter slots), each passing its \
         key through the stack. Reaching 50 ns needs fewer of them, which means merging maps \
         (the counters into one per-CPU value, the tables' masks into the slot's settings): a \
         change of map layout, which an upgrade with `--persist` cannot adopt without a gap. \
         Session 17, side by side with the build before (`--only per-packet --runs 10 \
         --baseline-object`): a segment-pair key now has two elements of its slot's table to \
         choose from before it falls back to the PAIR_VERDICTS hash (about 2% of 1,000 keys end \
         there, against 11% with one; the policies of 100k and 1M rules have 1,000 segments, \
         so their corpora count about 1,000 keys), 0.95-0.97 of the judged corpus's cost at \
         100k and 1M; and the programs read the interface, three dependent loads in XDP, only \
         for an event instead of for every packet. Together: 0.97 of the judged corpus's cost \
         at 10 and 1k, 0.92 at 100k, 0.91 at 1M; 0.97-1.00 of the mixed one's. Tried and not \
         kept (same method): the per-slot decision inlined into the entry program (1.00), and a \
         multilinear hash for the connection table's filter (1.00, although `perf` attributed some \
         13% of the decision's samples to the filter's chain of multiplies). The verifier now processes 288k \
         instructions per program (265k before; the verifier_budget test allows 350k). What \
         is left is the fixed cost described above: for the mixed corpus, 14 ns more than the \
         judged one at every size, mostly the kernel's connection hash that every tracked \
         flow's packet looks up (a call, and a jhash of the 40-byte key), which no exact-match \
         table can replace while packets on every CPU insert flows. The merges that would take \
         about six lookups out of a judged packet (the flags and the clock into one element, \
         the counters into one per-CPU value) change the maps' layout: `run --persist` of the \
         new build would refuse the pinned maps of the old one, and upgrading would take a \
         restart without them, a gap in enforcement. Not done for a few ns a packet. \
         Session 18 measured what the merges would be worth without making them: a build that \
         reads no slot index, no quarantine or grant flag and counts no drop by protocol (four \
         lookups fewer; a measurement, not a correct program) costs 0.94-0.97 of the judged \
         corpus's cost and 0.98-0.99 of the mixed one's (`--only per-packet --runs 10 \
         --baseline-object`), about 3 ns at 100k: the merges would not bring the mixed corpus \
         near 50 ns, and are still not worth a gap in enforcement. Reading the host table's \
         mask once for both addresses of a packet instead of once for each measured 1.01-1.05 \
         (not kept): one lookup fewer is within what a change of the code's layout moves. \
         Session 19 measured single frames with the 100k policy loaded by the daemon \
         (`bpftool prog run` of its XDP program, 5 million repeats, pinned): a denied new UDP \
         flow 70-71 ns, a tracked TCP flow's SYN, ACK or SYN-ACK 87-93 ns. A tracked packet \
         skips the policy lookups and the event, yet costs some 20 ns more: `perf` on the \
         tracked ACK puts 31% of the samples in the kernel's hash code (`htab_map_hash`, a \
         jhash of the 40-byte key, 16.5%; the bucket walk 11%; `memcmp` and the lookup wrapper \
         3%), about 27 ns. A 16-byte key for IPv4 flows would take two of jhash's three rounds \
         out; it, or a table the programs probe inline, changes the pinned connection table, \
         whose flows an upgrade must carry over. Parts of a judged denial, each taken out of the \
         program (`--only per-packet --quick --runs 10 --baseline-object`, not correct \
         programs): the event path (limiter and event) 0.88-0.92 of the cost, the segment-pair \
         count 0.98-1.05, the drop-by-protocol and rate-limited counters 0.95-0.99, a \
         direct-mapped limiter in place of the two-way one 0.96-0.97. Kept: the limiter's key \
         hashed and compared as five 8-byte words instead of nine 4-byte ones, 0.96-0.99, with \
         the same slot layout (a pinned limiter needs no migration). Session 20 put a per-CPU \
         flow cache in front of the connection table (`FLOW_CACHE`; `docs/design.md`, \
         \"Connection state\"): a CPU that has just found an established flow in the table \
         passes the flow's next packets for up to 100 ms from a direct-mapped entry of its own \
         (the key compared as five words, the policy generation, and an epoch the daemon moves \
         on after cutting flows), without the call into the kernel's hash; an entry passes only \
         what the table would pass, and it is not pinned, so an upgrade needs no migration. Side \
         by side with the build before (`--only per-packet --quick --runs 10 \
         --baseline-object`): 0.80 of the mixed corpus's cost at every size, 0.99-1.04 of the \
         judged one's, whose packets the filter sends past the cache. What is left above 50 ns \
         is the judged denial's fixed cost."
    } else if name.starts_with("e2e") {
        "Why: in front of a veth every frame is a different flow, so unlike the repeated frame \
         of BPF_PROG_TEST_RUN the maps are not in cache, and each lookup of a judged packet \
         costs a cache and TLB miss or two: the host tables of a 100k policy, the connection \
         table's filter, PAIRS, PAIR_VERDICTS, and the event limiter's slot. The parse-and-drop floor \
         touches no map. `perf` on the receiving CPU during the 100k enforcer arm (session 6, before \
         session 11's exact-match tables): 43% of its busy time in the hash bucket walk (`lookup_nulls_elem_raw`), spread about \
         evenly over five lookup sites, 9% in the program body, 8% in a trie walk. At 10 and 1k \
         rules, where the maps stay in cache, the gap is the fixed cost of the per-packet section. \
         Session 5 moved the enforcer from 0.24 to 0.3-0.4 of the floor at 10 and 1k rules; \
         session 6 removed the wildcard-table probe from most denials. Session 8 found the \
         nftables arms at 100k under-measured until then: the frames left in an arm's veth ring \
         are processed after its sample, and one NAPI poll of nftables' linear rules at 100k \
         rules holds the receive CPU for hundreds of milliseconds, which the arms measured next \
         lost (a `--quick` run reported 0.00 Mpps for most arms). Every sample now starts on an \
         idle receive CPU. With that, nftables' verdict maps (hash) at 100k rules run about as \
         fast as the enforcer on this path (0.59 against 0.56 Mpps in session 8's run; the \
         committed figure had been 0.28), where before they seemed half as fast; the enforcer \
         stayed about 1.7-1.9 times nftables' interval sets until session 10's filter (below). Both nftables arms are stateless \
         here (netdev ingress: no connection tracking, no events, no per-pair counters), while \
         every denial of the enforcer also checks its connection table, counts its segment \
         pair and takes an event limiter slot. Session 10's filter in front of the connection \
         table (see the per-packet figures) turns that check into one byte of a smaller array \
         for a flow that is not tracked: side by side with the build before it (`--only e2e \
         --baseline-object`, 10 runs), 1.10, 1.15 and 1.10 times its packet rate at 10, 1k and \
         100k rules. Session 11's exact-match tables (see the per-packet figures) read one \
         bucket where a hash read a bucket and then an element elsewhere, for both addresses, \
         the pair and the port: in three alternated `--only e2e --quick` runs of each build, the \
         enforcer at 100k rules went from 0.78, 0.84 and 0.84 to 1.09, 1.07 and 1.22 Mpps, and \
         its ratio to the floor at 10 rules from 0.33-0.37 to 0.47-0.56. What would close it: \
         fewer random memory accesses per judged packet, above all for denials, which this \
         benchmark sends exclusively (the event limiter's slot, the filter's \
         byte and the tables' buckets are each a miss at 100k); the 0.8 of the floor asks for \
         at most one or two per packet, and a denial has to look up both addresses at least. \
         Session 13's segment-pair tables (see the per-packet figures): 1.06, 1.09 and 1.07 \
         times the build before it at 10, 1k and 100k rules (`--only e2e --runs 5 \
         --baseline-object`). Session 14's inlined parser (see the per-packet figures): 1.04, \
         1.09 and 1.03 times the build before it (same method); the ratio to the floor did not \
         move, because the floor inlines the parser as well and gained as much. Session 15's \
         clock and event limiter (see the per-packet figures): 1.17, 1.11 and 0.99 times the \
         build before it at 10, 1k and 100k rules (`--only e2e --quick --runs 3 \
         --baseline-object`, noisy); the full runs before and after the session's changes give \
         0.60, 0.54 and 0.39 of the floor, then 0.66, 0.57 and 0.40. At 100k the cache misses \
         of the lookups dominate, and the clock's call was not among them. Session 16's full \
         run gave 0.65, 0.58 and 0.23 of the floor: at 100k the build before its change \
         measured the same that day (`--only e2e --quick`, two alternated runs of each build: \
         2.01 and 1.92 Mpps before, 2.05 and 1.98 after), and nftables' arms, which run none of \
         the enforcer's code, fell as far against session 15's run (verdict maps 1.48 to 0.89 \
         Mpps, interval sets 0.63 to 0.45): the machine's memory path was slower that day, not \
         the enforcer. Session 17's changes (see the per-packet figures): 1.00, 1.01 and 1.08 \
         times the build before at 10, 1k and 100k rules (`--only e2e --quick --runs 5 \
         --baseline-object`); its full run gives 0.67, 0.58 and 0.31 of the floor. At 10 rules \
         the floor takes about 102 ns a frame here: 0.8 of its rate leaves 25 ns for all a \
         denial does beyond parsing, where the program alone takes 43 ns more than the \
         parse-only program with every map in cache (section 1, judged corpus at 10 rules). \
         The target needs the per-packet work cut by more than half, not a faster lookup. \
         Session 18 profiled the 100k enforcer arm on the receiving CPU again (`perf record -C \
         0`, samples mapped to source lines through the program's jited line info): over \
         alternated runs of the floor and the enforcer, the enforcer's program took 30% of the \
         samples and the floor's 10%, and most of the rest went to veth, the page pool and its \
         lock, which every arm shares. Within the program most of the time goes to the first \
         read of a line of memory: about 24% at the pair and single-port buckets, 15% at the \
         two host buckets, 16% at the filter's line, and 19% at the parser's first reads of the \
         frame, which the floor makes too. Loading the host buckets and the filter's line \
         first, right after parsing, so that their misses overlap (volatile loads whose values \
         are not used): 0.94-1.01 of the build before at 10, 1k and 100k rules (`--only e2e \
         --quick --runs 5 --baseline-object`, two variants), not kept. The CPU already overlaps \
         what is independent; the pair's bucket waits for both hosts, and the port's for the \
         pair. The session's full run measured 0.44, 0.36 and 0.29 of the floor, with the floor \
         itself at 6.1 Mpps (9.6 in a full run earlier the same day, with the same programs): \
         full-length `--only e2e` runs an hour later gave the floor 6.3, 6.6 and 7.9 Mpps and \
         the enforcer 0.40, 0.38 and 0.56 of it, the same programs loaded from session 17's \
         last commit's object measured within 2-6% of this build's side by side, and `--quick` \
         runs gave 0.66, 0.58 and 0.38. On this shared machine the long samples vary with what \
         else runs on the host, the enforcer, whose misses go to memory, more than the floor; \
         compare builds side by side. Session 19 counted the events of the enforcer arms: at \
         100k rules about 39% of the frames produce one (sent, or lost once the ring buffer, \
         which no reader drains here, is full), because the 16,384 flows cycle through the \
         limiter's 16,384 slots in pairs, and a pair that three or more flows hash to reports \
         each of them every time it comes back; at 10 and 1k rules (40 and 4,000 flows) nearly \
         every frame is rate-limited. A build with no events at all measured 1.07, 1.05 and \
         1.23 times this one at 10, 1k and 100k rules (`--only e2e --quick --runs 5 \
         --baseline-object`), still 0.70, 0.61 and 0.47 of the floor: events are not what \
         keeps the target out of reach. Replacement policies that resist a cycle of flows \
         (simulated: keeping reported flows and recording a newcomer only now and then) at best \
         halve those events at 16,384 flows and let a flood of one new flow through as an event \
         per packet for a while, the case the limiter is for: not done. A build with no \
         segment-pair count: 1.01-1.02. The same session saw the machine switch between two \
         states every few minutes, whatever the sample length or options: eight `--only e2e \
         --runs 3` runs between 06:47 and 07:34 measured the enforcer at 10 rules at 0.59-0.71 \
         of the floor (6.1-6.8 Mpps) in some and 0.42-0.44 (2.6-2.8 Mpps) in others, with the \
         same build and 10 million frames a sample in both; the floor fell only from about 9.5 \
         to 6.3 Mpps. That the enforcer loses far more than the floor fits a neighbour on the \
         host sharing the core's caches: the floor touches almost no memory, the enforcer a \
         few dozen lines of maps a frame. A full run's median reflects how many of its runs \
         fall in the slow state."
    } else if name.starts_with("reload") {
        "Why: time to live is validation + compilation in user space (split in the section 3 \
         table) plus writing the maps. The writes were first batched (BPF_MAP_UPDATE_BATCH for \
         the host, pair and single-port hashes; the tries, which have no batch operation, hold \
         only subnets and port ranges), which took write+switch from 678 to 328 ms at 100k and from \
         6.3 to 2.7 s at 1M, with the benchmark pinned to one CPU; what was left of it then was \
         the kernel's hash insert, about 0.8 us for each of the 370k host, pair and single-port \
         entries of the 100k policy on this CPU. \
         Session 7 cut validation + compilation by about a fifth at 100k and a quarter at 1M \
         (side by side with the previous build, in one process on one CPU: 1218 to 989 ms, and \
         17.5 to 12.6 s): a faster hash for the compiler's maps (SipHash was a tenth of the \
         time), sorted vectors in place of ordered sets of hundreds of thousands of prefixes, \
         one pass over a port table's rules for all four protocols; the artifacts are \
         byte-identical. What is left (`perf`): YAML parsing is about a quarter, allocation a \
         fifth, the rest spread without a single hot spot. The daemon reads and parses the \
         segment files on every core (measured by hand in session 5: live 0.55-0.6 s after \
         reading the files on this machine when idle). What would close it: incremental \
         compilation of the segments that changed and segment and class ids that stay the same \
         across reloads, so that a reload writes only the entries that changed instead of the \
         whole policy; a faster YAML front end. Session 11 made the host, pair and single-port \
         maps arrays (see the per-packet figures) that the daemon writes through a memory \
         mapping, one copy of the whole table instead of a kernel insert per entry: write+switch \
         went from 324-345 ms to 61-81 ms at 100k in alternated `--only reload --quick` runs of \
         the two builds, so what is left of time to live is nearly all validation and \
         compilation. Session 14 measured what a cache of the files that did not change would \
         need (the benchmark's B is A plus one file, so it would skip nearly all parsing): the \
         validated 100k policy holds 46 MiB in 514k allocations (a counting allocator around \
         `Policy::from_sources`), so a cache in that form would take the daemon far past its 40 \
         MB; it needs a compact form of a read file (a few MiB), and compilation, about 150 ms of \
         the rest, still has to become incremental. Session 15 built that cache \
         (`policy_compiler::ReadCache`): each segment file read without an error, as a compact \
         byte encoding known by its path and SHA-256, 6.1 MiB for the 100k policy, and the \
         daemon and this benchmark read through it; validation of B after A went from about \
         235 to about 60 ms (a throw-away binary over the 100k policy, one CPU), and time to \
         live under 300 ms. What is left is compilation (about 135 ms) and the writes (about \
         40): a 1M-rule policy still takes seconds, and would need compilation made incremental \
         too. Session 18 made the benchmark time what the daemon does before its switch: it now \
         includes naming the new generation for the event namer, which took the daemon 10.7 ms \
         at 100k rules with a string per rule id shared through a hash map and takes 0.6 ms \
         with the ids in one string, and no longer includes dropping the validated policy, \
         which the daemon does after the switch."
    } else if name.starts_with("events") {
        "Why: two ends bound the live-frames figure, and on this shared 2-CPU VM either can be \
         the slower from one run to the next. The kernel side: the generator, the veth transmit \
         and the enforcer's denial (connection-table miss, policy lookups, the segment-pair count, the \
         limiter slot, the ring-buffer copy) share one CPU; it ran at 0.85 to 1.2M denied \
         packets/s in session 6's runs of the same build. The reader, on the other CPU: each \
         event crosses between the CPUs' caches, is named (`EventNamer::name`) and written as \
         a JSON line. Session 5 raised the kernel side from about 0.56M/s (the LRU limiter's \
         insert and eviction were a sixth of the time; events now leave with one \
         `bpf_ringbuf_output`). Session 6 found the reader the bound once the kernel side got \
         faster (9% of events lost): `serde_json` spent a third of its time escaping the 30 \
         keys and values of each event. `FlowEvent::write_json_line` (used by the flow log, \
         the event stream and this benchmark) writes the same bytes, tested against \
         `serde_json`, without that; losses fell to 1-2% of events. What would close it: fewer \
         map operations per denial, as for the per-packet cost; naming events without \
         allocating (a `FlowEvent` holds ten owned strings); the BPF_PROG_TEST_RUN figures are \
         bounded by one syscall per packet. In session 7's `perf` of the kernel side, half of \
         the time in hash bucket walks was the connection-table probe: the live frames' 262,144 \
         flows spread over the 1M buckets (16 MiB) of the table that every benchmark policy \
         configures, 4 times the product's default of 262,144 entries. A denial cannot skip \
         it blindly (a packet the policy denies may belong to a tracked flow: a reply, or a \
         flow a break-glass grant admitted); session 10's filter in front of the table skips it \
         when the flow's byte proves it untracked. With it the kernel side reached 1.16-1.48M \
         denied packets/s in session 10's three full runs (`--only events`, and the full \
         benchmark), and 1.05-1.32M events/s were delivered: the reader is the bound again, \
         and 5-13% of events were lost (counted); `--quick` runs of the same build gave \
         0.93-0.95M/s."
    } else if name.starts_with("daemon") {
        "Why: the daemon keeps only the outline of the policy in force and returns the compiler's \
         heap to the system after every load (`malloc_trim`, one malloc arena); VmHWM, the peak \
         while compiling, stays well above the resident figure. Session 18 found the figure \
         uneven from start to start with two arenas (37 to 57 MB in six starts): which arena \
         the parser's threads allocated the kept read cache in decided how much of the second \
         one stayed fragmented. One arena keeps every start near the same figure, for a \
         start about 0.1-0.2 s slower; and the rule ids the event namer keeps, 100k strings \
         of their own, are one string with offsets (about 1 MiB instead of 5)."
    } else {
        ""
    }
}

/// The value and ratio of figure `name`, if this run measured it.
fn figure(figures: &[Figure], name: &str) -> Option<(f64, Option<f64>)> {
    figures
        .iter()
        .find(|f| f.name == name)
        .map(|f| (f.value, f.ratio))
}

/// The lowest and highest value of the figures named `name(size)` for every policy size.
fn span(figures: &[Figure], name: impl Fn(u32) -> String) -> Option<(f64, f64)> {
    let values = [10, 1_000, 100_000, 1_000_000]
        .map(|size| figure(figures, &name(size)).map(|(value, _)| value));
    let values: Vec<f64> = values.into_iter().collect::<Option<_>>()?;
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((low, high))
}

/// A few sentences ahead of a family's history: where it stands in this run, why, and what
/// would close it. `None` when this run lacks a figure it quotes.
fn summary(family: &str, figures: &[Figure]) -> Option<String> {
    let minus_empty = |corpus: &'static str| {
        span(figures, move |size| {
            format!("per_packet_{corpus}_{size}_enforcer_minus_empty")
        })
    };
    // The enforcer's cost above the parse-only program, judged corpus at 10 rules.
    let above_parsing = || {
        let (enforcer, ratio) = figure(figures, "per_packet_judged_10_enforcer")?;
        Some(enforcer - enforcer / ratio?)
    };
    if family == "per" {
        let (judged_low, judged_high) = minus_empty("judged")?;
        let (mixed_low, mixed_high) = minus_empty("mixed")?;
        let flat = figure(figures, "per_packet_judged_1M_vs_1k")?.1?;
        let judged_100k = figure(figures, "per_packet_judged_100000_enforcer_minus_empty")?.0;
        Some(format!(
            "In short: the cost does not grow with the policy (the judged corpus at 1M costs \
             {flat:.2} times what it costs at 1k), but it is a fixed {judged_low:.0}-{judged_high:.0} \
             ns above the empty program for a judged packet and {mixed_low:.0}-{mixed_high:.0} ns \
             for the mixed corpus at every size, against 50. It is spread over about 23 inlined \
             map lookups per judged packet (settings, scratch memory, clock, the connection \
             table's filter, both addresses, the segment pair and its port, counters, the event \
             limiter); no single part is the excess (the profiles below). The tracked flows of \
             the mixed corpus (three frames in four) mostly pass from the per-CPU flow cache in \
             front of the connection table (session 20), so the mixed corpus costs {compared} \
             the judged one. What would close it: a judged denial {cut:.0}% cheaper at 100k, from \
             fewer maps per packet (the flags, the clock and the counters merged, a change of \
             map layout that a `--persist` upgrade cannot adopt without a gap today; four \
             lookups fewer measured about 3 ns) and a cheaper event path (about a tenth of a \
             denial, nearly all of it the rate limiter's probe).",
            cut = (100.0 * (1.0 - 50.0 / judged_100k)).max(0.0),
            compared = if mixed_high < judged_low {
                "less than"
            } else {
                "about as much as"
            },
        ))
    } else if family == "e2e" {
        let ratios = [10, 1_000, 100_000]
            .map(|size| figure(figures, &format!("e2e_enforcer_{size}_mpps")).and_then(|f| f.1));
        let [Some(r10), Some(r1k), Some(r100k)] = ratios else {
            return None;
        };
        let (enforcer_10, _) = figure(figures, "e2e_enforcer_10_mpps")?;
        let floor_ns = 1_000.0 * r10 / enforcer_10;
        let above_parsing = above_parsing()?;
        Some(format!(
            "In short: the enforcer delivers {r10:.2}, {r1k:.2} and {r100k:.2} of the \
             parse-and-drop floor's rate at 10, 1k and 100k rules, against 0.8. The floor \
             takes about {floor_ns:.0} ns a frame, so 0.8 of its rate leaves {budget:.0} ns for \
             everything a denial does beyond parsing, where the program alone costs \
             {above_parsing:.0} ns more than the parse-only program with every map in cache \
             (section 1, judged corpus at 10 rules). At 100k rules every frame is a new flow \
             whose table lines are not in cache, and the reads that miss depend on one another: \
             the segment pair's bucket waits for both hosts', the port's for the pair's. The \
             floor ran at {floor_mpps:.1} Mpps in this run; on this shared machine it reaches \
             about 9.5 Mpps when nothing contends for the core, and the enforcer then about 0.6-0.7 \
             of it at 10 rules (session 19, below). What would close it: the per-packet work cut \
             by more than half, and fewer dependent table reads for a new flow.",
            budget = floor_ns / 0.8 - floor_ns,
            floor_mpps = 1_000.0 / floor_ns,
        ))
    } else {
        None
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
            if let Some(summary) = summary(family, figures) {
                let _ = writeln!(text, "{summary}\n");
            }
            let _ = writeln!(text, "{}\n", explanation(family));
        }
    }
    Section {
        title: "Targets missed: by how much, why, and what would close it".to_string(),
        text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_packet(figures: &mut Vec<Figure>) {
        for (corpus, base) in [("judged", 50.0), ("mixed", 70.0)] {
            for (i, size) in [10, 1_000, 100_000, 1_000_000].into_iter().enumerate() {
                let name = format!("per_packet_{corpus}_{size}_enforcer_minus_empty");
                figures.push(Figure::new(name, base + i as f64, "ns").vs("empty", 3.0));
            }
        }
        figures.push(Figure::new("per_packet_judged_1M_vs_1k", 90.0, "ns").vs("1k", 1.09));
        // 80 ns, twice the parse-only program: 40 ns above it.
        figures.push(Figure::new("per_packet_judged_10_enforcer", 80.0, "ns").vs("parse", 2.0));
    }

    #[test]
    fn the_per_packet_summary_quotes_this_runs_spans() {
        let mut figures = Vec::new();
        per_packet(&mut figures);
        let text = summary("per", &figures).expect("every figure is there");
        assert!(text.contains("costs 1.09 times"), "{text}");
        assert!(text.contains("a fixed 50-53 ns"), "{text}");
        assert!(text.contains("and 70-73 ns for the mixed corpus"), "{text}");
        // 52 ns at 100k: 50 is 4% less.
        assert!(
            text.contains("a judged denial 4% cheaper at 100k"),
            "{text}"
        );
    }

    #[test]
    fn the_end_to_end_summary_derives_the_floor_and_the_budget() {
        let mut figures = Vec::new();
        per_packet(&mut figures);
        // 5 Mpps at half the floor's rate: the floor is 10 Mpps, 100 ns a frame.
        for (size, ratio) in [(10, 0.5), (1_000, 0.4), (100_000, 0.3)] {
            let name = format!("e2e_enforcer_{size}_mpps");
            let value = if size == 10 { 5.0 } else { 1.0 };
            figures.push(Figure::new(name, value, "Mpps").vs("floor", ratio));
        }
        let text = summary("e2e", &figures).expect("every figure is there");
        assert!(text.contains("delivers 0.50, 0.40 and 0.30"), "{text}");
        assert!(text.contains("about 100 ns a frame"), "{text}");
        assert!(text.contains("leaves 25 ns"), "{text}");
        assert!(text.contains("ran at 10.0 Mpps"), "{text}");
        assert!(text.contains("alone costs 40 ns more"), "{text}");
    }

    #[test]
    fn a_run_without_a_quoted_figure_has_no_summary() {
        let mut figures = Vec::new();
        per_packet(&mut figures);
        figures.retain(|f| f.name != "per_packet_mixed_1000_enforcer_minus_empty");
        assert!(summary("per", &figures).is_none());
        assert!(summary("e2e", &figures).is_none());
        assert!(summary("reload", &figures).is_none());
    }
}
