//! Who is on the other end of the socket.
//!
//! The kernel tells us the caller's pid, uid and gid (`SO_PEERCRED`, read
//! when the connection is accepted). A [`WorkloadAttestor`] turns those
//! facts into an identity. Because a pid can be reused once its process
//! exits, the process start time is read at accept time and checked again
//! after attestation: if it changed, the caller is gone and whatever now has
//! that pid is not who connected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use citadel_identity::SpiffeId;
use tokio::sync::watch;

use crate::entries::{CallerFacts, WorkloadEntries};

/// The peer of one accepted connection, as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// Accept order of the connection on this agent (from 1).
    pub connection_id: u64,
    /// The peer's process id, when the kernel gave one.
    pub pid: Option<i32>,
    /// Effective uid at connect time.
    pub uid: u32,
    /// Effective gid at connect time.
    pub gid: u32,
    /// The process start time (clock ticks since boot) read at accept time.
    pub start_time: Option<u64>,
}

/// A workload's identity and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The SPIFFE ID it is entitled to.
    pub spiffe_id: SpiffeId,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// Why a caller has no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// No entry matches the caller.
    #[error("no workload entry matches the caller (uid {uid}, gid {gid})")]
    NoMatch {
        /// Caller uid.
        uid: u32,
        /// Caller gid.
        gid: u32,
    },
    /// The kernel gave no peer credentials (not a Unix socket caller).
    #[error("the caller's peer credentials are unknown")]
    NoCredentials,
    /// The process that connected has exited or its pid now names another
    /// process.
    #[error("the calling process (pid {pid}) exited or its pid was reused")]
    ProcessGone {
        /// The pid the connection reported.
        pid: i32,
    },
    /// Kubernetes: the caller's cgroup names no container (a host process).
    #[error("the calling process (pid {pid}) is not in a container")]
    NotInAPod {
        /// The caller's pid.
        pid: i32,
    },
    /// Kubernetes: no pod on this node vouches for the caller's container
    /// (none found in time, or the one found does not list it).
    #[error("no pod on this node vouches for the caller (pid {pid}): {reason}")]
    NoPod {
        /// The caller's pid.
        pid: i32,
        /// What was looked for and not found.
        reason: String,
    },
}

/// Turns a connection's peer into a workload identity. One implementation
/// per platform (entries file here, Kubernetes pods later), with a fake in
/// tests.
#[async_trait]
pub trait WorkloadAttestor: Send + Sync + 'static {
    /// The caller's workload, or why it has none.
    async fn attest(&self, peer: &PeerInfo) -> Result<Workload, AttestError>;
}

/// Attests callers against the entries file of the moment.
#[derive(Clone)]
pub struct EntriesAttestor {
    entries: watch::Receiver<Arc<WorkloadEntries>>,
    proc_root: PathBuf,
}

impl EntriesAttestor {
    /// An attestor reading the entries published on `entries` and process
    /// facts from `/proc`.
    pub fn new(entries: watch::Receiver<Arc<WorkloadEntries>>) -> Self {
        Self {
            entries,
            proc_root: PathBuf::from("/proc"),
        }
    }
}

#[async_trait]
impl WorkloadAttestor for EntriesAttestor {
    async fn attest(&self, peer: &PeerInfo) -> Result<Workload, AttestError> {
        let entries = self.entries.borrow().clone();
        let exe = match (entries.needs_exe(), peer.pid) {
            (true, Some(pid)) => {
                std::fs::read_link(self.proc_root.join(pid.to_string()).join("exe")).ok()
            }
            _ => None,
        };
        let facts = CallerFacts {
            uid: peer.uid,
            gid: peer.gid,
            exe,
        };
        let found = entries.lookup(&facts).ok_or(AttestError::NoMatch {
            uid: peer.uid,
            gid: peer.gid,
        })?;
        // The executable path (if read) must belong to the process that
        // connected, not to a later holder of its pid; with no start time
        // from accept time that cannot be shown, so a path match is refused.
        if found.path.is_some() && peer.start_time.is_none() {
            return Err(AttestError::ProcessGone {
                pid: peer.pid.unwrap_or(0),
            });
        }
        check_same_process(&self.proc_root, peer)?;
        Ok(Workload {
            spiffe_id: found.spiffe_id.clone(),
            labels: found.labels.clone(),
        })
    }
}

/// The start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot)
/// of process `pid`, `None` if it cannot be read.
pub fn process_start_time(proc_root: &Path, pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    parse_start_time(&stat)
}

/// Extracts the start time from the text of `/proc/<pid>/stat`. The command
/// name (field 2) is in parentheses and may itself hold spaces and
/// parentheses, so fields are counted after its last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the comm come field 3 (state) onwards; start time is field 22.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

pub(crate) fn check_same_process(proc_root: &Path, peer: &PeerInfo) -> Result<(), AttestError> {
    let Some(pid) = peer.pid else {
        return Ok(());
    };
    match (peer.start_time, process_start_time(proc_root, pid)) {
        (Some(then), Some(now)) if then == now => Ok(()),
        // Unknown at accept time: nothing to compare, the uid/gid came
        // from the kernel at connect time and stand on their own.
        (None, _) => Ok(()),
        _ => Err(AttestError::ProcessGone { pid }),
    }
}

