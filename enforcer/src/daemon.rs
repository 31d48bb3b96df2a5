//! The running daemon: load and attach, then reload on change, sweep idle state, read events,
//! and serve metrics and the flow stream until SIGINT or SIGTERM.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use serde_json::{Value, json};

use crate::{
    audit::AuditLog,
    control::{ControlError, Peer},
    events::EventHub,
    metrics::MetricsSnapshot,
    state::{State, StateFile},
};

/// Options of `enforcer run` (flag names are a stable interface).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub policy_dir: PathBuf,
    pub ifaces: Vec<String>,
    /// `--metrics-addr`: `/metrics`, `/healthz`, `/readyz` and `/flows`.
    pub metrics_addr: SocketAddr,
    /// `--flow-log FILE` (`-` for stdout).
    pub flow_log: Option<PathBuf>,
    /// `--flow-log-max-bytes`: rotate the flow log file at this size.
    pub flow_log_max_bytes: u64,
    /// `--flow-log-keep`: rotated files kept (`FILE.1` ... `FILE.N`).
    pub flow_log_keep: usize,
    /// `--report-allowed`: report the first packet of every allowed flow too.
    pub report_allowed: bool,
    /// `--persist`: pin maps, programs and attachments in `pin_dir`, so they stay in force when
    /// the daemon exits; adopt what is pinned there at start.
    pub persist: bool,
    /// `--pin-dir`: where `--persist` pins (and what a daemon without it must not collide with).
    pub pin_dir: PathBuf,
    /// `--control-socket`: the Unix socket of `enforcer quarantine`, `breakglass`, `status`.
    pub control_socket: PathBuf,
    /// `--control-socket-group`: socket mode 0660 with this group instead of 0600.
    pub control_socket_group: Option<String>,
    /// `--audit-log`: the tamper-evident audit log (JSON lines, hash-chained).
    pub audit_log: Option<PathBuf>,
    /// `--audit-summary-interval`: how often denied counts per segment pair are audited.
    pub audit_summary_interval: Duration,
    /// `--state-file`: run-time changes (quarantine, break-glass) kept across restarts.
    pub state_file: PathBuf,
}

/// What the HTTP endpoints read.
pub struct SharedState {
    pub hub: Arc<EventHub>,
    /// Reads the metrics at the moment of the call.
    pub metrics: Box<dyn Fn() -> MetricsSnapshot + Send + Sync>,
    /// The programs are attached and a policy is in force (`/readyz`).
    pub ready: AtomicBool,
}

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    process::Command,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, MapError, PerCpuArray, RingBuf};
use enforcer_common::{
    Event, PairVerdictKey, counter, direction, event_counter, map_names, protocol_class,
};
use policy_compiler::{Artifact, Policy, PolicyErrors, ReadCache};
use tokio::io::unix::AsyncFd;
use tracing::{debug, error, info, warn};

