//! Linux-guest plumbing through the real binary on this host's KVM:
//! `--kernel` errors a user can understand, and tiny hand-made bzImages
//! that exercise the same boot path as Linux (loader, boot_params, 64-bit
//! entry, in-kernel irqchip and PIT, COM1, ACPI power-off, Linux-guest
//! state in checkpoints). A real kernel is too slow on this paravirtualised
//! KVM; tests/numabox.rs boots one inside the NUMA box.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{assert_one_line_error, one_json_object, vmhop, Vm};

/// The test hook that lets a Linux guest start on a KVM the probe finds too
/// slow for real kernels: the fake kernels here run a few dozen
/// instructions, which even an emulating KVM does at once.
const ANY_KVM: &str = "linux-any-kvm";

/// Setup sectors of the fake bzImage (the setup code vmhop never runs).
const SETUP_SECTS: usize = 4;
/// Where the 64-bit entry point sits in the protected-mode kernel.
const ENTRY_OFFSET: usize = 0x200;

/// A bzImage (boot protocol 2.15, 64-bit entry) whose kernel is `code`,
/// entered at +0x200 in long mode, as vmhop enters Linux.
fn fake_bzimage(code: &[u8], version: u16) -> Vec<u8> {
    let setup = (SETUP_SECTS + 1) * 512;
    let mut img = vec![0u8; setup + ENTRY_OFFSET + code.len()];
    img[0x1f1] = SETUP_SECTS as u8;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    img[0x211] = 1; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    img[setup + ENTRY_OFFSET..].copy_from_slice(code);
    img
}

/// Where the fake ELF kernel's one segment is loaded and entered (16 MiB,
/// where vmlinux puts its physical start).
const ELF_LOAD: u64 = 0x100_0000;

