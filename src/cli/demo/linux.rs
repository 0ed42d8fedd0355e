//! `vmhop demo --kernel K [--initrd I] [--cmdline S]`: the same job on a
//! Linux guest, for hosts with hardware-assisted KVM. Like the builtin-guest
//! demo it starts real `vmhop run`/`restore` children and drives them
//! through the API: boot on the host's NUMA nodes, a full and an
//! incremental checkpoint, a lazy restore of the incremental one, a live
//! NUMA move, stop. The guest's own console is the proof that it lives:
//! without `--initrd` the demo packs a small initramfs from the host's
//! static busybox whose checker prints a heartbeat with its memory checks
//! (tests/numabox/linux/guest-init.sh), and every step waits for new beats.
//!
//! On a paravirtualised KVM that emulates guest kernel code (PVM), it says
//! so at once and names the NUMA-box command instead of waiting for a boot
//! that would take hours.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{check, checkpoint, DemoError, Out, VmProcess, WorkDir, LONG, QUICK};
use crate::api::checkpoint::CheckpointKind as Kind;
use crate::api::numa::{Mode, NumaMigrateReport, NumaMigrateRequest, NumaStatReport};
use crate::cli::{CliError, CliResult};

/// The guest's checker, shared with the NUMA-box tests.
const GUEST_INIT: &str = include_str!("../../../tests/numabox/linux/guest-init.sh");
/// Where the host's static busybox lives (Debian's busybox-static).
const BUSYBOX: &str = "/bin/busybox";
/// Steps of the Linux demo, for the `[n/5]` headers.
const STEPS: u32 = 5;
/// How long a boot may take to print its first heartbeat (or, with a
/// user's initramfs, anything at all).
const BOOT_WAIT: Duration = Duration::from_secs(180);
/// How long each later step waits for the console to move on.
const ALIVE_WAIT: Duration = Duration::from_secs(60);
/// Memory of each guest node.
const NODE_MEMORY: &str = "256M";
/// The heartbeat line of the demo's checker.
const BEAT: &str = "vmhop-check: beat ";

/// What the user asked for.
pub struct LinuxPlan {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs (None: the demo packs its own).
    pub initrd: Option<PathBuf>,
    /// The command line (None: the demo's).
    pub cmdline: Option<String>,
}

/// Runs the Linux demo.
pub fn demo(plan: LinuxPlan, keep_dir: bool, json: bool) -> CliResult {
    let exe = std::env::current_exe().map_err(|e| CliError::failed(DemoError::Exe(e)))?;
    super::interrupt::install();
    let work = WorkDir::create(keep_dir).map_err(CliError::failed)?;
    let mut d = LinuxDemo {
        exe,
        out: Out { json },
        record: serde_json::Map::new(),
        ours: plan.initrd.is_none(),
        plan,
        work,
    };
    let r = d.run();
    let removed = d.work.remove();
    match r {
        Ok(()) => {
            if json {
                d.record.insert("operation".into(), json!("demo"));
                d.record.insert("guest".into(), json!("linux"));
                d.record.insert("ok".into(), json!(true));
                return super::super::output::print_json(&Value::Object(std::mem::take(
                    &mut d.record,
                )));
            }
            if let Err(e) = removed {
                d.out.line(format!("warning: {e}"));
            }
            Ok(())
        }
        Err(e) => Err(CliError::failed(format!(
            "demo failed: {e}\n  (rerun with --keep-dir to keep the consoles and VM logs)"
        ))),
    }
}

struct LinuxDemo {
    exe: PathBuf,
    plan: LinuxPlan,
    out: Out,
    record: serde_json::Map<String, Value>,
    /// The initramfs is the demo's own, whose checker beats.
    ours: bool,
    work: WorkDir,
}