use crate::{
    Enforcer, LoadError,
    events::{EventNamer, PolicyNames},
    flow_filter::FlowFilter,
    loader::EventOptions,
    metrics::VerdictLabels,
    persist,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the policy in {dir} is invalid:\n{errors}")]
    InvalidPolicy { dir: PathBuf, errors: PolicyErrors },
    #[error("compiling the policy in {dir}: {source}")]
    Compile {
        dir: PathBuf,
        #[source]
        source: policy_compiler::CompileError,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Persist(#[from] crate::persist::PersistError),
    #[error("reading kernel map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the event ring buffer was already taken")]
    EventsTaken,
    #[error("watching the event ring buffer: {0}")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

/// A validated and compiled policy, with where it came from.
pub struct LoadedPolicy {
    pub policy: Policy,
    pub artifact: Artifact,
    /// The Git commit of the policy directory, when it is in a Git checkout (`-dirty` appended
    /// when the directory has uncommitted changes).
    pub commit: Option<String>,
}

/// Reads, validates and compiles the policy in `dir`, parsing only the files that `cache`
/// does not hold as they are now (see [`ReadCache`]).
pub fn load_policy(dir: &Path, cache: &mut ReadCache) -> Result<LoadedPolicy, DaemonError> {
    // `git` takes tens of milliseconds on a large checkout: ask it while the policy compiles.
    let (compiled, commit) = std::thread::scope(|scope| {
        let commit = scope.spawn(|| git_commit(dir));
        let compiled = Policy::load_dir_cached(dir, cache)
            .map_err(|errors| DaemonError::InvalidPolicy {
                dir: dir.to_path_buf(),
                errors,
            })
            .and_then(|policy| {
                let artifact =
                    policy_compiler::compile(&policy).map_err(|source| DaemonError::Compile {
                        dir: dir.to_path_buf(),
                        source,
                    })?;
                Ok((policy, artifact))
            });
        (compiled, commit.join().ok().flatten())
    });
    let (policy, artifact) = compiled?;
    Ok(LoadedPolicy {
        policy,
        artifact,
        commit,
    })
}

/// The saved state, or an empty one with the problem when the file cannot be used (it is moved
/// aside, not overwritten; the daemon still enforces the policy).
fn load_state(file: &StateFile) -> (State, Option<String>) {
    match file.load() {
        Ok(state) => (state, None),
        Err(error) => {
            let aside = match &error {
                crate::state::StateError::Invalid { .. } => file.move_aside().ok(),
                crate::state::StateError::Io { .. } => None,
            };
            let problem = match aside {
                Some(aside) => format!("{error}; moved to {}", aside.display()),
                None => error.to_string(),
            };
            error!(
                "{problem}: starting without its run-time changes (quarantined hosts are NOT \
                 isolated until they are added again)"
            );
            (State::default(), Some(problem))
        }
    }
}

fn git_commit(dir: &Path) -> Option<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"])?;
    let dirty = git(&["status", "--porcelain", "--", "."]).is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

/// One policy file as [`fingerprint`] sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileStamp {
    pub name: String,
    pub len: u64,
    pub modified: Option<SystemTime>,
    /// The file a link resolves to.
    pub target: Option<PathBuf>,
}

/// What identifies the policy files' current content cheaply: names, sizes and modification
/// times of the top-level YAML files, following symlinks, and where the links point. A change
/// triggers a reload attempt. (A Kubernetes ConfigMap volume is a directory of links that are
/// swapped all at once by replacing `..data`.)
pub fn fingerprint(dir: &Path) -> Vec<FileStamp> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().to_string();
            let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            let path = entry.path();
            let meta = std::fs::metadata(&path).ok()?;
            let target = std::fs::canonicalize(&path).ok();
            (yaml && meta.is_file()).then(|| FileStamp {
                name,
                len: meta.len(),
                modified: meta.modified().ok(),
                target,
            })
        })
        .collect();
    files.sort();
    files
}

/// The daemon's view of what it is enforcing, for metrics and logs.
#[derive(Clone, Debug, Default)]
struct Status {
    revision: String,
    commit: Option<String>,
    rules: u64,
    reloads_success: u64,
    reloads_failure: u64,
    reload_failing: bool,
}

/// The running enforcer, shared by the daemon's tasks.
pub struct Daemon {
    policy_dir: PathBuf,
    enforcer: Mutex<Enforcer>,
    namer: Mutex<EventNamer>,
    hub: Arc<EventHub>,
    status: Mutex<Status>,
    /// Segment-pair verdict counts of old policy generations, folded out of the kernel map.
    verdict_base: Mutex<BTreeMap<VerdictLabels, u64>>,
    /// Tracked flows, as of the last sweep.
    conntrack_entries: Mutex<u64>,
    /// `--audit-log`, when given.
    audit_log: Option<AuditLog>,
    /// Audit records that could not be written.
    audit_failures: AtomicU64,
    /// Run-time changes in force (quarantine, break-glass), as saved in `state_file`. Handlers
    /// hold the lock from validation to the kernel update, so changes are serialised.
    state: Mutex<State>,
    state_file: StateFile,
    /// Denied counts per segment pair at the last `violations_summary` record.
    summarised_denials: Mutex<BTreeMap<VerdictLabels, u64>>,
    summarised_at: Mutex<String>,
    /// The policy in force (break-glass requests are checked against it).
    /// The policy in force, without its rules (`Policy::outline`): enough to validate requests.
    policy: Mutex<Arc<Policy>>,
    /// Break-glass bookkeeping besides the grants in `state`.
    breakglass: Mutex<crate::breakglass::Runtime>,
    /// The filter in front of the connection table, rebuilt at every sweep; `None` when it
    /// could not be set up (every probe then goes to the table).
    flow_filter: Mutex<Option<FlowFilter>>,
    /// Whether the filter is in use, for `/metrics` (which must not wait for a rebuild).
    flow_filter_enabled: AtomicBool,
    /// The policy files read at the last load, so that a reload parses only those that changed.
    /// Held for the whole of a load, which also keeps two reloads from interleaving.
    read_cache: Mutex<ReadCache>,
}

