//! The API's error contract through the real binary: every error is a
//! JSON `{"error": ...}` with a 4xx status (never a dropped connection),
//! clients fail cleanly without a VM, a second VM cannot take a socket in
//! use, and curl speaks to the socket.

mod common;

use std::path::Path;

use common::{assert_one_line_error, vmhop, HttpResponse, Vm};

/// Asserts an error response: the status and a JSON `{"error": "<text>"}`.
fn assert_json_error(r: &HttpResponse, status: u16) {
    assert_eq!(r.status, status, "body: {}", r.body);
    let v = r.json();
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no \"error\" string in {}", r.body));
    assert!(!msg.trim().is_empty(), "empty error message: {}", r.body);
}

/// Asserts the VM still answers status with the given state.
fn assert_still_serving(vm: &Vm, state: &str) {
    assert_eq!(vm.state(), state, "{}", vm.logs());
}

#[test]
fn unknown_endpoint_gets_404_json_error() {
    let vm = Vm::start(&["--memory", "64M"]);
    assert_json_error(&vm.http("GET", "/api/v1/vm.nope", None), 404);
    assert_json_error(&vm.http("GET", "/nope", None), 404);
    assert_still_serving(&vm, "running");
}

#[test]
fn wrong_method_gets_405_json_error() {
    let vm = Vm::start(&["--memory", "64M"]);
    assert_json_error(&vm.http("POST", "/api/v1/vm.status", Some("{}")), 405);
    assert_json_error(&vm.http("GET", "/api/v1/vm.pause", None), 405);
    assert_still_serving(&vm, "running");
}

#[test]
fn malformed_json_body_on_put_gets_400_json_error_and_changes_nothing() {
    let vm = Vm::start(&["--memory", "64M"]);
    assert_json_error(&vm.http("PUT", "/api/v1/vm.pause", Some("{not json")), 400);
    assert_still_serving(&vm, "running");
}

#[test]
fn client_on_a_missing_socket_exits_1_with_a_one_line_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nobody.sock");
    let socket = socket.to_str().unwrap();
    for cmd in ["status", "pause", "resume", "stop", "verify"] {
        let out = vmhop(&[cmd, "--api-socket", socket]);
        assert_eq!(
            out.code,
            Some(1),
            "vmhop {cmd} on a missing socket\n{}",
            out.describe()
        );
        assert_one_line_error(&out, cmd);
        assert!(
            out.stderr.contains(socket),
            "vmhop {cmd}: message does not name the socket\n{}",
            out.describe()
        );
    }
    let out = vmhop(&["status", "--api-socket", socket, "--json"]);
    assert_eq!(
        out.code,
        Some(1),
        "status --json on a missing socket\n{}",
        out.describe()
    );
    assert_one_line_error(&out, "status --json");
}

#[test]
fn second_run_on_a_socket_in_use_fails_and_the_first_vm_keeps_running() {
    let vm = Vm::start(&["--memory", "64M", "--guest", "builtin:dirty"]);
    let before = vm.progress();
    let out = vmhop(&["run", "--api-socket", vm.socket_str(), "--memory", "64M"]);
    assert_eq!(
        out.code,
        Some(1),
        "second vmhop run on the same socket\n{}",
        out.describe()
    );
    assert_one_line_error(&out, "second run");
    let msg = out.stderr.to_lowercase();
    assert!(
        msg.contains("in use") || msg.contains("already"),
        "message does not say the socket is in use\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains(vm.socket_str()),
        "message does not name the socket\n{}",
        out.describe()
    );

    assert!(
        Path::new(vm.socket()).exists(),
        "the first VM's socket was removed"
    );
    assert_still_serving(&vm, "running");
    vm.wait_progress_above(before, std::time::Duration::from_secs(10));
}

#[test]
fn curl_reads_status_over_the_unix_socket() {
    let curl = Path::new("/usr/bin/curl");
    assert!(curl.exists(), "/usr/bin/curl is expected on these machines");
    let vm = Vm::start(&["--name", "curled", "--memory", "64M"]);
    let out = std::process::Command::new(curl)
        .args([
            "--silent",
            "--show-error",
            "--fail",
            "--max-time",
            "10",
            "--unix-socket",
        ])
        .arg(vm.socket())
        .arg("http://localhost/api/v1/vm.status")
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("curl got JSON");
    assert_eq!(v["name"], "curled", "{v}");
    assert_eq!(v["state"], "running", "{v}");
}

#[test]
fn a_huge_downtime_budget_is_refused_and_never_locks_the_vm_out() {
    let vm = Vm::start(&["--memory", "64M", "--guest", "builtin:dirty,rate=1000"]);
    // Finite and positive, but far past any sensible pause: it used to reach
    // Duration::from_secs_f64, panic inside the operation and poison the
    // operation lock, after which every operation answered 409.
    for body in [
        r#"{"to_node": 0, "max_downtime_ms": 1e300}"#,
        r#"{"to_node": 0, "max_downtime_ms": 60001}"#,
    ] {
        let r = vm.http("PUT", "/api/v1/vm.numa-migrate", Some(body));
        assert_json_error(&r, 400);
        assert!(r.body.contains("max_downtime_ms"), "{}", r.body);
    }
    let out = vm.cli(&[
        "numa-migrate",
        "--to-node",
        "0",
        "--max-downtime-ms",
        "1e300",
    ]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    // Every operation still works.
    let r = vm.http(
        "PUT",
        "/api/v1/vm.numa-migrate",
        Some(r#"{"to_node": 0, "mode": "stop-copy", "max_downtime_ms": 60000}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    vm.cli_ok(&["pause"]);
    vm.cli_ok(&["resume"]);
    vm.cli_ok(&["verify"]);
    assert_still_serving(&vm, "running");
}
