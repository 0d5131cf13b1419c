//! Citadel's test kit, shared by every crate's integration tests, the
//! end-to-end tests in `tests/tests/` and the `citadel-load` generator:
//! a JWT issuer that plays the Kubernetes service-account issuer, a CSR
//! builder, a client of Istio's CSR API, and a runner for the real binaries.
// `unsafe` only where a test needs a system call std lacks (setns in netns.rs).
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod cfssl_bench;
pub mod client;
pub mod csr;
pub mod fake_kube;
pub mod faults;
pub mod load;
pub mod mesh;
pub mod mtls;
pub mod netns;
pub mod process;
pub mod tokens;

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
