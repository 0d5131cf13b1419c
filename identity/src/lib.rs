//! Citadel's identity core: SPIFFE IDs and trust domains, X.509 trust bundles,
//! X509-SVID profile checks and chain verification, certificate lifetime
//! math and rotation timing.
//!
//! Everything here is pure: no I/O, no clock reads, no randomness. Callers
//! pass the current time in as unix seconds.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bundle;
pub mod lifetime;
pub mod log;
pub mod rotation;
pub mod spiffe_id;
pub mod svid;
mod x509;

pub use bundle::{BundleError, TrustBundle};
pub use lifetime::{
    LifetimeError, LifetimePolicy, SignerWindow, Validity, leaf_validity, validate_policy,
};
pub use log::Escaped;
pub use rotation::{Backoff, renew_at, until_renewal};
pub use spiffe_id::{ServiceAccountRef, SpiffeId, SpiffeIdError, TrustDomain};
pub use svid::{
    LeafSvid, PeerRole, SvidError, check_citadel_leaf, check_signing_certificate, check_x509_svid,
    signing_chain_window, verify_chain, verify_chain_for,
};
