//! The agent's Kubernetes mode, in small pure pieces: [`cgroup`] maps a
//! caller's `/proc/<pid>/cgroup` to a pod UID and container ID, and [`pods`]
//! decides which workload a pod vouches for.
//!
//! The agent's credential towards the CA on Kubernetes (the projected
//! service-account token, re-read on every request) is
//! [`crate::ca_client::NodeCredential::TokenFile`].

pub mod cgroup;
pub mod pods;
