//! One child `vmhop` process of the demo: started with its stderr in a
//! log, its stdout read line by line for the JSON reports it prints (the
//! first says its API is up), its API called, its exit awaited, and on
//! drop stopped if it still runs. Errors quote the end of its log.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::{Cleanup, POLL, TERM_GRACE};
use crate::api::client::{call, ClientError};
use crate::api::Endpoint;
use crate::cli::demo::DemoError;

/// How long a child VM may take to print its start report.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child VM may take to exit once it has been told to.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on the `stop` call itself.
const STOP_CALL: Duration = Duration::from_secs(10);
/// How long to keep retrying an action the VM refuses with 409 because it
/// is busy (a lazy restore loads its pages in the background meanwhile).
const BUSY_WAIT: Duration = Duration::from_secs(60);
/// Lines of a failed child's log quoted in the error.
const LOG_TAIL_LINES: usize = 8;

/// No request body.
pub(in crate::cli::demo) const NO_BODY: Option<&()> = None;

/// A child `vmhop run`/`restore` and its API socket. Dropping it stops the
/// VM: SIGTERM (vmhop then shuts the VM down cleanly), SIGKILL if it lingers.
pub(in crate::cli::demo) struct VmProcess {
    what: String,
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    /// The lines it prints on stdout after the first, as they come.
    lines: Receiver<String>,
    /// The one JSON report it printed when its API came up.
    start: Value,
    cleanup: Cleanup,
}

impl VmProcess {
    /// Starts `exe args...` (stderr to `log`) and waits for its JSON start line.
    pub(super) fn spawn(
        exe: &Path,
        what: &str,
        args: &[String],
        socket: PathBuf,
        log: PathBuf,
        cleanup: Cleanup,
    ) -> Result<VmProcess, DemoError> {
        let log_file = fs::File::create(&log).map_err(|source| DemoError::Log {
            path: log.clone(),
            source,
        })?;
        let parent = std::process::id() as libc::pid_t;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (prctl, pthread_sigmask, getppid) on
        // that child's own state; it allocates nothing on the success path.
        unsafe {
            cmd.pre_exec(move || {
                // If the demo dies without running its guards (SIGKILL, a
                // crash), the kernel still stops the VM.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                // The demo blocks SIGINT/SIGTERM for its signal thread; the
                // mask survives exec, so give the child the default one.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                // The demo may have died between fork and prctl.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other(
                        "the demo exited while starting this VM",
                    ));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| DemoError::Spawn {
            what: what.into(),
            source,
        })?;
        cleanup.add_child(child.id() as libc::pid_t);
        let stdout = child.stdout.take();
        let (tx, lines) = mpsc::channel();
        // From here on the guard owns the child: every early return stops it.
        let mut vm = VmProcess {
            what: what.into(),
            child,
            socket,
            log,
            lines,
            start: Value::Null,
            cleanup,
        };
        if let Some(out) = stdout {
            // Reads every line, so the child never blocks on a full pipe.
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
        }
        vm.start = vm.next_line("start report", START_TIMEOUT)?;
        Ok(vm)
    }

    /// The next JSON line the child prints, within `limit`.
    fn next_line(&mut self, step: &str, limit: Duration) -> Result<Value, DemoError> {
        let not_up = |vm: &mut VmProcess, reason: String| DemoError::NotUp {
            what: vm.what.clone(),
            step: step.into(),
            reason,
            log: vm.log_tail(),
        };
        match self.lines.recv_timeout(limit) {
            Ok(line) => serde_json::from_str(line.trim()).map_err(|e| {
                not_up(
                    self,
                    format!("its line is not a JSON report ({e}): {}", line.trim()),
                )
            }),
            Err(RecvTimeoutError::Timeout) => Err(not_up(
                self,
                format!("nothing printed within {} s", limit.as_secs()),
            )),
            Err(RecvTimeoutError::Disconnected) => {
                let reason = match self.wait_exit(EXIT_TIMEOUT) {
                    Some(s) => format!("it exited ({s}) without printing it"),
                    None => "it closed its stdout without printing it".into(),
                };
                Err(not_up(self, reason))
            }
        }
    }

