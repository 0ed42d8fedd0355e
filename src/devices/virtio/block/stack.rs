//! The disk as a stack of layers: a writable **top** file, a `present`
//! bitmap of the blocks it holds when it is not complete, and an optional
//! read-only **lower** layer below it.
//!
//! - A flat disk (a boot: the user's image) is a complete top and no lower.
//! - After a VM's first checkpoint its image is the lower layer (read-only
//!   from then on, as with QEMU's external snapshots) and the top is a
//!   sparse overlay in the checkpoint directory that starts empty.
//! - A restored disk's top is a new sparse file and its lower layer the
//!   checkpoint chain's view of the disk (a [`Lower`] the service wires in:
//!   devices do not know checkpoints); a filler ([`Stack::fill`]) copies
//!   the rest into the top, and the lower layer is dropped once the top is
//!   complete.
//!
//! Reads of a block the top does not hold come from the lower layer; a
//! write that covers only part of such a block copies it up first, so the
//! top never holds a block half new, half hole.
//!
//! The stack also keeps a checkpoint's **copy-before-write** protection:
//! the blocks still to be stored when the checkpoint paused the VM are
//! protected ([`Stack::protect`]); before the guest writes one of them, its
//! content is saved, and [`Stack::drain`] hands each protected block over
//! as it was at the pause. This is the disk's side of what `memory::cow`
//! does for guest memory with userfaultfd write protection.
//!
//! Every change to the layers happens under one lock, held by a guest write
//! for its whole duration (writes come from the device's one worker
//! thread); reads take it only to see which blocks the top holds.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::image::{Bounce, Cursor, DiskImage, GuestSlice};
use crate::memory::{is_zero_page, DirtyBitmap};

/// Bytes of a block: the unit of the `present` bitmap, of copy-up and of
/// the written-blocks set (one guest block, one page).
pub const BLOCK: u64 = super::written::DEFAULT_GRANULARITY;
/// Blocks the filler copies at a time.
const FILL_BLOCKS: u64 = 256;
/// Blocks a drain hands over at a time.
const DRAIN_BLOCKS: u64 = 256;

/// What receives drained blocks: (first block, bytes of a run of them).
pub type EachRun<'a, E> = dyn FnMut(u64, &[u8]) -> Result<(), E> + 'a;

/// A read-only layer below a disk's top: what the disk holds where the top
/// holds nothing.
pub trait Lower: Send + Sync + std::fmt::Debug {
    /// Reads `buf.len()` bytes at `offset`; both are multiples of
    /// [`BLOCK`], except that the last read may end at the disk's end.
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// What this layer is, for messages (`the image /x.img`).
    fn describe(&self) -> String;
    /// The raw image this layer is, if it is one: a checkpoint chain's
    /// base, which checkpoints refer to by identity.
    fn image_path(&self) -> Option<PathBuf> {
        None
    }
    /// Makes what was written to this layer before it became read-only
    /// durable (a flat image's last writes, once it is a chain's base).
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A raw image as a lower layer: read-only from the moment it became one.
/// It keeps the image open, and so its lock: no other VM writes it.
#[derive(Debug)]
pub struct ImageLower {
    image: Arc<DiskImage>,
    /// The same file opened again without `O_DIRECT`, so reads of any
    /// alignment work.
    file: File,
}

impl ImageLower {
    /// The image `image` as a lower layer.
    pub fn new(image: Arc<DiskImage>) -> std::io::Result<ImageLower> {
        // The same inode, through the descriptor: a path may name another
        // file by now.
        let file = File::open(format!("/proc/self/fd/{}", image.file().as_raw_fd()))?;
        // Read-only from now on: a restore of a checkpoint over it may
        // read it too (a writer is still refused).
        image.share_lock().map_err(std::io::Error::other)?;
        Ok(ImageLower { image, file })
    }
}

impl Lower for ImageLower {
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        read_clamped(&self.file, self.image.size(), offset, buf)
    }

    fn describe(&self) -> String {
        format!("the image {}", self.image.path().display())
    }

