//! The kit itself: a fresh vhost takes a quorum queue and a persistent message, a fresh database
//! answers `SELECT 1`, and the broker comes back after `stop_app` / `start_app`.

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

async fn publish_and_get(url: &str, queue: &str) -> anyhow::Result<Vec<u8>> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), args).await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"hello",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await?;
    let message = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?
        .ok_or_else(|| anyhow::anyhow!("queue {queue} is empty"))?;
    conn.close(200, "bye".into()).await?;
    Ok(message.delivery.data.clone())
}

#[tokio::test]
async fn rabbit_vhost_takes_a_quorum_queue() -> anyhow::Result<()> {
    recheck_tests::init_tracing();
    let _guard = RESTART.read().await;
    let kit = recheck_tests::kit().await;
    let vhost = kit.rabbit.fresh_vhost().await?;
    assert_eq!(publish_and_get(&vhost, "smoke").await?, b"hello");

    let queues = kit.rabbit.ctl(&["list_queues", "-q", "-p", &vhost.name, "name", "type"]).await?;
    assert!(queues.contains("smoke") && queues.contains("quorum"), "{queues}");
    Ok(())
}

#[tokio::test]
async fn postgres_database_answers() -> anyhow::Result<()> {
    recheck_tests::init_tracing();
    let kit = recheck_tests::kit().await;
    let db = kit.postgres.fresh_database().await?;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db).await?;
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await?;
    assert_eq!(one, 1);
    pool.close().await;
    Ok(())
}

#[tokio::test]
async fn broker_comes_back_after_start_app() -> anyhow::Result<()> {
    recheck_tests::init_tracing();
    // The broker goes away for a moment: no other broker test in this file may run meanwhile.
    let _guard = RESTART.write().await;
    let kit = recheck_tests::kit().await;
    let vhost = kit.rabbit.fresh_vhost().await?;
    kit.rabbit.stop_app().await?;
    assert!(Connection::connect(&vhost, ConnectionProperties::default()).await.is_err());
    kit.rabbit.start_app().await?;
    assert_eq!(publish_and_get(&vhost, "after-restart").await?, b"hello");
    Ok(())
}

static RESTART: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
