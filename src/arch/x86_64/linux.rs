//! Direct boot of a Linux kernel (bzImage or ELF vmlinux) with linux-loader:
//! the kernel, the command line, the initrd, boot_params with an e820 map of
//! the guest-physical layout, the ACPI tables, and the boot vCPU's
//! registers. The other vCPUs are left in KVM's reset state: with the
//! in-kernel local APIC they wait for the kernel's INIT/SIPI.
//!
//! What ends in guest memory here is written before any vCPU runs and
//! before dirty logging can be on, so no checkpoint misses it: the first
//! checkpoint of a VM is always full.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kvm_ioctls::VcpuFd;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::acpi::{self, AcpiConfig, AcpiCpu, AcpiMemory};
use super::regs;
use crate::memory::layout::MMIO_HOLE_START;
use crate::memory::GuestMemory;

/// Where boot_params (the "zero page") goes.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line vmhop passes (the kernel may accept less).
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Where the kernel proper is loaded: 1 MiB, as the boot protocol expects.
pub const HIMEM_START: u64 = 0x10_0000;
/// End of the conventional memory below the EBDA and the BIOS area.
const LOW_RAM_END: u64 = 0x9_fc00;
/// The command line used when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k pci=off";
/// The oldest boot protocol with the 64-bit entry point and `xloadflags`
/// (Linux 3.8): vmhop enters the kernel in long mode.
pub const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// xloadflags bit: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// boot_params.hdr values a boot loader sets.
const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// e820 entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Where a CPU starts after a reset, and where Linux jumps (in real mode)
/// for a "BIOS" reboot: with HW-reduced ACPI and no EFI, Linux's default
/// reboot path ends there. vmhop has no BIOS, so a stub there pulses the
/// reset line through the i8042 (`mov al, 0xfe; out 0x64, al; jmp $`),
/// which ends the VM as a reboot.
const RESET_VECTOR_ADDR: u64 = 0xf_fff0;
const RESET_VECTOR_STUB: [u8; 6] = [0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe];
/// Top of the 32-bit hole where the IOAPIC, HPET and local APICs live,
/// reserved in e820 the way firmware does; the rest of the hole stays a gap.
const APIC_AREA_START: u64 = acpi::IOAPIC_ADDR;
const APIC_AREA_END: u64 = 0x1_0000_0000;

/// The kernel to boot and its companions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinuxSpec {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// The kernel image formats vmhop boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage (what distributions ship as vmlinuz).
    BzImage,
    /// An uncompressed ELF vmlinux.
    Elf,
}

impl crate::api::Classify for LinuxError {
    fn kind(&self) -> crate::api::ErrorKind {
        use crate::api::ErrorKind;
        match self {
            LinuxError::Read { source, .. } => match ErrorKind::of_io(source) {
                ErrorKind::Failed => ErrorKind::Unusable,
                k => k,
            },
            LinuxError::NotAKernel { .. }
            | LinuxError::TooOld { .. }
            | LinuxError::Load { .. }
            | LinuxError::DoesNotFit { .. } => ErrorKind::Unusable,
            LinuxError::Cmdline(_) => ErrorKind::BadRequest,
            LinuxError::Setup(_) | LinuxError::View(_) | LinuxError::Regs(_) => ErrorKind::Failed,
        }
    }
}

