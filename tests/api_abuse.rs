//! The API under abuse: a running `builtin:dirty` VM (2 vCPUs, two guest
//! nodes) gets random, malformed, oversized, out-of-range and concurrent
//! requests, valid ones mixed in — status, pause, resume, verify,
//! checkpoint, NUMA moves, migrations to nowhere, migrate-cancel, unknown
//! endpoints, wrong methods, bodies that are not JSON or JSON of the wrong
//! shape, huge bodies, and raw requests cut short on the Unix socket.
//!
//! What must hold (docs/api.md):
//! - every answer is one JSON object with a status the request may get
//!   (each generated request carries the statuses docs/api.md allows it:
//!   200, 400, 404, 405, 409, 413, 500), an error body `{"error": ...}`
//!   for every 4xx/5xx, and a 200 from `verify` says `ok`;
//! - the only answers that are not JSON are the HTTP layer's, for input
//!   that is not an HTTP/1.x request (an empty 400, or none);
//! - every request is answered (or its connection closed) within
//!   `REQUEST_BOUND`: nothing deadlocks;
//! - afterwards the same VM process runs on: resumed if paused, it makes
//!   progress and verifies.
//!
//! Requests are drawn from one proptest strategy: once sequentially with
//! shrinking (`every_abusive_request_gets_a_documented_answer`), and by 8
//! threads at once for `STORM` (`eight_clients_abusing_the_api_at_once...`).
//! `VMHOP_ABUSE_SEED` repeats a storm.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{one_json_object, Vm};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{json, Value};

/// Longest any one request may take to be answered. The slowest valid
/// request is a checkpoint of the 64 MiB guest (a few seconds on a busy
/// 2-core machine); a migration to nowhere fails at connect.
const REQUEST_BOUND: Duration = Duration::from_secs(30);

/// How long the storm lasts.
const STORM: Duration = Duration::from_secs(20);

/// Client threads of the storm.
const CLIENTS: usize = 8;

/// The server's body limit (docs/api.md).
const MAX_BODY: usize = 1 << 20;

/// Bound for the guest to show progress after the storm.
const PROGRESS_WAIT: Duration = Duration::from_secs(10);

/// Every status docs/api.md lists.
const DOCUMENTED: &[u16] = &[200, 400, 403, 404, 405, 409, 413, 422, 500, 503];

/// A valid action's answers: done, or another operation holds the lock.
const OK_OR_BUSY: &[u16] = &[200, 409];

/// A value the VM refuses once it gets to it (the lock is checked first).
const REFUSED_OR_BUSY: &[u16] = &[400, 409];

/// A node the request names that does not exist, or the lock.
const MISSING_OR_BUSY: &[u16] = &[404, 409];

/// A path the request names that cannot be used (not permitted, missing,
/// not a directory), or the lock.
const BAD_PATH_OR_BUSY: &[u16] = &[403, 404, 422, 409];

/// An operation that is attempted and fails, or meets the lock.
const FAILS_OR_BUSY: &[u16] = &[500, 409];

/// The endpoints and their one method.
const ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "vm.status"),
    ("PUT", "vm.pause"),
    ("PUT", "vm.resume"),
    ("PUT", "vm.stop"),
    ("PUT", "vm.verify"),
    ("PUT", "vm.checkpoint"),
    ("PUT", "vm.numa-migrate"),
    ("GET", "vm.numa-stat"),
    ("GET", "debug.memory-map"),
    ("PUT", "vm.migrate"),
    ("PUT", "vm.migrate-cancel"),
    ("GET", "vm.migration"),
];

/// What a raw request may get back.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RawAnswer {
    /// A JSON answer with one of the request's statuses.
    Json,
    /// Not an HTTP/1.x request: an empty 400, or the connection closed
    /// without an answer.
    HttpLayer,
    /// The HTTP/2 connection preface: no answer at all (the connection is
    /// closed, or held until the server gives up on it).
    Silent,
}

/// How long a `Silent` request is watched for an answer.
const SILENCE: Duration = Duration::from_secs(1);

/// One abusive (or valid) request and the statuses it may get.
#[derive(Clone)]
struct Req {
    /// What it is, for failure messages (bodies can be megabytes).
    label: String,
    /// The bytes sent on the socket.
    bytes: Vec<u8>,
    /// Close our writing side after sending (a request cut short).
    shutdown: bool,
    /// A HEAD request: the answer has no body.
    head: bool,
    expect: &'static [u16],
    raw: RawAnswer,
}

