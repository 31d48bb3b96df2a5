//! Time, for the daemon and the kernel programs alike: CLOCK_MONOTONIC_COARSE, which advances
//! once per timer tick. The programs compute it from the jiffies counter
//! (`enforcer_common::Clock`), without a helper call; this module calibrates that computation
//! by running the never-attached probe program, which reads both, with `BPF_PROG_TEST_RUN`.
//!
//! A calibration that fails leaves the clock uncalibrated, and the programs then read the coarse
//! clock with the helper: slower, never wrong, and never a reason not to enforce.
use std::time::{Duration, Instant};

use aya::{
    Ebpf,
    maps::{Array, MapError},
    programs::{ProgramError, TestRun as _, TestRunOptions, Xdp},
};
use enforcer_common::{Clock, map_names, program_names};
use thiserror::Error;

/// How long the programs' clock can lag [`monotonic_now_ns`]: after an idle period, jiffies
/// catch up in whole ticks while the coarse clock takes the time of the catch-up, up to one tick
/// (10 ms at the slowest usual `CONFIG_HZ`, 100) later. Twice that, for margin.
pub const KERNEL_LAG_NS: u64 = 20_000_000;

/// Sampling for a calibration lasts at least this long and sees at least [`MIN_TICKS`] ticks.
const MIN_SPAN: Duration = Duration::from_millis(30);
const MIN_TICKS: u64 = 4;
/// ... and gives up after this long.
const MAX_SPAN: Duration = Duration::from_millis(300);
/// The `CONFIG_HZ` choices of the kernel's `Kconfig.hz`. Any other tick leaves the clock
/// uncalibrated.
const KNOWN_HZ: [u64; 4] = [100, 250, 300, 1000];
/// How far, as a share of the tick, a reading's offset may be from the steady offset, or from a
/// whole tick off it, to count as such. Under a wrong tick the offset moves by at least a sixth
/// of a tick per tick (250 against 300 HZ).
const PHASE_TOLERANCE: f64 = 0.1;
/// The share of readings that must be steady: under a wrong tick only those of a tick or two of
/// the at least [`MIN_TICKS`] are. Under TCG with both host CPUs busy, a third of the readings
/// were a tick off.
const MIN_STEADY_SHARE: f64 = 0.5;
/// The share of readings that must be steady or a whole tick off.
const MIN_ON_GRID_SHARE: f64 = 0.95;
/// Samples taken to check the offset of a calibrated clock.
const CHECK_SAMPLES: usize = 3;

#[derive(Debug, Error)]
pub enum ClockError {
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("running the clock probe failed: {0}")]
    Program(#[from] ProgramError),
    #[error("writing the clock map failed: {0}")]
    Map(#[from] MapError),
    #[error("the clock probe wrote {0} bytes, not 16")]
    ShortProbe(usize),
    #[error("jiffies advanced {ticks} ticks during sampling, too few to measure a tick")]
    TooFewTicks { ticks: u64 },
    #[error(
        "no known CONFIG_HZ (100, 250, 300, 1000) explains the readings: at best {best_hz}, \
         under which {steady_percent:.0}% of them were steady and {on_grid_percent:.0}% steady \
         or a whole tick off"
    )]
    UnknownTick {
        best_hz: u64,
        steady_percent: f64,
        on_grid_percent: f64,
    },
}

/// CLOCK_MONOTONIC_COARSE, in ns: the daemon's clock, and the kernel programs' (see
/// [`KERNEL_LAG_NS`] for how far theirs can lag it). Reading the fine CLOCK_MONOTONIC here
/// instead would put the daemon up to a tick ahead of the kernel, and a sweep could remove a flow
/// the kernel still counts live.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

/// One reading of the probe: the coarse clock, then jiffies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub coarse_ns: u64,
    pub jiffies: u64,
}

