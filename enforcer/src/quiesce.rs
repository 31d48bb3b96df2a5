//! Waiting until no BPF program still runs with what it read before a change.
//!
//! A packet's program reads the active policy slot once and then looks up that slot's maps; a
//! quarantine or a revoked grant is read once per judgement and may create connection state
//! afterwards. After userspace switches the slot or removes an entry, a program that started
//! before can still be running with the old value: on a VM whose virtual CPU the host stops,
//! for milliseconds or longer. Emptying the old slot, or cutting flows, while it runs would
//! judge its packet by a mixture, or let it recreate what was just cut. So those steps wait
//! with [`wait_for_running_programs`] first, rather than for a fixed time.
//!
//! Linux has no syscall for "wait for running programs"; it does wait, in every update of a
//! map-in-map element, for an RCU grace period (`maybe_wait_bpf_programs` in
//! `kernel/bpf/syscall.c`, since 2018: every kernel this project runs on), so that userspace
//! knows the old inner map is no longer used. XDP and TC programs (and
//! `BPF_PROG_TEST_RUN`) run as RCU readers, so once that update returns, every program that
//! started before it has ended. The barrier is a one-element `ARRAY_OF_MAPS`, owned by this
//! process and used by no program, whose element is rewritten.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::bpf_syscall::bpf;

#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    #[error("creating the map that waits for running BPF programs: {0}")]
    Create(#[source] io::Error),
    #[error("waiting for running BPF programs (a map-in-map update): {0}")]
    Wait(#[source] io::Error),
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// The `BPF_MAP_CREATE` prefix of `union bpf_attr`; the kernel reads the rest as zero.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
}

/// The `BPF_MAP_UPDATE_ELEM` prefix of `union bpf_attr`.
#[repr(C)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn create_map(attr: &mut MapCreateAttr) -> io::Result<OwnedFd> {
    // SAFETY: a `BPF_MAP_CREATE` attribute without pointers.
    let fd = unsafe { bpf(BPF_MAP_CREATE, attr) }?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The map-in-map whose element update waits for a grace period.
struct Barrier {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl Barrier {
    fn create() -> io::Result<Self> {
        let inner = create_map(&mut MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            ..MapCreateAttr::default()
        })?;
        let outer = create_map(&mut MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY_OF_MAPS,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            inner_map_fd: inner.as_raw_fd() as u32,
            ..MapCreateAttr::default()
        })?;
        Ok(Barrier { outer, inner })
    }

    fn wait(&self) -> io::Result<()> {
        let key = 0u32;
        let value = self.inner.as_raw_fd() as u32;
        let mut attr = MapUpdateAttr {
            map_fd: self.outer.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            flags: 0,
        };
        // SAFETY: `key` and `value` are 4 bytes each, as the map was created with, and live
        // for the call.
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(|_| ())
    }
}

/// One barrier for the process: a grace period is system-wide, whoever asks for it.
static BARRIER: Mutex<Option<Arc<Barrier>>> = Mutex::new(None);

/// Returns once every BPF program that was running when it was called has ended (see the
/// module documentation); how long that took. Takes milliseconds; needs `CAP_BPF`.
pub fn wait_for_running_programs() -> Result<Duration, QuiesceError> {
    let started = Instant::now();
    let barrier = {
        let mut barrier = BARRIER.lock().unwrap_or_else(|p| p.into_inner());
        match &*barrier {
            Some(barrier) => Arc::clone(barrier),
            None => {
                let created = Arc::new(Barrier::create().map_err(QuiesceError::Create)?);
                *barrier = Some(Arc::clone(&created));
                created
            }
        }
    };
    barrier.wait().map_err(QuiesceError::Wait)?;
    Ok(started.elapsed())
}
