//! Step 7 of the builtin demo: a disk through a checkpoint. A second VM
//! runs `builtin:disk` (a CPL3 virtio-blk driver writing tagged blocks and
//! reading them back) on a small raw image; a checkpoint refers to the
//! image instead of copying it; the guest writes on; the checkpoint
//! restored (paused) has its disk exactly as it was then: `verify` finds
//! every block holding what the restored guest's memory says it last wrote,
//! and none of the requests made after the checkpoint.

use super::super::checks::{self, check, verify, watch};
use super::super::report::DiskFound;
use super::{Demo, DemoError, Started, STEPS, WATCH};
use crate::api::run::Arrival;
use crate::api::vm::{DiskVerifyReport, VerifyReport};

/// Blocks of 4 KiB the disk guest writes (256 KiB), on a 1 MiB image.
const DISK_BLOCKS: u64 = 64;
const IMAGE_BYTES: u64 = 1 << 20;

fn disk_of(step: &str, v: &VerifyReport) -> Result<DiskVerifyReport, DemoError> {
    v.disk
        .clone()
        .ok_or_else(|| check(step, "verify reported nothing about the disk"))
}

impl Demo {
    /// Step 7.
    pub(super) fn disk(&mut self) -> Result<(), DemoError> {
        let dir = self.sup.dir().to_path_buf();
        let image = dir.join("disk.img");
        let guest = format!("builtin:disk,blocks={DISK_BLOCKS}");
        self.out.step(
            7,
            STEPS,
            &format!(
                "a disk through a checkpoint: vmhop run --guest {guest} --disk path={}",
                image.display()
            ),
        );
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(IMAGE_BYTES))
            .map_err(|e| check("create the disk image", format!("{}: {e}", image.display())))?;
        let socket = "disk.sock";
        let args = [
            "run".into(),
            "--name".into(),
            "demo-disk".into(),
            "--api-socket".into(),
            dir.join(socket).display().to_string(),
            // vCPU 0 drives the disk, vCPU 1 sweeps memory.
            "--vcpus".into(),
            "2".into(),
            "--memory".into(),
            "64M".into(),
            "--guest".into(),
            guest,
            "--disk".into(),
            format!("path={},id=data", image.display()),
            "--json".into(),
        ];
        let mut vm = self.sup.spawn("run", &args, socket, "disk.log")?;
        let _: Started = vm.start_report()?;
        let w = watch(&mut vm, "watch the disk guest", WATCH)?;
        w.require_growth("watch the disk guest")?;
        let ck_dir = dir.join("disk-checkpoints");
        let ck = checks::checkpoint(&mut vm, "checkpoint the disk guest", &ck_dir, None)?;
        self.out.line(format!(
            "checkpoint {} in {} µs of pause: {} disk blocks stored — the image is the \
             chain's base, referred to by path, size and checksum; the VM writes an overlay now",
            ck.id, ck.downtime_us, ck.disk_blocks
        ));
        let more = watch(&mut vm, "watch the disk guest write on", WATCH)?;
        more.require_growth("watch the disk guest write on")?;
        let (v, _) = verify(&mut vm, "verify the disk guest")?;
        let later = disk_of("verify the disk guest", &v)?;
        self.out.line(format!(
            "the guest wrote on: {} requests done, {} of {} blocks written; verify ok",
            later.requests, later.blocks_written, later.blocks
        ));
        vm.stop("stop the disk guest")?;

        let socket = "disk-restored.sock";
        let args = [
            "restore".into(),
            format!("{}@{}", ck_dir.display(), ck.id),
            "--name".into(),
            "demo-disk-restored".into(),
            "--api-socket".into(),
            dir.join(socket).display().to_string(),
            "--disk".into(),
            format!("id=data,path={}", dir.join("disk-restored.img").display()),
            "--paused".into(),
            "--json".into(),
        ];
        let mut r = self
            .sup
            .spawn("restore", &args, socket, "disk-restored.log")?;
        let started: Started = r.start_report()?;
        if !matches!(started.restore, Some(Arrival::Restored(_))) {
            return Err(check(
                "restore the disk guest",
                "its start report names no restore",
            ));
        }
        let step = "verify the restored disk guest";
        let (v, _) = verify(&mut r, step)?;
        let then = disk_of(step, &v)?;
        if then.requests >= later.requests {
            return Err(check(
                step,
                format!(
                    "the restored guest has {} requests done, not fewer than the {} done after the checkpoint",
                    then.requests, later.requests
                ),
            ));
        }
        self.out.line(format!(
            "restored (paused) into a new sparse file over the chain: the guest's memory says \
             {} requests done, and every one of the {} blocks on its disk holds what that \
             memory says — the {} requests made after the checkpoint are not there",
            then.requests,
            then.blocks_checked,
            later.requests - then.requests
        ));
        checks::set_state(
            &mut r,
            "resume the restored disk guest",
            crate::api::Endpoint::Resume,
            crate::api::vm::VmState::Running,
        )?;
        let w = watch(&mut r, "watch the restored disk guest", WATCH)?;
        w.require_growth("watch the restored disk guest")?;
        self.out.line("resumed: it writes on from there; stopped");
        r.stop("stop the restored disk guest")?;
        self.found.disk = Some(DiskFound {
            checkpoint: ck,
            after_checkpoint: later,
            restored: then,
        });
        Ok(())
    }
}