impl std::fmt::Debug for Req {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (may get {:?})", self.label, self.expect)
    }
}

fn cut(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &s[..end], s.len())
}

/// A well-formed HTTP/1.1 request with `Connection: close`.
fn request(method: &str, path: &str, body: Option<&[u8]>, expect: &'static [u16]) -> Req {
    let mut bytes = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n")
        .into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
            .as_bytes(),
        );
    }
    bytes.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    let shown = body.map(|b| cut(&String::from_utf8_lossy(b), 120));
    Req {
        label: format!("{method} {} body {shown:?}", cut(path, 120)),
        bytes,
        shutdown: false,
        head: method == "HEAD",
        expect,
        raw: RawAnswer::Json,
    }
}

fn put(ep: &str, body: Value, expect: &'static [u16]) -> Req {
    let b = body.to_string();
    request("PUT", &format!("/api/v1/{ep}"), Some(b.as_bytes()), expect)
}

fn raw(label: &str, bytes: Vec<u8>, shutdown: bool, expect: &'static [u16], raw: RawAnswer) -> Req {
    Req {
        label: label.to_string(),
        bytes,
        shutdown,
        head: false,
        expect,
        raw,
    }
}

/// Paths the generated requests use: a checkpoint directory, and a
/// directory where nobody listens for migrations.
#[derive(Debug, Clone)]
struct Places {
    checkpoints: PathBuf,
    nobody: PathBuf,
}

fn s(p: &Path) -> String {
    p.to_str().expect("tempdir paths are UTF-8").to_string()
}

/// Reads, reads-and-waits and actions with bodies they ignore.
fn simple() -> impl Strategy<Value = Req> {
    let ignored_bodies = prop_oneof![
        Just(None),
        Just(Some("{}")),
        Just(Some("")),
        Just(Some(" \r\n\t")),
        Just(Some("[]")),
        Just(Some("null")),
        Just(Some("42")),
        Just(Some("\"resume\"")),
        Just(Some("{\"force\": true}")),
    ];
    prop_oneof![
        Just(request("GET", "/api/v1/vm.status", None, &[200])),
        Just(request("GET", "/api/v1/vm.status?x=1&y", None, &[200])),
        Just(request("GET", "/api/v1/vm.numa-stat", None, &[200])),
        Just(request("GET", "/api/v1/debug.memory-map", None, &[200])),
        Just(request("GET", "/api/v1/vm.migration", None, &[200])),
        (
            prop::sample::select(vec![
                "vm.pause",
                "vm.resume",
                "vm.verify",
                "vm.migrate-cancel"
            ]),
            ignored_bodies
        )
            .prop_map(|(ep, body)| {
                let expect = OK_OR_BUSY;
                request(
                    "PUT",
                    &format!("/api/v1/{ep}"),
                    body.map(str::as_bytes),
                    expect,
                )
            }),
    ]
}

fn checkpoints(places: &Places) -> impl Strategy<Value = Req> {
    let dir = places.checkpoints.clone();
    let good = (0..3u32, any::<bool>()).prop_map(move |(sub, full)| {
        let d = s(&dir.join(format!("chain{sub}")));
        put("vm.checkpoint", json!({"dir": d, "full": full}), OK_OR_BUSY)
    });
    let wrong_shape = prop::sample::select(vec![
        json!({}),
        json!({"dir": 5}),
        json!({"dir": null}),
        json!({"dir": ["/tmp"]}),
        json!({"dir": "/tmp/vmhop-abuse-never", "full": "yes"}),
        json!({"dir": "/tmp/vmhop-abuse-never", "stop_after": "yes"}),
        json!({"dir": "/tmp/vmhop-abuse-never", "stop_after": 1}),
        json!({"dir": "/tmp/vmhop-abuse-never", "incremental": true}),
        json!([{"dir": "/tmp/vmhop-abuse-never"}]),
        // Fields in order, as serde would take them for a struct.
        json!(["/tmp/vmhop-abuse-never", true]),
        json!("/tmp/vmhop-abuse-never"),
        json!(17),
    ])
    .prop_map(|b| put("vm.checkpoint", b, &[400]));
    let bad_dir = prop::sample::select(vec![
        "/etc/passwd",
        "/proc/vmhop-abuse",
        "/dev/null/ck",
        "/sys/vmhop-abuse",
    ])
    .prop_map(|d| put("vm.checkpoint", json!({"dir": d}), BAD_PATH_OR_BUSY));
    prop_oneof![3 => good, 2 => wrong_shape, 1 => bad_dir]
}

