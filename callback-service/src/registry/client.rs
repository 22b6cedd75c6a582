//! One producer's `recheck.v1.ResendHook` client: `Resend` and `ResendBatch` under one deadline
//! rule, with the producer's bearer token and the caller's trace context.

use std::{fmt, future::Future, time::Duration};

use recheck_proto::v1::{
    ResendBatchEntry, ResendBatchRequest, ResendBatchResponse, ResendRequest, ResendResponse,
    resend_hook_client::ResendHookClient,
};
use tonic::{Status, metadata::AsciiMetadataValue, transport::Channel};

/// A producer's `recheck.v1.ResendHook` client. Cloning shares the channel.
#[derive(Clone)]
pub struct ProducerClient {
    producer: String,
    url: String,
    hook: ResendHookClient<Channel>,
    authorization: Option<AsciiMetadataValue>,
}

impl fmt::Debug for ProducerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProducerClient")
            .field("producer", &self.producer)
            .field("url", &self.url)
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ProducerClient {
    pub(super) fn new(
        producer: String,
        url: String,
        hook: ResendHookClient<Channel>,
        authorization: Option<AsciiMetadataValue>,
    ) -> Self {
        Self { producer, url, hook, authorization }
    }

    pub fn producer(&self) -> &str {
        &self.producer
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Calls `Resend`, bounded by `deadline` both on the wire (`grpc-timeout`) and locally
    /// (connecting and waiting for a concurrency slot count too): past it,
    /// `Status::deadline_exceeded`. The caller's span (a check's `reconcile`) continues in the
    /// producer's hook.
    pub async fn resend(&self, req: ResendRequest, deadline: Duration) -> Result<ResendResponse, Status> {
        let mut hook = self.hook.clone();
        self.call(req, deadline, move |request| async move { hook.resend(request).await }).await
    }

    /// Calls `ResendBatch` for `entries` (one result per entry comes back), under the same
    /// deadline rule as [`Self::resend`]; each entry carries its own trace context. A hook that
    /// does not serve it answers `UNIMPLEMENTED`.
    pub async fn resend_batch(
        &self,
        entries: Vec<ResendBatchEntry>,
        deadline: Duration,
    ) -> Result<ResendBatchResponse, Status> {
        let mut hook = self.hook.clone();
        let request = ResendBatchRequest { entries };
        self.call(request, deadline, move |request| async move { hook.resend_batch(request).await }).await
    }

    async fn call<Req, Resp, F, Fut>(&self, req: Req, deadline: Duration, send: F) -> Result<Resp, Status>
    where
        F: FnOnce(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let mut request = tonic::Request::new(req);
        request.set_timeout(deadline);
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert("authorization", authorization.clone());
        }
        recheck::trace::inject_metadata(request.metadata_mut());
        let elapsed = || {
            Status::deadline_exceeded(format!(
                "producer {} ({}) did not answer within {deadline:?}",
                self.producer, self.url
            ))
        };
        match tokio::time::timeout(deadline, send(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            // tonic's own `grpc-timeout` enforcement reports `Cancelled`; it is the same deadline.
            Ok(Err(status)) if is_timeout(&status) => Err(elapsed()),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(elapsed()),
        }
    }
}

fn is_timeout(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use recheck::tls::ClientTls;
    use recheck_proto::v1::{ResendOutcome, ResendResult, resend_hook_server};
    use tokio_stream::wrappers::TcpListenerStream;

    use super::*;
    use crate::registry::ProducerRegistry;

    fn entry(s: &str) -> crate::registry::ProducerEntry {
        s.parse().unwrap()
    }

    /// Answers `RESENT` with the `authorization` header as the reason, after `delay`; serves
    /// `ResendBatch` only if `batch`.
    struct Hook {
        delay: Duration,
        batch: bool,
    }

    fn auth<T>(request: &tonic::Request<T>) -> String {
        request.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
    }

    #[tonic::async_trait]
    impl resend_hook_server::ResendHook for Hook {
        async fn resend(
            &self,
            request: tonic::Request<ResendRequest>,
        ) -> Result<tonic::Response<ResendResponse>, Status> {
            tokio::time::sleep(self.delay).await;
            Ok(tonic::Response::new(ResendResponse {
                outcome: ResendOutcome::Resent as i32,
                reason: auth(&request),
            }))
        }

        async fn resend_batch(
            &self,
            request: tonic::Request<ResendBatchRequest>,
        ) -> Result<tonic::Response<ResendBatchResponse>, Status> {
            if !self.batch {
                return Err(Status::unimplemented("no ResendBatch here"));
            }
            let reason = auth(&request);
            let results = (request.into_inner().entries.into_iter())
                .map(|e| ResendResult {
                    message_id: e.message_id,
                    outcome: ResendOutcome::Resent as i32,
                    reason: format!("{reason} {}", e.traceparent),
                })
                .collect();
            Ok(tonic::Response::new(ResendBatchResponse { results }))
        }
    }

    async fn serve(delay: Duration, batch: bool) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(resend_hook_server::ResendHookServer::new(Hook { delay, batch }))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        addr
    }

    fn registry(entries: &[String]) -> ProducerRegistry {
        let entries = entries.iter().map(|e| entry(e));
        ProducerRegistry::from_entries(entries, Duration::from_secs(1), 4, &ClientTls::default()).unwrap()
    }

    #[tokio::test]
    async fn resend_sends_the_token_and_honours_the_deadline() {
        let fast = serve(Duration::ZERO, true).await;
        let slow = serve(Duration::from_secs(10), true).await;
        let registry = registry(&[format!("fast=http://{fast} t0k"), format!("slow=http://{slow}")]);
        let req = ResendRequest { message_id: "m".into(), producer: "fast".into(), ..Default::default() };

        let r = registry.client("fast").unwrap().resend(req.clone(), Duration::from_secs(5)).await.unwrap();
        assert_eq!((r.outcome(), r.reason.as_str()), (ResendOutcome::Resent, "Bearer t0k"));

        let e = registry.client("slow").unwrap().resend(req, Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
    }

    #[tokio::test]
    async fn resend_batch_sends_the_token_and_each_entry_and_reports_unimplemented() {
        let batch = serve(Duration::ZERO, true).await;
        let single = serve(Duration::ZERO, false).await;
        let registry = registry(&[format!("batch=http://{batch} t0k"), format!("single=http://{single}")]);
        let entry = |id: &str| ResendBatchEntry {
            message_id: id.into(),
            traceparent: format!("tp-{id}"),
            ..Default::default()
        };
        let entries = vec![entry("a"), entry("b")];

        let client = registry.client("batch").unwrap();
        let answer = client.resend_batch(entries.clone(), Duration::from_secs(5)).await.unwrap();
        let reasons: Vec<_> = answer.results.into_iter().map(|r| (r.message_id, r.reason)).collect();
        assert_eq!(reasons, [("a".into(), "Bearer t0k tp-a".into()), ("b".into(), "Bearer t0k tp-b".into())]);

        let e = registry.client("single").unwrap().resend_batch(entries, Duration::from_secs(5)).await;
        assert_eq!(e.unwrap_err().code(), tonic::Code::Unimplemented);
    }
}
