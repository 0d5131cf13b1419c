//! Wire types and gRPC stubs for every protocol Citadel speaks.
//!
//! Packages and field numbers follow the upstream definitions exactly
//! (`shared/wire-facts.md`); fields we never read or write are left out,
//! which proto3 parsers tolerate.
#![forbid(unsafe_code)]

pub mod codec;

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

/// Envoy's xDS API (the subset SDS needs).
pub mod envoy {
    /// `envoy.service.*`.
    pub mod service {
        /// `envoy.service.secret`.
        pub mod secret {
            /// `envoy.service.secret.v3`: `SecretDiscoveryService`.
            #[allow(missing_docs, clippy::all)]
            pub mod v3 {
                tonic::include_proto!("envoy.service.secret.v3");
            }
        }
        /// `envoy.service.discovery`.
        pub mod discovery {
            /// `envoy.service.discovery.v3`: discovery requests and responses.
            #[allow(missing_docs, clippy::all)]
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
    /// `envoy.config.*`.
    pub mod config {
        /// `envoy.config.core`.
        pub mod core {
            /// `envoy.config.core.v3`: `Node`, `DataSource`.
            #[allow(missing_docs, clippy::all)]
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    /// `envoy.extensions.*`.
    pub mod extensions {
        /// `envoy.extensions.transport_sockets`.
        pub mod transport_sockets {
            /// `envoy.extensions.transport_sockets.tls`.
            pub mod tls {
                /// `envoy.extensions.transport_sockets.tls.v3`: `Secret` and friends.
                #[allow(missing_docs, clippy::all)]
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                }
            }
        }
    }
}

/// googleapis types.
pub mod google {
    /// `google.rpc`.
    pub mod rpc {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("google.rpc");
    }
}

/// The SPIFFE Workload API. Upstream declares no protobuf package, so the
/// service is `SpiffeWorkloadAPI` at the root.
#[allow(missing_docs, clippy::all)]
pub mod spiffe_workload {
    tonic::include_proto!("_");
}

/// Citadel's own services.
pub mod citadel {
    /// `citadel.v1`: the trust-bundle and policy streams.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("citadel.v1");
    }
}

/// The `type_url` of an SDS `Secret`, in `Any` and in discovery messages.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

pub use prost_types;
