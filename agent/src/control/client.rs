//! A small blocking client for the agent's unix-socket API (what the CLI uses).
//!
//! HTTP/1.1 is hyper's (`hyper::client::conn::http1` over a tokio `UnixStream`): one connection
//! per request, driven on a current-thread runtime made for the call, so callers stay blocking.
//! A call from inside a tokio runtime runs on a thread of its own (a runtime cannot block on
//! another). The whole exchange, connection included, is bounded by the client's timeout.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::ErrorEnvelope;
use crate::util::error_chain;

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {path}: {source}; is `ferry agent` running (`systemctl status ferry-agent`)? Use --socket or --host to pick another")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent sent a malformed response: {0}")]
    Protocol(String),
    /// The request could not be made (a method or path that is not valid HTTP).
    #[error("cannot make the request {method} {path}: {reason}")]
    Request {
        method: String,
        path: String,
        reason: String,
    },
    /// The agent refused the request; `message` says why.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

/// A client bound to one agent socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
            timeout: Duration::from_secs(600),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Bound each request (connection, sending, the whole answer) by `t` instead of 600 s.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Send a request; returns status and body.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let req = request(method, path, body)?;
        block_on(self.exchange(req))?
    }

    /// One request on a fresh connection, within the timeout.
    async fn exchange(&self, req: Request<Full<Bytes>>) -> Result<(u16, Vec<u8>), ClientError> {
        let work = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(from_hyper)?;
            // The connection's I/O runs beside the request; it ends when the agent closes.
            let driver = tokio::spawn(conn);
            let resp = sender.send_request(req).await.map_err(from_hyper)?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(from_hyper)?
                .to_bytes();
            driver.abort();
            Ok((status, body.to_vec()))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the agent did not answer within {:.1} s",
                    self.timeout.as_secs_f64()
                ),
            ))),
        }
    }

    /// Send JSON (or nothing) and decode a JSON answer; API errors become [`ClientError::Api`].
    pub fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let bytes = match body {
            Some(b) => {
                Some(serde_json::to_vec(b).map_err(|e| ClientError::Protocol(e.to_string()))?)
            }
            None => None,
        };
        let (status, body) = self.raw(method, path, bytes.as_deref())?;
        if !(200..300).contains(&status) {
            return Err(match serde_json::from_slice::<ErrorEnvelope>(&body) {
                Ok(e) => ClientError::Api {
                    status,
                    code: e.error.code,
                    message: e.error.message,
                },
                Err(_) => ClientError::Api {
                    status,
                    code: "http".into(),
                    message: format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
                },
            });
        }
        let body = if body.is_empty() {
            b"null".to_vec()
        } else {
            body
        };
        serde_json::from_slice(&body).map_err(|e| {
            ClientError::Protocol(format!("{e} in {}", String::from_utf8_lossy(&body)))
        })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>("GET", path, None)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call("POST", path, Some(body))
    }

    pub fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>("POST", path, None)
    }

    pub fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.call::<(), serde_json::Value>("DELETE", path, None)
            .map(|_| ())
    }
}

/// The request as the agent expects it: JSON, the length given, one request per connection.
fn request(
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Request<Full<Bytes>>, ClientError> {
    let body = Bytes::copy_from_slice(body.unwrap_or(&[]));
    Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, "ferry")
        .header(CONNECTION, "close")
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .body(Full::new(body))
        .map_err(|e| ClientError::Request {
            method: method.into(),
            path: path.into(),
            reason: e.to_string(),
        })
}

/// hyper's error as ours: what the agent sent that is not HTTP (a bad head, a bad chunk, an
/// answer cut short) is [`ClientError::Protocol`]; a failed read or write [`ClientError::Io`]
/// (with its kind).
fn from_hyper(e: hyper::Error) -> ClientError {
    let io_kind = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    // hyper reports a bad chunk or a body shorter than its length as an I/O error of these kinds.
    let malformed = e.is_parse()
        || e.is_incomplete_message()
        || matches!(
            io_kind,
            Some(
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::InvalidData
                    | std::io::ErrorKind::InvalidInput
            )
        );
    match io_kind {
        Some(kind) if !malformed => ClientError::Io(std::io::Error::new(kind, error_chain(&e))),
        _ => ClientError::Protocol(error_chain(&e)),
    }
}

