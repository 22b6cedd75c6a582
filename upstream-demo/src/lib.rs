//! Upstream demo: a producer that integrates the `recheck` SDK. It publishes
//! `order.created` events check-first and serves the `ResendHook` gRPC service.
//!
//! - [`config`]: every flag and environment variable, in one [`Config`].
//! - [`app`]: [`build`] connects to RabbitMQ, declares the topology and binds the
//!   gRPC listener; [`App::run`] serves until the shutdown token is cancelled.
//!
//! Skeleton: only the gRPC health service is served so far; the order store,
//! publishing and the `ResendHook` come next.

pub mod app;
pub mod config;

pub use app::{App, build};
pub use config::Config;
