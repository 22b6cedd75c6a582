//! Signed CONFIRMs: the consumer signs each CONFIRM body with HMAC-SHA256 under its own key
//! (header `x-recheck-signature: v1=<hex>`); a callback service configured with keys accepts a
//! CONFIRM only if it is signed with the key of the consumer the body names. Without keys anyone
//! who may publish to the confirms exchange can mark a message confirmed and stop its resends.

use std::{collections::HashMap, fmt, sync::Arc};

use hmac::{Hmac, KeyInit, Mac};
use lapin::{BasicProperties, types::AMQPValue};
use sha2::Sha256;

/// The AMQP header of a CONFIRM's signature: `v1=<hex of HMAC-SHA256(key, body)>`.
pub const HEADER_SIGNATURE: &str = "x-recheck-signature";
/// Shorter keys are refused: HMAC is only as strong as its key.
pub const MIN_KEY_BYTES: usize = 16;
const VERSION: &str = "v1=";

/// One consumer's key. `Debug` never shows it.
#[derive(Clone)]
pub struct SigningKey(Arc<[u8]>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// A key of at least [`MIN_KEY_BYTES`] bytes; a shorter one is refused.
    pub fn new(key: impl AsRef<[u8]>) -> Result<Self, String> {
        let key = key.as_ref();
        if key.len() < MIN_KEY_BYTES {
            return Err(format!("a signing key needs at least {MIN_KEY_BYTES} bytes"));
        }
        Ok(Self(key.into()))
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length")
    }

    /// The header value for `body`.
    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(body);
        format!("{VERSION}{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// `properties` with the signature header for `body` added.
    pub fn sign_properties(&self, body: &[u8], properties: BasicProperties) -> BasicProperties {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(HEADER_SIGNATURE.into(), AMQPValue::LongString(self.sign(body).into()));
        properties.with_headers(headers)
    }

    /// Constant-time check of a header value against `body`.
    pub fn verify(&self, body: &[u8], signature: &str) -> bool {
        let Some(tag) = signature.strip_prefix(VERSION).and_then(|h| hex::decode(h).ok()) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_slice(&tag).is_ok()
    }
}

/// Why a CONFIRM was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No signature header, from a consumer that has a key.
    #[error("unsigned CONFIRM (no {HEADER_SIGNATURE} header) from consumer {0:?}")]
    Unsigned(String),
    /// Signatures are required and the consumer the body names has no key.
    #[error("no signing key for consumer {0:?}")]
    UnknownConsumer(String),
    /// The signature does not match the body under the named consumer's key.
    #[error("bad signature on a CONFIRM from consumer {0:?}")]
    Invalid(String),
}

impl SignatureError {
    /// A short, fixed class: the `reason` label when such a CONFIRM is parked.
    pub fn class(&self) -> &'static str {
        match self {
            SignatureError::Unsigned(_) => "unsigned",
            SignatureError::UnknownConsumer(_) => "unknown_consumer",
            SignatureError::Invalid(_) => "bad_signature",
        }
    }
}

/// The callback service's keys, by consumer name. Empty = signatures not required.
#[derive(Clone, Default)]
pub struct ConfirmKeys(Arc<HashMap<String, SigningKey>>);

impl fmt::Debug for ConfirmKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys().map(|c| format!("{c}=<redacted>"))).finish()
    }
}

impl ConfirmKeys {
    /// `CONSUMER=KEY` entries, comma-separated (clap value parser shape).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut keys = HashMap::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (consumer, key) =
                entry.split_once('=').ok_or_else(|| "expected CONSUMER=KEY entries".to_owned())?;
            let consumer = consumer.trim();
            if consumer.is_empty() {
                return Err("empty consumer name".into());
            }
            let key = SigningKey::new(key.trim()).map_err(|e| format!("consumer {consumer:?}: {e}"))?;
            if keys.insert(consumer.to_owned(), key).is_some() {
                return Err(format!("consumer {consumer:?} has two keys"));
            }
        }
        Ok(Self(Arc::new(keys)))
    }

    /// Whether signatures are required: at least one key is configured.
    pub fn required(&self) -> bool {
        !self.0.is_empty()
    }

    /// Whether a CONFIRM `body` from `consumer` with these `properties` may be ingested.
    pub fn verify(
        &self,
        consumer: &str,
        body: &[u8],
        properties: &BasicProperties,
    ) -> Result<(), SignatureError> {
        if !self.required() {
            return Ok(());
        }
        let key = self.0.get(consumer).ok_or_else(|| SignatureError::UnknownConsumer(consumer.to_owned()))?;
        let signature = properties
            .headers()
            .as_ref()
            .and_then(|h| match h.inner().get(HEADER_SIGNATURE) {
                Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
                _ => None,
            })
            .ok_or_else(|| SignatureError::Unsigned(consumer.to_owned()))?;
        if key.verify(body, &signature) { Ok(()) } else { Err(SignatureError::Invalid(consumer.to_owned())) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "points-key-0123456789";

    #[test]
    fn signed_bodies_verify_and_anything_else_does_not() {
        let keys = ConfirmKeys::parse(&format!("points={KEY}, billing=billing-key-0123456789")).unwrap();
        let key = SigningKey::new(KEY).unwrap();
        let body = br#"{"v":1,"consumer":"points","confirms":[]}"#;
        let signed = key.sign_properties(body, BasicProperties::default());
        assert_eq!(keys.verify("points", body, &signed), Ok(()));
        // The body changed, or it names another consumer whose key did not sign it.
        assert!(matches!(keys.verify("points", b"{}", &signed), Err(SignatureError::Invalid(_))));
        assert!(matches!(keys.verify("billing", body, &signed), Err(SignatureError::Invalid(_))));
        assert!(matches!(keys.verify("ghost", body, &signed), Err(SignatureError::UnknownConsumer(_))));
        let unsigned = BasicProperties::default();
        assert!(matches!(keys.verify("points", body, &unsigned), Err(SignatureError::Unsigned(_))));
        for forged in ["v1=00", "v1=zz", "", &key.sign(b"other")[..], &key.sign(body)[3..]] {
            assert!(!key.verify(body, forged), "{forged:?}");
        }
        // No keys configured: no signature needed.
        assert_eq!(ConfirmKeys::default().verify("anyone", body, &unsigned), Ok(()));
    }

    #[test]
    fn keys_parse_strictly_and_never_print() {
        assert!(ConfirmKeys::parse("points=short").is_err());
        assert!(ConfirmKeys::parse("points").is_err());
        assert!(ConfirmKeys::parse(&format!("points={KEY},points={KEY}")).is_err());
        assert!(!ConfirmKeys::parse("").unwrap().required());
        let keys = ConfirmKeys::parse(&format!("points={KEY}")).unwrap();
        assert!(!format!("{keys:?}").contains(KEY));
        assert!(!format!("{:?}", SigningKey::new(KEY).unwrap()).contains(KEY));
    }
}
