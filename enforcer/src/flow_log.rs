//! `--flow-log`: every flow event as a JSON line, to stdout or to a file rotated by size.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    fs::{self, File, OpenOptions},
    io::{AsyncWrite, AsyncWriteExt as _, BufWriter},
    sync::broadcast,
};
use tracing::{debug, warn};

use crate::events::{EventHub, FlowEvent};

#[derive(Debug, thiserror::Error)]
pub enum FlowLogError {
    #[error("cannot open the flow log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot rotate the flow log {path}: {source}")]
    Rotate {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the flow log {target}: {source}")]
    Write {
        target: String,
        source: std::io::Error,
    },
}

/// Where the flow log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowLogTarget {
    Stdout,
    /// Appended to; when a line would take it past `max_bytes` it becomes `FILE.1` (`FILE.1`
    /// becomes `FILE.2`, ..., and `FILE.keep` is dropped). `keep` 0 keeps no old lines.
    File {
        path: PathBuf,
        max_bytes: u64,
        keep: usize,
    },
}

impl FlowLogTarget {
    /// The target of `--flow-log PATH` (`-` is stdout).
    pub fn from_arg(path: PathBuf, max_bytes: u64, keep: usize) -> Self {
        if path.as_os_str() == "-" {
            FlowLogTarget::Stdout
        } else {
            FlowLogTarget::File {
                path,
                max_bytes,
                keep,
            }
        }
    }
}