fn numa_moves() -> impl Strategy<Value = Req> {
    let mode = prop::sample::select(vec!["live", "stop-copy", "kernel"]);
    let good_budget = prop::sample::select(vec![
        None,
        Some(json!(0.5)),
        Some(json!(1)),
        Some(json!(250)),
    ]);
    let good =
        (mode.clone(), prop::option::of(0..2u32), good_budget).prop_map(|(mode, g, budget)| {
            let mut b = json!({"to_node": 0, "mode": mode});
            if let Some(g) = g {
                b["guest_node"] = json!(g);
            }
            if let Some(ms) = budget {
                b["max_downtime_ms"] = ms;
            }
            put("vm.numa-migrate", b, OK_OR_BUSY)
        });
    // Well-formed, refused by the VM: nodes that do not exist, budgets out
    // of range.
    let refused = (
        mode.clone(),
        prop_oneof![
            prop::sample::select(vec![1u64, 7, 1023, 4_294_967_295])
                .prop_map(|n| (json!({"to_node": n}), MISSING_OR_BUSY)),
            prop::sample::select(vec![2u64, 64, 4_294_967_295])
                .prop_map(|g| (json!({"to_node": 0, "guest_node": g}), MISSING_OR_BUSY)),
            prop::sample::select(vec![
                json!(0),
                json!(-1),
                json!(-0.0),
                json!(1e300),
                json!(60001),
                json!(-1e300)
            ])
            .prop_map(|ms| (
                json!({"to_node": 0, "max_downtime_ms": ms}),
                REFUSED_OR_BUSY
            )),
        ],
    )
        .prop_map(|(mode, (mut b, answers))| {
            b["mode"] = json!(mode);
            put("vm.numa-migrate", b, answers)
        });
    // Not a NUMA move request at all.
    let malformed = prop::sample::select(vec![
        r#"{}"#,
        r#"{"to_node": -1}"#,
        r#"{"to_node": 1.5}"#,
        r#"{"to_node": "0"}"#,
        r#"{"to_node": 1e20}"#,
        r#"{"to_node": 18446744073709551616}"#,
        r#"{"to_node": 4294967296}"#,
        r#"{"to_node": null}"#,
        r#"{"to_node": 0, "mode": "fast"}"#,
        r#"{"to_node": 0, "mode": 0}"#,
        r#"{"to_node": 0, "mode": "LIVE"}"#,
        r#"{"to_node": 0, "max_downtime_ms": "NaN"}"#,
        r#"{"to_node": 0, "max_downtime_ms": "1"}"#,
        r#"{"to_node": 0, "max_downtime_ms": true}"#,
        r#"{"to_node": 0, "max_downtime_ms": 1e400}"#,
        r#"{"to_node": 0, "guest_node": -1}"#,
        r#"{"to_node": 0, "speed": "max"}"#,
        r#"[0]"#,
        r#""to_node""#,
    ])
    .prop_map(|b| request("PUT", "/api/v1/vm.numa-migrate", Some(b.as_bytes()), &[400]));
    prop_oneof![2 => good, 2 => refused, 2 => malformed]
}

