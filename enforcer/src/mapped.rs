//! The elements of a `BPF_F_MMAPABLE` array, mapped into this process while they are read or
//! written, and unmapped on drop: the daemon does not keep the kernel's tables in its resident
//! memory. Reading or writing a large array this way is a memory copy, where one syscall per
//! element (even in batches) took most of a reload's write time.
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

    /// Copies `elements` to the start of the mapping.
    pub(crate) fn write<T: Copy>(&self, elements: &[T]) {
        let bytes = std::mem::size_of_val(elements);
        assert!(bytes <= self.len, "writing past the mapping");
        // SAFETY: `bytes` fit the mapping (checked), which cannot overlap a Rust slice.
        unsafe {
            std::ptr::copy_nonoverlapping(elements.as_ptr().cast::<u8>(), self.as_ptr(), bytes)
        };
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
