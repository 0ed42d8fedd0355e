//! The API client: one HTTP/1.1 request over a Unix socket, JSON in and out.
//!
//! This module owns the wire side of a CLI subcommand talking to a running
//! `vmhop run`: connecting (with an error that says the VM is probably not
//! running), sending the request and reading the response with hyper's
//! HTTP/1.1 client, enforcing an overall timeout and a response size limit,
//! and turning 4xx/5xx answers into [`ClientError::Api`] carrying the
//! server's `error` message.
//!
//! It does not know the routes or the request and report types; callers
//! pass paths and `serde_json::Value`s. The CLI is synchronous, so [`call`]
//! is too: it runs the exchange on a current-thread tokio runtime of its
//! own, one request per connection (`Connection: close`).

use std::error::Error as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Largest response body the client accepts. Reports are a few KiB; this only
/// bounds memory if something other than vmhop answers on the socket.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected to: usually no VM runs there.
    #[error("cannot connect to {}: is the VM running? ({source})", path.display())]
    Connect {
        /// The API socket.
        path: PathBuf,
        /// The OS error from `connect()`.
        source: io::Error,
    },
    /// Sending the request or reading the response failed.
    #[error("I/O error on API socket {}: {source}", path.display())]
    Io {
        /// The API socket.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// No complete response arrived within the caller's timeout.
    #[error("no complete response from {} within {} ms", path.display(), timeout.as_millis())]
    Timeout {
        /// The API socket.
        path: PathBuf,
        /// The timeout the caller gave.
        timeout: Duration,
    },
    /// The peer answered something that is not a well-formed HTTP/1.x JSON response.
    #[error("malformed response from {}: {reason}", path.display())]
    BadResponse {
        /// The API socket.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The caller passed a method or path that cannot go on a request line.
    #[error("invalid API request: {reason}")]
    InvalidRequest {
        /// What is wrong with it.
        reason: String,
    },
    /// The server answered with a 4xx/5xx status.
    #[error("{message} (HTTP {status})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The `error` field of the JSON body (or the body text if it has none).
        message: String,
    },
}

/// Sends one request to the vmhop API at `socket` and returns the JSON body of
/// a 2xx response (`Value::Null` if the body is empty).
///
/// `method` is `"GET"`, `"PUT"`, ...; `path` the request target
/// (`"/api/v1/vm.status"`); `body`, if any, is sent as `application/json`.
/// `timeout` bounds the whole exchange, from connecting to the last byte of
/// the response; `None` waits as long as the server takes (long operations
/// such as checkpoints and migrations). A 4xx/5xx answer is
/// [`ClientError::Api`] with the server's `error` message.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Option<Duration>,
) -> Result<Value, ClientError> {
    let request = build_request(method, path, body)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|source| ClientError::Io {
            path: socket.to_path_buf(),
            source,
        })?;
    runtime.block_on(async {
        let (status, body) = match timeout {
            None => exchange(socket, request).await?,
            Some(limit) => tokio::time::timeout(limit, exchange(socket, request))
                .await
                .map_err(|_| ClientError::Timeout {
                    path: socket.to_path_buf(),
                    timeout: limit,
                })??,
        };
        interpret(socket, status, &body)
    })
}

/// The request: method, target, headers, body.
fn build_request(
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Request<Full<Bytes>>, ClientError> {
    // Checked here, with messages of our own, so that nothing a caller
    // passes can split the request line or inject a header.
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(ClientError::InvalidRequest {
            reason: format!("method {method:?} is not an HTTP method"),
        });
    }
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientError::InvalidRequest {
            reason: format!("path {path:?} must start with '/' and contain no spaces or controls"),
        });
    }
    let invalid = |e: &dyn std::fmt::Display| ClientError::InvalidRequest {
        reason: format!("{method} {path}: {e}"),
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|e| invalid(&e))?;
    let body = body.map(|v| v.to_string().into_bytes()).unwrap_or_default();
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "localhost")
        .header(header::ACCEPT, "application/json")
        .header(header::CONNECTION, "close")
        .header(header::CONTENT_LENGTH, body.len());
    if !body.is_empty() {
        builder = builder.header(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| invalid(&e))
}

