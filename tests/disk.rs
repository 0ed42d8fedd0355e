//! `builtin:disk` through the real binary on this host's KVM: a CPL3 guest
//! drives a virtio-blk disk (tagged 4 KiB writes, read-backs, polling the
//! used ring), and `vmhop verify` checks the disk against the table of
//! blocks the guest keeps in memory. Covered: progress and verify, a second
//! boot on a used image, pause/resume (disk and guest frozen), many
//! requests over few blocks, `cache=none` and `cache=writeback`, a block
//! changed behind the guest's back, a read-only disk (IOERR, the VM runs
//! on), a missing, a locked and an absent image, and NUMA moves in every
//! mode with the guest writing (on this one-node host, to node 0: the moves
//! still switch the memory the device writes into), the device worker
//! pinned to its guest node's CPUs (boot, moves, a migration's destination,
//! a restore), and the benchmark modes (`mode=rand-read-qd32`, `seq-read`,
//! `seq-write`) running and verifying.
//!
//! Besides vmhop's own `verify`, the tests read the image file themselves
//! (the block format is in docs/test-device.md), so a verify that checked
//! nothing could not pass them.
//!
//! Host migration with shared storage: today the destination, on the same
//! host, cannot open the image the source still holds locked, so the
//! migration is refused and the source runs on with its disk intact; the
//! test pins that down until shared storage (open early without the lock,
//! take it at the switch) and `--copy-storage` land.
//!
//! Not here yet: checkpoints and restores of a disk guest — a restore must
//! give the disk back as it was, which is the checkpoint chain's work
//! (issue 20, branch disk-chain), not on main when these were written.

mod common;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_one_line_error, one_json_object, vmhop_expecting_exit, CmdOutput, Vm, MIB};
use serde_json::Value;

/// Generous bound for a running guest to show progress (polling, not timing).
const PROGRESS_WAIT: Duration = Duration::from_secs(30);

/// Size of the test images.
const IMAGE_BYTES: u64 = 16 * MIB;

/// A disk block.
const BLOCK: usize = 4096;

/// First word of every block the guest writes.
const BLOCK_MAGIC: &[u8; 8] = b"VMHOPBLK";

/// A directory for images on a file system that takes O_DIRECT (cargo's
/// own temporary directory, not a tmpfs).
fn image_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmhop-disk-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create the image directory")
}

