//! Secrets in configuration stay out of logs and `Debug` output. One concept, one place: a URL
//! that may carry a password (`RECHECK_AMQP_URL`, `DATABASE_URL`, …) is a [`SecretUrl`], whose
//! `Debug` and `Display` show it with the password replaced by `***` ([`redact_url`]). The
//! tokens and keys have their own types that print only how many there are
//! ([`crate::security::auth::BearerAuth`], [`crate::security::auth::AttachToken`], [`crate::security::signing::SigningKey`],
//! [`crate::security::signing::ConfirmKeys`]); the TLS private keys stay inside [`crate::security::tls`].

use std::{fmt, ops::Deref, str::FromStr};

/// A URL, or a comma-separated list of URLs, that may hold passwords. Derefs to the real text
/// (to connect with); formats redacted (to log).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps `url`: one URL, or a comma-separated list.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL as written, password and all: for connecting, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL (each URL of a list) with its password replaced by `***`.
    pub fn redacted(&self) -> String {
        self.0.split(',').map(redact_url).collect::<Vec<_>>().join(",")
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Deref for SecretUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SecretUrl {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&String> for SecretUrl {
    fn from(url: &String) -> Self {
        Self(url.clone())
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl PartialEq<str> for SecretUrl {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for SecretUrl {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// The URL with its password replaced by `***` (the user stays: it says which account), also a
/// `password=` query parameter (PostgreSQL accepts one). Text that is no URL comes back as is.
pub fn redact_url(url: &str) -> String {
    let url = redact_userinfo(url);
    match url.split_once('?') {
        Some((head, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{head}?{}", params.join("&"))
        }
        None => url,
    }
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme_end], &userinfo[..colon], &rest[at..]),
                None => url.to_owned(),
            }
        }
        // An `@` after the first `/`: a password holding a raw `/`? Hide all of it to be safe.
        None if rest.contains('@') => {
            format!("{}***{}", &url[..scheme_end], &rest[rest.rfind('@').expect("contains @")..])
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(redact_url("amqp://guest:secret@10.0.0.1:5672/%2f"), "amqp://guest:***@10.0.0.1:5672/%2f");
        assert_eq!(redact_url("amqp://u:p@ss@h:1/v?heartbeat=5"), "amqp://u:***@h:1/v?heartbeat=5");
        assert_eq!(redact_url("amqp://guest@h:5672/v"), "amqp://guest@h:5672/v");
        assert_eq!(redact_url("amqp://h:5672/v"), "amqp://h:5672/v");
        // A raw `/` in a password or a raw `@` in a vhost: ambiguous, so hide the whole prefix.
        assert_eq!(redact_url("amqp://u:a/b@h:1/v"), "amqp://***@h:1/v");
        assert_eq!(redact_url("amqp://h:5672/a@b"), "amqp://***@b");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("postgres://u@db:5432/x?sslmode=require&password=pw&Password=pw"),
            "postgres://u@db:5432/x?sslmode=require&password=***&Password=***"
        );
        assert_eq!(redact_url("sqlite://a.db?mode=rwc"), "sqlite://a.db?mode=rwc");
    }

    #[test]
    fn secret_urls_format_redacted_and_deref_to_the_real_text() {
        let url: SecretUrl = "amqps://a:s3cr3t@h1:5671/v, amqp://b:t0p@h2/v".parse().unwrap();
        for shown in [format!("{url:?}"), format!("{url}"), url.redacted()] {
            assert!(!shown.contains("s3cr3t") && !shown.contains("t0p"), "{shown}");
            assert!(shown.contains("a:***@h1") && shown.contains("b:***@h2"), "{shown}");
        }
        assert!(url.contains("s3cr3t"));
        assert_eq!(url.expose(), "amqps://a:s3cr3t@h1:5671/v, amqp://b:t0p@h2/v");
        assert_eq!(SecretUrl::from("amqp://x"), "amqp://x");
    }
}
