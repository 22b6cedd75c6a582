//! Bad input on the gRPC surfaces: the callback service's `Admin` and a producer's `ResendHook`
//! (the SDK's `ResendHookService`, as the fake producer of the callback suite serves it). Each
//! bad request gets a precise status code and a message naming the problem, and the service
//! still answers afterwards.

mod common;
#[allow(dead_code)] // the callback suite uses the rest of it
#[path = "callback/harness.rs"]
mod harness;

use harness::Env;
use recheck_proto::v1::{
    GetMessageRequest, ListMessagesRequest, MessageStatus, RecheckRequest, RedriveManyRequest,
    RedriveRequest, ResendRequest, StatsRequest, admin_client::AdminClient,
    resend_hook_client::ResendHookClient,
};
use tonic::Code;
use uuid::Uuid;

/// `(what, code, a word the message must hold)` for one refused call.
fn refused(what: &str, result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, names: &str) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(status.message().contains(names), "{what}: {:?} does not name {names:?}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_the_hook_refuse_bad_requests_precisely_and_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/callback.db?mode=rwc", dir.path().display());
    let env = Env::start(&url, |_| {}).await;
    let mut admin = AdminClient::connect(format!("http://{}", env.admin_addrs[0])).await.unwrap();
    let unknown = Uuid::now_v7().to_string();

    let get = |id: &str| GetMessageRequest { message_id: id.into() };
    refused("a non-UUID id", admin.get_message(get("order-42")).await, Code::InvalidArgument, "order-42");
    refused("an empty id", admin.get_message(get("")).await, Code::InvalidArgument, "not a UUID");
    refused("an unknown id", admin.get_message(get(&unknown)).await, Code::NotFound, &unknown);
    let list =
        |status: i32, page_size: u32| ListMessagesRequest { status, page_size, page_token: String::new() };
    refused("an unknown status", admin.list_messages(list(99, 0)).await, Code::InvalidArgument, "99");
    refused("a huge page", admin.list_messages(list(0, u32::MAX)).await, Code::InvalidArgument, "page_size");
    // A negative int32 on the wire is a huge uint32 here.
    refused(
        "a negative page",
        admin.list_messages(list(0, -1i32 as u32)).await,
        Code::InvalidArgument,
        "page_size",
    );
    let redrive = |id: &str| RedriveRequest { message_id: id.into() };
    refused("redrive of a non-UUID", admin.redrive(redrive("x")).await, Code::InvalidArgument, "\"x\"");
    refused(
        "redrive of an unknown id",
        admin.redrive(redrive(&unknown)).await,
        Code::FailedPrecondition,
        &unknown,
    );
    let confirmed = env.order("o-confirmed", true).await;
    let mut env = env;
    env.start_consumer().await;
    env.wait_status(
        confirmed,
        callback_service::store::Status::Confirmed,
        std::time::Duration::from_secs(30),
    )
    .await;
    refused(
        "redrive of a confirmed message",
        admin.redrive(redrive(&confirmed.to_string())).await,
        Code::FailedPrecondition,
        "not failed or rejected",
    );
    let many = |status: MessageStatus, limit| RedriveManyRequest {
        status: status.into(),
        limit,
        ..Default::default()
    };
    refused(
        "bulk redrive of confirmed",
        admin.redrive_many(many(MessageStatus::Confirmed, 0)).await,
        Code::InvalidArgument,
        "CONFIRMED",
    );
    refused(
        "a bulk limit over the cap",
        admin.redrive_many(many(MessageStatus::Failed, 10_001)).await,
        Code::InvalidArgument,
        "10001",
    );
    refused(
        "recheck of no producer",
        admin.recheck(RecheckRequest::default()).await,
        Code::InvalidArgument,
        "producer",
    );

    let mut hook = ResendHookClient::connect(env.hook_addr.clone()).await.unwrap();
    let resend = |message_id: &str, producer: &str, routing_key: &str, attempt: u32| ResendRequest {
        message_id: message_id.into(),
        producer: producer.into(),
        routing_key: routing_key.into(),
        business_key: "o".into(),
        attempt,
        published_at: 0,
    };
    refused(
        "a hook call with a bad id",
        hook.resend(resend("nope", "orders", "order.created", 1)).await,
        Code::InvalidArgument,
        "nope",
    );
    refused(
        "a routing key AMQP cannot carry",
        hook.resend(resend(&unknown, "orders", &"k".repeat(300), 1)).await,
        Code::InvalidArgument,
        "routing_key",
    );
    refused(
        "another producer's name",
        hook.resend(resend(&unknown, "someone-else", "order.created", 1)).await,
        Code::InvalidArgument,
        "someone-else",
    );
    // The largest attempt is no error: the attempt is the caller's count. An order the producer
    // never committed is NOT_FOUND (this hook's grace period is zero).
    let answer =
        hook.resend(resend(&unknown, "orders", "order.created", u32::MAX)).await.unwrap().into_inner();
    assert_eq!(answer.outcome(), recheck_proto::v1::ResendOutcome::NotFound, "{answer:?}");

    // Still serving.
    admin.stats(StatsRequest {}).await.expect("Admin still answers");
    env.shutdown().await;
}
