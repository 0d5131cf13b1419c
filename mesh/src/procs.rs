//! Starting the mesh's processes in the background and stopping them again,
//! only ever the ones `up` recorded: a pid is signalled only while its start
//! time and executable are still those recorded (a pid reused by another
//! process after ours exited is left alone).

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::plan::ProcessSpec;
use crate::state::Recorded;

/// What `/proc/<pid>` says about a process now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The state letter (`R`, `S`, `Z`, …).
    pub state: char,
    /// Start time in clock ticks after boot.
    pub start_time: u64,
    /// `argv[0]`, when readable.
    pub argv0: Option<PathBuf>,
}

/// A recorded process, judged against what runs under its pid now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Our process, still running.
    Ours,
    /// It has exited (no such pid, or a zombie waiting to be reaped).
    Gone,
    /// The pid now belongs to another process: never signal it.
    Reused,
}

/// Decides whether `observed` (what runs under the recorded pid now, if
/// anything) is the process `up` started.
pub fn judge(recorded: &Recorded, observed: Option<&Observed>) -> Liveness {
    let Some(o) = observed else {
        return Liveness::Gone;
    };
    if o.start_time != recorded.start_time {
        return Liveness::Reused;
    }
    if o.state == 'Z' || o.state == 'X' {
        return Liveness::Gone;
    }
    // The start time already pins the process; a different executable means
    // something we did not start (exec'd over it), so keep away from it too.
    match &o.argv0 {
        Some(argv0) if argv0 != &recorded.program => Liveness::Reused,
        _ => Liveness::Ours,
    }
}

/// Parses `/proc/<pid>/stat`: (state, start time). The command name may hold
/// spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat(text: &str) -> Option<(char, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4..=22 of stat(5): after the state come 18 more before starttime.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

/// What runs under `pid` now, if anything.
pub fn observe(pid: u32) -> Option<Observed> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (state, start_time) = parse_stat(&stat)?;
    let argv0 = std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|c| {
            use std::os::unix::ffi::OsStrExt;
            let first = c.split(|b| *b == 0).next()?;
            (!first.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(first)))
        });
    Some(Observed {
        state,
        start_time,
        argv0,
    })
}

/// Whether the recorded process is still ours and running.
pub fn liveness(recorded: &Recorded) -> Liveness {
    judge(recorded, observe(recorded.pid).as_ref())
}

/// Sends `signal` to `pid`.
#[allow(unsafe_code)]
pub fn send_signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "pid out of range"))?;
    if pid <= 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "refusing to signal a process group",
        ));
    }
    // SAFETY: kill(2) takes two integers and touches no memory of ours; a
    // positive pid names exactly one process.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Opens (appending) a log file, 0600.
pub fn open_log(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Starts `spec` in the background: its own process group (a Ctrl-C in the
/// terminal that ran `up` does not reach it), stdin from /dev/null, stdout and
/// stderr appended to `log`, working directory `/` (a service uid may not be
/// able to enter the caller's), `env` added.
pub fn spawn(spec: &ProcessSpec, log: &Path, env: &[(&str, &str)]) -> std::io::Result<Child> {
    let out = open_log(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir("/")
        .env_remove("CITADEL_JOIN_TOKEN")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    if let Some(uid) = spec.uid {
        // std drops the supplementary groups too when root switches uid.
        cmd.uid(uid).gid(uid);
    }
    cmd.spawn()
}

/// The record of a process just spawned from `spec`.
pub fn record(spec: &ProcessSpec, child: &Child) -> Recorded {
    let pid = child.id();
    Recorded {
        name: spec.name.clone(),
        pid,
        start_time: observe(pid).map_or(0, |o| o.start_time),
        program: spec.program.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Recorded {
        Recorded {
            name: "ca".into(),
            pid: 4242,
            start_time: 1000,
            program: PathBuf::from("/x/citadel"),
        }
    }

    fn obs(state: char, start_time: u64, argv0: &str) -> Observed {
        Observed {
            state,
            start_time,
            argv0: Some(PathBuf::from(argv0)),
        }
    }

    #[test]
    fn rejects_signalling_a_reused_pid() {
        assert_eq!(
            judge(&rec(), Some(&obs('S', 1001, "/x/citadel"))),
            Liveness::Reused,
            "another start time: another process"
        );
        assert_eq!(
            judge(&rec(), Some(&obs('S', 1000, "/usr/bin/vim"))),
            Liveness::Reused,
            "another executable"
        );
        assert_eq!(
            judge(&rec(), Some(&obs('S', 1000, "/x/citadel"))),
            Liveness::Ours
        );
        assert_eq!(judge(&rec(), None), Liveness::Gone);
        assert_eq!(
            judge(&rec(), Some(&obs('Z', 1000, ""))),
            Liveness::Gone,
            "a zombie has exited"
        );
    }

    #[test]
    fn parses_stat_with_a_hostile_command_name() {
        let stat = "123 (a) b) R 1 123 123 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 98765 1000 200";
        assert_eq!(parse_stat(stat), Some(('R', 98765)));
        assert_eq!(parse_stat("garbage"), None);
        let me = observe(std::process::id()).unwrap();
        assert!(me.start_time > 0);
        assert_eq!(
            judge(
                &Recorded {
                    name: "me".into(),
                    pid: std::process::id(),
                    start_time: me.start_time,
                    program: me.argv0.clone().unwrap(),
                },
                Some(&me)
            ),
            Liveness::Ours
        );
    }

    #[test]
    fn refuses_to_signal_a_process_group() {
        assert!(send_signal(0, 0).is_err());
        assert!(send_signal(u32::MAX, 0).is_err());
        assert!(send_signal(std::process::id(), 0).is_ok());
    }
}
