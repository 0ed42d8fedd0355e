//! virtio-blk over a raw image file: the device's configuration, its
//! features and configuration space, its saved state, and the written-blocks
//! set a checkpoint takes.
//!
//! Features offered: VERSION_1, INDIRECT_DESC, EVENT_IDX, SEG_MAX, BLK_SIZE
//! (4096), FLUSH (fdatasync) with CONFIG_WCE (the driver may turn the write
//! cache off: writes are then made durable before they complete), GET_ID
//! (the serial), and either RO, or DISCARD and WRITE_ZEROES (both punch
//! holes, so the blocks read as zeros and are recorded as zero extents).
//! With `cache=none` the image is opened `O_DIRECT`; requests whose buffers
//! or offsets are not 4096-aligned go through a bounce buffer.
//!
//! Requests are served on the device's worker thread (`request`); the
//! image and its lock live in `image`, the written-blocks set in `written`.

mod image;
mod request;
pub mod stack;
pub mod written;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk as blk;

pub use image::{Bounce, CacheMode, DiskImage, ImageError, LockMode, DIRECT_ALIGN, SECTOR};
pub use stack::{ImageLower, Lower, Shape, Stack, StackError, BLOCK};
pub use written::{WrittenBlocks, WrittenSet};

use super::mmio::TransportState;
use super::{features, MmioTransport, QueueHandler, VirtioDevice};
use crate::devices::persist::Persist;
use crate::devices::DeviceError;
use crate::memory::DeviceMemory;
use vmm_sys_util::eventfd::EventFd;

/// virtio device id of a block device.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments in one request (SEG_MAX): a chain of the whole
/// queue, less the header and the status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The block size offered (BLK_SIZE): the guest's logical block.
pub const BLOCK_SIZE: u32 = 4096;
/// Most sectors one DISCARD or WRITE_ZEROES segment covers (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Most segments in one DISCARD or WRITE_ZEROES request.
pub const MAX_ZERO_SEGMENTS: u32 = 32;
/// Most bytes of a serial (VIRTIO_BLK_ID_BYTES).
pub use crate::vmm::config::SERIAL_BYTES;
/// Version of [`BlockState`].
pub const BLOCK_STATE_VERSION: u32 = 1;

/// One disk as the user configured it: part of the VM's configuration.
pub use crate::vmm::config::{DiskConfig as BlockConfig, DiskConfigError as BlockConfigError};

impl crate::api::Classify for BlockError {
    fn kind(&self) -> crate::api::ErrorKind {
        use crate::api::ErrorKind;
        match self {
            BlockError::Config(_) => ErrorKind::BadRequest,
            BlockError::Image(ImageError::Open { source, .. }) => match ErrorKind::of_io(source) {
                ErrorKind::Failed => ErrorKind::Unusable,
                k => k,
            },
            BlockError::Image(ImageError::Unusable { .. }) => ErrorKind::Unusable,
            BlockError::Image(ImageError::Locked { .. }) => ErrorKind::Conflict,
            BlockError::Version { .. } | BlockError::Mismatch { .. } => ErrorKind::Unusable,
        }
    }
}

/// The device on its transport, as a VM's device set holds it: saved by
/// type `virtio-blk` and its disk's id.
impl Persist for MmioTransport<Block> {
    const TYPE: &'static str = "virtio-blk";
    type State = TransportState<BlockState>;
    /// The disk, guest memory as devices see it, the interrupt line's
    /// eventfd (None without an irqchip), and the disk's layers when they
    /// are not its image alone (a restored disk over its checkpoint).
    type Args = (BlockConfig, DeviceMemory, Option<EventFd>, Option<Stack>);

    fn save(&self) -> Result<Self::State, DeviceError> {
        self.save_device()
    }

    fn restore(
        (config, memory, irqfd, stack): Self::Args,
        state: Option<&Self::State>,
    ) -> Result<Self, DeviceError> {
        let block = match stack {
            Some(stack) => Block::on(config, stack)?,
            None => Block::new(config)?,
        };
        let t = match state {
            None => MmioTransport::new(block, memory, irqfd),
            Some(s) => MmioTransport::restore(block.restored(&s.device)?, memory, irqfd, s),
        };
        t.map_err(DeviceError::from)
    }

    fn quiesce(&self) -> Result<(), DeviceError> {
        self.quiesce_device()
    }

    fn resume(&self) -> Result<(), DeviceError> {
        self.resume_device()
    }
}

/// The disk as the transfer engine moves it: its written blocks are its
/// dirty log, its stack is where their data is read, and its
/// copy-before-write protection keeps the blocks still to be copied at a
/// pause as they were.
impl crate::vmm::store::BlockStore for MmioTransport<Block> {
    fn id(&self) -> String {
        self.device().config.id.clone()
    }