fn migrations(places: &Places) -> impl Strategy<Value = Req> {
    let nobody = places.nobody.clone();
    let to_nobody = (0..4u32).prop_map(move |i| {
        let to = format!("unix:{}", s(&nobody.join(format!("nobody-{i}.sock"))));
        put("vm.migrate", json!({ "to": to }), FAILS_OR_BUSY)
    });
    let nobody2 = places.nobody.clone();
    let not_a_socket = Just(()).prop_map(move |()| {
        // A directory, not a socket.
        let to = format!("unix:{}", s(&nobody2));
        put("vm.migrate", json!({ "to": to }), FAILS_OR_BUSY)
    });
    let closed_port = Just(put(
        "vm.migrate",
        json!({"to": "tcp://127.0.0.1:1"}),
        FAILS_OR_BUSY,
    ));
    let nonsense = prop_oneof![
        prop::sample::select(vec![
            "",
            "nowhere",
            "tcp://",
            "tcp://:::",
            "tcp://127.0.0.1",
            "tcp://127.0.0.1:99999",
            "tcp://127.0.0.1:-1",
            "tcp://host:port",
            "http://127.0.0.1:80",
            "udp://127.0.0.1:4444",
            "unix:",
            "UNIX:/tmp/x",
            "\u{0}",
        ])
        .prop_map(String::from),
        "[a-z:/.0-9]{0,40}".prop_filter("not an address", |a| {
            !a.starts_with("tcp://") && !a.starts_with("unix:")
        }),
        (1usize..64).prop_map(|k| format!("tcp://{}:1", "a".repeat(k * 1024))),
    ]
    .prop_map(|to| put("vm.migrate", json!({ "to": to }), REFUSED_OR_BUSY));
    let nobody3 = places.nobody.clone();
    let bad_numbers = prop::sample::select(vec![
        json!({"max_downtime_ms": -1}),
        json!({"max_downtime_ms": 0}),
        json!({"max_downtime_ms": 1e300}),
        json!({"timeout_s": -5}),
        json!({"timeout_s": 0}),
        json!({"timeout_s": 1e300}),
    ])
    .prop_map(move |mut b| {
        b["to"] = json!(format!("unix:{}", s(&nobody3.join("nobody-0.sock"))));
        put("vm.migrate", b, REFUSED_OR_BUSY)
    });
    let malformed = prop::sample::select(vec![
        json!({}),
        json!({"to": 5}),
        json!({"to": null}),
        json!({"to": "unix:/tmp/x", "compress": "rar"}),
        json!({"to": "unix:/tmp/x", "max_downtime_ms": "NaN"}),
        json!({"to": "unix:/tmp/x", "insecure": "yes"}),
        json!({"to": "unix:/tmp/x", "via": "carrier pigeon"}),
        json!(["unix:/tmp/x"]),
    ])
    .prop_map(|b| put("vm.migrate", b, &[400]));
    prop_oneof![
        3 => to_nobody,
        1 => not_a_socket,
        1 => closed_port,
        3 => nonsense,
        2 => bad_numbers,
        2 => malformed,
    ]
}

fn is_endpoint(path: &str) -> bool {
    let p = path.split('?').next().unwrap_or("");
    ENDPOINTS.iter().any(|(_, ep)| p == format!("/api/v1/{ep}"))
}

fn unknown_endpoints() -> impl Strategy<Value = Req> {
    let fixed = prop::sample::select(vec![
        "/",
        "/api",
        "/api/v1",
        "/api/v1/",
        "/api/v2/vm.status",
        "/api/v1/vm.nope",
        "/api/v1/VM.STATUS",
        "/api/v1/vm.status/",
        "/api/v1/vm.status/extra",
        "/api/v1/../v1/vm.status",
        "/api/v1//vm.status",
        "/api/v1/vm.status%00",
        "/vm.status",
        "*",
    ])
    .prop_map(String::from);
    let random = "/[a-zA-Z0-9./_%-]{0,80}".prop_filter("an endpoint", |p| !is_endpoint(p));
    let long = (1usize..32).prop_map(|k| format!("/api/v1/{}", "x".repeat(k * 1000)));
    (
        prop_oneof![fixed, random, long],
        prop::sample::select(vec!["GET", "PUT"]),
    )
        .prop_map(|(path, method)| {
            let body = (method == "PUT").then_some(&b"{}"[..]);
            request(method, &path, body, &[404])
        })
}

fn wrong_methods() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(ENDPOINTS.to_vec()),
        prop::sample::select(vec![
            "GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "HEAD", "put", "FOO",
        ]),
    )
        .prop_filter("the right method", |((m, _), method)| m != method)
        .prop_map(|((_, ep), method)| request(method, &format!("/api/v1/{ep}"), None, &[405]))
}

fn not_json() -> impl Strategy<Value = Req> {
    let text = prop_oneof![
        prop::sample::select(vec![
            "{",
            "{\"to_node\": ",
            "nope",
            "{'dir': '/tmp'}",
            "{\"dir\": \"/tmp\",}",
            "NaN",
            "{\"a\":1}{\"b\":2}",
            "\u{feff}{}",
        ])
        .prop_map(|t| t.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 1..256),
        (1usize..20_000).prop_map(|d| "[".repeat(d).into_bytes()),
        (129usize..5_000).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes()),
    ]
    .prop_filter("JSON or blank", |b| {
        !b.iter().all(u8::is_ascii_whitespace) && serde_json::from_slice::<Value>(b).is_err()
    });
    (
        prop::sample::select(vec![
            "vm.pause",
            "vm.resume",
            "vm.verify",
            "vm.checkpoint",
            "vm.numa-migrate",
            "vm.migrate",
            "vm.migrate-cancel",
            "vm.stop",
            "vm.nope",
        ]),
        prop::sample::select(vec!["PUT", "POST", "PATCH"]),
        text,
    )
        .prop_map(|(ep, method, body)| {
            request(method, &format!("/api/v1/{ep}"), Some(&body), &[400])
        })
}

