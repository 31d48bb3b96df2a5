//! The elements of a `BPF_F_MMAPABLE` array, mapped into this process while they are read or
//! written, and unmapped on drop: the daemon does not keep the kernel's tables in its resident
//! memory. Reading or writing a large array this way is a memory access, where one syscall per
//! element (even in batches) took most of a reload's write time; writing in place also spares
//! the daemon a copy of the table in its own heap.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr::NonNull,
};

pub(crate) struct Mapped {
    memory: NonNull<u8>,
    len: usize,
}

impl Mapped {
    /// `len` bytes of the array `fd` from byte `offset` (a multiple of the page size), shared
    /// with the kernel.
    pub(crate) fn map(fd: BorrowedFd<'_>, offset: usize, len: usize) -> io::Result<Self> {
        // SAFETY: a shared mapping of a BPF_F_MMAPABLE array's data, which the kernel keeps
        // valid until it is unmapped, whatever happens to the fd; it refuses a range past the
        // array's end.
        let memory = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if memory == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let memory = NonNull::new(memory.cast()).ok_or_else(|| io::Error::other("mmap: null"))?;
        Ok(Mapped { memory, len })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.memory.as_ptr()
    }

    /// The first `count` elements of the mapping, to write in place.
    ///
    /// # Safety
    /// Nothing else may access the mapped memory while the slice lives: the kernel's programs
    /// must not read the array (an inactive policy slot), and no other mapping of it is written.
    pub(crate) unsafe fn elements_mut<T: aya::Pod>(&mut self, count: usize) -> &mut [T] {
        assert!(
            count * std::mem::size_of::<T>() <= self.len,
            "past the mapping"
        );
        assert!(
            self.as_ptr().cast::<T>().is_aligned(),
            "a misaligned mapping"
        );
        // SAFETY: inside the mapping and aligned (checked), exclusive by the caller's promise;
        // `Pod` makes any bytes a valid `T`.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr().cast::<T>(), count) }
    }

    /// The first `count` elements of the mapping.
    pub(crate) fn read<T: aya::Pod>(&self, count: usize) -> Vec<T> {
        assert!(
            count * std::mem::size_of::<T>() <= self.len,
            "reading past the mapping"
        );
        (0..count)
            .map(|index| {
                // SAFETY: inside the mapping (checked); `Pod` takes any bytes.
                unsafe { self.as_ptr().cast::<T>().add(index).read_volatile() }
            })
            .collect()
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.memory.as_ptr().cast(), self.len) };
    }
}
