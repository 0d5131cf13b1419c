//! Where everything lives: the data directory `up` owns, and the runtime
//! directory (agent socket, the executables the services run) that the
//! services' uids must be able to reach. Pure path arithmetic plus the one
//! rule deciding where the runtime directory goes.

use std::path::{Path, PathBuf};

use crate::plan::Service;

/// The files `up` keeps in its data directory and its runtime directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The data directory (absolute).
    pub data_dir: PathBuf,
    /// Agent socket and the executables the services run (absolute).
    pub runtime_dir: PathBuf,
}

impl Layout {
    /// `mesh.json`: ports, uids and the processes of the last `up`.
    pub fn state_file(&self) -> PathBuf {
        self.data_dir.join("mesh.json")
    }
    /// The CA's data directory (SQLite, root key, `bundle.pem`).
    pub fn ca_dir(&self) -> PathBuf {
        self.data_dir.join("ca")
    }
    /// The CA's trust bundle, which the agent trusts.
    pub fn ca_bundle(&self) -> PathBuf {
        self.ca_dir().join("bundle.pem")
    }
    /// The sample policy directory the CA serves (`--policies`).
    pub fn policies_dir(&self) -> PathBuf {
        self.data_dir.join("policies")
    }
    /// The sample PeerAuthentication file.
    pub fn peer_authentication_file(&self) -> PathBuf {
        self.policies_dir().join("peer-authentication.yaml")
    }
    /// The sample AuthorizationPolicy file (the one to edit).
    pub fn authorization_file(&self) -> PathBuf {
        self.policies_dir().join("backend-authorization.yaml")
    }
    /// The agent's directory.
    pub fn agent_dir(&self) -> PathBuf {
        self.data_dir.join("agent")
    }
    /// The agent's entries file (uid/path → SPIFFE ID).
    pub fn entries_file(&self) -> PathBuf {
        self.agent_dir().join("entries.yaml")
    }
    /// The agent's `--data-dir` (node identity, last trust bundle).
    pub fn agent_data_dir(&self) -> PathBuf {
        self.agent_dir().join("data")
    }
    /// The agent's saved node identity.
    pub fn node_identity_file(&self) -> PathBuf {
        self.agent_data_dir().join("node-identity.pem")
    }
    /// Every log.
    pub fn logs_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }
    /// The log of one component (`ca`, `agent`, `frontend-proxy`, …).
    pub fn log(&self, name: &str) -> PathBuf {
        self.logs_dir().join(format!("{name}.log"))
    }
    /// The agent socket's directory.
    pub fn socket_dir(&self) -> PathBuf {
        self.runtime_dir.join("run")
    }
    /// The agent socket.
    pub fn socket(&self) -> PathBuf {
        self.socket_dir().join("agent.sock")
    }
    /// The executables one service runs (its own copies, so that the agent can
    /// tell the services apart by executable path when they share a uid).
    pub fn service_bin_dir(&self, service: Service) -> PathBuf {
        self.runtime_dir.join("bin").join(service.name())
    }
    /// The service's copy of `citadel-proxy`.
    pub fn service_proxy(&self, service: Service) -> PathBuf {
        self.service_bin_dir(service).join("citadel-proxy")
    }
    /// The service's copy of `citadel-mesh` (runs the sample application).
    pub fn service_app(&self, service: Service) -> PathBuf {
        self.service_bin_dir(service).join("citadel-mesh")
    }
}

/// Where the runtime directory goes. The services run as other uids when
/// `up` runs as root, and those uids must traverse every directory above the
/// agent socket and the executables. A data directory inside a directory
/// others cannot enter (a fresh clone under `/root`, mode 0700) would lock
/// them out, so then the runtime directory moves to a root-owned directory
/// under `/run`, named after the data directory so each data directory keeps
/// its own.
pub fn runtime_dir(
    data_dir: &Path,
    services_need_access: bool,
    others_can_enter_data_dir: bool,
    run_base: &Path,
) -> PathBuf {
    if !services_need_access || others_can_enter_data_dir {
        return data_dir.join("runtime");
    }
    run_base.join(runtime_name(data_dir))
}

/// Where runtime directories outside their data directory go:
/// `/run/citadel-mesh`, or `citadel-mesh` in the temporary directory on a
/// system without `/run`.
pub fn run_base() -> PathBuf {
    if Path::new("/run").is_dir() {
        PathBuf::from("/run/citadel-mesh")
    } else {
        std::env::temp_dir().join("citadel-mesh")
    }
}

/// Whether `recorded` is exactly the runtime directory `up` would have
/// moved out of `data_dir`: only such a directory may `down` delete (the
/// path comes from a file, and `down` may run as root).
pub fn is_moved_runtime_dir(data_dir: &Path, recorded: &Path, run_base: &Path) -> bool {
    recorded == runtime_dir(data_dir, true, false, run_base)
}

/// `<first 16 hex digits of SHA-256 of the data directory path>`.
fn runtime_name(data_dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let digest = ring::digest::digest(&ring::digest::SHA256, data_dir.as_os_str().as_bytes());
    digest
        .as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether every directory from `/` down to `dir`'s parent lets others
/// search it (`o+x`), judged from `(path, mode)` pairs of those ancestors.
pub fn others_can_traverse(ancestor_modes: &[(PathBuf, u32)]) -> Result<(), PathBuf> {
    match ancestor_modes.iter().find(|(_, mode)| mode & 0o001 == 0) {
        Some((path, _)) => Err(path.clone()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_dir_stays_in_the_data_dir_unless_other_uids_are_locked_out() {
        let data = Path::new("/root/citadel/citadel-mesh-data");
        let run = Path::new("/run/citadel-mesh");
        assert_eq!(
            runtime_dir(data, false, false, run),
            data.join("runtime"),
            "no other uids: nothing to reach"
        );
        assert_eq!(runtime_dir(data, true, true, run), data.join("runtime"));
        let moved = runtime_dir(data, true, false, run);
        assert!(moved.starts_with(run), "{moved:?}");
        assert_eq!(moved.file_name().unwrap().len(), 16);
        assert_ne!(
            moved,
            runtime_dir(Path::new("/root/other"), true, false, run),
            "each data dir its own"
        );
        assert_eq!(moved, runtime_dir(data, true, false, run), "stable");
    }

    #[test]
    fn down_deletes_only_the_moved_runtime_dir_of_its_own_data_dir() {
        let data = Path::new("/root/mesh");
        let run = Path::new("/run/citadel-mesh");
        let moved = runtime_dir(data, true, false, run);
        assert!(is_moved_runtime_dir(data, &moved, run));
        assert!(!is_moved_runtime_dir(data, Path::new("/etc"), run));
        assert!(!is_moved_runtime_dir(data, run, run));
        assert!(!is_moved_runtime_dir(Path::new("/root/other"), &moved, run));
    }

    #[test]
    fn a_directory_without_search_for_others_is_named() {
        let ok = vec![(PathBuf::from("/"), 0o755), (PathBuf::from("/tmp"), 0o1777)];
        assert_eq!(others_can_traverse(&ok), Ok(()));
        let locked = vec![(PathBuf::from("/"), 0o755), (PathBuf::from("/root"), 0o700)];
        assert_eq!(others_can_traverse(&locked), Err(PathBuf::from("/root")));
        assert_eq!(
            others_can_traverse(&[(PathBuf::from("/srv"), 0o710)]),
            Err(PathBuf::from("/srv")),
            "group search is not enough"
        );
    }
}
