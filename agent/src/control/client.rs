//! A small blocking HTTP/1.1 client for the agent's unix-socket API (what the CLI uses).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::ErrorEnvelope;

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
        let mut s = UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            path: self.socket.clone(),
            source,
        })?;
        s.set_read_timeout(Some(self.timeout))?;
        s.set_write_timeout(Some(self.timeout))?;
        let body = body.unwrap_or(&[]);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)?;
        parse_response(&resp)
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

fn find(h: &[u8], needle: &[u8]) -> Option<usize> {
    h.windows(needle.len()).position(|w| w == needle)
}

/// Parse an HTTP/1.1 response (Content-Length, chunked, or read-to-close bodies).
fn parse_response(resp: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let end =
        find(resp, b"\r\n\r\n").ok_or_else(|| ClientError::Protocol("no end of headers".into()))?;
    let head = std::str::from_utf8(&resp[..end])
        .map_err(|_| ClientError::Protocol("headers are not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| ClientError::Protocol("bad status line".into()))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = v.parse::<usize>().ok();
        }
    }
    let body = &resp[end + 4..];
    if chunked {
        let mut out = Vec::new();
        let mut rest = body;
        loop {
            let nl = find(rest, b"\r\n")
                .ok_or_else(|| ClientError::Protocol("bad chunk header".into()))?;
            let size_text = std::str::from_utf8(&rest[..nl])
                .map_err(|_| ClientError::Protocol("bad chunk size".into()))?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| ClientError::Protocol("bad chunk size".into()))?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size {
                return Err(ClientError::Protocol("truncated chunk".into()));
            }
            out.extend_from_slice(&rest[..size]);
            rest = rest.get(size + 2..).unwrap_or(&[]);
        }
        return Ok((status, out));
    }
    match length {
        Some(n) if body.len() >= n => Ok((status, body[..n].to_vec())),
        Some(_) => Err(ClientError::Protocol("truncated body".into())),
        None => Ok((status, body.to_vec())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r).unwrap(), (200, b"{}".to_vec()));
        let r = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), (404, b"abcde".to_vec()));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }
}