/// Buffered lines reach the disk (or the pipe) at least this often.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Writes every event from `events` until the channel closes (the last [`EventHub`] is
/// dropped; then it flushes and returns). Lines are flushed whenever no event is waiting and at
/// least every second under load, so aborting the task loses at most the current burst.
/// Events the writer falls behind on are counted with [`EventHub::record_lag`].
pub async fn run(
    target: FlowLogTarget,
    mut events: broadcast::Receiver<Arc<FlowEvent>>,
    hub: Arc<EventHub>,
) -> Result<(), FlowLogError> {
    // The hub owns the sender: holding it strongly would keep the channel open forever.
    let weak_hub = Arc::downgrade(&hub);
    drop(hub);
    let mut writer = Writer::open(target).await?;
    let mut flush = tokio::time::interval(FLUSH_INTERVAL);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = false;
    loop {
        tokio::select! {
            received = events.recv() => match received {
                Ok(event) => {
                    let mut line = Vec::with_capacity(320);
                    event.write_json_line(&mut line);
                    writer.write_line(&line).await?;
                    if events.is_empty() {
                        writer.flush().await?;
                        dirty = false;
                    } else {
                        dirty = true;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    if let Some(hub) = weak_hub.upgrade() {
                        hub.record_lag(missed);
                    }
                    warn!(missed, "the flow log fell behind and lost events");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = flush.tick(), if dirty => {
                writer.flush().await?;
                dirty = false;
            }
        }
    }
    writer.flush().await
}

/// The open flow log: stdout, or the current file and its size.
struct Writer {
    out: BufWriter<Box<dyn AsyncWrite + Unpin + Send>>,
    file: Option<RotatingFile>,
}

struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    size: u64,
}

impl Writer {
    async fn open(target: FlowLogTarget) -> Result<Self, FlowLogError> {
        match target {
            FlowLogTarget::Stdout => Ok(Writer {
                out: BufWriter::new(Box::new(tokio::io::stdout())),
                file: None,
            }),
            FlowLogTarget::File {
                path,
                max_bytes,
                keep,
            } => {
                let (file, size) = open_append(&path).await?;
                Ok(Writer {
                    out: BufWriter::new(Box::new(file)),
                    file: Some(RotatingFile {
                        path,
                        max_bytes,
                        keep,
                        size,
                    }),
                })
            }
        }
    }

    async fn write_line(&mut self, line: &[u8]) -> Result<(), FlowLogError> {
        if let Some(file) = &self.file {
            // A line longer than the limit still goes into a fresh file of its own.
            if file.size > 0 && file.size + line.len() as u64 > file.max_bytes {
                self.rotate().await?;
            }
        }
        self.out
            .write_all(line)
            .await
            .map_err(|source| self.write_error(source))?;
        if let Some(file) = &mut self.file {
            file.size += line.len() as u64;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), FlowLogError> {
        self.out
            .flush()
            .await
            .map_err(|source| self.write_error(source))
    }

    async fn rotate(&mut self) -> Result<(), FlowLogError> {
        self.flush().await?;
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        let rotate_error = |source| FlowLogError::Rotate {
            path: file.path.clone(),
            source,
        };
        if file.keep == 0 {
            remove_if_exists(&file.path).await.map_err(rotate_error)?;
        } else {
            remove_if_exists(&numbered(&file.path, file.keep))
                .await
                .map_err(rotate_error)?;
            for n in (1..file.keep).rev() {
                rename_if_exists(&numbered(&file.path, n), &numbered(&file.path, n + 1))
                    .await
                    .map_err(rotate_error)?;
            }
            rename_if_exists(&file.path, &numbered(&file.path, 1))
                .await
                .map_err(rotate_error)?;
        }
        let (new, size) = open_append(&file.path).await?;
        file.size = size;
        self.out = BufWriter::new(Box::new(new));
        debug!(path = %file.path.display(), "rotated the flow log");
        Ok(())
    }

    fn write_error(&self, source: std::io::Error) -> FlowLogError {
        let target = match &self.file {
            Some(file) => file.path.display().to_string(),
            None => "stdout".to_string(),
        };
        FlowLogError::Write { target, source }
    }
}

async fn open_append(path: &Path) -> Result<(File, u64), FlowLogError> {
    let open_error = |source| FlowLogError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(open_error)?;
    let size = file.metadata().await.map_err(open_error)?.len();
    Ok((file, size))
}

/// `FILE.n`.
fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

async fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path).await {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

async fn rename_if_exists(from: &Path, to: &Path) -> std::io::Result<()> {
    match fs::rename(from, to).await {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn event(n: u16) -> FlowEvent {
        FlowEvent {
            time: "2024-11-23T04:31:07.123Z".into(),
            iface: "eth0".into(),
            direction: "ingress".into(),
            src: IpAddr::V4(Ipv4Addr::new(10, 10, 0, 20)),
            dst: IpAddr::V4(Ipv4Addr::new(10, 60, 0, 10)),
            sport: Some(n),
            dport: Some(5432),
            proto: "tcp".into(),
            icmp_type: None,
            src_segment: "radiology".into(),
            dst_segment: "billing".into(),
            verdict: "deny".into(),
            reason: "policy_denied".into(),
            rule: None,
            revision: "abc".into(),
        }
    }

    fn line_len(n: u16) -> u64 {
        serde_json::to_vec(&event(n)).unwrap().len() as u64 + 1
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("enforcer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn read_sports(path: &Path) -> Vec<u16> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| {
                serde_json::from_str::<FlowEvent>(line)
                    .unwrap()
                    .sport
                    .unwrap()
            })
            .collect()
    }

    async fn write_events(target: FlowLogTarget, ports: impl Iterator<Item = u16>) {
        let hub = Arc::new(EventHub::new(1024, 16));
        let events = hub.subscribe();
        let task = tokio::spawn(run(target, events, hub.clone()));
        for n in ports {
            hub.publish(event(n));
        }
        // Dropping the last sender closes the channel: `run` flushes and returns.
        drop(hub);
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn rotates_by_size_and_keeps_the_newest_files() {
        let dir = temp_dir("rotation");
        let path = dir.join("flows.json");
        // Every line has the same length (5-digit ports): three lines fit in a file.
        let line = line_len(10000);
        let target = FlowLogTarget::File {
            path: path.clone(),
            max_bytes: 3 * line,
            keep: 2,
        };
        write_events(target.clone(), 10000..10011).await;
        assert_eq!(read_sports(&path), [10009, 10010]);
        assert_eq!(read_sports(&numbered(&path, 1)), [10006, 10007, 10008]);
        assert_eq!(read_sports(&numbered(&path, 2)), [10003, 10004, 10005]);
        assert!(!numbered(&path, 3).exists());

        // A restart appends to the current file, counting what is already there.
        write_events(target, 10011..10013).await;
        assert_eq!(read_sports(&path), [10012]);
        assert_eq!(read_sports(&numbered(&path, 1)), [10009, 10010, 10011]);
        assert_eq!(read_sports(&numbered(&path, 2)), [10006, 10007, 10008]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn keep_zero_truncates() {
        let dir = temp_dir("keep-zero");
        let path = dir.join("flows.json");
        let target = FlowLogTarget::File {
            path: path.clone(),
            max_bytes: 2 * line_len(10000),
            keep: 0,
        };
        write_events(target, 10000..10005).await;
        assert_eq!(read_sports(&path), [10004]);
        assert!(!numbered(&path, 1).exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn dash_is_stdout() {
        assert_eq!(
            FlowLogTarget::from_arg("-".into(), 1, 1),
            FlowLogTarget::Stdout
        );
    }
}
