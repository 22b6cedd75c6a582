//! Service plumbing, the top floor: shutdown on signals and the loops a service must not lose;
//! with feature `service`, the broker settings as clap arguments (connect + declare) and the ops
//! HTTP server.

#[cfg(feature = "service")]
mod args;
#[cfg(feature = "service")]
pub mod ops;
pub mod shutdown;

#[cfg(feature = "service")]
pub use args::*;
