//! Runs the real binaries built by this workspace.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Path of a binary of this workspace (next to the test executable's `deps/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Lowest port [`free_port`] hands out: above the well-known ports and above the fixed ports
/// of the mesh's own components (15000–15100, which tests may start with their defaults).
const FIRST_TEST_PORT: u32 = 20_000;

/// A port that was free a moment ago on 127.0.0.1, for a server the test starts next. It is
/// not one this process handed out before (until the whole range has been handed out), and it
/// lies below the kernel's ephemeral range: a port from that range (what binding port 0
/// returns) can become the source port of any outgoing connection between this check and the
/// server's bind, and the server then fails with "Address already in use" (seen in CI). Each
/// process starts at a place of its own in the range, so test binaries that follow each other
/// do not reuse each other's ports first.
pub fn free_port() -> u16 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let ephemeral_start = ephemeral_ports_start().unwrap_or(32_768);
    let span = ephemeral_start.saturating_sub(FIRST_TEST_PORT);
    if span >= 1_000 {
        let next =
            NEXT.get_or_init(|| AtomicU32::new(std::process::id().wrapping_mul(7_919) % span));
        for _ in 0..span {
            let offset = next.fetch_add(1, Ordering::Relaxed) % span;
            if let Ok(port) = u16::try_from(FIRST_TEST_PORT + offset)
                && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            {
                return port;
            }
        }
    }
    // An unusual port range leaves no room below it: any free port, as a last resort.
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

/// The first port of the kernel's range for outgoing connections' source ports.
fn ephemeral_ports_start() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `citadel ARGS…` to completion.
pub fn citadel(args: &[&str]) -> anyhow::Result<Output> {
    Command::new(binary("citadel"))
        .args(args)
        .output()
        .context("running citadel")
}

/// A minimal HTTP/1.0 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    parse_http_response(&buf)
}

/// The status and body of a whole (unchunked) HTTP/1.x response.
pub fn parse_http_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A `citadel serve` child process on loopback ports.
pub struct CaProcess {
    child: Child,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// CSR API address.
    pub grpc_addr: SocketAddr,
    /// HTTP address.
    pub http_addr: SocketAddr,
}

impl CaProcess {
    /// Starts `citadel serve --data-dir DIR` plus `extra` flags and waits until it is ready.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let grpc_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let http_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        Self::start_on(data_dir, grpc_addr, http_addr, extra).await
    }

    /// As [`Self::start`], on given addresses (to restart a CA where its
    /// clients expect it).
    pub async fn start_on(
        data_dir: &Path,
        grpc_addr: SocketAddr,
        http_addr: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_with_env(data_dir, grpc_addr, http_addr, extra, &[]).await
    }

    /// As [`Self::start_on`], with extra environment variables (e.g. `KUBECONFIG`).
    pub async fn start_with_env(
        data_dir: &Path,
        grpc_addr: SocketAddr,
        http_addr: SocketAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let child = Command::new(binary("citadel"))
            .envs(env.iter().copied())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(grpc_addr.to_string())
            .arg("--http-listen")
            .arg(http_addr.to_string())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning citadel serve")?;
        let mut ca = CaProcess {
            child,
            data_dir: data_dir.to_path_buf(),
            grpc_addr,
            http_addr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = ca.child.try_wait() {
                anyhow::bail!("citadel serve exited early: {status}");
            }
            if let Ok((200, _)) = http_get(http_addr, "/readyz").await
                && tokio::net::TcpStream::connect(grpc_addr).await.is_ok()
            {
                return Ok(ca);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "citadel serve not ready after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The trust bundle the CA wrote.
    pub fn bundle_pem(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.data_dir.join("bundle.pem"))?)
    }

    /// Sends SIGTERM and waits for the exit without blocking the runtime
    /// (so this process's open connections keep answering the CA's
    /// graceful shutdown).
    pub async fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "citadel did not exit within 30 s of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl CaProcess {
    /// SIGKILL, as a crash or an OOM kill: no shutdown path runs. Waits for the exit.
    pub fn kill(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.child.kill().context("SIGKILL citadel serve")?;
        Ok(self.child.wait()?)
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outgoing connections take their source ports from the ephemeral range; a port handed
    /// out from there could be taken before the server binds it.
    #[test]
    fn free_ports_are_distinct_and_below_the_ephemeral_range() {
        let start = ephemeral_ports_start().unwrap_or(32_768);
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for port in ports {
            assert!(u32::from(port) < start, "{port} is in the ephemeral range");
            assert!(u32::from(port) >= FIRST_TEST_PORT, "{port}");
        }
    }
}
