//! The agent's local HTTP/JSON API, served on a unix socket (`/run/ferry/agent.sock`, mode 0660).
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/v1/host` | | [`HostInfo`] |
//! | GET | `/v1/vms` | | `[VmSummary]` |
//! | POST | `/v1/vms` | [`CreateRequest`] | 201 [`VmInfo`] |
//! | GET | `/v1/vms/{name}` | | [`VmInfo`] |
//! | DELETE | `/v1/vms/{name}` | | 204 |
//! | POST | `/v1/vms/{name}/start` `pause` `resume` `stop` | | [`VmInfo`] |
//! | GET | `/v1/vms/{name}/console?offset=N&max=M` | | [`ConsoleChunk`] |
//! | POST | `/v1/vms/{name}/save` | `{"dir": "/abs/path"}` | [`SaveOutcome`] |
//! | GET | `/v1/vms/{name}/digest` | | `{"digest": "crc32c:..."}` (paused VMs) |
//! | POST | `/v1/vms/{name}/verify` | | [`VerifyOutcome`] (paused workload VMs) |
//! | POST | `/v1/restore` | `{"dir": "/abs/path", "name": null, "paused": false}` | 201 [`VmInfo`] |
//! | POST | `/v1/migrations` | [`MigrateRequest`] | 201 [`MigrationRecord`] (runs in the background) |
//! | GET | `/v1/migrations` | | `[MigrationRecord]` (running and past, both directions) |
//! | GET | `/v1/migrations/{id}` | | [`MigrationRecord`] (progress, then summary or error) |
//! | POST | `/v1/migrations/{id}/cancel` | | [`MigrationRecord`] |
//! | GET | `/v1/stats` | | link counters, rates and pinning (eBPF) |
//! | GET | `/v1/vms/{name}/check?to=PEER` | | pre-migration checks ([`crate::checks::CheckReport`]) |
//! | POST | `/v1/cpu/baseline` | `{"peers": ["b"]}` | CPU features common to this host and the peers |
//! | GET, POST, DELETE | `/v1/debug/faults` | POST: `{"point": "dest:round:1", "action": "kill"}` | armed faults (only with `[debug] faults = true`; see [`crate::faults`]) |
//! | POST | `/v1/disks/unlock` | `{"disk": "[shared] dk/dk.img"}` | the stale lock's former holder (409 while its host is alive) |
//! | POST | `/v1/ping` | `{"to": "b"}` (ICMP over the migration NIC) or with `"throughput": {"streams": 2, "secs": 3, "bytes": 0, "mode": "tcp"}` | probe result |
//!
//! Served by [`super::api_server`]: a request's head must arrive within 10 s, its body within
//! 10 s (408) and 4 MiB (413), at most 128 connections at once.
//!
//! Errors are `{"error": {"status": 404, "code": "not_found", "message": "..."}}` with a 4xx
//! status for requests that are wrong (malformed JSON with its line and column, unknown fields,
//! unknown VM, bad shape, no room) and 5xx only for failures of the host.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::agent::{Agent, AgentError, MigrateRequest, PingRequest};
#[allow(unused_imports)]
use super::agent::{ConsoleChunk, HostInfo, SaveOutcome, VerifyOutcome, VmInfo};
use crate::migrate::MigrationRecord;
use crate::vm::{GuestKind, VmSpec};

/// Body of `POST /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub kind: GuestKind,
    #[serde(default)]
    pub disks: Vec<crate::vm::DiskSpec>,
    #[serde(default)]
    pub nics: Vec<crate::vm::NicSpec>,
    #[serde(default)]
    pub cpu: crate::vm::cpuid::CpuPolicy,
    /// Run it at once.
    #[serde(default)]
    pub start: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveRequest {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub dir: PathBuf,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub paused: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub status: u16,
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

/// An API error response.
pub struct ApiError(u16, &'static str, String);

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        let msg = crate::util::error_chain(&e);
        if e.status() >= 500 {
            tracing::error!(error = %msg, "request failed");
        }
        ApiError(e.status(), e.code(), msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(ErrorEnvelope {
                error: ErrorBody {
                    status: self.0,
                    code: self.1.into(),
                    message: self.2,
                },
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn parse<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError(
            400,
            "invalid",
            "request body is empty; send a JSON object".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError(400, "invalid", format!("malformed request body: {e}")))
}

/// The API's routes over an [`Agent`].
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(inspect).delete(destroy))
        .route("/v1/vms/{name}/start", post(start))
        .route("/v1/vms/{name}/pause", post(pause))
        .route("/v1/vms/{name}/resume", post(resume))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/save", post(save))
        .route("/v1/vms/{name}/digest", get(digest))
        .route("/v1/vms/{name}/verify", post(verify))
        .route("/v1/restore", post(restore))
        .route("/v1/migrations", get(migrations).post(migrate))
        .route("/v1/migrations/{id}", get(migration))
        .route("/v1/migrations/{id}/cancel", post(cancel_migration))
        .route("/v1/ping", post(ping))
        .route("/v1/disks/unlock", post(unlock_disk))
        .route("/v1/stats", get(stats))
        .route("/v1/vms/{name}/check", get(check))
        .route("/v1/cpu/baseline", post(baseline))
        .route(
            "/v1/debug/faults",
            get(faults_list).post(faults_arm).delete(faults_clear),
        )
        .fallback(|| async {
            ApiError(
                404,
                "no_route",
                "no such API path; see `ferry --help`".into(),
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError(405, "method", "method not allowed on this path".into())
        })
        .with_state(agent)
}

fn faults_enabled(a: &Agent) -> ApiResult<()> {
    if a.config.debug.faults {
        Ok(())
    } else {
        Err(ApiError(
            403,
            "forbidden",
            "fault injection is off on this agent: it needs [debug] faults = true in its config (tests only)".into(),
        ))
    }
}

async fn faults_list(State(a): State<Arc<Agent>>) -> ApiResult<Json<Vec<crate::faults::Fault>>> {
    faults_enabled(&a)?;
    Ok(Json(crate::faults::list()))
}

async fn faults_arm(
    State(a): State<Arc<Agent>>,
    body: Bytes,
) -> ApiResult<Json<Vec<crate::faults::Fault>>> {
    faults_enabled(&a)?;
    let f: crate::faults::Fault = parse(&body)?;
    crate::faults::arm(f).map_err(|e| ApiError(400, "invalid", e.to_string()))?;
    Ok(Json(crate::faults::list()))
}

async fn faults_clear(State(a): State<Arc<Agent>>) -> ApiResult<StatusCode> {
    faults_enabled(&a)?;
    crate::faults::clear();
    Ok(StatusCode::NO_CONTENT)
}

async fn host(State(a): State<Arc<Agent>>) -> impl IntoResponse {
    Json(a.host_info())
}

async fn list(State(a): State<Arc<Agent>>) -> impl IntoResponse {
    Json(a.list())
}

async fn create(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<impl IntoResponse> {
    let req: CreateRequest = parse(&body)?;
    let spec = VmSpec {
        name: req.name,
        memory_mib: req.memory_mib,
        vcpus: req.vcpus,
        kind: req.kind,
        disks: req.disks,
        nics: req.nics,
        cpu: req.cpu,
    };
    let a2 = a.clone();
    let info = tokio::task::spawn_blocking(move || a2.create(spec, req.start))
        .await
        .map_err(|e| ApiError(500, "internal", e.to_string()))??;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn inspect(State(a): State<Arc<Agent>>, Path(name): Path<String>) -> ApiResult<Json<VmInfo>> {
    Ok(Json(a.inspect(&name)?))
}

async fn destroy(State(a): State<Arc<Agent>>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    a.destroy(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start(State(a): State<Arc<Agent>>, Path(name): Path<String>) -> ApiResult<Json<VmInfo>> {
    Ok(Json(a.start(&name).await?))
}

async fn pause(State(a): State<Arc<Agent>>, Path(name): Path<String>) -> ApiResult<Json<VmInfo>> {
    Ok(Json(a.pause(&name).await?))
}

async fn resume(State(a): State<Arc<Agent>>, Path(name): Path<String>) -> ApiResult<Json<VmInfo>> {
    Ok(Json(a.resume(&name).await?))
}

async fn stop(State(a): State<Arc<Agent>>, Path(name): Path<String>) -> ApiResult<Json<VmInfo>> {
    Ok(Json(a.stop(&name).await?))
}

#[derive(Debug, Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default = "default_max")]
    max: usize,
}

fn default_max() -> usize {
    64 << 10
}

async fn console(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    q: Result<Query<ConsoleQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<ConsoleChunk>> {
    let Query(q) = q.map_err(|e| ApiError(400, "invalid", e.body_text()))?;
    Ok(Json(a.console(&name, q.offset, q.max)?))
}

async fn save(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<SaveOutcome>> {
    let req: SaveRequest = parse(&body)?;
    Ok(Json(a.save(&name, req.dir).await?))
}

async fn digest(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let d = a.digest(&name).await?;
    Ok(Json(serde_json::json!({ "digest": d })))
}

async fn verify(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> ApiResult<Json<VerifyOutcome>> {
    Ok(Json(a.verify(&name).await?))
}

async fn restore(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<impl IntoResponse> {
    let req: RestoreRequest = parse(&body)?;
    let info = a.restore(req.dir, req.name, req.paused).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn migrations(State(a): State<Arc<Agent>>) -> impl IntoResponse {
    Json(a.migrations())
}

async fn migrate(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<impl IntoResponse> {
    let req: MigrateRequest = parse(&body)?;
    let rec = a.start_migration(req).await?;
    Ok((StatusCode::CREATED, Json(rec)))
}

async fn migration(
    State(a): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> ApiResult<Json<MigrationRecord>> {
    Ok(Json(a.migration(&id)?))
}

async fn cancel_migration(
    State(a): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> ApiResult<Json<MigrationRecord>> {
    Ok(Json(a.cancel_migration(&id)?))
}

/// `POST /v1/disks/unlock`: break a stale disk lock.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnlockRequest {
    pub disk: String,
}

async fn unlock_disk(
    State(a): State<Arc<Agent>>,
    body: Bytes,
) -> ApiResult<Json<crate::checks::disklock::LockHolder>> {
    let req: UnlockRequest = parse(&body)?;
    Ok(Json(a.break_disk_lock(&req.disk)?))
}

async fn ping(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<Json<serde_json::Value>> {
    let req: PingRequest = parse(&body)?;
    let v = if req.throughput.is_some() {
        serde_json::to_value(a.ping_throughput(req).await?)
    } else {
        serde_json::to_value(a.ping(&req.to).await?)
    };
    v.map(Json)
        .map_err(|e| ApiError(500, "internal", e.to_string()))
}

#[derive(Debug, Deserialize)]
struct CheckQuery {
    to: String,
}

async fn check(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    q: Result<Query<CheckQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<crate::checks::CheckReport>> {
    let Query(q) =
        q.map_err(|e| ApiError(400, "invalid", format!("{}: give ?to=PEER", e.body_text())))?;
    Ok(Json(a.check(&name, &q.to).await?))
}

/// Body of `POST /v1/cpu/baseline`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineRequest {
    pub peers: Vec<String>,
}

async fn baseline(
    State(a): State<Arc<Agent>>,
    body: Bytes,
) -> ApiResult<Json<super::agent::Baseline>> {
    let req: BaselineRequest = parse(&body)?;
    Ok(Json(a.cpu_baseline(req.peers).await?))
}

async fn stats(State(a): State<Arc<Agent>>) -> impl IntoResponse {
    Json(a.stats())
}