/// Hands the memory that reading and compiling a policy used back to the system. The parse
/// runs on several threads, and glibc keeps each thread's freed heap otherwise: a 100k-rule
/// policy would leave the daemon holding over 100 MiB it no longer uses.
fn release_freed_memory() {
    // SAFETY: no preconditions; it only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Daemon {
    /// Loads the policy and the programs and attaches to every interface.
    pub fn start(options: &RunOptions, hub: Arc<EventHub>) -> Result<Arc<Daemon>, DaemonError> {
        let audit_log = options
            .audit_log
            .as_deref()
            .map(AuditLog::open)
            .transpose()?;
        let state_file = StateFile::new(&options.state_file);
        let (state, state_problem) = load_state(&state_file);
        let mut read_cache = ReadCache::new();
        let loaded = match load_policy(&options.policy_dir, &mut read_cache) {
            Ok(loaded) => loaded,
            Err(error) => {
                if let Some(log) = &audit_log {
                    let _ = log.append(
                        "policy_load",
                        json!({"trigger": "start", "outcome": "failure", "error": error.to_string()}),
                    );
                }
                return Err(error);
            }
        };
        let events = EventOptions {
            report_allowed: options.report_allowed,
            ..EventOptions::default()
        };
        let enforcer = if options.persist {
            // Adopts what is pinned (quarantined hosts included: the map is pinned too) or
            // loads and attaches afresh.
            let (enforcer, report) =
                persist::start(&loaded.artifact, events, &options.pin_dir, &options.ifaces)?;
            log_start(&report, &options.pin_dir, enforcer.generation());
            enforcer
        } else {
            persist::ensure_not_pinned(&options.pin_dir)?;
            Enforcer::load_with(&loaded.artifact, events)?
        };
        let mut namer = EventNamer::new();
        namer.add_policy(Arc::new(PolicyNames::of(
            enforcer.generation(),
            &loaded.artifact,
        )));
        let status = Status {
            revision: loaded.artifact.revision.clone(),
            commit: loaded.commit.clone(),
            rules: loaded.policy.written_rule_count() as u64,
            ..Status::default()
        };
        let daemon = Arc::new(Daemon {
            policy_dir: options.policy_dir.clone(),
            enforcer: Mutex::new(enforcer),
            namer: Mutex::new(namer),
            hub,
            status: Mutex::new(status),
            verdict_base: Mutex::new(BTreeMap::new()),
            conntrack_entries: Mutex::new(0),
            audit_log,
            audit_failures: AtomicU64::new(0),
            state: Mutex::new(state),
            state_file,
            summarised_denials: Mutex::new(BTreeMap::new()),
            summarised_at: Mutex::new(crate::audit::now_rfc3339()),
            policy: Mutex::new(Arc::new(loaded.policy.outline())),
            breakglass: Mutex::new(crate::breakglass::Runtime::default()),
            flow_filter: Mutex::new(None),
            flow_filter_enabled: AtomicBool::new(false),
            read_cache: Mutex::new(read_cache),
        });
        // Quarantined hosts are isolated before the first packet is judged.
        daemon.restore_quarantine();
        if !options.persist {
            let mut enforcer = daemon.enforcer();
            for iface in &options.ifaces {
                enforcer.attach(iface)?;
            }
        }
        // Only now: every program that inserts into the connection table sets the filter.
        daemon.start_flow_filter();
        daemon.audit(
            "daemon_start",
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "ifaces": options.ifaces,
                "policy_dir": options.policy_dir,
                "control_socket": options.control_socket,
                "state_file": options.state_file,
            }),
        );
        if let Some(problem) = state_problem {
            daemon.audit("state_file_unreadable", json!({"error": problem}));
        }
        daemon.audit_policy_load("start", &loaded);
        daemon.restore_grants();
        drop(loaded);
        release_freed_memory();
        Ok(daemon)
    }

    /// Appends a record to the audit log (when `--audit-log` is set). A failed write is logged
    /// and counted (`enforcer_audit_write_failures_total`), never fatal: enforcement goes on.
    pub fn audit(&self, kind: &str, fields: Value) {
        let Some(log) = &self.audit_log else {
            return;
        };
        if let Err(error) = log.append(kind, fields) {
            self.audit_failures.fetch_add(1, Ordering::Relaxed);
            error!(%error, kind, "writing the audit log failed");
        }
    }

    fn audit_policy_load(&self, trigger: &str, loaded: &LoadedPolicy) {
        self.audit(
            "policy_load",
            json!({
                "trigger": trigger,
                "outcome": "success",
                "revision": loaded.artifact.revision,
                "commit": loaded.commit,
                "rules": loaded.policy.written_rule_count(),
            }),
        );
    }

    /// The run-time changes in force.
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves `state` to the state file (call with the [`Daemon::state`] lock held, before
    /// changing the kernel).
    pub fn save_state(&self, state: &State) -> Result<(), ControlError> {
        self.state_file.save(state).map_err(|error| {
            ControlError::Failed(format!("nothing changed: saving the state failed: {error}"))
        })
    }

    /// `status`: what is in force.
    pub fn status(&self, _peer: &Peer) -> Result<Value, ControlError> {
        let status = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let quarantined = self.state().quarantine.len();
        Ok(json!({
            "revision": status.revision,
            "commit": status.commit,
            "rules": status.rules,
            "generation": self.generation(),
            "reload_failing": status.reload_failing,
            "quarantined": quarantined,
            "active_grants": self.active_grants(),
        }))
    }

    /// Audits the denied packets per segment pair since the previous summary
    /// (`violations_summary`).
    pub fn audit_violations_summary(&self) {
        let now = crate::audit::now_rfc3339();
        let snapshot = self.metrics();
        let mut last = self
            .summarised_denials
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut since = self.summarised_at.lock().unwrap_or_else(|p| p.into_inner());
        let mut pairs = Vec::new();
        let mut total = 0u64;
        for (labels, count) in &snapshot.policy_verdicts {
            if labels.action != "dropped" {
                continue;
            }
            let before = last.get(labels).copied().unwrap_or(0);
            let denied = count.saturating_sub(before);
            if denied > 0 {
                total += denied;
                pairs.push(json!({
                    "from": labels.source_segment,
                    "to": labels.destination_segment,
                    "direction": labels.direction,
                    "match": labels.match_,
                    "denied": denied,
                }));
            }
            last.insert(labels.clone(), *count);
        }
        self.audit(
            "violations_summary",
            json!({"since": *since, "denied_total": total, "pairs": pairs}),
        );
        *since = now;
    }

    pub fn policy_dir(&self) -> &Path {
        &self.policy_dir
    }

    /// Where the programs are pinned, when they are (`--persist`).
    pub fn pin_dir(&self) -> Option<PathBuf> {
        self.enforcer().pin_dir().map(Path::to_path_buf)
    }

    /// The policy in force, without its rules ([`Policy::outline`]).
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn breakglass_runtime(
        &self,
    ) -> std::sync::MutexGuard<'_, crate::breakglass::Runtime> {
        self.breakglass.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn enforcer(&self) -> std::sync::MutexGuard<'_, Enforcer> {
        self.enforcer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Validates, compiles and swaps in the policy on disk. On any error the policy in force
    /// stays, and the error is logged and counted.
    pub fn reload(&self) -> Result<Duration, DaemonError> {
        let started = Instant::now();
        let mut read_cache = self.read_cache.lock().unwrap_or_else(|p| p.into_inner());
        let result = load_policy(&self.policy_dir, &mut read_cache).and_then(|loaded| {
            let mut enforcer = self.enforcer();
            // Named before the switch: the event reader may see the new policy's first events
            // at once.
            self.namer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .add_policy(Arc::new(PolicyNames::of(
                    enforcer.generation() + 1,
                    &loaded.artifact,
                )));
            let took = enforcer.replace_policy(&loaded.artifact)?;
            let live_after = started.elapsed();
            drop(enforcer);
            *self.policy.lock().unwrap_or_else(|p| p.into_inner()) =
                Arc::new(loaded.policy.outline());
            let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
            status.revision = loaded.artifact.revision.clone();
            status.commit = loaded.commit.clone();
            status.rules = loaded.policy.written_rule_count() as u64;
            drop(status);
            self.audit_policy_load("reload", &loaded);
            Ok((
                took,
                live_after,
                loaded.artifact.revision.clone(),
                loaded.commit,
            ))
        });
        let cache_use = read_cache.last_use();
        drop(read_cache);
        release_freed_memory();
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok((took, live_after, revision, commit)) => {
                status.reloads_success += 1;
                status.reload_failing = false;
                // live_after_ms: from the start of the reload (reading the files) until the new
                // policy judges packets; took_ms: the part spent writing the maps and switching.
                info!(
                    %revision,
                    commit = commit.as_deref().unwrap_or("-"),
                    live_after_ms = live_after.as_secs_f64() * 1000.0,
                    took_ms = took.as_secs_f64() * 1000.0,
                    files_read = cache_use.misses,
                    files_unchanged = cache_use.hits,
                    "policy reloaded"
                );
                drop(status);
                self.revoke_unplaced_grants(&revision);
                Ok(took)
            }
            Err(error) => {
                status.reloads_failure += 1;
                status.reload_failing = true;
                let in_force = status.revision.clone();
                drop(status);
                error!("policy reload rejected; the previous policy stays in force: {error}");
                self.audit(
                    "policy_reload_failed",
                    json!({"outcome": "failure", "error": error.to_string(), "in_force": in_force}),
                );
                Err(error)
            }
        }
    }

    /// The generation of the policy in force.
    pub fn generation(&self) -> u32 {
        self.enforcer().generation()
    }

    /// Housekeeping a moment after the reload to `generation`: empty the old slot, and fold the
    /// segment-pair counts of old generations into user space. Skipped when a newer reload has
    /// happened since: its own housekeeping follows.
    pub fn after_reload(&self, generation: u32) {
        let mut enforcer = self.enforcer();
        if enforcer.generation() != generation {
            return;
        }
        if let Err(error) = enforcer.clear_inactive_slot() {
            warn!(%error, "emptying the previous policy's maps failed");
        }
        if let Err(error) = self.fold_old_verdicts(&mut enforcer) {
            warn!(%error, "folding old segment-pair counters failed");
        }
    }

    fn fold_old_verdicts(&self, enforcer: &mut Enforcer) -> Result<(), DaemonError> {
        let old = enforcer.take_old_pair_verdicts()?;
        let namer = self.namer.lock().unwrap_or_else(|p| p.into_inner());
        let mut base = self.verdict_base.lock().unwrap_or_else(|p| p.into_inner());
        // Generations this daemon never loaded (counted before it adopted pinned maps) have no
        // names; their counts were the previous daemon's to report.
        for (key, count) in old
            .iter()
            .filter(|(key, _)| namer.policy(key.generation).is_some())
        {
            *base.entry(verdict_labels(&namer, key)).or_default() += count;
        }
        Ok(())
    }

    /// Checks the kernel programs' clock; removes idle connection state; remembers how many
    /// flows remain; then rebuilds the filter in front of the connection table without the
    /// removed flows.
    pub fn sweep(&self) {
        {
            let mut enforcer = self.enforcer();
            if let Err(error) = crate::clock::check(enforcer.ebpf_mut()) {
                warn!(%error, "checking the kernel programs' clock failed");
            }
            if let Err(error) = enforcer.sweep_expired() {
                warn!(%error, "sweeping expired state failed");
            }
            if let Ok(flows) = enforcer.tracked_flows() {
                *self
                    .conntrack_entries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = flows as u64;
            }
        }
        // Outside the enforcer's lock: the rebuild waits for running programs twice.
        self.rebuild_flow_filter();
    }

    /// Sets up the filter in front of the connection table and enables it; on failure probes
    /// keep going to the table, which is slower, never wrong.
    fn start_flow_filter(&self) {
        let taken = self.enforcer().take_flow_filter();
        match taken {
            Ok(filter) => {
                *self.flow_filter.lock().unwrap_or_else(|p| p.into_inner()) = Some(filter);
                self.rebuild_flow_filter();
            }
            Err(error) => {
                warn!(%error, "the filter in front of the connection table is off");
            }
        }
    }

    fn rebuild_flow_filter(&self) {
        let mut filter = self.flow_filter.lock().unwrap_or_else(|p| p.into_inner());
        let Some(filter) = filter.as_mut() else {
            return;
        };
        let result = filter.rebuild();
        self.flow_filter_enabled
            .store(filter.enabled(), Ordering::Relaxed);
        match result {
            Ok(rebuilt) => debug!(
                flows = rebuilt.flows,
                ms = rebuilt.took.as_secs_f64() * 1000.0,
                "rebuilt the filter in front of the connection table"
            ),
            Err(error) => warn!(
                %error,
                enabled = filter.enabled(),
                "rebuilding the filter in front of the connection table failed; the half in \
                 force stays"
            ),
        }
    }

    /// Ingress and egress counters, for the shutdown summary.
    pub fn counters(&self) -> Result<crate::Counters, crate::counters::CounterError> {
        self.enforcer().counters()
    }

    pub fn revision(&self) -> String {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .revision
            .clone()
    }

    /// Everything `/metrics` shows, read now.
    pub fn metrics(&self) -> MetricsSnapshot {
        // Before the enforcer lock: handlers take the state lock first. One lock at a time:
        // a guard in the struct literal would live to its end.
        let quarantined_hosts = self.state().quarantine.len() as u64;
        let breakglass_active = self.breakglass_active_metric();
        let breakglass_events = self.breakglass_runtime().event_counts();
        let mut snapshot = MetricsSnapshot {
            quarantined_hosts,
            breakglass_active,
            breakglass_events,
            audit_write_failures: self.audit_failures.load(Ordering::Relaxed),
            conntrack_filter_enabled: self.flow_filter_enabled.load(Ordering::Relaxed),
            ..MetricsSnapshot::default()
        };
        let enforcer = self.enforcer();
        let status = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        snapshot.revision = status.revision;
        snapshot.commit = status.commit;
        snapshot.rules = status.rules;
        snapshot.reloads_success = status.reloads_success;
        snapshot.reloads_failure = status.reloads_failure;
        snapshot.reload_failing = status.reload_failing;
        snapshot.conntrack_entries = *self
            .conntrack_entries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Ok(counters) = enforcer.counters() {
            for dir in 0..direction::COUNT {
                let forwarded: u64 = (0..counter::COUNT)
                    .filter(|&c| !counter::is_drop(c))
                    .map(|c| counters.get(dir, c))
                    .sum();
                snapshot
                    .forwarded
                    .push((direction::NAMES[dir as usize].to_string(), forwarded));
            }
        }
        if let Ok(drops) = read_drops(&enforcer) {
            snapshot.drops = drops;
        }
        let events = read_per_cpu_array(&enforcer, map_names::EVENT_COUNTERS, event_counter::COUNT)
            .unwrap_or_default();
        let event = |i: u32| events.get(i as usize).copied().unwrap_or(0);
        snapshot.lost_events = event(event_counter::LOST);
        snapshot.subscriber_missed = self.hub.lagged();
        snapshot.events = vec![
            ("sent".to_string(), event(event_counter::SENT)),
            (
                "rate_limited".to_string(),
                event(event_counter::RATE_LIMITED),
            ),
        ];
        let mut verdicts = self
            .verdict_base
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Ok(current) = enforcer.pair_verdicts() {
            let namer = self.namer.lock().unwrap_or_else(|p| p.into_inner());
            for (key, count) in current {
                if namer.policy(key.generation).is_some() {
                    *verdicts.entry(verdict_labels(&namer, &key)).or_default() += count;
                }
            }
        }
        snapshot.policy_verdicts = verdicts.into_iter().collect();
        snapshot.map_pressure = map_pressure(&enforcer, snapshot.conntrack_entries);
        snapshot
    }

    /// Reads kernel events until the task is dropped, publishing them to the hub.
    pub fn spawn_event_reader(
        self: &Arc<Self>,
    ) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
        let ring = self
            .enforcer()
            .take_events()
            .ok_or(DaemonError::EventsTaken)?;
        // SAFETY: the ring buffer owns its map fd, which stays open and the same until the
        // `AsyncFd` (which owns the ring buffer) is dropped.
        let mut ring = unsafe { AsyncFd::register(ring) }
            .map_err(|error| DaemonError::EventFd(std::io::Error::other(error.to_string())))?;
        let daemon = Arc::clone(self);
        Ok(tokio::spawn(async move {
            let mut iface_names: HashMap<u32, String> = HashMap::new();
            loop {
                let mut guard = match ring.readable_mut().await {
                    Ok(guard) => guard,
                    Err(error) => {
                        error!(%error, "event ring buffer failed; no more flow events");
                        return;
                    }
                };
                let mut batch = Vec::new();
                {
                    let ring: &mut RingBuf<MapData> = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        if item.len() >= size_of::<Event>() {
                            // SAFETY: the kernel wrote an `Event` there; read unaligned.
                            batch.push(unsafe { (item.as_ptr() as *const Event).read_unaligned() });
                        }
                    }
                }
                guard.clear_ready();
                let namer = daemon.namer.lock().unwrap_or_else(|p| p.into_inner());
                let mut grant_uses = Vec::new();
                for event in batch {
                    let iface = iface_names
                        .entry(event.ifindex)
                        .or_insert_with(|| iface_name(event.ifindex))
                        .clone();
                    let flow = namer.name(&event, iface);
                    if u32::from(event.counter) == counter::BREAKGLASS {
                        grant_uses.push((event.rule, flow.clone()));
                    }
                    daemon.hub.publish(flow);
                }
                drop(namer);
                for (grant, flow) in grant_uses {
                    daemon.audit_breakglass_use(grant, &flow);
                }
            }
        }))
    }

    /// The state the HTTP endpoints read.
    pub fn shared_state(self: &Arc<Self>) -> Arc<SharedState> {
        let daemon = Arc::clone(self);
        Arc::new(SharedState {
            hub: Arc::clone(&self.hub),
            metrics: Box::new(move || daemon.metrics()),
            ready: AtomicBool::new(true),
        })
    }
}

