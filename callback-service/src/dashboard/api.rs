//! The dashboard's JSON API (behind [`super::authorize`]):
//!
//! - `GET /api/stats` — counts per status, rates over the last minute, and the throughput series
//!   (confirms and resends per 15 s over the last 15 minutes);
//! - `GET /api/messages?status=failed&after=ID&limit=20` — a page of one status, each with the
//!   reason of its latest transition; `next` continues after the last id;
//! - `GET /api/messages/{id}` — one message and its timeline (published, status changes, resends,
//!   confirms, the next check);
//! - `POST /api/messages/{id}/redrive` — [`crate::admin::redrive`]; 409 unless failed / rejected;
//! - `POST /api/redrive?status=failed&producer=P&since=MS&limit=N` — [`crate::admin::redrive_many`]
//!   (`status` failed or rejected, else 400; `limit` up to 10 000, 1 000 when absent).

use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use recheck::message::now_ms;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Dashboard;
use crate::{
    admin::{DEFAULT_BULK, MAX_BULK, RedriveError, redrive as redrive_message, redrive_many},
    store::{ConfirmRow, MessageRow, Status, StoreError, Transition},
};

/// The sparkline: this many milliseconds back, in buckets of [`BUCKET_MS`].
pub const WINDOW_MS: i64 = 15 * 60_000;
pub const BUCKET_MS: i64 = 15_000;
const DEFAULT_PAGE: u32 = 20;
const MAX_PAGE: u32 = 100;

pub(super) struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "dashboard query failed");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

pub(super) async fn stats(State(d): State<Dashboard>) -> ApiResult {
    let now = now_ms();
    let counts = d.store.counts().await?;
    let (confirms, resends) = d.store.activity_since(now - 60_000).await?;
    let start = (now - WINDOW_MS).div_euclid(BUCKET_MS) * BUCKET_MS;
    let buckets = usize::try_from(WINDOW_MS / BUCKET_MS).unwrap_or(0) + 1;
    let (mut confirm_series, mut resend_series) = (vec![0u64; buckets], vec![0u64; buckets]);
    for (at, c, r) in d.store.throughput(start, BUCKET_MS).await? {
        if let Some(i) = usize::try_from((at - start) / BUCKET_MS).ok().filter(|i| *i < buckets) {
            confirm_series[i] = c;
            resend_series[i] = r;
        }
    }
    Ok(Json(json!({
        "total": counts.total(),
        "counts": counts.by_status.iter().map(|(s, n)| (s.as_str().to_owned(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "awaiting_check": counts.awaiting_check,
        "confirms_per_second": confirms as f64 / 60.0,
        "resends_per_second": resends as f64 / 60.0,
        "throughput": {
            "start": start,
            "bucket_ms": BUCKET_MS,
            "confirms": confirm_series,
            "resends": resend_series,
        },
    })))
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    status: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

pub(super) async fn list(State(d): State<Dashboard>, Query(q): Query<ListQuery>) -> ApiResult {
    let status = match q.status.as_deref() {
        None | Some("") => Status::Failed,
        Some(s) => Status::parse(s)
            .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, format!("unknown status {s:?}")))?,
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let (rows, next) = d.store.list(Some(status), limit, q.after.as_deref().unwrap_or("")).await?;
    let ids: Vec<&str> = rows.iter().map(|r| r.message_id.as_str()).collect();
    let mut reasons = d.store.latest_reasons(&ids).await?;
    let messages: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut m = message_json(row);
            let reason = reasons.remove(&row.message_id).or_else(|| row.last_error.clone());
            m["reason"] = json!(reason);
            m
        })
        .collect();
    Ok(Json(json!({ "status": status.as_str(), "messages": messages, "next": next })))
}

pub(super) async fn message(State(d): State<Dashboard>, Path(id): Path<String>) -> ApiResult {
    let (row, confirms, history) = d
        .store
        .details(&id)
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no message {id}")))?;
    Ok(Json(json!({ "message": message_json(&row), "timeline": timeline(&row, &confirms, &history) })))
}

pub(super) async fn redrive(State(d): State<Dashboard>, Path(id): Path<String>) -> ApiResult {
    match redrive_message(&d.store, &d.publisher, &d.topology, &id).await {
        Ok(row) => Ok(Json(json!({ "message": message_json(&row) }))),
        Err(e @ RedriveError::NotRedrivable(_)) => Err(ApiError(StatusCode::CONFLICT, e.to_string())),
        Err(e) => {
            tracing::warn!(message_id = %id, error = %e, "dashboard redrive failed");
            Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct BulkQuery {
    status: String,
    producer: Option<String>,
    since: Option<i64>,
    limit: Option<u32>,
}

pub(super) async fn redrive_all(State(d): State<Dashboard>, Query(q): Query<BulkQuery>) -> ApiResult {
    let status = match Status::parse(&q.status) {
        Some(s @ (Status::Failed | Status::Rejected)) => s,
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("status {:?}: failed or rejected", q.status),
            ));
        }
    };
    let limit = q.limit.unwrap_or(DEFAULT_BULK);
    if limit == 0 || limit > MAX_BULK {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("limit {limit}: 1 to {MAX_BULK}")));
    }
    let producer = q.producer.as_deref().filter(|p| !p.is_empty());
    match redrive_many(&d.store, &d.publisher, &d.topology, status, producer, q.since.unwrap_or(0), limit)
        .await
    {
        Ok(bulk) => Ok(Json(json!({ "message_ids": bulk.ids, "more": bulk.more }))),
        Err(e) => {
            tracing::warn!(error = %e, "dashboard bulk redrive failed");
            Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        }
    }
}

