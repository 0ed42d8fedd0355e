//! `vmhop demo` end to end through the real binary: every step runs on real
//! KVM and the demo exits 0, saying what it showed (verify ok, checkpoints,
//! restore, NUMA, the host migration and its downtime, a disk, vsock
//! through a move and a restore, resets); `--json` gives one
//! JSON object with every step's reports, the migration's included;
//! bad options are usage errors. The demo cleans up after itself: no child
//! VM and no work directory outlive it.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The vmhop binary cargo built for these tests.
const VMHOP: &str = env!("CARGO_BIN_EXE_vmhop");

/// Far above what the demo takes (~10–20 s in a debug build); only there so
/// a wedged demo fails the test instead of hanging the suite.
const DEMO_TIMEOUT: Duration = Duration::from_secs(300);

/// Result of a finished command.
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn describe(&self) -> String {
        format!(
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `vmhop args...`, bounded by `DEMO_TIMEOUT` (then SIGTERM, which the
/// demo answers by stopping its VMs, and the test fails).
fn vmhop(args: &[&str]) -> Output {
    let mut child = Command::new(VMHOP)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {VMHOP}: {e}"));
    let out = drain(child.stdout.take().expect("stdout is piped"));
    let err = drain(child.stderr.take().expect("stderr is piped"));
    let finished = wait_bounded(&mut child, DEMO_TIMEOUT);
    let o = Output {
        code: finished.and_then(|s| s.code()),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    };
    assert!(
        finished.is_some(),
        "vmhop {args:?} did not finish within {DEMO_TIMEOUT:?}\n{}",
        o.describe()
    );
    o
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    let mut termed = false;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return if termed { None } else { Some(s) },
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Ok(None) if !termed => {
                // SAFETY: kill() only sends a signal to our own unreaped child.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                termed = true;
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The work directory the demo announced (text: "work dir P removed";
/// JSON: "work_dir").
fn work_dir_from_text(stdout: &str) -> Option<PathBuf> {
    let line = stdout
        .lines()
        .find(|l| l.contains("work dir ") && l.ends_with(" removed"))?;
    let p = line
        .trim()
        .strip_prefix("work dir ")?
        .strip_suffix(" removed")?;
    Some(PathBuf::from(p))
}

/// Whether a vmhop process whose command line mentions `dir` still runs.
fn vm_running_in(dir: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(dir))
            .unwrap_or(false)
    })
}

#[test]
fn demo_runs_every_step_exits_zero_and_cleans_up() {
    let o = vmhop(&["demo"]);
    assert_eq!(o.code, Some(0), "demo failed\n{}", o.describe());
    assert!(
        !o.stderr.contains("panicked"),
        "demo panicked\n{}",
        o.describe()
    );
    let text = o.stdout.to_lowercase();
    for needle in [
        "verify ok",
        "checkpoint",
        "incremental",
        "restore",
        "numa",
        "migrat",
        "summary",
    ] {
        assert!(
            text.contains(needle),
            "demo output does not mention {needle:?}\n{}",
            o.describe()
        );
    }
    for step in 1..=10 {
        assert!(
            text.contains(&format!("[{step}/10]")),
            "step {step} missing\n{}",
            o.describe()
        );
    }
    // The migration step names its downtime, and the source's clean exit.
    let migration = o
        .stdout
        .split("[6/10]")
        .nth(1)
        .and_then(|rest| rest.split("[7/10]").next())
        .unwrap_or_else(|| panic!("no migration step\n{}", o.describe()));
    assert!(
        migration.contains("--incoming unix:")
            && migration
                .lines()
                .any(|l| l.contains("downtime ") && l.contains(" µs"))
            && migration.contains("source process exited 0")
            && migration.contains("verify ok"),
        "the migration step does not show its report\n{}",
        o.describe()
    );
    // The disk step: the checkpoint refers to the image, the restored disk
    // is as it was then (verify on the restored guest, fewer requests).
    let disk = o
        .stdout
        .split("[7/10]")
        .nth(1)
        .and_then(|rest| rest.split("[8/10]").next())
        .unwrap_or_else(|| panic!("no disk step\n{}", o.describe()));
    assert!(
        disk.contains("0 disk blocks stored")
            && disk.contains("verify ok")
            && disk.contains("after the checkpoint are not there"),
        "the disk step does not show its checks\n{}",
        o.describe()
    );
    // The vsock step: a host program's connection echoes through a move
    // and a checkpoint, the restore resets its guest's transport and
    // takes a new connection, the stopped VM's connection reads EOF.
    let vsock = o
        .stdout
        .split("[8/10]")
        .nth(1)
        .and_then(|rest| rest.split("[9/10]").next())
        .unwrap_or_else(|| panic!("no vsock step\n{}", o.describe()));
    for needle in [
        "builtin:vsock",
        "sent CONNECT 1234: answered 'OK ",
        "NUMA move (stop-copy",
        "the same connection echoes",
        "TRANSPORT_RESET",
        "a new connection echoes",
        "reads end of file",
    ] {
        assert!(
            vsock.contains(needle),
            "the vsock step does not say {needle:?}\n{}",
            o.describe()
        );
    }
    // The reset step: a thousand guest-driven resets, the rate, each
    // checked by the guest, and verify at the end.
    let resets = o
        .stdout
        .split("[9/10]")
        .nth(1)
        .and_then(|rest| rest.split("[10/10]").next())
        .unwrap_or_else(|| panic!("no reset step\n{}", o.describe()));
    assert!(
        resets.contains("builtin:reset")
            && resets
                .lines()
                .any(|l| l.contains(" resets in ") && l.contains(" resets/s"))
            && resets.contains("every reset verified"),
        "the reset step does not show its rate and checks\n{}",
        o.describe()
    );
    let dir = work_dir_from_text(&o.stdout)
        .unwrap_or_else(|| panic!("no 'work dir ... removed' line\n{}", o.describe()));
    assert!(
        !dir.exists(),
        "the demo left its work dir {}",
        dir.display()
    );
    assert!(
        !vm_running_in(&dir.display().to_string()),
        "a VM started by the demo is still running"
    );
}

#[test]
fn demo_json_prints_one_object_with_every_step() {
    let o = vmhop(&["demo", "--json", "--memory", "128M"]);
    assert_eq!(o.code, Some(0), "demo --json failed\n{}", o.describe());
    let mut values = serde_json::Deserializer::from_str(&o.stdout).into_iter::<Value>();
    let v = values
        .next()
        .unwrap_or_else(|| panic!("no JSON on stdout\n{}", o.describe()))
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{}", o.describe()));
    assert!(
        values.next().is_none(),
        "more than one JSON value\n{}",
        o.describe()
    );
    assert_eq!(v["operation"], "demo", "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["pause"]["verify"]["ok"], true, "{v}");
    assert_eq!(v["checkpoints"]["full"]["kind"], "full", "{v}");
    assert_eq!(
        v["checkpoints"]["incremental"]["kind"], "incremental",
        "{v}"
    );
    assert_eq!(
        v["checkpoints"]["incremental"]["parent"], v["checkpoints"]["full"]["id"],
        "{v}"
    );
    assert!(
        v["checkpoints"]["list"]["checkpoints"]
            .as_array()
            .is_some_and(|a| a.len() == 2),
        "{v}"
    );
    assert_eq!(v["restore"]["verify"]["ok"], true, "{v}");
    // The disk step: the restored disk is the checkpoint's, with fewer
    // requests done than the VM had done after it.
    let (then, later) = (
        v["disk"]["restored"]["requests"].as_u64(),
        v["disk"]["after_checkpoint"]["requests"].as_u64(),
    );
    assert!(matches!((then, later), (Some(t), Some(l)) if t < l), "{v}");
    assert_eq!(v["disk"]["checkpoint"]["disk_blocks"], 0, "{v}");
    // The vsock step: four echoes on one connection, the restored guest
    // told of the reset, EOF once the original stopped.
    let vs = &v["vsock"];
    assert!(
        vs["connect"].as_str().is_some_and(|c| c.starts_with("OK ")),
        "{vs}"
    );
    assert_eq!(vs["echoes"].as_array().map(Vec::len), Some(4), "{vs}");
    assert_eq!(vs["numa_move"]["mode"], "stop-copy", "{vs}");
    assert_eq!(vs["restored_transport_resets"], 1, "{vs}");
    assert_eq!(vs["end_of_file_after_stop"], true, "{vs}");
    // The reset step: at least a thousand guest-driven resets, each one the
    // guest checked finding its pages back, and verify ok after.
    let rs = &v["reset"]["status"];
    assert!(
        rs["guest_resets"].as_u64().is_some_and(|n| n >= 1000),
        "{v}"
    );
    assert_eq!(rs["guest_failed_checks"], 0, "{v}");
    assert!(
        rs["guest_checks"].as_u64().unwrap_or(0) + 2 >= rs["guest_resets"].as_u64().unwrap_or(0),
        "{v}"
    );
    assert!(
        v["reset"]["resets_per_s"].as_f64().is_some_and(|r| r > 0.0),
        "{v}"
    );
    assert_eq!(v["reset"]["verify"]["ok"], true, "{v}");
    assert!(
        v["restore"]["report"]["resume_ms"].as_f64().is_some(),
        "{v}"
    );
    let moves = v["numa"]["moves"]
        .as_array()
        .unwrap_or_else(|| panic!("no NUMA moves: {v}"));
    let modes: Vec<&str> = moves
        .iter()
        .filter_map(|m| m["report"]["mode"].as_str())
        .collect();
    for mode in ["live", "stop-copy", "kernel"] {
        assert!(modes.contains(&mode), "no {mode} move in {modes:?}");
    }
    assert!(moves.iter().all(|m| m["verify"]["ok"] == true), "{v}");
    // The host migration: the source's report, what the destination
    // received (all of it), the source's clean exit, and the guest carrying
    // on from the source's progress, intact.
    let m = &v["migration"];
    let r = &m["report"];
    assert_eq!(r["operation"], "migrate", "{m}");
    assert_eq!(r["to"], m["to"], "{m}");
    assert!(
        m["to"].as_str().is_some_and(|t| t.starts_with("unix:")),
        "{m}"
    );
    for k in ["downtime_us", "rounds", "pages_sent", "bytes_sent"] {
        assert!(r[k].as_u64().is_some_and(|n| n > 0), "{k}: {m}");
    }
    assert!(r["total_ms"].as_f64().is_some_and(|t| t > 0.0), "{m}");
    assert!(r["link_mib_s"].as_f64().is_some_and(|t| t > 0.0), "{m}");
    assert_eq!(m["arrival"]["pages_received"], r["pages_sent"], "{m}");
    assert_eq!(m["arrival"]["bytes_received"], r["bytes_sent"], "{m}");
    assert_eq!(m["source_exit"], 0, "{m}");
    let (before, p) = (m["progress_before"].as_u64(), &m["progress"]);
    assert!(
        before.is_some_and(|b| p["before"].as_u64().is_some_and(|x| x >= b)),
        "the guest did not carry on from the source's progress: {m}"
    );
    assert!(p["after"].as_u64() > p["before"].as_u64(), "{m}");
    assert_eq!(m["verify"]["ok"], true, "{m}");
    let dir = v["work_dir"]
        .as_str()
        .unwrap_or_else(|| panic!("no work_dir: {v}"));
    assert!(
        !std::path::Path::new(dir).exists(),
        "the demo left its work dir {dir}"
    );
}

#[test]
fn demo_refuses_bad_options_as_usage_errors() {
    for args in [
        ["demo", "--memory", "lots"],
        ["demo", "--rate", "0"],
        ["demo", "--vcpus", "0"],
    ] {
        let o = vmhop(&args);
        assert_eq!(o.code, Some(2), "{args:?}\n{}", o.describe());
        assert!(
            o.stdout.is_empty(),
            "{args:?} printed on stdout\n{}",
            o.describe()
        );
    }
}

#[test]
fn demo_with_a_kernel_says_where_linux_runs_or_names_the_missing_kernel() {
    let missing = "/nonexistent/vmlinuz-for-the-demo";
    let out = vmhop(&["demo", "--kernel", missing]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        // This paravirtualised KVM cannot boot Linux: the demo says so at
        // once and names the command that shows the steps in the NUMA box.
        assert!(
            out.stderr.contains("hardware-assisted KVM")
                && out.stderr.contains("tests/numabox/linux/run-step.sh"),
            "{}",
            out.describe()
        );
    } else {
        assert!(out.stderr.contains(missing), "{}", out.describe());
    }
    let out = vmhop(&["demo", "--initrd", "/x"]);
    assert_eq!(
        out.code,
        Some(2),
        "--initrd needs --kernel\n{}",
        out.describe()
    );
}
