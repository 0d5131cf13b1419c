//! Faults for the crash and outage tests: a private PostgreSQL server that a test may stop
//! and restart (the shared one on 127.0.0.1:5432 serves other tests running in parallel and
//! must never be restarted), a small tmpfs to run a data directory out of space, and a burst
//! of CSR requests whose every outcome is kept.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Mutex;

use crate::client::{connect, create, request};
pub use crate::mesh::is_root;
use crate::process::{citadel, free_port};

/// The directory of PostgreSQL's server binaries (`initdb`, `pg_ctl`, `postgres`), newest
/// version first, or `None` when none is installed.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// A PostgreSQL server of the test's own: `initdb` in a temporary directory (as the
/// `postgres` user when run as root), on a free loopback port, its socket in that directory,
/// trust authentication, no fsync (durability across a *server* restart does not need it:
/// the server process stops, the operating system keeps the page cache). Stopped, with its
/// files removed, on drop.
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    /// Starts one; `Ok(None)` (after a loud message) when PostgreSQL is not installed and
    /// `CI` is unset. Under `CI` a missing installation is an error.
    pub fn start() -> anyhow::Result<Option<PrivatePostgres>> {
        let Some(bin) = postgres_bin_dir() else {
            anyhow::ensure!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL server binaries not found under /usr/lib/postgresql (CI is set)"
            );
            eprintln!(
                "SKIPPED: PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql)"
            );
            return Ok(None);
        };
        let dir = tempfile::Builder::new().prefix("citadel-pg-").tempdir()?;
        let pg = PrivatePostgres {
            bin,
            port: free_port(),
            dir,
        };
        pg.chown_to_postgres(pg.dir.path())?;
        run(
            pg.as_postgres("initdb").args([
                "-D",
                &pg.data().display().to_string(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ]),
            "initdb",
        )?;
        pg.start_server()?;
        Ok(Some(pg))
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Root gives the tree to `postgres` (the server refuses to run as root).
    fn chown_to_postgres(&self, path: &Path) -> anyhow::Result<()> {
        if is_root() {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(path),
                "chown",
            )?;
        }
        Ok(())
    }

    fn as_postgres(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.stdin(Stdio::null());
        cmd
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        run(
            self.as_postgres("pg_ctl").args([
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.dir.path().join("server.log").display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ]),
            "pg_ctl start",
        )?;
        Ok(())
    }

    /// Stops the server: `fast` disconnects every client and aborts their transactions, as a
    /// database restart in production does.
    pub fn stop_server(&self) -> anyhow::Result<()> {
        run(
            self.as_postgres("pg_ctl").args([
                "-D",
                &self.data().display().to_string(),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "stop",
            ]),
            "pg_ctl stop",
        )?;
        Ok(())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .as_postgres("pg_ctl")
            .args([
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}

/// A tmpfs of `size` mounted on a temporary directory (root only); unmounted on drop.
pub struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"8m"`).
    pub fn mount(size: &str) -> anyhow::Result<SmallTmpfs> {
        let dir = tempfile::Builder::new()
            .prefix("citadel-tmpfs-")
            .tempdir()?;
        run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
                .arg("tmpfs")
                .arg(dir.path()),
            "mount -t tmpfs",
        )?;
        Ok(SmallTmpfs { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `file` until the file system is full; returns the bytes written.
    pub fn fill(&self, file: &Path) -> anyhow::Result<u64> {
        use std::io::Write;
        let mut f = std::fs::File::create(file)?;
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
        // Whatever the page cache still held must hit the (full) file system too.
        let _ = f.sync_all();
        Ok(written)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
    }
}

/// One certificate a client received: its serial (lowercase hex) and the SHA-256 of its DER,
/// as the ledger records them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Received {
    /// Serial, lowercase hex.
    pub serial_hex: String,
    /// SHA-256 of the leaf's DER, lowercase hex.
    pub sha256_hex: String,
}

/// The serial and DER hash of the first certificate of a PEM chain.
pub fn received_of(leaf_pem: &str) -> anyhow::Result<Received> {
    let der = pem_der(leaf_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("leaf does not parse: {e}"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    Ok(Received {
        serial_hex: hex_lower(cert.raw_serial()),
        sha256_hex: hex_lower(digest.as_ref()),
    })
}

fn pem_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(body)?)
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every certificate in the ledger of the store `store_args` names (`citadel certs list`).
pub fn ledger_certificates(store_args: &[&str]) -> anyhow::Result<Vec<Received>> {
    let mut args = vec!["certs", "list", "--json"];
    args.extend_from_slice(store_args);
    let out = citadel(&args)?;
    anyhow::ensure!(
        out.status.success(),
        "certs list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(rows
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Received {
            serial_hex: r["serial"].as_str().unwrap_or_default().to_owned(),
            sha256_hex: r["sha256"].as_str().unwrap_or_default().to_owned(),
        })
        .collect())
}

/// `citadel ledger verify` on the store `store_args` names: (passed, its output).
pub fn ledger_verify(store_args: &[&str]) -> anyhow::Result<(bool, String)> {
    let mut args = vec!["ledger", "verify"];
    args.extend_from_slice(store_args);
    let out = citadel(&args)?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// What a burst of requests saw.
#[derive(Debug, Default)]
pub struct BurstOutcome {
    /// Certificates received.
    pub received: Vec<Received>,
    /// Failed requests: gRPC code and message.
    pub failures: Vec<(tonic::Code, String)>,
}

/// A burst of CSR requests: what to send, how hard, and when to stop.
#[derive(Clone)]
pub struct Burst {
    /// (CSR PEM, bearer token) pairs, used round-robin.
    pub requests: Arc<Vec<(String, String)>>,
    /// How many requests in all.
    pub total: usize,
    /// Concurrent workers.
    pub concurrency: usize,
    /// HTTP/2 connections the workers share.
    pub connections: usize,
    /// A worker stops at its first failure (a killed CA) instead of going on.
    pub stop_after_failure: bool,
    /// Counts answered requests (for the caller to time a fault).
    pub progress: Arc<AtomicUsize>,
    /// Set by the caller to end the burst early.
    pub stop: Arc<AtomicBool>,
    /// Deadline of each request.
    pub timeout: Duration,
}

impl Burst {
    /// `total` requests from `concurrency` workers over 4 connections, 30 s per request.
    pub fn new(requests: Arc<Vec<(String, String)>>, total: usize, concurrency: usize) -> Burst {
        Burst {
            requests,
            total,
            concurrency,
            connections: 4,
            stop_after_failure: false,
            progress: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            timeout: Duration::from_secs(30),
        }
    }

    /// Runs the burst against the CA at `addr` (trusting `bundle_pem`).
    pub async fn run(
        self,
        addr: std::net::SocketAddr,
        bundle_pem: &str,
    ) -> anyhow::Result<BurstOutcome> {
        let mut clients = Vec::new();
        for _ in 0..self.connections.max(1) {
            clients.push(connect(addr, bundle_pem, None).await?);
        }
        let next = Arc::new(AtomicUsize::new(0));
        let outcome = Arc::new(Mutex::new(BurstOutcome::default()));
        let mut workers = Vec::new();
        for w in 0..self.concurrency.max(1) {
            let mut client = clients[w % clients.len()].clone();
            let (next, outcome, b) = (next.clone(), outcome.clone(), self.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= b.total || b.stop.load(Ordering::SeqCst) || b.requests.is_empty() {
                        return;
                    }
                    let (csr, token) = &b.requests[i % b.requests.len()];
                    let mut req = request(csr, 0, Some(token), None);
                    req.set_timeout(b.timeout);
                    let answer = tokio::time::timeout(b.timeout, create(&mut client, req)).await;
                    b.progress.fetch_add(1, Ordering::SeqCst);
                    let result = match answer {
                        Ok(Ok(resp)) => match resp.cert_chain.first().map(|c| received_of(c)) {
                            Some(Ok(r)) => Ok(r),
                            _ => Err((tonic::Code::Internal, "no usable leaf".to_owned())),
                        },
                        Ok(Err(status)) => Err((status.code(), status.message().to_owned())),
                        Err(_) => Err((tonic::Code::DeadlineExceeded, "client timeout".into())),
                    };
                    let failed = result.is_err();
                    {
                        let mut o = outcome.lock().await;
                        match result {
                            Ok(r) => o.received.push(r),
                            Err(f) => o.failures.push(f),
                        }
                    }
                    if failed && b.stop_after_failure {
                        return;
                    }
                }
            }));
        }
        for w in workers {
            w.await?;
        }
        let outcome = std::mem::take(&mut *outcome.lock().await);
        Ok(outcome)
    }
}
