//! Free TCP ports on 127.0.0.1.
//!
//! The OS picks a free port (bind to port 0) and the socket is closed again before the server
//! binds it: a small race, acceptable for tests. Ports are remembered so one process never hands
//! out the same port twice (the OS may reuse a just-closed ephemeral port).

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

use anyhow::{Context, Result};

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port that is free right now and was not returned before by this process.
pub fn free_port() -> Result<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let port = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .context("binding 127.0.0.1:0 to find a free port")?
            .port();
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no new free port after 100 tries")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_are_distinct() {
        let a = super::free_port().unwrap();
        let b = super::free_port().unwrap();
        assert_ne!(a, b);
    }
}
