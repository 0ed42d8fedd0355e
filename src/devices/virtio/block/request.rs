//! virtio-blk requests (virtio 1.x, 5.2.6): reading a descriptor chain,
//! checking it, serving it against the image, and writing its status.
//! No maintained crate parses these (rust-vmm's virtio-blk is not
//! published), so this is vmhop's own.
//!
//! The device makes no assumption about framing, as the spec asks: the
//! device-readable descriptors are one byte stream (the 16-byte header,
//! then the data or the discard segments), the device-writable ones
//! another (the data, then the status byte, its last byte). Every address
//! goes through vm-memory, so nothing outside guest memory is touched.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_blk as blk;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::image::{Bounce, GuestSlice, SECTOR};
use super::{Disk, MAX_DISCARD_SECTORS, MAX_ZERO_SEGMENTS, SEG_MAX};
use crate::devices::virtio::{QueueBroken, QueueHandler};
use crate::memory::DeviceGuestMemory;

/// Bytes of a request header: type, reserved, sector.
const HEADER: u64 = 16;
/// Bytes of one DISCARD / WRITE_ZEROES segment.
const ZERO_SEGMENT: u64 = 16;

/// A run of guest memory one descriptor (or part of one) names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    addr: u64,
    len: u64,
}

/// The bytes `from .. from + len` of the stream `parts`.
fn sub(parts: &[Part], from: u64, len: u64) -> Vec<Part> {
    let mut out = Vec::new();
    let (mut at, end) = (0u64, from + len);
    for p in parts {
        let (lo, hi) = (at.max(from), (at + p.len).min(end));
        if lo < hi {
            out.push(Part {
                addr: p.addr + (lo - at),
                len: hi - lo,
            });
        }
        at += p.len;
    }
    out
}

fn total(parts: &[Part]) -> u64 {
    parts.iter().map(|p| p.len).sum()
}

/// The guest memory of `parts`, as vm-memory slices (split where guest
/// memory regions meet); an error names the first address outside it.
fn slices<'m>(mem: &'m DeviceGuestMemory, parts: &[Part]) -> Result<Vec<GuestSlice<'m>>, String> {
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        for s in GuestMemoryBackend::get_slices(mem, GuestAddress(p.addr), p.len as usize) {
            out.push(s.map_err(|e| {
                format!(
                    "buffer {:#x}+{:#x} is not in guest memory: {e}",
                    p.addr, p.len
                )
            })?);
        }
    }
    Ok(out)
}

/// Reads the first `buf.len()` bytes of the stream `parts`.
fn read_stream(mem: &DeviceGuestMemory, parts: &[Part], buf: &mut [u8]) -> Result<(), String> {
    let mut done = 0;
    for p in sub(parts, 0, buf.len() as u64) {
        let n = p.len as usize;
        mem.read_slice(&mut buf[done..done + n], GuestAddress(p.addr))
            .map_err(|e| format!("reading {:#x}+{n:#x}: {e}", p.addr))?;
        done += n;
    }
    Ok(())
}

/// What one request came to: its status, and how many data bytes the
/// device wrote into the guest's buffers.
struct Outcome {
    status: u32,
    written: u64,
}

impl Outcome {
    fn status(status: u32) -> Self {
        Outcome { status, written: 0 }
    }
}

/// Serves one virtio-blk device's queue on its worker thread.
pub(crate) struct BlockHandler {
    disk: Arc<Disk>,
    acked: u64,
    bounce: Bounce,
}

impl BlockHandler {
    pub(crate) fn new(disk: Arc<Disk>, acked: u64) -> Self {
        BlockHandler {
            disk,
            acked,
            bounce: Bounce::new(),
        }
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked & (1 << bit) != 0
    }

    /// Whether writes must be durable before they complete: no FLUSH to
    /// ask for it later, or the driver turned the write cache off.
    fn writethrough(&self) -> bool {
        !self.acked(blk::VIRTIO_BLK_F_FLUSH)
            || (self.acked(blk::VIRTIO_BLK_F_CONFIG_WCE)
                && !self.disk.writeback.load(Ordering::Relaxed))
    }