/// Connects, sends `request` and reads the response: its status and body.
async fn exchange(
    socket: &Path,
    request: Request<Full<Bytes>>,
) -> Result<(u16, Bytes), ClientError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        // Header names as most servers print them (`Content-Length`).
        .title_case_headers(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(socket, &e))?;
    // Moves the bytes; ends with the connection (the request asks the
    // server to close it), or with the runtime if we give up first.
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| failed(socket, &e))?;
    let status = response.status().as_u16();
    let too_big = || ClientError::BadResponse {
        path: socket.to_path_buf(),
        reason: format!("response body exceeds {MAX_RESPONSE_BYTES} bytes"),
    };
    let body = response.into_body();
    if body
        .size_hint()
        .exact()
        .is_some_and(|len| len > MAX_RESPONSE_BYTES as u64)
    {
        return Err(too_big());
    }
    let body = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => failed(socket, &e),
            // The only other error Limited gives.
            Err(_) => too_big(),
        })?
        .to_bytes();
    Ok((status, body))
}

/// What a hyper error means for the caller: the OS failing ([`ClientError::Io`])
/// or the peer answering something else than a complete HTTP/1.x response
/// ([`ClientError::BadResponse`]).
fn failed(socket: &Path, e: &hyper::Error) -> ClientError {
    let mut described = e.to_string();
    let mut io_error = None;
    let mut cause = e.source();
    while let Some(c) = cause {
        described.push_str(": ");
        described.push_str(&c.to_string());
        if let Some(io) = c.downcast_ref::<io::Error>() {
            io_error.get_or_insert(io.kind());
        }
        cause = c.source();
    }
    match io_error {
        // An early EOF is the peer ending its response short, not the OS.
        Some(kind) if kind != io::ErrorKind::UnexpectedEof && !e.is_incomplete_message() => {
            ClientError::Io {
                path: socket.to_path_buf(),
                source: io::Error::new(kind, described),
            }
        }
        _ => ClientError::BadResponse {
            path: socket.to_path_buf(),
            reason: described,
        },
    }
}

