//! The agent's Kubernetes mode, in small pieces: [`cgroup`] maps a
//! caller's `/proc/<pid>/cgroup` to a pod UID and container ID, [`pods`]
//! decides which workload a pod vouches for (both pure), and [`attestor`]
//! puts them together over a [`attestor::PodIndex`] of the node's pods,
//! which [`pod_cache`] keeps from a node-scoped `kube` watch; [`mode`] is
//! the setting and start-up of it all.
//!
//! The agent's credential towards the CA on Kubernetes (the projected
//! service-account token, re-read on every request) is
//! [`crate::ca_client::NodeCredential::TokenFile`].

pub mod attestor;
pub mod cgroup;
pub mod mode;
pub mod pod_cache;
pub mod pods;
