//! Callback service: the reconciliation engine of DESIGN.md. It persists CONFIRMs,
//! and on each due CHECK either closes the message or asks its producer to resend.
//!
//! - [`config`]: every flag and environment variable, in one [`Config`].
//! - [`app`]: [`build`] opens the store (migrations), connects to RabbitMQ,
//!   declares the topology and binds the gRPC listener; [`App::run`] runs the
//!   loops below until the shutdown token is cancelled.
//! - [`store`]: messages, confirms and history over sqlx `Any` (SQLite / PostgreSQL).
//! - [`ingest`]: CONFIRM batches → one store transaction → `ack(multiple)`.
//! - [`reconcile`]: each due CHECK → decide → `ResendHook.Resend` → next CHECK → ack.
//! - [`failure`]: what a delivery fails with, classified once: retried in place, or parked.
//! - [`sweeper`]: no check left behind: overdue checks (CHECK lost or parked) republished.
//! - [`parking`]: CHECKs and CONFIRMs parked by the delivery limit, republished by the sweeper.
//! - [`backlog`]: consumer queue depths, so checks of a lagging consumer are deferred.
//! - [`breaker`]: per-producer circuit breaker, so a failing hook is backed off as a whole.
//! - [`registry`]: producer name → hook endpoint (and bearer token).
//! - [`admin`]: the `recheck.v1.Admin` gRPC service; [`cli`]: the `admin` subcommand over it.
//! - [`dashboard`]: the web dashboard and its JSON API, on the ops port (same tokens as `Admin`).

pub mod admin;
pub mod app;
pub mod backlog;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod failure;
pub mod ingest;
pub mod parking;
pub mod reconcile;
pub mod registry;
pub mod store;
pub mod sweeper;

pub use app::{App, build};
pub use config::Config;
