//! Clone images: one flat copy of a checkpoint's memory, in guest-physical
//! order, on shmem, that clones (`vmhop restore DIR@ID --shared`) map
//! copy-on-write (`MAP_PRIVATE`), so that N clones hold one copy of the
//! checkpoint plus what each writes.
//!
//! Why not map the checkpoint files themselves: their records are in write
//! order across a chain of files; userfaultfd (copy-on-write checkpoints)
//! refuses regular-file mappings; and page-cache pages of a disk file
//! ignore `mbind`. A tmpfs file has none of these problems.
//!
//! This module owns the image directory (`$VMHOP_IMAGE_DIR`, default
//! `/dev/shm/vmhop-images`), each image's name (from the checkpoint's
//! identity: chain id, id, creation time), building an image once (under a
//! build lock, into a temporary name renamed into place when complete), the
//! clones' hold on an image (an OFD read lock on the image file for the
//! clone's life, plus a registration file naming the clone) and removing
//! images (an OFD write lock: refused, naming the clones, while any clone
//! holds one). What the pages are and where they come from is the caller's
//! (`checkpoint::restore`); mapping them into guest memory is
//! `memory::Mapping`'s.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Environment variable naming the image directory (it must be on tmpfs).
pub const IMAGE_DIR_ENV: &str = "VMHOP_IMAGE_DIR";
/// The image directory when [`IMAGE_DIR_ENV`] is not set.
pub const DEFAULT_IMAGE_DIR: &str = "/dev/shm/vmhop-images";
/// statfs's f_type of tmpfs (and of /dev/shm).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Building, holding or removing a clone image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image directory cannot be made or read.
    #[error("clone image directory {}: {source}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image directory is not on shmem.
    #[error("clone image directory {} is not on tmpfs (file system type {fs:#x}): clones map their image copy-on-write from shmem; set {IMAGE_DIR_ENV} to a directory on tmpfs", path.display())]
    NotShmem {
        /// The directory.
        path: PathBuf,
        /// Its file system's magic number.
        fs: i64,
    },
    /// A system call on an image file failed.
    #[error("clone image {}: {what}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The call and its purpose.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Filling a new image failed (the caller's error, as text: the
    /// checkpoint file and page it names).
    #[error("building clone image {}: {message}", path.display())]
    Fill {
        /// The image being built.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// An existing image does not have the size this checkpoint's memory
    /// needs (a vmhop bug, or a file put there by hand).
    #[error("clone image {}: {have} bytes, but the checkpoint's memory needs {want}; remove it (vmhop checkpoints DIR --drop-images) to have it rebuilt", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        have: u64,
        /// The size expected.
        want: u64,
    },
    /// Running clones map the image.
    #[error("clone image {} of checkpoint {id} is mapped by running clones: {}; stop them first", path.display(), clones.join(", "))]
    InUse {
        /// The image.
        path: PathBuf,
        /// The checkpoint it is an image of.
        id: u32,
        /// The clones, as "NAME (pid PID)".
        clones: Vec<String>,
    },
}

impl crate::api::Classify for ImageError {
    fn kind(&self) -> crate::api::ErrorKind {
        match self {
            ImageError::Dir { source, .. } | ImageError::Io { source, .. } => {
                crate::api::ErrorKind::of_io(source)
            }
            ImageError::NotShmem { .. } => crate::api::ErrorKind::BadRequest,
            ImageError::Fill { .. } | ImageError::Size { .. } => crate::api::ErrorKind::Failed,
            ImageError::InUse { .. } => crate::api::ErrorKind::Conflict,
        }
    }
}

/// Which checkpoint an image holds: enough to name it so that any later
/// clone of the same checkpoint finds it, and a new checkpoint that reuses
/// an id (another chain, or the same file written again) does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageKey {
    /// The chain's random id.
    pub chain_id: u64,
    /// The checkpoint's id.
    pub id: u32,
    /// The checkpoint's creation time (ms since the Unix epoch).
    pub created_unix_ms: u64,
}

impl ImageKey {
    fn stem(&self) -> String {
        format!(
            "{:016x}-{}-{}",
            self.chain_id, self.id, self.created_unix_ms
        )
    }
}

/// The image directory: `$VMHOP_IMAGE_DIR` or [`DEFAULT_IMAGE_DIR`].
pub fn image_dir() -> PathBuf {
    std::env::var_os(IMAGE_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE_DIR))
}

/// Where the image of `key` lives (whether it exists or not).
pub fn image_path(key: &ImageKey) -> PathBuf {
    image_dir().join(format!("{}.img", key.stem()))
}

fn lock_path(key: &ImageKey) -> PathBuf {
    image_dir().join(format!("{}.lock", key.stem()))
}

