//! Tracing across the three real binaries: one order's spans in upstream-demo, downstream-demo
//! and callback-service share one trace id.
//!
//! A small load with dropped publishes (committed, never published: the callback service must
//! resend them) runs with JSON logs (`RECHECK_LOG_FORMAT=json`). Then, from the logs alone:
//! every order's lines in the producer and the consumer carry one trace id, and a resent order's
//! lines in all three services — `resend` in the producer's hook, `message handled` in the
//! consumer, `resent` in the callback service — carry that same id, one per order.
//!
//! upstream-demo and callback-service also export their spans over OTLP to a collector this test
//! serves in-process; downstream-demo exports nothing (propagation needs no collector). The
//! exported spans show the parent links across the process boundaries: the callback's
//! `reconcile` span is a child of the producer's `prepare` (the CHECK's `traceparent`), and the
//! hook's `resend` span a child of `reconcile` (gRPC metadata).

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value as AnyValueKind},
};
use recheck_tests::deploy::{DeployOptions, Deployment, LoadOptions, Role};
use serde_json::Value;
use tokio_stream::wrappers::TcpListenerStream;

const ORDERS: u64 = 40;
/// Debug for the SDK and the demos: `check prepared`, `message handled`, `order created`.
const LOG_FILTER: &str = "info,recheck=debug,upstream_demo=debug,downstream_demo=debug";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_id_crosses_all_three_services() {
    recheck_tests::init_tracing();
    let kit = recheck_tests::kit().await;
    let vhost = kit.rabbit.fresh_vhost().await.unwrap();
    let collector = Collector::start().await.unwrap();

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tracing");
    let mut opts = DeployOptions::new(&dir, vhost.url.clone());
    // A reserved CHECK is published before any request holds its id, so it carries no
    // `traceparent`: the `reconcile` → `prepare` link below holds for group-committed CHECKs.
    opts.reserve = false;
    let logs = [("RECHECK_LOG", LOG_FILTER), ("RECHECK_LOG_FORMAT", "json")].map(owned);
    let export = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
        // Export within a fraction of a second (the default batches for 5 s).
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ]
    .map(owned);
    opts.callback_env = [logs.clone(), export.clone()].concat();
    opts.upstream_env = [logs.clone(), export].concat();
    opts.consumers[0].env = logs.to_vec();
    let d = Deployment::start(&recheck_tests::demo::bin_dir().unwrap(), &opts).await.unwrap();

    let load = LoadOptions { skip_publish_rate: 0.25, rate: 100, ..LoadOptions::new(ORDERS) };
    let report = d.load(&load).await.unwrap();
    let verdict = d.wait_settled(Duration::from_secs(60)).await.unwrap();
    assert!(verdict.settled() && verdict.lost == 0, "{verdict:?}");
    assert!(report["skipped_publish"].as_u64().unwrap_or(0) > 0, "no publish was dropped: {report}");

    let orders = recheck::db::connect(&d.orders_db).await.unwrap().0;
    let committed: Vec<String> =
        sqlx::query_scalar("SELECT message_id FROM orders").fetch_all(&orders).await.unwrap();
    let resent: BTreeSet<String> =
        sqlx::query_scalar("SELECT message_id FROM hook_calls WHERE outcome = 'RESEND_OUTCOME_RESENT'")
            .fetch_all(&orders)
            .await
            .unwrap()
            .into_iter()
            .collect();
    orders.close().await;
    assert!(!resent.is_empty(), "nothing was resent");
    let paths = [Role::Upstream, Role::Consumer(0), Role::Callback(0)].map(|role| d.log(role));
    // SIGTERM: each service flushes the spans it has not exported yet.
    d.stop().await.unwrap();

    // ---- the logs ----
    let [upstream, downstream, callback] = paths.map(|path| Log::read(&path).unwrap());
    for id in &committed {
        let traces: BTreeSet<&str> =
            [&upstream, &downstream].iter().flat_map(|log| log.trace_ids(id)).collect();
        assert_eq!(traces.len(), 1, "order {id}: trace ids {traces:?} in producer and consumer");
        assert!(downstream.has(id, "message handled"), "order {id} never handled in the consumer's log");
    }
    let mut trace_of = HashMap::new();
    for id in &resent {
        assert!(upstream.has(id, "check prepared"), "{id}: no `check prepared`");
        assert!(upstream.has(id, "resend"), "{id}: the hook's `resend` not in the producer's log");
        assert!(callback.has(id, "resent"), "{id}: `resent` not in the callback service's log");
        assert!(downstream.has(id, "message handled"), "{id}: not handled in the consumer's log");
        let traces: BTreeSet<&str> =
            [&upstream, &downstream, &callback].iter().flat_map(|log| log.trace_ids(id)).collect();
        assert_eq!(traces.len(), 1, "resent order {id}: trace ids {traces:?} across the services");
        trace_of.insert(id.clone(), traces.first().unwrap().to_string());
    }
    let distinct: BTreeSet<&String> = trace_of.values().collect();
    assert_eq!(distinct.len(), resent.len(), "orders share a trace: each order is its own root");

    // ---- the exported spans ----
    let spans = collector.spans();
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(services, BTreeSet::from(["callback-service", "upstream-demo"]), "who exported");
    let find = |service: &str, name: &str, id: &str| -> Vec<&Span> {
        let matches =
            |s: &&Span| s.service == service && s.name == name && s.message_id.as_deref() == Some(id);
        spans.iter().filter(matches).collect()
    };
    for (id, trace) in &trace_of {
        let prepare = find("upstream-demo", "prepare", id);
        let [prepare] = prepare.as_slice() else { panic!("{id}: prepare spans {prepare:?}") };
        assert_eq!(&prepare.trace_id, trace, "{id}: the logs and the exported spans disagree");
        let root = spans.iter().find(|s| s.span_id == prepare.parent_span_id).expect("prepare's parent");
        assert_eq!((root.name.as_str(), root.parent_span_id.as_str()), ("create_order", ""), "{id}");

        let reconciles = find("callback-service", "reconcile", id);
        assert!(!reconciles.is_empty(), "{id}: no reconcile span exported");
        for reconcile in &reconciles {
            assert_eq!(&reconcile.trace_id, trace, "{id}");
            assert_eq!(
                reconcile.parent_span_id, prepare.span_id,
                "{id}: reconcile continues the CHECK's trace"
            );
        }
        let resends = find("upstream-demo", "resend", id);
        assert!(!resends.is_empty(), "{id}: no resend span exported");
        for resend in resends {
            assert_eq!(&resend.trace_id, trace, "{id}");
            assert!(
                reconciles.iter().any(|r| r.span_id == resend.parent_span_id),
                "{id}: the hook's span is not a child of a reconcile span"
            );
        }
    }
}

