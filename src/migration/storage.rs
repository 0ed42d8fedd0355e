//! `migrate --copy-storage`: the disks travel in the same pre-copy as
//! memory, for hosts without shared storage.
//!
//! The source announces its disks in a `storage` frame after the config's
//! ack (a [`Manifest`]: each disk's id, size and whether it is read-only);
//! their blocks then come as ordinary `pages` and `zero` frames at the
//! store addresses of `vmm::store` (disk `i`, byte `o` at
//! `store_address(i, o)`), chosen by the one transfer engine like dirty
//! pages: every block in the first round, the blocks written since in
//! each later round and in the pause.
//!
//! The destination puts each disk in a new file that its `--disk
//! id=NAME,path=FILE` names ([`Placement`]; a copy never overwrites an
//! existing file), locked while it is written, made durable at every
//! round's end and at `done`, and handed to the VM as a flat image when it
//! arrives. A migration that fails removes the files it made.
//!
//! Which blocks to send, and when, is the engine's; what a disk is, the
//! device's. This module owns only the hand-over between the two hosts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::migration::CopiedDisk;
use crate::devices::virtio::block::{Bounce, CacheMode, DiskImage};
use crate::memory::PAGE_SIZE;
use crate::vmm::store::split_address;
use crate::vmm::VmConfig;

/// Disks a manifest may list: more than a VM can have.
const MAX_DISKS: usize = 64;

/// The disks a source sends with `--copy-storage`, in store order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// One entry per disk of the VM, in its configuration's order.
    pub disks: Vec<ManifestDisk>,
}

/// One disk of a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestDisk {
    /// The disk's id (`--disk id=`).
    pub id: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Whether the guest may not write it.
    pub readonly: bool,
}

impl Manifest {
    /// The manifest of `vm`'s disks.
    pub fn of(vm: &crate::vmm::Vm) -> Manifest {
        Manifest {
            disks: vm
                .stores()
                .iter()
                .map(|s| ManifestDisk {
                    id: s.id(),
                    bytes: s.size(),
                    readonly: s.readonly(),
                })
                .collect(),
        }
    }
}

/// Where `--disk id=NAME,path=FILE` on `run --incoming` puts disk NAME.
pub use crate::vmm::config::DiskPlacement as Placement;

/// The copy of the disks could not be set up or written here.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The `storage` frame is not a manifest.
    #[error("the storage frame is not a disk manifest: {0}")]
    Unreadable(#[source] serde_json::Error),
    /// It does not list the configuration's disks.
    #[error("the storage frame lists disks [{listed}], the configuration has [{configured}]")]
    Mismatch {
        /// Ids in the manifest.
        listed: String,
        /// Ids in the configuration.
        configured: String,
    },
    /// A size no raw image has.
    #[error("disk {id}: a size of {bytes} bytes is not a positive multiple of 512")]
    BadSize {
        /// The disk.
        id: String,
        /// Its size.
        bytes: u64,
    },
    /// No `--disk id=NAME,path=FILE` says where the disk goes.
    #[error(
        "disk {id}: --copy-storage needs a file for it here: give the destination \
         --disk id={id},path=NEW"
    )]
    NoPlacement {
        /// The disk.
        id: String,
    },
    /// `--disk` names a disk the VM does not have.
    #[error("--disk id={id}: the arriving VM has no disk {id} (it has: {have})")]
    NoSuchDisk {
        /// The id given.
        id: String,
        /// The VM's disks.
        have: String,
    },
    /// The file is there already.
    #[error("disk {id}: {} already exists, and a copy never overwrites a file: give --disk id={id},path=NEW", path.display())]
    Exists {
        /// The disk.
        id: String,
        /// The file.
        path: PathBuf,
    },
    /// The file could not be made.
    #[error("disk {id}: {source}")]
    Create {
        /// The disk.
        id: String,
        /// Why.
        #[source]
        source: crate::devices::virtio::block::ImageError,
    },
    /// Blocks at an address that is no disk's, or past its end.
    #[error("disk blocks at {addr:#x} ({len} bytes) lie outside the disks being copied")]
    Outside {
        /// The address.
        addr: u64,
        /// The length.
        len: u64,
    },
    /// Writing or syncing a file failed.
    #[error("disk {id}: {what} {}: {source}", path.display())]
    Io {
        /// The disk.
        id: String,
        /// What was done (`writing 4096 bytes at 0 of`, `fdatasync`).
        what: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Applies `--disk id=NAME,path=FILE` placements to an arriving VM's
/// configuration: on shared storage they say where each image lives here.
pub fn relocate(config: &mut VmConfig, placements: &[Placement]) -> Result<(), StorageError> {
    for p in placements {
        let Some(d) = config.disks.iter_mut().find(|d| d.id == p.id) else {
            return Err(StorageError::NoSuchDisk {
                id: p.id.clone(),
                have: ids(config.disks.iter().map(|d| d.id.as_str())),
            });
        };
        d.path = p.path.clone();
    }
    Ok(())
}

fn ids<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = it.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// One disk being received.
struct Receiving {
    id: String,
    image: DiskImage,
    size: u64,
}

/// The disks a destination receives, in store order: new files, removed
/// again unless [`Copies::keep`] is called.
pub struct Copies {
    disks: Vec<Receiving>,
    bounce: Bounce,
    kept: bool,
}

impl std::fmt::Debug for Copies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copies")
            .field(
                "disks",
                &self.disks.iter().map(|d| &d.id).collect::<Vec<_>>(),
            )
            .field("kept", &self.kept)
            .finish()
    }
}

