//! `citadel-mesh up`: prepares the data directory, then starts the CA, the
//! node agent and the two services with their proxies as background
//! processes, recording each pid as it starts, and waits until all are ready.
//! Anything that fails stops what was already started.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::down::stop_recorded;
use crate::error::{MeshError, io};
use crate::layout::{self, Layout};
use crate::plan::{self, Attestation, Commands, Ports, ProcessSpec, Ready, Service};
use crate::procs::{self, Liveness};
use crate::state::State;

/// What `up` needs.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// The data directory `up` owns (created if missing).
    pub data_dir: PathBuf,
    /// Where `citadel`, `citadel-agent` and `citadel-proxy` are.
    pub bin_dir: PathBuf,
    /// This executable (the services run copies of it as their application).
    pub self_exe: PathBuf,
    /// How long each process may take to become ready.
    pub ready_timeout: Duration,
}

impl MeshConfig {
    /// `data_dir` (made absolute against the working directory), binaries
    /// next to this executable, 60 s to become ready.
    pub fn new(data_dir: &Path) -> Result<MeshConfig, MeshError> {
        let self_exe = std::env::current_exe().map_err(io("finding this executable"))?;
        let bin_dir = self_exe.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(MeshConfig {
            data_dir: absolute(data_dir)?,
            bin_dir,
            self_exe,
            ready_timeout: Duration::from_secs(60),
        })
    }
}

/// `p` made absolute against the working directory.
pub fn absolute(p: &Path) -> Result<PathBuf, MeshError> {
    std::path::absolute(p).map_err(io(format!("resolving {}", p.display())))
}

/// One process `up` started.
#[derive(Clone, Debug)]
pub struct Started {
    /// The spec it was started from.
    pub spec: ProcessSpec,
    /// Its pid.
    pub pid: u32,
    /// Its log.
    pub log: PathBuf,
}

/// How the node agent got its identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Join {
    /// A fresh token from `citadel token create`.
    FreshToken,
    /// Its saved node identity, no token spent.
    SavedIdentity,
    /// Its saved identity was refused (exit 2), so it joined with a fresh token.
    RejoinedWithFreshToken,
}

/// A running mesh: what `up` started and the commands to try it.
#[derive(Clone, Debug)]
pub struct Mesh {
    /// The directories.
    pub layout: Layout,
    /// The ports.
    pub ports: Ports,
    /// How the agent tells the services apart.
    pub attestation: Attestation,
    /// The processes, in start order.
    pub processes: Vec<Started>,
    /// The commands to paste.
    pub commands: Commands,
    /// How the agent joined.
    pub join: Join,
    /// Why the runtime directory is outside the data directory, if it is.
    pub runtime_note: Option<String>,
}

/// Starts the mesh. `progress` gets one line per step.
pub async fn start(config: &MeshConfig, progress: &mut dyn FnMut(&str)) -> Result<Mesh, MeshError> {
    for name in ["citadel", "citadel-agent", "citadel-proxy"] {
        let path = config.bin_dir.join(name);
        if !path.is_file() {
            return Err(MeshError::MissingBinary { path });
        }
    }
    let data_dir = absolute(&config.data_dir)?;
    let state_path = data_dir.join("mesh.json");
    claim_data_dir(&data_dir)?;
    let previous = State::load(&state_path)?;
    if let Some(prev) = &previous {
        for r in &prev.processes {
            if procs::liveness(r) == Liveness::Ours {
                return Err(MeshError::AlreadyUp {
                    dir: data_dir,
                    name: r.name.clone(),
                    pid: r.pid,
                });
            }
        }
    }

    let euid = std::fs::metadata("/proc/self")
        .map_err(io("reading /proc/self"))?
        .uid();
    let attestation = Attestation::choose(euid, uid_taken);
    set_mode(
        &data_dir,
        if attestation.uses_other_uids() {
            0o711
        } else {
            0o700
        },
    )?;
    let data_dir = data_dir
        .canonicalize()
        .map_err(io(format!("resolving {}", data_dir.display())))?;
    let (runtime_dir, runtime_note) = prepare_runtime_dir(&data_dir, &attestation)?;
    let layout = Layout {
        data_dir,
        runtime_dir,
    };
    prepare_files(&layout, &attestation, config)?;

    let ports = plan::choose_ports(
        previous.as_ref().and_then(|s| s.ports),
        port_is_free,
        fresh_port,
    );
    let state = State {
        ports: Some(ports),
        attestation: Some(attestation),
        runtime_dir: Some(layout.runtime_dir.clone()),
        processes: Vec::new(),
    };
    state.save(&layout.state_file())?;

    let mut run = Runner {
        layout: &layout,
        state,
        started: Vec::new(),
        children: Vec::new(),
        timeout: config.ready_timeout,
    };
    match run.start_all(config, &ports, &attestation, progress).await {
        Ok(join) => {
            let commands = plan::commands(
                &layout,
                &ports,
                &config.bin_dir.join("citadel"),
                &config.self_exe,
            );
            Ok(Mesh {
                layout: layout.clone(),
                ports,
                attestation,
                processes: run.started,
                commands,
                join,
                runtime_note,
            })
        }
        Err(e) => {
            progress("start-up failed; stopping what was started");
            let _ = stop_recorded(&run.state.processes).await;
            run.state.processes.clear();
            let _ = run.state.save(&layout.state_file());
            Err(e)
        }
    }
}

