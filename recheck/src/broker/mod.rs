//! The broker transport both roles stand on: broker-confirmed publishing across reconnects,
//! subscriptions in micro-batches, the topology, parking, group commit (many callers, one broker
//! message), and Recheck's control messages.

mod connection;
pub mod control;
pub mod group_commit;
pub mod parking;
pub mod publisher;
pub mod subscription;
pub mod topology;