/// Booting Linux failed before the guest ran.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither a bzImage nor an ELF kernel.
    #[error("{} is not a Linux kernel: it has neither an ELF header nor a bzImage 'HdrS' setup header", path.display())]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// The bzImage speaks a boot protocol older than vmhop needs.
    #[error("{} uses boot protocol {}.{:02} without the 64-bit entry point; vmhop needs protocol {}.{:02} (Linux 3.8) or newer", path.display(), version >> 8, version & 0xff, MIN_BOOT_PROTOCOL >> 8, MIN_BOOT_PROTOCOL & 0xff)]
    TooOld {
        /// The file.
        path: PathBuf,
        /// Its protocol version.
        version: u16,
    },
    /// linux-loader refused the image.
    #[error("cannot load kernel {}: {source}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// What linux-loader said.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Something does not fit in guest memory.
    #[error("{what} ({size} bytes) does not fit in guest memory: {room}")]
    DoesNotFit {
        /// What.
        what: String,
        /// Its size.
        size: u64,
        /// Where it had to go.
        room: String,
    },
    /// The command line is unusable.
    #[error("--cmdline: {0}")]
    Cmdline(String),
    /// Writing guest memory or the ACPI tables failed.
    #[error("{0}")]
    Setup(String),
    /// Guest memory cannot be handed to linux-loader.
    #[error(transparent)]
    View(#[from] crate::memory::MemoryViewError),
    /// Writing the boot tables or setting a vCPU's boot registers failed.
    #[error(transparent)]
    Regs(#[from] super::regs::RegsError),
}

fn read_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LinuxError + 'a {
    move |source| LinuxError::Read {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `path` is a kernel vmhop can boot, without loading it, so a
/// wrong file is refused before any VM exists.
pub fn inspect(path: &Path) -> Result<KernelFormat, LinuxError> {
    let mut f = File::open(path).map_err(read_err("kernel", path))?;
    let mut head = vec![0u8; 0x270];
    let n = read_up_to(&mut f, &mut head).map_err(read_err("kernel", path))?;
    head.truncate(n);
    if head.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    let le16 = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let le32 = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if le32(0x202) != Some(HDRS_MAGIC) {
        return Err(LinuxError::NotAKernel {
            path: path.to_path_buf(),
        });
    }
    let version = le16(0x206).unwrap_or(0);
    let xloadflags = le16(0x236).unwrap_or(0);
    if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxError::TooOld {
            path: path.to_path_buf(),
            version,
        });
    }
    Ok(KernelFormat::BzImage)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The machine's shape as the tables describe it.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Guest node of each vCPU, by vCPU id.
    pub vcpu_nodes: Vec<u32>,
    /// APIC id of each vCPU, by vCPU id (`cpuid::topology`).
    pub apic_ids: Vec<u32>,
    /// Distance between guest nodes (SLIT), 10 on the diagonal.
    pub distances: Vec<Vec<u8>>,
    /// The virtio-mmio devices the DSDT describes.
    pub virtio: Vec<super::layout::VirtioSlot>,
}

/// Guest-physical RAM ranges of each guest node, contiguous chunks merged.
fn node_ranges(mem: &GuestMemory) -> Vec<(u32, u64, u64)> {
    let mut out: Vec<(u32, u64, u64)> = Vec::new();
    for n in &mem.nodes {
        for c in &n.chunks {
            match out.last_mut() {
                Some((node, _, end)) if *node == n.guest_node && *end == c.range.start => {
                    *end = c.range.end()
                }
                _ => out.push((n.guest_node, c.range.start, c.range.end())),
            }
        }
    }
    out
}

/// The e820 map: low RAM, the BIOS area (ACPI tables) reserved, each
/// node's RAM from 1 MiB up, and the APIC area at the top of the hole.
fn e820(ranges: &[(u32, u64, u64)]) -> Vec<boot_e820_entry> {
    let mut out = vec![
        boot_e820_entry {
            addr: 0,
            size: LOW_RAM_END,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: LOW_RAM_END,
            size: HIMEM_START - LOW_RAM_END,
            r#type: E820_RESERVED,
        },
    ];
    let mut apic_done = false;
    for &(_, start, end) in ranges {
        let start = start.max(HIMEM_START);
        if start >= end {
            continue;
        }
        if !apic_done && start >= APIC_AREA_END {
            out.push(apic_area());
            apic_done = true;
        }
        out.push(boot_e820_entry {
            addr: start,
            size: end - start,
            r#type: E820_RAM,
        });
    }
    if !apic_done {
        out.push(apic_area());
    }
    out
}

fn apic_area() -> boot_e820_entry {
    boot_e820_entry {
        addr: APIC_AREA_START,
        size: APIC_AREA_END - APIC_AREA_START,
        r#type: E820_RESERVED,
    }
}