    fn image_path(&self) -> Option<PathBuf> {
        Some(self.image.path().to_path_buf())
    }

    fn flush(&self) -> std::io::Result<()> {
        self.image.flush()
    }
}

/// Reads `buf.len()` bytes at `offset` of a file `size` bytes long; what
/// lies past its end reads as zeros.
pub fn read_clamped(file: &File, size: u64, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    file.read_exact_at(&mut buf[..n], offset)?;
    buf[n..].fill(0);
    Ok(())
}

/// Changing a disk's layers failed.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The top is not complete: it has a lower layer.
    #[error("disk image {}: it is not a flat image yet ({what})", path.display())]
    NotFlat {
        /// The top.
        path: PathBuf,
        /// What it sits on.
        what: String,
    },
    /// A lower layer could not be made.
    #[error("disk image {}: cannot reopen it as a read-only layer: {source}", path.display())]
    Reopen {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing a block failed.
    #[error("disk {}: {what}: {source}", path.display())]
    Io {
        /// The top.
        path: PathBuf,
        /// What was done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What a disk's stack looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// A complete top and no lower layer.
    Flat,
    /// An overlay over a raw image (the chain's base).
    OverImage(PathBuf),
    /// Over another layer (a checkpoint chain's view), still filling.
    Filling {
        /// Blocks the top holds.
        present: u64,
        /// Blocks of the disk.
        blocks: u64,
        /// The layer below.
        lower: String,
    },
}

struct Layers {
    top: Arc<DiskImage>,
    /// Blocks the top holds; None with no lower layer (all of them).
    present: Option<DirtyBitmap>,
    lower: Option<Arc<dyn Lower>>,
    /// Blocks protected by a checkpoint's pause and not drained yet.
    protected: Option<DirtyBitmap>,
    /// Protected blocks the guest has written since: their content as it
    /// was at the pause.
    saved: BTreeMap<u64, Vec<u8>>,
}

impl Layers {
    fn holds(&self, b: u64) -> bool {
        self.present.as_ref().is_none_or(|p| p.get(b))
    }
}

/// A disk: its layers and the protection a checkpoint set.
pub struct Stack {
    size: u64,
    blocks: u64,
    layers: Mutex<Layers>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("size", &self.size)
            .field("shape", &self.shape())
            .finish()
    }
}

/// The byte ranges of `offset .. offset + len` the top holds (true) or not,
/// as (start, end, held), in order.
fn runs(l: &Layers, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = offset + len;
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut b = offset / BLOCK;
    while b * BLOCK < end {
        let (lo, hi) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(end));
        let held = l.holds(b);
        match out.last_mut() {
            Some(last) if last.2 == held && last.1 == lo => last.1 = hi,
            _ => out.push((lo, hi, held)),
        }
        b += 1;
    }
    out
}

/// The part `from .. from + len` of the byte stream `slices`.
fn sub_slices<'a>(slices: &[GuestSlice<'a>], from: u64, len: u64) -> Vec<GuestSlice<'a>> {
    let mut out = Vec::new();
    let (mut at, end) = (0u64, from + len);
    for s in slices {
        let n = s.len() as u64;
        let (lo, hi) = (at.max(from), (at + n).min(end));
        if lo < hi {
            if let Ok(part) = s.subslice((lo - at) as usize, (hi - lo) as usize) {
                out.push(part);
            }
        }
        at += n;
    }
    out
}

impl Stack {
    /// A flat disk: `image` complete, nothing below.
    pub fn flat(image: DiskImage) -> Stack {
        Self::build(image, None)
    }

    /// `top` (a new, empty file of the disk's size) over `lower`: every
    /// block comes from `lower` until the top holds it.
    pub fn over(top: DiskImage, lower: Arc<dyn Lower>) -> Stack {
        Self::build(top, Some(lower))
    }