/// Creates the data directory, or checks that an existing one is ours.
fn claim_data_dir(dir: &Path) -> Result<(), MeshError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() && !dir.join("mesh.json").exists() {
                return Err(MeshError::NotOurs {
                    dir: dir.to_path_buf(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            // Marks the directory as ours before anything else goes in.
            State::default().save(&dir.join("mesh.json"))?;
            Ok(())
        }
        Err(e) => Err(MeshError::Io {
            what: format!("reading {}", dir.display()),
            source: e,
        }),
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), MeshError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("setting the mode of {}", path.display())))
}

fn mkdir(path: &Path, mode: u32) -> Result<(), MeshError> {
    std::fs::create_dir_all(path).map_err(io(format!("creating {}", path.display())))?;
    set_mode(path, mode)
}

/// Whether an account or group already uses `uid` (then the services do not
/// borrow it).
fn uid_taken(uid: u32) -> bool {
    ["/etc/passwd", "/etc/group"].iter().any(|file| {
        std::fs::read_to_string(file).is_ok_and(|text| {
            text.lines()
                .any(|l| l.split(':').nth(2) == Some(uid.to_string().as_str()))
        })
    })
}

/// Decides and creates the runtime directory; a note when it is outside the
/// data directory.
fn prepare_runtime_dir(
    data_dir: &Path,
    attestation: &Attestation,
) -> Result<(PathBuf, Option<String>), MeshError> {
    let ancestors: Vec<(PathBuf, u32)> = data_dir
        .ancestors()
        .skip(1)
        .filter_map(|p| Some((p.to_path_buf(), std::fs::metadata(p).ok()?.mode())))
        .collect();
    let blocked = layout::others_can_traverse(&ancestors).err();
    let run_base = layout::run_base();
    let services_need_access = attestation.uses_other_uids();
    let dir = layout::runtime_dir(data_dir, services_need_access, blocked.is_none(), &run_base);
    if dir.starts_with(data_dir) {
        mkdir(&dir, if services_need_access { 0o755 } else { 0o700 })?;
        return Ok((dir, None));
    }
    ensure_root_dir(&run_base)?;
    ensure_root_dir(&dir)?;
    let note = format!(
        "{} cannot be entered by other users ({} lets them no further), so the agent socket and \
         the executables the services run as their own uids are in {}",
        data_dir.display(),
        blocked.unwrap_or_default().display(),
        dir.display()
    );
    Ok((dir, Some(note)))
}

