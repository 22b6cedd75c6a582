//! The web dashboard, served on the ops port beside `/metrics`, `/healthz` and `/readyz`: one
//! static page (`dashboard/index.html`, `app.js`, `app.css`, compiled in; no build step, nothing
//! fetched from elsewhere) over a small JSON API ([`api`]): counts per status and a throughput
//! sparkline, the failed and rejected messages with their reasons, one message's timeline, and
//! redrive (the same [`crate::admin::redrive`] as the `Admin` RPC).
//!
//! **Auth** — the Admin API's tokens (`RECHECK_ADMIN_TOKENS`), checked by
//! [`recheck::BearerAuth::accepts`] (constant time). A request is let in by either
//! - `Authorization: Bearer <token>` (scripts, `curl`), or
//! - the session cookie a browser gets from the sign-in form (`POST /dashboard/login`): HttpOnly
//!   (page scripts never see the token), `SameSite=Strict`, 12 h.
//!
//! A state change (redrive) authenticated by the cookie must also carry the page's own
//! `x-recheck-dashboard` header, which a cross-site form cannot send. Missing or wrong → 401 (the
//! page answers with the sign-in form). Every response carries a strict Content-Security-Policy
//! (scripts and styles from this origin only, no inline script), and the page writes every value
//! as text (`textContent`), never as HTML: reasons are whatever a consumer put in its CONFIRM.

mod api;

use std::sync::Arc;

use axum::{
    Form, Json, Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use recheck::{BearerAuth, Publisher, Topology, auth::bearer_token};
use serde::Deserialize;
use serde_json::json;

use crate::store::Store;

const INDEX: &str = include_str!("dashboard/index.html");
const LOGIN: &str = include_str!("dashboard/login.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// The session cookie: the token, hex-encoded (any printable token is a valid cookie value).
pub const COOKIE: &str = "recheck_dashboard";
/// Header the page sends with every request; required on a cookie-authenticated state change.
pub const PAGE_HEADER: &str = "x-recheck-dashboard";
/// How long a browser session lasts.
const SESSION_SECONDS: u32 = 12 * 3600;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What the dashboard reads and changes. Cheap to clone.
#[derive(Clone)]
pub struct Dashboard {
    store: Arc<Store>,
    publisher: Publisher,
    topology: Topology,
    auth: BearerAuth,
    /// Sign-in attempts, all clients together: a guessed token costs a minute per few tries.
    sign_ins: Arc<governor::DefaultDirectRateLimiter>,
}

/// Sign-in attempts allowed: a burst of this many, then one every [`SIGN_IN_PERIOD`].
pub const SIGN_IN_BURST: u32 = 5;
pub const SIGN_IN_PERIOD: std::time::Duration = std::time::Duration::from_secs(12);

impl Dashboard {
    /// `auth` with no tokens = open, like the Admin API without `RECHECK_ADMIN_TOKENS`.
    pub fn new(store: Arc<Store>, publisher: Publisher, topology: Topology, auth: BearerAuth) -> Self {
        let quota = governor::Quota::with_period(SIGN_IN_PERIOD)
            .expect("a non-zero period")
            .allow_burst(std::num::NonZeroU32::new(SIGN_IN_BURST).expect("a non-zero burst"));
        let sign_ins = Arc::new(governor::RateLimiter::direct(quota));
        Self { store, publisher, topology, auth, sign_ins }
    }

    /// `/dashboard` (page, sign-in, sign-out, assets) and `/api/...`, to mount on the ops server.
    pub fn router(self) -> Router {
        let protected = Router::new()
            .route("/dashboard", get(|| async { Html(INDEX) }))
            .route("/api/stats", get(api::stats))
            .route("/api/messages", get(api::list))
            .route("/api/messages/{id}", get(api::message))
            .route("/api/messages/{id}/redrive", post(api::redrive))
            .route("/api/redrive", post(api::redrive_all))
            .route_layer(middleware::from_fn_with_state(self.clone(), authorize));
        Router::new()
            .route("/", get(|| async { Redirect::to("/dashboard") }))
            .route("/dashboard/login", get(login_page).post(login))
            .route("/dashboard/logout", post(logout))
            .route("/dashboard/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
            .route("/dashboard/app.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
            .merge(protected)
            .layer(middleware::from_fn(security_headers))
            .with_state(self)
    }
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, content_type)], body)
}

/// The token in the session cookie, if any.
fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, value)| from_hex(value))
}

