//! The Citadel certificate authority.
//!
//! It authenticates callers of Istio's CSR API (client certificates, one-time
//! join tokens, JWTs), lets node agents request their allowed workloads'
//! identities, signs SPIFFE X.509 certificates with its active authority,
//! records every issuance in a hash-chained ledger before answering, streams
//! the trust bundle and the policy set to node agents and records their
//! acknowledgements, and serves metrics and health. `citadel` (in `main.rs`) is a thin CLI over
//! this library.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admission;
pub mod auth;
pub mod authorities;
pub mod authority;
pub mod authority_manager;
pub mod bundle_service;
pub mod bundle_watch;
pub mod ca_dir_watch;
pub mod checkpoint;
pub mod cli;
pub mod clock;
pub mod conn_limits;
pub mod csr;
pub mod duration;
pub mod http;
pub mod issuer;
pub mod join_token;
pub mod k8s;
pub mod keystore;
pub mod leadership;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod node_authz;
pub mod pemutil;
pub mod policy_jwks;
pub mod policy_service;
pub mod policy_set;
pub mod policy_source;
pub mod root_cmd;
pub mod rotation;
pub mod rotation_driver;
pub mod sealed_keystore;
pub mod serve;
pub mod service;
pub mod tls;
