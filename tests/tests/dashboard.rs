//! The callback service's web dashboard, on its ops port: the JSON API and its authentication
//! over plain HTTP (SQLite and PostgreSQL stores), and the page itself in a real headless
//! Chromium driven through Debian's chromedriver: sign in, see a failed message with its reason,
//! click Redrive, see it become confirmed. The browser test saves `target/dashboard.png`.

mod common;
#[allow(dead_code)] // the callback suite uses the rest
#[path = "callback/harness.rs"]
mod harness;

use std::{net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use callback_service::store::Status;
use fantoccini::{Client, ClientBuilder, Locator};
use harness::{Env, Mode};
use recheck::{
    BearerAuth,
    message::{Confirm, ConfirmBatch, Outcome, now_ms},
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use common::wait_for;

const TOKEN: &str = "dashboard-test-token";
const SOON: Duration = Duration::from_secs(30);
/// A reason a consumer controls: the page must show it as text, never run it.
const HOSTILE: &str = r#"<img src=x onerror="document.title='pwned'"><b>bold</b> & "quotes""#;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A callback service whose Admin API and dashboard want [`TOKEN`]; its hook answers
/// RETRY_LATER, so unpublished orders end `failed` ("producer unreachable") within seconds.
async fn start(url: &str) -> Env {
    let env = Env::start(url, |c| {
        c.admin_tokens = Some(BearerAuth::new([TOKEN.to_owned()]));
        c.unreachable_deadline = Duration::from_secs(3);
    })
    .await;
    env.hook.set_mode(Mode::RetryLater);
    env
}

/// An order committed but never published, left to fail.
async fn failed_order(env: &Env, key: &str) -> Uuid {
    let id = env.order(key, false).await;
    let row = env.wait_status(id, Status::Failed, SOON).await;
    assert!(row.last_error.as_deref().unwrap_or_default().starts_with("producer unreachable"), "{row:?}");
    id
}

/// A message a consumer rejected with [`HOSTILE`] as the detail (a bare CONFIRM creates the row).
async fn hostile_rejection(env: &Env) -> Uuid {
    let id = Uuid::now_v7();
    let confirm = Confirm {
        message_id: id,
        outcome: Outcome::Rejected,
        detail: Some(HOSTILE.into()),
        processed_at: now_ms(),
    };
    let body = serde_json::to_vec(&ConfirmBatch::new("points", vec![confirm])).unwrap();
    env.publisher
        .publish(recheck::Outgoing {
            exchange: &env.topology.confirms_exchange(),
            routing_key: "",
            body: &body,
            properties: lapin::BasicProperties::default(),
        })
        .await
        .unwrap();
    env.wait_status(id, Status::Rejected, SOON).await;
    id
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One HTTP/1.0 request (the connection closes after the answer).
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line.split_whitespace().nth(1).unwrap().parse().unwrap();
    Reply { status, headers: headers.to_owned(), body: body.to_owned() }
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    http(addr, "GET", path, headers, "").await
}

const BEARER: (&str, &str) = ("Authorization", "Bearer dashboard-test-token");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_auth_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    api_and_auth(&format!("sqlite://{}/callback.db?mode=rwc", dir.path().display())).await;
}

/// Guessing the token is rate-limited (governor, all clients together): after the burst, even
/// the right token gets 429 with a Retry-After, so a guess costs about the period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_guesses_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let env = start(&format!("sqlite://{}/callback.db?mode=rwc", dir.path().display())).await;
    let ops = env.ops_addrs[0];
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let burst = callback_service::dashboard::SIGN_IN_BURST;
    for guess in 0..burst {
        let refused = http(ops, "POST", "/dashboard/login", &form, &format!("token=guess-{guess}")).await;
        assert_eq!(refused.status, 401, "guess {guess} within the burst is answered");
    }
    let limited = http(ops, "POST", "/dashboard/login", &form, &format!("token={TOKEN}")).await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    let retry_after = limited.header("retry-after").expect("a Retry-After header");
    assert!(retry_after.parse::<u64>().is_ok_and(|s| s >= 1), "{retry_after}");
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_auth_on_postgres() {
    let db = recheck_tests::kit().await.postgres.fresh_database().await.unwrap();
    api_and_auth(&db.url).await;
}

async fn api_and_auth(url: &str) {
    let mut env = start(url).await;
    let ops = env.ops_addrs[0];

    // The ops endpoints stay open; the dashboard and its API do not.
    assert_eq!(get(ops, "/healthz", &[]).await.status, 200);
    assert_eq!(get(ops, "/metrics", &[]).await.status, 200);
    for headers in [&[][..], &[("Authorization", "Bearer wrong")], &[("Authorization", TOKEN)]] {
        let reply = get(ops, "/api/stats", headers).await;
        assert_eq!(reply.status, 401, "{headers:?}: {}", reply.body);
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        let page = get(ops, "/dashboard", headers).await;
        assert_eq!(page.status, 401, "{headers:?}");
        assert!(page.body.contains(r#"action="/dashboard/login""#), "the sign-in form: {}", page.body);
    }
    let wrong_cookie = format!("recheck_dashboard={}", hex("wrong"));
    assert_eq!(get(ops, "/api/stats", &[("Cookie", &wrong_cookie)]).await.status, 401);
    assert_eq!(get(ops, "/api/stats", &[BEARER]).await.status, 200);
    // Static assets hold no data.
    assert_eq!(get(ops, "/dashboard/app.js", &[]).await.status, 200);

    // Sign-in: a wrong token is refused, the right one sets an HttpOnly, SameSite=Strict cookie.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let refused = http(ops, "POST", "/dashboard/login", &form, "token=wrong").await;
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("Wrong token.") && !refused.body.contains("hidden>Wrong"));
    let signed_in = http(ops, "POST", "/dashboard/login", &form, &format!("token={TOKEN}")).await;
    assert_eq!(signed_in.status, 303);
    assert_eq!(signed_in.header("location"), Some("/dashboard"));
    let set_cookie = signed_in.header("set-cookie").unwrap().to_owned();
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    assert!(!set_cookie.contains(TOKEN), "the cookie holds the token encoded: {set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let page = get(ops, "/dashboard", &[("Cookie", &cookie)]).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains(r#"<script src="/dashboard/app.js" defer>"#));
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'none'"), "{csp}");
    assert_eq!(get(ops, "/api/stats", &[("Cookie", &cookie)]).await.status, 200);

    // Data: two failed orders, one hostile rejection.
    let (a, b) = tokio::join!(failed_order(&env, "o-1"), failed_order(&env, "o-2"));
    let [first, second] = if a < b { [a, b] } else { [b, a] };
    let rejected = hostile_rejection(&env).await;

    let stats = get(ops, "/api/stats", &[BEARER]).await.json();
    assert_eq!(stats["counts"]["failed"], 2, "{stats}");
    assert_eq!(stats["counts"]["rejected"], 1, "{stats}");
    assert_eq!(stats["total"], 3, "{stats}");
    let confirms: u64 =
        stats["throughput"]["confirms"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum();
    let resends: u64 =
        stats["throughput"]["resends"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!((confirms, resends), (1, 0), "{stats}");
    assert_eq!(stats["throughput"]["confirms"].as_array().unwrap().len(), 61);

    // The failed list, paged, each with its reason.
    let page1 = get(ops, "/api/messages?status=failed&limit=1", &[BEARER]).await.json();
    assert_eq!(page1["messages"][0]["message_id"], first.to_string(), "{page1}");
    assert!(page1["messages"][0]["reason"].as_str().unwrap().starts_with("producer unreachable"), "{page1}");
    let after = page1["next"].as_str().unwrap();
    let page2 =
        get(ops, &format!("/api/messages?status=failed&limit=1&after={after}"), &[BEARER]).await.json();
    assert_eq!(page2["messages"][0]["message_id"], second.to_string(), "{page2}");
    let listed = get(ops, "/api/messages?status=rejected", &[BEARER]).await.json();
    assert_eq!(listed["messages"][0]["message_id"], rejected.to_string());
    assert_eq!(listed["messages"][0]["reason"], format!("rejected by points: {HOSTILE}"), "{listed}");
    assert_eq!(listed["next"], Value::Null);
    assert_eq!(get(ops, "/api/messages?status=bogus", &[BEARER]).await.status, 400);

    // One message's timeline.
    let shown = get(ops, &format!("/api/messages/{first}"), &[BEARER]).await.json();
    assert_eq!(shown["message"]["status"], "failed");
    let kinds: Vec<&str> =
        shown["timeline"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["published", "status"], "{shown}");
    assert!(shown["timeline"][1]["title"].as_str().unwrap().starts_with("pending → failed"), "{shown}");
    assert_eq!(get(ops, &format!("/api/messages/{}", Uuid::now_v7()), &[BEARER]).await.status, 404);

    // Redrive: a cookie alone does not make a state change (a cross-site form could send it).
    let redrive = format!("/api/messages/{first}/redrive");
    let forged = http(ops, "POST", &redrive, &[("Cookie", &cookie)], "").await;
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert_eq!(http(ops, "POST", &redrive, &[], "").await.status, 401);
    env.hook.set_mode(Mode::Real);
    env.start_consumer().await;
    let page_request = [("Cookie", cookie.as_str()), ("x-recheck-dashboard", "1")];
    let redriven = http(ops, "POST", &redrive, &page_request, "").await;
    assert_eq!(redriven.status, 200, "{}", redriven.body);
    assert_eq!(redriven.json()["message"]["status"], "pending");
    env.wait_status(first, Status::Confirmed, SOON).await;
    assert_eq!(env.points(first).await, 1);
    let again = http(ops, "POST", &redrive, &[BEARER], "").await;
    assert_eq!(again.status, 409, "{}", again.body);
    let timeline = get(ops, &format!("/api/messages/{first}"), &[BEARER]).await.json()["timeline"].clone();
    let kinds: Vec<&str> = timeline.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"resend") && kinds.contains(&"confirm"), "{timeline}");

    // Signing out clears the cookie.
    let out = http(ops, "POST", "/dashboard/logout", &[("Cookie", &cookie)], "").await;
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    env.shutdown().await;
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Debian's chromedriver on a free port, stopped when dropped.
struct Driver {
    _process: tokio::process::Child,
    url: String,
    profile: tempfile::TempDir,
}

impl Driver {
    async fn start() -> Driver {
        for (path, what) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: the dashboard's browser test needs Debian's `{what}` package \
                 (`apt-get install chromium chromium-driver`; scripts/test installs it)"
            );
        }
        let port = recheck_tests::free_port().unwrap();
        let process = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting chromedriver");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_for("chromedriver to listen", SOON, || async move {
            tokio::net::TcpStream::connect(addr).await.ok().map(drop)
        })
        .await;
        Driver { _process: process, url: format!("http://{addr}"), profile: tempfile::tempdir().unwrap() }
    }

    /// A headless Chromium session with a fresh profile and none of its background traffic.
    async fn browser(&self) -> Client {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
        ]
        .map(str::to_owned)
        .into_iter()
        .chain([format!("--user-data-dir={}", self.profile.path().display())])
        .collect::<Vec<_>>();
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        let Value::Object(capabilities) = capabilities else { unreachable!() };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a Chromium session through chromedriver")
    }
}

