//! The fault proxy against a plain TCP echo server: it forwards, and each fault does what it
//! says — cut resets live connections, stall holds bytes until resume, refuse rejects new ones.

use std::net::SocketAddr;
use std::time::Duration;

use recheck_tests::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// An echo server on a free port; it runs until the test's runtime ends.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

async fn echo(stream: &mut TcpStream, text: &[u8]) -> Vec<u8> {
    stream.write_all(text).await.unwrap();
    let mut buf = vec![0; text.len()];
    timeout(Duration::from_secs(5), stream.read_exact(&mut buf)).await.expect("echo timed out").unwrap();
    buf
}

/// Polls until the proxy counts `n` live connections (its tasks run on another thread).
async fn await_connections(proxy: &FaultProxy, n: usize) {
    for _ in 0..200 {
        if proxy.connections() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("proxy has {} live connections, expected {n}", proxy.connections());
}

/// Reads until the peer closes or resets; `true` if it did within the deadline.
async fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(timeout(Duration::from_secs(5), stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

/// A new connection to `addr` is refused: reset during the handshake or closed right after it.
async fn refused(addr: SocketAddr) -> bool {
    match TcpStream::connect(addr).await {
        Err(_) => true,
        Ok(mut stream) => closed(&mut stream).await,
    }
}

#[tokio::test]
async fn echoes_through_the_proxy() {
    let proxy = FaultProxy::start(echo_server().await).unwrap();
    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut a, b"hello").await, b"hello");
    assert_eq!(echo(&mut b, b"world").await, b"world");
    // Much larger than one copy buffer, written while the echo is read back.
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut read, mut write) = a.split();
    let mut back = vec![0; big.len()];
    let (written, echoed) = tokio::join!(write.write_all(&big), read.read_exact(&mut back));
    written.unwrap();
    echoed.unwrap();
    assert!(back == big, "the echo differs");
    await_connections(&proxy, 2).await;
    drop(a);
    await_connections(&proxy, 1).await;
    assert_eq!(
        proxy.url_for("amqp://guest:guest@10.0.0.1:5672/%2f"),
        format!("amqp://guest:guest@{}/%2f", proxy.addr())
    );
}

#[tokio::test]
async fn cut_closes_live_connections_and_accepts_new_ones() {
    let proxy = FaultProxy::start(echo_server().await).unwrap();
    let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut live, b"before").await, b"before");
    proxy.cut();
    assert!(closed(&mut live).await, "a cut connection must be closed");
    await_connections(&proxy, 0).await;
    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut fresh, b"after").await, b"after");
}

#[tokio::test]
async fn stall_holds_bytes_until_resume() {
    let proxy = FaultProxy::start(echo_server().await).unwrap();
    let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut live, b"flowing").await, b"flowing");
    proxy.stall();
    live.write_all(b"held").await.unwrap();
    // A connection opened during the stall is accepted but silent as well.
    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    fresh.write_all(b"new").await.unwrap();
    let mut buf = [0u8; 4];
    assert!(
        timeout(Duration::from_millis(700), live.read(&mut buf)).await.is_err(),
        "a stalled connection must neither deliver nor close"
    );
    assert!(timeout(Duration::from_millis(100), fresh.read(&mut buf)).await.is_err());
    assert_eq!(proxy.connections(), 2, "a stall keeps the sockets open");
    proxy.resume();
    timeout(Duration::from_secs(5), live.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"held");
    let mut buf = [0u8; 3];
    timeout(Duration::from_secs(5), fresh.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"new");
}

#[tokio::test]
async fn refuse_rejects_new_connections_only() {
    let proxy = FaultProxy::start(echo_server().await).unwrap();
    let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut live, b"up").await, b"up");
    proxy.refuse(true);
    assert!(refused(proxy.addr()).await, "a new connection must be refused");
    assert_eq!(echo(&mut live, b"still").await, b"still");
    proxy.refuse(false);
    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut again, b"back").await, b"back");
}

#[tokio::test]
async fn a_down_upstream_closes_proxied_connections() {
    let upstream = recheck_tests::free_port().unwrap();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], upstream))).unwrap();
    assert!(refused(proxy.addr()).await);
}

#[tokio::test]
async fn dropping_the_proxy_closes_everything() {
    let proxy = FaultProxy::start(echo_server().await).unwrap();
    let addr = proxy.addr();
    let mut live = TcpStream::connect(addr).await.unwrap();
    assert_eq!(echo(&mut live, b"x").await, b"x");
    drop(proxy);
    assert!(closed(&mut live).await);
    assert!(TcpStream::connect(addr).await.is_err(), "the port must no longer listen");
}

