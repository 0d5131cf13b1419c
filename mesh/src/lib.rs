//! `citadel-mesh`: a whole Citadel mesh on one machine in one command, for a
//! new user's first minutes.
//!
//! `up` starts, in a data directory it owns, the CA (SQLite, self-signed root,
//! a sample policy directory it re-reads every second), a node agent joined
//! with a fresh token, and two sample services, frontend and backend, each
//! behind its own `citadel-proxy` with its own identity; then it prints what
//! runs where and the commands to try it. `down` stops exactly what `up`
//! started. The decisions (identities, entries, policies, command lines,
//! printed commands) are pure functions in [`plan`] and [`layout`]; [`up`],
//! [`down`] and [`procs`] are the thin shells that act on them.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod down;
pub mod error;
pub mod layout;
pub mod plan;
pub mod procs;
pub mod report;
pub mod sample_app;
pub mod state;
pub mod up;

pub use down::{StopReport, stop};
pub use error::MeshError;
pub use up::{Mesh, MeshConfig, start};