/// Creates `dir` (0755) or accepts an existing one only if it is a real
/// directory owned by us that nobody else can write: it holds the agent
/// socket and executables run under other uids, so it must not be someone
/// else's (a shared temporary directory could hold a planted one).
fn ensure_root_dir(dir: &Path) -> Result<(), MeshError> {
    match std::fs::create_dir(dir) {
        Ok(()) => return set_mode(dir, 0o755),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(MeshError::Io {
                what: format!("creating {}", dir.display()),
                source: e,
            });
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io(format!("reading {}", dir.display())))?;
    let me = std::fs::metadata("/proc/self")
        .map_err(io("reading /proc/self"))?
        .uid();
    let reason = if !meta.file_type().is_dir() {
        Some("exists and is not a directory (or is a symbolic link)".to_owned())
    } else if meta.uid() != me {
        Some(format!("is owned by uid {}, not by us", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(MeshError::UnsafeDir {
            path: dir.to_path_buf(),
            reason: format!("{reason}; refusing to put the agent socket there"),
        }),
        None => Ok(()),
    }
}

/// Writes the sample policies (only those missing: the user's edits stay),
/// the agent's entries, the log directory, and each service's executables.
fn prepare_files(
    layout: &Layout,
    attestation: &Attestation,
    config: &MeshConfig,
) -> Result<(), MeshError> {
    mkdir(&layout.logs_dir(), 0o700)?;
    mkdir(&layout.policies_dir(), 0o700)?;
    for (path, text) in [
        (
            layout.peer_authentication_file(),
            plan::peer_authentication_yaml(),
        ),
        (layout.authorization_file(), plan::authorization_yaml()),
    ] {
        if !path.exists() {
            std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
        }
    }
    mkdir(&layout.agent_dir(), 0o700)?;
    let entries = layout.entries_file();
    std::fs::write(&entries, plan::entries_yaml(attestation, layout))
        .map_err(io(format!("writing {}", entries.display())))?;
    let bin_mode = if attestation.uses_other_uids() {
        0o755
    } else {
        0o700
    };
    mkdir(&layout.runtime_dir.join("bin"), bin_mode)?;
    for service in Service::ALL {
        mkdir(&layout.service_bin_dir(service), bin_mode)?;
        install(
            &config.bin_dir.join("citadel-proxy"),
            &layout.service_proxy(service),
        )?;
        install(&config.self_exe, &layout.service_app(service))?;
    }
    Ok(())
}

/// Puts `src` at `dst`: a hard link when both are on one file system, else a
/// copy. Either way `dst` is a path of its own, which is what the agent's
/// executable-path selector sees (`/proc/<pid>/exe` names the path used).
fn install(src: &Path, dst: &Path) -> Result<(), MeshError> {
    // `up` run from one of these very copies: removing it would lose the source.
    if let (Ok(a), Ok(b)) = (src.canonicalize(), dst.canonicalize())
        && a == b
    {
        return Ok(());
    }
    match std::fs::remove_file(dst) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(MeshError::Io {
                what: format!("replacing {}", dst.display()),
                source: e,
            });
        }
    }
    if std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst).map_err(io(format!(
        "copying {} to {}",
        src.display(),
        dst.display()
    )))?;
    set_mode(dst, 0o755)
}

/// Whether `port` can be bound on loopback and on every address (the
/// proxies' inbound listeners bind 0.0.0.0).
fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// A free port not in `taken`.
fn fresh_port(taken: &[u16]) -> u16 {
    for _ in 0..100 {
        let port = std::net::TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .map_or(0, |a| a.port());
        if port != 0 && !taken.contains(&port) && port_is_free(port) {
            return port;
        }
    }
    0
}

/// Starts processes and records each one the moment it exists.
struct Runner<'a> {
    layout: &'a Layout,
    state: State,
    started: Vec<Started>,
    children: Vec<Child>,
    timeout: Duration,
}

