//! `enforcer observe` inside a lab host, its output lines collected as they arrive.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    marker::PhantomData,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use super::{Enforcer, Result, io_error};

/// One line `enforcer observe` printed, with when this process read it.
#[derive(Clone, Debug)]
pub struct ObservedLine {
    pub at: Instant,
    pub line: String,
}

#[derive(Default)]
struct Output {
    lines: Vec<ObservedLine>,
    closed: bool,
}

/// A running `enforcer observe`. Dropping it kills the process. It borrows the daemon it
/// follows, so it is gone before the daemon is.
pub struct Observer<'a> {
    child: Child,
    output: Arc<(Mutex<Output>, Condvar)>,
    stderr: Option<JoinHandle<String>>,
    _enforcer: PhantomData<&'a Enforcer<'a>>,
}

impl Observer<'_> {
    pub(super) fn spawn(
        host: &str,
        netns: &str,
        bin: &Path,
        addr: &str,
        args: &[&str],
    ) -> Result<Self> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(bin)
            .args(["observe", "--addr", addr])
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // Not left running if this process dies without unwinding.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(io_error(format!("starting `enforcer observe` in {host}")))?;
        let output = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        if let Some(stdout) = child.stdout.take() {
            let output = Arc::clone(&output);
            thread::spawn(move || {
                let (lock, changed) = &*output;
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let at = Instant::now();
                    lock.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .lines
                        .push(ObservedLine { at, line });
                    changed.notify_all();
                }
                lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
                changed.notify_all();
            });
        }
        let stderr = child.stderr.take().map(|mut err| {
            thread::spawn(move || {
                let mut text = String::new();
                let _ = err.read_to_string(&mut text);
                text
            })
        });
        Ok(Self {
            child,
            output,
            stderr,
            _enforcer: PhantomData,
        })
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<ObservedLine> {
        self.output
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .clone()
    }

    /// The first line (already printed or yet to come) that satisfies `pred`, waiting up to
    /// `timeout`; `None` on timeout or when the output ends without one.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<ObservedLine> {
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.output;
        let mut output = lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut checked = 0;
        loop {
            if let Some(found) = output.lines[checked..].iter().find(|l| pred(&l.line)) {
                return Some(found.clone());
            }
            checked = output.lines.len();
            let left = deadline.saturating_duration_since(Instant::now());
            if output.closed || left.is_zero() {
                return None;
            }
            output = changed
                .wait_timeout(output, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Kills the process and returns what it wrote to stderr (errors, for failure messages).
    pub fn stop(mut self) -> String {
        self.kill();
        self.stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Observer<'_> {
    fn drop(&mut self) {
        self.kill();
    }
}
