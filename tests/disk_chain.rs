//! Disks in the checkpoint chain, through the real binary on this host's
//! KVM: a VM with `--disk` is checkpointed (full, then incremental), each
//! id restored lazily and eagerly, with and without `--disk id=,path=`,
//! merged, and restored over a base image that changed.
//!
//! Most tests here run `builtin:idle`, which does not write its disk: they
//! pin down the chain's handling of the image itself — the first
//! checkpoint refers to it instead of copying it, the VM's writes go to an
//! overlay from then on, every restore gives the disk back byte for byte
//! in a new file and never writes the image, and an image that changed is
//! refused. `builtin:disk` (a guest writing tagged blocks and keeping
//! their table in memory) is checkpointed while it writes and each id
//! restored: `verify` finds memory and disk of the same moment. Blocks
//! written between checkpoints, byte for byte, and checkpoints racing a
//! writer are also covered beside the code (`checkpoint::disks` tests).

mod common;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_one_line_error, one_json_object, vmhop, vmhop_expecting_exit, Vm, MIB};
use serde_json::Value;

/// Size of the test images.
const IMAGE_BYTES: u64 = 8 * MIB;

/// Generous bound for a restored disk's background filler (polling).
const FILL_WAIT: Duration = Duration::from_secs(30);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A directory on a file system that takes O_DIRECT (not a tmpfs).
fn work_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmhop-diskchain-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create the work directory")
}

/// An image of `IMAGE_BYTES` whose every 4 KiB block differs from the
/// others (so a block put back at the wrong place shows), with a hole in
/// the middle (a sparse image reads zeros there); returns its bytes.
fn image(path: &Path) -> Vec<u8> {
    let mut bytes = vec![0u8; IMAGE_BYTES as usize];
    for (i, b) in bytes.iter_mut().enumerate() {
        let block = i / 4096;
        if (600..700).contains(&block) {
            continue;
        }
        *b = (i as u32)
            .wrapping_mul(2_654_435_761)
            .rotate_left(block as u32 % 31) as u8;
    }
    std::fs::write(path, &bytes).expect("write the image");
    bytes
}

/// Starts a VM with one disk on `image`.
fn vm_with_disk(image: &Path) -> Vm {
    let disk = format!("path={}", path_str(image));
    Vm::start(&["--memory", "64M", "--disk", &disk])
}

/// `checkpoint --dir DIR --json` on `vm`: its report.
fn checkpoint(vm: &Vm, dir: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["checkpoint", "--dir", path_str(dir), "--json"];
    args.extend_from_slice(extra);
    let out = vm.cli_ok(&args);
    one_json_object(&out.stdout)
}

/// The entries `vmhop checkpoints DIR --json` lists.
fn listed(dir: &Path) -> Vec<Value> {
    let out = vmhop(&["checkpoints", path_str(dir), "--json"]);
    assert_eq!(out.code, Some(0), "checkpoints failed\n{}", out.describe());
    one_json_object(&out.stdout)["checkpoints"]
        .as_array()
        .expect("a list")
        .clone()
}

/// `vm`'s disks as `status --json` lists them.
fn disks(vm: &Vm) -> Vec<Value> {
    vm.status()["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no disks: {}", vm.status()))
        .clone()
}

/// Restores `DIR@ID` with the extra options; its restore report.
fn restore(dir: &Path, id: u64, extra: &[&str]) -> (Vm, Value) {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let vm = Vm::start_command(&["restore", &format!("{}@{id}", path_str(dir))], &args);
    let started = one_json_object(&vm.stdout());
    let report = started["restore"].clone();
    assert!(report.is_object(), "no restore report: {started}");
    (vm, report)
}

/// The file each restored disk landed in, by the restore report.
fn restored_path(report: &Value, id: &str) -> PathBuf {
    report["disks"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == id))
        .and_then(|d| d["path"].as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("the restore report names no disk {id}: {report}"))
}

