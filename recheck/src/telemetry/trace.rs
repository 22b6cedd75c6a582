//! W3C trace context across Recheck's hops, so that one order's spans in the producer, the
//! consumer and the callback service share one trace id.
//!
//! | hop | what carries the context |
//! |---|---|
//! | business message (one message = one order) | AMQP headers `traceparent` / `tracestate` |
//! | CHECK (a batch of many orders) | each check's own JSON field `traceparent` ([`Check::traceparent`]) |
//! | `ResendHook.Resend` (one order) | gRPC metadata `traceparent` / `tracestate` |
//! | CONFIRM (a batch) | nothing: ingest is one unit of work per batch; a confirm meets its order by message id |
//!
//! Injecting reads the current `tracing` span's OpenTelemetry context (through
//! `tracing-opentelemetry`); without an OpenTelemetry layer in the subscriber there is no valid
//! context and nothing is written. Extracting sets a new span's parent, which must happen before
//! the span is first entered. A missing or malformed `traceparent` leaves the span where it was
//! (a root, or the child of the current span): tracing never refuses a message.
//!
//! With feature `service`, `init` installs the subscriber every Recheck binary uses: logs as
//! text or JSON lines (with `trace_id` / `span_id`), an OpenTelemetry layer that gives every span
//! ids (so the context propagates with or without a collector), and with feature `otlp` an OTLP
//! exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! [`Check::traceparent`]: crate::wire::message::Check::traceparent

use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[cfg(feature = "service")]
mod json;
#[cfg(feature = "service")]
mod setup;
#[cfg(feature = "service")]
pub use setup::{InitError, LogFormat, TraceArgs, TraceGuard, init};

