//! Bearer tokens on gRPC servers: the producer's `ResendHook` and the callback service's `Admin`.
//! A tonic interceptor compares `authorization: Bearer <token>` with the configured tokens in
//! constant time (several tokens let a token be rotated without downtime). Missing or wrong →
//! `UNAUTHENTICATED`; the callback service counts that as a failing hook (retry, circuit breaker,
//! `failed("producer unreachable")` after the deadline), never as `NOT_FOUND`. The callback
//! service's web dashboard checks the same tokens with [`BearerAuth::accepts`].

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, errors::InvalidMetadataValue},
    service::Interceptor,
};

/// The accepted tokens; with none, every request passes (authentication off).
#[derive(Clone, Default)]
pub struct BearerAuth {
    tokens: Arc<[String]>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("tokens", &format_args!("<{} redacted>", self.tokens.len()))
            .finish()
    }
}

impl BearerAuth {
    /// Empty strings are ignored, so an unset variable turns authentication off.
    pub fn new(tokens: impl IntoIterator<Item = String>) -> Self {
        Self { tokens: tokens.into_iter().filter(|t| !t.is_empty()).collect() }
    }

    /// Whether any token is configured, i.e. whether requests are checked at all.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Whether `metadata` carries an accepted token (or authentication is off).
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        if !self.enabled() {
            return Ok(());
        }
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        if self.accepts(presented) { Ok(()) } else { Err(Status::unauthenticated("invalid bearer token")) }
    }

    /// Whether `presented` is one of the tokens (always, when authentication is off), compared in
    /// constant time. The one comparison every transport uses: gRPC metadata here, the callback
    /// service's dashboard for its HTTP `Authorization` header and session cookie.
    pub fn accepts(&self, presented: &str) -> bool {
        if !self.enabled() {
            return true;
        }
        // Every token is compared, so the time taken does not tell which one nearly matched.
        let matched = self
            .tokens
            .iter()
            .fold(subtle::Choice::from(0), |acc, t| acc | t.as_bytes().ct_eq(presented.as_bytes()));
        bool::from(matched)
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}

/// Client side: `authorization: Bearer <token>` on every request (nothing without a token).
#[derive(Clone, Default)]
pub struct AttachToken(Option<AsciiMetadataValue>);

impl std::fmt::Debug for AttachToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "AttachToken(<redacted>)" } else { "AttachToken(None)" })
    }
}

impl AttachToken {
    /// Attaches `Bearer <token>`; `None` or an empty token attaches nothing (authentication
    /// off). Fails if the token cannot be a metadata value (it must be printable ASCII).
    pub fn new(token: Option<&str>) -> Result<Self, InvalidMetadataValue> {
        Ok(Self(token.filter(|t| !t.is_empty()).map(bearer_value).transpose()?))
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The `authorization` header value for `token`, marked sensitive (kept out of debug output).
pub fn bearer_value(token: &str) -> Result<AsciiMetadataValue, InvalidMetadataValue> {
    let mut value = AsciiMetadataValue::try_from(format!("Bearer {token}"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// The token of an `authorization` header value `Bearer <token>` (gRPC metadata or HTTP).
pub fn bearer_token(value: &str) -> Option<&str> {
    value.strip_prefix("Bearer ")
}

/// A client with [`AttachToken`] on every call.
pub type WithToken<C> = tonic::service::interceptor::InterceptedService<C, AttachToken>;

/// clap value parser for a client's token (whose `Debug` hides it).
pub fn parse_attach(s: &str) -> Result<AttachToken, String> {
    AttachToken::new(Some(s)).map_err(|_| "the token must be printable ASCII".to_owned())
}

/// Parses a comma-separated token list.
pub fn parse_tokens(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect()
}

/// clap value parser: a comma-separated token list → [`BearerAuth`] (whose `Debug` hides them).
pub fn parse_auth(s: &str) -> Result<BearerAuth, String> {
    let tokens = parse_tokens(s);
    match tokens.iter().find(|t| !t.bytes().all(|b| b.is_ascii_graphic())) {
        Some(_) => Err("tokens must be printable ASCII without spaces".into()),
        None => Ok(BearerAuth::new(tokens)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataMap;

    fn with(header: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(h) = header {
            m.insert("authorization", h.parse().unwrap());
        }
        m
    }

    #[test]
    fn accepts_any_configured_token_and_nothing_else() {
        let auth = BearerAuth::new(["old".to_owned(), "new".to_owned()]);
        assert!(auth.check(&with(Some("Bearer old"))).is_ok());
        assert!(auth.check(&with(Some("Bearer new"))).is_ok());
        for bad in
            [None, Some("Bearer"), Some("Bearer ne"), Some("Bearer newer"), Some("Basic new"), Some("new")]
        {
            let err = auth.check(&with(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(auth.accepts("new"));
        for bad in ["", "ne", "newer", "Bearer new"] {
            assert!(!auth.accepts(bad), "{bad:?}");
        }
        assert_eq!(bearer_token("Bearer t0k"), Some("t0k"));
        assert_eq!(bearer_token("bearer t0k"), None);
    }

    #[test]
    fn no_tokens_means_off_and_debug_hides_them() {
        let off = BearerAuth::new([String::new()]);
        assert!(!off.enabled());
        assert!(off.check(&with(None)).is_ok());
        assert!(off.accepts(""));
        let on = BearerAuth::new(parse_tokens("s3cr3t, other"));
        assert!(!format!("{on:?}").contains("s3cr3t"));
        assert!(format!("{on:?}").contains("2 redacted"));
    }
}
