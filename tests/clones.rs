//! Clones (`vmhop restore DIR@ID --shared`) through the real binary: a
//! random-filled builtin:dirty guest is checkpointed and cloned; each clone
//! verifies; what one clone writes (its guest running, and bytes written
//! into it through /proc/PID/mem) is seen neither by a paused clone nor by
//! the image nor by the checkpoint (restored again afterwards); the
//! checkpoint and its image cannot be deleted while clones run, and can
//! once they have exited; the clones' summed PSS shows one shared copy; a
//! clone moves across NUMA nodes and checkpoints like any VM.
//!
//! Each test uses an image directory of its own on /dev/shm
//! (`VMHOP_IMAGE_DIR`).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{memory_map, one_json_object_in, CmdOutput, Vm};
use serde_json::Value;

const VMHOP: &str = env!("CARGO_BIN_EXE_vmhop");
const PROGRESS_WAIT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;

/// A per-test image directory on tmpfs, removed on drop.
struct Images(tempfile::TempDir);

impl Images {
    fn new() -> Images {
        Images(
            tempfile::Builder::new()
                .prefix("vmhop-clones-test-")
                .tempdir_in("/dev/shm")
                .expect("temp dir on /dev/shm"),
        )
    }

    fn env(&self) -> [(&str, &str); 1] {
        [(
            "VMHOP_IMAGE_DIR",
            self.0.path().to_str().expect("utf-8 path"),
        )]
    }

    fn images(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.0.path())
            .expect("read image dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "img"))
            .collect()
    }
}