    fn blocks(&self) -> u64 {
        self.device().stack().blocks()
    }

    fn size(&self) -> u64 {
        self.device().stack().size()
    }

    fn readonly(&self) -> bool {
        self.device().config.readonly
    }

    fn take_written(&self) -> crate::memory::DirtyBitmap {
        let w = self.device().written().take();
        let mut b = w.data;
        b.merge(&w.zero);
        b
    }

    fn held_blocks(&self) -> crate::memory::DirtyBitmap {
        self.device().stack().present_blocks()
    }

    fn read_blocks(&self, first: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.device().stack().read_blocks(first, buf)
    }

    fn protect(&self, blocks: &crate::memory::DirtyBitmap) -> u64 {
        self.device().stack().protect(blocks)
    }

    fn drain(
        &self,
        each: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.device().stack().drain(each)
    }

    fn unprotect(&self) {
        self.device().stack().unprotect()
    }

    fn saved_blocks(&self) -> u64 {
        self.device().stack().saved_blocks()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Building or restoring a block device failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] BlockConfigError),
    /// The image cannot be opened or locked.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A saved state of another version.
    #[error("disk {id}: saved block state version {found}, this vmhop reads version {BLOCK_STATE_VERSION}")]
    Version {
        /// The disk.
        id: String,
        /// The version found.
        found: u32,
    },
    /// The disk here differs, as the guest would see it, from the saved one.
    #[error("disk {id} ({path}): the saved {what} is {saved}, the image here gives {here}: refusing to restore, the guest would see its disk change")]
    Mismatch {
        /// The disk.
        id: String,
        /// The image here.
        path: String,
        /// What differs.
        what: &'static str,
        /// Saved value.
        saved: String,
        /// Value here.
        here: String,
    },
}

/// The block device's own saved state (the transport saves the rest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// [`BLOCK_STATE_VERSION`] when written.
    pub version: u32,
    /// The device's id.
    pub id: String,
    /// Capacity in 512-byte sectors (guest-visible).
    pub capacity: u64,
    /// Block size offered (guest-visible).
    pub block_size: u32,
    /// Serial, 20 bytes zero-padded (guest-visible).
    pub serial: Vec<u8>,
    /// Read-only (guest-visible).
    pub readonly: bool,
    /// The configuration space's `writeback` byte (the driver's choice).
    pub writeback: bool,
}

/// What the device and its worker share.
#[derive(Debug)]
pub(crate) struct Disk {
    pub(crate) name: String,
    pub(crate) stack: Stack,
    pub(crate) written: WrittenBlocks,
    /// The configuration space's `writeback` byte.
    pub(crate) writeback: AtomicBool,
    pub(crate) serial: [u8; SERIAL_BYTES],
    pub(crate) readonly: bool,
}

/// A virtio-blk device over a raw image.
#[derive(Debug)]
pub struct Block {
    config: BlockConfig,
    disk: Arc<Disk>,
    features: u64,
}

impl Block {
    /// Opens (and locks) the image of `config`.
    pub fn new(config: BlockConfig) -> Result<Block, BlockError> {
        Self::open(config, true)
    }

    /// Opens the image without its lock (a migration destination, which
    /// takes it at the switch: [`Block::image`]`.lock()`).
    pub fn new_unlocked(config: BlockConfig) -> Result<Block, BlockError> {
        Self::open(config, false)
    }

    fn open(config: BlockConfig, lock: bool) -> Result<Block, BlockError> {
        let image = DiskImage::open(&config.path, config.readonly, config.cache, lock)?;
        Self::on(config, Stack::flat(image))
    }

    /// A device for `config` over the layers `stack` (a restored disk's new
    /// top over its checkpoint).
    pub fn on(config: BlockConfig, stack: Stack) -> Result<Block, BlockError> {
        let serial = config.serial_bytes()?;
        let mut f = features::VERSION_1
            | features::RING_INDIRECT_DESC
            | features::RING_EVENT_IDX
            | 1 << blk::VIRTIO_BLK_F_SEG_MAX
            | 1 << blk::VIRTIO_BLK_F_BLK_SIZE
            | 1 << blk::VIRTIO_BLK_F_FLUSH
            | 1 << blk::VIRTIO_BLK_F_CONFIG_WCE;
        f |= match config.readonly {
            true => 1 << blk::VIRTIO_BLK_F_RO,
            false => 1 << blk::VIRTIO_BLK_F_DISCARD | 1 << blk::VIRTIO_BLK_F_WRITE_ZEROES,
        };
        let disk = Disk {
            name: format!("virtio-blk {}", config.id),
            written: WrittenBlocks::new(stack.size(), written::DEFAULT_GRANULARITY),
            stack,
            writeback: AtomicBool::new(true),
            serial,
            readonly: config.readonly,
        };
        Ok(Block {
            config,
            disk: Arc::new(disk),
            features: f,
        })
    }