/// Loads the probe program (if it is not yet), calibrates the clock and writes it for the
/// programs. A measurement the timer disturbed is taken again, twice at most.
pub fn calibrate(ebpf: &mut Ebpf) -> Result<Clock, ClockError> {
    load_probe(ebpf)?;
    let mut fitted = fit(&sample_ticks(probe_program(ebpf)?)?);
    for _ in 0..2 {
        if fitted.is_ok() {
            break;
        }
        fitted = fit(&sample_ticks(probe_program(ebpf)?)?);
    }
    let clock = fitted?;
    write(ebpf, clock)?;
    Ok(clock)
}

/// Readings of the probe for at least [`MIN_SPAN`] and [`MIN_TICKS`] ticks.
fn sample_ticks(probe: &Xdp) -> Result<Vec<Sample>, ClockError> {
    let started = Instant::now();
    let mut samples = Vec::new();
    loop {
        let sample = read(probe)?;
        samples.push(sample);
        let ticks = sample.jiffies.wrapping_sub(samples[0].jiffies);
        let elapsed = started.elapsed();
        if (elapsed >= MIN_SPAN && ticks >= MIN_TICKS) || elapsed >= MAX_SPAN {
            return Ok(samples);
        }
    }
}

/// Re-measures the offset of the clock in force and corrects it when it has drifted by more
/// than two ticks (jiffies follow the monotonic clock in whole ticks on tickless kernels, so
/// this is for the rare periodic-tick timer that does not). Does nothing to an uncalibrated
/// clock.
pub fn check(ebpf: &mut Ebpf) -> Result<(), ClockError> {
    let clock = read_map(ebpf)?;
    if clock.tick_ns == 0 {
        return Ok(());
    }
    let probe = probe_program(ebpf)?;
    let samples = (0..CHECK_SAMPLES)
        .map(|_| read(probe))
        .collect::<Result<Vec<_>, _>>()?;
    let offset_ns = offset(&samples, clock.tick_ns);
    let drift = (offset_ns.wrapping_sub(clock.offset_ns) as i64).unsigned_abs();
    if drift <= 2 * clock.tick_ns {
        return Ok(());
    }
    write(
        ebpf,
        Clock {
            tick_ns: clock.tick_ns,
            offset_ns,
        },
    )?;
    tracing::info!(
        drift_ms = drift as f64 / 1e6,
        "corrected the kernel programs' clock"
    );
    Ok(())
}

/// The clock the programs use (all zero: uncalibrated).
pub fn read_map(ebpf: &Ebpf) -> Result<Clock, ClockError> {
    let name = map_names::CLOCK;
    let map: Array<_, Clock> =
        Array::try_from(ebpf.map(name).ok_or(ClockError::MissingMap(name))?)?;
    Ok(map.get(&0, 0)?)
}

/// The clock the samples describe. Each reading's offset (`coarse_ns - jiffies × tick`) is
/// the same under the right tick, except for readings taken while one of the two had taken a tick
/// the other had not yet: jiffies advance just before the coarse clock, and where the timer is
/// slow (a virtual machine) the coarse clock can see a tick more than jiffies for a while. Such
/// readings are a whole tick off. So the tick is the known `CONFIG_HZ` under which most readings
/// share their offset ([`MIN_STEADY_SHARE`], to within [`PHASE_TOLERANCE`] of a tick) and nearly
/// all the others are a tick off it ([`MIN_ON_GRID_SHARE`]). The offset is the latest steady one:
/// the programs' clock is never behind a steady reading.
pub fn fit(samples: &[Sample]) -> Result<Clock, ClockError> {
    let ticks = match (
        samples.iter().map(|s| s.jiffies).min(),
        samples.iter().map(|s| s.jiffies).max(),
    ) {
        (Some(first), Some(last)) => last - first,
        _ => 0,
    };
    if ticks < MIN_TICKS {
        return Err(ClockError::TooFewTicks { ticks });
    }
    let candidates = KNOWN_HZ.map(|hz| {
        let tick_ns = (1_000_000_000 + hz / 2) / hz;
        let mut offsets: Vec<i128> = samples.iter().map(|s| offset_at(s, tick_ns)).collect();
        offsets.sort_unstable();
        let median = offsets[offsets.len() / 2];
        let tolerance = (PHASE_TOLERANCE * tick_ns as f64) as i128;
        let tick = i128::from(tick_ns);
        let near = |offset: i128, steady: i128| (offset - steady).abs() <= tolerance;
        let steady: Vec<i128> = offsets
            .iter()
            .copied()
            .filter(|&offset| near(offset, median))
            .collect();
        let across = offsets
            .iter()
            .filter(|&&offset| near(offset, median - tick) || near(offset, median + tick))
            .count();
        let share = |count: usize| count as f64 / samples.len() as f64;
        Candidate {
            hz,
            steady_share: share(steady.len()),
            on_grid_share: share(steady.len() + across),
            latest_steady: steady.last().copied().unwrap_or(median),
        }
    });
    let best = candidates
        .iter()
        .max_by(|a, b| a.steady_share.total_cmp(&b.steady_share))
        .expect("four candidates");
    if best.steady_share < MIN_STEADY_SHARE || best.on_grid_share < MIN_ON_GRID_SHARE {
        return Err(ClockError::UnknownTick {
            best_hz: best.hz,
            steady_percent: best.steady_share * 100.0,
            on_grid_percent: best.on_grid_share * 100.0,
        });
    }
    Ok(Clock {
        tick_ns: (1_000_000_000 + best.hz / 2) / best.hz,
        offset_ns: best.latest_steady as u64,
    })
}