/// A 2xx body becomes the result; anything else becomes `ClientError::Api`.
fn interpret(socket: &Path, status: u16, body: &[u8]) -> Result<Value, ClientError> {
    let blank = body.iter().all(u8::is_ascii_whitespace);
    let parsed = if blank {
        Ok(Value::Null)
    } else {
        serde_json::from_slice::<Value>(body)
    };
    if (200..300).contains(&status) {
        return parsed.map_err(|e| ClientError::BadResponse {
            path: socket.to_path_buf(),
            reason: format!("HTTP {status} body is not JSON: {e}"),
        });
    }
    let message = match parsed {
        Ok(Value::Object(mut map)) => match map.remove("error") {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => Value::Object(map).to_string(),
        },
        _ if blank => format!("the server answered HTTP {status} with no explanation"),
        _ => String::from_utf8_lossy(body).trim().to_owned(),
    };
    Err(ClientError::Api { status, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::thread::{self, JoinHandle};
    use std::time::Instant;

    const TIMEOUT: Option<Duration> = Some(Duration::from_secs(10));

    /// A one-shot server: accepts one connection, reads one request, answers
    /// `response` verbatim, waits `linger`, closes. Returns the raw request.
    fn fake_server(
        dir: &Path,
        response: &[u8],
        linger: Duration,
    ) -> (PathBuf, JoinHandle<Vec<u8>>) {
        let path = dir.join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let response = response.to_vec();
        let handle = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let request = read_request(&mut stream);
            let _ = stream.write_all(&response);
            thread::sleep(linger);
            request
        });
        (path, handle)
    }

    fn read_request(stream: &mut UnixStream) -> Vec<u8> {
        let mut req = Vec::new();
        let mut byte = [0u8; 1];
        while !req.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).unwrap() == 0 {
                return req;
            }
            req.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&req).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).unwrap();
        req.extend(body);
        req
    }

    fn call_fake(response: &[u8]) -> Result<Value, ClientError> {
        let dir = tempfile::tempdir().unwrap();
        let (path, server) = fake_server(dir.path(), response, Duration::ZERO);
        let result = call(&path, "GET", "/api/v1/vm.status", None, TIMEOUT);
        server.join().unwrap();
        result
    }

    #[test]
    fn missing_socket_gives_connect_error_that_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody.sock");
        let err = call(&path, "GET", "/api/v1/vm.status", None, TIMEOUT).unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot connect to {}: is the VM running? (",
                path.display()
            )),
            "{msg}"
        );
        assert!(msg.contains("os error 2"), "{msg}");
    }

    #[test]
    fn request_carries_method_path_length_close_and_json_body() {
        let dir = tempfile::tempdir().unwrap();
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        let (path, server) = fake_server(dir.path(), response, Duration::ZERO);
        let body = json!({"to_node": 1});
        let got = call(
            &path,
            "PUT",
            "/api/v1/vm.numa-migrate",
            Some(&body),
            TIMEOUT,
        );
        assert_eq!(got.unwrap(), json!({}));
        let request = String::from_utf8(server.join().unwrap()).unwrap();
        assert!(
            request.starts_with("PUT /api/v1/vm.numa-migrate HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
        assert!(
            request.contains("\r\nContent-Type: application/json\r\n"),
            "{request}"
        );
        assert!(request.contains("\r\nContent-Length: 13\r\n"), "{request}");
        assert!(request.ends_with("\r\n\r\n{\"to_node\":1}"), "{request}");
    }

    #[test]
    fn chunked_response_is_decoded() {
        let got = call_fake(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;ext=1\r\n{\"a\":\r\n2\r\n 1\r\n1\r\n}\r\n0\r\nX-Trailer: t\r\n\r\n",
        );
        assert_eq!(got.unwrap(), json!({"a": 1}));
    }

    #[test]
    fn response_without_length_is_read_to_eof() {
        let got = call_fake(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n[1,2]");
        assert_eq!(got.unwrap(), json!([1, 2]));
    }

    #[test]
    fn informational_response_is_skipped() {
        let got = call_fake(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ntrue",
        );
        assert_eq!(got.unwrap(), json!(true));
    }

    #[test]
    fn empty_success_body_is_null() {
        let got = call_fake(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(got.unwrap(), Value::Null);
        let got = call_fake(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(got.unwrap(), Value::Null);
    }

    #[test]
    fn error_status_becomes_api_error_with_the_servers_message() {
        let body = br#"{"error":"VM is not paused"}"#;
        let mut response = format!(
            "HTTP/1.1 409 Conflict\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(body);
        let err = call_fake(&response).unwrap_err();
        match &err {
            ClientError::Api { status, message } => {
                assert_eq!(*status, 409);
                assert_eq!(message, "VM is not paused");
            }
            other => panic!("expected Api error, got {other:?}"),
        }
        assert_eq!(err.to_string(), "VM is not paused (HTTP 409)");
    }

    #[test]
    fn error_status_without_json_still_explains_itself() {
        let err = call_fake(b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\nboom\n").unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: 500, message } if message == "boom"),
            "{err:?}"
        );
        let err = call_fake(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n").unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: 502, message } if message.contains("502")),
            "{err:?}"
        );
    }

    #[test]
    fn malformed_responses_are_bad_response_not_panics() {
        let cases: [&[u8]; 6] = [
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnot",
            b"HTTP/1.1 200 OK\r\nContent-Le",
        ];
        for response in cases {
            let err = call_fake(response).unwrap_err();
            assert!(
                matches!(err, ClientError::BadResponse { .. }),
                "{:?} gave {err:?}",
                String::from_utf8_lossy(response)
            );
        }
    }

    #[test]
    fn oversized_responses_are_refused_without_reading_them() {
        // Declared too large: refused on the header, before the body.
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{{",
            MAX_RESPONSE_BYTES + 1
        );
        let err = call_fake(head.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, ClientError::BadResponse { reason, .. } if reason.contains("exceeds")),
            "{err:?}"
        );
        // Undeclared (read to EOF) and too large: refused at the limit.
        let dir = tempfile::tempdir().unwrap();
        let mut response = b"HTTP/1.0 200 OK\r\n\r\n".to_vec();
        response.resize(response.len() + MAX_RESPONSE_BYTES + 1, b' ');
        let (path, server) = fake_server(dir.path(), &response, Duration::ZERO);
        let err = call(&path, "GET", "/api/v1/vm.status", None, TIMEOUT).unwrap_err();
        assert!(
            matches!(&err, ClientError::BadResponse { reason, .. } if reason.contains("exceeds")),
            "{err:?}"
        );
        server.join().unwrap();
    }

    #[test]
    fn silent_server_times_out_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        // Answers nothing and keeps the connection open for 3 s.
        let (path, server) = fake_server(dir.path(), b"", Duration::from_secs(3));
        let started = Instant::now();
        let timeout = Duration::from_millis(200);
        let err = call(&path, "GET", "/api/v1/vm.status", None, Some(timeout)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("within 200 ms"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn request_line_injection_is_refused_before_connecting() {
        let path = Path::new("/nonexistent/vmhop.sock");
        for (method, target) in [
            ("GET", "/a b"),
            ("GET", "/a\r\nX-Evil: 1"),
            ("GET", "relative"),
            ("G T", "/a"),
            ("", "/a"),
        ] {
            let err = call(path, method, target, None, TIMEOUT).unwrap_err();
            assert!(
                matches!(err, ClientError::InvalidRequest { .. }),
                "{method:?} {target:?} gave {err:?}"
            );
        }
    }
}
