//! Shared helpers for the integration tests that drive the real `vmhop`
//! binary: starting a VM on a private API socket and always tearing it
//! down, running client subcommands with a bound, speaking raw HTTP over
//! the Unix socket, and reading a process's facts from /proc.
//!
//! Owns only test plumbing; what vmhop must do is asserted in the test
//! files. Every wait here is bounded so that a misbehaving vmhop fails a
//! test with its own output instead of hanging the suite.

// Each test file compiles this module on its own and uses a different part
// of it; the rest would otherwise warn as dead code.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The vmhop binary cargo built for these tests.
pub const VMHOP: &str = env!("CARGO_BIN_EXE_vmhop");

/// How long `Vm::start` waits for the API socket to answer `vm.status`.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopped VM gets to exit after SIGTERM before it is killed.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long any one vmhop command (client or a `run` expected to fail) may
/// take before the test kills it and fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a raw HTTP exchange may block on the socket.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the polling helpers look again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The result of one finished vmhop command.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// Everything written on stdout.
    pub stdout: String,
    /// Everything written on stderr.
    pub stderr: String,
}

impl CmdOutput {
    /// Both streams with the exit code, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs vmhop with `args` and waits for it (bounded by `COMMAND_TIMEOUT`,
/// after which it is killed and the test fails).
pub fn vmhop(args: &[&str]) -> CmdOutput {
    let mut child = Command::new(VMHOP)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {VMHOP}: {e}"));
    // Drain both pipes on their own threads so a chatty child never blocks
    // on a full pipe while we wait for it.
    let out = drain(child.stdout.take().expect("stdout is piped"));
    let err = drain(child.stderr.take().expect("stderr is piped"));
    let status = wait_bounded(&mut child, COMMAND_TIMEOUT);
    let output = CmdOutput {
        code: status.and_then(|s| s.code()),
        stdout: out.join().expect("stdout reader thread"),
        stderr: err.join().expect("stderr reader thread"),
    };
    if status.is_none() {
        panic!(
            "vmhop {args:?} did not finish within {COMMAND_TIMEOUT:?}; killed it\n{}",
            output.describe()
        );
    }
    output
}

/// Runs vmhop with `args`, a command that serves an API on `socket` if it
/// succeeds (a `restore`, a `run`), and expects it to fail and exit on its
/// own. Returns its output once it has exited; if its API answers on
/// `socket` instead, it is killed and the test fails at once (rather than
/// after `COMMAND_TIMEOUT`).
pub fn vmhop_expecting_exit(args: &[&str], socket: &Path) -> CmdOutput {
    let mut child = Command::new(VMHOP)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {VMHOP}: {e}"));
    let out = drain(child.stdout.take().expect("stdout is piped"));
    let err = drain(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let mut served = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => {}
            _ => break None,
        }
        if http(socket, "GET", "/api/v1/vm.status", None).is_ok_and(|r| r.status == 200) {
            served = true;
            break None;
        }
        thread::sleep(POLL_INTERVAL);
    };
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let output = CmdOutput {
        code: status.and_then(|s| s.code()),
        stdout: out.join().expect("stdout reader thread"),
        stderr: err.join().expect("stderr reader thread"),
    };
    if served {
        panic!(
            "vmhop {args:?} was expected to fail but serves a VM on {}; killed it\n{}",
            socket.display(),
            output.describe()
        );
    }
    if status.is_none() {
        panic!(
            "vmhop {args:?} did not finish within {COMMAND_TIMEOUT:?}; killed it\n{}",
            output.describe()
        );
    }
    output
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` up to `limit`; on timeout kills it, reaps it and
/// returns None.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// A raw HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body, decoded from chunked encoding if needed.
    pub body: String,
}

impl HttpResponse {
    /// The body parsed as JSON; panics with the raw body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.body))
    }
}

/// Sends one HTTP/1.1 request over the Unix socket at `socket` and reads
/// the whole response. Errors (no socket, dropped connection, garbage)
/// come back as `Err` with a description.
pub fn http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<HttpResponse, String> {
    let mut s =
        UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if !body.is_empty() || method == "PUT" || method == "POST" {
        req += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    req += "\r\n";
    req += body;
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send request: {e}"))?;

    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let (head_end, content_length) = loop {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("read response: {e}"))?;
        if n == 0 {
            return Err(format!(
                "connection closed before a full response header: {:?}",
                String::from_utf8_lossy(&raw)
            ));
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = find(&raw, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..i]).to_string();
            break (
                i + 4,
                header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()),
            );
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut body = raw[head_end..].to_vec();
    match content_length {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut buf).map_err(|e| format!("read body: {e}"))?;
                if n == 0 {
                    return Err(format!("body cut short: {} of {len} bytes", body.len()));
                }
                body.extend_from_slice(&buf[..n]);
            }
            body.truncate(len);
        }
        None => {
            s.read_to_end(&mut body)
                .map_err(|e| format!("read body: {e}"))?;
            if header(&head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
            {
                body = dechunk(&body)?;
            }
        }
    }
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let i = find(data, b"\r\n").ok_or("chunk size line without CRLF")?;
        let size_text = String::from_utf8_lossy(&data[..i]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        data = &data[i + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("chunk cut short".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// One `vmhop run` process with its private socket; killed on drop.
pub struct Vm {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    pid: u32,
}

impl Vm {
    /// Starts `vmhop run --api-socket <fresh path> ARGS` and waits until its
    /// API answers `vm.status`. Panics (with vmhop's output) if it exits or
    /// does not answer within `START_TIMEOUT`.
    pub fn start(args: &[&str]) -> Vm {
        Vm::start_command(&["run"], args)
    }

    /// Like `start`, for any serving subcommand: starts `vmhop COMMAND...
    /// --api-socket <fresh path> ARGS` (e.g. `&["restore", "DIR@3"]`) and
    /// waits until its API answers `vm.status`.
    pub fn start_command(command: &[&str], args: &[&str]) -> Vm {
        Vm::start_command_env(command, args, &[])
    }