/// Waits until `vm`'s disks no longer fill from their checkpoint.
fn wait_filled(vm: &Vm) {
    let deadline = Instant::now() + FILL_WAIT;
    while disks(vm).iter().any(|d| d["filling"] == true) {
        assert!(
            Instant::now() < deadline,
            "a restored disk still fills after {FILL_WAIT:?}: {:?}",
            disks(vm)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn assert_same_bytes(path: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("{what}: read {path:?}: {e}"));
    assert_eq!(got.len(), want.len(), "{what}: {path:?} has the wrong size");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: {path:?} differs from the disk at the checkpoint at byte {at:#x}");
    }
}

#[test]
fn a_first_checkpoint_refers_to_the_image_and_every_restore_gives_the_disk_back() {
    let dir = work_dir();
    let img = dir.path().join("disk.img");
    let bytes = image(&img);
    let ck = dir.path().join("ck");
    let vm = vm_with_disk(&img);

    let full = checkpoint(&vm, &ck, &[]);
    assert_eq!(full["kind"], "full", "{full}");
    assert_eq!(full["disk_blocks"], 0, "the image is not copied: {full}");
    // An 8 MiB image copied would make the file at least that big.
    assert!(
        full["bytes_written"].as_u64().unwrap() < 2 * MIB,
        "the full checkpoint is as big as the image: {full}"
    );
    // From now on the VM writes an overlay in the checkpoint directory,
    // over the image, which vmhop no longer writes.
    let d = disks(&vm);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0]["id"], "disk0");
    assert_eq!(d[0]["over"], path_str(&img), "{d:?}");
    let top = PathBuf::from(d[0]["path"].as_str().unwrap());
    assert_eq!(top.parent(), Some(ck.as_path()), "the overlay is in {ck:?}");
    assert_eq!(std::fs::metadata(&top).unwrap().len(), IMAGE_BYTES);

    let inc = checkpoint(&vm, &ck, &[]);
    assert_eq!(inc["kind"], "incremental", "{inc}");
    assert_eq!(inc["disk_blocks"], 0, "nothing was written: {inc}");
    let l = listed(&ck);
    assert_eq!(l.len(), 2, "{l:?}");
    for e in &l {
        assert_eq!(e["disk_bytes"], 0, "{e}");
    }
    // The text listing has the disk column.
    let text = vmhop(&["checkpoints", path_str(&ck)]);
    assert!(
        text.stdout.lines().next().unwrap_or("").contains("disk"),
        "{}",
        text.describe()
    );

    // Lazy restore of 1, the disk at its default place: a new file in the
    // checkpoint directory, filled in the background.
    let (r1, rep) = restore(&ck, 1, &["--name", "r1"]);
    assert_eq!(rep["lazy"], true, "{rep}");
    let p1 = restored_path(&rep, "disk0");
    assert_eq!(p1, ck.join("restored").join("r1-1-disk0.img"));
    assert_eq!(disks(&r1)[0]["path"], path_str(&p1));
    wait_filled(&r1);
    assert_same_bytes(&p1, &bytes, "lazy restore of 1");
    // Sparse: the image's 100 blocks of zeros were not written.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&p1).unwrap().blocks() * 512;
    assert!(
        allocated <= IMAGE_BYTES - 100 * 4096,
        "the restored disk is not sparse: {allocated} bytes allocated"
    );
    // Eager restore of 2 into a file of our choosing: whole before the
    // vCPUs run, so before the API answers.
    let p2 = dir.path().join("elsewhere.img");
    let disk_opt = format!("id=disk0,path={}", path_str(&p2));
    let (r2, rep) = restore(&ck, 2, &["--name", "r2", "--eager", "--disk", &disk_opt]);
    assert_eq!(rep["lazy"], false, "{rep}");
    assert_eq!(restored_path(&rep, "disk0"), p2);
    assert_eq!(disks(&r2)[0]["filling"], false, "{:?}", disks(&r2));
    assert_same_bytes(&p2, &bytes, "eager restore of 2");
    // The same id again: a new default file, the first one left alone.
    let (r1b, rep) = restore(&ck, 1, &["--name", "r1"]);
    let p1b = restored_path(&rep, "disk0");
    assert_eq!(p1b, ck.join("restored").join("r1-1-disk0-2.img"));
    wait_filled(&r1b);
    assert_same_bytes(&p1b, &bytes, "second restore of 1");

    for v in [&r1, &r2, &r1b, &vm] {
        v.cli_ok(&["stop"]);
    }
    assert_same_bytes(&img, &bytes, "the original image after every restore");
}

#[test]
fn a_base_image_that_changed_is_refused_naming_the_file_and_leaves_nothing() {
    let dir = work_dir();
    let img = dir.path().join("base.img");
    let bytes = image(&img);
    let ck = dir.path().join("ck");
    let vm = vm_with_disk(&img);
    checkpoint(&vm, &ck, &[]);
    vm.cli_ok(&["stop"]);
    let restored = ck.join("restored");

    // One byte in the middle, same size.
    let mut changed = bytes.clone();
    changed[3 * MIB as usize + 17] ^= 0xff;
    std::fs::write(&img, &changed).unwrap();
    let socket = dir.path().join("r.sock");
    let target = format!("{}@1", path_str(&ck));
    let out = vmhop_expecting_exit(
        &["restore", &target, "--api-socket", path_str(&socket)],
        &socket,
    );
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert_one_line_error(&out, "a changed base");
    assert!(
        out.stderr.contains(path_str(&img)) && out.stderr.contains("changed since the checkpoint"),
        "{}",
        out.describe()
    );
    let left: Vec<_> = std::fs::read_dir(&restored)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a refused restore left {left:?}");
    assert_same_bytes(&img, &changed, "the image a refused restore read");

    // Another size.
    std::fs::write(&img, &bytes[..bytes.len() - 4096]).unwrap();
    let out = vmhop_expecting_exit(
        &["restore", &target, "--api-socket", path_str(&socket)],
        &socket,
    );
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains(path_str(&img)) && out.stderr.contains("size"),
        "{}",
        out.describe()
    );
    // Gone.
    std::fs::remove_file(&img).unwrap();
    let out = vmhop_expecting_exit(
        &["restore", &target, "--api-socket", path_str(&socket)],
        &socket,
    );
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert_one_line_error(&out, "a missing base");
    assert!(out.stderr.contains(path_str(&img)), "{}", out.describe());
}

