//! Security, below the broker and both roles: TLS from PEM files, bearer tokens on gRPC, signed
//! CONFIRMs, and secrets that print redacted.

pub mod auth;
pub mod secret;
pub mod signing;
pub mod tls;
