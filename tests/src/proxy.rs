//! A TCP fault proxy: put it between a service and RabbitMQ (or the callback service and a
//! producer's hook) and break the network on command.
//!
//! ```no_run
//! # fn f(upstream: std::net::SocketAddr) -> anyhow::Result<()> {
//! let proxy = recheck_tests::proxy::FaultProxy::start(upstream)?; // or start_for(url)
//! let url = proxy.url_for("amqp://guest:guest@127.0.0.1:5672/%2f"); // through the proxy
//! proxy.stall(); // bytes stop, sockets stay open: a black hole
//! proxy.resume();
//! proxy.cut(); // every live connection reset, new ones still accepted
//! proxy.refuse(true); // new connections closed at once: a down endpoint
//! proxy.set_latency(std::time::Duration::from_millis(5)); // each way, on new connections
//! # Ok(()) }
//! ```
//!
//! The proxy runs on a thread and runtime of its own, like the kit's servers: it serves tests with
//! any runtime (or none), and a test runtime busy with load cannot delay its faults.

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::urls;

/// A TCP proxy from a free port on 127.0.0.1 to `upstream`, with faults. Dropping it stops it and
/// closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    /// Cancelled by `cut`; every connection holds the token current when it was accepted.
    cut: std::sync::Mutex<CancellationToken>,
    stalled: watch::Sender<bool>,
    refusing: AtomicBool,
    live: AtomicUsize,
    forwarded: AtomicUsize,
    /// Added to every chunk in each direction, µs (a remote broker's network path).
    latency_us: AtomicU64,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards each connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = StdListener::bind(("127.0.0.1", 0)).context("binding the fault proxy")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            cut: std::sync::Mutex::new(CancellationToken::new()),
            stalled: watch::Sender::new(false),
            refusing: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            forwarded: AtomicUsize::new(0),
            latency_us: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the fault proxy's runtime")?;
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn({
                let (shared, stop) = (shared.clone(), stop.clone());
                move || {
                    runtime.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => accept_loop(listener, upstream, shared, stop).await,
                            Err(e) => tracing::error!(error = %e, "fault proxy cannot listen"),
                        }
                    });
                    // Dropping the runtime drops every connection task, closing its sockets.
                }
            })
            .context("spawning the fault proxy thread")?;
        tracing::debug!(%addr, %upstream, "fault proxy up");
        Ok(Self { addr, upstream, shared, stop, thread: Some(thread) })
    }

    /// A proxy in front of the host and port `url` names (`amqp://…` defaults to 5672,
    /// `http://…` to 80); clients then use [`url_for`](Self::url_for)`(url)`.
    pub fn start_for(url: &str) -> Result<Self> {
        let default_port = if url.starts_with("http://") { 80 } else { 5672 };
        let host_port = urls::host_port(url, default_port);
        let upstream = std::net::ToSocketAddrs::to_socket_addrs(&host_port)
            .with_context(|| format!("resolving {host_port}"))?
            .next()
            .with_context(|| format!("{host_port} resolves to no address"))?;
        Self::start(upstream)
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where connections go.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// `url` (`scheme://[user:password@]host:port[/path]`) with its host and port replaced by the
    /// proxy's: an AMQP URL or a hook's `http://` URL that goes through the proxy.
    pub fn url_for(&self, url: &str) -> String {
        urls::with_host_port(url, &self.addr.to_string())
    }

    /// Connections open through the proxy right now.
    pub fn connections(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Connections accepted and forwarded (not refused) since the start.
    pub fn forwarded(&self) -> usize {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// Resets every live connection on both sides now; new connections are still accepted.
    pub fn cut(&self) {
        let fresh = CancellationToken::new();
        let old = std::mem::replace(&mut *self.shared.cut.lock().expect("cut lock"), fresh);
        old.cancel();
    }

    /// Stops forwarding bytes on every live and new connection; the sockets stay open, so peers
    /// see neither an error nor data (a black hole) until [`resume`](Self::resume).
    pub fn stall(&self) {
        self.shared.stalled.send_replace(true);
    }

    /// Ends a [`stall`](Self::stall): held bytes flow again.
    pub fn resume(&self) {
        self.shared.stalled.send_replace(false);
    }

    /// Delays every byte by `latency` in each direction, on connections accepted from now on:
    /// the round trip of a broker on another host. Bytes keep flowing at full rate meanwhile (a
    /// delay line, not a bandwidth cap).
    pub fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.shared.latency_us.store(us, Ordering::SeqCst);
    }

    /// While `true`, new connections are reset as soon as they are accepted (a down endpoint);
    /// live ones are left alone.
    pub fn refuse(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "fault proxy accept");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.refusing.load(Ordering::SeqCst) {
            reset(client);
            continue;
        }
        let cut = shared.cut.lock().expect("cut lock").clone();
        shared.live.fetch_add(1, Ordering::SeqCst);
        shared.forwarded.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _live = LiveGuard(&shared.live);
            let latency = Duration::from_micros(shared.latency_us.load(Ordering::SeqCst));
            let result = forward(client, upstream, &cut, shared.stalled.subscribe(), latency).await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "fault proxy connection ended");
            }
        });
    }
}

