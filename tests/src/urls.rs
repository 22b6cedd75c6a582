//! Just enough URL surgery for `amqp://` and `postgres://` URLs (no extra dependency).

/// `scheme://authority` and the rest (`/path?query`, possibly empty).
fn split(url: &str) -> (&str, &str) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..].find(['/', '?']).map_or(url.len(), |i| after_scheme + i);
    url.split_at(end)
}

/// `scheme://user:password@host:port`, without path and query.
pub fn origin(url: &str) -> &str {
    split(url).0
}

/// The URL with its path replaced by `/<path>` (any query string is kept).
pub fn with_path(url: &str, path: &str) -> String {
    let (base, rest) = split(url);
    let query = rest.find('?').map_or("", |i| &rest[i..]);
    format!("{base}/{path}{query}")
}

/// `user:password@host:port` of the URL.
fn authority(url: &str) -> &str {
    let (base, _) = split(url);
    base.find("://").map_or(base, |i| &base[i + 3..])
}

/// The user name in the URL, if any (not percent-decoded).
pub fn user(url: &str) -> Option<&str> {
    let authority = authority(url);
    let userinfo = &authority[..authority.rfind('@')?];
    Some(userinfo.split(':').next().unwrap_or(userinfo))
}

/// `host:port` of the URL, with `default_port` when it names none.
pub fn host_port(url: &str, default_port: u16) -> String {
    let authority = authority(url);
    let host = authority.rfind('@').map_or(authority, |i| &authority[i + 1..]);
    if host.contains(':') && !host.ends_with(']') {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    }
}

/// The URL with its `host:port` replaced (user info, path and query kept).
pub fn with_host_port(url: &str, host_port: &str) -> String {
    let (base, rest) = split(url);
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let authority = &base[scheme_end..];
    let userinfo = authority.rfind('@').map_or("", |i| &authority[..=i]);
    format!("{}{userinfo}{host_port}{rest}", &base[..scheme_end])
}

/// Percent-encodes a path segment (an AMQP vhost name such as `/`).
pub fn encode_segment(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02x}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_path_and_keeps_the_query() {
        let url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable";
        assert_eq!(with_path(url, "test_1"), "postgres://postgres@127.0.0.1:5432/test_1?sslmode=disable");
        assert_eq!(with_path("amqp://h:1", "v"), "amqp://h:1/v");
        assert_eq!(with_path("amqp://h:1/%2f", "v"), "amqp://h:1/v");
        assert_eq!(origin("amqp://g:g@h:1/%2f?heartbeat=5"), "amqp://g:g@h:1");
    }

    #[test]
    fn reads_user_and_host() {
        assert_eq!(user("amqp://guest:guest@127.0.0.1:5672/x"), Some("guest"));
        assert_eq!(user("amqp://127.0.0.1:5672"), None);
        assert_eq!(host_port("amqp://g:g@127.0.0.1:1234/x", 5672), "127.0.0.1:1234");
        assert_eq!(host_port("amqp://localhost", 5672), "localhost:5672");
        assert_eq!(encode_segment("/"), "%2f");
    }

    #[test]
    fn replaces_host_and_port() {
        let url = "amqp://guest:p@ss@127.0.0.1:5672/%2f?heartbeat=5";
        assert_eq!(with_host_port(url, "127.0.0.1:9"), "amqp://guest:p@ss@127.0.0.1:9/%2f?heartbeat=5");
        assert_eq!(with_host_port("http://localhost:50061", "127.0.0.1:9"), "http://127.0.0.1:9");
        assert_eq!(with_host_port("amqp://h", "127.0.0.1:9"), "amqp://127.0.0.1:9");
    }
}