fn huge_bodies() -> impl Strategy<Value = Req> {
    let endpoint = prop::sample::select(vec![
        "vm.pause",
        "vm.checkpoint",
        "vm.numa-migrate",
        "vm.migrate",
        "vm.stop",
        "vm.status",
        "vm.nope",
    ]);
    let over = (endpoint.clone(), 1usize..(3 * MAX_BODY)).prop_map(|(ep, extra)| {
        let pad = "a".repeat(MAX_BODY + extra);
        let body = format!("{{\"pad\": \"{pad}\"}}");
        let mut r = request(
            "PUT",
            &format!("/api/v1/{ep}"),
            Some(body.as_bytes()),
            &[413],
        );
        r.label = format!("PUT /api/v1/{ep} with a {} byte body", body.len());
        r
    });
    // Declared, never sent: refused before a byte of it is read.
    let declared = (endpoint.clone(), (MAX_BODY as u64 + 1)..(1u64 << 50)).prop_map(|(ep, len)| {
        let bytes = format!(
            "PUT /api/v1/{ep} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n{{"
        )
        .into_bytes();
        raw(
            &format!("PUT /api/v1/{ep} declaring {len} bytes"),
            bytes,
            false,
            &[413],
            RawAnswer::Json,
        )
    });
    let chunked = endpoint.clone().prop_map(|ep| {
        let mut bytes = format!(
            "PUT /api/v1/{ep} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        let chunk = vec![b' '; 256 * 1024];
        for _ in 0..5 {
            bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            bytes.extend_from_slice(&chunk);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"0\r\n\r\n");
        raw(
            &format!("PUT /api/v1/{ep} with a 1.25 MiB chunked body"),
            bytes,
            false,
            &[413],
            RawAnswer::Json,
        )
    });
    // Exactly at the limit, blank: counts as `{}`.
    let at_limit = Just(()).prop_map(|()| {
        let body = vec![b' '; MAX_BODY];
        let mut r = request("PUT", "/api/v1/vm.pause", Some(&body), OK_OR_BUSY);
        r.label = "PUT /api/v1/vm.pause with 1 MiB of blanks".into();
        r
    });
    prop_oneof![3 => over, 2 => declared, 1 => chunked, 1 => at_limit]
}

fn truncated() -> impl Strategy<Value = Req> {
    let full = "PUT /api/v1/vm.numa-migrate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                Content-Length: 14\r\n\r\n{\"to_node\": 0}";
    let head_len = full.find("\r\n\r\n").unwrap() + 4;
    // Cut anywhere in the head, then EOF: no complete request.
    let in_head = (1..head_len).prop_map(move |n| {
        raw(
            &format!("the first {n} bytes of a request, then EOF"),
            full.as_bytes()[..n].to_vec(),
            true,
            // What was sent may parse as a shorter request, to an unknown path.
            &[400, 404],
            RawAnswer::HttpLayer,
        )
    });
    // A complete head whose body is cut short, small or large: vmhop
    // refuses it with a JSON 400.
    let in_small_body = (head_len..full.len()).prop_map(move |n| {
        raw(
            &format!(
                "a request whose body stops after {} of 14 bytes",
                n - head_len
            ),
            full.as_bytes()[..n].to_vec(),
            true,
            &[400],
            RawAnswer::Json,
        )
    });
    let body = format!("{{\"to_node\": 0, \"pad\": \"{}\"}}", "x".repeat(2000));
    let in_body = (0..body.len()).prop_map(move |n| {
        let mut bytes = format!(
            "PUT /api/v1/vm.numa-migrate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(&body.as_bytes()[..n]);
        raw(
            &format!(
                "a request whose body stops after {n} of {} bytes",
                body.len()
            ),
            bytes,
            true,
            &[400],
            RawAnswer::Json,
        )
    });
    let odd: Vec<(&'static [u8], &'static [u16])> = vec![
        (b"\r\n\r\n", &[400]),
        (b"GET\r\n\r\n", &[400]),
        (b"GET / HTTP/9.9\r\n\r\n", &[400]),
        // Not a version at all ("HTTP/x.y"): an unparsable request line.
        (b"GET /api/v1/vm.status HTTP/2\r\n\r\n", &[400]),
        // A version the server does not speak.
        (b"GET /api/v1/vm.status HTTP/3.0\r\nHost: x\r\n\r\n", &[400]),
        // A malformed header may be skipped: then it is a status request.
        (
            b"GET /api/v1/vm.status HTTP/1.1\r\nno colon here\r\n\r\n",
            &[200, 400],
        ),
        (
            b"GET /api/v1/vm.status HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            &[200, 400],
        ),
        (
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            &[400],
        ),
    ];
    let http2 = Just(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]).prop_map(|b| {
        raw(
            &format!("the HTTP/2 preface {:?}", String::from_utf8_lossy(b)),
            b.to_vec(),
            true,
            &[],
            RawAnswer::Silent,
        )
    });
    let garbage = prop_oneof![
        prop::collection::vec(any::<u8>(), 1..512).prop_map(|b| (b, &[400u16][..])),
        prop::sample::select(odd).prop_map(|(b, e)| (b.to_vec(), e)),
    ]
    .prop_map(|(b, expect)| {
        raw(
            &format!("garbage {:?}", cut(&String::from_utf8_lossy(&b), 80)),
            b,
            true,
            expect,
            RawAnswer::HttpLayer,
        )
    });
    prop_oneof![2 => in_head, 1 => in_small_body, 2 => in_body, 2 => garbage, 1 => http2]
}

/// Every kind of request, weighted towards the ones that do something.
fn requests(places: &Places) -> BoxedStrategy<Req> {
    prop_oneof![
        4 => simple(),
        2 => checkpoints(places),
        4 => numa_moves(),
        3 => migrations(places),
        2 => unknown_endpoints(),
        2 => wrong_methods(),
        2 => not_json(),
        1 => huge_bodies(),
        2 => truncated(),
    ]
    .boxed()
}

/// One answer as it came off the socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends `req` on `s` (a fresh connection, or one with a request begun)
/// and reads until the server closes the connection, within
/// `REQUEST_BOUND`. `Ok(None)`: closed without an answer.
fn exchange_on(mut s: UnixStream, req: &Req) -> Result<Option<Answer>, String> {
    let started = Instant::now();
    s.set_read_timeout(Some(REQUEST_BOUND)).unwrap();
    s.set_write_timeout(Some(REQUEST_BOUND)).unwrap();
    // A server refusing a body answers and closes before reading it all;
    // its answer is still there to read.
    if let Err(e) = s.write_all(&req.bytes) {
        use std::io::ErrorKind::*;
        if !matches!(
            e.kind(),
            BrokenPipe | ConnectionReset | WouldBlock | TimedOut
        ) {
            return Err(format!("send: {e}"));
        }
    }
    if req.shutdown {
        let _ = s.shutdown(Shutdown::Write);
    }
    if req.raw == RawAnswer::Silent {
        s.set_read_timeout(Some(SILENCE)).unwrap();
        let mut got = Vec::new();
        return match s.read_to_end(&mut got) {
            Ok(_) | Err(_) if got.is_empty() => Ok(None),
            _ => Err(format!(
                "an answer where none is documented: {:?}",
                cut(&String::from_utf8_lossy(&got), 300)
            )),
        };
    }
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        if started.elapsed() > REQUEST_BOUND {
            return Err(format!(
                "no end of answer within {REQUEST_BOUND:?}; got {:?}",
                cut(&String::from_utf8_lossy(&raw), 300)
            ));
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if req.head && find(&raw, b"\r\n\r\n").is_some() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => {
                return Err(format!(
                    "read after {:?}: {e}; got {:?}",
                    started.elapsed(),
                    cut(&String::from_utf8_lossy(&raw), 300)
                ))
            }
        }
    }
    if raw.is_empty() {
        return Ok(None);
    }
    let mut rest = &raw[..];
    loop {
        let end = find(rest, b"\r\n\r\n").ok_or_else(|| {
            format!(
                "an answer without a complete head: {:?}",
                cut(&String::from_utf8_lossy(rest), 300)
            )
        })?;
        let head = String::from_utf8_lossy(&rest[..end]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad status line: {head:?}"))?;
        rest = &rest[end + 4..];
        // An interim answer (100 Continue) precedes the real one.
        if (100..200).contains(&status) {
            continue;
        }
        let len = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        });
        let body = if req.head {
            Vec::new()
        } else {
            match len {
                Some(n) if n <= rest.len() => rest[..n].to_vec(),
                Some(n) => {
                    return Err(format!(
                        "body cut short: {} of {n} bytes ({head:?})",
                        rest.len()
                    ))
                }
                None => rest.to_vec(),
            }
        };
        return Ok(Some(Answer { status, head, body }));
    }
}

