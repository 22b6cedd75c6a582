//! The ground floor: wire format v1, as `docs/contract.md` states it. Depends on nothing else of
//! the crate.

pub mod message;
