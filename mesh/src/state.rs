//! `mesh.json` in the data directory: what the last `up` chose and started,
//! so that `down` stops exactly those processes and the next `up` keeps the
//! same ports. It holds no secret (the join token is never written).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plan::{Attestation, Ports};

/// What `up` recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The ports of the last `up`.
    pub ports: Option<Ports>,
    /// How identities were told apart.
    pub attestation: Option<Attestation>,
    /// Where the socket and the services' executables were.
    pub runtime_dir: Option<PathBuf>,
    /// The processes started, in start order; emptied by `down`.
    pub processes: Vec<Recorded>,
}

/// One process `up` started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// `ca`, `agent`, `backend`, …
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Its start time (`/proc/<pid>/stat` field 22, clock ticks after boot):
    /// with the pid, this names the process even after the pid is reused.
    pub start_time: u64,
    /// The executable it was started with (its `argv[0]`).
    pub program: PathBuf,
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not ours or is damaged.
    #[error("{path}: not a citadel-mesh state file: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl State {
    /// Reads `path`; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<State>, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StateError::Invalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
    }

    /// Writes `path` (0600) through a temporary file and a rename, so a crash
    /// never leaves half a file.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(|e| StateError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&text).map_err(io)?;
        f.write_all(b"\n").map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.json");
        assert_eq!(State::load(&path).unwrap(), None);
        let state = State {
            ports: Some(Ports::from_array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])),
            attestation: Some(Attestation::Uids {
                frontend: 7,
                backend: 8,
            }),
            runtime_dir: Some(PathBuf::from("/run/x")),
            processes: vec![Recorded {
                name: "ca".into(),
                pid: 42,
                start_time: 99,
                program: PathBuf::from("/bin/citadel"),
            }],
        };
        state.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), Some(state));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn rejects_a_file_that_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.json");
        std::fs::write(&path, "{\"processes\": 3}").unwrap();
        assert!(matches!(
            State::load(&path),
            Err(StateError::Invalid { .. })
        ));
    }
}