/// The text of the first element matching `css`, once `done` accepts it (or the test fails).
async fn wait_text(browser: &Client, css: &str, within: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = None;
    loop {
        if let Ok(element) = browser.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
        {
            if done(&text) {
                return text;
            }
            last = Some(text);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} on {css:?} (last text {last:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_from_the_page_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = start(&format!("sqlite://{}/callback.db?mode=rwc", dir.path().display())).await;
    let driver = Driver::start().await;
    // Two failed orders: one is redriven, the other stays on the list.
    let (a, b) = tokio::join!(failed_order(&env, "o-41"), failed_order(&env, "o-42"));
    let [other, failed] = if a < b { [a, b] } else { [b, a] };
    let rejected = hostile_rejection(&env).await;
    let base = format!("http://{}", env.ops_addrs[0]);

    let browser = driver.browser().await;
    browser.set_window_size(1400, 1100).await.unwrap();
    // Without a session the page is the sign-in form.
    browser.goto(&format!("{base}/dashboard")).await.unwrap();
    browser.find(Locator::Id("token")).await.unwrap().send_keys(TOKEN).await.unwrap();
    browser.find(Locator::Id("sign-in")).await.unwrap().click().await.unwrap();

    // The failed message with its reason, the rejection's reason as plain text.
    let row = format!(r#"#failed tr[data-id="{failed}"]"#);
    let reason = wait_text(&browser, &format!("{row} td.reason"), SOON, |t| !t.is_empty()).await;
    assert!(reason.starts_with("producer unreachable"), "{reason}");
    let shown = wait_text(&browser, &format!(r#"#rejected tr[data-id="{rejected}"] td.reason"#), SOON, |t| {
        !t.is_empty()
    })
    .await;
    assert_eq!(shown, format!("rejected by points: {HOSTILE}"));
    let injected =
        browser.execute("return document.querySelectorAll('main img, main b').length", vec![]).await;
    assert_eq!(injected.unwrap(), json!(0), "the reason was rendered as HTML");
    assert_eq!(browser.title().await.unwrap(), "Recheck dashboard");
    wait_text(&browser, "#count-failed", SOON, |t| t == "2").await;

    // The producer is back; the operator redrives the message from its row.
    env.hook.set_mode(Mode::Real);
    env.start_consumer().await;
    browser.find(Locator::Css(&format!("{row} button.redrive"))).await.unwrap().click().await.unwrap();
    wait_text(&browser, "#detail-id", SOON, |t| t == failed.to_string()).await;
    wait_text(&browser, "#detail-status", Duration::from_secs(60), |t| t == "confirmed").await;
    wait_text(&browser, "#count-confirmed", SOON, |t| t == "1").await;
    wait_text(&browser, "#count-failed", SOON, |t| t == "1").await;
    wait_text(&browser, &format!(r#"#failed tr[data-id="{other}"] td.reason"#), SOON, |t| !t.is_empty())
        .await;
    let rows = browser.find_all(Locator::Css("#failed tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 1, "the redriven message left the failed list");
    let timeline = wait_text(&browser, "#timeline", SOON, |t| t.contains("confirm from points")).await;
    assert!(timeline.contains("failed → pending") && timeline.contains("redrive"), "{timeline}");
    assert_eq!(env.points(failed).await, 1);

    let png = browser.screenshot().await.unwrap();
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().to_owned();
    std::fs::write(target.join("dashboard.png"), &png).unwrap();
    eprintln!("screenshot: {}", target.join("dashboard.png").display());
    browser.close().await.unwrap();
    env.shutdown().await;
}
