//! Downstream demo, the points service: a consumer integrated the way we ask
//! consumer teams to. It awards loyalty points once per `order.created` event;
//! the `recheck` SDK brings the inbox, the CONFIRM and the ack order.
//!
//! - [`config`]: every flag and environment variable ([`Cli`], [`Config`]).
//! - [`app`]: [`build`] opens the store and declares the broker side;
//!   [`App::run`] runs the SDK's consumer loop until shutdown.
//! - [`effect`]: [`AwardPoints`], the only Recheck-facing business code.
//! - [`order`]: the message body and the points rule.
//! - [`store`]: the SQLite / PostgreSQL pool and the `points` table.
//! - [`faults`]: injected failures, rejections, slowness and lost confirms.
//! - [`stats`]: what `downstream-demo stats` prints.

pub mod app;
pub mod config;
pub mod effect;
pub mod faults;
pub mod order;
pub mod stats;
pub mod store;

pub use app::{App, EVENT, build};
pub use config::{Cli, Command, Config};
pub use effect::AwardPoints;
pub use stats::Stats;