impl Runner<'_> {
    async fn start_all(
        &mut self,
        config: &MeshConfig,
        ports: &Ports,
        attestation: &Attestation,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Join, MeshError> {
        let ca = plan::ca_spec(self.layout, ports, &config.bin_dir);
        progress("starting the CA (SQLite, self-signed root, sample policies)");
        let i = self.spawn(&ca, &[])?;
        self.wait_ready(i).await?;

        let agent = plan::agent_spec(self.layout, ports, &config.bin_dir);
        let join = if self.layout.node_identity_file().exists() {
            progress("starting the node agent with its saved node identity");
            let i = self.spawn(&agent, &[])?;
            match self.wait_ready(i).await {
                Ok(()) => Join::SavedIdentity,
                // Exit 2: the saved identity is unusable and it needs a token.
                Err(MeshError::Exited { code: Some(2), .. }) => {
                    progress("the saved node identity was refused; joining with a fresh token");
                    self.forget_last();
                    let token = create_token(config, self.layout)?;
                    let i = self.spawn(&agent, &[("CITADEL_JOIN_TOKEN", &token)])?;
                    self.wait_ready(i).await?;
                    Join::RejoinedWithFreshToken
                }
                Err(e) => return Err(e),
            }
        } else {
            progress("creating a join token and starting the node agent");
            let token = create_token(config, self.layout)?;
            let i = self.spawn(&agent, &[("CITADEL_JOIN_TOKEN", &token)])?;
            self.wait_ready(i).await?;
            Join::FreshToken
        };

        progress("starting backend and frontend, each behind its own citadel-proxy");
        let mut waiting = Vec::new();
        for service in Service::ALL {
            for spec in [
                plan::app_spec(service, self.layout, ports, attestation),
                plan::proxy_spec(service, self.layout, ports, attestation),
            ] {
                waiting.push(self.spawn(&spec, &[])?);
            }
        }
        progress("waiting for the proxies to hold their certificates and policies");
        for i in waiting {
            self.wait_ready(i).await?;
        }
        Ok(join)
    }

    /// Spawns and records `spec`; the index of its entry.
    fn spawn(&mut self, spec: &ProcessSpec, env: &[(&str, &str)]) -> Result<usize, MeshError> {
        let log = self.layout.log(&spec.name);
        {
            use std::io::Write;
            let mut f = procs::open_log(&log).map_err(io(format!("opening {}", log.display())))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            writeln!(
                f,
                "==== citadel-mesh up: starting {} (unix time {now}) ====",
                spec.name
            )
            .map_err(io(format!("writing {}", log.display())))?;
        }
        let child = procs::spawn(spec, &log, env).map_err(io(format!(
            "starting {} ({})",
            spec.name,
            spec.program.display()
        )))?;
        self.state.processes.push(procs::record(spec, &child));
        self.state.save(&self.layout.state_file())?;
        self.started.push(Started {
            spec: spec.clone(),
            pid: child.id(),
            log,
        });
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    /// Drops the last process from the records (it has exited).
    fn forget_last(&mut self) {
        self.state.processes.pop();
        self.started.pop();
        self.children.pop();
    }

    async fn wait_ready(&mut self, i: usize) -> Result<(), MeshError> {
        let deadline = Instant::now() + self.timeout;
        let (spec, log) = match self.started.get(i) {
            Some(s) => (s.spec.clone(), s.log.clone()),
            None => return Ok(()),
        };
        loop {
            if let Some(child) = self.children.get_mut(i)
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(MeshError::Exited {
                    name: spec.name.clone(),
                    status: status.to_string(),
                    code: status.code(),
                    tail: tail(&log),
                    log,
                });
            }
            let ready = match &spec.ready {
                Ready::Http(addr, path) => matches!(http_status(*addr, path).await, Some(200)),
                Ready::Tcp(addr) => tokio::net::TcpStream::connect(addr).await.is_ok(),
            };
            // The agent is ready once its socket is there, too.
            if ready && (spec.name != "agent" || self.layout.socket().exists()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(MeshError::NotReady {
                    name: spec.name.clone(),
                    secs: self.timeout.as_secs(),
                    tail: tail(&log),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `citadel token create` for the node, allowing both services' identities;
/// the token (held in memory and passed to the agent's environment only).
fn create_token(config: &MeshConfig, layout: &Layout) -> Result<String, MeshError> {
    let out = Command::new(config.bin_dir.join("citadel"))
        .arg("token")
        .arg("create")
        .arg("--data-dir")
        .arg(layout.ca_dir())
        .arg("--node")
        .arg(plan::NODE_NAME)
        .arg("--allow")
        .arg(Service::Frontend.spiffe_id())
        .arg("--allow")
        .arg(Service::Backend.spiffe_id())
        .arg("--ttl")
        .arg("10m")
        .output()
        .map_err(io("running citadel token create"))?;
    if !out.status.success() {
        return Err(MeshError::Token(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    let token = String::from_utf8(out.stdout)
        .map_err(|_| MeshError::Token("the token is not UTF-8".into()))?
        .trim()
        .to_owned();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(MeshError::Token("it printed no single token".into()));
    }
    Ok(token)
}

/// The last 20 lines of a log.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// `GET path` over HTTP/1.0: the status, if one came within 2 s.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        String::from_utf8_lossy(&buf)
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(2), get)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_a_runtime_dir_that_is_not_a_private_directory_of_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("fresh");
        ensure_root_dir(&fresh).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o755);
        ensure_root_dir(&fresh).expect("ours, reused");

        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            ensure_root_dir(&open),
            Err(MeshError::UnsafeDir { .. })
        ));

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(matches!(
            ensure_root_dir(&link),
            Err(MeshError::UnsafeDir { .. })
        ));

        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            ensure_root_dir(&file),
            Err(MeshError::UnsafeDir { .. })
        ));

        // Someone else's directory (needs root to make one).
        if std::fs::metadata("/proc/self").unwrap().uid() == 0 {
            let theirs = tmp.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
            assert!(matches!(
                ensure_root_dir(&theirs),
                Err(MeshError::UnsafeDir { .. })
            ));
        }
    }

    #[test]
    fn install_gives_each_copy_a_path_of_its_own_and_never_deletes_its_source() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("citadel-proxy");
        std::fs::write(&src, "binary").unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dst = tmp.path().join("copy");
        install(&src, &dst).unwrap();
        install(&src, &dst).expect("replaces an earlier copy");
        assert_eq!(std::fs::read_to_string(&dst).unwrap(), "binary");
        install(&src, &src).expect("run from the copy itself");
        assert_eq!(std::fs::read_to_string(&src).unwrap(), "binary");
    }

    #[test]
    fn rejects_a_non_empty_data_dir_without_mesh_json() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("precious"), "x").unwrap();
        assert!(matches!(
            claim_data_dir(tmp.path()),
            Err(MeshError::NotOurs { .. })
        ));
        let new = tmp.path().join("new");
        claim_data_dir(&new).unwrap();
        assert!(new.join("mesh.json").exists(), "marked as ours");
        claim_data_dir(&new).expect("ours");
    }
}
