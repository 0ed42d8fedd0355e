//! The Linux demo's own initramfs: the host's static busybox and the
//! checker of the NUMA-box tests (tests/numabox/linux/guest-init.sh) as
//! `/init`, packed as a newc cpio archive, the format the kernel unpacks.
//!
//! Owns the packing and the checks it needs (a statically linked
//! busybox); the Linux demo decides when to use it.

use std::fs;
use std::path::{Path, PathBuf};

use super::checks::check;
use super::DemoError;

/// The guest's checker, shared with the NUMA-box tests.
const GUEST_INIT: &str = include_str!("../../../tests/numabox/linux/guest-init.sh");
/// Where the host's static busybox lives (Debian's busybox-static).
const BUSYBOX: &str = "/bin/busybox";

/// Packs the demo's initramfs into `dir`: the host's static busybox and
/// the checker as /init; returns its path.
pub(super) fn pack(dir: &Path) -> Result<PathBuf, DemoError> {
    let step = "initramfs";
    let busybox = fs::read(BUSYBOX).map_err(|e| {
        check(
            step,
            format!("{BUSYBOX}: {e}; install busybox-static or give --initrd"),
        )
    })?;
    if has_interpreter(&busybox) {
        return Err(check(
            step,
            format!("{BUSYBOX} is linked dynamically; install busybox-static or give --initrd"),
        ));
    }
    let mut c = Cpio::default();
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "run"] {
        c.dir(d);
    }
    c.node("dev/console", 0o020600, 5, 1);
    c.file("bin/busybox", 0o100755, &busybox);
    c.file("init", 0o100755, GUEST_INIT.as_bytes());
    let path = dir.join("initrd.cpio");
    fs::write(&path, c.finish()).map_err(|e| check(step, format!("{}: {e}", path.display())))?;
    Ok(path)
}

/// Whether a 64-bit ELF file names a program interpreter (is linked
/// dynamically): the guest has no libc to offer one.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
    };
    if !elf.starts_with(b"\x7fELF") {
        return false;
    }
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..count).any(|i| u32_at(phoff + i * size) == Some(PT_INTERP))
}

/// A newc ("070701") cpio archive, the format the kernel unpacks as an
/// initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, dev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            dev.0,
            dev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, mode, (0, 0), data);
    }

    fn node(&mut self, name: &str, mode: u32, major: u32, minor: u32) {
        self.entry(name, mode, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamically_linked_binary_is_told_from_a_static_one() {
        let me = fs::read("/proc/self/exe").unwrap();
        // The test binary itself is linked like the build asked
        // (scripts/test.sh links everything statically).
        assert_eq!(has_interpreter(&me), !cfg!(target_feature = "crt-static"));
        let mut fake = vec![0u8; 0x100];
        fake[..4].copy_from_slice(b"\x7fELF");
        fake[0x20] = 0x40;
        fake[0x36] = 0x38;
        fake[0x38] = 1;
        fake[0x40] = 1; // PT_LOAD only
        assert!(!has_interpreter(&fake));
        fake[0x40] = 3;
        assert!(has_interpreter(&fake));
        assert!(!has_interpreter(b"not an elf"));
    }

    #[test]
    fn cpio_entries_are_newc_and_four_byte_aligned() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o100755, b"#!/bin/sh\n");
        let a = c.finish();
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("init\0") && text.contains("#!/bin/sh\n"));
        assert!(text.contains("TRAILER!!!"));
        // The file entry's size field (7th field) is 10 bytes.
        let at = text.find("init\0").unwrap();
        let header = &text[at - 110 + 6..at];
        assert_eq!(&header[48..56], "0000000a");
    }
}