fn log_start(report: &persist::StartReport, pin_dir: &Path, generation: u32) {
    let dir = pin_dir.display();
    match report.adopted_generation {
        None => info!(
            pin_dir = %dir,
            "pinned maps, programs and attachments: they stay in force when the daemon exits \
             (`enforcer detach --pin-dir {dir}` removes them)"
        ),
        Some(adopted) => {
            let ifaces: Vec<String> = report
                .ifaces
                .iter()
                .map(|outcome| {
                    let how = if outcome.adopted {
                        "program replaced in place"
                    } else {
                        "attached"
                    };
                    format!(
                        "{} ({}, {}: {how})",
                        outcome.iface, outcome.xdp_mode, outcome.tc_mode
                    )
                })
                .collect();
            let policy = if report.policy_kept {
                "unchanged, kept"
            } else {
                "changed, switched atomically"
            };
            info!(
                pin_dir = %dir,
                adopted_generation = adopted,
                generation,
                policy,
                ifaces = ?ifaces,
                released = ?report.released,
                resized = ?report.resized,
                "adopted the pinned enforcer: maps and connection state reused, programs replaced \
                 without detaching"
            );
        }
    }
}

fn iface_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as the call requires.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return format!("if{ifindex}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn verdict_labels(namer: &EventNamer, key: &PairVerdictKey) -> VerdictLabels {
    let policy = namer.policy(key.generation);
    let segment = |id: u32| {
        policy
            .and_then(|p| p.segments.get(id as usize).cloned())
            .unwrap_or_else(|| format!("segment#{id}"))
    };
    let outcome = u32::from(key.counter);
    let (action, match_) = match outcome {
        counter::ALLOWED => ("forwarded", "rule"),
        counter::UNENFORCED => ("forwarded", "unenforced"),
        counter::AUDIT => ("audit", "none"),
        counter::DROP_FLOW_REVOKED => ("dropped", "revoked"),
        counter::DROP_CONNTRACK_FULL => ("dropped", "conntrack_full"),
        counter::BREAKGLASS => ("forwarded", "breakglass"),
        counter::DROP_BREAKGLASS_EXPIRED => ("dropped", "breakglass_expired"),
        _ if counter::is_drop(outcome) => ("dropped", "none"),
        _ => ("forwarded", "none"),
    };
    VerdictLabels {
        source_segment: segment(key.src_segment),
        destination_segment: segment(key.dst_segment),
        direction: direction::NAMES
            .get(usize::from(key.direction))
            .unwrap_or(&"?")
            .to_string(),
        action: action.to_string(),
        match_: match_.to_string(),
    }
}