/// Sends `req` and checks its answer against the rules; the answer's
/// status on success.
fn check(socket: &Path, req: &Req) -> Result<u16, String> {
    let s = UnixStream::connect(socket).map_err(|e| format!("{}: connect: {e}", req.label))?;
    check_on(s, req)
}

/// `check` on a connection already open.
fn check_on(s: UnixStream, req: &Req) -> Result<u16, String> {
    let started = Instant::now();
    let answer = exchange_on(s, req).map_err(|e| format!("{}: {e}", req.label))?;
    let took = started.elapsed();
    let fail = |what: String| Err(format!("{} (after {took:?}): {what}", req.label));
    let Some(a) = answer else {
        return match req.raw {
            RawAnswer::HttpLayer | RawAnswer::Silent => Ok(0),
            RawAnswer::Json => fail("the connection was closed without an answer".into()),
        };
    };
    // The HTTP layer's own empty answers are documented apart (414, 431).
    let http_layer = req.raw == RawAnswer::HttpLayer && a.body.is_empty();
    if !(DOCUMENTED.contains(&a.status) || http_layer && [414, 431].contains(&a.status)) {
        return fail(format!(
            "undocumented status {}: {:?} {:?}",
            a.status,
            a.head,
            cut(&String::from_utf8_lossy(&a.body), 300)
        ));
    }
    if req.raw == RawAnswer::HttpLayer && a.body.is_empty() && req.expect.contains(&a.status) {
        return Ok(a.status);
    }
    if !req.expect.contains(&a.status) {
        return fail(format!(
            "status {} where {:?} were expected: {}",
            a.status,
            req.expect,
            cut(&String::from_utf8_lossy(&a.body), 300)
        ));
    }
    if !a
        .head
        .to_ascii_lowercase()
        .contains("content-type: application/json")
    {
        return fail(format!("not a JSON answer: {:?}", a.head));
    }
    if req.head {
        return Ok(a.status);
    }
    let v: Value = match serde_json::from_slice(&a.body) {
        Ok(v) => v,
        Err(e) => {
            return fail(format!(
                "body is not JSON ({e}): {:?}",
                cut(&String::from_utf8_lossy(&a.body), 300)
            ))
        }
    };
    // The debug endpoint's report is documented as an array.
    let listing = a.status == 200 && req.label.starts_with("GET /api/v1/debug.memory-map");
    if !(v.is_object() || listing && v.is_array()) {
        return fail(format!("body is not one JSON object: {v}"));
    }
    if a.status != 200 && !v["error"].is_string() {
        return fail(format!("an error without an \"error\" message: {v}"));
    }
    if a.status == 200 && req.label.starts_with("PUT /api/v1/vm.verify") && v["ok"] != true {
        return fail(format!("verify found the guest damaged: {v}"));
    }
    Ok(a.status)
}