    fn build(top: DiskImage, lower: Option<Arc<dyn Lower>>) -> Stack {
        let size = top.size();
        let blocks = size.div_ceil(BLOCK);
        Stack {
            size,
            blocks,
            layers: Mutex::new(Layers {
                top: Arc::new(top),
                present: lower.as_ref().map(|_| DirtyBitmap::new(blocks)),
                lower,
                protected: None,
                saved: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Layers> {
        self.layers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The top layer: the file the guest's writes go to.
    pub fn top(&self) -> Arc<DiskImage> {
        self.lock().top.clone()
    }

    /// The top's path.
    pub fn path(&self) -> PathBuf {
        self.lock().top.path().to_path_buf()
    }

    /// What the stack looks like now.
    pub fn shape(&self) -> Shape {
        let l = self.lock();
        match (&l.lower, &l.present) {
            (Some(lower), Some(p)) => match lower.image_path() {
                Some(path) => Shape::OverImage(path),
                None => Shape::Filling {
                    present: p.count(),
                    blocks: self.blocks,
                    lower: lower.describe(),
                },
            },
            _ => Shape::Flat,
        }
    }

    /// The blocks the top holds (all of them when flat): what differs, or
    /// may differ, from the lower layer.
    pub fn present_blocks(&self) -> DirtyBitmap {
        match &self.lock().present {
            Some(p) => p.clone(),
            None => DirtyBitmap::full(self.blocks),
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> std::io::Result<()> {
        self.top().flush()
    }

    /// Makes the lower layer's earlier writes durable (outside any pause:
    /// an fdatasync may take milliseconds).
    pub fn flush_lower(&self) -> std::io::Result<()> {
        let lower = self.lock().lower.clone();
        lower.map_or(Ok(()), |l| l.flush())
    }

    /// The first checkpoint's switch, in its pause (the device quiesced):
    /// the flat image becomes the read-only lower layer, and `overlay` (a
    /// new, empty file of the same size) the top. Nothing is copied.
    pub fn switch_to_overlay(&self, overlay: DiskImage) -> Result<(), StackError> {
        let mut l = self.lock();
        if let Some(lower) = &l.lower {
            return Err(StackError::NotFlat {
                path: l.top.path().to_path_buf(),
                what: format!("it sits on {}", lower.describe()),
            });
        }
        let lower = ImageLower::new(l.top.clone()).map_err(|source| StackError::Reopen {
            path: l.top.path().to_path_buf(),
            source,
        })?;
        l.top = Arc::new(overlay);
        l.lower = Some(Arc::new(lower));
        l.present = Some(DirtyBitmap::new(self.blocks));
        Ok(())
    }

    /// Reads `offset ..` into `slices`, each part from the layer holding it.
    pub fn read_into(
        &self,
        offset: u64,
        slices: &[GuestSlice<'_>],
        bounce: &mut Bounce,
    ) -> std::io::Result<()> {
        let len: u64 = slices.iter().map(|s| s.len() as u64).sum();
        let (top, lower, parts) = {
            let l = self.lock();
            match &l.lower {
                None => (l.top.clone(), None, Vec::new()),
                Some(lower) => (l.top.clone(), Some(lower.clone()), runs(&l, offset, len)),
            }
        };
        let Some(lower) = lower else {
            return top.read_into(offset, slices, bounce);
        };
        // A block the filler copies meanwhile holds the same bytes in both
        // layers; only this device's own thread writes new ones.
        for (lo, hi, held) in parts {
            let part = sub_slices(slices, lo - offset, hi - lo);
            if held {
                top.read_into(lo, &part, bounce)?;
                continue;
            }
            let mut cursor = Cursor::new(&part);
            let mut w0 = lo - lo % BLOCK;
            while w0 < hi {
                let w1 = (w0 + bounce.capacity() as u64).min(hi.div_ceil(BLOCK) * BLOCK);
                let buf = bounce.buf((w1 - w0) as usize);
                lower.read(w0, buf)?;
                let (a, b) = (lo.max(w0), hi.min(w1));
                cursor.copy_in(&buf[(a - w0) as usize..(b - w0) as usize]);
                w0 = w1;
            }
        }
        Ok(())
    }

    /// Writes `slices` at `offset ..` into the top, after saving protected
    /// blocks and copying up the partly covered blocks it does not hold.
    pub fn write_from(
        &self,
        offset: u64,
        slices: &[GuestSlice<'_>],
        bounce: &mut Bounce,
        dsync: bool,
    ) -> std::io::Result<()> {
        let len: u64 = slices.iter().map(|s| s.len() as u64).sum();
        let mut l = self.lock();
        self.before_change(&mut l, offset, len)?;
        l.top.clone().write_from(offset, slices, bounce, dsync)?;
        self.now_held(&mut l, offset, len);
        Ok(())
    }

    /// Makes `offset .. offset + len` read as zeros, in the top.
    pub fn zero(&self, offset: u64, len: u64, bounce: &mut Bounce) -> std::io::Result<()> {
        let mut l = self.lock();
        self.before_change(&mut l, offset, len)?;
        l.top.clone().zero(offset, len, bounce)?;
        self.now_held(&mut l, offset, len);
        Ok(())
    }

    /// Saves the protected blocks of the range (copy-before-write) and
    /// copies up the blocks at its ends that it covers only in part.
    fn before_change(&self, l: &mut Layers, offset: u64, len: u64) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (first, last) = (offset / BLOCK, (offset + len - 1) / BLOCK);
        let mut one = Bounce::sized(BLOCK as usize);
        if let Some(p) = l.protected.as_ref() {
            let wanted: Vec<u64> = (first..=last.min(self.blocks - 1))
                .filter(|&b| p.get(b) && !l.saved.contains_key(&b))
                .collect();
            for b in wanted {
                let buf = one.buf(BLOCK as usize);
                self.read_block(l, b, buf)?;
                l.saved.insert(b, buf.to_vec());
            }
        }
        if l.lower.is_some() {
            let end = offset + len;
            for b in [first, last] {
                let whole = offset <= b * BLOCK && end >= (b + 1) * BLOCK;
                if whole || l.holds(b) {
                    continue;
                }
                let buf = one.buf(BLOCK as usize);
                let lower = l.lower.clone().expect("checked above");
                lower.read(b * BLOCK, buf)?;
                let n = (self.size - b * BLOCK).min(BLOCK) as usize;
                if l.top.is_direct() {
                    l.top.pwrite(b * BLOCK, &buf[..BLOCK as usize])?;
                } else {
                    l.top.pwrite(b * BLOCK, &buf[..n])?;
                }
                if let Some(p) = l.present.as_mut() {
                    p.set(b);
                }
            }
        }
        Ok(())
    }

    /// The blocks of a completed write are the top's now.
    fn now_held(&self, l: &mut Layers, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(p) = l.present.as_mut() {
            for b in offset / BLOCK..=((offset + len - 1) / BLOCK).min(self.blocks - 1) {
                p.set(b);
            }
        }
    }

    /// Reads block `b` as the disk holds it now into `buf` (aligned, one
    /// block), with the layers locked.
    fn read_block(&self, l: &Layers, b: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if l.holds(b) {
            read_top(&l.top, self.size, b * BLOCK, buf)
        } else {
            l.lower
                .as_ref()
                .expect("a block the top lacks has a lower layer")
                .read(b * BLOCK, buf)
        }
    }

    /// Reads blocks `first ..` into `buf` (whole blocks, aligned for
    /// `O_DIRECT`) as the disk holds them now: what a copy of the disk
    /// (a checkpoint, a migration) sends.
    pub fn read_blocks(&self, first: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let (top, lower, parts) = {
            let l = self.lock();
            let parts = runs(&l, first * BLOCK, buf.len() as u64);
            (l.top.clone(), l.lower.clone(), parts)
        };
        let base = first * BLOCK;
        for (lo, hi, held) in parts {
            let lo_b = lo - lo % BLOCK;
            let hi_b = hi.div_ceil(BLOCK) * BLOCK;
            let part = &mut buf[(lo_b - base) as usize..(hi_b - base) as usize];
            match (held, &lower) {
                (false, Some(lower)) => lower.read(lo_b, part)?,
                _ => read_top(&top, self.size, lo_b, part)?,
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at any `offset` as the disk holds them now
    /// (the host-side `verify`), through the whole blocks around them.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes at {offset} go past the disk's end ({} bytes)",
                    buf.len(),
                    self.size
                ),
            ));
        }
        let first = offset / BLOCK;
        let end = (offset + buf.len() as u64).div_ceil(BLOCK);
        let mut whole = Bounce::sized(((end - first) * BLOCK) as usize);
        let len = ((end - first) * BLOCK) as usize;
        let data = whole.buf(len);
        self.read_blocks(first, data)?;
        let at = (offset - first * BLOCK) as usize;
        buf.copy_from_slice(&data[at..at + buf.len()]);
        Ok(())
    }

    /// In a checkpoint's pause: protects `blocks` until [`Stack::drain`]
    /// hands them over as they are now. Returns how many.
    pub fn protect(&self, blocks: &DirtyBitmap) -> u64 {
        let mut l = self.lock();
        let n = blocks.count();
        match l.protected.as_mut() {
            Some(p) => p.merge(blocks),
            None => l.protected = Some(blocks.clone()),
        }
        n
    }

    /// Blocks the guest wrote while protected (each cost its write a read
    /// of the old block).
    pub fn saved_blocks(&self) -> u64 {
        self.lock().saved.len() as u64
    }

    /// Hands every protected block to `each` (first block, bytes), as it
    /// was when protected, in runs of consecutive blocks, and lifts the
    /// protection; stops at the first error, leaving the protection
    /// of what is left (lifted by [`Stack::unprotect`]).
    pub fn drain<E: From<std::io::Error>>(&self, each: &mut EachRun<'_, E>) -> Result<(), E> {
        let mut buf = Bounce::sized((DRAIN_BLOCKS * BLOCK) as usize);
        let mut from = 0u64;
        loop {
            let (first, n) = {
                let mut l = self.lock();
                let Some(p) = l.protected.as_ref() else {
                    return Ok(());
                };
                let Some(first) = (from..self.blocks).find(|&b| p.get(b)) else {
                    l.protected = None;
                    l.saved.clear();
                    return Ok(());
                };
                let n = (first..self.blocks)
                    .take(DRAIN_BLOCKS as usize)
                    .take_while(|&b| p.get(b))
                    .count() as u64;
                let out = buf.buf((n * BLOCK) as usize);
                for k in 0..n {
                    let b = first + k;
                    let dst = &mut out[(k * BLOCK) as usize..((k + 1) * BLOCK) as usize];
                    match l.saved.remove(&b) {
                        Some(old) => dst.copy_from_slice(&old),
                        None => self.read_block(&l, b, dst)?,
                    }
                }
                if let Some(p) = l.protected.as_mut() {
                    for k in 0..n {
                        p.unset(first + k);
                    }
                }
                (first, n)
            };
            each(first, &buf.buf((n * BLOCK) as usize)[..])?;
            from = first + n;
        }
    }

    /// Lifts every protection (a failed checkpoint).
    pub fn unprotect(&self) {
        let mut l = self.lock();
        l.protected = None;
        l.saved.clear();
    }

    /// Copies every block the top lacks from the lower layer, a batch at a
    /// time, racing the guest's writes (a block the guest wrote meanwhile
    /// is left as the guest wrote it); once the top holds every block it
    /// is flushed and the lower layer dropped: the top is a flat image of
    /// its own. Returns false if `stop` ended it first.
    pub fn fill(&self, stop: &AtomicBool) -> Result<bool, StackError> {
        let mut buf = Bounce::sized((FILL_BLOCKS * BLOCK) as usize);
        let mut from = 0u64;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let (top, lower, first, n) = {
                let mut l = self.lock();
                let (Some(p), Some(lower)) = (l.present.as_ref(), l.lower.clone()) else {
                    return Ok(true);
                };
                match (from..self.blocks).find(|&b| !p.get(b)) {
                    Some(first) => {
                        let n = (first..self.blocks)
                            .take(FILL_BLOCKS as usize)
                            .take_while(|&b| !p.get(b))
                            .count() as u64;
                        (l.top.clone(), lower, first, n)
                    }
                    None => {
                        let top = l.top.clone();
                        top.flush().map_err(|source| StackError::Io {
                            path: top.path().to_path_buf(),
                            what: "flushing the filled disk".into(),
                            source,
                        })?;
                        l.present = None;
                        l.lower = None;
                        return Ok(true);
                    }
                }
            };
            let io = |what: String, source| StackError::Io {
                path: top.path().to_path_buf(),
                what,
                source,
            };
            let data = buf.buf((n * BLOCK) as usize);
            lower.read(first * BLOCK, data).map_err(|e| {
                io(
                    format!("reading blocks {first}+{n} of {}", lower.describe()),
                    e,
                )
            })?;
            let mut l = self.lock();
            // Write only the blocks still missing: the guest may have
            // written some since they were read. A block of zeros is not
            // written: the top never held it, so it is a hole of the
            // sparse top and reads as zeros already (the disk stays sparse).
            let zero =
                |j: u64| is_zero_page(&data[(j * BLOCK) as usize..((j + 1) * BLOCK) as usize]);
            let mut k = 0;
            while k < n {
                if l.holds(first + k) {
                    k += 1;
                    continue;
                }
                if zero(k) {
                    if let Some(p) = l.present.as_mut() {
                        p.set(first + k);
                    }
                    k += 1;
                    continue;
                }
                let run = (k..n)
                    .take_while(|&j| !l.holds(first + j) && !zero(j))
                    .count() as u64;
                let (lo, hi) = ((k * BLOCK) as usize, ((k + run) * BLOCK) as usize);
                let at = (first + k) * BLOCK;
                let end = (self.size - at).min((hi - lo) as u64) as usize;
                let bytes = if top.is_direct() {
                    &data[lo..hi]
                } else {
                    &data[lo..lo + end]
                };
                top.pwrite(at, bytes)
                    .map_err(|e| io(format!("writing blocks {}+{run}", first + k), e))?;
                if let Some(p) = l.present.as_mut() {
                    for j in k..k + run {
                        p.set(first + j);
                    }
                }
                k += run;
            }
            from = first + n;
        }
    }
}

/// Reads from the top: its file is the disk's size (a flat image, or a
/// sparse file sized at creation).
fn read_top(top: &DiskImage, size: u64, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    if top.is_direct() {
        // O_DIRECT wants whole aligned blocks; the size is a multiple of
        // them (checked when the image was opened). A caller's buffer that
        // is not aligned (the engine's) is read through a bounce buffer.
        let align = super::image::DIRECT_ALIGN as usize;
        if (buf.as_ptr() as usize).is_multiple_of(align) && buf.len().is_multiple_of(align) {
            return top.pread(offset, buf);
        }
        let mut bounce = Bounce::sized(buf.len().div_ceil(align) * align);
        let len = bounce.capacity();
        top.pread(offset, bounce.buf(len))?;
        let n = buf.len();
        buf.copy_from_slice(&bounce.buf(len)[..n]);
        return Ok(());
    }
    read_clamped(top.file(), size, offset, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::CacheMode;
    use crate::devices::virtio::testing::TestMemory;
    use std::path::Path;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    const SIZE: u64 = 64 * BLOCK;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
    }

    /// A lower image filled with `pattern(1)` and an empty top over it.
    fn stacked(dir: &Path, cache: CacheMode) -> (Stack, Vec<u8>) {
        let lower_path = dir.join("lower.img");
        let bytes = pattern(1, SIZE as usize);
        std::fs::write(&lower_path, &bytes).unwrap();
        let lower = DiskImage::open(&lower_path, true, CacheMode::Writeback, true).unwrap();
        let lower = Arc::new(ImageLower::new(Arc::new(lower)).unwrap());
        let top = DiskImage::create_sparse(&dir.join("top.img"), SIZE, cache).unwrap();
        (Stack::over(top, lower), bytes)
    }

    fn read_all(s: &Stack) -> Vec<u8> {
        let mut b = Bounce::sized(SIZE as usize);
        s.read_blocks(0, b.buf(SIZE as usize)).unwrap();
        b.buf(SIZE as usize).to_vec()
    }

    /// Guest memory with `data` at 0, and the slices a request would give.
    fn guest(data: &[u8]) -> TestMemory {
        let m = TestMemory::new(1 << 20);
        m.mem
            .vm_memory_view()
            .unwrap()
            .write_slice(data, GuestAddress(0))
            .unwrap();
        m
    }

    fn with_slices<R>(m: &TestMemory, len: usize, f: impl FnOnce(&[GuestSlice<'_>]) -> R) -> R {
        let g = m.dm.access().unwrap();
        let slices: Vec<GuestSlice<'_>> = g
            .get_slices(GuestAddress(0), len)
            .map(|s| s.unwrap())
            .collect();
        f(&slices)
    }

    #[test]
    fn reads_come_through_the_layers_and_partial_writes_copy_up() {
        for cache in [CacheMode::Writeback, CacheMode::None] {
            let dir = tempfile::tempdir_in("/var/tmp").unwrap();
            let (s, mut want) = stacked(dir.path(), cache);
            let mut bounce = Bounce::new();
            assert_eq!(read_all(&s), want, "all from the lower layer");
            // 512 bytes into the middle of block 3: the rest of the block
            // comes up from the lower layer.
            let new = pattern(9, 512);
            let m = guest(&new);
            with_slices(&m, 512, |sl| {
                s.write_from(3 * BLOCK + 1024, sl, &mut bounce, false)
            })
            .unwrap();
            want[(3 * BLOCK + 1024) as usize..(3 * BLOCK + 1536) as usize].copy_from_slice(&new);
            // A whole block written: no copy-up needed.
            let whole = pattern(5, BLOCK as usize);
            let m = guest(&whole);
            with_slices(&m, BLOCK as usize, |sl| {
                s.write_from(10 * BLOCK, sl, &mut bounce, false)
            })
            .unwrap();
            want[(10 * BLOCK) as usize..(11 * BLOCK) as usize].copy_from_slice(&whole);
            // Zeroing blocks 20..22 and a part of 23.
            s.zero(20 * BLOCK, 3 * BLOCK + 100, &mut bounce).unwrap();
            want[(20 * BLOCK) as usize..(23 * BLOCK + 100) as usize].fill(0);
            assert_eq!(read_all(&s), want);
            assert_eq!(s.present_blocks().runs(), vec![(3, 1), (10, 1), (20, 4)]);
            // Only what was written or copied up is in the top file.
            let top = std::fs::read(dir.path().join("top.img")).unwrap();
            assert_eq!(
                &top[..(3 * BLOCK) as usize],
                &vec![0u8; (3 * BLOCK) as usize][..]
            );
            assert_eq!(
                &top[(3 * BLOCK) as usize..(4 * BLOCK) as usize],
                &want[(3 * BLOCK) as usize..(4 * BLOCK) as usize]
            );
            // A guest read across held and missing blocks, unaligned.
            let m = TestMemory::new(1 << 20);
            let (at, len) = (2 * BLOCK + 300, 9 * BLOCK as usize);
            with_slices(&m, len, |sl| s.read_into(at, sl, &mut bounce)).unwrap();
            let mut got = vec![0u8; len];
            m.mem
                .vm_memory_view()
                .unwrap()
                .read_slice(&mut got, GuestAddress(0))
                .unwrap();
            assert_eq!(got, want[at as usize..at as usize + len], "{cache:?}");
            // The lower image never changed.
            assert_eq!(
                std::fs::read(dir.path().join("lower.img")).unwrap(),
                pattern(1, SIZE as usize)
            );
        }
    }

    #[test]
    fn the_filler_makes_the_top_flat_and_keeps_what_the_guest_wrote_meanwhile() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (s, mut want) = stacked(dir.path(), CacheMode::Writeback);
        let s = Arc::new(s);
        let stop = Arc::new(AtomicBool::new(false));
        let filler = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || s.fill(&stop).unwrap())
        };
        // Guest writes racing the filler, each a block of its own bytes.
        let mut bounce = Bounce::new();
        for b in (0..64).rev().step_by(3) {
            let new = pattern(b as u8 + 50, BLOCK as usize);
            let m = guest(&new);
            with_slices(&m, BLOCK as usize, |sl| {
                s.write_from(b * BLOCK, sl, &mut bounce, false)
            })
            .unwrap();
            want[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].copy_from_slice(&new);
        }
        assert!(filler.join().unwrap(), "the filler finished");
        assert_eq!(s.shape(), Shape::Flat);
        assert_eq!(read_all(&s), want);
        assert_eq!(
            std::fs::read(dir.path().join("top.img")).unwrap(),
            want,
            "the top alone holds the disk"
        );
    }

    #[test]
    fn protected_blocks_drain_as_they_were_at_the_pause() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (s, at_pause) = stacked(dir.path(), CacheMode::None);
        let mut bounce = Bounce::new();
        let mut p = DirtyBitmap::new(64);
        for b in [1, 2, 3, 40] {
            p.set(b);
        }
        assert_eq!(s.protect(&p), 4);
        // The guest overwrites blocks 2 and 40 (and 41, unprotected).
        let new = pattern(77, 2 * BLOCK as usize);
        let m = guest(&new);
        with_slices(&m, BLOCK as usize, |sl| {
            s.write_from(2 * BLOCK, sl, &mut bounce, false)
        })
        .unwrap();
        with_slices(&m, 2 * BLOCK as usize, |sl| {
            s.write_from(40 * BLOCK, sl, &mut bounce, false)
        })
        .unwrap();
        assert_eq!(s.saved_blocks(), 2);
        let mut got = Vec::new();
        s.drain(&mut |first, data: &[u8]| -> std::io::Result<()> {
            got.push((first, data.to_vec()));
            Ok(())
        })
        .unwrap();
        let blocks =
            |a: u64, n: u64| at_pause[(a * BLOCK) as usize..((a + n) * BLOCK) as usize].to_vec();
        assert_eq!(got, vec![(1, blocks(1, 3)), (40, blocks(40, 1))]);
        // Drained: later writes cost no copy.
        with_slices(&m, BLOCK as usize, |sl| {
            s.write_from(BLOCK, sl, &mut bounce, false)
        })
        .unwrap();
        assert_eq!(s.saved_blocks(), 0);
    }

    #[test]
    fn a_flat_disk_switches_to_an_overlay_without_copying_and_its_image_stays_as_it_was() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("disk.img");
        let bytes = pattern(3, SIZE as usize);
        std::fs::write(&path, &bytes).unwrap();
        let s = Stack::flat(DiskImage::open(&path, false, CacheMode::Writeback, true).unwrap());
        let overlay =
            DiskImage::create_sparse(&dir.path().join("o.img"), SIZE, CacheMode::Writeback)
                .unwrap();
        s.switch_to_overlay(overlay).unwrap();
        assert_eq!(s.shape(), Shape::OverImage(path.clone()));
        let mut bounce = Bounce::new();
        let m = guest(&pattern(8, 100));
        with_slices(&m, 512, |sl| {
            s.write_from(5 * BLOCK, sl, &mut bounce, false)
        })
        .unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the image is not written"
        );
        let mut want = bytes.clone();
        let mut g = vec![0u8; 512];
        m.mem
            .vm_memory_view()
            .unwrap()
            .read_slice(&mut g, GuestAddress(0))
            .unwrap();
        want[(5 * BLOCK) as usize..(5 * BLOCK + 512) as usize].copy_from_slice(&g);
        assert_eq!(read_all(&s), want);
        // A second switch is refused: the top is not flat.
        let again =
            DiskImage::create_sparse(&dir.path().join("o2.img"), SIZE, CacheMode::Writeback)
                .unwrap();
        let e = s.switch_to_overlay(again).unwrap_err().to_string();
        assert!(e.contains("o.img") && e.contains("not a flat image"), "{e}");
    }
}
