//! The API client: one HTTP/1.1 request over a Unix socket, JSON in and out.
//!
//! This module owns the wire side of a CLI subcommand talking to a running
//! `vmhop run`: connecting (with an error that says the VM is probably not
//! running), writing the request, parsing the response (Content-Length,
//! chunked, or until EOF), enforcing an overall timeout, and turning 4xx/5xx
//! answers into [`ClientError::Api`] carrying the server's `error` message.
//!
//! It does not know the routes or the request and report types; callers
//! pass paths and `serde_json::Value`s. It is deliberately hand-rolled and
//! small: one request per connection (`Connection: close`), no TLS, no
//! redirects, no keep-alive.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Largest response body the client accepts. Reports are a few KiB; this only
/// bounds memory if something other than vmhop answers on the socket.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Largest status line plus headers the client accepts.
const MAX_HEAD_BYTES: usize = 64 << 10;

/// How much is read from the socket at a time.
const READ_CHUNK: usize = 64 << 10;

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
    let request = encode_request(method, path, body)?;
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let mut exchange = Exchange {
        socket,
        stream,
        deadline: timeout.map(|t| Instant::now() + t),
        timeout: timeout.unwrap_or_default(),
        buf: Vec::new(),
    };
    if let Err(send_error) = exchange.send(&request) {
        // A server may answer (413, say) and close before reading a whole
        // request; its answer explains more than our EPIPE would.
        if !matches!(&send_error, ClientError::Io { source, .. } if is_peer_gone(source)) {
            return Err(send_error);
        }
        return match exchange.receive() {
            Ok((status, body)) => interpret(socket, status, &body),
            Err(_) => Err(send_error),
        };
    }
    let (status, body) = exchange.receive()?;
    interpret(socket, status, &body)
}

fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// The request bytes: request line, headers, body.
fn encode_request(method: &str, path: &str, body: Option<&Value>) -> Result<Vec<u8>, ClientError> {
    // Validated so that nothing a caller passes can split the request line or
    // inject a header.
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
    let body = body.map(|v| v.to_string().into_bytes()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Connection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(&body);
    Ok(request)
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

/// Status line and the headers that decide how the body is framed.
struct Head {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
}

/// One connection: the stream, the deadline, and bytes read but not yet parsed.
struct Exchange<'a> {
    socket: &'a Path,
    stream: UnixStream,
    deadline: Option<Instant>,
    /// Only for the error message.
    timeout: Duration,
    buf: Vec<u8>,
}

impl Exchange<'_> {
    fn io_err(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            path: self.socket.to_path_buf(),
            source,
        }
    }

    fn bad(&self, reason: impl Into<String>) -> ClientError {
        ClientError::BadResponse {
            path: self.socket.to_path_buf(),
            reason: reason.into(),
        }
    }

    fn timed_out(&self) -> ClientError {
        ClientError::Timeout {
            path: self.socket.to_path_buf(),
            timeout: self.timeout,
        }
    }

    /// Time left before the deadline (`None`: no deadline).
    fn remaining(&self) -> Result<Option<Duration>, ClientError> {
        match self.deadline {
            None => Ok(None),
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Ok(Some(left)),
                _ => Err(self.timed_out()),
            },
        }
    }

    fn send(&mut self, mut bytes: &[u8]) -> Result<(), ClientError> {
        while !bytes.is_empty() {
            let left = self.remaining()?;
            self.stream
                .set_write_timeout(left)
                .map_err(|e| self.io_err(e))?;
            match self.stream.write(bytes) {
                Ok(0) => return Err(self.io_err(io::ErrorKind::WriteZero.into())),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(self.timed_out()),
                Err(e) => return Err(self.io_err(e)),
            }
        }
        Ok(())
    }

    /// Reads more bytes into `buf`; returns how many (0 at end of stream).
    fn fill(&mut self) -> Result<usize, ClientError> {
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            let left = self.remaining()?;
            self.stream
                .set_read_timeout(left)
                .map_err(|e| self.io_err(e))?;
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(self.timed_out()),
                Err(e) => return Err(self.io_err(e)),
            }
        }
    }

    /// The next line, without its CRLF (or bare LF).
    fn take_line(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut searched = 0;
        loop {
            if let Some(i) = self.buf[searched..].iter().position(|&b| b == b'\n') {
                let end = searched + i;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            searched = self.buf.len();
            if searched > MAX_HEAD_BYTES {
                return Err(self.bad(format!("a header line exceeds {MAX_HEAD_BYTES} bytes")));
            }
            if self.fill()? == 0 {
                return Err(self.bad("connection closed in the middle of the response headers"));
            }
        }
    }

    /// Exactly `n` more bytes.
    fn take_exact(&mut self, n: usize) -> Result<Vec<u8>, ClientError> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                let got = self.buf.len();
                return Err(self.bad(format!("connection closed after {got} of {n} body bytes")));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Everything until the peer closes the connection.
    fn take_to_eof(&mut self) -> Result<Vec<u8>, ClientError> {
        while self.fill()? != 0 {
            if self.buf.len() > MAX_RESPONSE_BYTES {
                return Err(self.too_big());
            }
        }
        Ok(std::mem::take(&mut self.buf))
    }

    fn too_big(&self) -> ClientError {
        self.bad(format!("response body exceeds {MAX_RESPONSE_BYTES} bytes"))
    }

    fn read_head(&mut self) -> Result<Head, ClientError> {
        let status_line = self.take_line()?;
        let status = parse_status_line(&status_line).map_err(|reason| self.bad(reason))?;
        let mut head = Head {
            status,
            content_length: None,
            chunked: false,
        };
        let mut head_bytes = status_line.len();
        loop {
            let line = self.take_line()?;
            if line.is_empty() {
                return Ok(head);
            }
            head_bytes += line.len();
            if head_bytes > MAX_HEAD_BYTES {
                return Err(self.bad(format!("response headers exceed {MAX_HEAD_BYTES} bytes")));
            }
            let line = String::from_utf8_lossy(&line);
            let Some((name, value)) = line.split_once(':') else {
                return Err(self.bad(format!("header line {line:?} has no ':'")));
            };
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") {
                let len = value
                    .parse::<usize>()
                    .map_err(|_| self.bad(format!("invalid Content-Length {value:?}")))?;
                head.content_length = Some(len);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut body = Vec::new();
        loop {
            let line = self.take_line()?;
            let text = String::from_utf8_lossy(&line);
            // Chunk extensions (";name=value") carry nothing vmhop uses.
            let size_text = text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| self.bad(format!("invalid chunk size {text:?}")))?;
            if size == 0 {
                // Trailer fields, then the empty line that ends the message.
                while !self.take_line()?.is_empty() {}
                return Ok(body);
            }
            if body.len().saturating_add(size) > MAX_RESPONSE_BYTES {
                return Err(self.too_big());
            }
            body.extend(self.take_exact(size)?);
            if !self.take_line()?.is_empty() {
                return Err(self.bad("chunk data not followed by CRLF"));
            }
        }
    }

    /// Reads the final response: status and decoded body.
    fn receive(&mut self) -> Result<(u16, Vec<u8>), ClientError> {
        loop {
            let head = self.read_head()?;
            // 1xx (100 Continue) precede the real response.
            if (100..200).contains(&head.status) {
                continue;
            }
            // These never have a body, whatever the headers say.
            if head.status == 204 || head.status == 304 {
                return Ok((head.status, Vec::new()));
            }
            let body = if head.chunked {
                self.read_chunked()?
            } else if let Some(len) = head.content_length {
                if len > MAX_RESPONSE_BYTES {
                    return Err(self.too_big());
                }
                self.take_exact(len)?
            } else {
                self.take_to_eof()?
            };
            return Ok((head.status, body));
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// `HTTP/1.1 200 OK` → 200.
fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    let text = String::from_utf8_lossy(line);
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {text:?}"));
    }
    match code.parse::<u16>() {
        Ok(status) if code.len() == 3 && (100..=599).contains(&status) => Ok(status),
        _ => Err(format!("invalid status code in {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::net::UnixListener;
    use std::thread::{self, JoinHandle};

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
