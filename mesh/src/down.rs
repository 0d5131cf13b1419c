//! `citadel-mesh down`: stops the processes the last `up` recorded, newest
//! first, each only while it is still the process that was started; leaves
//! the data directory as it is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::MeshError;
use crate::layout;
use crate::procs::{self, Liveness};
use crate::state::{Recorded, State};

/// What happened to one recorded process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped by SIGTERM.
    Stopped,
    /// Did not stop within the grace period: SIGKILL.
    Killed,
    /// It had already exited.
    AlreadyGone,
    /// Its pid belongs to another process now: left alone.
    PidReused,
    /// Signalling it failed.
    Failed(String),
}

/// What `down` did.
#[derive(Clone, Debug, Default)]
pub struct StopReport {
    /// Each recorded process (newest first) and what happened to it.
    pub processes: Vec<(Recorded, Outcome)>,
    /// The data directory (left in place).
    pub data_dir: PathBuf,
    /// Whether there was any record of an `up` at all.
    pub found_state: bool,
    /// The runtime directory outside the data directory that was removed.
    pub removed_runtime_dir: Option<PathBuf>,
}

/// How long a process has between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(10);

/// Stops what the last `up` in `data_dir` started.
pub async fn stop(data_dir: &Path) -> Result<StopReport, MeshError> {
    let data_dir = crate::up::absolute(data_dir)?;
    let state_path = data_dir.join("mesh.json");
    let Some(mut state) = State::load(&state_path)? else {
        return Ok(StopReport {
            data_dir,
            ..StopReport::default()
        });
    };
    let processes = stop_recorded(&state.processes).await;
    // Keep the records of processes that could not be stopped, so a second
    // `down` tries them again.
    state.processes = processes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
        .map(|(r, _)| r.clone())
        .collect();
    state.save(&state_path)?;
    // A runtime directory moved out of the data directory (binaries and the
    // socket, nothing to inspect) goes once nothing runs from it.
    let mut removed_runtime_dir = None;
    if state.processes.is_empty()
        && let Some(runtime) = &state.runtime_dir
        && let Ok(canonical) = data_dir.canonicalize()
        && layout::is_moved_runtime_dir(&canonical, runtime, &layout::run_base())
        && std::fs::remove_dir_all(runtime).is_ok()
    {
        removed_runtime_dir = Some(runtime.clone());
    }
    Ok(StopReport {
        removed_runtime_dir,
        processes,
        data_dir,
        found_state: true,
    })
}

/// Stops `recorded`, newest first (the proxies before the agent before the CA).
pub async fn stop_recorded(recorded: &[Recorded]) -> Vec<(Recorded, Outcome)> {
    let mut out = Vec::new();
    for r in recorded.iter().rev() {
        out.push((r.clone(), stop_one(r).await));
    }
    out
}

async fn stop_one(r: &Recorded) -> Outcome {
    match procs::liveness(r) {
        Liveness::Gone => return Outcome::AlreadyGone,
        Liveness::Reused => return Outcome::PidReused,
        Liveness::Ours => {}
    }
    if let Err(e) = procs::send_signal(r.pid, libc::SIGTERM) {
        return Outcome::Failed(format!("SIGTERM: {e}"));
    }
    if wait_gone(r, GRACE).await {
        return Outcome::Stopped;
    }
    // Judge again right before the SIGKILL: still ours?
    if procs::liveness(r) != Liveness::Ours {
        return Outcome::Stopped;
    }
    if let Err(e) = procs::send_signal(r.pid, libc::SIGKILL) {
        return Outcome::Failed(format!("SIGKILL: {e}"));
    }
    if wait_gone(r, Duration::from_secs(5)).await {
        Outcome::Killed
    } else {
        Outcome::Failed("still running after SIGKILL".into())
    }
}

async fn wait_gone(r: &Recorded, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if procs::liveness(r) != Liveness::Ours {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stops_a_recorded_process_and_leaves_a_reused_pid_alone() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let observed = procs::observe(pid).unwrap();
        let ours = Recorded {
            name: "sleep".into(),
            pid,
            start_time: observed.start_time,
            program: PathBuf::from("sleep"),
        };
        // The same pid with another start time is someone else's.
        let stranger = Recorded {
            start_time: observed.start_time + 1,
            ..ours.clone()
        };
        assert_eq!(stop_one(&stranger).await, Outcome::PidReused);
        assert_eq!(procs::liveness(&ours), Liveness::Ours, "left alone");
        assert_eq!(stop_one(&ours).await, Outcome::Stopped);
        assert_eq!(stop_one(&ours).await, Outcome::AlreadyGone);
        drop(child);
    }
}
