//! The demo's process supervision: the `vmhop` children it starts and the
//! private directory they work in.
//!
//! Owns: the work directory (0700, for the API sockets, checkpoints and VM
//! logs), starting `vmhop run`/`restore` children (this same binary) on
//! private sockets in it and running one-shot `vmhop` commands, and the
//! clean-up on every path: a [`VmProcess`] (`child.rs`) dropped on an early
//! return stops its VM (SIGTERM, then SIGKILL), the [`WorkDir`] removes
//! itself, and Ctrl-C or SIGTERM is taken on a signal thread that stops the
//! live children and removes the directory before exiting 130. What that
//! thread must clean up is a [`Cleanup`] it shares with the supervisor and
//! the children's guards, not a global.
//!
//! Does not own what is asked of a VM or what its answers mean (the
//! script's and `checks`'s), nor any text the user reads (`render`'s).

mod child;

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::DemoError;
pub(super) use child::{VmProcess, NO_BODY};

/// How long a child VM gets after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Beyond `TERM_GRACE`, how long the main thread leaves an interrupted
/// demo's signal thread to remove the work dir and exit.
const SIGNAL_THREAD_SLACK: Duration = Duration::from_secs(2);
/// Pause between polls of a child's exit (and between a busy VM's retries).
const POLL: Duration = Duration::from_millis(25);

/// What an interrupted demo must undo: its live children and its work dir
/// (unless kept). Shared by the supervisor, its children's guards and the
/// signal thread; each guard removes what it has cleaned up itself.
#[derive(Clone, Default)]
pub(super) struct Cleanup(Arc<Mutex<Pending>>);

#[derive(Clone, Default)]
struct Pending {
    pids: Vec<libc::pid_t>,
    dir: Option<PathBuf>,
    /// A stop signal came: the signal thread is ending the demo.
    interrupted: bool,
}

impl Cleanup {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_child(&self, pid: libc::pid_t) {
        self.pending().pids.push(pid);
    }

    fn remove_child(&self, pid: libc::pid_t) {
        self.pending().pids.retain(|&p| p != pid);
    }

    fn set_dir(&self, dir: Option<PathBuf>) {
        self.pending().dir = dir;
    }

    /// Blocks SIGINT/SIGTERM in this thread (and the threads it starts
    /// later) and takes them on a thread of their own that stops the
    /// children, removes the work dir and exits 130. Call before any other
    /// thread is started, so that none takes the signals instead.
    fn watch_signals(&self) {
        let set = crate::util::block_stop_signals();
        let this = self.clone();
        let _ = thread::Builder::new()
            .name("demo-signals".into())
            .spawn(move || {
                let mut sig = 0;
                // SAFETY: `set` is an initialised signal set and `sig` a valid
                // out-pointer; sigwait only blocks this thread.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                this.interrupted()
            });
    }

    /// What the signal thread does: SIGTERM to every live child (vmhop then
    /// stops its VM cleanly), a grace period for them to close their files,
    /// the work dir removed, exit 130.
    fn interrupted(&self) -> ! {
        let Pending { pids, dir, .. } = {
            let mut p = self.pending();
            p.interrupted = true;
            p.clone()
        };
        for &pid in &pids {
            // SAFETY: only sends a signal to a child we started and have not
            // reaped (reaping removes it from the list).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
            thread::sleep(POLL);
        }
        if let Some(d) = dir {
            let _ = fs::remove_dir_all(d);
        }
        eprintln!(
            "vmhop: demo interrupted; told its VMs to stop (SIGTERM) and removed its work dir"
        );
        std::process::exit(130);
    }

    /// If a stop signal came, leaves the end to the signal thread, which
    /// exits 130 once the children are gone: the step the signal cut short
    /// fails meanwhile, and its exit 1 must not win the race.
    pub(super) fn yield_to_signal(&self) {
        if self.pending().interrupted {
            thread::sleep(TERM_GRACE + SIGNAL_THREAD_SLACK);
        }
    }

    #[cfg(test)]
    fn children(&self) -> Vec<libc::pid_t> {
        self.pending().pids.clone()
    }
}

/// Whether `pid` still runs (a zombie waiting to be reaped does not).
fn alive(pid: libc::pid_t) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Starts the demo's children and owns their work dir.
pub(super) struct Supervisor {
    exe: PathBuf,
    cleanup: Cleanup,
    work: WorkDir,
}