impl LinuxDemo {
    fn run(&mut self) -> Result<(), DemoError> {
        let initrd = match &self.plan.initrd {
            Some(i) => i.clone(),
            None => self.pack_initrd()?,
        };
        let topo = super::read_topology(&self.exe)?;
        let mut nodes: Vec<u32> = topo
            .nodes
            .iter()
            .filter(|n| n.total_bytes > 0)
            .map(|n| n.id)
            .collect();
        nodes.truncate(2);
        let cmdline = self.plan.cmdline.clone().unwrap_or_else(|| {
            "console=ttyS0 reboot=k quiet vmhop.files=4 vmhop.file_mb=8".to_string()
        });
        self.out.raw(&format!(
            "vmhop demo: Linux {} on 2 vCPUs and {} guest NUMA node(s) of {NODE_MEMORY} (host node(s) {:?}), driven\n\
             through its HTTP API exactly as the vmhop CLI would (work dir {})",
            self.plan.kernel.display(),
            nodes.len(),
            nodes,
            self.work.path.display()
        ));

        // 1: boot.
        self.out.step_of(1, STEPS, "boot the kernel");
        let console = self.work.path.join("console.txt");
        let sock = self.work.path.join("lx.sock");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--name".into(),
            "demo-linux".into(),
            "--api-socket".into(),
            sock.display().to_string(),
            "--vcpus".into(),
            "2".into(),
        ];
        for (g, h) in nodes.iter().enumerate() {
            args.push("--numa".into());
            args.push(format!(
                "guest-node={g},size={NODE_MEMORY},host-node={h},cpus={}",
                if nodes.len() == 1 {
                    "0-1".to_string()
                } else {
                    g.to_string()
                }
            ));
        }
        args.extend([
            "--kernel".into(),
            self.plan.kernel.display().to_string(),
            "--initrd".into(),
            initrd.display().to_string(),
            "--cmdline".into(),
            cmdline,
            "--console".into(),
            console.display().to_string(),
            "--json".into(),
        ]);
        let mut vm = VmProcess::spawn(
            &self.exe,
            "run --kernel",
            &args,
            sock,
            self.work.path.join("run.log"),
        )?;
        let t = Instant::now();
        let first = self.wait_console("boot", &console, 0, BOOT_WAIT)?;
        self.out.line(format!(
            "the guest wrote to its console after {:.1} s",
            t.elapsed().as_secs_f64()
        ));
        for l in fs::read_to_string(&console)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("vmhop-guest: "))
        {
            self.out.line(format!("guest: {l}"));
        }
        self.record
            .insert("boot_s".into(), json!(t.elapsed().as_secs_f64()));

        // 2: checkpoints.
        self.out.step_of(
            2,
            STEPS,
            "checkpoint the running guest: full, then incremental",
        );
        let dir = self.work.path.join("checkpoints");
        let mut reports = Vec::new();
        let mut mark = first;
        for full in [true, false] {
            let r = checkpoint(&mut vm, "checkpoint", &dir, full)?;
            let want = if full { Kind::Full } else { Kind::Incremental };
            if r.kind != want {
                return Err(check(
                    "checkpoint",
                    format!("expected a {want:?} checkpoint, got {:?}", r.kind),
                ));
            }
            self.out.line(format!(
                "checkpoint {} ({:?}): {} pages written, guest paused {} µs, {:.0} ms in all",
                r.id, r.kind, r.pages_written, r.downtime_us, r.total_ms
            ));
            mark = self.wait_console("checkpoint", &console, mark, ALIVE_WAIT)?;
            reports.push(r);
        }
        self.record.insert("checkpoints".into(), json!(reports.iter().map(|r| json!({"id": r.id, "downtime_us": r.downtime_us, "pages_written": r.pages_written})).collect::<Vec<_>>()));
        let last_id = reports.last().map(|r| r.id).unwrap_or(0);
        vm.stop("stop the original VM")?;

        // 3: lazy restore.
        self.out.step_of(
            3,
            STEPS,
            "restore the incremental checkpoint lazily as a new VM",
        );
        let console2 = self.work.path.join("restored-console.txt");
        let sock2 = self.work.path.join("restored.sock");
        let target = format!("{}@{last_id}", dir.display());
        let args2: Vec<String> = vec![
            "restore".into(),
            target,
            "--name".into(),
            "demo-linux-restored".into(),
            "--api-socket".into(),
            sock2.display().to_string(),
            "--console".into(),
            console2.display().to_string(),
            "--json".into(),
        ];
        let mut restored = VmProcess::spawn(
            &self.exe,
            "restore",
            &args2,
            sock2,
            self.work.path.join("restore.log"),
        )?;
        let resume_ms = restored.start["restore"]["resume_ms"]
            .as_f64()
            .unwrap_or(f64::NAN);
        self.out.line(format!(
            "vCPUs running again {resume_ms:.1} ms after the restore began"
        ));
        let mark2 = self.wait_console("restore", &console2, 0, ALIVE_WAIT)?;
        if let Some(l) = last_line(&console2, BEAT) {
            self.out.line(format!("guest (restored): {l}"));
        }
        self.record
            .insert("restore_resume_ms".into(), json!(resume_ms));

        // 4: NUMA move.
        let to = *nodes.last().unwrap_or(&0);
        self.out.step_of(
            4,
            STEPS,
            &format!("move guest node 0 to host node {to}, live"),
        );
        let req = NumaMigrateRequest {
            to_node: to,
            guest_node: Some(0),
            mode: Mode::Live,
            max_downtime_ms: None,
        };
        let body = serde_json::to_value(&req).map_err(|e| check("numa-migrate", e.to_string()))?;
        let (m, _): (NumaMigrateReport, _) =
            restored.call_when_free("numa-migrate", "PUT", "vm.numa-migrate", Some(body), LONG)?;
        self.out.line(format!(
            "moved {} pages in {:.0} ms, longest pause {} µs; placement now {:?}",
            m.pages_moved, m.total_ms, m.downtime_us, m.placement_after
        ));
        let stat: NumaStatReport =
            restored.call("numa-stat", "GET", "vm.numa-stat", None, QUICK)?;
        let on: u64 = stat
            .guest_nodes
            .first()
            .map(|g| g.host_nodes.get(&to.to_string()).copied().unwrap_or(0))
            .unwrap_or(0);
        self.out.line(format!(
            "numa-stat: guest node 0 has {on} pages on host node {to}"
        ));
        self.wait_console("after the move", &console2, mark2, ALIVE_WAIT)?;
        if let Some(l) = last_line(&console2, BEAT) {
            self.out.line(format!("guest (moved): {l}"));
        }
        self.record
            .insert("numa_move_downtime_us".into(), json!(m.downtime_us));

        // 5: stop.
        self.out.step_of(5, STEPS, "stop");
        restored.stop("stop the restored VM")?;
        self.out.line("done: the guest booted, was checkpointed twice, restored lazily and moved live, its checks passing throughout");
        Ok(())
    }

    /// Waits until `path` grows past `from` bytes (with the demo's own
    /// initramfs: until a new heartbeat, and fails on a failed check);
    /// returns the new length.
    fn wait_console(
        &self,
        step: &str,
        path: &Path,
        from: usize,
        limit: Duration,
    ) -> Result<usize, DemoError> {
        let deadline = Instant::now() + limit;
        loop {
            let text = fs::read_to_string(path).unwrap_or_default();
            if let Some(bad) = text
                .lines()
                .find(|l| l.contains("vmhop-check: beat") && l.contains("FAIL"))
            {
                return Err(check(
                    step,
                    format!("the guest's memory check failed: {bad}"),
                ));
            }
            let new = text.get(from..).unwrap_or("");
            let alive = if self.ours {
                new.contains(BEAT)
            } else {
                !new.is_empty()
            };
            if alive {
                return Ok(text.len());
            }
            if Instant::now() >= deadline {
                return Err(check(
                    step,
                    format!(
                        "the guest wrote nothing new to its console ({}) within {} s",
                        path.display(),
                        limit.as_secs()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Packs the demo's initramfs (newc cpio): the host's static busybox
    /// and the checker as /init.
    fn pack_initrd(&self) -> Result<PathBuf, DemoError> {
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
        let path = self.work.path.join("initrd.cpio");
        fs::write(&path, c.finish())
            .map_err(|e| check(step, format!("{}: {e}", path.display())))?;
        Ok(path)
    }
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

/// The last line of `path` that contains `needle`.
fn last_line(path: &Path, needle: &str) -> Option<String> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .rev()
        .find(|l| l.contains(needle))
        .map(str::to_string)
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