fn clones_dir(key: &ImageKey) -> PathBuf {
    image_dir().join(format!("{}.clones", key.stem()))
}

/// A clone's hold on its image, for as long as the clone's process lives:
/// the image file (open read-only, OFD read-locked) and the registration
/// file naming the clone, removed on drop.
#[derive(Debug)]
pub struct CloneImage {
    file: File,
    path: PathBuf,
    registration: Option<PathBuf>,
    /// Whether this restore built the image (the first clone does).
    pub built: bool,
    /// Milliseconds spent building it (0 if it existed).
    pub build_ms: f64,
}

impl CloneImage {
    /// The image file, to map.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// 4 KiB pages of memory the image holds (tmpfs allocates only what
    /// was written, and what clones read of its holes).
    pub fn held_pages(&self) -> u64 {
        self.file
            .metadata()
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512 / 4096)
            .unwrap_or(0)
    }

    /// Registers the clone `name` (this process) beside the image, so that
    /// a refused removal can name it.
    pub fn register(&mut self, key: &ImageKey, name: &str) -> Result<(), ImageError> {
        let dir = clones_dir(key);
        std::fs::create_dir_all(&dir).map_err(|source| ImageError::Dir {
            path: dir.clone(),
            source,
        })?;
        let path = dir.join(std::process::id().to_string());
        std::fs::write(&path, name).map_err(|source| ImageError::Io {
            path: path.clone(),
            what: "writing the clone's registration",
            source,
        })?;
        self.registration = Some(path);
        Ok(())
    }
}

impl Drop for CloneImage {
    fn drop(&mut self) {
        // The lock goes with the file description, closed after this.
        if let Some(r) = &self.registration {
            let _ = std::fs::remove_file(r);
        }
    }
}

/// Opens the image of `key` (`size` bytes), building it with `fill` first
/// if it does not exist: `fill` gets the new image's bytes, mapped shared,
/// all zero, and writes each stored page at its guest-physical address.
/// Two restores racing build it once: the second waits on the build lock
/// and then opens what the first built. The image returned is held (OFD
/// read lock) until the [`CloneImage`] is dropped.
pub fn open_or_build(
    key: &ImageKey,
    size: u64,
    fill: impl FnOnce(&mut [u8]) -> Result<(), String>,
) -> Result<CloneImage, ImageError> {
    let dir = image_dir();
    if let Some(img) = open_existing(key, size)? {
        return Ok(img);
    }
    ensure_dir(&dir)?;
    let lock_path = lock_path(key);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|source| ImageError::Io {
            path: lock_path.clone(),
            what: "opening the build lock",
            source,
        })?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(ImageError::Io {
            path: lock_path,
            what: "flock(LOCK_EX) of the build lock",
            source: io::Error::last_os_error(),
        });
    }
    // Another restore may have built it while this one waited.
    if let Some(img) = open_existing(key, size)? {
        return Ok(img);
    }
    let t = Instant::now();
    let path = image_path(key);
    let tmp = dir.join(format!("{}.img.tmp-{}", key.stem(), std::process::id()));
    let built = build(&tmp, size, fill);
    if let Err(e) = built {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        ImageError::Io {
            path: path.clone(),
            what: "renaming the finished image into place",
            source,
        }
    })?;
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    // The build lock is released when `lock` drops, after this open.
    let mut img = open_existing(key, size)?.ok_or_else(|| ImageError::Io {
        path: path.clone(),
        what: "opening the image just built",
        source: io::Error::from_raw_os_error(libc::ENOENT),
    })?;
    drop(lock);
    img.built = true;
    img.build_ms = build_ms;
    Ok(img)
}

fn ensure_dir(dir: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(dir).map_err(|source| ImageError::Dir {
        path: dir.into(),
        source,
    })?;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| {
        ImageError::Dir {
            path: dir.into(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        }
    })?;
    // SAFETY: an all-zero statfs is a valid out-buffer for statfs, which
    // only writes it; `c` is a NUL-terminated path that outlives the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(ImageError::Dir {
            path: dir.into(),
            source: io::Error::last_os_error(),
        });
    }
    if st.f_type as i64 != TMPFS_MAGIC {
        return Err(ImageError::NotShmem {
            path: dir.into(),
            fs: st.f_type as i64,
        });
    }
    Ok(())
}