impl Copies {
    /// Reads the manifest a source sent, checks it against the VM's
    /// configuration, and creates each disk's file at its placement.
    /// `config`'s disks then name those files.
    pub fn create(
        manifest: &[u8],
        config: &mut VmConfig,
        placements: &[Placement],
    ) -> Result<Copies, StorageError> {
        let m: Manifest = serde_json::from_slice(manifest).map_err(StorageError::Unreadable)?;
        let listed: Vec<&str> = m.disks.iter().map(|d| d.id.as_str()).collect();
        let configured: Vec<&str> = config.disks.iter().map(|d| d.id.as_str()).collect();
        if listed != configured || m.disks.len() > MAX_DISKS {
            return Err(StorageError::Mismatch {
                listed: ids(listed.into_iter()),
                configured: ids(configured.into_iter()),
            });
        }
        for p in placements {
            if !configured.contains(&p.id.as_str()) {
                return Err(StorageError::NoSuchDisk {
                    id: p.id.clone(),
                    have: ids(configured.into_iter()),
                });
            }
        }
        let mut copies = Copies {
            disks: Vec::new(),
            bounce: Bounce::new(),
            kept: false,
        };
        for d in &m.disks {
            if d.bytes == 0 || !d.bytes.is_multiple_of(512) {
                return Err(StorageError::BadSize {
                    id: d.id.clone(),
                    bytes: d.bytes,
                });
            }
            let path = placements
                .iter()
                .find(|p| p.id == d.id)
                .map(|p| p.path.clone())
                .ok_or_else(|| StorageError::NoPlacement { id: d.id.clone() })?;
            if path.symlink_metadata().is_ok() {
                return Err(StorageError::Exists {
                    id: d.id.clone(),
                    path,
                });
            }
            // Buffered: blocks arrive in any order and size; the VM opens
            // the file again with the cache mode its disk asks for.
            let image = DiskImage::create_sparse(&path, d.bytes, CacheMode::Writeback).map_err(
                |source| StorageError::Create {
                    id: d.id.clone(),
                    source,
                },
            )?;
            copies.disks.push(Receiving {
                id: d.id.clone(),
                image,
                size: d.bytes,
            });
        }
        for (cfg, d) in config.disks.iter_mut().zip(&copies.disks) {
            cfg.path = d.image.path().to_path_buf();
        }
        Ok(copies)
    }

    /// Whether `addr` is a disk block's address rather than guest memory.
    pub fn is_disk_address(addr: u64) -> bool {
        split_address(addr).is_some()
    }

