//! The Recheck wire contract: generated gRPC code for the `.proto` files beside
//! this crate. Nothing else lives here, so any change to the contract shows up
//! as a diff of `recheck/v1/*.proto`.
//!
//! - [`v1::resend_hook_client`] / [`v1::resend_hook_server`]: the hook a producer
//!   serves (`recheck.v1.ResendHook/Resend` and `ResendBatch`).
//! - [`v1::admin_client`] / [`v1::admin_server`]: the callback service's operator API.
//! - [`demo::v1`]: the demo order service's `Orders` API (not part of the contract).

pub mod v1 {
    tonic::include_proto!("recheck.v1");
}

pub mod demo {
    pub mod v1 {
        tonic::include_proto!("demo.v1");
    }
}