    /// Like `start_command`, with extra environment variables for vmhop.
    pub fn start_command_env(command: &[&str], args: &[&str], env: &[(&str, &str)]) -> Vm {
        Vm::start_wrapped(&[], command, args, env)
    }

    /// Like `start_command_env`, run under `wrapper` (e.g. `["ip", "netns",
    /// "exec", "ns1"]` or `["prlimit", "--as=N"]`): vmhop is its last word.
    pub fn start_wrapped(
        wrapper: &[&str],
        command: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Vm {
        let what = command.join(" ");
        let dir = tempfile::Builder::new()
            .prefix("vmhop-test-")
            .tempdir()
            .expect("create tempdir");
        let socket = dir.path().join("api.sock");
        let stdout = std::fs::File::create(dir.path().join("stdout")).expect("create stdout file");
        let stderr = std::fs::File::create(dir.path().join("stderr")).expect("create stderr file");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(VMHOP);
                c
            }
            None => Command::new(VMHOP),
        };
        let child = cmd
            .args(command)
            .arg("--api-socket")
            .arg(&socket)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {VMHOP}: {e}"));
        let pid = child.id();
        let mut vm = Vm {
            child: Some(child),
            dir,
            socket,
            pid,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = vm.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                vm.child = None;
                panic!(
                    "vmhop {what} {args:?} exited with {status} before its API answered\n{}",
                    vm.logs()
                );
            }
            if let Ok(r) = http(&vm.socket, "GET", "/api/v1/vm.status", None) {
                if r.status == 200 {
                    return vm;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "vmhop {what} {args:?} did not answer vm.status within {START_TIMEOUT:?}\n{}",
                    vm.logs()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The process's private directory (its socket, logs; room for more).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The API socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The API socket path as a string, for command lines.
    pub fn socket_str(&self) -> &str {
        self.socket.to_str().expect("tempdir paths are UTF-8")
    }

    /// The vmhop process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What `vmhop run` has written so far on stdout and stderr.
    pub fn logs(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "--- vmhop run stdout ---\n{}\n--- vmhop run stderr ---\n{}",
            read("stdout"),
            read("stderr")
        )
    }

    /// What `vmhop run` has written on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    /// What `vmhop run` has written on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Runs a client subcommand against this VM (`--api-socket` added).
    pub fn cli(&self, args: &[&str]) -> CmdOutput {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--api-socket");
        all.push(self.socket_str());
        vmhop(&all)
    }

    /// Runs a client subcommand and panics unless it exits 0.
    pub fn cli_ok(&self, args: &[&str]) -> CmdOutput {
        let out = self.cli(args);
        assert_eq!(
            out.code,
            Some(0),
            "vmhop {args:?} failed\n{}\n{}",
            out.describe(),
            self.logs()
        );
        out
    }

    /// `vmhop status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = self.cli_ok(&["status", "--json"]);
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "status --json is not one JSON object ({e}): {:?}",
                out.stdout
            )
        })
    }

    /// The guest's progress counter from `status`.
    pub fn progress(&self) -> u64 {
        let s = self.status();
        s["guest"]["progress"]
            .as_u64()
            .unwrap_or_else(|| panic!("status has no guest.progress: {s}"))
    }

    /// The VM state from `status`.
    pub fn state(&self) -> String {
        let s = self.status();
        s["state"]
            .as_str()
            .unwrap_or_else(|| panic!("status has no state: {s}"))
            .to_string()
    }

    /// Polls `status` until the progress exceeds `above`, within `limit`;
    /// returns the progress seen, panics if it never moved.
    pub fn wait_progress_above(&self, above: u64, limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        loop {
            let p = self.progress();
            if p > above {
                return p;
            }
            if Instant::now() >= deadline {
                panic!(
                    "guest progress stayed at {p} (not above {above}) for {limit:?}\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// A raw HTTP request to this VM's API.
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        http(&self.socket, method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.logs()))
    }

    /// Sends `signal` to the vmhop process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) has no memory effects; the pid is our own child,
        // not yet reaped (we hold its Child), so it cannot have been reused.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        assert_eq!(
            rc,
            0,
            "kill({}, {signal}) failed: {}",
            self.pid,
            std::io::Error::last_os_error()
        );
    }

    /// Waits (bounded by `EXIT_TIMEOUT`) for vmhop to exit on its own and
    /// returns its exit status; panics if it does not.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("vmhop was already reaped");
        match wait_bounded(&mut child, EXIT_TIMEOUT) {
            Some(status) => status,
            None => panic!(
                "vmhop did not exit within {EXIT_TIMEOUT:?}; killed it\n{}",
                self.logs()
            ),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // SAFETY: as in `signal`: our own unreaped child.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        // wait_bounded falls back to SIGKILL, so nothing outlives the test.
        let _ = wait_bounded(&mut child, EXIT_TIMEOUT);
    }
}