/// Counts a connection as live until its task ends (or is dropped with the runtime).
struct LiveGuard<'a>(&'a AtomicUsize);

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Forwards both ways until both sides are done or the connection is cut.
async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    cut: &CancellationToken,
    stalled: watch::Receiver<bool>,
    latency: Duration,
) -> io::Result<()> {
    let mut server = tokio::select! {
        _ = cut.cancelled() => {
            reset(client);
            return Ok(());
        }
        server = TcpStream::connect(upstream) => match server {
            Ok(server) => server,
            Err(e) => {
                // The upstream is down: so is the proxied endpoint.
                reset(client);
                return Err(e);
            }
        },
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let result = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let both = async {
            tokio::try_join!(
                pump(client_read, server_write, stalled.clone(), latency),
                pump(server_read, client_write, stalled, latency)
            )
            .map(drop)
        };
        tokio::select! {
            _ = cut.cancelled() => None,
            result = both => Some(result),
        }
    };
    match result {
        Some(Ok(())) => Ok(()),
        // A cut, or one side failed: the other side sees the failure too.
        cut_or_failed => {
            reset(client);
            reset(server);
            cut_or_failed.unwrap_or(Ok(()))
        }
    }
}

/// Copies one direction, honouring stalls: nothing is read while stalled (so the sender's TCP
/// window fills up), and bytes read just before a stall are held until it ends.
async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut stalled: watch::Receiver<bool>,
    latency: Duration,
) -> io::Result<()> {
    if !latency.is_zero() {
        return delayed_pump(from, to, stalled, latency).await;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        flowing(&mut stalled).await;
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the other direction may still have bytes to deliver.
            return to.shutdown().await;
        }
        flowing(&mut stalled).await;
        to.write_all(&buf[..n]).await?;
    }
}

/// [`pump`] through a delay line: each chunk is written `latency` after it was read, while later
/// chunks are read meanwhile.
async fn delayed_pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    stalled: watch::Receiver<bool>,
    latency: Duration,
) -> io::Result<()> {
    // Bounded: a reader far ahead of the writer waits, and TCP back-pressure reaches the sender.
    let (line, mut out) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let mut read_stalled = stalled.clone();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            flowing(&mut read_stalled).await;
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            let due = tokio::time::Instant::now() + latency;
            if line.send((due, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let mut write_stalled = stalled;
    let writer = async move {
        while let Some((due, bytes)) = out.recv().await {
            tokio::time::sleep_until(due).await;
            flowing(&mut write_stalled).await;
            to.write_all(&bytes).await?;
        }
        // Half-close once everything read has been delivered.
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(drop)
}

async fn flowing(stalled: &mut watch::Receiver<bool>) {
    // The sender lives as long as the proxy (and with it this task's runtime).
    let _ = stalled.wait_for(|stalled| !*stalled).await;
}

/// Closes with RST, like a broken network path or a dead host, rather than an orderly FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