    /// Its process id.
    pub(in crate::cli::demo) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its API socket.
    pub(in crate::cli::demo) fn socket(&self) -> &Path {
        &self.socket
    }

    /// The report it printed when its API came up, as a `T`.
    pub(in crate::cli::demo) fn start_report<T: DeserializeOwned>(&self) -> Result<T, DemoError> {
        serde_json::from_value(self.start.clone()).map_err(|e| DemoError::Reply {
            step: format!("`vmhop {}` start report", self.what),
            reason: format!("{e}: {}", self.start),
        })
    }

    /// The next report it prints (a destination's, when the VM arrives),
    /// as a `T`, within `limit`.
    pub(in crate::cli::demo) fn next_report<T: DeserializeOwned>(
        &mut self,
        step: &str,
        limit: Duration,
    ) -> Result<T, DemoError> {
        let v = self.next_line(step, limit)?;
        serde_json::from_value(v.clone()).map_err(|e| DemoError::Reply {
            step: step.into(),
            reason: format!("{e}: {v}"),
        })
    }

    /// One API call, decoded into its report type.
    pub(in crate::cli::demo) fn call<T: DeserializeOwned>(
        &mut self,
        step: &str,
        ep: Endpoint,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, DemoError> {
        let body = encode(step, body)?;
        self.exchange(step, ep, body.as_ref(), timeout)
    }

    fn exchange<T: DeserializeOwned>(
        &mut self,
        step: &str,
        ep: Endpoint,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<T, DemoError> {
        let v = call(
            &self.socket,
            ep.method().as_str(),
            &ep.path(),
            body,
            Some(timeout),
        )
        .map_err(|source| DemoError::Api {
            step: step.into(),
            source,
            log: self.death_note(),
        })?;
        serde_json::from_value(v).map_err(|e| DemoError::Reply {
            step: step.into(),
            reason: e.to_string(),
        })
    }

    /// Like `call`, but retries while the VM answers 409 (busy: a lazy
    /// restore still loading, say), up to `BUSY_WAIT`; returns how long it waited.
    pub(in crate::cli::demo) fn call_when_free<T: DeserializeOwned>(
        &mut self,
        step: &str,
        ep: Endpoint,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<(T, Duration), DemoError> {
        let body = encode(step, body)?;
        let t = Instant::now();
        let mut waited = Duration::ZERO;
        loop {
            match self.exchange(step, ep, body.as_ref(), timeout) {
                Err(DemoError::Api {
                    source: ClientError::Api { status: 409, .. },
                    ..
                }) if t.elapsed() < BUSY_WAIT => {
                    thread::sleep(POLL);
                    waited = t.elapsed();
                }
                r => return r.map(|v| (v, waited)),
            }
        }
    }

    /// `vm.stop`, then waits for a clean exit.
    pub(in crate::cli::demo) fn stop(mut self, step: &str) -> Result<(), DemoError> {
        let _: Value = self.call(step, Endpoint::Stop, NO_BODY, STOP_CALL)?;
        self.exits_cleanly("stop")
    }

    /// Waits for the process to exit 0 by itself, as it does after `why`
    /// (its VM stopped, or handed to another process).
    pub(in crate::cli::demo) fn exits_cleanly(mut self, why: &str) -> Result<(), DemoError> {
        let fail = |vm: &mut VmProcess, reason| DemoError::Exit {
            what: vm.what.clone(),
            after: why.into(),
            reason,
            log: vm.log_tail(),
        };
        match self.wait_exit(EXIT_TIMEOUT) {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(fail(&mut self, format!("it exited with {s}"))),
            None => Err(fail(
                &mut self,
                format!(
                    "still running {} s later; killed it",
                    EXIT_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    /// Polls for the child's exit up to `limit`.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                _ => return None,
            }
        }
    }

    /// If the VM process has died: its exit status and the end of its log
    /// (else "").
    pub(in crate::cli::demo) fn death_note(&mut self) -> String {
        match self.child.try_wait() {
            Ok(Some(s)) => format!(
                "\n  the VM process (`vmhop {}`) has exited ({s}){}",
                self.what,
                self.log_tail()
            ),
            _ => String::new(),
        }
    }

    /// The last lines of the child's stderr, indented, or "".
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return String::new();
        }
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!(
            "\n  last lines of {}:\n    {}",
            self.log.display(),
            tail.join("\n    ")
        )
    }
}

/// A request body as JSON.
fn encode(step: &str, body: Option<&impl Serialize>) -> Result<Option<Value>, DemoError> {
    body.map(serde_json::to_value)
        .transpose()
        .map_err(|e| DemoError::Reply {
            step: step.into(),
            reason: format!("cannot encode the request: {e}"),
        })
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            // SAFETY: kill() only sends a signal; `pid` is our own child,
            // not yet reaped, so it cannot name an unrelated process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            if self.wait_exit(TERM_GRACE).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        self.cleanup.remove_child(pid);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Cleanup, Supervisor};
    use super::*;

    /// A supervisor whose "VMs" are shell scripts (`sh -c SCRIPT`).
    fn shell() -> Supervisor {
        Supervisor::new(PathBuf::from("/bin/sh"), false, Cleanup::default()).unwrap()
    }

    fn sh(s: &Supervisor, script: &str) -> Result<VmProcess, DemoError> {
        s.spawn("sh", &["-c".into(), script.into()], "none.sock", "log")
    }

    #[test]
    fn dropping_a_vm_process_terminates_the_child() {
        let s = shell();
        let vm = sh(&s, "echo '{\"up\": true}'; exec sleep 30").unwrap();
        assert_eq!(vm.start, serde_json::json!({"up": true}));
        let pid = vm.pid() as libc::pid_t;
        assert!(s.cleanup.children().contains(&pid));
        drop(vm);
        // Reaped by the guard: the pid no longer names our child.
        // SAFETY: waitpid on a pid that is no longer our child only fails (ECHILD).
        let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        assert_eq!(r, -1);
        assert!(!s.cleanup.children().contains(&pid));
    }

    #[test]
    fn a_child_that_dies_before_its_start_line_is_reported_with_its_log() {
        let s = shell();
        let e = sh(&s, "echo 'no KVM here' >&2; exit 3")
            .err()
            .expect("spawn must fail")
            .to_string();
        assert!(
            e.contains("start report") && e.contains("exit status: 3") && e.contains("no KVM here"),
            "{e}"
        );
    }

    #[test]
    fn a_child_that_prints_no_json_is_reported() {
        let s = shell();
        let e = sh(&s, "echo hello; exec sleep 30")
            .err()
            .expect("spawn must fail")
            .to_string();
        assert!(
            e.contains("not a JSON report") && e.contains("hello"),
            "{e}"
        );
    }

    #[test]
    fn later_reports_are_read_in_order_and_a_silent_exit_is_reported() {
        let s = shell();
        let mut vm = sh(&s, "echo '{\"n\": 1}'; echo '{\"n\": 2}'; exit 0").unwrap();
        let two: Value = vm.next_report("second", Duration::from_secs(5)).unwrap();
        assert_eq!(two["n"], 2);
        let e = vm
            .next_report::<Value>("third", Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("third") && e.contains("exited"), "{e}");
    }

    #[test]
    fn a_process_that_exits_nonzero_is_not_a_clean_exit() {
        let s = shell();
        let vm = sh(&s, "echo '{}'; echo 'lost the VM' >&2; exit 1").unwrap();
        let e = vm.exits_cleanly("migrate").unwrap_err().to_string();
        assert!(
            e.contains("after migrate")
                && e.contains("exit status: 1")
                && e.contains("lost the VM"),
            "{e}"
        );
        let vm = sh(&s, "echo '{}'; exit 0").unwrap();
        vm.exits_cleanly("migrate").unwrap();
    }

    #[test]
    fn an_api_call_to_a_dead_vm_says_it_exited() {
        let s = shell();
        let mut vm = sh(&s, "echo '{}'; echo 'guest crashed' >&2; exit 1").unwrap();
        vm.wait_exit(Duration::from_secs(5)).expect("sh exits");
        let e = vm
            .call::<Value>("status", Endpoint::Status, NO_BODY, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("status: cannot connect")
                && e.contains("has exited")
                && e.contains("guest crashed"),
            "{e}"
        );
    }
}
