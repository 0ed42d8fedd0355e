//! Every error kind of the API's one table (`src/api/error.rs`, printed in
//! docs/api.md) provoked through the real binary: the HTTP status a `curl`
//! user gets, the exit code the CLI gives, and that the VM runs on.
//!
//! | kind | status | exit |
//! |---|---|---|
//! | bad request | 400 | 2 |
//! | forbidden | 403 | 2 |
//! | not found | 404 | 2 |
//! | method not allowed | 405 | 2 |
//! | too large | 413 | 2 |
//! | unusable | 422 | 2 |
//! | conflict | 409 | 1 |
//! | failed | 500 | 1 |
//! | unavailable | 503 | 1 |

mod common;

use common::{vmhop, Vm};

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// One row: what to do, the status it must get, the exit code the same
/// request gets through the CLI (None: no CLI command sends it).
struct Case {
    kind: &'static str,
    method: &'static str,
    path: &'static str,
    body: Option<String>,
    status: u16,
    cli: Option<(Vec<String>, i32)>,
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn every_error_kind_has_its_status_and_exit_code_and_the_vm_runs_on() {
    let vm = Vm::start(&["--memory", "64M", "--guest", "builtin:dirty,rate=2000"]);
    let nobody = tempdir();
    let nobody_sock = nobody.path().join("nobody.sock");
    let nobody_sock = nobody_sock.to_str().unwrap().to_string();
    let cases = vec![
        Case {
            kind: "bad request: a budget out of range",
            method: "PUT",
            path: "/api/v1/vm.numa-migrate",
            body: Some(r#"{"to_node":0,"max_downtime_ms":0}"#.into()),
            status: 400,
            cli: Some((
                s(&["numa-migrate", "--to-node", "0", "--max-downtime-ms", "0"]),
                2,
            )),
        },
        Case {
            kind: "forbidden: a directory the host does not permit",
            method: "PUT",
            path: "/api/v1/vm.checkpoint",
            body: Some(r#"{"dir":"/sys/vmhop-error-kinds"}"#.into()),
            status: 403,
            cli: Some((s(&["checkpoint", "--dir", "/sys/vmhop-error-kinds"]), 2)),
        },
        Case {
            kind: "not found: a host node this host lacks",
            method: "PUT",
            path: "/api/v1/vm.numa-migrate",
            body: Some(r#"{"to_node":7}"#.into()),
            status: 404,
            cli: Some((s(&["numa-migrate", "--to-node", "7"]), 2)),
        },
        Case {
            kind: "not found: an endpoint",
            method: "GET",
            path: "/api/v1/vm.nothing",
            body: None,
            status: 404,
            cli: None,
        },
        Case {
            kind: "method not allowed",
            method: "GET",
            path: "/api/v1/vm.pause",
            body: None,
            status: 405,
            cli: None,
        },
        Case {
            kind: "too large: a body over the limit",
            method: "PUT",
            path: "/api/v1/vm.checkpoint",
            body: Some(format!(r#"{{"dir":"/tmp/{}"}}"#, "x".repeat(2 << 20))),
            status: 413,
            cli: None,
        },
        Case {
            kind: "unusable: a directory that is a device",
            method: "PUT",
            path: "/api/v1/vm.checkpoint",
            body: Some(r#"{"dir":"/dev/null/ck"}"#.into()),
            status: 422,
            cli: Some((s(&["checkpoint", "--dir", "/dev/null/ck"]), 2)),
        },
        Case {
            kind: "conflict: cancelling a migration that is not running",
            method: "PUT",
            path: "/api/v1/vm.migrate-cancel",
            body: None,
            status: 409,
            cli: Some((s(&["migrate-cancel"]), 1)),
        },
        Case {
            kind: "failed: a migration nobody receives",
            method: "PUT",
            path: "/api/v1/vm.migrate",
            body: Some(format!(r#"{{"to":"unix:{nobody_sock}"}}"#)),
            status: 500,
            cli: Some((s(&["migrate", "--to", &format!("unix:{nobody_sock}")]), 1)),
        },
    ];
    for c in &cases {
        let r = vm.http(c.method, c.path, c.body.as_deref());
        assert_eq!(r.status, c.status, "{}: {}", c.kind, r.body);
        let body = r.json();
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{}: the answer names no error: {}",
            c.kind,
            r.body
        );
        if let Some((args, code)) = &c.cli {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = vm.cli(&args);
            assert_eq!(out.code, Some(*code), "{}\n{}", c.kind, out.describe());
            common::assert_one_line_error(&out, c.kind);
        }
        assert_eq!(
            vm.state(),
            "running",
            "{} left the VM {}",
            c.kind,
            vm.state()
        );
    }
    // Unavailable: a process still waiting for its VM answers only status
    // and stop.
    let dst = Vm::start(&["--incoming", &format!("unix:{nobody_sock}-in")]);
    let r = dst.http("PUT", "/api/v1/vm.pause", None);
    assert_eq!(r.status, 503, "{}", r.body);
    let out = dst.cli(&["pause"]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(out.stderr.contains("no VM here yet"), "{}", out.describe());
    drop(dst);
    // The CLI's own usage errors are the request's too.
    let out = vmhop(&["numa-migrate", "--to-node"]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
}
