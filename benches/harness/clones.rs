//! The `clones-20` scenario: 20 clones (`vmhop restore DIR@1 --shared`,
//! each its own vmhop process) of a 1 GiB random-filled builtin:dirty
//! guest, each having read all of its memory (`vmhop verify` reads and
//! checks every page): their summed PSS (from /proc/PID/smaps_rollup)
//! against one plain restore's, and each clone's start (the restore
//! report's `process_ms`: from the process's `main` until its vCPUs could
//! run; and `resume_ms`, from the restore's own start) against a plain
//! lazy restore's (vmhop's fastest start), measured in the same run.
//!
//! Unlike the library-driven scenarios this one runs the vmhop binary:
//! clones are processes, and memory shared between processes is the point.
//! The guest writes slowly (100 pages/s) so that the clones' own copies
//! stay small while they are measured.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::fixture::{failed, scratch_dir, vm_bytes};
use super::{median, BenchError, RunCtx, Sample, Scenario};

const VMHOP: &str = env!("CARGO_BIN_EXE_vmhop");
/// Clones per run (3 in smoke mode).
const CLONES: usize = 20;
const MIB: f64 = (1u64 << 20) as f64;

/// The scenarios of this module.
pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::new(
        "clones-20",
        "20 clones of a 1 GiB random-filled guest, each having read all its memory: summed PSS vs one plain eager restore's, and each clone's start (process main to vCPUs running) vs a plain lazy restore's",
        run,
    )]
}

/// A vmhop process serving a VM; killed on drop.
struct Proc {
    child: Child,
    socket: PathBuf,
    /// The first line it printed (`--json`: the start report).
    started: serde_json::Value,
}

impl Proc {
    /// Runs `vmhop ARGS --api-socket SOCKET --json` with `env` and waits
    /// for its start line.
    fn start(args: &[&str], socket: PathBuf, env: &[(&str, &Path)]) -> Result<Proc, BenchError> {
        let mut child = Command::new(VMHOP)
            .args(args)
            .arg("--api-socket")
            .arg(&socket)
            .arg("--json")
            .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(failed(format!("starting {VMHOP} {args:?}")))?;
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout is piped");
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(failed(format!("reading the start line of {args:?}")))?;
        let started = serde_json::from_str(&line).map_err(|e| {
            let _ = child.kill();
            BenchError::Failed(format!("vmhop {args:?} did not start: {e}: '{line}'"))
        })?;
        Ok(Proc {
            child,
            socket,
            started,
        })
    }

    /// `vmhop COMMAND --api-socket SOCKET ARGS`, which must succeed.
    fn cli(&self, command: &str, args: &[&str]) -> Result<(), BenchError> {
        let out = Command::new(VMHOP)
            .arg(command)
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .map_err(failed(format!("vmhop {command}")))?;
        if !out.status.success() {
            return Err(BenchError::Failed(format!(
                "vmhop {command} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// A figure of the restore report.
    fn report(&self, field: &str) -> Result<f64, BenchError> {
        self.started["restore"][field]
            .as_f64()
            .ok_or_else(|| BenchError::Failed(format!("no {field} in {}", self.started)))
    }

    fn process_ms(&self) -> Result<f64, BenchError> {
        self.report("process_ms")
    }

    /// Proportional set size, bytes.
    fn pss(&self) -> Result<f64, BenchError> {
        let path = format!("/proc/{}/smaps_rollup", self.child.id());
        let text = std::fs::read_to_string(&path).map_err(failed(path.clone()))?;
        text.lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb * 1024.0)
            .ok_or_else(|| BenchError::Failed(format!("no Pss in {path}")))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(ctx: &RunCtx) -> Result<Vec<Sample>, BenchError> {
    let clones = if ctx.quick { 3 } else { CLONES };
    let bytes = vm_bytes(ctx);
    let work = scratch_dir()?;
    let images = tempfile::Builder::new()
        .prefix("vmhop-bench-images-")
        .tempdir_in("/dev/shm")
        .map_err(failed("an image directory on /dev/shm"))?;
    let env = [("VMHOP_IMAGE_DIR", images.path())];
    let sock = |name: &str| work.path().join(format!("{name}.sock"));
    let ck = work.path().join("ck");
    let ck_s = ck.to_str().expect("utf-8 scratch path").to_string();

    let memory = format!("{}M", bytes >> 20);
    let source = Proc::start(
        &[
            "run",
            "--name",
            "bench-clone-source",
            "--memory",
            &memory,
            "--guest",
            "builtin:dirty,rate=100,fill=random",
        ],
        sock("source"),
        &env,
    )?;
    source.cli("checkpoint", &["--dir", &ck_s, "--stop-after"])?;
    drop(source);
    let target = format!("{ck_s}@1");

    // The baseline: one plain eager restore, all of its memory read.
    let plain = Proc::start(
        &["restore", &target, "--eager", "--name", "bench-plain"],
        sock("plain"),
        &env,
    )?;
    plain.cli("verify", &[])?;
    let plain_pss = plain.pss()?;
    drop(plain);
    // The start baseline: a plain lazy restore, vmhop's fastest (its
    // vCPUs run before any page is loaded).
    let lazy = Proc::start(
        &["restore", &target, "--name", "bench-lazy"],
        sock("lazy"),
        &env,
    )?;
    let (plain_ms, plain_resume) = (lazy.process_ms()?, lazy.report("resume_ms")?);
    drop(lazy);

    let mut procs = Vec::with_capacity(clones);
    for i in 0..clones {
        let name = format!("bench-clone-{i}");
        procs.push(Proc::start(
            &["restore", &target, "--shared", "--name", &name],
            sock(&name),
            &env,
        )?);
    }
    for p in &procs {
        p.cli("verify", &[])?;
    }
    let summed: f64 = procs.iter().map(Proc::pss).sum::<Result<f64, _>>()?;
    let first = procs[0].process_ms()?;
    let build = procs[0].started["restore"]["image"]["build_ms"]
        .as_f64()
        .unwrap_or(0.0);
    let later: Vec<f64> = procs[1..]
        .iter()
        .map(Proc::process_ms)
        .collect::<Result<_, _>>()?;
    let max = later.iter().copied().fold(0.0, f64::max);
    let resumes: Vec<f64> = procs[1..]
        .iter()
        .map(|p| p.report("resume_ms"))
        .collect::<Result<_, _>>()?;
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    drop(procs);
    Ok(vec![
        Sample::new(
            format!("summed PSS of {clones} clones"),
            "MiB",
            summed / MIB,
        )
        .vs(plain_pss / MIB),
        Sample::new("clone start, median of clones 2..N", "ms", median(&later)).vs(plain_ms),
        Sample::new("clone start, max of clones 2..N", "ms", max).vs(plain_ms),
        Sample::new(
            "clone restore to vCPUs running (resume_ms), median",
            "ms",
            median(&resumes),
        )
        .vs(plain_resume),
        Sample::new("first clone start (builds the image)", "ms", first).vs(plain_ms),
        Sample::new("image build", "ms", build),
        Sample::new("host load average (1 min) at the end", "", load),
    ])
}
