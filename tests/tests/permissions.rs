//! The least-privilege RabbitMQ users of `compose.yaml`, for real: the users and permissions of
//! `compose/rabbitmq-definitions.json` are created on a fresh vhost of the test broker (with the
//! passwords compose's `RECHECK_AMQP_URL`s use), the three services run as processes, each as its
//! own user, and a load with faults (dropped publishes, lost confirms, transient failures) ends
//! with `lost = 0` — the permissions suffice. Then each user is refused what it does not need:
//! the consumer forging a CHECK or a CONFIRM-looking message on the checks exchange, reading the
//! confirms queue or deleting it; the producer reading checks or forging a CONFIRM; the callback
//! service publishing business messages (ACCESS_REFUSED, 403, every time).

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use lapin::{
    BasicProperties, Connection,
    options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions},
    types::FieldTable,
};
use recheck_tests::{
    Rabbit,
    definitions::{self, BrokerLogin, Definitions},
    deploy::{DeployOptions, Deployment, LoadOptions},
};

/// The compose services, in the order of the deployment's roles they become.
const SERVICES: [&str; 3] = ["callback", "upstream", "downstream"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_runs_with_its_own_least_privilege_user_and_nothing_more() {
    recheck_tests::init_tracing();
    let kit = recheck_tests::kit().await;
    let definitions = Definitions::load(&definitions::definitions_path()).unwrap();
    let compose = std::fs::read_to_string(definitions::compose_path()).unwrap();
    let logins = definitions::compose_logins(&compose).unwrap();
    let vhost = kit.rabbit.fresh_vhost().await.unwrap();
    // Users are per broker, not per vhost: suffixed, so runs side by side do not meet.
    let suffix = vhost.name.trim_start_matches("test-").chars().take(12).collect::<String>();
    let mut created = Vec::new();
    let result = async {
        let mut urls = Vec::new();
        for service in SERVICES {
            let login = logins
                .iter()
                .find(|l| l.service == service)
                .with_context(|| format!("{service}: no login"))?;
            let user = format!("{}-{suffix}", login.user);
            create_user(&kit.rabbit, &definitions, login, &user, &vhost.name).await?;
            created.push(user.clone());
            urls.push(definitions::with_login(&vhost.url, &user, &login.password));
        }
        let [callback, upstream, downstream] = <[String; 3]>::try_from(urls).expect("three services");
        run_load(&vhost.url, &callback, &upstream, &downstream).await?;
        refusals(&callback, &upstream, &downstream).await
    }
    .await;
    for user in created {
        let _ = kit.rabbit.ctl(&["delete_user", &user]).await;
    }
    result.unwrap();
}

/// `user` with `login`'s password and the definitions' permissions of `login.user`, on `vhost`.
async fn create_user(
    rabbit: &Rabbit,
    definitions: &Definitions,
    login: &BrokerLogin,
    user: &str,
    vhost: &str,
) -> Result<()> {
    let defined = definitions.user(&login.user).with_context(|| format!("{} is not defined", login.user))?;
    anyhow::ensure!(
        defined.password_matches(&login.password)?,
        "{}: compose's password is not the defined one",
        login.user
    );
    let p = definitions
        .permission(&login.user, &login.vhost)
        .with_context(|| format!("{} has no permissions on {:?}", login.user, login.vhost))?;
    rabbit.ctl(&["add_user", user, &login.password]).await?;
    rabbit.ctl(&["set_permissions", "-p", vhost, user, &p.configure, &p.write, &p.read]).await?;
    Ok(())
}

async fn run_load(admin_url: &str, callback: &str, upstream: &str, downstream: &str) -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("permissions");
    // The deployment's own URL (the guest user) only probes for the consumer; each service
    // connects as its own user.
    let mut opts = DeployOptions::new(dir, admin_url);
    let amqp = |url: &str| vec![("RECHECK_AMQP_URL".to_owned(), url.to_owned())];
    opts.callback_env = amqp(callback);
    opts.upstream_env = amqp(upstream);
    opts.consumers[0].env = amqp(downstream);
    opts.consumers[0].faults.drop_confirm_rate = 0.05;
    opts.consumers[0].faults.fail_rate = 0.05;
    let deployment = Deployment::start(&recheck_tests::demo::bin_dir()?, &opts).await?;
    let load = LoadOptions { skip_publish_rate: 0.1, abort_after_check_rate: 0.05, ..LoadOptions::new(200) };
    let report = deployment.load(&load).await?;
    let verdict = deployment.wait_settled(Duration::from_secs(120)).await?;
    deployment.stop().await?;
    anyhow::ensure!(report["lost"].as_u64() == Some(0), "load report: {report}");
    anyhow::ensure!(verdict.lost == 0, "{verdict:?}");
    verdict.exactly_once()?;
    anyhow::ensure!(verdict.resent_messages > 0, "nothing was resent: {verdict:?}");
    Ok(())
}

