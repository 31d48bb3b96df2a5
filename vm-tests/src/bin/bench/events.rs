//! 4. Events: packets per second through `BPF_PROG_TEST_RUN` at 0%, 1%, 10% and 100% denied,
//!    and flow events per second delivered as JSON lines by a reader on the other CPU (read
//!    from the ring buffer as the daemon does, named with `EventNamer`, serialized with serde).
use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use enforcer::{
    Enforcer,
    events::{EventNamer, PolicyNames},
};
use enforcer_common::{Event, event_counter, map_names, program_names};
use vm_tests::packet_builder::{self, PacketSpec, TCP_RST, Transport};

use crate::{
    Options,
    common::{Parking, median, other_cpu, pin_to, run_once},
    policy,
    report::{Figure, Report, Section},
};

const FRACTIONS: [u32; 4] = [0, 1, 10, 100];

pub fn run(opts: &Options, report: &mut Report) -> Result<()> {
    let p = policy::generate(1_000, true, 0, false);
    let artifact = p.compile()?;
    let mut enforcer = Enforcer::load(&artifact)?;
    let mut parking = Parking::new("events")?;
    parking.park(enforcer.ebpf_mut(), program_names::XDP_INGRESS)?;
    let mut ring = enforcer.take_events().context("event ring buffer")?;
    let mut namer = EventNamer::new();
    namer.add_policy(Arc::new(PolicyNames {
        generation: enforcer.generation(),
        revision: artifact.revision.clone(),
        segments: artifact.segments.iter().map(|s| s.name.clone()).collect(),
        rules: artifact.rule_ids().into_iter().map(Arc::from).collect(),
    }));

    // Distinct flows (source, destination, port): more than the 65,536 entries of the event
    // rate limiter, so a flow's entry is evicted before the flow comes round again.
    let frames_per_corpus = if opts.quick { 70_000 } else { 200_000 };
    let tcp_rules: Vec<_> = p.rules.iter().filter(|r| r.tcp).collect();
    let build = |i: usize, denied: bool| {
        let rule = tcp_rules[i % tcp_rules.len()];
        // TCP RST: judged every time, never creates connection state. (rule, port) differs for
        // every frame of a corpus.
        let port = if denied {
            50_000 + ((i / tcp_rules.len()) % 10_000) as u16
        } else {
            rule.port
        };
        let spec = PacketSpec::new(
            p.hosts[rule.from],
            p.hosts[rule.to],
            Transport::tcp(40_000, port, TCP_RST),
        );
        packet_builder::build(&spec).0
    };
    let corpora: Vec<Vec<Vec<u8>>> = FRACTIONS
        .iter()
        .map(|&pct| {
            (0..frames_per_corpus)
                .map(|i| build(i, (i % 100) < pct as usize))
                .collect()
        })
        .collect();

    let delivered = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (delivered, bytes, stop) = (delivered.clone(), bytes.clone(), stop.clone());
        thread::spawn(move || -> Result<()> {
            pin_to(other_cpu())?;
            let mut out = Vec::with_capacity(1 << 20);
            while !stop.load(Ordering::Relaxed) {
                let mut got = 0;
                while let Some(item) = ring.next() {
                    if item.len() >= size_of::<Event>() {
                        // SAFETY: the kernel wrote an `Event` there; read unaligned.
                        let event = unsafe { (item.as_ptr() as *const Event).read_unaligned() };
                        serde_json::to_writer(&mut out, &namer.name(&event, "bench0".into()))?;
                        out.push(b'\n');
                        got += 1;
                    }
                }
                if got == 0 {
                    thread::sleep(Duration::from_micros(50));
                }
                // The JSON output: counted, then discarded.
                bytes.fetch_add(out.len() as u64, Ordering::Relaxed);
                out.clear();
                delivered.fetch_add(got, Ordering::Relaxed);
            }
            Ok(())
        })
    };

    let event_counters = |e: &Enforcer| -> Result<[u64; 3]> {
        let array: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(
            e.ebpf().map(map_names::EVENT_COUNTERS).context("map")?,
        )?;
        let mut sums = [0u64; 3];
        for (i, sum) in sums.iter_mut().enumerate() {
            *sum = array.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(sums)
    };

    // samples[fraction] = (pps, events/s, lost, rate limited)
    let mut samples = vec![(Vec::new(), Vec::new(), 0u64, 0u64); FRACTIONS.len()];
    let program = enforcer.xdp_program()?;
    let result = (|| -> Result<()> {
        for run in 0..opts.runs {
            for k in 0..FRACTIONS.len() {
                let f = (k + run) % FRACTIONS.len();
                let before = event_counters(&enforcer)?;
                let delivered_before = delivered.load(Ordering::Relaxed);
                let started = Instant::now();
                for frame in &corpora[f] {
                    run_once(program, frame)?;
                }
                let judged_in = started.elapsed();
                let after = event_counters(&enforcer)?;
                let sent =
                    after[event_counter::SENT as usize] - before[event_counter::SENT as usize];
                // Wait until the reader has delivered every event sent (or give up after 5 s).
                while delivered.load(Ordering::Relaxed) - delivered_before < sent
                    && started.elapsed() < judged_in + Duration::from_secs(5)
                {
                    thread::sleep(Duration::from_micros(100));
                }
                let took = started.elapsed();
                let got = delivered.load(Ordering::Relaxed) - delivered_before;
                let s = &mut samples[f];
                s.0.push(corpora[f].len() as f64 / judged_in.as_secs_f64());
                s.1.push(got as f64 / took.as_secs_f64());
                s.2 += after[event_counter::LOST as usize] - before[event_counter::LOST as usize];
                s.3 += after[event_counter::RATE_LIMITED as usize]
                    - before[event_counter::RATE_LIMITED as usize];
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    result?;

    let mut text = String::new();
    let _ = writeln!(
        text,
        "Method: a policy of 1k prefixes and rules; for each denied share a corpus of \
         {frames_per_corpus} frames (TCP RST, so every packet is judged and none creates \
         connection state; allowed ones on a rule's port, denied ones on one of 10,000 ports no \
         rule allows, so the corpus holds more distinct flows than the 65,536-entry event rate \
         limiter remembers and nearly every denial is reported). The corpus is run through the \
         enforcer's XDP program with `BPF_PROG_TEST_RUN`, one packet per call (repeat would \
         replay one flow, which the limiter reports once a second), on CPU {}. A reader thread \
         on CPU {} drains the ring buffer as `enforcer/src/daemon.rs` does, names each event \
         with `EventNamer` and serializes the `FlowEvent` as a JSON line (counted, then \
         discarded). Events/s = events delivered / time from the first packet until the \
         reader has delivered every event the kernel sent. Lost = the kernel's `lost` counter \
         (ring buffer full). {} runs, shares rotated. Packets per second here include one \
         syscall per packet, which bounds the event rate too. At 1% and 10% the denied flows \
         of a corpus come round again within the one-second interval in later runs and are \
         rate-limited (counted, as designed); at 100% the corpus has more flows than the \
         limiter holds.\n",
        crate::common::bench_cpu(),
        other_cpu(),
        opts.runs,
    );
    let _ = writeln!(
        text,
        "| denied | packets/s | events/s delivered | events lost | rate-limited |\n|---|---|---|---|---|"
    );
    for (f, &pct) in FRACTIONS.iter().enumerate() {
        let (pps, eps, lost, limited) = &samples[f];
        let (pps, eps) = (median(pps), median(eps));
        let _ = writeln!(
            text,
            "| {pct}% | {pps:.0} | {eps:.0} | {lost} | {limited} |"
        );
        report.figures.push(
            Figure::new(format!("events_{pct}pct_denied_pps"), pps, "packets/s")
                .vs("0% denied (ratio: this / 0%)", pps / median(&samples[0].0)),
        );
        let mut figure = Figure::new(format!("events_{pct}pct_denied_delivered"), eps, "events/s");
        if pct == 100 {
            figure = figure
                .vs("target 1,000,000 events/s", eps / 1e6)
                .target("≥ 1,000,000 events/s delivered, loss counted", eps >= 1e6);
        }
        report.figures.push(figure);
        report.figures.push(Figure::new(
            format!("events_{pct}pct_denied_lost"),
            *lost as f64,
            "events",
        ));
    }
    report.sections.push(Section {
        title: "4. Flow events".to_string(),
        text,
    });
    Ok(())
}