/// Requests held open at once by the stalling client.
const STALLED: usize = 6;

/// How long the stalling client holds its requests before finishing half
/// of them and dropping the rest.
const STALL: Duration = Duration::from_secs(3);

/// A client that starts requests and does not finish them (more than the
/// API has workers), holds them while the storm goes on, then finishes
/// half, which must still be answered, and drops the others. Returns the
/// answers' statuses.
fn staller(socket: &Path, until: Instant) -> Result<Vec<u16>, String> {
    const DECLARED: usize = 4096;
    let head = format!(
        "PUT /api/v1/vm.nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Length: {DECLARED}\r\n\r\n{{"
    );
    let mut statuses = Vec::new();
    while Instant::now() < until {
        let mut held = Vec::new();
        for _ in 0..STALLED {
            let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
            s.write_all(head.as_bytes())
                .map_err(|e| format!("send a head: {e}"))?;
            held.push(s);
        }
        thread::sleep(STALL);
        for s in held.drain(..STALLED / 2) {
            let rest = format!("{}}}", " ".repeat(DECLARED - 2));
            let req = raw(
                "a request stalled in its body, finished late",
                rest.into_bytes(),
                false,
                &[404],
                RawAnswer::Json,
            );
            statuses.push(check_on(s, &req)?);
        }
    }
    Ok(statuses)
}

