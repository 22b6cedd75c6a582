//! Callback service: the reconciliation engine of DESIGN.md. It persists CONFIRMs,
//! and on each due CHECK either closes the message or asks its producer to resend.
//!
//! - [`config`]: every flag and environment variable, in one [`Config`].
//! - [`app`]: [`build`] connects to RabbitMQ, declares the topology and binds the
//!   gRPC listener; [`App::run`] serves until the shutdown token is cancelled.
//!
//! Skeleton: only the gRPC health service is served so far; consuming checks and
//! confirms, the store and the `Admin` service come next.

pub mod app;
pub mod config;

pub use app::{App, build};
pub use config::Config;
