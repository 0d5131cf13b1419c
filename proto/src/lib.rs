//! Wire types and gRPC stubs for every protocol Citadel speaks.
//!
//! Packages and field numbers follow the upstream definitions exactly
//! (`shared/wire-facts.md`); fields we never read or write are left out,
//! which proto3 parsers tolerate.
#![forbid(unsafe_code)]

/// Istio's API namespace.
pub mod istio {
    /// `istio.v1`.
    pub mod v1 {
        /// `istio.v1.auth`: the CSR API (`IstioCertificateService`).
        #[allow(missing_docs, clippy::all)]
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub use prost_types;
