//! The ACPI tables a Linux guest reads to learn the machine: RSDP, XSDT,
//! FADT, DSDT, MADT, SRAT and SLIT, laid out one after another in
//! guest-physical memory from [`RSDP_ADDR`] to at most [`ACPI_END`].
//!
//! The machine they describe is HW-reduced ACPI (no PM1 blocks, no SCI, no
//! FACS): a one-byte sleep control register whose S5 write is the guest's
//! `poweroff`, a reset register for its `reboot`, an in-kernel local APIC
//! per vCPU plus one IOAPIC, a COM1 and an i8042 in the DSDT, and the guest
//! NUMA nodes in SRAT/SLIT.
//!
//! This module only produces bytes and the addresses they belong at. Writing
//! them into guest memory, reserving their range in the e820 map, pointing
//! `boot_params.acpi_rsdp_addr` at the RSDP and serving the power-management
//! ports are the loader's and the devices' business.
//!
//! The typed builders of `acpi_tables` cover the RSDP, XSDT, FADT, the DSDT's
//! AML and SRAT memory entries. Its MADT cannot set the PCAT_COMPAT flag nor
//! hold interrupt source overrides, NMI or x2APIC entries, its SRAT has no
//! processor (x2)APIC affinity entries and its SLIT only stores symmetric
//! matrices, so those three tables are built on its raw `Sdt` (which keeps
//! the length and checksum right) from the ACPI 6.5 layouts.

use acpi_tables::aml::{self, EISAName, Interrupt, Name, Package, Path, ResourceTemplate, IO};
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::srat::MemoryAffinity;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};

/// Guest-physical address of the RSDP (Linux also finds it by scanning
/// 0xE0000..0x100000, on 16-byte boundaries).
pub const RSDP_ADDR: u64 = 0xE_0000;
/// End of the area the tables may use (exclusive); the VMM marks
/// [`RSDP_ADDR`]..`ACPI_END` reserved in e820.
pub const ACPI_END: u64 = 0x10_0000;

// The power-management registers sit in the VGA I/O range 0x3c0..0x3df,
// as Cloud Hypervisor's and QEMU microvm's do: the FADT tells the guest
// there is no VGA (and vmhop has none), so no driver of the guest's touches
// these ports for anything else (Linux's vgacon would write its palette to
// 0x3c0, but only if boot_params.screen_info announced a VGA text mode: it
// must stay zero). One byte each, at distinct ports, so that each register
// is its own bus entry.

/// I/O port of the HW-reduced ACPI sleep control register (one byte): the
/// guest writes `SLP_TYP << 2 | SLP_EN (1 << 5)` to enter a sleep state.
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// I/O port of the sleep status register (one byte). Linux writes WAK_STS
/// (0x80) to clear it before sleeping and polls it only after a sleep that
/// returns, which S5 never does: reading 0 is enough.
pub const SLEEP_STATUS_PORT: u16 = 0x3c1;
/// The reset register (FADT RESET_REG, system I/O, one byte).
pub const RESET_PORT: u16 = 0x3c2;
/// The value the guest writes to [`RESET_PORT`] to reboot.
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP value of S5 (soft off) that the DSDT's `\_S5` package announces.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Guest-physical address of the IOAPIC (KVM's in-kernel IOAPIC default).
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;
/// Guest-physical address of every vCPU's local APIC.
pub const LAPIC_ADDR: u64 = 0xFEE0_0000;

/// One vCPU as the MADT and SRAT describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiCpu {
    /// Its initial (x2)APIC id, as CPUID reports it.
    pub apic_id: u32,
    /// The guest NUMA node (proximity domain) it belongs to.
    pub guest_node: u32,
}

/// One guest RAM range and the guest node it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiMemory {
    /// The guest NUMA node (proximity domain).
    pub guest_node: u32,
    /// First guest-physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What the tables describe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcpiConfig {
    /// The vCPUs in vCPU id order; cpu 0 is the BSP. Each one's index is its
    /// ACPI processor UID.
    pub cpus: Vec<AcpiCpu>,
    /// RAM ranges, several per node possible (a node split by the 3-4 GiB
    /// MMIO hole). Linux drops its NUMA setup if these leave more than 1 MiB
    /// of e820 RAM uncovered, so they should cover all of it.
    pub memory: Vec<AcpiMemory>,
    /// The SLIT matrix indexed by guest node (n x n), 10 on the diagonal and
    /// more elsewhere. Empty: no SRAT nor SLIT, and the nodes above are
    /// ignored.
    pub distances: Vec<Vec<u8>>,
    /// The virtio-mmio devices, described in the DSDT.
    pub virtio: Vec<super::layout::VirtioSlot>,
}

/// The tables, each with the guest-physical address it must be written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// Where the RSDP is (what `boot_params.acpi_rsdp_addr` must say).
    pub rsdp_addr: u64,
    /// (guest-physical address, bytes) per table, in address order, all in
    /// [`RSDP_ADDR`]..[`ACPI_END`].
    pub blobs: Vec<(u64, Vec<u8>)>,
}

