//! Serving the local API's unix socket with limits, so that clients that connect and then send
//! nothing, send their headers slowly or never send the body they announced cannot hold the
//! agent's connections (or fds) for long:
//!
//! - the request head must arrive within [`HEADER_TIMEOUT`] of the connection opening or of
//!   the previous response (idle keep-alive connections close then too);
//! - the body must arrive within [`BODY_TIMEOUT`] (else 408), and be at most [`MAX_BODY`]
//!   bytes (else 413);
//! - at most [`MAX_CONNECTIONS`] connections at once: a new one over the cap closes the oldest
//!   connection that has no request being handled (idle, or still sending its request), and is
//!   refused only when every connection is busy with a request.
//!
//! Handlers themselves have no time limit: `ferry migrate` without `--detach` may wait minutes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

use crate::ratelimit::RateLimit;
use crate::warn_limited;

/// Time to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to send a request's body once its head arrived.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body.
pub const MAX_BODY: usize = 4 << 20;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 128;

/// The open connections: id → (requests being handled, signal that closes it).
#[derive(Default)]
struct Conns {
    next: u64,
    open: BTreeMap<u64, (Arc<AtomicUsize>, oneshot::Sender<()>)>,
}

impl Conns {
    /// Room for one more: close the oldest connection with no request in hand if at the cap.
    /// None when every connection is busy.
    fn admit(&mut self) -> Option<(u64, Arc<AtomicUsize>, oneshot::Receiver<()>, bool)> {
        let mut evicted = false;
        if self.open.len() >= MAX_CONNECTIONS {
            let idle = self
                .open
                .iter()
                .find(|(_, (busy, _))| busy.load(Ordering::SeqCst) == 0)
                .map(|(id, _)| *id)?;
            self.open.remove(&idle);
            evicted = true;
        }
        let id = self.next;
        self.next += 1;
        let busy = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = oneshot::channel();
        self.open.insert(id, (busy.clone(), tx));
        Some((id, busy, rx, evicted))
    }
}

fn lock(c: &Mutex<Conns>) -> std::sync::MutexGuard<'_, Conns> {
    match c.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn error(status: StatusCode, code: &str, message: String) -> Response<Body> {
    let body =
        serde_json::json!({"error": {"status": status.as_u16(), "code": code, "message": message}});
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    r
}

/// One request: its body within the limits, then the router, counted as busy meanwhile.
async fn handle(
    mut app: Router,
    busy: Arc<AtomicUsize>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => {
            return Ok(error(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            ))
        }
        Ok(Err(e)) => {
            let too_large = e.is::<http_body_util::LengthLimitError>();
            return Ok(if too_large {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the request body is larger than {MAX_BODY} bytes"),
                )
            } else {
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("reading the request body failed: {e}"),
                )
            });
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    busy.fetch_add(1, Ordering::SeqCst);
    let req = Request::from_parts(parts, Body::from(bytes));
    let r = tower_service::Service::call(&mut app, req).await;
    busy.fetch_sub(1, Ordering::SeqCst);
    r
}

/// Serve `app` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let conns = Arc::new(Mutex::new(Conns::default()));
    let refused = RateLimit::new(Duration::from_secs(10));
    let accept_errors = RateLimit::new(Duration::from_secs(10));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn_limited!(accept_errors, error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let Some((id, busy, closed, evicted)) = lock(&conns).admit() else {
            warn_limited!(
                refused,
                cap = MAX_CONNECTIONS,
                "API connection refused: every connection is busy with a request"
            );
            continue;
        };
        if evicted {
            warn_limited!(
                refused,
                cap = MAX_CONNECTIONS,
                "API connections at the cap: closed the oldest idle one"
            );
        }
        let app = app.clone();
        let conns = conns.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(app.clone(), busy.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = closed => {}
            }
            lock(&conns).open.remove(&id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_cap_the_oldest_idle_connection_goes() {
        let mut c = Conns::default();
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(c.admit().unwrap());
        }
        // The first two are handling requests: the third is the oldest idle one.
        held[0].1.store(1, Ordering::SeqCst);
        held[1].1.store(1, Ordering::SeqCst);
        let (_, _, _, evicted) = c.admit().unwrap();
        assert!(evicted);
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        assert!(held[2].2.try_recv().is_err(), "its close signal fired");
        assert!(c.open.contains_key(&0) && c.open.contains_key(&1));
        // All busy: refused.
        for (_, (b, _)) in c.open.iter() {
            b.store(1, Ordering::SeqCst);
        }
        assert!(c.admit().is_none());
    }
}
