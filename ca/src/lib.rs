//! The Citadel certificate authority.
//!
//! It authenticates callers of Istio's CSR API (client certificates, JWTs),
//! signs SPIFFE X.509 certificates with its active authority, records every
//! issuance in a hash-chained ledger before answering, and serves metrics
//! and health. `citadel` (in `main.rs`) is a thin CLI over this library.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod auth;
pub mod authorities;
pub mod authority;
pub mod cli;
pub mod clock;
pub mod csr;
pub mod duration;
pub mod http;
pub mod issuer;
pub mod keystore;
pub mod metrics;
pub mod pemutil;
pub mod serve;
pub mod service;
pub mod tls;
