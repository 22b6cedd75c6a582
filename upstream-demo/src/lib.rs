//! Upstream demo: the order service, integrated with Recheck the way a producer
//! team would do it. The Recheck-specific code is two small files: [`orders`]
//! (`prepare` → commit → `publish`) and [`resend`] (the one lookup the hook needs).
//!
//! - [`config`]: every flag and environment variable of `serve`, in one [`Config`].
//! - [`cli`]: the command line — `serve` (the default) or `load`.
//! - [`store`]: the `orders` table over sqlx `Any` (SQLite or PostgreSQL).
//! - [`orders`]: `demo.v1.Orders/CreateOrder`, with fault injection for load runs.
//! - [`resend`]: `ResendSource` for the store (message id → committed payload).
//! - [`app`]: [`build`] opens the store, connects to RabbitMQ, declares the topology
//!   and binds the listener; [`App::run`] serves until the shutdown token is cancelled.
//! - [`load`]: the `load` subcommand — create orders, wait until settled, report `lost`.

pub mod app;
pub mod cli;
pub mod config;
pub mod load;
pub mod orders;
pub mod resend;
pub mod store;

pub use app::{App, build};
pub use config::Config;
pub use orders::OrdersService;
pub use store::Store;
