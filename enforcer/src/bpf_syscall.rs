//! The raw `bpf(2)` syscall, for the commands aya 0.14 does not offer: batch map operations
//! (`policy_maps`) and a map-in-map of this process's own (`quiesce`).
use std::io;

/// Runs `command` with `attr`, the `union bpf_attr` prefix it reads (the kernel takes the rest
/// as zero); the syscall's non-negative result, such as a new file descriptor.
///
/// # Safety
/// `attr` must be the prefix of `union bpf_attr` that `command` reads, and every pointer in it
/// must be valid for what the kernel reads or writes there, for the call.
pub(crate) unsafe fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for `attr`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