/// User plus system CPU time consumed so far by process `pid` (all threads).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // The command name may contain spaces and parentheses: fields are
    // counted after the last ')'. utime and stime are fields 14 and 15,
    // i.e. the 12th and 13th after the name.
    let rest = &stat[stat.rfind(')').expect("stat has a ')'") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

/// Parses a kernel CPU list ("0-3,6,8-9") into sorted CPU numbers.
pub fn parse_cpu_list(text: &str) -> Vec<u32> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(
                a.trim().parse::<u32>().expect("cpu")..=b.trim().parse::<u32>().expect("cpu"),
            ),
            None => cpus.push(part.trim().parse().expect("cpu")),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// The threads of process `pid` as (thread name, allowed CPUs).
pub fn threads(pid: u32) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read /proc/<pid>/task")
        .flatten()
    {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if let Some(list) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            out.push((comm.trim().to_string(), parse_cpu_list(list)));
        }
    }
    out
}

/// Parses a guest-physical address reported as a JSON number or a
/// "0x..." / decimal string.
pub fn parse_gpa(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let s = v.as_str()?.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Asserts stderr carries exactly one non-empty line and no panic.
pub fn assert_one_line_error(out: &CmdOutput, what: &str) {
    assert!(
        !out.stderr.contains("panicked"),
        "{what}: vmhop panicked\n{}",
        out.describe()
    );
    let lines: Vec<&str> = out.stderr.trim_end().lines().collect();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty(),
        "{what}: expected a one-line message on stderr\n{}",
        out.describe()
    );
}