/// The W3C header / metadata key of the parent span (`00-<trace id>-<span id>-<flags>`).
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header / metadata key of vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans leave the process (an exporter is installed): only then is a span no log line
/// is written in worth its cost (the consumer's per-message spans). `init` (feature `service`)
/// sets it; a service that installs its own exporter calls [`set_exporting`].
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Declares that spans are (or are no longer) exported; see [`exporting`].
pub fn set_exporting(on: bool) {
    EXPORTING.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// W3C Trace Context is the wire contract, whatever global propagator an application set.
fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

/// The current span's OpenTelemetry context, if it has a valid one. Falls back to the active
/// context when the current span is not seen by the OpenTelemetry layer (e.g. filtered out).
fn current() -> Option<Context> {
    let cx = Span::current().context();
    if cx.span().span_context().is_valid() {
        return Some(cx);
    }
    let cx = Context::current();
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `cx` the parent of `span` if it holds a valid remote span context.
fn set_parent(span: &Span, cx: Context) {
    if cx.span().span_context().is_valid() {
        // Fails only once the span has started (entered); callers set it right after creating it.
        let _ = span.set_parent(cx);
    }
}

/// Writes the current span's context into AMQP headers (nothing without a valid context).
pub fn inject_headers(headers: &mut FieldTable) {
    if let Some(cx) = current() {
        propagator().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// Writes the current span's context into gRPC request metadata.
pub fn inject_metadata(metadata: &mut MetadataMap) {
    if let Some(cx) = current() {
        propagator().inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

/// The current span's `traceparent`, for a CHECK entry; `None` without a valid context.
pub fn current_traceparent() -> Option<String> {
    let cx = current()?;
    let mut carrier = std::collections::HashMap::new();
    propagator().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Continues the trace in a delivery's AMQP headers: makes it `span`'s parent.
pub fn set_parent_from_headers(span: &Span, headers: Option<&FieldTable>) {
    if let Some(headers) = headers {
        set_parent(span, propagator().extract(&HeaderExtractor(headers)));
    }
}

/// Continues the trace in a gRPC request's metadata: makes it `span`'s parent.
pub fn set_parent_from_metadata(span: &Span, metadata: &MetadataMap) {
    set_parent(span, propagator().extract(&MetadataExtractor(metadata)));
}

/// Continues the trace of a CHECK entry's `traceparent`: makes it `span`'s parent.
pub fn set_parent_from_traceparent(span: &Span, traceparent: Option<&str>) {
    if let Some(traceparent) = traceparent {
        let carrier = std::collections::HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
        set_parent(span, propagator().extract(&carrier));
    }
}

/// The trace id of `span` (32 hex digits), if it has a valid context. For logs and tests.
pub fn trace_id(span: &Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Writes trace context into AMQP headers (as long strings).
pub struct HeaderInjector<'a>(pub &'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned().into(), AMQPValue::LongString(value.into()));
    }
}

/// Reads trace context from AMQP headers, long or short strings alike.
pub struct HeaderExtractor<'a>(pub &'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

/// Writes trace context into gRPC metadata; a value metadata cannot hold is skipped.
pub struct MetadataInjector<'a>(pub &'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value))
        {
            self.0.insert(key, value);
        }
    }
}

/// Reads trace context from gRPC metadata.
pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// A subscriber with an OpenTelemetry layer and no exporter: spans get ids, nothing leaves.
    fn with_otel<T>(f: impl FnOnce() -> T) -> T {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), f)
    }

    const REMOTE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const REMOTE_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn amqp_headers_round_trip() {
        with_otel(|| {
            let producer = tracing::info_span!("publish");
            let mut headers = FieldTable::default();
            producer.in_scope(|| inject_headers(&mut headers));
            let sent = trace_id(&producer).expect("the producer span has ids");
            let extractor = HeaderExtractor(&headers);
            let traceparent = extractor.get(TRACEPARENT).expect("traceparent written");
            assert!(traceparent.starts_with(&format!("00-{sent}-")), "{traceparent}");

            // The consumer's span, outside the producer's, continues its trace.
            let consumer = tracing::info_span!(parent: None, "process");
            set_parent_from_headers(&consumer, Some(&headers));
            assert_eq!(trace_id(&consumer).as_deref(), Some(sent.as_str()));
        });
    }

    #[test]
    fn short_string_headers_are_read_too() {
        with_otel(|| {
            let mut headers = FieldTable::default();
            headers.insert(TRACEPARENT.into(), AMQPValue::ShortString(REMOTE.into()));
            let span = tracing::info_span!("process");
            set_parent_from_headers(&span, Some(&headers));
            assert_eq!(trace_id(&span).as_deref(), Some(REMOTE_TRACE));
        });
    }

    #[test]
    fn grpc_metadata_round_trip() {
        with_otel(|| {
            let client = tracing::info_span!("reconcile");
            let mut metadata = MetadataMap::new();
            client.in_scope(|| inject_metadata(&mut metadata));
            assert!(metadata.get(TRACEPARENT).is_some());
            let server = tracing::info_span!(parent: None, "resend");
            set_parent_from_metadata(&server, &metadata);
            assert_eq!(trace_id(&server), trace_id(&client));
            assert!(trace_id(&server).is_some());
        });
    }

    #[test]
    fn check_traceparent_round_trip() {
        with_otel(|| {
            let prepare = tracing::info_span!("prepare");
            let traceparent = prepare.in_scope(current_traceparent).expect("a traceparent");
            let reconcile = tracing::info_span!(parent: None, "reconcile");
            set_parent_from_traceparent(&reconcile, Some(&traceparent));
            assert_eq!(trace_id(&reconcile), trace_id(&prepare));
        });
    }

    #[test]
    fn absent_or_malformed_context_leaves_a_root() {
        with_otel(|| {
            let mut headers = FieldTable::default();
            headers.insert(TRACEPARENT.into(), AMQPValue::LongString("00-nonsense".into()));
            let a = tracing::info_span!(parent: None, "a");
            set_parent_from_headers(&a, Some(&headers));
            let b = tracing::info_span!(parent: None, "b");
            set_parent_from_traceparent(&b, None);
            let (a, b) = (trace_id(&a).unwrap(), trace_id(&b).unwrap());
            assert_ne!(a, REMOTE_TRACE);
            assert_ne!(a, b, "each is a new root");
        });
    }

    #[test]
    fn nothing_is_injected_without_an_opentelemetry_layer() {
        let span = tracing::info_span!("publish");
        let mut headers = FieldTable::default();
        span.in_scope(|| inject_headers(&mut headers));
        assert!(headers.inner().is_empty());
        assert_eq!(span.in_scope(current_traceparent), None);
    }
}