/// Why the tables could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcpiError {
    /// The tables pass [`ACPI_END`].
    #[error(
        "the ACPI tables need {needed:#x} bytes from {RSDP_ADDR:#x} but only {available:#x} fit below {ACPI_END:#x}"
    )]
    TooLarge {
        /// Bytes from RSDP_ADDR to the end of the last table.
        needed: u64,
        /// ACPI_END - RSDP_ADDR.
        available: u64,
    },
    /// The MADT needs at least the boot processor.
    #[error("no vCPUs: the MADT needs at least the boot processor")]
    NoCpus,
    /// Two vCPUs claim the same APIC id.
    #[error("vCPU {cpu} and vCPU {other} both have APIC id {apic_id}")]
    DuplicateApicId {
        /// The later vCPU.
        cpu: usize,
        /// The earlier one.
        other: usize,
        /// The id they share.
        apic_id: u32,
    },
    /// An xAPIC id (below 255) on a vCPU whose UID needs more than the
    /// 8-bit UID of a Local APIC entry; Linux ignores x2APIC entries with
    /// such ids next to Local APIC entries, so there is no way to say it.
    #[error(
        "vCPU {cpu} has xAPIC id {apic_id} but its processor UID {cpu} does not fit a Local APIC entry (at most {MAX_LAPIC_UID})"
    )]
    ProcessorUidTooLarge {
        /// The vCPU (and UID).
        cpu: usize,
        /// Its APIC id.
        apic_id: u32,
    },
    /// A row of the distance matrix is not n long.
    #[error("distance matrix row {row} has {len} entries, expected {nodes} (one per guest node)")]
    DistanceRowLength {
        /// The row (node).
        row: usize,
        /// Its length.
        len: usize,
        /// The number of nodes (rows).
        nodes: usize,
    },
    /// A node's distance to itself is not 10.
    #[error("distance matrix: node {node} to itself is {distance}, must be {LOCAL_DISTANCE}")]
    LocalDistance {
        /// The node.
        node: usize,
        /// The distance found.
        distance: u8,
    },
    /// A remote distance is not more than the local one (Linux rejects the
    /// whole SLIT then).
    #[error(
        "distance matrix: node {from} to node {to} is {distance}, must be more than {LOCAL_DISTANCE}"
    )]
    RemoteDistance {
        /// Row.
        from: usize,
        /// Column.
        to: usize,
        /// The distance found.
        distance: u8,
    },
    /// A vCPU names a node the distance matrix does not have.
    #[error("vCPU {cpu} is on guest node {node} but there are only {nodes} guest nodes")]
    CpuNodeUnknown {
        /// The vCPU.
        cpu: usize,
        /// Its node.
        node: u32,
        /// The number of nodes.
        nodes: usize,
    },
    /// A memory range names a node the distance matrix does not have.
    #[error(
        "memory range {index} ({start:#x}, {len:#x} bytes) is on guest node {node} but there are only {nodes} guest nodes"
    )]
    MemoryNodeUnknown {
        /// Its index in `AcpiConfig::memory`.
        index: usize,
        /// First address.
        start: u64,
        /// Length.
        len: u64,
        /// Its node.
        node: u32,
        /// The number of nodes.
        nodes: usize,
    },
    /// A memory range is empty or wraps past 2^64.
    #[error("memory range {index} ({start:#x}, {len:#x} bytes) is empty or wraps")]
    BadMemoryRange {
        /// Its index in `AcpiConfig::memory`.
        index: usize,
        /// First address.
        start: u64,
        /// Length.
        len: u64,
    },
}

/// Builds the tables for `cfg` and lays them out from [`RSDP_ADDR`]: RSDP,
/// DSDT, FADT, MADT, SRAT and SLIT (when there are nodes), XSDT, each
/// [`TABLE_ALIGN`]-aligned.
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    validate(cfg)?;

    // Each table is built before it is placed, and only after what it
    // points at is placed: the RSDP, whose size is fixed, is the only one
    // reserved ahead of its contents.
    let mut layout = Layout::new();
    let rsdp_addr = layout.place(Rsdp::len())?;

    let dsdt = dsdt(&cfg.virtio);
    let dsdt_addr = layout.place(dsdt.len())?;
    let fadt = fadt(dsdt_addr);
    let fadt_addr = layout.place(fadt.len())?;
    let madt = madt(&cfg.cpus)?;
    let madt_addr = layout.place(madt.len())?;
    let mut listed = vec![fadt_addr, madt_addr];
    let mut blobs = vec![(dsdt_addr, dsdt), (fadt_addr, fadt), (madt_addr, madt)];

    if !cfg.distances.is_empty() {
        let srat = srat(cfg);
        let srat_addr = layout.place(srat.len())?;
        let slit = slit(&cfg.distances);
        let slit_addr = layout.place(slit.len())?;
        listed.extend([srat_addr, slit_addr]);
        blobs.extend([(srat_addr, srat), (slit_addr, slit)]);
    }

    let xsdt = xsdt(&listed);
    let xsdt_addr = layout.place(xsdt.len())?;
    blobs.push((xsdt_addr, xsdt));
    blobs.insert(0, (rsdp_addr, aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr))));

    Ok(AcpiTables { rsdp_addr, blobs })
}

/// Alignment of every table: the RSDP must sit on a 16-byte boundary for
/// Linux's scan to find it; the others keep the same for tidiness.
pub const TABLE_ALIGN: u64 = 16;

/// Hands out consecutive aligned addresses from RSDP_ADDR up to ACPI_END.
struct Layout {
    next: u64,
}

impl Layout {
    fn new() -> Self {
        Layout { next: RSDP_ADDR }
    }

    fn place(&mut self, len: usize) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        let end = addr + len as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooLarge {
                needed: end - RSDP_ADDR,
                available: ACPI_END - RSDP_ADDR,
            });
        }
        self.next = end;
        Ok(addr)
    }
}

// Identification the guest shows in its boot log ("ACPI: FACP 0x... VMHOP").
// One table id for all tables: the spec wants the FADT's to match the XSDT's.
const OEM_ID: [u8; 6] = *b"VMHOP ";
const OEM_TABLE_ID: [u8; 8] = *b"VMHOPVM ";
const OEM_REVISION: u32 = 1;
/// FADT "hypervisor vendor identity": who made this virtual machine.
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"VMHOPKVM";

/// Size of the standard table header every table but the RSDP starts with.
const HEADER_LEN: u32 = 36;

/// The distance of a node to itself in the SLIT, by definition.
pub const LOCAL_DISTANCE: u8 = 10;

