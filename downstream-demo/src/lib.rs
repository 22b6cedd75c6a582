//! Downstream demo: a consumer that integrates the `recheck` SDK. It awards loyalty
//! points for each `order.created` event exactly once and CONFIRMs it.
//!
//! - [`config`]: every flag and environment variable, in one [`Config`].
//! - [`app`]: [`build`] connects to RabbitMQ and declares the topology and the
//!   consumer's queue; [`App::run`] runs until the shutdown token is cancelled.
//!
//! Skeleton: nothing is consumed yet; the points store, the inbox and the
//! consumer loop come next.

pub mod app;
pub mod config;

pub use app::{App, EVENT, build};
pub use config::Config;
