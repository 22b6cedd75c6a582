//! The consumer's role: the once-only step (inbox claim + effect in one transaction → commit →
//! CONFIRM → ack) and the CONFIRMs it sends. Stands on the broker layer; never on the producer.

pub mod confirmer;
pub mod consume;
pub mod inbox;