    /// The disk and byte range `len` bytes at `addr` name, clipped to the
    /// disk's end (its last block may be partly past it).
    fn place(&self, addr: u64, len: u64) -> Result<(&Receiving, u64, u64), StorageError> {
        let outside = StorageError::Outside { addr, len };
        let (index, offset) = split_address(addr).ok_or_else(|| outside_of(addr, len))?;
        let d = self.disks.get(index).ok_or(outside)?;
        let end = offset
            .checked_add(len)
            .filter(|_| offset.is_multiple_of(PAGE_SIZE) && offset < d.size)
            .ok_or_else(|| outside_of(addr, len))?;
        Ok((d, offset, end.min(d.size) - offset))
    }

    /// Writes blocks that arrived (decoded) at store address `addr`.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), StorageError> {
        let (d, offset, len) = self.place(addr, data.len() as u64)?;
        d.image
            .pwrite(offset, &data[..len as usize])
            .map_err(|source| io_error(d, format!("writing {len} bytes at {offset} of"), source))
    }

    /// Makes `pages` blocks at store address `addr` read as zeros.
    pub fn zero(&mut self, addr: u64, pages: u64) -> Result<(), StorageError> {
        let len = pages
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| outside_of(addr, u64::MAX))?;
        let mut bounce = std::mem::take(&mut self.bounce);
        let (d, offset, len) = self.place(addr, len)?;
        let r = d
            .image
            .zero(offset, len, &mut bounce)
            .map_err(|source| io_error(d, format!("zeroing {len} bytes at {offset} of"), source));
        self.bounce = bounce;
        r
    }

    /// Makes everything written so far durable (at a round's end, so that
    /// `done` has only the last round's blocks left to sync).
    pub fn sync(&self) -> Result<(), StorageError> {
        for d in &self.disks {
            d.image
                .flush()
                .map_err(|source| io_error(d, "fdatasync".into(), source))?;
        }
        Ok(())
    }

    /// The copies are complete and the VM is about to open them: makes
    /// them durable and lets go of their locks (the VM's devices lock them
    /// again as they open them). They are still removed when dropped
    /// unless [`Copies::keep`] is called.
    pub fn hand_over(&self) -> Result<(), StorageError> {
        self.sync()?;
        for d in &self.disks {
            d.image
                .unlock()
                .map_err(|source| io_error(d, "unlocking (F_OFD_SETLK F_UNLCK)".into(), source))?;
        }
        Ok(())
    }

    /// The VM runs on the copies: they are no longer removed.
    pub fn keep(&mut self) {
        self.kept = true;
    }

    /// The files being written.
    pub fn paths(&self) -> Vec<&Path> {
        self.disks.iter().map(|d| d.image.path()).collect()
    }

    /// Each disk and its file, for the report.
    pub fn list(&self) -> Vec<CopiedDisk> {
        self.disks
            .iter()
            .map(|d| CopiedDisk {
                id: d.id.clone(),
                path: d.image.path().to_path_buf(),
            })
            .collect()
    }
}

impl Drop for Copies {
    fn drop(&mut self) {
        if !self.kept {
            for d in &self.disks {
                let _ = std::fs::remove_file(d.image.path());
            }
        }
    }
}

fn outside_of(addr: u64, len: u64) -> StorageError {
    StorageError::Outside { addr, len }
}

