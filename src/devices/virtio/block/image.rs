//! A raw disk image: opening it (buffered, or `O_DIRECT` for
//! `cache=none`), its OFD lock against a second writer, and the I/O a
//! request needs: vectored reads and writes straight between the file and
//! guest memory, through an aligned bounce buffer when `O_DIRECT` cannot
//! take the guest's buffers as they are, flushes, and zeroing by punching
//! holes.
//!
//! The lock is an open-file-description lock over the whole file (as
//! QEMU's image locking uses OFD locks): exclusive for a writer, shared for
//! a read-only open, so a second writer, or a writer beside a reader, is
//! refused with a message naming the file. It lives as long as the file
//! stays open, and a migration destination can open the image without it
//! and take it at the switch ([`DiskImage::lock`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::bitmap::{AtomicBitmap, Bitmap, BS};
use vm_memory::VolatileSlice;

/// Alignment vmhop gives `O_DIRECT` I/O: file offsets, lengths and buffer
/// addresses (the guest's block size, and every file system's limit).
pub const DIRECT_ALIGN: u64 = 4096;
/// Bytes of a disk sector (the unit of request offsets).
pub const SECTOR: u64 = 512;
/// Size of the bounce buffer: unaligned `O_DIRECT` requests go through it
/// in pieces this large.
const BOUNCE_BYTES: usize = 1 << 20;

/// A piece of guest memory a request reads into or writes from.
pub type GuestSlice<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;

/// How the image is cached on the host.
pub use crate::vmm::config::CacheMode;

/// Which lock the image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// None (a migration destination before the switch).
    Unlocked,
    /// Shared: readers only.
    Shared,
    /// Exclusive: the one writer.
    Exclusive,
}