fn owned((k, v): (&str, &str)) -> (String, String) {
    (k.to_owned(), v.to_owned())
}

/// One service's JSON log lines.
struct Log {
    path: PathBuf,
    lines: Vec<Value>,
}

impl Log {
    /// Every line must be JSON: the format option covers all the service's output.
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut lines = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let value: Value = serde_json::from_str(line)
                .with_context(|| format!("{}: not JSON: {line}", path.display()))?;
            lines.push(value);
        }
        ensure!(!lines.is_empty(), "{} is empty", path.display());
        Ok(Self { path: path.to_owned(), lines })
    }

    /// Lines logged in a span of message `id` (or naming it in their own fields).
    fn about<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.lines.iter().filter(move |line| {
            let in_span = line["spans"].as_array().into_iter().flatten().any(|s| s["message_id"] == id);
            in_span || line["fields"]["message_id"] == id
        })
    }

    /// The trace ids of the lines about `id`; a line about it without one fails the test.
    fn trace_ids<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.about(id).map(move |line| {
            line["trace_id"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no trace_id in {line}", self.path.display()))
        })
    }

    fn has(&self, id: &str, message: &str) -> bool {
        self.about(id).any(|line| line["fields"]["message"] == message)
    }
}

/// One exported span, as the test needs it.
#[derive(Debug)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root.
    parent_span_id: String,
    message_id: Option<String>,
}

/// An OTLP/gRPC trace collector on a free loopback port, keeping what it receives.
struct Collector {
    url: String,
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

impl Collector {
    async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let received = Arc::new(Mutex::new(Vec::new()));
        let service = TraceServiceServer::new(Received(received.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Ok(Self { url, received })
    }

    fn spans(&self) -> Vec<Span> {
        let received = self.received.lock().unwrap();
        let mut spans = Vec::new();
        for resource_spans in received.iter().flat_map(|r| &r.resource_spans) {
            let resource = resource_spans.resource.as_ref().map(|r| r.attributes.as_slice()).unwrap_or(&[]);
            let service = attribute(resource, "service.name").unwrap_or_default();
            for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
                spans.push(Span {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    message_id: attribute(&span.attributes, "message_id"),
                });
            }
        }
        spans
    }
}

struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A string attribute's value.
fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match value {
        AnyValue { value: Some(AnyValueKind::StringValue(s)) } => Some(s.clone()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