/// How well one `CONFIG_HZ` explains a calibration's readings (see [`fit`]).
struct Candidate {
    hz: u64,
    steady_share: f64,
    on_grid_share: f64,
    latest_steady: i128,
}

/// The median of the samples' offsets under `tick_ns`: a reading taken across a tick is off by
/// a whole tick either way.
fn offset(samples: &[Sample], tick_ns: u64) -> u64 {
    let mut offsets: Vec<i128> = samples.iter().map(|s| offset_at(s, tick_ns)).collect();
    offsets.sort_unstable();
    offsets.get(offsets.len() / 2).copied().unwrap_or(0) as u64
}

/// `coarse_ns - jiffies × tick_ns`, which wraps like the programs' `Clock::at`.
fn offset_at(sample: &Sample, tick_ns: u64) -> i128 {
    i128::from(sample.coarse_ns) - i128::from(sample.jiffies) * i128::from(tick_ns)
}

fn load_probe(ebpf: &mut Ebpf) -> Result<(), ClockError> {
    let name = program_names::CLOCK_PROBE;
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(ClockError::MissingProgram(name))?
        .try_into()?;
    if program.fd().is_err() {
        program.load()?;
    }
    Ok(())
}

fn probe_program(ebpf: &Ebpf) -> Result<&Xdp, ClockError> {
    let name = program_names::CLOCK_PROBE;
    Ok(ebpf
        .program(name)
        .ok_or(ClockError::MissingProgram(name))?
        .try_into()?)
}

fn read(probe: &Xdp) -> Result<Sample, ClockError> {
    // An Ethernet header's worth at least: test runs refuse shorter frames.
    let frame = [0u8; 64];
    let mut out = [0u8; 64];
    let result = probe.test_run(TestRunOptions {
        data_in: Some(&frame),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    })?;
    if result.data_size_out < 16 {
        return Err(ClockError::ShortProbe(result.data_size_out as usize));
    }
    let word = |at: usize| u64::from_ne_bytes(out[at..at + 8].try_into().expect("8 bytes"));
    Ok(Sample {
        coarse_ns: word(0),
        jiffies: word(8),
    })
}