/// `vmhop ARGS` with the image directory of `images`.
fn vmhop_env(images: &Images, args: &[&str]) -> CmdOutput {
    let out = Command::new(VMHOP)
        .args(args)
        .envs(images.env())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {VMHOP}: {e}"));
    CmdOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// A random-filled dirty guest of `mem`, checkpointed (stopped after)
/// into a new directory: returns the directory.
fn checkpointed_source(mem: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("vmhop-clones-")
        .tempdir()
        .expect("temp dir");
    let mut vm = Vm::start(&[
        "--memory",
        mem,
        "--guest",
        "builtin:dirty,rate=10000,fill=random",
    ]);
    vm.wait_progress_above(0, PROGRESS_WAIT);
    vm.cli_ok(&[
        "checkpoint",
        "--dir",
        dir.path().to_str().expect("utf-8"),
        "--stop-after",
    ]);
    vm.wait_exit();
    dir
}

fn target(dir: &Path) -> String {
    format!("{}@1", dir.display())
}

/// A clone of checkpoint 1 of `dir`, paused or running; returns it and
/// its restore report.
fn clone(images: &Images, dir: &Path, name: &str, paused: bool) -> (Vm, Value) {
    let t = target(dir);
    let mut args = vec!["--shared", "--name", name, "--json"];
    if paused {
        args.push("--paused");
    }
    let vm = Vm::start_command_env(&["restore", &t], &args, &images.env());
    let started = one_json_object_in(&vm.stdout(), &"the clone's start line");
    let r = started["restore"].clone();
    assert_eq!(r["lazy"], false, "{r}");
    assert!(
        r["image"]["path"].is_string(),
        "a clone names its image: {r}"
    );
    (vm, r)
}

fn assert_verifies(vm: &Vm, what: &str) {
    let out = vm.cli_ok(&["verify", "--json"]);
    let r = one_json_object_in(&out.stdout, &out.describe());
    assert_eq!(r["ok"], true, "{what}: verify failed: {r}\n{}", vm.logs());
}

/// Every page of a (paused) VM's guest memory, by guest-physical address,
/// read through /proc/PID/mem.
fn guest_memory(vm: &Vm) -> Vec<(u64, Vec<u8>)> {
    let mem = std::fs::File::open(format!("/proc/{}/mem", vm.pid())).expect("open /proc/PID/mem");
    let mut slots = memory_map(vm);
    slots.sort_by_key(|s| s.gpa);
    slots
        .iter()
        .map(|s| {
            let mut buf = vec![0u8; s.len as usize];
            mem.read_exact_at(&mut buf, s.host_addr)
                .unwrap_or_else(|e| panic!("read guest {:#x}+{:#x}: {e}", s.gpa, s.len));
            (s.gpa, buf)
        })
        .collect()
}

/// Writes `data` at guest `gpa` of `vm` through /proc/PID/mem (a private
/// mapping: the kernel copies the page first, as for a guest write).
fn write_guest(vm: &Vm, gpa: u64, data: &[u8]) {
    let slot = memory_map(vm)
        .into_iter()
        .find(|s| gpa >= s.gpa && gpa + data.len() as u64 <= s.gpa + s.len)
        .unwrap_or_else(|| panic!("no slot holds guest {gpa:#x}"));
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{}/mem", vm.pid()))
        .expect("open /proc/PID/mem for writing");
    mem.write_all_at(data, slot.host_addr + gpa - slot.gpa)
        .unwrap_or_else(|e| panic!("write guest {gpa:#x}: {e}"));
}

fn page_at(memory: &[(u64, Vec<u8>)], gpa: u64) -> &[u8] {
    let (base, bytes) = memory
        .iter()
        .find(|(g, d)| gpa >= *g && gpa < g + d.len() as u64)
        .unwrap_or_else(|| panic!("no memory at {gpa:#x}"));
    let off = (gpa - base) as usize;
    &bytes[off..off + 4096]
}

/// Pages whose bytes differ between `a` and `b` (same layout).
fn differing_pages(a: &[(u64, Vec<u8>)], b: &[(u64, Vec<u8>)]) -> Vec<u64> {
    let mut out = Vec::new();
    for ((gpa, x), (_, y)) in a.iter().zip(b) {
        for (i, (p, q)) in x.chunks(4096).zip(y.chunks(4096)).enumerate() {
            if p != q {
                out.push(gpa + i as u64 * 4096);
            }
        }
    }
    out
}

/// Stops `vm` and waits until its process has exited (and so released
/// its hold on the image).
fn stop(mut vm: Vm) {
    vm.cli_ok(&["stop"]);
    vm.wait_exit();
}

/// Proportional set size of process `pid`, bytes.
fn pss(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/smaps_rollup: {e}"));
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no Pss line in smaps_rollup:\n{text}"));
    kb * 1024
}

#[test]
fn clones_verify_and_one_clones_writes_reach_no_other_clone_nor_the_checkpoint() {
    let images = Images::new();
    let dir = checkpointed_source("64M");
    let (a, ra) = clone(&images, dir.path(), "clone-a", true);
    assert_eq!(ra["image"]["built"], true, "the first clone builds: {ra}");
    let (b, rb) = clone(&images, dir.path(), "clone-b", true);
    assert_eq!(rb["image"]["built"], false, "the second maps it: {rb}");
    assert_eq!(ra["image"]["path"], rb["image"]["path"]);
    let image = PathBuf::from(ra["image"]["path"].as_str().expect("path"));
    assert_eq!(images.images(), vec![image.clone()]);

    let before_a = guest_memory(&a);
    let before_b = guest_memory(&b);
    assert!(
        differing_pages(&before_a, &before_b).is_empty(),
        "two clones of one checkpoint start with the same memory"
    );
    // The image holds the same bytes at each page's guest address.
    let img = std::fs::File::open(&image).expect("open image");
    let probe = before_a
        .iter()
        .map(|(g, d)| g + d.len() as u64 / 2)
        .next()
        .expect("memory");
    let mut in_image = vec![0u8; 4096];
    img.read_exact_at(&mut in_image, probe).expect("read image");
    assert!(
        in_image == page_at(&before_a, probe),
        "the image's page at {probe:#x} is not the clone's"
    );

    // Clone a writes: its guest runs (thousands of pages), and the host
    // writes a marker page into it.
    // The marker leaves the page's head (the guest's tag and counter,
    // which verify checks) as it is.
    let marker = vec![0xa5u8; 4096];
    assert!(page_at(&before_a, probe)[64..] != marker[64..]);
    write_guest(&a, probe + 64, &marker[64..]);
    a.cli_ok(&["resume"]);
    a.wait_progress_above(a.progress() + 2000, PROGRESS_WAIT);
    a.cli_ok(&["pause"]);
    assert_verifies(&a, "clone a after running");
    let after_a = guest_memory(&a);
    // The guest may have written the page's head since; the marker is
    // still there.
    assert!(
        page_at(&after_a, probe)[64..] == marker[64..],
        "clone a lost the bytes written into it at {probe:#x}"
    );
    let written = differing_pages(&before_a, &after_a).len();
    assert!(written > 100, "clone a wrote only {written} pages");

    // Clone b, paused throughout, and the image see none of it.
    let after_b = guest_memory(&b);
    let leaked = differing_pages(&before_b, &after_b);
    assert!(
        leaked.is_empty(),
        "{} pages of clone b changed while clone a wrote, first {:#x}",
        leaked.len(),
        leaked[0]
    );
    img.read_exact_at(&mut in_image, probe).expect("read image");
    assert!(
        in_image == page_at(&before_b, probe),
        "the image changed at {probe:#x}"
    );
    b.cli_ok(&["resume"]);
    assert_verifies(&b, "clone b");
    stop(a);
    stop(b);

    // The checkpoint itself: restored again (not shared), the same memory.
    let t = target(dir.path());
    let again = Vm::start_command_env(&["restore", &t], &["--eager", "--paused"], &images.env());
    let restored = guest_memory(&again);
    let diff = differing_pages(&before_b, &restored);
    assert!(
        diff.is_empty(),
        "{} pages of the checkpoint differ from the clones' start, first {:#x}",
        diff.len(),
        diff[0]
    );
    again.cli_ok(&["resume"]);
    assert_verifies(&again, "the checkpoint restored again");
}

#[test]
fn delete_and_drop_are_refused_naming_the_clones_while_they_run() {
    let images = Images::new();
    let dir = checkpointed_source("32M");
    let d = dir.path().to_str().expect("utf-8");
    let t = target(dir.path());
    let (a, _) = clone(&images, dir.path(), "clone-one", false);
    let (b, _) = clone(&images, dir.path(), "clone-two", false);

    let del = vmhop_env(&images, &["delete", &t]);
    assert_ne!(
        del.code,
        Some(0),
        "delete with clones running: {}",
        del.describe()
    );
    for name in ["clone-one", "clone-two"] {
        assert!(
            del.stderr.contains(name),
            "names {name}: {}",
            del.describe()
        );
    }
    let drop = vmhop_env(&images, &["checkpoints", d, "--drop-images"]);
    assert_ne!(
        drop.code,
        Some(0),
        "drop with clones running: {}",
        drop.describe()
    );
    assert!(drop.stderr.contains("clone-one"), "{}", drop.describe());
    assert_eq!(images.images().len(), 1, "the image stays");
    assert_eq!(
        vmhop_env(&images, &["checkpoints", d]).code,
        Some(0),
        "the checkpoint is still listed"
    );

    // One clone gone: still refused, naming only the other.
    stop(a);
    let del = vmhop_env(&images, &["delete", &t]);
    assert_ne!(del.code, Some(0), "{}", del.describe());
    assert!(del.stderr.contains("clone-two"), "{}", del.describe());
    assert!(!del.stderr.contains("clone-one"), "{}", del.describe());
    assert_verifies(&b, "the remaining clone");
    stop(b);

    // No clone: the image can be dropped, then the checkpoint deleted.
    let drop = vmhop_env(&images, &["checkpoints", d, "--drop-images", "--json"]);
    assert_eq!(drop.code, Some(0), "{}", drop.describe());
    let r = one_json_object_in(&drop.stdout, &drop.describe());
    assert_eq!(r["images"].as_array().map(Vec::len), Some(1), "{r}");
    assert!(images.images().is_empty());
    let del = vmhop_env(&images, &["delete", &t, "--json"]);
    assert_eq!(del.code, Some(0), "{}", del.describe());
    let r = one_json_object_in(&del.stdout, &del.describe());
    let file = PathBuf::from(r["file"].as_str().expect("deleted file"));
    assert!(!file.exists(), "{} deleted", file.display());
}

#[test]
fn clones_share_one_copy_of_memory_by_their_summed_pss() {
    const CLONES: usize = 5;
    const MEM: u64 = 128 * MIB;
    let images = Images::new();
    let dir = checkpointed_source("128M");
    // The baseline: a plain restore holds its own copy of the memory.
    let t = target(dir.path());
    let plain = Vm::start_command_env(&["restore", &t], &["--eager", "--paused"], &images.env());
    assert_verifies(&plain, "the plain restore");
    let plain_pss = pss(plain.pid());
    assert!(
        plain_pss > MEM * 9 / 10,
        "a plain restore of a random-filled {MEM}-byte guest holds it: {plain_pss}"
    );
    drop(plain);

    // All started at once: they race to build the image, which one builds
    // and the others wait for and map.
    let started: Vec<(Vm, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLONES)
            .map(|i| {
                let (images, dir) = (&images, dir.path());
                s.spawn(move || clone(images, dir, &format!("pss-{i}"), true))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("clone start thread"))
            .collect()
    });
    let builders = started
        .iter()
        .filter(|(_, r)| r["image"]["built"] == true)
        .count();
    assert_eq!(builders, 1, "exactly one of {CLONES} racing clones builds");
    assert_eq!(images.images().len(), 1, "one image");
    let clones: Vec<Vm> = started.into_iter().map(|(vm, _)| vm).collect();
    // Each clone reads all of its memory (verify checks every page).
    for (i, c) in clones.iter().enumerate() {
        assert_verifies(c, &format!("clone {i}"));
    }
    let summed: u64 = clones.iter().map(|c| pss(c.pid())).sum();
    // Copied per clone, the sum would be CLONES × the plain restore's;
    // shared, about one copy plus each process's own few MiB.
    let copied = CLONES as u64 * plain_pss;
    assert!(
        summed < copied * 2 / CLONES as u64,
        "{CLONES} clones' summed PSS is {} MiB, a plain restore's {} MiB: \
         they do not share their memory (shared they hold about one copy, \
         below {} MiB)",
        summed / MIB,
        plain_pss / MIB,
        copied * 2 / CLONES as u64 / MIB
    );
}

#[test]
fn a_clone_moves_across_numa_nodes_checkpoints_and_restores() {
    let images = Images::new();
    let dir = checkpointed_source("32M");
    let (c, _) = clone(&images, dir.path(), "mover", false);
    c.cli_ok(&["numa-migrate", "--to-node", "0"]);
    assert_verifies(&c, "the clone after its NUMA move");
    c.cli_ok(&["numa-stat"]);

    let out = tempfile::Builder::new()
        .prefix("vmhop-clones-ck-")
        .tempdir()
        .expect("temp dir");
    c.cli_ok(&[
        "checkpoint",
        "--dir",
        out.path().to_str().expect("utf-8"),
        "--stop-after",
    ]);
    let t = target(out.path());
    let again = Vm::start_command_env(&["restore", &t], &["--eager"], &images.env());
    assert_verifies(&again, "the clone's checkpoint restored");
}

#[test]
fn shared_with_eager_is_refused() {
    let out = common::vmhop(&["restore", "/nonexistent@1", "--shared", "--eager"]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("--shared"), "{}", out.describe());
}