/// An ELF64 vmlinux-like image: one PT_LOAD segment holding `code` at
/// ELF_LOAD, entered there in long mode.
fn fake_vmlinux(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let off = EHDR + PHDR;
    let mut img = vec![0u8; off + code.len()];
    img[..4].copy_from_slice(b"\x7fELF");
    img[4] = 2; // 64-bit
    img[5] = 1; // little-endian
    img[6] = 1; // version
    img[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    img[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    img[20..24].copy_from_slice(&1u32.to_le_bytes());
    img[24..32].copy_from_slice(&ELF_LOAD.to_le_bytes()); // e_entry
    img[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    img[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    img[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    img[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut img[EHDR..EHDR + PHDR];
    ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&(off as u64).to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&(0xffff_ffff_8100_0000u64).to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&ELF_LOAD.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
    img[off..].copy_from_slice(code);
    img
}

/// Prints "hi\n" on COM1, then powers off through the ACPI sleep register.
const HELLO_POWEROFF: &[u8] = &[
    0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
    0xb0, b'h', 0xee, // mov al, 'h'; out dx, al
    0xb0, b'i', 0xee, // mov al, 'i'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xba, 0xc0, 0x03, 0x00, 0x00, // mov edx, 0x3c0 (sleep control)
    0xb0, 0x34, 0xee, // mov al, S5 << 2 | SLP_EN; out dx, al
    0xeb, 0xfe, // jmp $
];

/// Prints "k" then pulses the reset line through the i8042 (command 0xfe).
const KBD_RESET: &[u8] = &[
    0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
    0xb0, b'k', 0xee, // mov al, 'k'; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xeb, 0xfe, // jmp $
];

/// Prints a dot on COM1 now and then, forever.
const DOTS: &[u8] = &[
    0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
    0xb0, b'.', // mov al, '.'
    0xee, // L: out dx, al
    0xb9, 0x20, 0x4e, 0x00, 0x00, // mov ecx, 20000
    0xe2, 0xfe, // loop $
    0xeb, 0xf4, // jmp L
];

/// Prints the alphabet on COM1 over and over, a letter now and then: the
/// letter in flight lives in a register, so where the output goes on says
/// which vCPU state the guest runs on.
const LETTERS: &[u8] = &[
    0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
    0xb0, b'a', // mov al, 'a'
    0xee, // L: out dx, al
    0xb9, 0x20, 0x4e, 0x00, 0x00, // mov ecx, 20000
    0xe2, 0xfe, // loop $
    0xfe, 0xc0, // inc al
    0x3c, 0x7b, // cmp al, 'z' + 1
    0x75, 0xf2, // jne L
    0xb0, b'a', // mov al, 'a'
    0xeb, 0xee, // jmp L
];

/// Spins without a sound.
const SILENT: &[u8] = &[0xeb, 0xfe];

/// Writes `bytes` to DIR/name and returns its path.
fn file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Starts `kernel` paused in 64 MiB with its console to DIR/console.txt,
/// resumes it and waits for vmhop to exit by itself; returns the exit
/// status, the console and the (exited) VM for its logs.
fn run_until_exit(dir: &Path, kernel: &Path) -> (std::process::ExitStatus, String, Vm) {
    let console = dir.join("console.txt");
    let mut vm = Vm::start(&[
        "--kernel",
        s(kernel),
        "--memory",
        "64M",
        "--console",
        s(&console),
        "--paused",
        "--test-hook",
        ANY_KVM,
    ]);
    vm.cli_ok(&["resume"]);
    let status = vm.wait_exit();
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    (status, text, vm)
}

/// Starts `code` as a bzImage's kernel, running, in 64 MiB with `vcpus`
/// vCPUs and its console to DIR/console.txt; returns the VM and the
/// console's path.
fn start_kernel(dir: &Path, code: &[u8], vcpus: u32) -> (Vm, PathBuf) {
    let k = file(dir, "k", &fake_bzimage(code, 0x020f));
    let console = dir.join("console.txt");
    let vcpus = vcpus.to_string();
    let vm = Vm::start(&[
        "--kernel",
        s(&k),
        "--vcpus",
        &vcpus,
        "--memory",
        "64M",
        "--console",
        s(&console),
        "--test-hook",
        ANY_KVM,
    ]);
    (vm, console)
}

/// Waits until `path` holds at least `n` bytes; returns its contents.
fn wait_console(path: &Path, n: usize, limit: Duration, vm: &Vm) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.len() >= n {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the console {} holds {:?} after {limit:?}, wanted {n} bytes\n{}",
            path.display(),
            text,
            vm.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kernel_together_with_guest_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let k = file(dir.path(), "k", &fake_bzimage(SILENT, 0x020f));
    let out = vmhop(&["run", "--kernel", s(&k), "--guest", "builtin:idle"]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert_one_line_error(&out, "--kernel with --guest");
    assert!(out.stderr.contains("--kernel") && out.stderr.contains("--guest"));
    let out = vmhop(&["run", "--initrd", s(&k)]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("--kernel"), "{}", out.describe());
}

#[test]
fn a_file_that_is_not_a_kernel_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let k = file(dir.path(), "notes.txt", b"just some text, not a kernel");
    let sock = dir.path().join("api.sock");
    let out = vmhop(&["run", "--api-socket", s(&sock), "--kernel", s(&k)]);
    // A file the user named that cannot be used: exit 2 (api::error).
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert_one_line_error(&out, "not a kernel");
    assert!(
        out.stderr.contains("notes.txt") && out.stderr.contains("not a Linux kernel"),
        "{}",
        out.describe()
    );
    let missing = dir.path().join("nope");
    let out = vmhop(&["run", "--api-socket", s(&sock), "--kernel", s(&missing)]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("nope"), "{}", out.describe());
}

#[test]
fn a_kernel_older_than_the_64_bit_boot_protocol_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = file(dir.path(), "old", &fake_bzimage(SILENT, 0x0206));
    let sock = dir.path().join("api.sock");
    let out = vmhop(&["run", "--api-socket", s(&sock), "--kernel", s(&k)]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("protocol 2.06") && out.stderr.contains("2.12"),
        "{}",
        out.describe()
    );
}

#[test]
fn an_initrd_larger_than_guest_memory_is_refused_before_the_guest_runs() {
    let dir = tempfile::tempdir().unwrap();
    let k = file(dir.path(), "k", &fake_bzimage(SILENT, 0x020f));
    let initrd = dir.path().join("big.img");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();
    let sock = dir.path().join("api.sock");
    let out = common::vmhop_expecting_exit(
        &[
            "run",
            "--api-socket",
            s(&sock),
            "--memory",
            "64M",
            "--kernel",
            s(&k),
            "--initrd",
            s(&initrd),
            "--test-hook",
            ANY_KVM,
        ],
        &sock,
    );
    // A file the user named that cannot be used: exit 2 (api::error).
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("big.img") && out.stderr.contains("does not fit"),
        "{}",
        out.describe()
    );
}

#[test]
fn guest_console_reaches_the_file_and_acpi_poweroff_ends_vmhop_with_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let k = file(dir.path(), "k", &fake_bzimage(HELLO_POWEROFF, 0x020f));
    let (status, console, vm) = run_until_exit(dir.path(), &k);
    assert_eq!(status.code(), Some(0), "{}", vm.logs());
    assert_eq!(console, "hi\n");
    assert!(vm.stderr().contains("powered off"), "{}", vm.logs());
}

#[test]
fn keyboard_controller_reset_ends_vmhop_with_exit_0_as_a_reboot() {
    let dir = tempfile::tempdir().unwrap();
    let k = file(dir.path(), "k", &fake_bzimage(KBD_RESET, 0x020f));
    let (status, console, vm) = run_until_exit(dir.path(), &k);
    assert_eq!(status.code(), Some(0), "{}", vm.logs());
    assert_eq!(console, "k");
    assert!(vm.stderr().contains("rebooted"), "{}", vm.logs());
}

/// Whether this host's KVM is the paravirtualised PVM, which emulates guest
/// kernel code (ENVIRONMENT.md): what the probe must find too slow.
fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn a_linux_guest_on_a_kvm_too_slow_for_kernels_is_refused_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let k = file(dir.path(), "k", &fake_bzimage(HELLO_POWEROFF, 0x020f));
    let sock = dir.path().join("api.sock");
    let args = [
        "run",
        "--api-socket",
        s(&sock),
        "--kernel",
        s(&k),
        "--memory",
        "64M",
    ];
    if !kvm_is_pvm() {
        // A KVM that runs kernel code natively boots the guest.
        let (status, console, vm) = run_until_exit(dir.path(), &k);
        assert_eq!(
            (status.code(), console.as_str()),
            (Some(0), "hi\n"),
            "{}",
            vm.logs()
        );
        return;
    }
    let out = common::vmhop_expecting_exit(&args, &sock);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert_one_line_error(&out, "a Linux guest on PVM");
    for needle in [
        "guest kernel code",
        "hardware-assisted KVM",
        "tests/numabox/linux/run-step.sh",
    ] {
        assert!(
            out.stderr.contains(needle),
            "{needle:?}\n{}",
            out.describe()
        );
    }
    assert!(!sock.exists(), "a refused VM left its socket");
}

#[test]
fn a_silent_linux_guest_is_reported_instead_of_hanging_without_a_word() {
    let dir = tempfile::tempdir().unwrap();
    let k = file(dir.path(), "k", &fake_bzimage(SILENT, 0x020f));
    let vm = Vm::start(&["--kernel", s(&k), "--memory", "64M", "--test-hook", ANY_KVM]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !vm.stderr().contains("written nothing to its console") {
        assert!(Instant::now() < deadline, "no warning:\n{}", vm.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        vm.stderr().contains("hardware-assisted KVM"),
        "{}",
        vm.logs()
    );
    assert_eq!(vm.state(), "running");
    assert_eq!(vm.status()["guest"]["kind"], "linux");
}

#[test]
fn linux_guest_state_survives_full_and_incremental_checkpoints_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, console) = start_kernel(dir.path(), DOTS, 2);
    let ck = dir.path().join("ck");
    wait_console(&console, 3, Duration::from_secs(30), &vm);
    let full = one_json_object(&vm.cli_ok(&["checkpoint", "--dir", s(&ck), "--json"]).stdout);
    assert_eq!(full["kind"], "full", "{full}");
    let before = std::fs::read_to_string(&console).unwrap().len();
    wait_console(&console, before + 2, Duration::from_secs(30), &vm);
    let inc = one_json_object(&vm.cli_ok(&["checkpoint", "--dir", s(&ck), "--json"]).stdout);
    assert_eq!(inc["kind"], "incremental", "{inc}");
    drop(vm);
    let (full_id, inc_id) = (full["id"].to_string(), inc["id"].to_string());
    for (id, mode) in [(full_id.as_str(), None), (inc_id.as_str(), Some("--eager"))] {
        let out = dir.path().join(format!("restored-{id}.txt"));
        let target = format!("{}@{id}", s(&ck));
        let mut args = vec!["--console", s(&out), "--test-hook", ANY_KVM];
        args.extend(mode);
        let r = Vm::start_command(&["restore", &target], &args);
        // The guest goes on where it was: more dots, not a triple fault.
        wait_console(&out, 3, Duration::from_secs(30), &r);
        assert_eq!(r.state(), "running", "{}", r.logs());
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.chars().all(|c| c == '.'), "{text:?}");
    }
}

#[test]
fn an_elf_vmlinux_boots_through_the_same_path() {
    let dir = tempfile::tempdir().unwrap();
    let k = file(dir.path(), "vmlinux", &fake_vmlinux(HELLO_POWEROFF));
    let (status, console, vm) = run_until_exit(dir.path(), &k);
    assert_eq!(status.code(), Some(0), "{}", vm.logs());
    assert_eq!(console, "hi\n");
}

#[test]
fn a_guest_that_triple_faults_ends_vmhop_with_exit_1_naming_it() {
    // ud2 with no IDT: #UD, then #DF, then a triple fault.
    let dir = tempfile::tempdir().unwrap();
    let k = file(dir.path(), "k", &fake_bzimage(&[0x0f, 0x0b], 0x020f));
    let (status, _, vm) = run_until_exit(dir.path(), &k);
    assert_eq!(status.code(), Some(1), "{}", vm.logs());
    assert!(
        vm.stderr().contains("triple fault") && vm.stderr().contains("cannot run on"),
        "{}",
        vm.logs()
    );
}

/// The letter LETTERS prints after `c`.
fn next_letter(c: u8) -> u8 {
    if c == b'z' {
        b'a'
    } else {
        c + 1
    }
}

#[test]
fn a_linux_guest_resets_in_place_to_a_checkpoint_with_its_legacy_devices() {
    // The VM Linux gets (COM1, i8042, CMOS, ACPI PM, irqchip, PIT) goes
    // back in place: before the devices could load a state, `reset` was
    // refused with 409 naming the serial port.
    let dir = tempfile::tempdir().unwrap();
    let (vm, console) = start_kernel(dir.path(), LETTERS, 1);
    let ck = dir.path().join("ck");
    wait_console(&console, 30, Duration::from_secs(30), &vm);
    // Paused, the console is exactly where the checkpoint's state is.
    vm.cli_ok(&["pause"]);
    let at_checkpoint = std::fs::read(&console).unwrap();
    let full = one_json_object(&vm.cli_ok(&["checkpoint", "--dir", s(&ck), "--json"]).stdout);
    vm.cli_ok(&["resume"]);
    let last = *at_checkpoint.last().unwrap();
    // Well past the checkpoint (more than a whole alphabet).
    wait_console(
        &console,
        at_checkpoint.len() + 40,
        Duration::from_secs(30),
        &vm,
    );
    vm.cli_ok(&["pause"]);
    let before_reset = std::fs::read(&console).unwrap().len();
    let target = format!("{}@{}", s(&ck), full["id"]);
    let r = one_json_object(&vm.cli_ok(&["reset", "--to", &target, "--json"]).stdout);
    assert_eq!(r["operation"], "reset", "{r}");
    assert_eq!(
        vm.state(),
        "paused",
        "a paused VM stays paused\n{}",
        vm.logs()
    );
    vm.cli_ok(&["resume"]);
    let text = wait_console(&console, before_reset + 30, Duration::from_secs(30), &vm);
    let after = &text.as_bytes()[before_reset..];
    assert_eq!(
        after[0] as char,
        next_letter(last) as char,
        "after the reset the guest goes on from the checkpoint's letter (it had printed {:?} then)\n{}",
        String::from_utf8_lossy(&at_checkpoint[at_checkpoint.len().saturating_sub(5)..]),
        vm.logs()
    );
    for w in after.windows(2) {
        assert_eq!(
            w[1],
            next_letter(w[0]),
            "{:?}",
            String::from_utf8_lossy(after)
        );
    }
    assert_eq!(vm.state(), "running", "{}", vm.logs());
}