    /// A device for `config` whose guest-visible configuration must equal
    /// the saved one (else the restore is refused before the VM runs).
    pub fn restore(config: BlockConfig, state: &BlockState) -> Result<Block, BlockError> {
        Self::new(config)?.restored(state)
    }

    /// This device as it was in `state`, whose guest-visible
    /// configuration it must have (else the restore is refused).
    pub fn restored(self, state: &BlockState) -> Result<Block, BlockError> {
        self.check(state)?;
        self.disk
            .writeback
            .store(state.writeback, Ordering::Relaxed);
        Ok(self)
    }

    fn check(&self, state: &BlockState) -> Result<(), BlockError> {
        let here = self.save();
        let mismatch = |what, saved: String, here: String| BlockError::Mismatch {
            id: self.config.id.clone(),
            path: self.config.path.display().to_string(),
            what,
            saved,
            here,
        };
        if state.version != BLOCK_STATE_VERSION {
            return Err(BlockError::Version {
                id: self.config.id.clone(),
                found: state.version,
            });
        }
        if state.capacity != here.capacity {
            return Err(mismatch(
                "capacity",
                format!("{} sectors", state.capacity),
                format!("{} sectors", here.capacity),
            ));
        }
        if state.block_size != here.block_size {
            return Err(mismatch(
                "block size",
                state.block_size.to_string(),
                here.block_size.to_string(),
            ));
        }
        if state.serial != here.serial {
            let show = |s: &[u8]| {
                String::from_utf8_lossy(s)
                    .trim_end_matches('\0')
                    .to_string()
            };
            return Err(mismatch("serial", show(&state.serial), show(&here.serial)));
        }
        if state.readonly != here.readonly {
            return Err(mismatch(
                "read-only flag",
                state.readonly.to_string(),
                here.readonly.to_string(),
            ));
        }
        Ok(())
    }

    /// The device's configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The top layer: the file the guest's writes go to (its lock, its
    /// flush).
    pub fn image(&self) -> Arc<DiskImage> {
        self.disk.stack.top()
    }

    /// The disk's layers.
    pub fn stack(&self) -> &Stack {
        &self.disk.stack
    }

    /// The blocks written since the last take: a checkpoint takes them
    /// (and gives them back with `merge_back` if it fails).
    pub fn written(&self) -> &WrittenBlocks {
        &self.disk.written
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.stack.size() / SECTOR
    }

    /// The configuration space, as the guest reads it.
    fn config_space(&self) -> Vec<u8> {
        use std::mem::{offset_of, size_of};
        type C = blk::virtio_blk_config;
        let mut c = vec![0u8; size_of::<C>()];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(offset_of!(C, capacity), &self.capacity().to_le_bytes());
        put(offset_of!(C, seg_max), &SEG_MAX.to_le_bytes());
        put(offset_of!(C, blk_size), &BLOCK_SIZE.to_le_bytes());
        put(
            offset_of!(C, wce),
            &[self.disk.writeback.load(Ordering::Relaxed) as u8],
        );
        put(offset_of!(C, num_queues), &1u16.to_le_bytes());
        if !self.config.readonly {
            let align = (BLOCK_SIZE as u64 / SECTOR) as u32;
            put(
                offset_of!(C, max_discard_sectors),
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(C, max_discard_seg),
                &MAX_ZERO_SEGMENTS.to_le_bytes(),
            );
            put(
                offset_of!(C, discard_sector_alignment),
                &align.to_le_bytes(),
            );
            put(
                offset_of!(C, max_write_zeroes_sectors),
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(C, max_write_zeroes_seg),
                &MAX_ZERO_SEGMENTS.to_le_bytes(),
            );
            put(offset_of!(C, write_zeroes_may_unmap), &[1]);
        }
        c
    }
}

impl VirtioDevice for Block {
    type State = BlockState;

    fn name(&self) -> String {
        self.disk.name.clone()
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_space();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| c.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        // Only the writeback byte is the driver's to write.
        let wce = std::mem::offset_of!(blk::virtio_blk_config, wce) as u64;
        if offset == wce && data.len() == 1 {
            self.disk.writeback.store(data[0] != 0, Ordering::Relaxed);
        }
    }

    fn handler(&self, acked: u64) -> Box<dyn QueueHandler> {
        Box::new(request::BlockHandler::new(self.disk.clone(), acked))
    }

    fn reset(&self) {
        self.disk.writeback.store(true, Ordering::Relaxed);
    }

    fn save(&self) -> BlockState {
        BlockState {
            version: BLOCK_STATE_VERSION,
            id: self.config.id.clone(),
            capacity: self.capacity(),
            block_size: BLOCK_SIZE,
            serial: self.disk.serial.to_vec(),
            readonly: self.config.readonly,
            writeback: self.disk.writeback.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests;