/// What each user may not do, each refused with ACCESS_REFUSED.
async fn refusals(callback: &str, upstream: &str, downstream: &str) -> Result<()> {
    let confirm = br#"{"v":1,"consumer":"points","confirms":[]}"#;
    let check = br#"{"v":1,"producer":"orders","checks":[]}"#;
    let cases: [(&str, &str, Op); 8] = [
        (
            "consumer publishes a CONFIRM-looking message to the checks exchange",
            downstream,
            Op::Publish("recheck.checks", confirm),
        ),
        ("consumer forges a CHECK", downstream, Op::Publish("recheck.checks.delay", check)),
        ("consumer reads the confirms queue", downstream, Op::Consume("recheck.confirms")),
        ("consumer deletes the confirms queue", downstream, Op::Delete("recheck.confirms")),
        ("producer reads the checks queue", upstream, Op::Consume("recheck.checks")),
        ("producer forges a CONFIRM", upstream, Op::Publish("recheck.confirms", confirm)),
        ("producer reads the consumer's queue", upstream, Op::Consume("points.order-created")),
        ("callback service publishes a business message", callback, Op::Publish("recheck.events", b"{}")),
    ];
    let mut failures = Vec::new();
    for (case, url, op) in cases {
        match op.run(url).await {
            Ok(Refused::AccessRefused) => {}
            Ok(Refused::Allowed) => failures.push(format!("{case}: allowed")),
            Err(e) => failures.push(format!("{case}: {e:#}")),
        }
    }
    if !failures.is_empty() {
        bail!("not refused as expected:\n{}", failures.join("\n"));
    }
    Ok(())
}

enum Op {
    /// A persistent publish in confirm mode to an exchange (routing key `order.created`).
    Publish(&'static str, &'static [u8]),
    Consume(&'static str),
    Delete(&'static str),
}

enum Refused {
    AccessRefused,
    Allowed,
}

impl Op {
    async fn run(&self, url: &str) -> Result<Refused> {
        let connection = recheck::publisher::connect(url, "permissions-test").await?;
        let channel = connection.create_channel().await?;
        let outcome = match *self {
            Op::Publish(exchange, body) => {
                channel.confirm_select(ConfirmSelectOptions::default()).await?;
                let properties = BasicProperties::default().with_delivery_mode(2);
                let options = BasicPublishOptions::default();
                match channel
                    .basic_publish(exchange.into(), "order.created".into(), options, body, properties)
                    .await
                {
                    Ok(confirm) => confirm.await.map(drop),
                    Err(e) => Err(e),
                }
            }
            Op::Consume(queue) => channel
                .basic_consume(
                    queue.into(),
                    "permissions-test".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map(drop),
            Op::Delete(queue) => {
                channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await.map(drop)
            }
        };
        close(connection).await;
        match outcome.map_err(recheck::Error::from) {
            Ok(()) => Ok(Refused::Allowed),
            Err(e) if e.amqp_code() == Some(403) => Ok(Refused::AccessRefused),
            Err(e) => Err(e.into()),
        }
    }
}

async fn close(connection: Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close(200, "done".into())).await;
}
