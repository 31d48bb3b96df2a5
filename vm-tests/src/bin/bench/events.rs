//! 4. Events: packets per second through `BPF_PROG_TEST_RUN` at 0%, 1%, 10% and 100% denied,
//!    and flow events per second delivered as JSON lines by a reader on the other CPU (read
//!    from the ring buffer as the daemon does, named with `EventNamer`, serialized with
//!    `FlowEvent::write_json_line` as the flow log and the event stream do).
use std::{
    fmt::Write as _,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::{
    EbpfLoader,
    maps::{MapData, RingBuf},
    programs::Xdp,
};
use enforcer::{
    Enforcer,
    events::{EventNamer, PolicyNames},
};
use enforcer_common::{
    BenchFlow, Event, bench, counter, direction, event_counter, map_names, program_names,
};
use vm_tests::packet_builder::{self, PacketSpec, TCP_RST, Transport};

use crate::{
    Options,
    common::{Netns, Parking, median, other_cpu, pin_to, run_once},
    e2e::{frame, inject, mac, mac_text, write_flows, xdp_md},
    policy,
    report::{Figure, Report, Section},
};

const FRACTIONS: [u32; 4] = [0, 1, 10, 100];

pub fn run(opts: &Options, report: &mut Report) -> Result<()> {
    let p = policy::generate(1_000, true, 0, false);
    let artifact = p.compile()?;
    let mut enforcer = Enforcer::load(&artifact)?;
    crate::common::enable_flow_filter(&mut enforcer)?;
    let mut parking = Parking::new("events")?;
    parking.park(enforcer.ebpf_mut(), program_names::XDP_INGRESS)?;
    let ring = enforcer.take_events().context("event ring buffer")?;
    let namer = namer_for(&enforcer, &artifact);

    // Distinct flows (source, destination, port): far more than the event rate limiter's
    // slots, so a flow's slot is taken by others before the flow comes round again.
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

    let reader = Reader::spawn(ring, namer)?;
    let delivered = reader.delivered.clone();

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
    reader.stop()?;
    result?;

    let mut text = String::new();
    let _ = writeln!(
        text,
        "Method: a policy of 1k prefixes and rules; for each denied share a corpus of \
         {frames_per_corpus} frames (TCP RST, so every packet is judged and none creates \
         connection state; allowed ones on a rule's port, denied ones on one of 10,000 ports no \
         rule allows, so the corpus holds far more distinct flows than the event rate limiter's \
         16,384 slots per CPU and nearly every denial is reported). The corpus is run through the \
         enforcer's XDP program with `BPF_PROG_TEST_RUN`, one packet per call (repeat would \
         replay one flow, which the limiter reports once a second), on CPU {}. A reader thread \
         on CPU {} drains the ring buffer as `enforcer/src/daemon.rs` does, names each event \
         with `EventNamer` and serializes the `FlowEvent` as a JSON line (`write_json_line`, as the flow log and \
         the event stream do; counted, then discarded). Events/s = events delivered / time from the first packet until the \
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
        report.figures.push(Figure::new(
            format!("events_{pct}pct_denied_delivered"),
            eps,
            "events/s",
        ));
        report.figures.push(Figure::new(
            format!("events_{pct}pct_denied_lost"),
            *lost as f64,
            "events",
        ));
    }
    live(opts, report, &mut text)?;
    report.sections.push(Section {
        title: "4. Flow events".to_string(),
        text,
    });
    Ok(())
}

/// The kernel's event counters (sent, lost, rate-limited), summed over CPUs.
fn event_counters(e: &Enforcer) -> Result<[u64; 3]> {
    let array: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(e.ebpf().map(map_names::EVENT_COUNTERS).context("map")?)?;
    let mut sums = [0u64; 3];
    for (i, sum) in sums.iter_mut().enumerate() {
        *sum = array.get(&(i as u32), 0)?.iter().sum();
    }
    Ok(sums)
}

/// A thread on the other CPU that drains the ring buffer as `enforcer/src/daemon.rs` does,
/// names each event with `EventNamer` and serializes it as a JSON line (counted, discarded).
struct Reader {
    delivered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Result<()>>,
}

impl Reader {
    fn spawn(mut ring: RingBuf<MapData>, namer: EventNamer) -> Result<Self> {
        let delivered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (delivered, stop) = (delivered.clone(), stop.clone());
            thread::spawn(move || -> Result<()> {
                pin_to(other_cpu())?;
                let mut out = Vec::with_capacity(1 << 20);
                while !stop.load(Ordering::Relaxed) {
                    let mut got = 0;
                    while let Some(item) = ring.next() {
                        if item.len() >= size_of::<Event>() {
                            // SAFETY: the kernel wrote an `Event` there; read unaligned.
                            let event = unsafe { (item.as_ptr() as *const Event).read_unaligned() };
                            namer
                                .name(&event, "bench0".into())
                                .write_json_line(&mut out);
                            got += 1;
                        }
                    }
                    if got == 0 {
                        thread::sleep(Duration::from_micros(50));
                    }
                    // The JSON output: counted, then discarded.
                    out.clear();
                    delivered.fetch_add(got, Ordering::Relaxed);
                }
                Ok(())
            })
        };
        Ok(Reader {
            delivered,
            stop,
            thread,
        })
    }

    fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?
    }
}