/// Run `fut` to completion on a current-thread runtime of its own (on a thread of its own when
/// called from inside a runtime, where blocking on another would panic).
fn block_on<F>(fut: F) -> Result<F::Output, ClientError>
where
    F: Future + Send,
    F::Output: Send,
{
    let run = move || -> Result<F::Output, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        Ok(rt.block_on(fut))
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    std::thread::scope(|s| s.spawn(run).join()).unwrap_or_else(|_| {
        Err(ClientError::Io(std::io::Error::other(
            "the thread talking to the agent panicked",
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A socket path of its own per test (removed when the guard drops).
    struct TempSocket(PathBuf);

    impl TempSocket {
        fn new() -> TempSocket {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "ferry-client-{}-{}.sock",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_file(&p);
            TempSocket(p)
        }
    }

    impl Drop for TempSocket {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Serve one connection: read the request head and its body, answer `response`, close.
    /// Returns what the client sent.
    fn serve_once(
        listener: UnixListener,
        response: &'static [u8],
    ) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                if n == 0 || complete(&got) {
                    break;
                }
            }
            s.write_all(response).unwrap();
            got
        })
    }

    /// The head has arrived and as many body bytes as its Content-Length says.
    fn complete(req: &[u8]) -> bool {
        let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        req.len() >= end + 4 + len
    }

    #[test]
    fn sends_json_and_reads_plain_and_chunked_answers() {
        let sock = TempSocket::new();
        let l = UnixListener::bind(&sock.0).unwrap();
        let server = serve_once(l, b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}");
        let c = Client::new(&sock.0);
        let (st, body) = c.raw("POST", "/v1/vms", Some(b"{\"a\":1}")).unwrap();
        assert_eq!((st, body.as_slice()), (201, &b"{}"[..]));
        let sent = String::from_utf8(server.join().unwrap()).unwrap();
        assert!(sent.starts_with("POST /v1/vms HTTP/1.1\r\n"), "{sent}");
        let lower = sent.to_ascii_lowercase();
        for h in [
            "host: ferry",
            "content-type: application/json",
            "content-length: 7",
            "connection: close",
        ] {
            assert!(lower.contains(h), "{h} missing from {sent}");
        }
        assert!(sent.ends_with("\r\n\r\n{\"a\":1}"), "{sent}");

        let sock = TempSocket::new();
        let l = UnixListener::bind(&sock.0).unwrap();
        let server = serve_once(
            l,
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        );
        let (st, body) = Client::new(&sock.0).raw("GET", "/x", None).unwrap();
        assert_eq!((st, body.as_slice()), (404, &b"abcde"[..]));
        server.join().unwrap();
    }

    #[test]
    fn api_errors_carry_the_agents_code_and_message() {
        let sock = TempSocket::new();
        let l = UnixListener::bind(&sock.0).unwrap();
        let server = serve_once(
            l,
            b"HTTP/1.1 409 Conflict\r\ncontent-length: 69\r\n\r\n{\"error\":{\"status\":409,\"code\":\"conflict\",\"message\":\"pause it first\"}}",
        );
        let e = Client::new(&sock.0)
            .get::<serde_json::Value>("/v1/vms/v/digest")
            .unwrap_err();
        match e {
            ClientError::Api {
                status,
                code,
                message,
            } => assert_eq!(
                (status, code.as_str(), message.as_str()),
                (409, "conflict", "pause it first")
            ),
            other => panic!("not an API error: {other:?}"),
        }
        server.join().unwrap();
    }

    #[test]
    fn malformed_and_truncated_answers_are_protocol_errors() {
        for answer in [
            &b"garbage\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let sock = TempSocket::new();
            let l = UnixListener::bind(&sock.0).unwrap();
            let server = serve_once(l, answer);
            let e = Client::new(&sock.0).raw("GET", "/", None).unwrap_err();
            assert!(
                matches!(e, ClientError::Protocol(_)),
                "{:?} gave {e:?}",
                String::from_utf8_lossy(answer)
            );
            server.join().unwrap();
        }
    }

    #[test]
    fn no_agent_is_a_connect_error_naming_the_socket() {
        let sock = TempSocket::new();
        let e = Client::new(&sock.0).raw("GET", "/", None).unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("cannot reach the agent at"), "{text}");
        assert!(text.contains(&sock.0.display().to_string()), "{text}");
    }

    #[test]
    fn a_silent_agent_times_out() {
        let sock = TempSocket::new();
        let l = UnixListener::bind(&sock.0).unwrap();
        // Accepted by the kernel (the backlog), never answered.
        let c = Client::new(&sock.0).with_timeout(Duration::from_millis(200));
        let t = std::time::Instant::now();
        let e = c.raw("GET", "/", None).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        match e {
            ClientError::Io(io) => assert_eq!(io.kind(), std::io::ErrorKind::TimedOut),
            other => panic!("not a timeout: {other:?}"),
        }
        drop(l);
    }

    #[test]
    fn works_from_inside_a_runtime_and_refuses_a_bad_path() {
        let sock = TempSocket::new();
        let l = UnixListener::bind(&sock.0).unwrap();
        let server = serve_once(l, b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnull");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let c = Client::new(&sock.0);
        let v: serde_json::Value = rt.block_on(async { c.get("/v1/host") }).unwrap();
        assert!(v.is_null());
        server.join().unwrap();
        let e = c.raw("GET", "/a b", None).unwrap_err();
        assert!(matches!(e, ClientError::Request { .. }), "{e:?}");
    }
}