fn read_per_cpu_array(
    enforcer: &Enforcer,
    map: &'static str,
    len: u32,
) -> Result<Vec<u64>, DaemonError> {
    let array: PerCpuArray<_, u64> =
        PerCpuArray::try_from(enforcer.ebpf().map(map).ok_or(DaemonError::EventsTaken)?)
            .map_err(|source| DaemonError::Map { map, source })?;
    (0..len)
        .map(|i| {
            array
                .get(&i, 0)
                .map(|values| values.iter().sum())
                .map_err(|source| DaemonError::Map { map, source })
        })
        .collect()
}

/// `((reason, protocol), count)` rows of `enforcer_drop_total`.
type DropRows = Vec<((String, String), u64)>;

fn read_drops(enforcer: &Enforcer) -> Result<DropRows, DaemonError> {
    let len = direction::COUNT * counter::COUNT * protocol_class::COUNT;
    let values = read_per_cpu_array(enforcer, map_names::DROPS_BY_PROTOCOL, len)?;
    let mut drops: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (index, value) in values.into_iter().enumerate() {
        let index = index as u32;
        let class = index % protocol_class::COUNT;
        let outcome = (index / protocol_class::COUNT) % counter::COUNT;
        if !counter::is_drop(outcome) {
            continue;
        }
        let labels = (
            counter::NAMES[outcome as usize].to_string(),
            protocol_class::NAMES[class as usize].to_string(),
        );
        // Every reason and protocol is shown, zero included, so rates work from the start.
        *drops.entry(labels).or_default() += value;
    }
    Ok(drops.into_iter().collect())
}