fn write(ebpf: &mut Ebpf, clock: Clock) -> Result<(), ClockError> {
    let name = map_names::CLOCK;
    let mut map: Array<_, Clock> =
        Array::try_from(ebpf.map_mut(name).ok_or(ClockError::MissingMap(name))?)?;
    map.set(0, clock, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readings of a kernel at `hz` whose clock reads `base_ns` at jiffies 0 plus each tick's
    /// interrupt latency (`latency_ns(jiffies)`), one every `every_ns` for `span_ns`.
    fn readings(
        hz: u64,
        base_ns: u64,
        every_ns: u64,
        span_ns: u64,
        latency_ns: impl Fn(u64) -> u64,
    ) -> Vec<Sample> {
        let tick = (1_000_000_000 + hz / 2) / hz;
        let first = 4_294_892_296u64;
        (0..span_ns / every_ns)
            .map(|i| {
                let elapsed = i * every_ns;
                let jiffies = first + elapsed / tick;
                Sample {
                    coarse_ns: base_ns + (jiffies - first) * tick + latency_ns(jiffies),
                    jiffies,
                }
            })
            .collect()
    }

    #[test]
    fn finds_every_usual_tick_and_the_offset_to_within_the_latency() {
        for hz in [100, 250, 300, 1000] {
            let samples = readings(hz, 7_000_000_000, 3_000, 60_000_000, |j| {
                1_000 + j % 7 * 500
            });
            let clock = fit(&samples).unwrap();
            assert_eq!(clock.tick_ns, (1_000_000_000 + hz / 2) / hz, "HZ={hz}");
            for sample in &samples {
                let error = clock.at(sample.jiffies) as i64 - sample.coarse_ns as i64;
                // Never behind a reading, ahead by at most the spread of the latencies.
                assert!((0..=3_000).contains(&error), "HZ={hz}: {error}");
            }
        }
    }

    #[test]
    fn readings_taken_across_a_tick_do_not_move_the_clock() {
        let mut samples = readings(250, 1_000_000_000, 5_000, 40_000_000, |_| 2_000);
        let clean = fit(&samples).unwrap();
        // Jiffies already advanced, the coarse clock not yet: a reading a tick early, as the
        // last reading and as the first.
        let (first, last) = (samples[0], *samples.last().unwrap());
        samples.push(Sample {
            coarse_ns: last.coarse_ns,
            jiffies: last.jiffies + 1,
        });
        samples.insert(
            0,
            Sample {
                coarse_ns: first.coarse_ns - 8_000_000,
                jiffies: first.jiffies - 1,
            },
        );
        // As a slow virtual machine's timer does (seen under TCG): the coarse clock a tick ahead
        // of jiffies for a while, for a third of the readings.
        for at in (1_000..7_000).step_by(1_000) {
            for sample in &mut samples[at..at + 450] {
                sample.coarse_ns += 4_000_000;
            }
        }
        assert_eq!(fit(&samples).unwrap(), clean);
    }

    #[test]
    fn refuses_too_few_ticks_an_unknown_hz_or_an_unsteady_offset() {
        let short = readings(250, 1_000_000_000, 5_000, 14_000_000, |_| 0);
        assert!(matches!(fit(&short), Err(ClockError::TooFewTicks { .. })));
        assert!(matches!(fit(&[]), Err(ClockError::TooFewTicks { .. })));
        let hz_200 = readings(200, 1_000_000_000, 5_000, 40_000_000, |_| 0);
        assert!(matches!(fit(&hz_200), Err(ClockError::UnknownTick { .. })));
        // 4 ms on average, but every other tick read 1.5 ms late.
        let unsteady = readings(250, 1_000_000_000, 5_000, 40_000_000, |j| {
            if j % 2 == 0 { 1_500_000 } else { 0 }
        });
        assert!(matches!(
            fit(&unsteady),
            Err(ClockError::UnknownTick { .. })
        ));
    }

    #[test]
    fn a_check_takes_the_median_offset() {
        let tick = 4_000_000;
        let steady = Sample {
            coarse_ns: 9_000_000_000,
            jiffies: 4_294_900_000,
        };
        let early = Sample {
            coarse_ns: steady.coarse_ns,
            jiffies: steady.jiffies + 1,
        };
        let late = Sample {
            coarse_ns: steady.coarse_ns + tick,
            jiffies: steady.jiffies,
        };
        let expected = offset(&[steady], tick);
        assert_eq!(offset(&[early, steady, steady], tick), expected);
        assert_eq!(offset(&[steady, late, steady], tick), expected);
    }
}
