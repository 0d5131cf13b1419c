//! What can go wrong in `up` and `down`, each with what to do about it.

use std::path::PathBuf;

use crate::state::StateError;

/// Why `up` or `down` failed.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A file-system or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A binary `up` runs is not there.
    #[error(
        "{path} not found: build the binaries first with `cargo build --release -p citadel-ca -p citadel-agent -p citadel-proxy -p citadel-mesh` (citadel-mesh looks next to itself; --bin-dir to look elsewhere)"
    )]
    MissingBinary {
        /// The missing file.
        path: PathBuf,
    },
    /// The data directory holds files citadel-mesh did not make.
    #[error(
        "{dir} exists, is not empty and has no mesh.json: it is not a citadel-mesh data directory; choose another --data-dir"
    )]
    NotOurs {
        /// The directory.
        dir: PathBuf,
    },
    /// A mesh from this data directory is still running.
    #[error(
        "a mesh is already up in {dir} ({name}, pid {pid}, is running); stop it first with `citadel-mesh down --data-dir {dir}`"
    )]
    AlreadyUp {
        /// The data directory.
        dir: PathBuf,
        /// A process still running.
        name: String,
        /// Its pid.
        pid: u32,
    },
    /// `mesh.json` could not be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// A process exited while `up` waited for it.
    #[error("{name} exited during start-up ({status}); its log {log}:\n{tail}")]
    Exited {
        /// Which.
        name: String,
        /// Its exit status.
        status: String,
        /// Its exit code, if it exited (rather than being killed).
        code: Option<i32>,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// A process did not become ready in time.
    #[error("{name} not ready after {secs} s; its log {log}:\n{tail}")]
    NotReady {
        /// Which.
        name: String,
        /// How long `up` waited.
        secs: u64,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// `citadel token create` failed.
    #[error("creating the agent's join token failed: {0}")]
    Token(String),
    /// The runtime directory cannot be trusted.
    #[error("{path}: {reason}")]
    UnsafeDir {
        /// The directory.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
}

/// `map_err` helper: an I/O error with what was being done.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MeshError {
    let what = what.into();
    move |source| MeshError::Io { what, source }
}