/// 1 MiB.
pub const MIB: u64 = 1 << 20;

/// Where the builtin dirty guest's working set begins (guest-physical).
pub const WORKING_SET_START: u64 = 0x20_0000;

/// The guest page size.
pub const PAGE: u64 = 4096;

/// One KVM slot (chunk) of `debug.memory-map`.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub guest_node: u64,
    pub gpa: u64,
    pub len: u64,
    pub host_addr: u64,
}

/// The VM's slots, in the order the API lists them.
pub fn memory_map(vm: &Vm) -> Vec<Slot> {
    let r = vm.http("GET", "/api/v1/debug.memory-map", None);
    assert_eq!(r.status, 200, "debug.memory-map: {}", r.body);
    r.json()
        .as_array()
        .unwrap_or_else(|| panic!("debug.memory-map is not a list: {}", r.body))
        .iter()
        .map(|s| Slot {
            guest_node: s["guest_node"].as_u64().expect("slot guest_node"),
            gpa: s["gpa"].as_u64().expect("slot gpa"),
            len: s["len"].as_u64().expect("slot len"),
            host_addr: s["host_addr"].as_u64().expect("slot host_addr"),
        })
        .collect()
}

/// Parses `stdout` as exactly one JSON object and nothing else (what
/// `--json` promises); `context` goes into the failure message.
pub fn one_json_object_in(stdout: &str, context: &dyn std::fmt::Display) -> Value {
    let mut values = serde_json::Deserializer::from_str(stdout).into_iter::<Value>();
    let first = values
        .next()
        .unwrap_or_else(|| panic!("no JSON on stdout: {stdout:?}\n{context}"))
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout:?}\n{context}"));
    assert!(
        values.next().is_none(),
        "more than one JSON value on stdout: {stdout:?}\n{context}"
    );
    assert!(
        first.is_object(),
        "stdout JSON is not an object: {first}\n{context}"
    );
    first
}

/// `one_json_object_in` without extra context.
pub fn one_json_object(stdout: &str) -> Value {
    one_json_object_in(stdout, &"")
}

/// Reads the index of a checkpoint file, one entry per page: (gpa, file
/// offset, flags). Parsed from the bytes as docs/checkpoint-format.md
/// describes version 3: a 144-byte footer locating the index; 16-byte runs
/// (gpa, record number, page count, flags), then the pages' crcs.
pub fn index_of(file: &Path) -> Vec<(u64, u64, u32)> {
    let data = std::fs::read(file).expect("read checkpoint file");
    let footer = &data[data.len() - 144..];
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2"));
    let (off, runs) = (u64_at(footer, 88) as usize, u64_at(footer, 104) as usize);
    let pages_at = u64_at(footer, 24);
    let mut out = Vec::new();
    for i in 0..runs {
        let r = &data[off + 16 * i..off + 16 * (i + 1)];
        let record = u32::from_le_bytes(r[8..12].try_into().expect("4")) as u64;
        let flags = u16_at(r, 14) as u32;
        for k in 0..u16_at(r, 12) as u64 {
            let offset = if flags & 1 == 0 {
                pages_at + (record + k) * 4096
            } else {
                0
            };
            out.push((u64_at(r, 0) + k * 4096, offset, flags));
        }
    }
    out
}