fn message_json(row: &MessageRow) -> Value {
    json!({
        "message_id": row.message_id,
        "producer": row.producer,
        "routing_key": row.routing_key,
        "business_key": row.business_key,
        "expect": row.expect,
        "status": row.status.as_str(),
        "awaiting_check": row.awaiting_check(),
        "attempt": row.attempt,
        "resend_count": row.resend_count,
        "next_check_at": row.next_check_at,
        "last_error": row.last_error,
        "published_at": row.published_at,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    })
}

/// Everything known about a message, oldest first: `{at, kind, title, detail}` with `kind` one of
/// `published`, `status` (a change of status), `resend`, `confirm`, `check` (the next one due).
fn timeline(row: &MessageRow, confirms: &[ConfirmRow], history: &[Transition]) -> Vec<Value> {
    let entry = |at: i64, kind: &str, title: String, detail: Option<&str>| json!({ "at": at, "kind": kind, "title": title, "detail": detail });
    let mut entries = Vec::new();
    if row.published_at > 0 {
        let title = format!("published by {} ({}, key {})", row.producer, row.routing_key, row.business_key);
        entries.push(entry(row.published_at, "published", title, None));
    }
    for t in history {
        let from = t.from.map_or("new", Status::as_str);
        let (kind, title) = match t.to {
            Status::Resent => ("resend", format!("resent (attempt {})", t.attempt)),
            to => ("status", format!("{from} → {} (attempt {})", to.as_str(), t.attempt)),
        };
        entries.push(entry(t.at, kind, title, Some(&t.reason)));
    }
    for c in confirms {
        let title = format!("confirm from {}: {}", c.consumer, c.outcome.as_str());
        entries.push(entry(c.processed_at, "confirm", title, c.detail.as_deref()));
    }
    if row.awaiting_check() {
        // Not a state of its own: a confirm cannot settle a message whose CHECK (and so whose
        // `expect`) has not been seen; say so, with the time of the last confirm.
        let at = confirms.iter().map(|c| c.processed_at).max().unwrap_or(row.updated_at);
        let by: Vec<&str> = confirms.iter().map(|c| c.consumer.as_str()).collect();
        let title = if by.is_empty() {
            "waiting for its check".to_owned()
        } else {
            format!("confirmed by {}; waiting for its check to know whether more are expected", by.join(", "))
        };
        entries.push(entry(at, "check", title, None));
    }
    if !row.status.is_terminal() && row.next_check_at > 0 {
        let title = format!("next check due (attempt {})", row.attempt);
        entries.push(entry(row.next_check_at, "check", title, None));
    }
    // Stable: a confirm and the status change it caused keep their order.
    entries.sort_by_key(|e| e["at"].as_i64().unwrap_or(0));
    entries
}