#[test]
fn merge_keeps_the_disk_and_its_restore_gives_it_back() {
    let dir = work_dir();
    let img = dir.path().join("m.img");
    let bytes = image(&img);
    let ck = dir.path().join("ck");
    let vm = vm_with_disk(&img);
    checkpoint(&vm, &ck, &[]);
    checkpoint(&vm, &ck, &[]);
    checkpoint(&vm, &ck, &[]);
    vm.cli_ok(&["stop"]);
    let out = vmhop(&["merge", &format!("{}@3", path_str(&ck)), "--json"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let merged = one_json_object(&out.stdout);
    let id = merged["id"].as_u64().expect("merged id");
    assert_eq!(id, 4, "{merged}");
    let l = listed(&ck);
    let e = l
        .iter()
        .find(|e| e["id"] == id)
        .expect("the merged file is listed");
    assert_eq!(e["kind"], "full", "{e}");
    let (r, rep) = restore(&ck, id, &["--eager"]);
    assert_eq!(rep["chain_files"], 1, "the merged file alone: {rep}");
    let p = restored_path(&rep, "disk0");
    assert_same_bytes(&p, &bytes, "restore of the merged checkpoint");
    r.cli_ok(&["stop"]);
}

#[test]
fn restore_disk_options_that_cannot_be_used_are_refused_with_the_reason() {
    let dir = work_dir();
    let img = dir.path().join("o.img");
    image(&img);
    let ck = dir.path().join("ck");
    let vm = vm_with_disk(&img);
    checkpoint(&vm, &ck, &[]);
    vm.cli_ok(&["stop"]);
    let socket = dir.path().join("r.sock");
    let target = format!("{}@1", path_str(&ck));
    let exists = dir.path().join("exists.img");
    std::fs::write(&exists, b"keep me").unwrap();
    let cases: Vec<(String, &str)> = vec![
        ("id=nope,path=/x.img".into(), "has no disk nope"),
        ("id=disk0".into(), "give id=NAME,path=FILE"),
        ("path=/x.img,readonly".into(), "give id=NAME,path=FILE"),
        (
            format!("id=disk0,path={}", path_str(&exists)),
            "already exists",
        ),
    ];
    for (opt, want) in cases {
        let out = vmhop_expecting_exit(
            &[
                "restore",
                &target,
                "--disk",
                &opt,
                "--api-socket",
                path_str(&socket),
            ],
            &socket,
        );
        assert_eq!(out.code, Some(2), "--disk {opt}\n{}", out.describe());
        assert_one_line_error(&out, &opt);
        assert!(
            out.stderr.contains(want),
            "--disk {opt}: want {want:?}\n{}",
            out.describe()
        );
    }
    assert_eq!(std::fs::read(&exists).unwrap(), b"keep me");
}

/// `verify --json` until a lazy restore's background load lets it run;
/// asserts memory and disk agree and that the guest wrote its disk.
fn assert_verifies(vm: &Vm, what: &str) {
    let deadline = Instant::now() + FILL_WAIT;
    let out = loop {
        let out = vm.cli(&["verify", "--json"]);
        if out.code == Some(1) && out.stderr.contains("in progress") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        break out;
    };
    assert_eq!(
        out.code,
        Some(0),
        "{what}: verify\n{}\n{}",
        out.describe(),
        vm.logs()
    );
    let v = one_json_object(&out.stdout);
    assert_eq!(v["ok"], true, "{what}: {v}");
}

/// The guest's progress (requests completed) as `status` shows it.
fn progress(vm: &Vm) -> u64 {
    vm.status()["guest"]["progress"].as_u64().unwrap_or(0)
}

/// `builtin:disk` writes tagged blocks and keeps a table of them in its
/// memory; `verify` checks that every block holds what the table says.
/// Checkpoints taken while it writes, restored (lazily, paused), must give
/// a disk that agrees with the memory of the same moment, and the guest
/// runs on from there, still agreeing.
#[test]
fn a_disk_guest_restored_from_each_checkpoint_has_memory_and_disk_of_the_same_moment() {
    let dir = work_dir();
    let img = dir.path().join("g.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 * MIB))
        .unwrap();
    let disk = format!("path={}", path_str(&img));
    let vm = Vm::start(&[
        "--memory",
        "64M",
        "--guest",
        "builtin:disk",
        "--disk",
        &disk,
    ]);
    let ck = dir.path().join("ck");
    let mut last = 0;
    let mut wait_writes = |vm: &Vm| {
        let deadline = Instant::now() + FILL_WAIT;
        while progress(vm) < last + 100 {
            assert!(
                Instant::now() < deadline,
                "the disk guest makes no progress"
            );
            thread::sleep(Duration::from_millis(20));
        }
        last = progress(vm);
    };
    wait_writes(&vm);
    let full = checkpoint(&vm, &ck, &[]);
    wait_writes(&vm);
    let inc = checkpoint(&vm, &ck, &[]);
    assert!(
        inc["disk_blocks"].as_u64().unwrap() > 0,
        "the guest's writes: {inc}"
    );
    assert_verifies(&vm, "the source");
    vm.cli_ok(&["stop"]);
    for (id, what) in [
        (full["id"].as_u64().unwrap(), "full"),
        (inc["id"].as_u64().unwrap(), "incremental"),
    ] {
        let (r, _) = restore(&ck, id, &["--paused", "--name", what]);
        assert_verifies(&r, &format!("restore of the {what} checkpoint, paused"));
        let p = progress(&r);
        r.cli_ok(&["resume"]);
        let deadline = Instant::now() + FILL_WAIT;
        while progress(&r) < p + 50 {
            assert!(Instant::now() < deadline, "restored {what}: no progress");
            thread::sleep(Duration::from_millis(20));
        }
        assert_verifies(&r, &format!("restore of the {what} checkpoint, run on"));
        r.cli_ok(&["stop"]);
    }
}

/// After a checkpoint the disk is an overlay over its base: a migration on
/// shared storage (which hands over flat images only) is refused before
/// anything is sent, naming the disk, and the VM runs on with its disk.
#[test]
fn a_checkpointed_disk_is_refused_by_a_shared_storage_migration_before_it_starts() {
    let dir = work_dir();
    let img = dir.path().join("disk.img");
    image(&img);
    let addr = format!("unix:{}", path_str(&dir.path().join("m.sock")));
    let dst = Vm::start(&["--incoming", &addr]);
    let vm = vm_with_disk(&img);
    checkpoint(&vm, &dir.path().join("ck"), &[]);
    let out = vm.cli(&["migrate", "--to", &addr]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert_one_line_error(&out, "a migration of a layered disk");
    assert!(
        out.stderr.contains("disk disk0 is layered"),
        "{}",
        out.describe()
    );
    assert_eq!(vm.state(), "running");
    assert_eq!(dst.status()["state"], "incoming", "{}", dst.logs());
}

/// `migrate --copy-storage` of a checkpointed disk (an overlay over its
/// image): the destination's new file gets the disk as the guest sees it,
/// byte for byte — the image's blocks under the overlay, its hole as a
/// hole's zeros — and the source's image and checkpoint stay as they were.
#[test]
fn copy_storage_sends_a_checkpointed_disk_whole_through_its_layers() {
    let dir = work_dir();
    let img = dir.path().join("disk.img");
    let bytes = image(&img);
    let copy = dir.path().join("copy.img");
    let addr = format!("unix:{}", path_str(&dir.path().join("m.sock")));
    let place = format!("id=disk0,path={}", path_str(&copy));
    let dst = Vm::start(&["--incoming", &addr, "--disk", &place]);
    let mut vm = vm_with_disk(&img);
    let ck = dir.path().join("ck");
    checkpoint(&vm, &ck, &[]);
    let out = vm.cli(&["migrate", "--to", &addr, "--copy-storage", "--json"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.describe(), dst.logs());
    let r = one_json_object(&out.stdout);
    let blocks = r["disk_blocks_sent"].as_u64().unwrap_or(0);
    assert!(blocks >= IMAGE_BYTES / 4096, "every block crosses: {r}");
    assert!(vm.wait_exit().success(), "{}", vm.logs());
    assert_eq!(dst.state(), "running", "{}", dst.logs());
    let d = disks(&dst);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0]["path"], path_str(&copy), "{d:?}");
    dst.cli_ok(&["pause"]);
    assert_same_bytes(&copy, &bytes, "the destination's copy");
    assert_same_bytes(&img, &bytes, "the source's image after the migration");
    assert_eq!(listed(&ck).len(), 1, "the checkpoint is still there");
}