/// Opening or locking an image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// open(2) failed.
    #[error("cannot open disk image {}{}: {source}", path.display(), if *direct { " with O_DIRECT (cache=none)" } else { "" })]
    Open {
        /// The image.
        path: PathBuf,
        /// Whether O_DIRECT was asked for.
        direct: bool,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file, or a size vmhop cannot serve.
    #[error("disk image {}: {why}", path.display())]
    Unusable {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Another process (or open) holds a conflicting lock.
    #[error("disk image {} is locked by {holder} (F_OFD_SETLK {mode}: {source}); is another VM using it?", path.display())]
    Locked {
        /// The image.
        path: PathBuf,
        /// Who holds it, as far as can be told.
        holder: &'static str,
        /// The lock asked for.
        mode: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// An open raw image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
    direct: bool,
    readonly: bool,
    lock: std::sync::Mutex<LockMode>,
}

/// An `O_DIRECT`-aligned buffer for the bounce path.
pub struct Bounce {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain heap memory owned by this value; it is only
// reached through `&mut self`.
unsafe impl Send for Bounce {}

impl Bounce {
    /// An aligned buffer of [`BOUNCE_BYTES`].
    pub fn new() -> Self {
        Self::sized(BOUNCE_BYTES)
    }

    /// An aligned buffer of `len` bytes (at least one alignment unit).
    pub fn sized(len: usize) -> Self {
        let len = len.max(DIRECT_ALIGN as usize);
        let layout = std::alloc::Layout::from_size_align(len, DIRECT_ALIGN as usize)
            .expect("a valid layout: a non-zero size, a power-of-two alignment");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Bounce { ptr, layout }
    }

    /// The first `len` bytes (at most the buffer's size), aligned for
    /// `O_DIRECT`.
    pub fn buf(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `layout.size()` initialised
        // bytes, borrowed mutably through `self`; the length is clamped
        // to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.layout.size())) }
    }

    /// The buffer's size in bytes.
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }
}

impl Default for Bounce {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn ofd_lock(file: &File, kind: libc::c_short) -> std::io::Result<()> {
    let fl = libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK reads a valid `struct flock` from the pointer;
    // the fd is open for as long as `file`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl DiskImage {
    /// Opens `path` and takes its lock: shared if `readonly`, else
    /// exclusive (`lock: false` opens it unlocked, for a migration
    /// destination that takes the lock at the switch).
    pub fn open(
        path: &Path,
        readonly: bool,
        cache: CacheMode,
        lock: bool,
    ) -> Result<DiskImage, ImageError> {
        let direct = cache == CacheMode::None;
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .custom_flags(flags)
            .open(path)
            .map_err(|source| ImageError::Open {
                path: path.into(),
                direct,
                source,
            })?;
        let unusable = |why: String| ImageError::Unusable {
            path: path.into(),
            why,
        };
        let meta = file
            .metadata()
            .map_err(|e| unusable(format!("fstat failed: {e}")))?;
        if !meta.is_file() {
            return Err(unusable("not a regular file (raw images only)".into()));
        }
        let size = meta.len();
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(unusable(format!(
                "its size, {size} bytes, is not a positive multiple of the {SECTOR}-byte sector"
            )));
        }
        if direct && !size.is_multiple_of(DIRECT_ALIGN) {
            return Err(unusable(format!(
                "cache=none needs a size that is a multiple of {DIRECT_ALIGN} bytes; it has {size}"
            )));
        }
        let image = DiskImage {
            file,
            path: path.into(),
            size,
            direct,
            readonly,
            lock: std::sync::Mutex::new(LockMode::Unlocked),
        };
        if lock {
            image.lock()?;
        }
        Ok(image)
    }

    /// Creates `path` (which must not exist) as a sparse image of `size`
    /// bytes, opened for writing and locked: a new top layer (an overlay,
    /// or the file a restored disk lands in).
    pub fn create_sparse(
        path: &Path,
        size: u64,
        cache: CacheMode,
    ) -> Result<DiskImage, ImageError> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| ImageError::Open {
                path: path.into(),
                direct: false,
                source,
            })?;
        f.set_len(size).map_err(|e| ImageError::Unusable {
            path: path.into(),
            why: format!("cannot size it to {size} bytes: {e}"),
        })?;
        drop(f);
        Self::open(path, false, cache, true)
    }

    /// Takes the image's lock (shared when read-only, else exclusive).
    pub fn lock(&self) -> Result<(), ImageError> {
        let (kind, mode, holder) = match self.readonly {
            true => (libc::F_RDLCK, "F_RDLCK", "a writer"),
            false => (libc::F_WRLCK, "F_WRLCK", "another user"),
        };
        ofd_lock(&self.file, kind as libc::c_short).map_err(|source| ImageError::Locked {
            path: self.path.clone(),
            holder,
            mode,
            source,
        })?;
        *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = match self.readonly {
            true => LockMode::Shared,
            false => LockMode::Exclusive,
        };
        Ok(())
    }

    /// Turns an exclusive lock into a shared one: the image became a
    /// read-only layer, which other readers (a restore of a checkpoint
    /// that refers to it) may share; a writer is still refused.
    pub fn share_lock(&self) -> Result<(), ImageError> {
        if self.lock_mode() != LockMode::Exclusive {
            return Ok(());
        }
        ofd_lock(&self.file, libc::F_RDLCK as libc::c_short).map_err(|source| {
            ImageError::Locked {
                path: self.path.clone(),
                holder: "another user",
                mode: "F_RDLCK",
                source,
            }
        })?;
        *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = LockMode::Shared;
        Ok(())
    }

    /// Releases the lock (a migration source after its final flush).
    pub fn unlock(&self) -> std::io::Result<()> {
        ofd_lock(&self.file, libc::F_UNLCK as libc::c_short)?;
        *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = LockMode::Unlocked;
        Ok(())
    }

    /// The lock held now.
    pub fn lock_mode(&self) -> LockMode {
        *self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the image is open with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Reads `buf.len()` bytes at `offset` into a buffer of vmhop's own
    /// (with `O_DIRECT`, the caller gives a [`Bounce`] buffer and aligned
    /// offsets and lengths).
    pub fn pread(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `buf` at `offset` (the same alignment rules as `pread`).
    pub fn pwrite(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// The open file (a lower layer reopens it for buffered reads).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the image was opened read-only.
    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    /// Makes every completed write durable (fdatasync).
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Reads `buf.len()` bytes at `offset` into vmhop's own memory (the
    /// host-side `verify`), through the bounce buffer so `O_DIRECT` can
    /// take any buffer and offset.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if !self.direct {
            return self.file.read_exact_at(buf, offset);
        }
        let mut bounce = Bounce::new();
        self.windows(offset, buf.len() as u64, |w0, w_len, lo, hi| {
            let b = bounce.buf(w_len);
            self.file.read_exact_at(b, w0)?;
            let (from, to) = ((lo - offset) as usize, (hi - offset) as usize);
            buf[from..to].copy_from_slice(&b[(lo - w0) as usize..(hi - w0) as usize]);
            Ok(())
        })
    }

    /// Whether `O_DIRECT` can take these buffers at `offset` as they are.
    fn aligned(&self, offset: u64, slices: &[GuestSlice<'_>]) -> bool {
        let a = DIRECT_ALIGN as usize;
        !self.direct
            || (offset.is_multiple_of(DIRECT_ALIGN)
                && slices.iter().all(|s| {
                    s.len().is_multiple_of(a) && (s.ptr_guard().as_ptr() as usize).is_multiple_of(a)
                }))
    }

    /// Reads `offset ..` into `slices`, in order, marking what it wrote in
    /// guest memory dirty.
    pub fn read_into(
        &self,
        offset: u64,
        slices: &[GuestSlice<'_>],
        bounce: &mut Bounce,
    ) -> std::io::Result<()> {
        if self.aligned(offset, slices) {
            let r = self.vectored(offset, slices, false, false);
            // Whatever the syscall reached may have changed, even on error.
            for s in slices {
                s.bitmap().mark_dirty(0, s.len());
            }
            return r;
        }
        let total: u64 = slices.iter().map(|s| s.len() as u64).sum();
        let mut cursor = Cursor::new(slices);
        self.windows(offset, total, |w0, w_len, lo, hi| {
            let buf = bounce.buf(w_len);
            self.file.read_exact_at(buf, w0)?;
            // copy_from marks the guest pages it writes.
            cursor.copy_in(&buf[(lo - w0) as usize..(hi - w0) as usize]);
            Ok(())
        })
    }

    /// Writes `slices`, in order, at `offset ..`; with `dsync` the data is
    /// durable when this returns (a writethrough cache).
    pub fn write_from(
        &self,
        offset: u64,
        slices: &[GuestSlice<'_>],
        bounce: &mut Bounce,
        dsync: bool,
    ) -> std::io::Result<()> {
        if self.aligned(offset, slices) {
            return self.vectored(offset, slices, true, dsync);
        }
        let total: u64 = slices.iter().map(|s| s.len() as u64).sum();
        let mut cursor = Cursor::new(slices);
        self.windows(offset, total, |w0, w_len, lo, hi| {
            let buf = bounce.buf(w_len);
            if lo > w0 || hi < w0 + w_len as u64 {
                // Part of the window keeps its bytes: read them first.
                self.file.read_exact_at(buf, w0)?;
            }
            cursor.copy_out(&mut buf[(lo - w0) as usize..(hi - w0) as usize]);
            self.file.write_all_at(buf, w0)
        })?;
        if dsync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Calls `f(window start, window length, lo, hi)` for each aligned
    /// window of at most [`BOUNCE_BYTES`] covering `offset .. offset +
    /// len`, with `lo .. hi` the part of the request inside it.
    fn windows(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, usize, u64, u64) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let end = offset + len;
        let mut w0 = offset - offset % DIRECT_ALIGN;
        let a_end = end.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        while w0 < a_end {
            let w1 = (w0 + BOUNCE_BYTES as u64).min(a_end);
            f(w0, (w1 - w0) as usize, offset.max(w0), end.min(w1))?;
            w0 = w1;
        }
        Ok(())
    }

    /// One preadv/pwritev (repeated on short transfers) between the file
    /// and guest memory.
    fn vectored(
        &self,
        offset: u64,
        slices: &[GuestSlice<'_>],
        write: bool,
        dsync: bool,
    ) -> std::io::Result<()> {
        let mut iov: Vec<libc::iovec> = slices
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            })
            .collect();
        let mut at = offset;
        let mut first = 0;
        while first < iov.len() {
            let cnt = (iov.len() - first).min(libc::UIO_MAXIOV as usize) as libc::c_int;
            let p = iov[first..].as_ptr();
            // SAFETY: every iovec points into guest memory that the caller's
            // DeviceMemory guard keeps mapped for this call, each within a
            // slice vm-memory checked; the kernel reads or writes at most
            // iov_len bytes of each.
            let n = unsafe {
                if write {
                    libc::pwritev2(
                        self.file.as_raw_fd(),
                        p,
                        cnt,
                        at as libc::off_t,
                        if dsync { libc::RWF_DSYNC } else { 0 },
                    )
                } else {
                    libc::preadv(self.file.as_raw_fd(), p, cnt, at as libc::off_t)
                }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} ends at {at}", self.path.display()),
                ));
            }
            let mut n = n as usize;
            at += n as u64;
            while n > 0 && first < iov.len() {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: advancing within the same buffer, by less
                    // than its length.
                    v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    /// Makes `offset .. offset + len` read as zeros: punches a hole (the
    /// blocks are freed), or where the file system cannot, zeroes the range
    /// in place (FALLOC_FL_ZERO_RANGE, else by writing zeros).
    pub fn zero(&self, offset: u64, len: u64, bounce: &mut Bounce) -> std::io::Result<()> {
        let fd = self.file.as_raw_fd();
        for mode in [
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        ] {
            // SAFETY: fallocate on our own fd with a range inside the file.
            let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
        }
        self.windows(offset, len, |w0, w_len, lo, hi| {
            let buf = bounce.buf(w_len);
            if lo > w0 || hi < w0 + w_len as u64 {
                self.file.read_exact_at(buf, w0)?;
            }
            buf[(lo - w0) as usize..(hi - w0) as usize].fill(0);
            self.file.write_all_at(buf, w0)
        })
    }
}

/// A position in a list of guest slices, for the bounce path's copies.
pub(crate) struct Cursor<'s, 'a> {
    slices: &'s [GuestSlice<'a>],
    index: usize,
    offset: usize,
}

impl<'s, 'a> Cursor<'s, 'a> {
    pub(crate) fn new(slices: &'s [GuestSlice<'a>]) -> Self {
        Cursor {
            slices,
            index: 0,
            offset: 0,
        }
    }

    /// Walks `len` bytes, calling `f(slice part, bytes done so far)`.
    fn walk(&mut self, len: usize, mut f: impl FnMut(&GuestSlice<'a>, usize, usize, usize)) {
        let mut done = 0;
        while done < len && self.index < self.slices.len() {
            let s = &self.slices[self.index];
            let n = (s.len() - self.offset).min(len - done);
            f(s, self.offset, n, done);
            done += n;
            self.offset += n;
            if self.offset == s.len() {
                self.index += 1;
                self.offset = 0;
            }
        }
    }

    /// Copies `data` into the guest slices at the cursor (vm-memory marks
    /// the pages dirty).
    pub(crate) fn copy_in(&mut self, data: &[u8]) {
        self.walk(data.len(), |s, off, n, done| {
            if let Ok(part) = s.subslice(off, n) {
                part.copy_from(&data[done..done + n]);
            }
        });
    }

    /// Copies guest bytes at the cursor into `data`.
    fn copy_out(&mut self, data: &mut [u8]) {
        self.walk(data.len(), |s, off, n, done| {
            if let Ok(part) = s.subslice(off, n) {
                part.copy_to(&mut data[done..done + n]);
            }
        });
    }
}