/// Reads the entries file at `path`, then re-reads it every `poll` and
/// publishes each valid change. An invalid file at start is an error; an
/// invalid edit later is logged and the last good entries stay in force.
pub async fn watch_entries_file(
    path: PathBuf,
    poll: Duration,
    on_reload_error: impl Fn() + Send + 'static,
) -> anyhow::Result<watch::Receiver<Arc<WorkloadEntries>>> {
    use anyhow::Context as _;
    let text = tokio::fs::read_to_string(&path)
        .await
        .with_context(|| format!("reading entries file {}", path.display()))?;
    let first = WorkloadEntries::parse(&text)
        .with_context(|| format!("entries file {}", path.display()))?;
    tracing::info!(path = %path.display(), entries = first.entries().len(), "loaded workload entries");
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut last_text = text;
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if tx.is_closed() {
                return;
            }
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(t) => t,
                Err(e) => {
                    if last_text != "\0unreadable" {
                        tracing::error!(path = %path.display(), error = %e, "cannot read entries file; keeping the last good entries");
                        on_reload_error();
                        last_text = "\0unreadable".to_owned();
                    }
                    continue;
                }
            };
            if text == last_text {
                continue;
            }
            match WorkloadEntries::parse(&text) {
                Ok(entries) => {
                    tracing::info!(path = %path.display(), entries = entries.entries().len(), "reloaded workload entries");
                    tx.send_replace(Arc::new(entries));
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "entries file is invalid; keeping the last good entries");
                    on_reload_error();
                }
            }
            last_text = text;
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22() {
        let stat = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987_654));
    }

    #[test]
    fn truncated_stat_has_no_start_time() {
        assert_eq!(parse_start_time("1 (init) S 0 1"), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn own_process_has_a_start_time() {
        let pid = std::process::id() as i32;
        assert!(process_start_time(Path::new("/proc"), pid).is_some());
    }

    fn attestor(yaml: &str) -> EntriesAttestor {
        let (_tx, rx) = watch::channel(Arc::new(WorkloadEntries::parse(yaml).unwrap()));
        EntriesAttestor::new(rx)
    }

    fn me() -> PeerInfo {
        let pid = std::process::id() as i32;
        PeerInfo {
            connection_id: 1,
            pid: Some(pid),
            uid: 1000,
            gid: 1000,
            start_time: process_start_time(Path::new("/proc"), pid),
        }
    }

    #[tokio::test]
    async fn attests_by_uid() {
        let a = attestor("entries:\n  - spiffe_id: spiffe://td/ns/a/sa/b\n    uid: 1000\n");
        let w = a.attest(&me()).await.unwrap();
        assert_eq!(w.spiffe_id.as_str(), "spiffe://td/ns/a/sa/b");
    }

    #[tokio::test]
    async fn attests_by_executable_path() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let yaml = format!(
            "entries:\n  - spiffe_id: spiffe://td/ns/a/sa/exe\n    uid: 1000\n    path: {}\n",
            exe.display()
        );
        let w = attestor(&yaml).attest(&me()).await.unwrap();
        assert_eq!(w.spiffe_id.as_str(), "spiffe://td/ns/a/sa/exe");
    }

    #[tokio::test]
    async fn caller_without_entry_is_refused() {
        let a = attestor("entries:\n  - spiffe_id: spiffe://td/ns/a/sa/b\n    uid: 7\n");
        assert_eq!(
            a.attest(&me()).await.unwrap_err(),
            AttestError::NoMatch {
                uid: 1000,
                gid: 1000
            }
        );
    }

    #[tokio::test]
    async fn rejects_reused_pid() {
        let a = attestor("entries:\n  - spiffe_id: spiffe://td/ns/a/sa/b\n    uid: 1000\n");
        let mut peer = me();
        peer.start_time = peer.start_time.map(|t| t + 1);
        assert!(matches!(
            a.attest(&peer).await.unwrap_err(),
            AttestError::ProcessGone { .. }
        ));
    }

    #[tokio::test]
    async fn rejects_exited_process() {
        let a = attestor("entries:\n  - spiffe_id: spiffe://td/ns/a/sa/b\n    uid: 1000\n");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let start = process_start_time(Path::new("/proc"), pid);
        child.wait().unwrap();
        let peer = PeerInfo {
            pid: Some(pid),
            start_time: start.or(Some(1)),
            ..me()
        };
        assert!(matches!(
            a.attest(&peer).await.unwrap_err(),
            AttestError::ProcessGone { .. }
        ));
    }

    #[tokio::test]
    async fn entries_file_reloads_and_keeps_last_good_on_bad_edit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entries.yaml");
        std::fs::write(
            &path,
            "entries:\n  - spiffe_id: spiffe://td/a\n    uid: 1\n",
        )
        .unwrap();
        let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let e2 = errors.clone();
        let mut rx = watch_entries_file(path.clone(), Duration::from_millis(20), move || {
            e2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
        .await
        .unwrap();
        std::fs::write(
            &path,
            "entries:\n  - spiffe_id: spiffe://td/b\n    uid: 1\n",
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().entries()[0].spiffe_id.as_str(), "spiffe://td/b");
        std::fs::write(&path, "entries: [oops").unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while errors.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(rx.borrow().entries()[0].spiffe_id.as_str(), "spiffe://td/b");
    }

    #[tokio::test]
    async fn invalid_entries_file_at_start_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entries.yaml");
        std::fs::write(&path, "entries:\n  - spiffe_id: nope\n    uid: 1\n").unwrap();
        let err = watch_entries_file(path, Duration::from_secs(1), || {})
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("spiffe_id"), "{err:#}");
    }
}