fn io_error(d: &Receiving, what: String, source: std::io::Error) -> StorageError {
    StorageError::Io {
        id: d.id.clone(),
        what,
        path: d.image.path().to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::store::store_address;

    fn config_with(ids: &[&str]) -> VmConfig {
        let mut c = VmConfig {
            name: "copy-storage-test".into(),
            vcpus: 1,
            nodes: Vec::new(),
            guest: crate::vmm::config::GuestSpec::Idle,
            hugepages: false,
            chunk_size: 32 << 20,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
        };
        c.disks = ids
            .iter()
            .map(|id| {
                crate::vmm::config::DiskConfig::parse(&format!("path=/nonexistent,id={id}"), id)
                    .unwrap()
            })
            .collect();
        c
    }

    fn manifest(disks: &[(&str, u64)]) -> Vec<u8> {
        serde_json::to_vec(&Manifest {
            disks: disks
                .iter()
                .map(|&(id, bytes)| ManifestDisk {
                    id: id.into(),
                    bytes,
                    readonly: false,
                })
                .collect(),
        })
        .unwrap()
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vmhop-storage-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn place(id: &str, path: &Path) -> Placement {
        Placement::parse(&format!("id={id},path={}", path.display())).unwrap()
    }

    #[test]
    fn blocks_land_in_the_placed_file_clipped_to_its_end() {
        let dir = tempdir();
        let f = dir.join("d.img");
        let mut c = config_with(&["disk0"]);
        // 3 blocks less 512 bytes: the last block is partly past the end.
        let size = 3 * PAGE_SIZE - 512;
        let mut copies =
            Copies::create(&manifest(&[("disk0", size)]), &mut c, &[place("disk0", &f)]).unwrap();
        assert_eq!(c.disks[0].path, f);
        let data: Vec<u8> = (0..3 * PAGE_SIZE as usize)
            .map(|i| (i % 253) as u8)
            .collect();
        copies.write(store_address(0, 0), &data).unwrap();
        copies.zero(store_address(0, PAGE_SIZE), 1).unwrap();
        copies.hand_over().unwrap();
        assert_eq!(copies.paths(), vec![f.as_path()]);
        copies.keep();
        drop(copies);
        let got = std::fs::read(&f).unwrap();
        assert_eq!(got.len() as u64, size);
        assert_eq!(&got[..4096], &data[..4096]);
        assert!(got[4096..8192].iter().all(|&b| b == 0));
        assert_eq!(&got[8192..], &data[8192..size as usize]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refusals_name_the_disk_and_leave_no_file() {
        let dir = tempdir();
        let f = dir.join("d.img");
        let mut c = config_with(&["disk0"]);
        let m = manifest(&[("disk0", 1 << 20)]);
        let e = Copies::create(&m, &mut c, &[]).unwrap_err();
        assert!(e.to_string().contains("--disk id=disk0,path=NEW"), "{e}");
        let e = Copies::create(&manifest(&[("other", 4096)]), &mut c, &[place("disk0", &f)])
            .unwrap_err();
        assert!(matches!(e, StorageError::Mismatch { .. }), "{e}");
        let e = Copies::create(&m, &mut c, &[place("disk9", &f)]).unwrap_err();
        assert!(e.to_string().contains("no disk disk9"), "{e}");
        let e = Copies::create(&manifest(&[("disk0", 1000)]), &mut c, &[place("disk0", &f)])
            .unwrap_err();
        assert!(matches!(e, StorageError::BadSize { .. }), "{e}");
        assert!(!f.exists());
        std::fs::write(&f, b"mine").unwrap();
        let e = Copies::create(&m, &mut c, &[place("disk0", &f)]).unwrap_err();
        assert!(matches!(e, StorageError::Exists { .. }), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"mine");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn blocks_outside_a_disk_are_refused_and_a_dropped_copy_is_removed() {
        let dir = tempdir();
        let f = dir.join("d.img");
        let mut c = config_with(&["disk0"]);
        let mut copies =
            Copies::create(&manifest(&[("disk0", 8192)]), &mut c, &[place("disk0", &f)]).unwrap();
        let page = vec![1u8; PAGE_SIZE as usize];
        for addr in [
            store_address(0, 8192),
            store_address(1, 0),
            store_address(0, 100),
            0x1000,
        ] {
            let e = copies.write(addr, &page).unwrap_err();
            assert!(matches!(e, StorageError::Outside { .. }), "{addr:#x}: {e}");
        }
        assert!(copies.zero(store_address(0, 0), u64::MAX).is_err());
        assert!(f.exists());
        drop(copies);
        assert!(!f.exists(), "a copy that was not kept is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
