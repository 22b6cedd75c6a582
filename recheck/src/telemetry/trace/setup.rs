//! The subscriber every Recheck binary installs once (feature `service`): an `EnvFilter`ed log
//! layer (text or JSON lines on stderr) and an OpenTelemetry layer that gives every `INFO`
//! span ids whatever the log filter says, so trace context is propagated and logged with or
//! without a collector; with feature `otlp` and an endpoint, spans are exported over OTLP/gRPC.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{LevelFilter, Targets},
    fmt::{MakeWriter, format::JsonFields},
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

use super::json::JsonFormat;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours only at a terminal).
    #[default]
    Text,
    /// One JSON object per line, with the span's `trace_id` and `span_id`.
    Json,
}

/// Log format and span export of a service; `#[command(flatten)]` next to its `--log` flag.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TraceArgs {
    /// Log line format: `text`, or `json` (one object per line, with `trace_id` / `span_id`).
    #[arg(long, env = "RECHECK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// OTLP/gRPC collector to export spans to (e.g. `http://127.0.0.1:4317`). Unset or empty: no
    /// export (trace context is still propagated and logged). The standard OpenTelemetry
    /// variables (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_HEADERS`, …) apply.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

impl TraceArgs {
    /// The collector's address, if export is on.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty())
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The filter directives given do not parse.
    #[error("invalid log filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// The OTLP exporter could not be built.
    #[cfg(feature = "otlp")]
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// The process already has a global subscriber.
    #[error("a global subscriber is already set: {0}")]
    Installed(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps span export running; dropping it flushes the spans not yet exported.
#[must_use = "dropping the guard stops span export"]
pub struct TraceGuard {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        // Bounded, so an unreachable collector cannot hold up the exit.
        if self.exporting
            && let Err(e) = self.provider.shutdown_with_timeout(std::time::Duration::from_secs(5))
        {
            eprintln!("flushing spans: {e}");
        }
    }
}

/// Installs the global subscriber of a service named `service` (the OpenTelemetry
/// `service.name` unless `OTEL_SERVICE_NAME` is set). Logs go to stderr (stdout is for command
/// output), filtered by `directives` (tracing `EnvFilter` syntax), else `RUST_LOG`, else `info`.
/// Call it inside the Tokio runtime: the OTLP exporter's channel runs on it.
pub fn init(directives: Option<&str>, args: &TraceArgs, service: &str) -> Result<TraceGuard, InitError> {
    let filter = match directives {
        Some(d) => EnvFilter::try_new(d)?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    let provider = SdkTracerProvider::builder().with_resource(resource.build());
    let endpoint = args.otlp_endpoint();
    #[cfg(feature = "otlp")]
    let provider = match endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter =
                opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()?;
            provider.with_batch_exporter(exporter)
        }
        None => provider,
    };
    let provider = provider.build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());

    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let tracer = provider.tracer(service.to_owned());
    subscriber(filter, args.log_format, ansi, tracer, std::io::stderr).try_init()?;

    let exporting = cfg!(feature = "otlp") && endpoint.is_some();
    super::set_exporting(exporting);
    match endpoint {
        Some(endpoint) if exporting => tracing::info!(endpoint, "exporting spans over OTLP"),
        Some(endpoint) => {
            tracing::warn!(endpoint, "this build has no OTLP exporter (feature `otlp`); not exporting")
        }
        None => {}
    }
    Ok(TraceGuard { provider, exporting })
}

/// The layers of [`init`], writing log lines to `writer` (a test passes a buffer).
fn subscriber<W>(
    filter: EnvFilter,
    format: LogFormat,
    ansi: bool,
    tracer: opentelemetry_sdk::trace::Tracer,
    writer: W,
) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // Spans get ids at INFO whatever the log filter: propagation does not depend on verbosity.
    // OpenTelemetry's own log events (feature `otlp`) reach the log layer only, never a span.
    let traced =
        Targets::new().with_default(LevelFilter::INFO).with_target("opentelemetry", LevelFilter::OFF);
    let otel = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(traced);
    let logs = match format {
        // Colour codes only for a person at a terminal, not in log files and collectors.
        LogFormat::Text => {
            tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi).with_filter(filter).boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(JsonFormat)
            .fmt_fields(JsonFields::new())
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry().with(otel).with(logs)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use lapin::types::FieldTable;
    use serde_json::Value;

    use super::*;
    use crate::telemetry::trace;

    /// Log lines written to memory.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;

        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    /// Runs a producer span and a consumer span (continued from the message headers) under the
    /// binaries' subscriber with a JSON log filter `filter`: (sent, received trace ids, lines).
    fn producer_then_consumer(filter: &str) -> (String, Option<String>, Vec<Value>) {
        let buffer = Buffer::default();
        let tracer = SdkTracerProvider::builder().build().tracer("test");
        let subscriber = subscriber(EnvFilter::new(filter), LogFormat::Json, false, tracer, buffer.clone());
        let (sent, received) = tracing::subscriber::with_default(subscriber, || {
            let publish = tracing::info_span!("publish", message_id = "m-1");
            let mut headers = FieldTable::default();
            publish.in_scope(|| trace::inject_headers(&mut headers));
            let process = tracing::info_span!(parent: None, "process", message_id = "m-1", attempt = 2);
            trace::set_parent_from_headers(&process, Some(&headers));
            process.in_scope(|| {
                tracing::debug!("below the filter");
                tracing::warn!(outcome = "processed", n = 3, "handled");
            });
            (trace::trace_id(&publish), trace::trace_id(&process))
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert!(text.lines().all(|l| l.starts_with(r#"{"timestamp":"#)), "timestamp first: {text}");
        let lines = text.lines().map(|l| serde_json::from_str(l).expect(l)).collect();
        (sent.expect("the INFO span has ids"), received, lines)
    }

    /// The JSON line logged in the consumer's span names the producer's trace id, the span and
    /// its fields.
    #[test]
    fn json_lines_carry_the_trace_id_and_the_span_fields() {
        let (sent, received, lines) = producer_then_consumer("info");
        assert_eq!(received.as_deref(), Some(sent.as_str()));
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(line["trace_id"], sent.as_str());
        assert_eq!(line["span_id"].as_str().map(str::len), Some(16));
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["fields"]["message"], "handled");
        assert_eq!(line["fields"]["outcome"], "processed");
        assert_eq!(line["fields"]["n"], 3);
        assert_eq!(line["span"]["name"], "process");
        assert_eq!(line["span"]["message_id"], "m-1");
        assert_eq!(line["span"]["attempt"], 2);
        assert_eq!(line["spans"].as_array().map(Vec::len), Some(1));
        assert!(line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    }

    /// As the test kit runs the binaries (`warn`): the INFO spans are not logged, yet they still
    /// carry the trace, and a warning names its trace id.
    #[test]
    fn the_trace_propagates_below_the_log_level() {
        let (sent, received, lines) = producer_then_consumer("warn");
        assert_eq!(received.as_deref(), Some(sent.as_str()));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["trace_id"], sent.as_str());
        assert!(lines[0].get("span").is_none(), "a span below the filter is not logged");
    }
}