/// The end of RAM that runs on without a gap from 1 MiB (where the kernel
/// sits), below the 32-bit hole: where the initrd may go.
fn low_ram_end(ranges: &[(u32, u64, u64)]) -> u64 {
    let mut end = HIMEM_START;
    for &(_, s, e) in ranges {
        if s <= end && e > end {
            end = e;
        }
    }
    end.min(MMIO_HOLE_START)
}

/// Loads the kernel, initrd, command line, boot_params and ACPI tables into
/// `mem`, and points vCPU 0 at the kernel's 64-bit entry.
pub fn boot(
    spec: &LinuxSpec,
    topo: &Topology,
    mem: &GuestMemory,
    vcpus: &[VcpuFd],
) -> Result<(), LinuxError> {
    let format = inspect(&spec.kernel)?;
    let view = mem.vm_memory_view()?;
    let ranges = node_ranges(mem);
    let ram_end = low_ram_end(&ranges);

    let mut kernel = File::open(&spec.kernel).map_err(read_err("kernel", &spec.kernel))?;
    let kernel_size = kernel
        .seek(SeekFrom::End(0))
        .map_err(read_err("kernel", &spec.kernel))?;
    kernel.rewind().map_err(read_err("kernel", &spec.kernel))?;
    if HIMEM_START + kernel_size > ram_end {
        return Err(LinuxError::DoesNotFit {
            what: format!("kernel {}", spec.kernel.display()),
            size: kernel_size,
            room: format!(
                "{:#x}..{ram_end:#x} holds {} bytes",
                HIMEM_START,
                ram_end - HIMEM_START
            ),
        });
    }
    let load_err = |source| LinuxError::Load {
        path: spec.kernel.clone(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let loaded = match format {
        KernelFormat::BzImage => {
            BzImage::load(&*view, None, &mut kernel, himem).map_err(load_err)?
        }
        KernelFormat::Elf => Elf::load(&*view, None, &mut kernel, himem).map_err(load_err)?,
    };
    let entry = match format {
        // The 64-bit entry point sits 0x200 into the protected-mode kernel.
        KernelFormat::BzImage => loaded.kernel_load.0 + 0x200,
        KernelFormat::Elf => loaded.kernel_load.0,
    };
    // A bzImage decompresses in place and needs `init_size` bytes from its
    // load address: the initrd must stay clear of all of them.
    let init_size = loaded.setup_header.map_or(0, |h| h.init_size as u64);
    let kernel_end = loaded.kernel_end.max(loaded.kernel_load.0 + init_size);

    let mut params = boot_params::default();
    if let Some(h) = loaded.setup_header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = BOOT_FLAG;
        params.hdr.header = HDRS_MAGIC;
        params.hdr.kernel_alignment = 0x100_0000;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;

    // The command line.
    let max_cmdline = match params.hdr.cmdline_size {
        0 => CMDLINE_MAX,
        n => (n as usize + 1).min(CMDLINE_MAX),
    };
    let mut cmdline = Cmdline::new(max_cmdline).map_err(|e| LinuxError::Cmdline(e.to_string()))?;
    cmdline.insert_str(&spec.cmdline).map_err(|e| {
        LinuxError::Cmdline(format!(
            "{e} (the kernel takes at most {} bytes)",
            max_cmdline - 1
        ))
    })?;
    load_cmdline(&*view, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| LinuxError::Cmdline(e.to_string()))?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = spec.cmdline.len() as u32;

    // The initrd: as high as the kernel allows, page aligned.
    if let Some(path) = &spec.initrd {
        let mut f = File::open(path).map_err(read_err("initrd", path))?;
        let size = f.metadata().map_err(read_err("initrd", path))?.len();
        let max = match params.hdr.initrd_addr_max {
            0 => 0x37ff_ffff,
            m => m as u64,
        };
        let top = ram_end.min(max + 1);
        let addr = top.checked_sub(size).map(|a| a & !0xfff);
        let addr = match addr {
            Some(a) if a >= kernel_end => a,
            _ => {
                return Err(LinuxError::DoesNotFit {
                    what: format!("initrd {}", path.display()),
                    size,
                    room: format!(
                        "it must lie between the kernel's end at {kernel_end:#x} and {top:#x}"
                    ),
                })
            }
        };
        view.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
            .map_err(|e| LinuxError::Setup(format!("reading initrd {}: {e}", path.display())))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    // Memory map and ACPI.
    let map = e820(&ranges);
    if map.len() > params.e820_table.len() {
        return Err(LinuxError::Setup(format!(
            "the memory map has {} ranges; boot_params holds {}",
            map.len(),
            params.e820_table.len()
        )));
    }
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    let tables = acpi::build(&AcpiConfig {
        cpus: topo
            .vcpu_nodes
            .iter()
            .enumerate()
            .zip(&topo.apic_ids)
            .map(|((_, &node), &apic_id)| AcpiCpu {
                apic_id,
                guest_node: node,
            })
            .collect(),
        memory: ranges
            .iter()
            .map(|&(node, start, end)| AcpiMemory {
                guest_node: node,
                start,
                len: end - start,
            })
            .collect(),
        distances: topo.distances.clone(),
        virtio: topo.virtio.clone(),
    })
    .map_err(|e| LinuxError::Setup(format!("ACPI tables: {e}")))?;
    for (gpa, blob) in &tables.blobs {
        view.write_slice(blob, GuestAddress(*gpa))
            .map_err(|e| LinuxError::Setup(format!("writing ACPI table at {gpa:#x}: {e}")))?;
    }
    params.acpi_rsdp_addr = tables.rsdp_addr;
    view.write_slice(&RESET_VECTOR_STUB, GuestAddress(RESET_VECTOR_ADDR))
        .map_err(|e| LinuxError::Setup(format!("writing the reset vector: {e}")))?;
    view.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| LinuxError::Setup(format!("writing boot_params: {e}")))?;

    regs::write_tables(mem).map_err(LinuxError::Regs)?;
    for (id, fd) in vcpus.iter().enumerate() {
        regs::setup_msrs(fd, id as u32).map_err(LinuxError::Regs)?;
        regs::setup_lint(fd, id as u32).map_err(LinuxError::Regs)?;
    }
    let bsp = vcpus
        .first()
        .ok_or_else(|| LinuxError::Setup("no vCPU to boot".into()))?;
    regs::setup_boot_cpu(bsp, entry, ZERO_PAGE_ADDR).map_err(LinuxError::Regs)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_the_bios_area_and_apic_area_and_keeps_node_ranges() {
        let ranges = [(0, 0, 64 << 20), (1, 64 << 20, 128 << 20)];
        let m = e820(&ranges);
        let v: Vec<(u64, u64, u32)> = m.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            v,
            vec![
                (0, LOW_RAM_END, E820_RAM),
                (LOW_RAM_END, HIMEM_START - LOW_RAM_END, E820_RESERVED),
                (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM),
                (64 << 20, 64 << 20, E820_RAM),
                (
                    APIC_AREA_START,
                    APIC_AREA_END - APIC_AREA_START,
                    E820_RESERVED
                ),
            ]
        );
        assert_eq!(low_ram_end(&ranges), 128 << 20);
    }

    #[test]
    fn memory_above_the_hole_comes_after_the_apic_area() {
        let ranges = [(0, 0, MMIO_HOLE_START), (0, 1 << 32, (1 << 32) + (1 << 30))];
        let m = e820(&ranges);
        let (apic, high) = (m[3].addr, m[4].addr);
        assert_eq!(apic, APIC_AREA_START);
        assert_eq!(high, 1 << 32);
        assert_eq!(low_ram_end(&ranges), MMIO_HOLE_START);
    }

    #[test]
    fn files_that_are_not_kernels_are_refused_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notes.txt");
        std::fs::write(&p, b"hello").unwrap();
        let e = inspect(&p).unwrap_err().to_string();
        assert!(
            e.contains("notes.txt") && e.contains("not a Linux kernel"),
            "{e}"
        );
        let mut old = vec![0u8; 0x400];
        old[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        old[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
        let p = dir.path().join("old");
        std::fs::write(&p, &old).unwrap();
        let e = inspect(&p).unwrap_err().to_string();
        assert!(e.contains("protocol 2.04"), "{e}");
        let e = inspect(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read kernel"), "{e}");
    }
}