/// Creates `tmp` of `size` bytes (sparse), maps it shared and fills it.
fn build(
    tmp: &Path,
    size: u64,
    fill: impl FnOnce(&mut [u8]) -> Result<(), String>,
) -> Result<(), ImageError> {
    let io_err = |what: &'static str| {
        let path = tmp.to_path_buf();
        move |source| ImageError::Io { path, what, source }
    };
    let f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io_err("creating the image"))?;
    f.set_len(size).map_err(io_err("ftruncate to its size"))?;
    let len = size as usize;
    // SAFETY: a new shared mapping of the whole file we just sized, at a
    // kernel-chosen address; unmapped below, before the file is renamed.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io_err("mmap(MAP_SHARED)")(io::Error::last_os_error()));
    }
    // SAFETY: [p, p + len) is the mapping made above, which nothing else in
    // this process refers to; the slice lives until the munmap below.
    let out = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) };
    let filled = fill(out);
    // SAFETY: unmaps exactly the mapping made above; `out` is dead.
    unsafe { libc::munmap(p, len) };
    filled.map_err(|message| ImageError::Fill {
        path: tmp.to_path_buf(),
        message,
    })?;
    // Clones open it read-only and map it privately, never writing it;
    // a removal opens it for writing, as its write lock needs.
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(io_err("fchmod 0644"))?;
    Ok(())
}

/// Opens and read-locks the image of `key` (`size` bytes), if it exists:
/// a clone's fast path, which neither builds nor waits on the build lock.
pub fn open(key: &ImageKey, size: u64) -> Result<Option<CloneImage>, ImageError> {
    open_existing(key, size)
}

/// Opens and read-locks the image of `key`, if it exists (and is still
/// linked: a removal may have unlinked it between the open and the lock).
fn open_existing(key: &ImageKey, size: u64) -> Result<Option<CloneImage>, ImageError> {
    let path = image_path(key);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ImageError::Io {
                path,
                what: "opening",
                source,
            })
        }
    };
    ofd_lock(&file, libc::F_RDLCK, true).map_err(|source| ImageError::Io {
        path: path.clone(),
        what: "F_OFD_SETLKW read lock",
        source,
    })?;
    let meta = file.metadata().map_err(|source| ImageError::Io {
        path: path.clone(),
        what: "fstat",
        source,
    })?;
    if std::os::unix::fs::MetadataExt::nlink(&meta) == 0 {
        return Ok(None);
    }
    if meta.len() != size {
        return Err(ImageError::Size {
            path,
            have: meta.len(),
            want: size,
        });
    }
    Ok(Some(CloneImage {
        file,
        path,
        registration: None,
        built: false,
        build_ms: 0.0,
    }))
}

/// Takes an OFD lock of `kind` on the whole of `f` (waiting if `wait`).
fn ofd_lock(f: &File, kind: i32, wait: bool) -> io::Result<()> {
    // SAFETY: an all-zero flock is valid; the fields set below describe
    // the whole file, and OFD locks need l_pid 0.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: fcntl on a descriptor we own with a valid flock.
        if unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The clones registered beside the image of `key` whose process lives,
/// as "NAME (pid PID)".
fn registered_clones(key: &ImageKey) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(clones_dir(key)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            // Its clone died without removing it.
            let _ = std::fs::remove_file(e.path());
            continue;
        }
        let name = std::fs::read_to_string(e.path()).unwrap_or_default();
        out.push(format!("{name} (pid {pid})"));
    }
    out.sort();
    out
}

/// The running clones of checkpoint `key` (empty if none or no image).
pub fn clones_of(key: &ImageKey) -> Result<Vec<String>, ImageError> {
    let path = image_path(key);
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ImageError::Io {
                path,
                what: "opening",
                source,
            })
        }
    };
    match ofd_lock(&file, libc::F_WRLCK, false) {
        Ok(()) => Ok(Vec::new()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
            let names = registered_clones(key);
            Ok(if names.is_empty() {
                vec!["an unregistered clone".into()]
            } else {
                names
            })
        }
        Err(source) => Err(ImageError::Io {
            path,
            what: "F_OFD_SETLK write lock",
            source,
        }),
    }
}

/// Removes the image of `key` and its lock and registrations; refused,
/// naming them, while clones map it. Returns the bytes it held (0 if
/// there was none).
pub fn remove(key: &ImageKey) -> Result<u64, ImageError> {
    let path = image_path(key);
    // Open for writing: an OFD write lock needs it (nothing is written).
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(ImageError::Io {
                path,
                what: "opening",
                source,
            })
        }
    };
    match ofd_lock(&file, libc::F_WRLCK, false) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
            let names = registered_clones(key);
            return Err(ImageError::InUse {
                path,
                id: key.id,
                clones: if names.is_empty() {
                    vec!["an unregistered clone".into()]
                } else {
                    names
                },
            });
        }
        Err(source) => {
            return Err(ImageError::Io {
                path,
                what: "F_OFD_SETLK write lock",
                source,
            })
        }
    }
    let held = file
        .metadata()
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0);
    // Unlinked under the write lock: a clone that opened it meanwhile gets
    // its read lock only after ours goes, then sees it unlinked and builds
    // a new one.
    std::fs::remove_file(&path).map_err(|source| ImageError::Io {
        path: path.clone(),
        what: "unlink",
        source,
    })?;
    let _ = std::fs::remove_dir_all(clones_dir(key));
    let _ = std::fs::remove_file(lock_path(key));
    Ok(held)
}