fn namer_for(enforcer: &Enforcer, artifact: &policy_compiler::Artifact) -> EventNamer {
    let mut namer = EventNamer::new();
    namer.add_policy(Arc::new(PolicyNames::of(enforcer.generation(), artifact)));
    namer
}

/// Distinct denied flows for the live measurement: far more than the event rate limiter's
/// slots, so a flow's slot is taken before it comes round again and every denial is reported,
/// as in a scan.
const LIVE_FLOWS: usize = 262_144;

/// Denials of distinct flows arriving on a veth, every one reported: the kernel side (the
/// generator and the enforcer, in the same softirq) on one CPU, the reader on the other.
fn live(opts: &Options, report: &mut Report, text: &mut String) -> Result<()> {
    let p = policy::generate(1_000, false, 0, false);
    let artifact = p.compile()?;
    let mut enforcer = Enforcer::load(&artifact)?;
    crate::common::enable_flow_filter(&mut enforcer)?;
    let namer = namer_for(&enforcer, &artifact);
    let ring = enforcer.take_events().context("event ring buffer")?;
    let netns = Netns::create("evl")?;
    netns.ip_batch(&[
        "link set lo up".to_string(),
        format!(
            "link add gen0 address {} type veth peer name rx0 address {}",
            mac_text(mac(1, 0)),
            mac_text(mac(2, 0))
        ),
        "link set gen0 up".to_string(),
        "link set rx0 up".to_string(),
    ])?;
    netns.run(|| enforcer.attach("rx0"))??;
    let mut generator = EbpfLoader::new()
        .map_max_entries(bench::FLOWS, LIVE_FLOWS as u32)
        .load(enforcer::loader::ebpf_object())
        .context("loading the benchmark programs")?;
    crate::common::load_xdp(&mut generator, bench::TX)?;
    // A UDP port no rule allows (rule ports are 1024-41023), different per round of sources.
    let flows: Vec<BenchFlow> = (0..LIVE_FLOWS)
        .map(|i| {
            let a = i % p.size;
            let mut b = (i.wrapping_mul(40_503) + 7) % p.size;
            while p.segment_of(b) == p.segment_of(a) {
                b = (b + 1) % p.size;
            }
            let (IpAddr::V4(src), IpAddr::V4(dst)) = (p.hosts[a], p.hosts[b]) else {
                unreachable!("the live events policy is IPv4 only")
            };
            BenchFlow {
                src: src.octets(),
                dst: dst.octets(),
                dport: (45_000 + (i / p.size) as u16).to_be_bytes(),
                _pad: [0; 2],
            }
        })
        .collect();
    write_flows(&mut generator, &flows, LIVE_FLOWS)?;
    let gen_ifindex = netns.run(|| {
        let name = std::ffi::CString::new("gen0").unwrap();
        // SAFETY: valid NUL-terminated name.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    })?;
    let reader = Reader::spawn(ring, namer)?;
    let packets: u32 = if opts.quick { 300_000 } else { 2_000_000 };
    let data = frame(mac(1, 0), mac(2, 0));
    let ctx = xdp_md(gen_ifindex);
    let tx: &Xdp = crate::common::xdp(&generator, bench::TX)?;
    let (mut eps, mut pps) = (Vec::new(), Vec::new());
    let (mut lost, mut limited, mut sent_total) = (0u64, 0u64, 0u64);
    let result = (|| -> Result<()> {
        for _ in 0..opts.runs {
            let before = event_counters(&enforcer)?;
            let denied_before =
                enforcer.counter(direction::INGRESS, counter::DROP_POLICY_DENIED)?;
            let delivered_before = reader.delivered.load(Ordering::Relaxed);
            let started = Instant::now();
            inject(tx, &netns, &data, &ctx, packets)?;
            let injected_in = started.elapsed();
            let after = event_counters(&enforcer)?;
            let sent = after[event_counter::SENT as usize] - before[event_counter::SENT as usize];
            while reader.delivered.load(Ordering::Relaxed) - delivered_before < sent
                && started.elapsed() < injected_in + Duration::from_secs(5)
            {
                thread::sleep(Duration::from_micros(100));
            }
            let took = started.elapsed();
            let got = reader.delivered.load(Ordering::Relaxed) - delivered_before;
            let denied =
                enforcer.counter(direction::INGRESS, counter::DROP_POLICY_DENIED)? - denied_before;
            eps.push(got as f64 / took.as_secs_f64());
            pps.push(denied as f64 / injected_in.as_secs_f64());
            sent_total += sent;
            lost += after[event_counter::LOST as usize] - before[event_counter::LOST as usize];
            limited += after[event_counter::RATE_LIMITED as usize]
                - before[event_counter::RATE_LIMITED as usize];
        }
        Ok(())
    })();
    reader.stop()?;
    result?;
    drop(enforcer);
    drop(netns);
    let (eps, pps) = (median(&eps), median(&pps));
    let _ = writeln!(
        text,
        "\n**Live frames** (the figure with the target): the generator of section 2 \
         (`bench_tx`, `BPF_F_TEST_XDP_LIVE_FRAMES`) sends {packets} 64-byte UDP frames per run \
         into a veth pair whose other end runs the enforcer (native XDP, a 1k-rule IPv4 \
         policy); the frames cycle through {LIVE_FLOWS} distinct denied flows (source, \
         destination, port), far more than the event rate limiter's slots, so each denial \
         takes a limiter slot and is an event, as in a scan. Receive NAPI is not threaded, so the \
         enforcer runs in the softirq of the generator's CPU ({}); the reader of section 4 \
         runs on CPU {}. Events/s = events delivered as JSON lines / time from the first frame \
         until the reader has delivered every event the kernel sent. {} runs.\n\n\
         | denied packets/s | events/s delivered | events sent | events lost | rate-limited |\n|---|---|---|---|---|\n\
         | {pps:.0} | {eps:.0} | {sent_total} | {lost} | {limited} |",
        crate::common::bench_cpu(),
        other_cpu(),
        opts.runs,
    );
    report.figures.push(
        Figure::new("events_live_100pct_denied_delivered", eps, "events/s")
            .vs("target 1,000,000 events/s", eps / 1e6)
            .target("≥ 1,000,000 events/s delivered, loss counted", eps >= 1e6),
    );
    report.figures.push(Figure::new(
        "events_live_100pct_denied_lost",
        lost as f64,
        "events",
    ));
    Ok(())
}