fn map_pressure(enforcer: &Enforcer, conntrack_entries: u64) -> Vec<(String, f64)> {
    let mut pressure = Vec::new();
    let conntrack_capacity = enforcer.conntrack_capacity();
    if conntrack_capacity > 0 {
        pressure.push((
            map_names::CONNTRACK.to_string(),
            conntrack_entries as f64 / f64::from(conntrack_capacity),
        ));
    }
    for (name, used) in enforcer.policy_map_usage() {
        let capacity = enforcer.capacity(name);
        if capacity > 0 {
            pressure.push((name.to_string(), *used as f64 / f64::from(capacity)));
        }
    }
    pressure.sort_by(|a, b| a.0.cmp(&b.0));
    pressure
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let status = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .status()
            .expect("git (installed by `cargo xtask setup`)");
        assert!(status.success(), "git {args:?}");
    }

    #[test]
    fn the_policy_revision_names_the_git_commit_and_uncommitted_changes() {
        let dir = std::env::temp_dir().join(format!("enforcer-git-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(git_commit(&dir), None, "not a checkout");
        git(&dir, &["init", "-q"]);
        git(&dir, &["config", "user.email", "test@example.invalid"]);
        git(&dir, &["config", "user.name", "test"]);
        std::fs::write(
            dir.join("pacs.yaml"),
            "segment: pacs\nmembers: [10.30.0.0/24]\n",
        )
        .unwrap();
        git(&dir, &["add", "."]);
        git(&dir, &["commit", "-q", "-m", "pacs"]);
        let head = String::from_utf8(
            Command::new("git")
                .arg("-C")
                .arg(&dir)
                .args(["rev-parse", "HEAD"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert_eq!(git_commit(&dir).as_deref(), Some(head.trim()));
        std::fs::write(
            dir.join("pacs.yaml"),
            "segment: pacs\nmembers: [10.31.0.0/24]\n",
        )
        .unwrap();
        assert_eq!(git_commit(&dir), Some(format!("{}-dirty", head.trim())));
        let loaded = load_policy(&dir, &mut ReadCache::new()).expect("valid policy");
        assert_eq!(loaded.commit, Some(format!("{}-dirty", head.trim())));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_swapped_configmap_style_link_changes_the_fingerprint() {
        let dir = std::env::temp_dir().join(format!("enforcer-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let policy = "segment: pacs\nmembers: [10.30.0.0/24]\n";
        for version in ["..v1", "..v2"] {
            std::fs::create_dir_all(dir.join(version)).unwrap();
            std::fs::write(dir.join(version).join("pacs.yaml"), policy).unwrap();
        }
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/pacs.yaml", dir.join("pacs.yaml")).unwrap();
        let before = fingerprint(&dir);
        assert_eq!(before.len(), 1, "the linked file is seen");
        // Kubernetes' atomic update: a new `..data` link renamed over the old one.
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        assert_ne!(fingerprint(&dir), before);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_invalid_policy_is_refused_with_the_compilers_errors() {
        let dir = std::env::temp_dir().join(format!("enforcer-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("pacs.yaml"),
            "segment: pacs\nmembers: [10.30.0.1/24]\n",
        )
        .unwrap();
        let error = load_policy(&dir, &mut ReadCache::new())
            .err()
            .expect("host bits set")
            .to_string();
        assert!(error.contains("pacs.yaml:2"), "{error}");
        assert!(error.contains("did you mean 10.30.0.0/24"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