    /// The byte range of `sectors` sectors of data at `sector`, if it lies
    /// on the disk.
    fn range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        (offset.checked_add(bytes)? <= self.disk.stack.size()).then_some(offset)
    }

    fn io_error(&self, what: &str, e: impl std::fmt::Display) -> Outcome {
        tracing::warn!(
            "{}: {what} on {}: {e}",
            self.disk.name,
            self.disk.stack.path().display()
        );
        Outcome::status(blk::VIRTIO_BLK_S_IOERR)
    }

    /// Serves a well-formed request: `readable` is the stream after the
    /// header, `writable` the one before the status byte.
    fn execute(
        &mut self,
        mem: &DeviceGuestMemory,
        kind: u32,
        sector: u64,
        readable: &[Part],
        writable: &[Part],
    ) -> Outcome {
        use blk::*;
        let bad = |why: String| {
            tracing::debug!("{}: request refused: {why}", self.disk.name);
            Outcome::status(VIRTIO_BLK_S_IOERR)
        };
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let (data, write) = match kind {
                    VIRTIO_BLK_T_IN => (writable, false),
                    _ => (readable, true),
                };
                if write && self.disk.readonly {
                    return bad("a write to a read-only disk".into());
                }
                if data.len() > SEG_MAX as usize {
                    return bad(format!(
                        "{} data segments, more than SEG_MAX {SEG_MAX}",
                        data.len()
                    ));
                }
                let len = total(data);
                if !len.is_multiple_of(SECTOR) {
                    return bad(format!("{len} data bytes, not whole sectors"));
                }
                let Some(offset) = self.range(sector, len) else {
                    return bad(format!(
                        "sectors {sector}+{} past the disk's end",
                        len / SECTOR
                    ));
                };
                let slices = match slices(mem, data) {
                    Ok(s) => s,
                    Err(why) => return bad(why),
                };
                if write {
                    let dsync = self.writethrough();
                    let r = self
                        .disk
                        .stack
                        .write_from(offset, &slices, &mut self.bounce, dsync);
                    // Even a failed write may have changed some blocks.
                    self.disk.written.record_write(offset, len);
                    match r {
                        Ok(()) => Outcome::status(VIRTIO_BLK_S_OK),
                        Err(e) => self.io_error(&format!("write at {offset}+{len}"), e),
                    }
                } else {
                    match self.disk.stack.read_into(offset, &slices, &mut self.bounce) {
                        Ok(()) => Outcome {
                            status: VIRTIO_BLK_S_OK,
                            written: len,
                        },
                        Err(e) => self.io_error(&format!("read at {offset}+{len}"), e),
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.disk.stack.flush() {
                Ok(()) => Outcome::status(VIRTIO_BLK_S_OK),
                Err(e) => self.io_error("fdatasync", e),
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = total(writable).min(VIRTIO_BLK_ID_BYTES as u64);
                let mut done = 0;
                for p in sub(writable, 0, n) {
                    let bytes = &self.disk.serial[done..done + p.len as usize];
                    if let Err(e) = mem.write_slice(bytes, GuestAddress(p.addr)) {
                        return bad(format!("GET_ID buffer {:#x}: {e}", p.addr));
                    }
                    done += p.len as usize;
                }
                Outcome {
                    status: VIRTIO_BLK_S_OK,
                    written: n,
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let feature = match kind {
                    VIRTIO_BLK_T_DISCARD => VIRTIO_BLK_F_DISCARD,
                    _ => VIRTIO_BLK_F_WRITE_ZEROES,
                };
                if !self.acked(feature) {
                    return Outcome::status(VIRTIO_BLK_S_UNSUPP);
                }
                if self.disk.readonly {
                    return bad("zeroing a read-only disk".into());
                }
                let len = total(readable);
                let count = len / ZERO_SEGMENT;
                if !len.is_multiple_of(ZERO_SEGMENT)
                    || count == 0
                    || count > MAX_ZERO_SEGMENTS as u64
                {
                    return bad(format!(
                        "{len} bytes of segments (16 each, at most {MAX_ZERO_SEGMENTS})"
                    ));
                }
                let mut ranges = Vec::with_capacity(count as usize);
                for i in 0..count {
                    let mut seg = [0u8; ZERO_SEGMENT as usize];
                    if let Err(why) = read_stream(
                        mem,
                        &sub(readable, i * ZERO_SEGMENT, ZERO_SEGMENT),
                        &mut seg,
                    ) {
                        return bad(why);
                    }
                    let start = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
                    let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
                    let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
                    // DISCARD has no flags; WRITE_ZEROES only UNMAP (which
                    // it always may do: a hole reads as zeros).
                    let allowed = match kind {
                        VIRTIO_BLK_T_DISCARD => 0,
                        _ => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                    };
                    if flags & !allowed != 0 {
                        return Outcome::status(VIRTIO_BLK_S_UNSUPP);
                    }
                    if sectors as u64 > MAX_DISCARD_SECTORS as u64 {
                        return bad(format!("{sectors} sectors in one segment"));
                    }
                    let bytes = sectors as u64 * SECTOR;
                    let Some(offset) = self.range(start, bytes) else {
                        return bad(format!("sectors {start}+{sectors} past the disk's end"));
                    };
                    ranges.push((offset, bytes));
                }
                for (offset, bytes) in ranges {
                    let r = self.disk.stack.zero(offset, bytes, &mut self.bounce);
                    match r {
                        Ok(()) => self.disk.written.record_zero(offset, bytes),
                        Err(e) => {
                            self.disk.written.record_write(offset, bytes);
                            return self.io_error(&format!("zeroing {offset}+{bytes}"), e);
                        }
                    }
                }
                Outcome::status(VIRTIO_BLK_S_OK)
            }
            _ => Outcome::status(VIRTIO_BLK_S_UNSUPP),
        }
    }
}

impl QueueHandler for BlockHandler {
    fn serve(
        &mut self,
        mem: &DeviceGuestMemory,
        _queue: u16,
        chain: DescriptorChain<&DeviceGuestMemory>,
    ) -> Result<u32, QueueBroken> {
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.collect();
        let Some(last) = descs.last() else {
            return Err(QueueBroken(format!(
                "request {head} has no readable descriptor (bad head index, or a descriptor table outside guest memory)"
            )));
        };
        // The chain iterator stops quietly at a loop, a bad next index or a
        // descriptor it cannot read: the last one it gave still says NEXT.
        let truncated = last.has_next();
        let first_writable = descs
            .iter()
            .position(|d| d.is_write_only())
            .unwrap_or(descs.len());
        let misordered = descs[first_writable..].iter().any(|d| !d.is_write_only());
        let part = |d: &Descriptor| Part {
            addr: d.addr().0,
            len: d.len() as u64,
        };
        let readable: Vec<Part> = descs[..first_writable].iter().map(part).collect();
        let writable: Vec<Part> = descs[first_writable..]
            .iter()
            .filter(|d| d.is_write_only())
            .map(part)
            .filter(|p| p.len > 0)
            .collect();
        let Some(status_part) = writable.last() else {
            return Err(QueueBroken(format!(
                "request {head} has no device-writable status byte"
            )));
        };
        let status_at = GuestAddress(status_part.addr + status_part.len - 1);
        if !mem.address_in_range(status_at) {
            return Err(QueueBroken(format!(
                "request {head}'s status byte at {:#x} is outside guest memory",
                status_at.0
            )));
        }
        let data_out = sub(&writable, 0, total(&writable) - 1);
        let mut header = [0u8; HEADER as usize];
        let outcome = if truncated || misordered {
            tracing::debug!(
                "{}: request {head}: malformed chain ({})",
                self.disk.name,
                if truncated {
                    "cut short: a loop, a bad next index or an unreadable descriptor"
                } else {
                    "a device-readable descriptor after a device-writable one"
                }
            );
            Outcome::status(blk::VIRTIO_BLK_S_IOERR)
        } else if total(&readable) < HEADER {
            Outcome::status(blk::VIRTIO_BLK_S_IOERR)
        } else if let Err(why) = read_stream(mem, &readable, &mut header) {
            tracing::debug!("{}: request {head}: header: {why}", self.disk.name);
            Outcome::status(blk::VIRTIO_BLK_S_IOERR)
        } else {
            let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
            let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            let rest = sub(&readable, HEADER, total(&readable) - HEADER);
            self.execute(mem, kind, sector, &rest, &data_out)
        };
        mem.write_obj(outcome.status as u8, status_at)
            .map_err(|e| QueueBroken(format!("request {head}: status byte: {e}")))?;
        Ok(u32::try_from(outcome.written + 1).unwrap_or(u32::MAX))
    }
}
