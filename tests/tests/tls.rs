//! TLS end to end, with a CA and certificates generated here (rcgen), and a second CA that
//! signed nothing the servers use (the "wrong" one):
//!
//! - gRPC: the callback service (`Admin` over TLS) and upstream-demo (`Orders` + `ResendHook` over
//!   mutual TLS) run as processes; the callback service calls the hook at `https://localhost:…`
//!   trusting the CA and presenting a client certificate. A load with dropped publishes ends with
//!   `lost = 0` and resends made through that hook; the admin CLI works with the CA; a client
//!   without the CA, a plaintext client and a client without (or with a foreign) certificate are
//!   refused.
//! - amqps: a private RabbitMQ node with a TLS listener that requires client certificates; a
//!   service's broker settings (`--amqp-url amqps://…`, `--amqp-tls-*`) connect, declare the
//!   topology, publish and consume, and `downstream-demo` consumes over it as a process; the
//!   wrong CA, or no client certificate, gets no connection.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use clap::Parser;
use lapin::{BasicProperties, options::QueueDeclareOptions};
use recheck::{
    Outgoing, Subscription, SubscriptionConfig,
    service::BrokerArgs,
    tls::{AmqpTls, ClientTls},
};
use recheck_tests::{
    Rabbit,
    deploy::{DeployOptions, Deployment},
    free_port,
    pki::Pki,
    rabbit::{NodeOptions, TlsListener},
};
use tokio::{process::Command, sync::Mutex};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Two cores: one heavy test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// A gRPC health check through `tls` at `url`: `Ok` only if the handshake and the call work.
async fn health(tls: &ClientTls, url: &str) -> Result<(), String> {
    let endpoint = tls.endpoint(url).map_err(|e| e.to_string())?.connect_timeout(Duration::from_secs(5));
    let channel: Channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    let request = HealthCheckRequest { service: String::new() };
    let mut client = HealthClient::new(channel);
    match tokio::time::timeout(Duration::from_secs(10), client.check(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!("call: {status:?}")),
        Err(_) => Err("call: timed out".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_resends_through_an_https_hook_and_refuses_untrusted_peers() {
    recheck_tests::init_tracing();
    let _turn = ONE_AT_A_TIME.lock().await;
    let kit = recheck_tests::kit().await;
    let vhost = kit.rabbit.fresh_vhost().await.unwrap();
    let pki = Pki::generate(&tmp("tls-grpc-pki"), "good").unwrap();
    let wrong = Pki::generate(&tmp("tls-grpc-pki"), "wrong").unwrap();

    let orders_port = free_port().unwrap();
    let mut opts = DeployOptions::new(tmp("tls-grpc"), vhost.url.clone());
    opts.orders_port = Some(orders_port);
    opts.hook_addr = Some(format!("https://localhost:{orders_port}"));
    // upstream-demo: Orders + ResendHook over mutual TLS.
    opts.upstream_env = pki.server_env();
    opts.upstream_env.extend(Pki::env(&[("RECHECK_TLS_CLIENT_CA", &pki.ca)]));
    // The callback service: Admin over TLS; trusts the CA and presents a certificate to the hook.
    opts.callback_env = pki.server_env();
    opts.callback_env.extend(pki.client_env());
    let bin_dir = recheck_tests::demo::bin_dir().unwrap();
    let d = Deployment::start(&bin_dir, &opts).await.unwrap();
    let admin_url = format!("https://localhost:{}", d.callback_ports[0]);
    let orders_url = format!("https://localhost:{orders_port}");

    // Every fifth business message is dropped after its commit: only the hook can deliver it.
    let running = Command::new(bin_dir.join("upstream-demo"))
        .args(["load", "--json", "--count", "150", "--concurrency", "16", "--skip-publish-rate", "0.2"])
        .args(["--addr", &orders_url, "--admin-addr", &admin_url, "--wait", "3m"])
        .args(["--points-database-url", &d.consumers[0].db])
        .envs(pki.client_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let report = recheck_tests::deploy::finish_load(running).await.unwrap();
    assert_eq!(report["lost"].as_u64(), Some(0), "{report}");
    let verdict = d.wait_settled(Duration::from_secs(120)).await.unwrap();
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert!(verdict.resent_messages > 0 && verdict.hook_calls > 0, "no resend over TLS: {verdict:?}");
    verdict.exactly_once().unwrap();

    // The admin CLI over TLS: with the CA it answers, without it (webpki roots only) it fails.
    let admin = |env: Vec<(String, String)>| {
        let mut command = Command::new(bin_dir.join("callback-service"));
        command.args(["admin", "--addr", &admin_url, "stats"]).envs(env).stdin(Stdio::null());
        async move { command.output().await.unwrap() }
    };
    let ok = admin(Pki::env(&[("RECHECK_TLS_CA", &pki.ca)])).await;
    assert!(ok.status.success(), "admin stats over TLS: {}", String::from_utf8_lossy(&ok.stderr));
    let refused = admin(Vec::new()).await;
    assert!(
        !refused.status.success(),
        "admin stats without the CA: {}",
        String::from_utf8_lossy(&refused.stdout)
    );

    // In-process clients: trusted ones pass, the others are refused.
    health(&pki.client(false).unwrap(), &admin_url).await.unwrap();
    health(&pki.client(true).unwrap(), &orders_url).await.unwrap();
    let refusals = [
        ("Admin, no CA (webpki roots)", health(&ClientTls::default(), &admin_url).await),
        ("Admin, the wrong CA", health(&wrong.client(false).unwrap(), &admin_url).await),
        (
            "Admin, plaintext",
            health(&ClientTls::default(), &format!("http://127.0.0.1:{}", d.callback_ports[0])).await,
        ),
        ("hook, no client certificate", health(&pki.client(false).unwrap(), &orders_url).await),
        ("hook, a foreign client certificate", {
            let foreign =
                ClientTls::load(Some(&pki.ca), Some((&wrong.client_cert, &wrong.client_key))).unwrap();
            health(&foreign, &orders_url).await
        }),
    ];
    for (case, result) in refusals {
        assert!(result.is_err(), "{case}: accepted");
    }
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_the_ca_publishes_and_consumes_and_refuses_the_wrong_ca() {
    recheck_tests::init_tracing();
    let _turn = ONE_AT_A_TIME.lock().await;
    let pki = Pki::generate(&tmp("tls-amqps-pki"), "good").unwrap();
    let wrong = Pki::generate(&tmp("tls-amqps-pki"), "wrong").unwrap();
    let listener = TlsListener {
        ca_file: pki.ca.clone(),
        cert_file: pki.server_cert.clone(),
        key_file: pki.server_key.clone(),
        verify_peer: true,
    };
    let options = NodeOptions { tls: Some(listener) };
    let rabbit =
        tokio::task::spawn_blocking(move || Rabbit::start_private_with(&options)).await.unwrap().unwrap();
    let result = amqps_suite(&rabbit, &pki, &wrong).await;
    tokio::task::spawn_blocking(move || rabbit.shutdown()).await.unwrap().unwrap();
    result.unwrap();
}

#[derive(Parser)]
struct Broker {
    #[command(flatten)]
    broker: BrokerArgs,
}

async fn amqps_suite(rabbit: &Rabbit, pki: &Pki, wrong: &Pki) -> anyhow::Result<()> {
    let vhost = rabbit.fresh_vhost().await?;
    let url = rabbit.amqps_url(&vhost.name).expect("the node has a TLS listener");
    anyhow::ensure!(url.starts_with("amqps://") && url.contains("@127.0.0.1:"), "{url}");

    // A service's broker settings, as its flags (or RECHECK_AMQP_URL / RECHECK_AMQP_TLS_*) give them.
    let path = |p: &Path| p.display().to_string();
    let args = Broker::try_parse_from([
        "service".to_owned(),
        format!("--amqp-url={url}"),
        format!("--amqp-tls-ca={}", path(&pki.ca)),
        format!("--amqp-tls-cert={}", path(&pki.client_cert)),
        format!("--amqp-tls-key={}", path(&pki.client_key)),
    ])?;
    let publisher = tokio::time::timeout(Duration::from_secs(30), args.broker.connect("tls-test")).await??;
    let topology = args.broker.topology();
    let body = b"over amqps";
    let properties = BasicProperties::default().with_message_id("tls-1".into());
    let message = Outgoing { exchange: &topology.parking_exchange(), routing_key: "", body, properties };
    publisher.publish(message).await?;
    let config = SubscriptionConfig {
        prefetch: 10,
        batch_size: 10,
        batch_linger: Duration::ZERO,
        ..SubscriptionConfig::new(topology.parking_queue(), "tls-test")
    };
    let mut subscription = Subscription::new(publisher.clone(), config).await?;
    let stop = CancellationToken::new();
    let batch = tokio::time::timeout(Duration::from_secs(10), subscription.next_batch(&stop)).await??;
    let batch = batch.expect("not cancelled");
    anyhow::ensure!(batch.len() == 1 && batch[0].data == body, "consumed {batch:?}");
    subscription.close().await;
    publisher.close().await;

    // A service process over amqps: downstream-demo consumes its queue.
    let dir = tmp("tls-amqps-downstream");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut downstream = Command::new(recheck_tests::demo::bin_dir()?.join("downstream-demo"))
        .arg("serve")
        .env("RECHECK_AMQP_URL", &url)
        .envs(Pki::env(&[
            ("RECHECK_AMQP_TLS_CA", &pki.ca),
            ("RECHECK_AMQP_TLS_CERT", &pki.client_cert),
            ("RECHECK_AMQP_TLS_KEY", &pki.client_key),
        ]))
        .env("DATABASE_URL", format!("sqlite://{}/points.db?mode=rwc", dir.display()))
        .env("RECHECK_OPS_ADDR", "127.0.0.1:0")
        .env("RECHECK_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let tls = AmqpTls::load(Some(&pki.ca), Some((&pki.client_cert, &pki.client_key)))?;
    let probe = recheck::publisher::connect_with_tls(&url, "tls-probe", &tls).await?;
    let consuming = async {
        loop {
            let channel = probe.create_channel().await?;
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            if let Ok(queue) =
                channel.queue_declare("points.order-created".into(), passive, Default::default()).await
                && queue.consumer_count() > 0
            {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), consuming).await??;
    downstream.kill().await?;
    let _ = probe.close(200, "done".into()).await;

    // No client certificate: the broker ends the handshake (bounded: lapin may retry).
    let no_cert = AmqpTls::load(Some(&pki.ca), None)?;
    let attempt = recheck::publisher::connect_with_tls(&url, "tls-refused", &no_cert);
    let outcome = tokio::time::timeout(Duration::from_secs(15), attempt).await;
    anyhow::ensure!(!matches!(outcome, Ok(Ok(_))), "connected without a client certificate");

    // The wrong CA: the handshake fails on the server's certificate. Asked of lapin without the
    // SDK's auto-recover, which would retry it for minutes.
    let wrong_ca = AmqpTls::load(Some(&wrong.ca), Some((&pki.client_cert, &pki.client_key)))?;
    let properties = lapin::ConnectionProperties::default();
    let direct = lapin::Connection::connect_with_config(
        &url,
        properties,
        wrong_ca.lapin(),
        lapin::runtime::default_runtime()?,
    );
    match tokio::time::timeout(Duration::from_secs(15), direct).await {
        Ok(Err(e)) => anyhow::ensure!(e.to_string().contains("certificate"), "not a certificate error: {e}"),
        Ok(Ok(_)) => anyhow::bail!("lapin connected trusting the wrong CA"),
        Err(_) => anyhow::bail!("lapin neither connected nor failed trusting the wrong CA"),
    }
    Ok(())
}