/// The SDK through the proxy: the broker is unreachable long enough for the publisher to replace
/// its connection, then lapin's own recovery of the old one succeeds too. That revived connection
/// (with a replayed consumer holding deliveries nobody reads) must be closed, not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_connection_that_comes_back_is_closed() {
    use recheck::{Publisher, PublisherConfig, Subscription, SubscriptionConfig};
    use tokio_util::sync::CancellationToken;

    recheck_tests::init_tracing();
    let vhost = recheck_tests::kit().await.rabbit.fresh_vhost().await.unwrap();
    let proxy = FaultProxy::start_for(&vhost.url).unwrap();
    let mut config = PublisherConfig::new(proxy.url_for(&vhost.url), "revived-test");
    config.recovery_timeout = Duration::from_secs(1);
    let publisher = Publisher::connect(config).await.unwrap();
    let channel = publisher.create_channel().await.unwrap();
    channel
        .queue_declare("revived".into(), lapin::options::QueueDeclareOptions::default(), Default::default())
        .await
        .unwrap();
    let subscription_config = SubscriptionConfig {
        prefetch: 10,
        batch_size: 10,
        batch_linger: Duration::from_millis(5),
        ..SubscriptionConfig::new("revived", "revived-test")
    };
    let consuming = subscription_config.consuming.clone();
    let mut subscription = Subscription::new(publisher.clone(), subscription_config).await.unwrap();
    assert!(consuming.get(), "subscribed: readiness sees it consuming");
    let shutdown = CancellationToken::new();
    // The subscription notices the loss and drives the publisher's reconnect.
    let consumer = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { while subscription.next_batch(&shutdown).await.unwrap().is_some() {} }
    });
    await_connections(&proxy, 1).await;

    proxy.refuse(true);
    proxy.cut();
    // Down for longer than the recovery timeout: the publisher gives up on lapin's recovery.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!consuming.get(), "a reader without its channel fails readiness");
    let before = proxy.forwarded();
    proxy.refuse(false);
    within(Duration::from_secs(10), "the publisher to replace its connection", || publisher.generation() > 0)
        .await;
    // lapin retries the old connection with backoff (1 s, 2 s, 4 s, …): it may come back, as a
    // second connection through the proxy.
    let revived = tokio::time::timeout(Duration::from_secs(10), async {
        while proxy.forwarded() < before + 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_ok();
    // Without it the closing below would go untested: a replaced connection that stays dead is
    // trivially gone.
    assert!(revived, "lapin did not bring the old connection back within 10 s");
    // The broker's view (lapin may keep a closed connection's socket a while, so not the proxy's):
    // one connection in the vhost, one consumer on the queue.
    let rabbit = &recheck_tests::kit().await.rabbit;
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let connections = rabbit.ctl(&["list_connections", "-q", "vhost"]).await.unwrap();
        let connections = connections.lines().filter(|line| line.trim() == vhost.name).count();
        let consumers = rabbit.ctl(&["list_consumers", "-q", "-p", &vhost.name]).await.unwrap();
        let consumers = consumers.lines().filter(|line| line.starts_with("revived\t")).count();
        if (connections, consumers) == (1, 1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{connections} connections and {consumers} consumers left after the old one came back"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    within(Duration::from_secs(10), "the reader to consume again", || consuming.get()).await;
    shutdown.cancel();
    consumer.await.unwrap();
}

async fn within(limit: Duration, what: &str, done: impl Fn() -> bool) {
    let until = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(tokio::time::Instant::now() < until, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn latency_delays_each_direction_and_keeps_order() {
    let proxy = FaultProxy::start(echo_server().await).unwrap();
    let mut fast = TcpStream::connect(proxy.addr()).await.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(echo(&mut fast, b"ping").await, b"ping");
    let direct = started.elapsed();
    proxy.set_latency(Duration::from_millis(40));
    let mut slow = TcpStream::connect(proxy.addr()).await.unwrap();
    let started = tokio::time::Instant::now();
    // Two writes in flight at once: both delayed, in order, the round trip ≈ 2 × 40 ms not 4 ×.
    slow.write_all(b"one,").await.unwrap();
    slow.write_all(b"two").await.unwrap();
    let mut both = vec![0; 7];
    timeout(Duration::from_secs(5), slow.read_exact(&mut both)).await.unwrap().unwrap();
    assert_eq!(both, b"one,two");
    let round_trip = started.elapsed();
    assert!(round_trip >= Duration::from_millis(80), "{round_trip:?}: not delayed both ways");
    assert!(round_trip < Duration::from_millis(160), "{round_trip:?}: chunks delayed one after another");
    assert!(direct < Duration::from_millis(40), "{direct:?} without latency");
}