/// A fresh sparse raw image of `bytes`.
fn image(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(bytes))
        .expect("create the image");
    p
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Starts `builtin:disk{guest_opts}` on `image` (`disk_opts` appended to
/// its `--disk`), with the extra `run` arguments.
fn disk_vm(image: &Path, disk_opts: &str, guest_opts: &str, extra: &[&str]) -> Vm {
    let disk = format!("path={}{disk_opts}", path_str(image));
    let guest = format!("builtin:disk{guest_opts}");
    let mut args = vec!["--guest", guest.as_str(), "--disk", disk.as_str()];
    args.extend_from_slice(extra);
    Vm::start(&args)
}

/// `verify --json`: its output and report.
fn verify(vm: &Vm) -> (CmdOutput, Value) {
    let out = vm.cli(&["verify", "--json"]);
    assert!(
        !out.stderr.contains("panicked"),
        "verify panicked\n{}",
        out.describe()
    );
    let report = one_json_object(&out.stdout);
    (out, report)
}

/// An unsigned field of a JSON object, or a panic naming it.
fn field(v: &Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no unsigned {name} in {v}"))
}

/// Asserts verify passes with the disk checked; returns its `disk` part.
fn assert_disk_verifies(vm: &Vm, when: &str) -> Value {
    let (out, r) = verify(vm);
    assert_eq!(
        out.code,
        Some(0),
        "verify {when} failed: {r}\n{}",
        vm.logs()
    );
    assert_eq!(r["ok"], true, "verify {when}: {r}");
    let d = r["disk"].clone();
    assert!(d.is_object(), "verify {when} has no disk report: {r}");
    let blocks = field(&d, "blocks");
    assert!(blocks > 0, "verify {when} used no blocks: {r}");
    assert_eq!(field(&d, "blocks_checked"), blocks, "verify {when}: {r}");
    assert_eq!(field(&d, "io_errors"), 0, "verify {when}: {r}");
    assert_eq!(field(&d, "guest_errors"), 0, "verify {when}: {r}");
    d
}

/// Verifies until the guest has completed more than `above` disk
/// requests, within `PROGRESS_WAIT`; returns the last disk report.
fn wait_disk_requests_above(vm: &Vm, above: u64, when: &str) -> Value {
    let deadline = Instant::now() + PROGRESS_WAIT;
    loop {
        let d = assert_disk_verifies(vm, when);
        if field(&d, "requests") > above {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: the disk guest stayed at {d} (not above {above} requests) for {PROGRESS_WAIT:?}\n{}",
            vm.logs()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Little-endian word `i` of a block.
fn word(block: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(block[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// The blocks of the image file holding a block the guest wrote, as
/// (block index, the block number it names, its tag).
fn tagged_blocks(image: &Path) -> Vec<(u64, u64, u64)> {
    let data = std::fs::read(image).expect("read the image");
    data.chunks_exact(BLOCK)
        .enumerate()
        .filter(|(_, b)| &b[..8] == BLOCK_MAGIC)
        .map(|(i, b)| (i as u64, word(b, 1), word(b, 2)))
        .collect()
}

/// Asserts every tagged block of `image` sits at the place it names and
/// that there are some; returns how many.
fn assert_blocks_in_place(image: &Path, when: &str) -> usize {
    let tagged = tagged_blocks(image);
    assert!(!tagged.is_empty(), "{when}: no tagged block in the image");
    for &(at, names, tag) in &tagged {
        assert_eq!(
            at, names,
            "{when}: block {at} holds block {names}'s data (tag {tag})"
        );
        assert!(tag > 0, "{when}: block {at} has tag 0");
    }
    tagged.len()
}

#[test]
fn a_disk_guest_writes_its_disk_and_verifies_and_a_second_boot_on_the_same_image_does_too() {
    let dir = image_dir();
    let img = image(dir.path(), "disk.img", IMAGE_BYTES);
    for boot in ["first", "second"] {
        let mut vm = disk_vm(&img, "", "", &["--vcpus", "2", "--memory", "64M"]);
        assert_eq!(vm.status()["guest"]["kind"], "builtin:disk");
        vm.wait_progress_above(0, PROGRESS_WAIT);
        let d = wait_disk_requests_above(&vm, 100, boot);
        assert_eq!(field(&d, "blocks"), IMAGE_BYTES / BLOCK as u64, "{d}");
        assert!(field(&d, "writes") > 0 && field(&d, "reads") > 0, "{d}");
        assert!(field(&d, "blocks_written") > 0, "{d}");
        let (_, r) = verify(&vm);
        assert!(
            field(&r, "pages_checked") > 0,
            "vCPU 1 sweeps memory and verify checks it: {r}"
        );
        let text = vm.cli_ok(&["verify"]).stdout;
        assert!(
            text.contains("memory and disk consistent") && text.contains("blocks checked"),
            "{text}"
        );
        vm.cli_ok(&["stop"]);
        assert!(vm.wait_exit().success(), "{}", vm.logs());
        assert_blocks_in_place(&img, boot);
    }
}

#[test]
fn a_paused_disk_guest_leaves_its_disk_alone_and_goes_on_after_resume() {
    let dir = image_dir();
    let img = image(dir.path(), "disk.img", IMAGE_BYTES);
    let vm = disk_vm(&img, "", "", &["--memory", "64M"]);
    wait_disk_requests_above(&vm, 50, "before the pause");
    vm.cli_ok(&["pause"]);
    assert_eq!(vm.state(), "paused");
    let p = vm.progress();
    let before = std::fs::read(&img).expect("read the image");
    let d = assert_disk_verifies(&vm, "paused");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.progress(), p, "a paused disk guest made progress");
    assert_eq!(
        std::fs::read(&img).expect("read the image"),
        before,
        "the disk changed while the VM was paused"
    );
    let again = assert_disk_verifies(&vm, "still paused");
    assert_eq!(again["requests"], d["requests"], "{d} then {again}");
    vm.cli_ok(&["resume"]);
    assert_eq!(vm.state(), "running");
    vm.wait_progress_above(p, PROGRESS_WAIT);
    wait_disk_requests_above(&vm, field(&d, "requests"), "after resume");
}

#[test]
fn after_thousands_of_requests_over_a_few_blocks_every_block_holds_its_last_write() {
    let dir = image_dir();
    let img = image(dir.path(), "disk.img", IMAGE_BYTES);
    // size= names the part of the disk used in bytes: 64 blocks.
    let vm = disk_vm(&img, "", ",size=256K", &["--memory", "64M"]);
    let d = {
        let deadline = Instant::now() + 4 * PROGRESS_WAIT;
        loop {
            let d = assert_disk_verifies(&vm, "while it runs");
            if field(&d, "requests") > 4000 {
                break d;
            }
            assert!(
                Instant::now() < deadline,
                "the disk guest stayed at {d}\n{}",
                vm.logs()
            );
            thread::sleep(Duration::from_millis(500));
        }
    };
    assert_eq!(field(&d, "blocks"), 64, "{d}");
    // ~3000 writes over 64 blocks: every block was written, most many times.
    assert_eq!(field(&d, "blocks_written"), 64, "{d}");
    assert!(field(&d, "reads") > 500, "{d}");
    // Every read-back found a written block: each slot holds one, but for
    // the slot of a read the pause found in flight.
    assert!(field(&d, "slots_checked") >= 15, "{d}");
    vm.cli_ok(&["pause"]);
    let d = assert_disk_verifies(&vm, "paused");
    let tagged = tagged_blocks(&img);
    assert_eq!(
        tagged.iter().map(|t| t.0).collect::<Vec<_>>(),
        (0..64).collect::<Vec<_>>(),
        "the guest writes blocks 0..64 only"
    );
    assert_blocks_in_place(&img, "paused");
    let writes = field(&d, "writes");
    let newest = tagged.iter().map(|t| t.2).max().unwrap_or(0);
    assert!(
        newest == writes || newest == writes + 1,
        "the newest tag on the disk, {newest}, is not the guest's last write ({writes}): {d}"
    );
}

#[test]
fn both_cache_modes_serve_the_guest_and_reach_the_image() {
    for cache in ["none", "writeback"] {
        let dir = image_dir();
        let img = image(dir.path(), "disk.img", IMAGE_BYTES);
        let opts = format!(",cache={cache}");
        let mut vm = disk_vm(&img, &opts, "", &["--vcpus", "2", "--memory", "64M"]);
        wait_disk_requests_above(&vm, 100, &format!("cache={cache}"));
        vm.cli_ok(&["pause"]);
        assert_disk_verifies(&vm, &format!("cache={cache}, paused"));
        vm.cli_ok(&["resume"]);
        vm.cli_ok(&["stop"]);
        assert!(vm.wait_exit().success(), "{}", vm.logs());
        assert_blocks_in_place(&img, &format!("cache={cache}"));
    }
}

#[test]
fn verify_finds_a_block_changed_behind_the_guest_s_back() {
    let dir = image_dir();
    let img = image(dir.path(), "disk.img", IMAGE_BYTES);
    let vm = disk_vm(&img, "", ",blocks=256", &["--memory", "64M"]);
    wait_disk_requests_above(&vm, 200, "before the damage");
    vm.cli_ok(&["pause"]);
    let d = assert_disk_verifies(&vm, "paused");
    let in_flight = d["in_flight_block"].as_u64();
    let &(victim, _, tag) = tagged_blocks(&img)
        .iter()
        .find(|t| Some(t.0) != in_flight)
        .unwrap_or_else(|| panic!("no written block to damage: {d}"));
    // The image's lock is advisory: the test writes past it, as a careless
    // user (or a lost write) would.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .expect("open the image");
        f.write_all_at(&[0u8; BLOCK], victim * BLOCK as u64)
            .expect("damage the block");
    }
    let (out, r) = verify(&vm);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["violation_count"], 1, "{r}");
    let problem = r["violations"][0]["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains(&format!("block {victim}:")) && problem.contains("lost on the disk"),
        "block {victim} (tag {tag}) zeroed: {r}"
    );
}

#[test]
fn a_read_only_disk_answers_the_guest_s_writes_with_ioerr_and_the_vm_runs_on() {
    let dir = image_dir();
    let img = image(dir.path(), "ro.img", IMAGE_BYTES);
    let vm = disk_vm(&img, ",readonly", "", &["--memory", "64M"]);
    let p = vm.wait_progress_above(100, PROGRESS_WAIT);
    let (out, r) = verify(&vm);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert_eq!(r["ok"], false, "{r}");
    let d = &r["disk"];
    assert_eq!(field(d, "writes"), 0, "{r}");
    assert_eq!(field(d, "blocks_written"), 0, "{r}");
    assert!(field(d, "io_errors") > 0, "{r}");
    assert!(field(d, "reads") > 0, "reads of a read-only disk work: {r}");
    assert_eq!(field(d, "guest_errors"), 0, "{r}");
    let problems: Vec<&str> = r["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .filter_map(|v| v["problem"].as_str())
        .collect();
    assert!(
        problems.len() == 1
            && problems[0].contains("a write of block")
            && problems[0].contains("IOERR"),
        "{r}"
    );
    assert!(
        out.stderr.contains("verify found 1 violation"),
        "{}",
        out.describe()
    );
    assert_eq!(vm.state(), "running");
    vm.wait_progress_above(p, PROGRESS_WAIT);
    assert!(
        tagged_blocks(&img).is_empty(),
        "a block reached the read-only image"
    );
    assert_eq!(
        std::fs::metadata(&img).expect("the image").len(),
        IMAGE_BYTES
    );
}

#[test]
fn a_missing_image_is_bad_usage_and_a_locked_one_fails_naming_the_file() {
    let dir = image_dir();
    let socket = dir.path().join("refused.sock");
    let run = |disk: &str, guest: &str| {
        vmhop_expecting_exit(
            &[
                "run",
                "--api-socket",
                path_str(&socket),
                "--memory",
                "64M",
                "--guest",
                guest,
                "--disk",
                disk,
            ],
            &socket,
        )
    };
    let missing = dir.path().join("nonexistent.img");
    let out = run(&format!("path={}", path_str(&missing)), "builtin:disk");
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert_one_line_error(&out, "a missing image");
    assert!(
        out.stderr.contains(path_str(&missing)),
        "{}",
        out.describe()
    );

    let img = image(dir.path(), "disk.img", IMAGE_BYTES);
    let vm = disk_vm(&img, "", "", &["--memory", "64M"]);
    vm.wait_progress_above(0, PROGRESS_WAIT);
    for guest in ["builtin:disk", "builtin:idle"] {
        let out = run(&format!("path={}", path_str(&img)), guest);
        assert_eq!(out.code, Some(1), "{}", out.describe());
        assert_one_line_error(&out, "a locked image");
        assert!(
            out.stderr.contains(path_str(&img)) && out.stderr.contains("locked"),
            "{}",
            out.describe()
        );
    }
    // The first VM never noticed.
    assert_disk_verifies(&vm, "after the refused second VMs");

    let out = vmhop_expecting_exit(
        &[
            "run",
            "--api-socket",
            path_str(&socket),
            "--memory",
            "64M",
            "--guest",
            "builtin:disk",
        ],
        &socket,
    );
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("--disk"), "{}", out.describe());
}

/// Moves every guest node of a two-node disk guest, writing its disk as
/// fast as it can, to host node 0 in each mode, and whole guest node 0
/// alone: the disk and memory verify after each, and the disk guest goes
/// on (its device writes the used ring and read data into the memory the
/// move switched in).
#[test]
fn numa_moves_in_every_mode_keep_what_the_device_wrote() {
    let dir = image_dir();
    let img = image(dir.path(), "disk.img", IMAGE_BYTES);
    // Few blocks: the read-backs find written blocks, so the read slots
    // (memory only the device writes) hold data verify checks.
    let vm = disk_vm(
        &img,
        "",
        ",blocks=64",
        &[
            "--vcpus",
            "2",
            "--numa",
            "guest-node=0,size=64M,host-node=0",
            "--numa",
            "guest-node=1,size=64M,host-node=0",
        ],
    );
    let mut requests = field(
        &wait_disk_requests_above(&vm, 50, "before the moves"),
        "requests",
    );
    for (mode, guest_node) in [
        ("live", None),
        ("stop-copy", None),
        ("kernel", None),
        ("live", Some("0")),
        ("stop-copy", Some("0")),
        ("kernel", Some("0")),
    ] {
        let when = format!("{mode} move of guest node {}", guest_node.unwrap_or("all"));
        let mut args = vec!["numa-migrate", "--to-node", "0", "--mode", mode, "--json"];
        if let Some(g) = guest_node {
            args.extend_from_slice(&["--guest-node", g]);
        }
        let out = vm.cli_ok(&args);
        let report = one_json_object(&out.stdout);
        assert_eq!(report["mode"], mode, "{when}: {report}");
        // Every mode moves the pages (the copy modes into new memory that
        // mremap puts at the old address): the disk area too, where the
        // device writes used entries and read data.
        assert!(field(&report, "pages_moved") > 0, "{when}: {report}");
        let d = assert_disk_verifies(&vm, &format!("right after the {when}"));
        assert!(field(&d, "requests") >= requests, "{when}: {d}");
        assert!(field(&d, "slots_checked") > 0, "{when}: {d}");
        requests = field(
            &wait_disk_requests_above(&vm, field(&d, "requests"), &format!("after the {when}")),
            "requests",
        );
    }
    assert_eq!(vm.state(), "running");
    let (_, r) = verify(&vm);
    assert!(field(&r, "pages_checked") > 0, "{r}");
}

/// A destination waiting on a Unix socket (with `dst_args` besides) and a
/// disk guest on a fresh image that has done some requests: the directory,
/// the image, the destination's address, both VMs and the requests done.
fn shared_storage_pair(dst_args: &[&str]) -> (tempfile::TempDir, PathBuf, String, Vm, Vm, u64) {
    let dir = image_dir();
    let img = image(dir.path(), "shared.img", IMAGE_BYTES);
    let addr = format!("unix:{}", path_str(&dir.path().join("m.sock")));
    let mut args = vec!["--incoming", addr.as_str()];
    args.extend_from_slice(dst_args);
    let dst = Vm::start(&args);
    let src = disk_vm(&img, "", ",blocks=64", &["--vcpus", "2", "--memory", "64M"]);
    let before = field(
        &wait_disk_requests_above(&src, 50, "before the migration"),
        "requests",
    );
    (dir, img, addr, dst, src, before)
}

/// Some VM holds `img`'s lock: a third one on it is refused, saying so.
fn assert_image_held(dir: &Path, img: &Path) {
    let socket = dir.join("third.sock");
    let disk = format!("path={}", path_str(img));
    let third = vmhop_expecting_exit(
        &[
            "run",
            "--guest",
            "builtin:disk",
            "--disk",
            &disk,
            "--api-socket",
            path_str(&socket),
        ],
        &socket,
    );
    assert_eq!(third.code, Some(1), "{}", third.describe());
    assert!(third.stderr.contains("locked"), "{}", third.describe());
}

/// A migration to a destination on this host, which opens the same image
/// path (shared storage): the source flushes and releases the image's lock
/// at the switch, the destination takes it and runs the guest on, its disk
/// and memory consistent, and the source process ends.
#[test]
fn a_migration_on_shared_storage_hands_the_image_to_the_destination() {
    let (dir, img, addr, dst, mut src, before) = shared_storage_pair(&[]);
    let out = src.cli(&["migrate", "--to", &addr, "--json"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.describe(), dst.logs());
    assert!(src.wait_exit().success(), "{}", src.logs());
    assert_eq!(dst.state(), "running", "{}", dst.logs());
    let d = wait_disk_requests_above(&dst, before, "on the destination");
    assert!(field(&d, "requests") > before, "{d}");
    let d = assert_disk_verifies(&dst, "on the destination");
    assert!(field(&d, "slots_checked") > 0, "{d}");
    // The destination holds the image now.
    assert_image_held(dir.path(), &img);
}

/// A destination that refuses the VM after the source let go of its image
/// (here: after it built the VM, its disk opened and locked, by the test
/// hook `incoming-refuse-arrival`, as a destination failing at its last
/// step would): the source takes its lock back before its guest runs on —
/// a third VM on the image is refused — with memory and disk consistent,
/// and the destination keeps waiting for a source.
#[test]
fn a_migration_refused_after_the_hand_over_gives_the_source_its_image_back() {
    let (dir, img, addr, dst, src, before) =
        shared_storage_pair(&["--test-hook", "incoming-refuse-arrival"]);
    let out = src.cli(&["migrate", "--to", &addr, "--json"]);
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert_one_line_error(&out, "a migration refused by the destination");
    assert!(
        out.stderr.contains("incoming-refuse-arrival"),
        "refused before the hand-over: {}",
        out.describe()
    );
    assert_eq!(src.state(), "running", "{}", src.logs());
    wait_disk_requests_above(&src, before, "after the refused migration");
    let d = assert_disk_verifies(&src, "after the refused migration");
    assert!(field(&d, "slots_checked") > 0, "{d}");
    assert_eq!(dst.status()["state"], "incoming", "{}", dst.logs());
    assert_image_held(dir.path(), &img);
    assert_blocks_in_place(&img, "after the refused migration");
}

/// `migrate --copy-storage` to a destination without shared storage, while
/// the guest writes its disk: every block goes with the memory, then the
/// blocks written meanwhile, into the new file the destination's `--disk
/// id=disk0,path=FILE` names. The guest runs on there with memory and disk
/// agreeing on every block; the destination holds the copy's lock, and the
/// source's image has every block it wrote in place.
#[test]
fn a_migration_with_copy_storage_moves_a_disk_being_written_into_a_new_file() {
    let there = image_dir();
    let copy = there.path().join("copy.img");
    let place = format!("id=disk0,path={}", path_str(&copy));
    let (dir, img, addr, dst, mut src, before) = shared_storage_pair(&["--disk", &place]);
    let out = src.cli(&["migrate", "--to", &addr, "--copy-storage", "--json"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.describe(), dst.logs());
    let r = one_json_object(&out.stdout);
    assert!(
        field(&r, "disk_blocks_sent") >= IMAGE_BYTES / BLOCK as u64,
        "every block crosses: {r}"
    );
    assert!(src.wait_exit().success(), "{}", src.logs());
    assert_eq!(dst.state(), "running", "{}", dst.logs());
    assert_eq!(dst.status()["disks"][0]["path"], path_str(&copy));
    let d = wait_disk_requests_above(&dst, before, "on the destination");
    assert!(field(&d, "requests") > before, "{d}");
    assert_disk_verifies(&dst, "on the destination");
    assert_image_held(there.path(), &copy);
    assert_blocks_in_place(&img, "the source's image after the migration");
    drop(dir);
}

/// A destination that cannot take the disks refuses before the switch,
/// saying why, and leaves nothing behind: no `--disk` for the disk, or a
/// file that exists (never overwritten). The source runs on with its disk.
#[test]
fn copy_storage_refused_by_the_destination_leaves_the_source_running_and_no_file() {
    let there = image_dir();
    let existing = there.path().join("mine.img");
    std::fs::write(&existing, b"not yours").expect("write a file");
    let place = format!("id=disk0,path={}", path_str(&existing));
    let (_dir, _img, addr, dst, src, before) = shared_storage_pair(&[]);
    let other = format!("unix:{}", path_str(&there.path().join("m2.sock")));
    let dst2 = Vm::start(&["--incoming", &other, "--disk", &place]);
    for (to, why, dst) in [
        (&addr, "--disk id=disk0,path=NEW", &dst),
        (&other, "already exists", &dst2),
    ] {
        let out = src.cli(&["migrate", "--to", to, "--copy-storage"]);
        assert_ne!(out.code, Some(0), "{}", out.describe());
        assert_one_line_error(&out, "a copy-storage migration refused");
        assert!(out.stderr.contains(why), "{why}: {}", out.describe());
        assert_eq!(src.state(), "running", "{}", src.logs());
        assert_eq!(dst.status()["state"], "incoming", "{}", dst.logs());
    }
    assert_eq!(std::fs::read(&existing).expect("read"), b"not yours");
    assert_eq!(
        std::fs::read_dir(there.path()).expect("list").count(),
        2,
        "only the existing file and the socket"
    );
    wait_disk_requests_above(&src, before, "after the refusals");
    assert_disk_verifies(&src, "after the refusals");
}

/// The CPUs thread `tid` of `pid` may run on, and its name, from /proc.
fn task_cpus(pid: u32, tid: i64) -> (String, Vec<u32>) {
    let dir = format!("/proc/{pid}/task/{tid}");
    let comm = std::fs::read_to_string(format!("{dir}/comm"))
        .unwrap_or_else(|e| panic!("reading {dir}/comm: {e}"));
    let status = std::fs::read_to_string(format!("{dir}/status"))
        .unwrap_or_else(|e| panic!("reading {dir}/status: {e}"));
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_else(|| panic!("{dir}/status has no Cpus_allowed_list"));
    (comm.trim().to_string(), common::parse_cpu_list(list))
}

/// Host node 0's CPUs, from sysfs.
fn node0_cpus() -> Vec<u32> {
    let list = std::fs::read_to_string("/sys/devices/system/node/node0/cpulist")
        .expect("read node 0's cpulist");
    common::parse_cpu_list(&list)
}

/// `numa-stat --json`'s device threads, each checked against /proc (its
/// name, and the CPUs the report gives are the kernel's), with the CPUs.
fn device_threads(vm: &Vm, when: &str) -> Vec<(String, i64, Vec<u32>)> {
    let stat = one_json_object(&vm.cli_ok(&["numa-stat", "--json"]).stdout);
    let threads = stat["device_threads"]
        .as_array()
        .unwrap_or_else(|| panic!("{when}: numa-stat lists no device_threads: {stat}"));
    let text = vm.cli_ok(&["numa-stat"]).stdout;
    threads
        .iter()
        .map(|t| {
            let tid = t["tid"].as_i64().expect("a tid");
            let (comm, cpus) = task_cpus(vm.pid(), tid);
            assert_eq!(t["name"], comm.as_str(), "{when}: {t}");
            assert_eq!(t["guest_node"], 0, "{when}: {t}");
            let listed = common::parse_cpu_list(t["allowed_cpus"].as_str().expect("cpus"));
            assert_eq!(listed, cpus, "{when}: numa-stat and /proc disagree: {t}");
            assert!(
                text.contains(&format!("tid {tid}, guest node 0): CPUs")),
                "{when}: the text report lacks thread {tid}:\n{text}"
            );
            (
                t["device"].as_str().expect("a device").to_string(),
                tid,
                cpus,
            )
        })
        .collect()
}

/// The one worker of disk `disk0`, on host node 0's CPUs; panics otherwise.
fn assert_disk_worker_on_node0(vm: &Vm, when: &str) -> i64 {
    let threads = device_threads(vm, when);
    let [(device, tid, cpus)] = threads.as_slice() else {
        panic!("{when}: one device thread expected: {threads:?}");
    };
    assert!(device.contains("disk0"), "{when}: {threads:?}");
    assert_eq!(
        *cpus,
        node0_cpus(),
        "{when}: the worker is not on node 0's CPUs"
    );
    *tid
}

/// Device workers follow their guest node (0) onto its host node's CPUs —
/// on boot, after a NUMA move, after a restore and on a migration's
/// destination — and `numa-stat` lists them as /proc sees them. Each vmhop
/// runs under `taskset -c FIRST`, so a worker that was not pinned would
/// show the one CPU it inherited (node 0 has every CPU of this host).
#[test]
fn device_workers_run_on_their_guest_node_s_cpus_through_moves_restores_and_migrations() {
    let node0 = node0_cpus();
    assert!(
        node0.len() >= 2,
        "node 0 needs two CPUs to tell pinned from inherited: {node0:?}"
    );
    let first = node0[0].to_string();
    let narrow = ["taskset", "-c", first.as_str()];
    let dir = image_dir();
    let img = image(dir.path(), "pin.img", IMAGE_BYTES);
    let disk = format!("path={}", path_str(&img));
    let base = [
        "--guest",
        "builtin:disk,blocks=64",
        "--disk",
        disk.as_str(),
        "--memory",
        "64M",
    ];
    let vm = Vm::start_wrapped(&narrow, &["run"], &base, &[]);
    wait_disk_requests_above(&vm, 20, "after boot");
    // The process's own main thread kept the one CPU it was started on.
    assert_eq!(task_cpus(vm.pid(), vm.pid() as i64).1, vec![node0[0]]);
    let tid = assert_disk_worker_on_node0(&vm, "after boot");

    // Narrowed behind vmhop's back, a move of its guest node re-pins it.
    let out = std::process::Command::new("taskset")
        .args(["-p", "-c", &first, &tid.to_string()])
        .output()
        .expect("run taskset");
    assert!(out.status.success(), "taskset -p: {out:?}");
    assert_eq!(task_cpus(vm.pid(), tid).1, vec![node0[0]]);
    for mode in ["kernel", "stop-copy"] {
        vm.cli_ok(&["numa-migrate", "--to-node", "0", "--mode", mode]);
        let after = assert_disk_worker_on_node0(&vm, &format!("after a {mode} move"));
        assert_eq!(after, tid, "the same worker serves on");
    }

    // Migrated (shared storage) to a narrowed destination.
    let addr = format!("unix:{}", path_str(&dir.path().join("m.sock")));
    let dst = Vm::start_wrapped(&narrow, &["run"], &["--incoming", addr.as_str()], &[]);
    let mut src = vm;
    let before = field(
        &assert_disk_verifies(&src, "before the migration"),
        "requests",
    );
    let out = src.cli(&["migrate", "--to", &addr, "--json"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.describe(), dst.logs());
    assert!(src.wait_exit().success(), "{}", src.logs());
    wait_disk_requests_above(&dst, before, "on the destination");
    assert_disk_worker_on_node0(&dst, "on the destination");

    // A checkpoint, restored by a narrowed process: its worker (started
    // before the VM knew its CPUs) is pinned too.
    let ck = dir.path().join("ck");
    dst.cli_ok(&["checkpoint", "--dir", path_str(&ck), "--json"]);
    dst.cli_ok(&["stop"]);
    let target = format!("{}@1", path_str(&ck));
    let restored = Vm::start_wrapped(&narrow, &["restore", &target], &[], &[]);
    let before = field(
        &assert_disk_verifies(&restored, "after the restore"),
        "requests",
    );
    wait_disk_requests_above(&restored, before, "after the restore");
    assert_disk_worker_on_node0(&restored, "after the restore");
}

/// The benchmark modes run and verify: `rand-read-qd32` and `seq-read`
/// complete reads and write nothing; `seq-write` writes whole 1 MiB
/// requests (every block of a pass tagged, as `verify` and the test's own
/// reading of the image find), and a block of it changed behind the
/// guest's back fails `verify`, as in the mixed mode.
#[test]
fn the_benchmark_modes_run_and_verify_and_seq_write_s_blocks_are_checked() {
    let dir = image_dir();
    let img = image(dir.path(), "modes.img", IMAGE_BYTES);
    for mode in ["rand-read-qd32", "seq-read"] {
        let vm = disk_vm(&img, "", &format!(",mode={mode}"), &["--memory", "64M"]);
        let d = wait_disk_requests_above(&vm, 64, mode);
        assert_eq!(field(&d, "writes"), 0, "{mode}: {d}");
        assert!(field(&d, "reads") > 64, "{mode}: {d}");
        vm.cli_ok(&["stop"]);
    }
    assert!(
        tagged_blocks(&img).is_empty(),
        "a read mode wrote the image"
    );
    let blocks = IMAGE_BYTES / BLOCK as u64;
    // Two passes over the image: every block written at least once.
    let vm = disk_vm(&img, "", ",mode=seq-write", &["--memory", "64M"]);
    let d = wait_disk_requests_above(&vm, 2 * blocks / 256, "seq-write");
    assert_eq!(field(&d, "reads"), 0, "{d}");
    vm.cli_ok(&["pause"]);
    let d = assert_disk_verifies(&vm, "seq-write, paused");
    assert_eq!(field(&d, "blocks_written"), blocks, "{d}");
    // It negotiated FLUSH and flushed after each whole pass.
    assert!(field(&d, "flushes") >= 1, "{d}");
    assert!(
        field(&d, "flushes") <= field(&d, "writes") / (blocks / 256),
        "one FLUSH a pass at most: {d}"
    );
    let tagged = tagged_blocks(&img);
    assert_eq!(
        tagged.len() as u64,
        blocks,
        "blocks in the image with this run's tag"
    );
    // One request's 256 blocks share its tag.
    let tag_of = |b: u64| tagged.iter().find(|t| t.0 == b).map(|t| t.2);
    assert_eq!(tag_of(256), tag_of(511));
    assert_ne!(tag_of(255), tag_of(256));
    let in_flight = d["in_flight_block"].as_u64();
    let victim = if in_flight == Some(0) { 256 } else { 0 };
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .expect("open the image");
        f.write_all_at(&[0u8; BLOCK], (victim + 7) * BLOCK as u64)
            .expect("damage the block");
    }
    let (out, r) = verify(&vm);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert_eq!(r["violation_count"], 1, "{r}");
    let problem = r["violations"][0]["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains(&format!("block {}:", victim + 7)) && problem.contains("lost on the disk"),
        "{r}"
    );
}