/// A VM to abuse: `builtin:dirty`, 2 vCPUs, two small guest nodes.
fn victim() -> Vm {
    let vm = Vm::start(&[
        "--vcpus",
        "2",
        "--numa",
        "guest-node=0,size=32M,host-node=0",
        "--numa",
        "guest-node=1,size=32M,host-node=0",
        "--guest",
        "builtin:dirty",
    ]);
    vm.wait_progress_above(0, PROGRESS_WAIT);
    vm
}

fn places() -> (tempfile::TempDir, Places) {
    let root = tempfile::Builder::new()
        .prefix("vmhop-abuse-")
        .tempdir()
        .expect("tempdir");
    let p = Places {
        checkpoints: root.path().join("checkpoints"),
        nobody: root.path().join("nobody"),
    };
    std::fs::create_dir_all(&p.nobody).unwrap();
    (root, p)
}

/// After the abuse: the same process runs the VM on, resumed if paused,
/// making progress, consistent.
fn assert_survived(vm: &Vm) {
    let deadline = Instant::now() + REQUEST_BOUND;
    // A request of the storm may still hold the operation lock.
    loop {
        let out = vm.cli(&["resume"]);
        if out.code == Some(0) {
            break;
        }
        assert!(
            out.stderr.contains("in progress") && Instant::now() < deadline,
            "resume after the abuse failed\n{}\n{}",
            out.describe(),
            vm.logs()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let s = vm.status();
    assert_eq!(s["state"], "running", "{s}\n{}", vm.logs());
    assert_eq!(s["pid"], vm.pid(), "the same process runs the VM: {s}");
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    let v = vm.cli_ok(&["verify", "--json"]);
    let r = one_json_object(&v.stdout);
    assert_eq!(r["ok"], true, "verify after the abuse: {r}\n{}", vm.logs());
}

/// Takes turns between the two tests: each runs a VM flat out, and the
/// storm's timing bound is for one VM on this machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn every_abusive_request_gets_a_documented_answer() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (_root, places) = places();
    let vm = victim();
    let mut runner = TestRunner::new(Config {
        cases: 200,
        failure_persistence: None,
        ..Config::default()
    });
    let socket = vm.socket().to_path_buf();
    let result = runner.run(&requests(&places), |req| {
        check(&socket, &req)
            .map(|_| ())
            .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}\n{}", vm.logs());
    }
    assert_survived(&vm);
}

#[test]
fn eight_clients_abusing_the_api_at_once_get_answers_and_the_vm_runs_on() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let seed: u64 = std::env::var("VMHOP_ABUSE_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            t.as_nanos() as u64 ^ u64::from(std::process::id())
        });
    println!("abuse storm: seed {seed} (VMHOP_ABUSE_SEED), {CLIENTS} clients for {STORM:?}");
    let (_root, places) = places();
    let vm = victim();
    let socket = vm.socket().to_path_buf();
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let socket = socket.clone();
            let places = places.clone();
            let failures = Arc::clone(&failures);
            thread::spawn(move || {
                let strategy = requests(&places);
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&seed.to_le_bytes());
                key[8] = c as u8;
                let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &key);
                let mut runner = TestRunner::new_with_rng(Config::default(), rng);
                let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
                while started.elapsed() < STORM {
                    let req = strategy
                        .new_tree(&mut runner)
                        .expect("generate a request")
                        .current();
                    match check(&socket, &req) {
                        Ok(status) => *statuses.entry(status).or_default() += 1,
                        Err(e) => failures.lock().unwrap().push(format!("client {c}: {e}")),
                    }
                }
                statuses
            })
        })
        .collect();
    let stalling = {
        let socket = socket.clone();
        thread::spawn(move || staller(&socket, started + STORM))
    };
    let mut total = std::collections::BTreeMap::<u16, u64>::new();
    match stalling.join().expect("the stalling client panicked") {
        Ok(statuses) => println!("abuse storm: stalled requests finished late: {statuses:?}"),
        Err(e) => failures
            .lock()
            .unwrap()
            .push(format!("stalling client: {e}")),
    }
    for c in clients {
        for (status, n) in c.join().expect("a client thread panicked") {
            *total.entry(status).or_default() += n;
        }
    }
    println!(
        "abuse storm: {} requests in {:?}; answers by status (0: closed without one): {total:?}",
        total.values().sum::<u64>(),
        started.elapsed()
    );
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "seed {seed}: {} bad answers, the first:\n{}\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        vm.logs()
    );
    assert!(
        total.get(&200).copied().unwrap_or(0) > 0,
        "no request succeeded: {total:?}"
    );
    assert_survived(&vm);
}