/// A table of our OEM's: the standard header, `body` after it, length and
/// checksum filled in by `acpi_tables`' raw `Sdt`.
fn sdt(signature: [u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut table = Sdt::new(
        signature,
        HEADER_LEN,
        revision,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    table.append_slice(body);
    table.as_slice().to_vec()
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Checks everything the tables cannot express, once, before any is built.
fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.cpus.is_empty() {
        return Err(AcpiError::NoCpus);
    }
    for (cpu, c) in cfg.cpus.iter().enumerate() {
        if let Some(other) = cfg.cpus[..cpu].iter().position(|o| o.apic_id == c.apic_id) {
            return Err(AcpiError::DuplicateApicId {
                cpu,
                other,
                apic_id: c.apic_id,
            });
        }
        if c.apic_id <= MAX_XAPIC_ID && cpu > usize::from(MAX_LAPIC_UID) {
            return Err(AcpiError::ProcessorUidTooLarge {
                cpu,
                apic_id: c.apic_id,
            });
        }
    }
    for (index, m) in cfg.memory.iter().enumerate() {
        if m.len == 0 || m.start.checked_add(m.len).is_none() {
            return Err(AcpiError::BadMemoryRange {
                index,
                start: m.start,
                len: m.len,
            });
        }
    }

    let nodes = cfg.distances.len();
    if nodes == 0 {
        return Ok(());
    }
    for (from, row) in cfg.distances.iter().enumerate() {
        if row.len() != nodes {
            return Err(AcpiError::DistanceRowLength {
                row: from,
                len: row.len(),
                nodes,
            });
        }
        for (to, &distance) in row.iter().enumerate() {
            if from == to && distance != LOCAL_DISTANCE {
                return Err(AcpiError::LocalDistance {
                    node: from,
                    distance,
                });
            }
            if from != to && distance <= LOCAL_DISTANCE {
                return Err(AcpiError::RemoteDistance { from, to, distance });
            }
        }
    }
    let known = |node: u32| (node as usize) < nodes;
    if let Some((cpu, c)) = cfg
        .cpus
        .iter()
        .enumerate()
        .find(|(_, c)| !known(c.guest_node))
    {
        return Err(AcpiError::CpuNodeUnknown {
            cpu,
            node: c.guest_node,
            nodes,
        });
    }
    if let Some((index, m)) = cfg
        .memory
        .iter()
        .enumerate()
        .find(|(_, m)| !known(m.guest_node))
    {
        return Err(AcpiError::MemoryNodeUnknown {
            index,
            start: m.start,
            len: m.len,
            node: m.guest_node,
            nodes,
        });
    }
    Ok(())
}

// ---- DSDT ----------------------------------------------------------------

/// DSDT revision 2 and up makes AML integers 64 bits wide.
const DSDT_REVISION: u8 = 2;

/// COM1, as every PC has it: Linux's 8250 PNP driver claims it as ttyS0.
const COM1_HID: &str = "PNP0501";
const COM1_PORT: u16 = 0x3f8;
const COM1_PORT_COUNT: u8 = 8;
const COM1_IRQ: u32 = 4;
/// The PS/2 keyboard controller: Linux's i8042 driver finds its ports
/// through PNP instead of probing blindly.
const I8042_HID: &str = "PNP0303";
const I8042_DATA_PORT: u16 = 0x60;
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_IRQ: u32 = 1;

/// The `_HID` of a virtio-mmio device: what Linux's virtio_mmio driver
/// matches on ACPI machines (Debian's kernel has no command-line devices).
const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// The DSDT: `\_S5` (what makes Linux's `acpi_power_off` usable), the two
/// legacy devices, so the guest's PNP layer finds them, and every
/// virtio-mmio device.
fn dsdt(virtio: &[super::layout::VirtioSlot]) -> Vec<u8> {
    // SLP_TYPa, SLP_TYPb and two reserved entries; a HW-reduced machine only
    // uses SLP_TYPa (written to the sleep control register).
    let s5 = Name::new(
        Path::new("\\_S5_"),
        &Package::new(vec![&S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );

    // An edge-triggered, active-high, exclusive ISA interrupt.
    let isa_irq = |irq| Interrupt::new(true, true, false, false, irq);
    let com1 = isa_device(
        "COM1",
        COM1_HID,
        vec![
            &IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORT_COUNT),
            &isa_irq(COM1_IRQ),
        ],
    );
    // Data port first, command port second: the order Linux's i8042 PNP
    // code takes them in.
    let kbd = isa_device(
        "PS2K",
        I8042_HID,
        vec![
            &IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1),
            &IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1),
            &isa_irq(I8042_IRQ),
        ],
    );
    // Each virtio-mmio device: its window and an edge-triggered line (the
    // device pulses an irqfd; a level line would need a resample eventfd).
    let virtio: Vec<RawAml> = virtio
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let hid = Name::new(Path::new("_HID"), &VIRTIO_MMIO_HID);
            let uid = Name::new(Path::new("_UID"), &(i as u32));
            let window = aml::Memory32Fixed::new(true, s.base as u32, s.len as u32);
            let irq = Interrupt::new(true, true, false, false, s.gsi);
            let crs = Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![&window, &irq]),
            );
            RawAml(aml_bytes(&aml::Device::new(
                Path::new(&format!("VR{i:02X}")),
                vec![&hid, &uid, &crs],
            )))
        })
        .collect();
    let mut devices: Vec<&dyn Aml> = vec![&com1, &kbd];
    devices.extend(virtio.iter().map(|d| d as &dyn Aml));
    let sb = aml::Scope::new(Path::new("\\_SB_"), devices);

    let mut body = aml_bytes(&s5);
    sb.to_aml_bytes(&mut body);
    sdt(*b"DSDT", DSDT_REVISION, &body)
}

/// A device with a PNP id and fixed resources, serialised.
fn isa_device(name: &str, hid: &str, resources: Vec<&dyn Aml>) -> RawAml {
    let hid = Name::new(Path::new("_HID"), &EISAName::new(hid));
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(resources));
    RawAml(aml_bytes(&aml::Device::new(
        Path::new(name),
        vec![&hid, &crs],
    )))
}

/// AML already serialised, to nest in a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

// ---- FADT ----------------------------------------------------------------