/// Removing checkpoints or their images failed or was refused.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    /// The directory's chain could not be read.
    #[error("{0}")]
    Chain(#[from] super::chain::ChainError),
    /// An image is in use, or could not be removed.
    #[error("{0}")]
    Image(#[from] ImageError),
    /// `delete` needs an id.
    #[error("{}: give the checkpoint to delete as DIR@ID", dir.display())]
    NoId {
        /// The directory.
        dir: PathBuf,
    },
    /// Other checkpoints are incrementals on the one to delete.
    #[error("{}: checkpoint {id} is the parent of {}: merge the chain first (vmhop merge DIR@ID) or delete those", file.display(), children.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))]
    HasChildren {
        /// The checkpoint's file.
        file: PathBuf,
        /// Its id.
        id: u32,
        /// The checkpoints on it.
        children: Vec<u32>,
    },
    /// Unlinking the checkpoint's file failed.
    #[error("{}: unlink: {source}", file.display())]
    Unlink {
        /// The file.
        file: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl crate::api::Classify for DropError {
    fn kind(&self) -> crate::api::ErrorKind {
        match self {
            DropError::Chain(e) => e.kind(),
            DropError::Image(e) => e.kind(),
            DropError::NoId { .. } => crate::api::ErrorKind::BadRequest,
            DropError::HasChildren { .. } => crate::api::ErrorKind::Conflict,
            DropError::Unlink { source, .. } => crate::api::ErrorKind::of_io(source),
        }
    }
}

/// What a drop or delete removed.
#[derive(Debug, Default)]
pub struct Dropped {
    /// The checkpoint file deleted, if any.
    pub file: Option<PathBuf>,
    /// The images removed.
    pub images: Vec<PathBuf>,
    /// The memory they held.
    pub image_bytes: u64,
}

fn key_of(e: &crate::api::checkpoint::CheckpointEntry) -> ImageKey {
    ImageKey {
        chain_id: e.chain_id,
        id: e.id,
        created_unix_ms: e.created_unix_ms,
    }
}

/// Removes the clone images of every checkpoint in `dir`; refused, naming
/// the clones, if any runs (then nothing is removed).
pub fn drop_images(dir: &Path) -> Result<Dropped, DropError> {
    let chain = super::chain::Chain::open(dir)?;
    let keys: Vec<ImageKey> = chain.entries().iter().map(key_of).collect();
    for k in &keys {
        let clones = clones_of(k)?;
        if !clones.is_empty() {
            return Err(ImageError::InUse {
                path: image_path(k),
                id: k.id,
                clones,
            }
            .into());
        }
    }
    let mut out = Dropped::default();
    for k in &keys {
        let path = image_path(k);
        let existed = path.exists();
        out.image_bytes += remove(k)?;
        if existed {
            out.images.push(path);
        }
    }
    Ok(out)
}

/// Deletes checkpoint `id` of `dir` (its file and its clone image):
/// refused while another checkpoint is an incremental on it, or while
/// clones of it run (naming them).
pub fn delete(dir: &Path, id: Option<u32>) -> Result<Dropped, DropError> {
    let id = id.ok_or_else(|| DropError::NoId { dir: dir.into() })?;
    let chain = super::chain::Chain::open(dir)?;
    let e = chain
        .get(id)
        .ok_or_else(|| super::chain::ChainError::NoSuchId {
            dir: dir.into(),
            id,
        })?;
    let children: Vec<u32> = chain
        .entries()
        .iter()
        .filter(|c| c.chain_id == e.chain_id && c.parent == Some(id))
        .map(|c| c.id)
        .collect();
    if !children.is_empty() {
        return Err(DropError::HasChildren {
            file: e.path.clone(),
            id,
            children,
        });
    }
    let key = key_of(e);
    let path = image_path(&key);
    let existed = path.exists();
    // The image first: refused while clones map it, and then the file stays.
    let image_bytes = remove(&key)?;
    std::fs::remove_file(&e.path).map_err(|source| DropError::Unlink {
        file: e.path.clone(),
        source,
    })?;
    Ok(Dropped {
        file: Some(e.path.clone()),
        images: if existed { vec![path] } else { Vec::new() },
        image_bytes,
    })
}
