//! JSON log lines: tracing-subscriber's JSON shape (`timestamp`, `level`, `target`, `fields`,
//! `span`, `spans`) plus the OpenTelemetry `trace_id` and `span_id` of the span the event is in,
//! so a log collector can join one order's lines across services.

use std::fmt;

use opentelemetry::trace::TraceContextExt;
use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, format::Writer},
    registry::LookupSpan,
};

/// Formats each event as one JSON object per line. Pair it with
/// `tracing_subscriber::fmt::format::JsonFields`, which records span fields as JSON.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonFormat;

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // In this order on the line (a JSON object's keys would come out sorted).
        let mut line: Vec<(&str, Value)> = Vec::with_capacity(8);
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        line.push(("timestamp", now.into()));
        line.push(("level", meta.level().as_str().into()));
        let mut fields = Map::new();
        event.record(&mut Visitor(&mut fields));
        line.push(("fields", fields.into()));
        line.push(("target", meta.target().into()));
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope.from_root().map(|span| span_object::<S, N>(&span)).collect();
            if let Some(current) = spans.last() {
                line.push(("span", current.clone()));
            }
            line.push(("spans", spans.into()));
        }
        // The OpenTelemetry layer attaches the entered span's context: the nearest span it sees.
        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let sc = span.span_context();
        if sc.is_valid() {
            line.push(("trace_id", sc.trace_id().to_string().into()));
            line.push(("span_id", sc.span_id().to_string().into()));
        }
        writer.write_char('{')?;
        for (i, (key, value)) in line.iter().enumerate() {
            let separator = if i == 0 { "" } else { "," };
            write!(writer, "{separator}\"{key}\":{value}")?;
        }
        writer.write_str("}\n")
    }
}

/// `{"name": …, <fields>}` of one span, from the fields `JsonFields` recorded.
fn span_object<S, N>(span: &tracing_subscriber::registry::SpanRef<'_, S>) -> Value
where
    S: for<'a> LookupSpan<'a>,
    N: 'static,
{
    let mut object = Map::new();
    object.insert("name".into(), span.name().into());
    if let Some(fields) = span.extensions().get::<FormattedFields<N>>() {
        match serde_json::from_str::<Map<String, Value>>(fields) {
            Ok(map) => object.extend(map),
            Err(_) if fields.is_empty() => {}
            Err(_) => {
                object.insert("fields".into(), fields.as_str().into());
            }
        }
    }
    object.into()
}

/// An event's fields as JSON values: numbers and booleans as such, the rest as text.
struct Visitor<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for Visitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}