// IA-PC boot architecture flags (FADT IAPC_BOOT_ARCH, ACPI 6.5 table 5.11).
/// There is an i8042: without this flag Linux's i8042 driver assumes the
/// firmware says there is none and gives up when PNP finds nothing.
const IAPC_8042: u16 = 1 << 1;
/// No VGA: Linux must not probe VGA ports (our power registers live there).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// No MSI: there is no PCI bus, so nothing to enable MSI on.
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
// The CMOS RTC flag (bit 5) stays clear: vmhop serves a CMOS clock at
// 0x70/0x71 that Linux reads the wall-clock time from.
const IAPC_BOOT_ARCH: u16 = IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED;

/// A one-byte system-I/O register, as the FADT's generic addresses say it.
fn io_byte_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The FADT: revision 6.5, the `acpi_tables` default. ACPICA takes the
/// HW_REDUCED flag from any revision, but zeroes the boot flags of an FADT
/// no longer than revision 2's and has no sleep registers in one shorter
/// than revision 5's; the 6.x length (276 bytes) is that of Linux's own FADT
/// struct, so every field we set is read and nothing is truncated.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        // X_DSDT only: the 64-bit pointer supersedes the 32-bit one.
        .dsdt_64(dsdt_addr)
        // No PM1 blocks, GPEs, SCI or FACS: power is the sleep registers.
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep button, as Firecracker says.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = io_byte_register(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_byte_register(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte_register(SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    let fadt: FADT = fadt.finalize();
    aml_bytes(&fadt)
}

// ---- MADT ----------------------------------------------------------------

/// MADT revision 5 (ACPI 6.2+): the revision Linux reads the enabled and
/// online-capable processor flags by.
const MADT_REVISION: u8 = 5;
/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel irqchip
/// has them), which the OS must mask when it uses the IOAPIC.
const MADT_PCAT_COMPAT: u32 = 1;

// Interrupt controller structure types (ACPI 6.5 table 5.21).
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_X2APIC: u8 = 9;
const MADT_LOCAL_X2APIC_NMI: u8 = 0xa;

/// Processor flag: usable now.
const MADT_CPU_ENABLED: u32 = 1;
/// The highest id a Local APIC entry may carry: 0xff is the broadcast id,
/// so anything from there on needs a Local x2APIC entry.
const MAX_XAPIC_ID: u32 = 0xfe;
/// The highest UID a Local APIC entry may carry: 0xff means "all
/// processors" in a Local APIC NMI entry.
pub const MAX_LAPIC_UID: u8 = 0xfe;
/// "All processors" in Local APIC / x2APIC NMI entries.
const ALL_PROCESSORS_UID: u8 = 0xff;
const ALL_PROCESSORS_X2_UID: u32 = u32::MAX;
/// LINT1 carries NMI on PCs; Linux's default, said explicitly as QEMU does.
const NMI_LINT: u8 = 1;
/// MPS INTI flags 0: polarity and trigger conform to the bus (ISA: active
/// high, edge).
const MPS_INTI_CONFORMING: u16 = 0;

/// The one IOAPIC's id: KVM's in-kernel IOAPIC resets its id register to 0
/// and QEMU and Firecracker announce 0 too; IOAPIC and local APIC ids are
/// separate name spaces on anything an x86-64 kernel runs on.
const IOAPIC_ID: u8 = 0;
/// The IOAPIC's first GSI: it serves GSIs 0..24, identity-mapped from ISA
/// IRQs but for the override below.
const IOAPIC_GSI_BASE: u32 = 0;
/// ISA bus number in interrupt source overrides.
const ISA_BUS: u8 = 0;
/// The PIT's ISA IRQ and the IOAPIC pin it is wired to, as on every PC and
/// in KVM's in-kernel irqchip routing.
const PIT_IRQ: u8 = 0;
const PIT_GSI: u32 = 2;

/// `addr` as the 32-bit field the MADT holds it in; evaluated in constants,
/// so an address that does not fit fails the build.
const fn madt_addr32(addr: u64) -> u32 {
    assert!(addr <= u32::MAX as u64, "the MADT holds 32-bit addresses");
    addr as u32
}
const LAPIC_ADDR_32: u32 = madt_addr32(LAPIC_ADDR);
const IOAPIC_ADDR_32: u32 = madt_addr32(IOAPIC_ADDR);

fn madt(cpus: &[AcpiCpu]) -> Result<Vec<u8>, AcpiError> {
    let mut body = LAPIC_ADDR_32.to_le_bytes().to_vec();
    body.extend(MADT_PCAT_COMPAT.to_le_bytes());

    let mut any_x2apic = false;
    for (uid, cpu) in cpus.iter().enumerate() {
        match u8::try_from(cpu.apic_id) {
            Ok(apic_id) if cpu.apic_id <= MAX_XAPIC_ID => {
                // validate() has made sure the UID fits.
                let uid = u8::try_from(uid).map_err(|_| AcpiError::ProcessorUidTooLarge {
                    cpu: uid,
                    apic_id: cpu.apic_id,
                })?;
                let mut e = vec![MADT_LOCAL_APIC, 8, uid, apic_id];
                e.extend(MADT_CPU_ENABLED.to_le_bytes());
                body.extend(e);
            }
            _ => {
                any_x2apic = true;
                let mut e = vec![MADT_LOCAL_X2APIC, 16, 0, 0];
                e.extend(cpu.apic_id.to_le_bytes());
                e.extend(MADT_CPU_ENABLED.to_le_bytes());
                e.extend((uid as u32).to_le_bytes());
                body.extend(e);
            }
        }
    }

    let mut ioapic = vec![MADT_IO_APIC, 12, IOAPIC_ID, 0];
    ioapic.extend(IOAPIC_ADDR_32.to_le_bytes());
    ioapic.extend(IOAPIC_GSI_BASE.to_le_bytes());
    body.extend(ioapic);

    let mut iso = vec![MADT_INTERRUPT_SOURCE_OVERRIDE, 10, ISA_BUS, PIT_IRQ];
    iso.extend(PIT_GSI.to_le_bytes());
    iso.extend(MPS_INTI_CONFORMING.to_le_bytes());
    body.extend(iso);

    let mut nmi = vec![MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS_UID];
    nmi.extend(MPS_INTI_CONFORMING.to_le_bytes());
    nmi.push(NMI_LINT);
    body.extend(nmi);
    if any_x2apic {
        // Linux reads the NMI line of x2APIC processors from this one.
        let mut nmi = vec![MADT_LOCAL_X2APIC_NMI, 12];
        nmi.extend(MPS_INTI_CONFORMING.to_le_bytes());
        nmi.extend(ALL_PROCESSORS_X2_UID.to_le_bytes());
        nmi.extend([NMI_LINT, 0, 0, 0]);
        body.extend(nmi);
    }
    Ok(sdt(*b"APIC", MADT_REVISION, &body))
}

// ---- SRAT and SLIT -------------------------------------------------------

/// SRAT revision 3 (ACPI 5.0+): from revision 2 on Linux reads all 32 bits
/// of a Processor Local APIC Affinity entry's proximity domain.
const SRAT_REVISION: u8 = 3;
/// The reserved word after the header "must be 1 for backward
/// compatibility"; 8 more reserved bytes follow.
const SRAT_RESERVED_ONE: u32 = 1;
const SRAT_PROCESSOR_APIC_AFFINITY: u8 = 0;
const SRAT_PROCESSOR_X2APIC_AFFINITY: u8 = 2;
/// Affinity flag: the entry is in use.
const SRAT_ENABLED: u32 = 1;
/// Clock domain of every vCPU: KVM keeps all their TSCs in step.
const CLOCK_DOMAIN: u32 = 0;
const SLIT_REVISION: u8 = 1;

fn srat(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = SRAT_RESERVED_ONE.to_le_bytes().to_vec();
    body.extend(0u64.to_le_bytes());

    for m in &cfg.memory {
        MemoryAffinity::new(m.guest_node, m.start, m.len)
            .enabled()
            .to_aml_bytes(&mut body);
    }
    // Processor entries match the MADT's kind: Local APIC affinity for
    // xAPIC ids, x2APIC affinity for the rest.
    for cpu in &cfg.cpus {
        let node = cpu.guest_node.to_le_bytes();
        let e = match u8::try_from(cpu.apic_id) {
            Ok(apic_id) if cpu.apic_id <= MAX_XAPIC_ID => {
                // The proximity domain is split: bits 7:0 here ...
                let mut e = vec![SRAT_PROCESSOR_APIC_AFFINITY, 16, node[0], apic_id];
                e.extend(SRAT_ENABLED.to_le_bytes());
                // ... local SAPIC EID (Itanium only), bits 31:8 here.
                e.extend([0, node[1], node[2], node[3]]);
                e.extend(CLOCK_DOMAIN.to_le_bytes());
                e
            }
            _ => {
                let mut e = vec![SRAT_PROCESSOR_X2APIC_AFFINITY, 24, 0, 0];
                e.extend(node);
                e.extend(cpu.apic_id.to_le_bytes());
                e.extend(SRAT_ENABLED.to_le_bytes());
                e.extend(CLOCK_DOMAIN.to_le_bytes());
                e.extend([0; 4]);
                e
            }
        };
        body.extend(e);
    }
    sdt(*b"SRAT", SRAT_REVISION, &body)
}

/// The SLIT: the node count, then the matrix row by row (entry i*n + j is
/// the distance from node i to node j; asymmetric matrices stay as given).
fn slit(distances: &[Vec<u8>]) -> Vec<u8> {
    let mut body = (distances.len() as u64).to_le_bytes().to_vec();
    body.extend(distances.iter().flatten());
    sdt(*b"SLIT", SLIT_REVISION, &body)
}

// ---- XSDT ----------------------------------------------------------------

/// The XSDT lists every table but the DSDT, which the FADT points at.
fn xsdt(tables: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for &addr in tables {
        xsdt.add_entry(addr);
    }
    aml_bytes(&xsdt)
}

#[cfg(test)]
mod tests {
    //! Every check parses the produced bytes back at the offsets of the ACPI
    //! 6.5 specification, independently of the code that wrote them.

    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    /// The blob written at exactly `addr`.
    fn blob_at(t: &AcpiTables, addr: u64) -> &[u8] {
        let (_, b) = t
            .blobs
            .iter()
            .find(|(a, _)| *a == addr)
            .unwrap_or_else(|| panic!("no table at {addr:#x}"));
        b
    }

    /// The table at `addr`, checked to be exactly as long as its header says.
    fn table_at(t: &AcpiTables, addr: u64) -> &[u8] {
        let b = blob_at(t, addr);
        assert_eq!(
            u32_at(b, 4) as usize,
            b.len(),
            "length field of {:?}",
            sig(b)
        );
        b
    }

    fn sig(b: &[u8]) -> String {
        String::from_utf8_lossy(&b[..4]).into_owned()
    }

    fn rsdp(t: &AcpiTables) -> &[u8] {
        let r = blob_at(t, t.rsdp_addr);
        assert_eq!(&r[..8], b"RSD PTR ");
        r
    }

    fn xsdt_entries(t: &AcpiTables) -> Vec<u64> {
        let xsdt = table_at(t, u64_at(rsdp(t), 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        (HEADER_LEN as usize..xsdt.len())
            .step_by(8)
            .map(|off| u64_at(xsdt, off))
            .collect()
    }

    /// The table the XSDT lists under `signature`, if any.
    fn find<'a>(t: &'a AcpiTables, signature: &[u8; 4]) -> Option<&'a [u8]> {
        xsdt_entries(t)
            .into_iter()
            .map(|a| table_at(t, a))
            .find(|b| &b[..4] == signature)
    }

    /// (type, bytes) of the structures after a table's fixed part.
    fn structures(table: &[u8], first: usize) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut off = first;
        while off < table.len() {
            let len = table[off + 1] as usize;
            assert!(
                len >= 2 && off + len <= table.len(),
                "bad structure at {off}"
            );
            out.push((table[off], &table[off..off + len]));
            off += len;
        }
        out
    }

    fn one_node_one_cpu() -> AcpiConfig {
        AcpiConfig {
            cpus: vec![AcpiCpu {
                apic_id: 0,
                guest_node: 0,
            }],
            memory: vec![AcpiMemory {
                guest_node: 0,
                start: 0,
                len: 512 << 20,
            }],
            distances: vec![vec![10]],
            virtio: vec![],
        }
    }

    /// Node 0 split by the MMIO hole, node 1 above 4 GiB.
    fn two_nodes_four_cpus() -> AcpiConfig {
        let cpu = |apic_id, guest_node| AcpiCpu {
            apic_id,
            guest_node,
        };
        let mem = |guest_node, start, len| AcpiMemory {
            guest_node,
            start,
            len,
        };
        AcpiConfig {
            cpus: vec![cpu(0, 0), cpu(1, 1), cpu(2, 0), cpu(3, 1)],
            memory: vec![
                mem(0, 0, 3 << 30),
                mem(0, 4 << 30, 1 << 30),
                mem(1, 5 << 30, 4 << 30),
            ],
            distances: vec![vec![10, 21], vec![21, 10]],
            virtio: vec![],
        }
    }

    #[test]
    fn every_table_and_both_rsdp_checksums_sum_to_zero() {
        for cfg in [one_node_one_cpu(), two_nodes_four_cpus()] {
            let t = build(&cfg).unwrap();
            let r = rsdp(&t);
            assert_eq!(r.len(), 36);
            assert_eq!(r[15], 2, "RSDP revision");
            assert_eq!(u32_at(r, 20), 36, "RSDP length");
            assert_eq!(sum(&r[..20]), 0, "ACPI 1.0 checksum");
            assert_eq!(sum(r), 0, "extended checksum");
            for (addr, b) in &t.blobs {
                if *addr != t.rsdp_addr {
                    assert_eq!(sum(table_at(&t, *addr)), 0, "checksum of {}", sig(b));
                }
            }
        }
    }

    #[test]
    fn tables_are_laid_out_aligned_and_disjoint_from_the_rsdp_up() {
        let t = build(&two_nodes_four_cpus()).unwrap();
        assert_eq!(t.rsdp_addr, RSDP_ADDR);
        assert_eq!(t.blobs[0].0, RSDP_ADDR, "RSDP first");
        let mut end = RSDP_ADDR;
        for (addr, b) in &t.blobs {
            assert_eq!(addr % TABLE_ALIGN, 0);
            assert!(*addr >= end, "{} overlaps the table before it", sig(b));
            end = addr + b.len() as u64;
        }
        assert!(end <= ACPI_END);
        // RSDP, XSDT, FADT, DSDT, MADT, SRAT, SLIT.
        assert_eq!(t.blobs.len(), 7);
    }

    #[test]
    fn xsdt_lists_fadt_madt_srat_slit_and_not_the_dsdt() {
        let t = build(&two_nodes_four_cpus()).unwrap();
        let sigs: Vec<String> = xsdt_entries(&t)
            .into_iter()
            .map(|a| sig(table_at(&t, a)))
            .collect();
        assert_eq!(sigs, ["FACP", "APIC", "SRAT", "SLIT"]);
    }

    #[test]
    fn without_nodes_there_is_no_srat_or_slit() {
        let cfg = AcpiConfig {
            distances: vec![],
            virtio: vec![],
            ..two_nodes_four_cpus()
        };
        let t = build(&cfg).unwrap();
        let sigs: Vec<String> = xsdt_entries(&t)
            .into_iter()
            .map(|a| sig(table_at(&t, a)))
            .collect();
        assert_eq!(sigs, ["FACP", "APIC"]);
    }

    #[test]
    fn fadt_is_hw_reduced_with_sleep_and_reset_registers() {
        let t = build(&one_node_one_cpu()).unwrap();
        let f = find(&t, b"FACP").unwrap();
        assert_eq!(f.len(), 276, "FADT 6.x length");
        assert_eq!(f[8], 6, "major revision");
        assert_eq!(f[131], 5, "minor revision");
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let iapc = u16_at(f, 109);
        assert_ne!(iapc & (1 << 1), 0, "8042 present");
        assert_ne!(iapc & (1 << 2), 0, "VGA not present");
        assert_ne!(iapc & (1 << 3), 0, "MSI not supported");
        assert_eq!(iapc & (1 << 5), 0, "CMOS RTC present");

        // Generic address: space 1 (system I/O), 8 bits, offset 0, byte access.
        let io_byte = |off: usize, port: u16| {
            assert_eq!(&f[off..off + 4], &[1, 8, 0, 1], "GAS at {off}");
            assert_eq!(u64_at(f, off + 4), u64::from(port), "port at {off}");
        };
        io_byte(116, RESET_PORT);
        assert_eq!(f[128], RESET_VALUE);
        io_byte(244, SLEEP_CONTROL_PORT);
        io_byte(256, SLEEP_STATUS_PORT);
        assert_eq!(&f[268..276], b"VMHOPKVM");

        assert_eq!(u32_at(f, 40), 0, "32-bit DSDT pointer unused");
        let dsdt = table_at(&t, u64_at(f, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    #[test]
    fn dsdt_announces_s5_com1_and_the_keyboard_controller() {
        let t = build(&one_node_one_cpu()).unwrap();
        let f = find(&t, b"FACP").unwrap();
        let aml = &table_at(&t, u64_at(f, 140))[36..];
        // NameOp \_S5_ PackageOp len=7 count=4 BytePrefix 5 Zero Zero Zero.
        let s5 = [
            0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 5, 0, 0, 0,
        ];
        assert!(contains(aml, &s5), "\\_S5_ package");
        // _HID as compressed EISA ids: "PNP" = 0x41d0, then the product.
        assert!(contains(aml, b"COM1"));
        assert!(contains(
            aml,
            &[b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01]
        ));
        assert!(contains(
            aml,
            &[b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x03, 0x03]
        ));
        // IO descriptors: decode16, min, max, alignment, length.
        assert!(contains(aml, &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]));
        assert!(contains(aml, &[0x47, 1, 0x60, 0, 0x60, 0, 1, 1]));
        assert!(contains(aml, &[0x47, 1, 0x64, 0, 0x64, 0, 1, 1]));
        // Extended IRQ: consumer, edge, active high, exclusive; one IRQ.
        assert!(contains(aml, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]));
        assert!(contains(aml, &[0x89, 6, 0, 0x03, 1, 1, 0, 0, 0]));
    }

    #[test]
    fn dsdt_describes_each_virtio_mmio_device_with_its_window_and_edge_line() {
        let mut cfg = one_node_one_cpu();
        cfg.virtio = crate::arch::x86_64::layout::virtio_slots(2).unwrap();
        let t = build(&cfg).unwrap();
        let f = find(&t, b"FACP").unwrap();
        let aml = &table_at(&t, u64_at(f, 140))[36..];
        // _HID "LNRO0005" as a string (StringPrefix, bytes, NUL): the
        // compressed EISA form cannot encode it.
        let hid = [b"_HID\x0d".as_slice(), b"LNRO0005", &[0]].concat();
        assert_eq!(count(aml, &hid), 2, "one LNRO0005 device per disk");
        assert!(contains(aml, b"VR00") && contains(aml, b"VR01"));
        // Memory32Fixed, read-write, at 0xd0000000 and 0xd0001000, 4 KiB.
        for base in [0xd000_0000u32, 0xd000_1000] {
            let mut m = vec![0x86, 9, 0, 1];
            m.extend(base.to_le_bytes());
            m.extend(0x1000u32.to_le_bytes());
            assert!(contains(aml, &m), "window at {base:#x}");
        }
        // Extended IRQ, edge-triggered, GSI 16 and 17.
        assert!(contains(aml, &[0x89, 6, 0, 0x03, 1, 16, 0, 0, 0]));
        assert!(contains(aml, &[0x89, 6, 0, 0x03, 1, 17, 0, 0, 0]));
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_cpu_an_ioapic_and_the_pit_override() {
        let cfg = two_nodes_four_cpus();
        let t = build(&cfg).unwrap();
        let m = find(&t, b"APIC").unwrap();
        assert_eq!(u32_at(m, 36) as u64, LAPIC_ADDR);
        assert_eq!(u32_at(m, 40), 1, "PCAT_COMPAT");
        let s = structures(m, 44);

        let lapics: Vec<(u8, u8, u32)> = s
            .iter()
            .filter(|(ty, _)| *ty == 0)
            .map(|(_, e)| (e[2], e[3], u32_at(e, 4)))
            .collect();
        let want: Vec<(u8, u8, u32)> = cfg
            .cpus
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u8, c.apic_id as u8, 1))
            .collect();
        assert_eq!(lapics, want, "(uid, apic id, enabled) per cpu");

        let ioapics: Vec<&[u8]> = s
            .iter()
            .filter(|(ty, _)| *ty == 1)
            .map(|(_, e)| *e)
            .collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(u32_at(ioapics[0], 4) as u64, IOAPIC_ADDR);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");

        let isos: Vec<&[u8]> = s
            .iter()
            .filter(|(ty, _)| *ty == 2)
            .map(|(_, e)| *e)
            .collect();
        assert_eq!(isos.len(), 1);
        assert_eq!(
            (isos[0][2], isos[0][3], u32_at(isos[0], 4)),
            (0, 0, 2),
            "ISA IRQ0 -> GSI2"
        );

        let nmis: Vec<&[u8]> = s
            .iter()
            .filter(|(ty, _)| *ty == 4)
            .map(|(_, e)| *e)
            .collect();
        assert_eq!(nmis.len(), 1);
        assert_eq!((nmis[0][2], nmis[0][5]), (0xff, 1), "all processors, LINT1");
        assert!(
            s.iter().all(|(ty, _)| *ty != 9),
            "no x2APIC entries for small ids"
        );
    }

    #[test]
    fn apic_ids_above_254_get_x2apic_entries_in_madt_and_srat() {
        let mut cfg = two_nodes_four_cpus();
        cfg.cpus[3].apic_id = 300;
        let t = build(&cfg).unwrap();
        let m = find(&t, b"APIC").unwrap();
        let s = structures(m, 44);
        let x2: Vec<&[u8]> = s
            .iter()
            .filter(|(ty, _)| *ty == 9)
            .map(|(_, e)| *e)
            .collect();
        assert_eq!(x2.len(), 1);
        assert_eq!(
            (u32_at(x2[0], 4), u32_at(x2[0], 8), u32_at(x2[0], 12)),
            (300, 1, 3)
        );
        assert_eq!(s.iter().filter(|(ty, _)| *ty == 0).count(), 3);
        assert_eq!(
            s.iter().filter(|(ty, _)| *ty == 0xa).count(),
            1,
            "x2APIC NMI"
        );

        let srat = find(&t, b"SRAT").unwrap();
        let x2: Vec<&[u8]> = structures(srat, 48)
            .into_iter()
            .filter(|(ty, _)| *ty == 2)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(x2.len(), 1);
        assert_eq!(
            (u32_at(x2[0], 4), u32_at(x2[0], 8), u32_at(x2[0], 12)),
            (1, 300, 1)
        );
    }

    /// (node, start, len, flags) of SRAT memory entries, and (apic id,
    /// node, flags) of its processor entries.
    #[allow(clippy::type_complexity)]
    fn srat_entries(srat: &[u8]) -> (Vec<(u32, u64, u64, u32)>, Vec<(u32, u32, u32)>) {
        let mut mem = Vec::new();
        let mut cpus = Vec::new();
        for (ty, e) in structures(srat, 48) {
            match ty {
                1 => mem.push((u32_at(e, 2), u64_at(e, 8), u64_at(e, 16), u32_at(e, 28))),
                0 => {
                    let node = u32::from(e[2]) | (u32_at(e, 8) & !0xff);
                    cpus.push((u32::from(e[3]), node, u32_at(e, 4)));
                }
                2 => cpus.push((u32_at(e, 8), u32_at(e, 4), u32_at(e, 12))),
                other => panic!("unexpected SRAT structure type {other}"),
            }
        }
        (mem, cpus)
    }

    #[test]
    fn srat_has_every_memory_range_and_cpu_with_its_node() {
        for cfg in [one_node_one_cpu(), two_nodes_four_cpus()] {
            let t = build(&cfg).unwrap();
            let srat = find(&t, b"SRAT").unwrap();
            assert_eq!(srat[8], 3, "SRAT revision");
            assert_eq!(u32_at(srat, 36), 1, "reserved word is 1");
            let (mem, cpus) = srat_entries(srat);
            let want_mem: Vec<_> = cfg
                .memory
                .iter()
                .map(|m| (m.guest_node, m.start, m.len, 1))
                .collect();
            assert_eq!(mem, want_mem);
            let want_cpus: Vec<_> = cfg
                .cpus
                .iter()
                .map(|c| (c.apic_id, c.guest_node, 1))
                .collect();
            assert_eq!(cpus, want_cpus);
        }
    }

    #[test]
    fn srat_keeps_proximity_domains_above_255() {
        let mut cfg = two_nodes_four_cpus();
        cfg.distances = vec![vec![20; 300]; 300];
        for (i, row) in cfg.distances.iter_mut().enumerate() {
            row[i] = 10;
        }
        cfg.cpus[1].guest_node = 299;
        let t = build(&cfg).unwrap();
        let (_, cpus) = srat_entries(find(&t, b"SRAT").unwrap());
        assert_eq!(cpus[1], (1, 299, 1));
    }

    #[test]
    fn slit_round_trips_the_distance_matrix() {
        let mut cfg = two_nodes_four_cpus();
        // Three nodes, asymmetric on purpose.
        cfg.distances = vec![vec![10, 21, 31], vec![22, 10, 41], vec![32, 42, 10]];
        let t = build(&cfg).unwrap();
        let slit = find(&t, b"SLIT").unwrap();
        let n = u64_at(slit, 36) as usize;
        assert_eq!(n, 3);
        assert_eq!(slit.len(), 44 + n * n);
        let back: Vec<Vec<u8>> = slit[44..].chunks(n).map(<[u8]>::to_vec).collect();
        assert_eq!(back, cfg.distances);
    }

    #[test]
    fn tables_that_pass_acpi_end_are_rejected() {
        let mut cfg = one_node_one_cpu();
        // 40 bytes of SRAT each: 4000 ranges need ~160 KiB of the 128 KiB.
        cfg.memory = (0..4000)
            .map(|i| AcpiMemory {
                guest_node: 0,
                start: i << 21,
                len: 1 << 21,
            })
            .collect();
        let err = build(&cfg).unwrap_err();
        match err {
            AcpiError::TooLarge { needed, available } => {
                assert_eq!(available, ACPI_END - RSDP_ADDR);
                assert!(needed > available);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(err.to_string().contains("0x100000"), "{err}");

        // Just under the limit still fits.
        cfg.memory.truncate(3000);
        build(&cfg).unwrap();
    }

    #[test]
    fn bad_configurations_are_rejected_with_what_is_wrong() {
        let base = two_nodes_four_cpus();
        let check = |cfg: AcpiConfig, want: AcpiError| {
            assert_eq!(build(&cfg).unwrap_err(), want);
        };

        check(
            AcpiConfig {
                cpus: vec![],
                ..base.clone()
            },
            AcpiError::NoCpus,
        );
        let mut c = base.clone();
        c.cpus[2].apic_id = 1;
        check(
            c,
            AcpiError::DuplicateApicId {
                cpu: 2,
                other: 1,
                apic_id: 1,
            },
        );
        let mut c = base.clone();
        c.distances[1].pop();
        check(
            c,
            AcpiError::DistanceRowLength {
                row: 1,
                len: 1,
                nodes: 2,
            },
        );
        let mut c = base.clone();
        c.distances[1][1] = 11;
        check(
            c,
            AcpiError::LocalDistance {
                node: 1,
                distance: 11,
            },
        );
        let mut c = base.clone();
        c.distances[0][1] = 10;
        check(
            c,
            AcpiError::RemoteDistance {
                from: 0,
                to: 1,
                distance: 10,
            },
        );
        let mut c = base.clone();
        c.cpus[3].guest_node = 2;
        check(
            c,
            AcpiError::CpuNodeUnknown {
                cpu: 3,
                node: 2,
                nodes: 2,
            },
        );
        let mut c = base.clone();
        c.memory[2].guest_node = 5;
        check(
            c,
            AcpiError::MemoryNodeUnknown {
                index: 2,
                start: 5 << 30,
                len: 4 << 30,
                node: 5,
                nodes: 2,
            },
        );
        let mut c = base.clone();
        c.memory[0].len = 0;
        check(
            c,
            AcpiError::BadMemoryRange {
                index: 0,
                start: 0,
                len: 0,
            },
        );
        // A vCPU past UID 254 with an xAPIC id cannot be said: vCPU 0 takes
        // an x2APIC id so that vCPU 255 ends up with xAPIC id 254.
        let mut c = base.clone();
        c.cpus = (0..256)
            .map(|i| AcpiCpu {
                apic_id: if i == 0 { 1000 } else { i - 1 },
                guest_node: 0,
            })
            .collect();
        check(
            c.clone(),
            AcpiError::ProcessorUidTooLarge {
                cpu: 255,
                apic_id: 254,
            },
        );
        // With an x2APIC id it is fine.
        c.cpus[255].apic_id = 1001;
        build(&c).unwrap();
    }
}