fn to_hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(hex: &str) -> Option<String> {
    let digits = hex.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    let bytes = digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

async fn authorize(State(d): State<Dashboard>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token);
    let by_header = bearer.is_some();
    let allowed = !d.auth.enabled()
        || match bearer {
            Some(token) => d.auth.accepts(token),
            None => session_token(headers).is_some_and(|token| d.auth.accepts(&token)),
        };
    let api = request.uri().path().starts_with("/api/");
    if !allowed {
        return if api {
            let challenge = [(header::WWW_AUTHENTICATE, "Bearer")];
            (StatusCode::UNAUTHORIZED, challenge, Json(json!({ "error": "missing or invalid token" })))
                .into_response()
        } else {
            (StatusCode::UNAUTHORIZED, Html(LOGIN)).into_response()
        };
    }
    // A browser attaches the cookie by itself, even to a form posted from another site on this
    // host; such a form cannot add a header.
    let safe = matches!(*request.method(), Method::GET | Method::HEAD);
    if !safe && !by_header && !headers.contains_key(PAGE_HEADER) {
        let error = json!({ "error": format!("a state change needs the {PAGE_HEADER} header") });
        return (StatusCode::FORBIDDEN, Json(error)).into_response();
    }
    next.run(request).await
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn login_page(State(d): State<Dashboard>) -> Response {
    if d.auth.enabled() { Html(LOGIN).into_response() } else { Redirect::to("/dashboard").into_response() }
}

#[derive(Deserialize)]
struct SignIn {
    token: String,
}

async fn login(State(d): State<Dashboard>, headers: HeaderMap, Form(form): Form<SignIn>) -> Response {
    // Before the token is even compared: a guess over the limit learns nothing.
    if let Err(not_until) = d.sign_ins.check() {
        let wait =
            not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
        tracing::warn!(?wait, "dashboard sign-in refused: too many attempts");
        let retry_after = wait.as_secs().max(1).to_string();
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after)],
            "too many sign-in attempts",
        )
            .into_response();
    }
    if !d.auth.accepts(&form.token) {
        tracing::warn!("dashboard sign-in with a wrong token");
        let page = LOGIN.replace(r#"<p class="error" hidden>"#, r#"<p class="error">"#);
        return (StatusCode::UNAUTHORIZED, Html(page)).into_response();
    }
    // Behind a TLS-terminating proxy the cookie is marked Secure.
    let https = headers.get("x-forwarded-proto").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECONDS}{}",
        to_hex(&form.token),
        if https { "; Secure" } else { "" }
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/dashboard")).into_response()
}

async fn logout() -> Response {
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/dashboard/login")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_session_cookie_among_others() {
        let mut headers = HeaderMap::new();
        let value = format!("a=b; {COOKIE}={}; c=d", to_hex("t;0k=n"));
        headers.insert(header::COOKIE, value.parse().unwrap());
        assert_eq!(session_token(&headers).as_deref(), Some("t;0k=n"));
        headers.insert(header::COOKIE, format!("{COOKIE}=zz").parse().unwrap());
        assert_eq!(session_token(&headers), None);
        assert_eq!(session_token(&HeaderMap::new()), None);
    }

    #[test]
    fn the_pages_load_only_their_own_assets() {
        for page in [INDEX, LOGIN] {
            assert!(!page.contains("http://") && !page.contains("https://"), "an external reference");
            assert!(!page.contains("<script>"), "an inline script (the CSP forbids it)");
            assert!(!page.contains("style="), "an inline style (the CSP forbids it)");
        }
        assert!(!SCRIPT.contains("innerHTML"), "the page must write values as text");
        assert!(LOGIN.contains(r#"<p class="error" hidden>"#));
    }
}