impl Supervisor {
    /// The supervisor of a demo run: this binary as the children's, the
    /// stop signals taken on a thread of their own, a new work dir.
    pub(super) fn start(keep_dir: bool) -> Result<Supervisor, DemoError> {
        let exe = std::env::current_exe().map_err(DemoError::Exe)?;
        let cleanup = Cleanup::default();
        cleanup.watch_signals();
        Supervisor::new(exe, keep_dir, cleanup)
    }

    /// A supervisor starting `exe`, leaving the signals to whoever handles
    /// them (`start` hands them to the cleanup's thread).
    fn new(exe: PathBuf, keep_dir: bool, cleanup: Cleanup) -> Result<Supervisor, DemoError> {
        let work = WorkDir::create(keep_dir, cleanup.clone())?;
        Ok(Supervisor { exe, cleanup, work })
    }

    /// What an interruption must undo, shared with the signal thread.
    pub(super) fn cleanup(&self) -> Cleanup {
        self.cleanup.clone()
    }

    /// The work dir.
    pub(super) fn dir(&self) -> &Path {
        &self.work.path
    }

    /// Removes the work dir unless it is to be kept; Ok(true) if removed.
    pub(super) fn remove_dir(&mut self) -> Result<bool, String> {
        self.work.remove()
    }

    /// Whether the work dir outlives the demo.
    pub(super) fn keeps_dir(&self) -> bool {
        self.work.keep
    }

    /// Starts `vmhop args...` with its API on `socket` (a name in the work
    /// dir), its stderr in the work dir's `log`, and waits for its first
    /// JSON report on stdout, which says its API is up.
    pub(super) fn spawn(
        &self,
        what: &str,
        args: &[String],
        socket: &str,
        log: &str,
    ) -> Result<VmProcess, DemoError> {
        VmProcess::spawn(
            &self.exe,
            what,
            args,
            self.work.path.join(socket),
            self.work.path.join(log),
            self.cleanup.clone(),
        )
    }

    /// Runs `vmhop args...` to its end, as a user would; its stdout.
    pub(super) fn output(&self, args: &[&str]) -> Result<String, DemoError> {
        let what = args.join(" ");
        let o = Command::new(&self.exe)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| DemoError::Command {
                what: what.clone(),
                reason: e.to_string(),
            })?;
        if !o.status.success() {
            return Err(DemoError::Command {
                what,
                reason: format!(
                    "{}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            });
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Runs `vmhop args...` (which include `--json`) and decodes its report.
    pub(super) fn json<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T, DemoError> {
        let text = self.output(args)?;
        serde_json::from_str(&text).map_err(|e| DemoError::Command {
            what: args.join(" "),
            reason: format!("its --json output is not the expected report: {e}"),
        })
    }
}

/// The demo's private directory for sockets, checkpoints and VM logs.
struct WorkDir {
    path: PathBuf,
    keep: bool,
    removed: bool,
    cleanup: Cleanup,
}

impl WorkDir {
    fn create(keep: bool, cleanup: Cleanup) -> Result<WorkDir, DemoError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("vmhop-demo-{}-{nanos:08x}", std::process::id()));
        // 0700: the API sockets inside must not be reachable by other users.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| DemoError::WorkDir {
                path: path.clone(),
                source,
            })?;
        if !keep {
            cleanup.set_dir(Some(path.clone()));
        }
        Ok(WorkDir {
            path,
            keep,
            removed: false,
            cleanup,
        })
    }

    /// Removes the directory unless it is to be kept; Ok(true) if removed.
    fn remove(&mut self) -> Result<bool, String> {
        if self.keep || self.removed {
            return Ok(self.removed);
        }
        self.cleanup.set_dir(None);
        self.removed = true;
        fs::remove_dir_all(&self.path)
            .map(|()| true)
            .map_err(|e| format!("cannot remove the work dir {}: {e}", self.path.display()))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_dir_is_private_and_removed_unless_kept() {
        use std::os::unix::fs::PermissionsExt;
        let cleanup = Cleanup::default();
        let d = WorkDir::create(false, cleanup.clone()).unwrap();
        let path = d.path.clone();
        assert_eq!(cleanup.pending().dir.as_ref(), Some(&path));
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::write(path.join("f"), b"x").unwrap();
        drop(d);
        assert!(!path.exists());
        assert!(cleanup.pending().dir.is_none());
        let mut kept = WorkDir::create(true, cleanup.clone()).unwrap();
        assert!(cleanup.pending().dir.is_none(), "a kept dir is not removed");
        assert_eq!(kept.remove(), Ok(false));
        let path = kept.path.clone();
        drop(kept);
        assert!(path.exists());
        fs::remove_dir_all(path).unwrap();
    }
}
