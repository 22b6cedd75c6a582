//! Recheck SDK: reliable "publish after commit" with a delayed second check.
//!
//! A producer links it to publish the CHECK first, commit, then publish the
//! business message, and to serve the resend hook. A consumer links it to
//! process each message once and confirm it. See DESIGN.md for the contract.
//!
//! - [`topology`]: every exchange and queue, declared by one function.
//! - [`message`]: wire format v1 (CHECK / CONFIRM batches, headers), typed decode errors.
//! - [`publisher`]: broker-confirmed publishing that republishes across reconnects.
//! - [`group_commit`]: many callers, one broker message, one confirm wait.
//! - [`producer`]: `prepare` → commit → `publish`; also the seed order.
//! - [`hook`]: the producer's `ResendHook` gRPC service over one lookup trait.
//! - [`auth`]: bearer tokens on gRPC servers (the hook, the callback service's Admin API).
//! - [`inbox`], [`confirmer`], [`consume`]: the consumer's once-only step and CONFIRMs.
//! - [`signing`]: HMAC-SHA256 signatures on CONFIRMs, per consumer key.
//! - [`db`]: opening a store (SQLite or PostgreSQL through sqlx `Any`) the one way; `$n`
//!   placeholders for set-based statements.
//! - [`parking`]: poison messages go to parking with a reason.
//! - [`subscription`]: batches of deliveries from a queue, across reconnects.
//! - [`retry`]: a failed delivery classified once (transient or poison), retried in place.
//! - `service` (feature `service`): broker settings as clap args, connect + declare.
//! - [`shutdown`]: a cancellation token for SIGTERM / SIGINT, and [`shutdown::Loops`]: a service loop that dies takes the service down.
//! - [`trace`]: W3C trace context in AMQP headers, CHECK entries and gRPC metadata; with feature
//!   `service`, the log subscriber (text / JSON with trace ids) and optional OTLP export (`otlp`).
//! - [`telemetry`]: the metric catalog (names, labels, help) every component records by.
//! - [`secret`]: `SecretUrl` (URLs that may hold passwords print redacted) and `redact_url`.
//! - [`tls`]: rustls for the gRPC servers and clients and `amqps://`, from PEM files (clap
//!   arguments with feature `service`).
//! - `ops` (feature `service`): the ops HTTP server (`/metrics`, `/healthz`, `/readyz`) and gRPC
//!   health, both from one set of readiness checks.

#![warn(missing_docs)]

pub mod auth;
pub mod confirmer;
pub mod consume;
pub mod db;
mod error;
pub mod group_commit;
pub mod hook;
pub mod inbox;
pub mod message;
#[cfg(feature = "service")]
pub mod ops;
pub mod parking;
pub mod producer;
pub mod publisher;
pub mod retry;
pub mod secret;
#[cfg(feature = "service")]
pub mod service;
pub mod shutdown;
pub mod signing;
pub mod subscription;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod trace;

pub use auth::BearerAuth;
pub use confirmer::Confirmer;
pub use consume::{Applied, ConsumerConfig, ConsumerLoop, Effect, Incoming, Transient};
pub use error::{Error, Result};
pub use group_commit::{GroupCommit, GroupCommitConfig};
pub use hook::{Lookup, ResendHookService, ResendSource};
pub use inbox::Inbox;
pub use producer::{Event, Prepared, Producer, ProducerConfig};
pub use publisher::{Outgoing, Publisher, PublisherConfig};
pub use secret::SecretUrl;
pub use subscription::{Subscription, SubscriptionConfig};
pub use topology::Topology;
