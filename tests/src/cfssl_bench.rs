//! The reference point of `citadel-load`: `cfssl serve` (CloudFlare's CA, Debian package
//! `golang-cfssl`) with an ECDSA P-256 CA made by `cfssl gencert -initca`, driven by `wrk`
//! posting one CSR to `POST /api/v1/cfssl/sign` at a given concurrency, on this machine.
//!
//! cfssl answers over plain HTTP, without authenticating the caller and without recording
//! the certificate anywhere: per certificate it does less than Citadel (no TLS, no token
//! check, no durable ledger row). Its rate is what an operator would compare with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// What one `wrk` run against `cfssl serve` measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CfsslRun {
    /// Successful signatures per second (requests/s less the non-2xx answers).
    pub certs_per_sec: f64,
    /// 50th percentile latency, milliseconds (from `wrk --latency`), if printed.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, milliseconds, if printed.
    pub p99_ms: Option<f64>,
    /// Answers other than 2xx/3xx.
    pub errors: u64,
}

/// The first of `names` not found on `PATH`, if any.
pub fn missing_tool(names: &[&str]) -> Option<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names
        .iter()
        .find(|name| !std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
        .map(|name| (*name).to_owned())
}

/// A `wrk` duration or latency (`850.12us`, `12.30ms`, `1.02s`, `2m`) in milliseconds (pure).
pub fn wrk_millis(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let factor = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(value * factor)
}

/// Reads the figures of `wrk --latency` output (pure).
pub fn parse_wrk(output: &str) -> Option<CfsslRun> {
    let mut rate = None;
    let mut errors = 0u64;
    let mut requests = None;
    let mut p50 = None;
    let mut p99 = None;
    for line in output.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rate = v.trim().parse::<f64>().ok();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("50%") {
            p50 = wrk_millis(v);
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = wrk_millis(v);
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            requests = n.trim().parse::<u64>().ok();
        }
    }
    let rate = rate?;
    // Failed answers are not certificates: take their share out of the rate.
    let ok_share = match requests {
        Some(n) if n > 0 => n.saturating_sub(errors) as f64 / n as f64,
        _ => 1.0,
    };
    Some(CfsslRun {
        certs_per_sec: rate * ok_share,
        p50_ms: p50,
        p99_ms: p99,
        errors,
    })
}

/// The `wrk` script posting `csr_pem` as cfssl's sign request.
pub fn wrk_script(csr_pem: &str) -> anyhow::Result<String> {
    let body = serde_json::json!({ "certificate_request": csr_pem }).to_string();
    // A JSON string is a valid Lua string literal for this content (ASCII, \n escapes).
    let literal = serde_json::to_string(&body)?;
    Ok(format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = {literal}\n"
    ))
}

/// A running `cfssl serve`; killed on drop.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Makes the ECDSA P-256 CA and the signing profile in `dir`.
fn make_ca(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let csr = dir.join("ca-csr.json");
    std::fs::write(
        &csr,
        r#"{"CN":"cfssl bench CA","key":{"algo":"ecdsa","size":256}}"#,
    )?;
    let out = run(Command::new("cfssl").args(["gencert", "-initca"]).arg(&csr))?;
    let made: serde_json::Value = serde_json::from_slice(&out).context("cfssl gencert output")?;
    let field = |name: &str| {
        made.get(name)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .with_context(|| format!("cfssl gencert gave no {name}"))
    };
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    std::fs::write(&cert, field("cert")?)?;
    std::fs::write(&key, field("key")?)?;
    // Leaves like Citadel's: short-lived, for TLS clients and servers.
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"signing":{"default":{"expiry":"1h","usages":["digital signature","key encipherment","server auth","client auth"]}}}"#,
    )?;
    Ok((cert, key, config))
}

/// Starts `cfssl serve` on `addr` and waits until it signs `csr_pem`.
async fn serve(dir: &Path, addr: SocketAddr, csr_pem: &str) -> anyhow::Result<Serve> {
    let (cert, key, config) = make_ca(dir)?;
    let child = Command::new("cfssl")
        .arg("serve")
        .arg("-address")
        .arg(addr.ip().to_string())
        .arg("-port")
        .arg(addr.port().to_string())
        .arg("-ca")
        .arg(&cert)
        .arg("-ca-key")
        .arg(&key)
        .arg("-config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning cfssl serve")?;
    let serve = Serve(child);
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/api/v1/cfssl/sign");
    let body = serde_json::json!({ "certificate_request": csr_pem });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(resp) = client.post(&url).json(&body).send().await
            && let Ok(answer) = resp.json::<serde_json::Value>().await
        {
            anyhow::ensure!(
                answer.get("success") == Some(&serde_json::Value::Bool(true)),
                "cfssl refused the CSR: {answer}"
            );
            return Ok(serve);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "cfssl serve not answering after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Measures `cfssl serve` signing `csr_pem` for `seconds` with `connections` in flight
/// (`wrk` with one thread per core, as many as this machine has).
pub async fn measure(csr_pem: &str, connections: usize, seconds: u64) -> anyhow::Result<CfsslRun> {
    let tmp = tempfile::tempdir()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], crate::process::free_port()));
    let _serve = serve(tmp.path(), addr, csr_pem).await?;
    let script = tmp.path().join("sign.lua");
    std::fs::write(&script, wrk_script(csr_pem)?)?;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(connections);
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("--latency")
        .arg("-s")
        .arg(&script)
        .arg(format!("http://{addr}/api/v1/cfssl/sign"));
    let out = tokio::task::spawn_blocking(move || run(&mut cmd)).await??;
    let text = String::from_utf8_lossy(&out);
    parse_wrk(&text).with_context(|| format!("cannot read wrk's output:\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 5s test @ http://127.0.0.1:18888/api/v1/cfssl/sign
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    42.79ms   54.28ms 515.66ms   86.54%
    Req/Sec     1.25k   491.96     2.65k    70.00%
  Latency Distribution
     50%   20.51ms
     75%   50.00ms
     90%  100.10ms
     99%    1.02s
  12456 requests in 5.05s, 9.68MB read
  Non-2xx or 3xx responses: 12
Requests/sec:   2467.81
Transfer/sec:      1.92MB
";

    #[test]
    fn reads_rate_latency_and_failures_from_wrk() {
        let run = parse_wrk(WRK).unwrap();
        assert_eq!(run.errors, 12);
        assert!((run.certs_per_sec - 2467.81 * (12444.0 / 12456.0)).abs() < 1e-6);
        assert_eq!(run.p50_ms, Some(20.51));
        assert_eq!(run.p99_ms, Some(1020.0));
    }

    #[test]
    fn wrk_units() {
        assert_eq!(wrk_millis("850.00us"), Some(0.85));
        assert_eq!(wrk_millis(" 12.5ms"), Some(12.5));
        assert_eq!(wrk_millis("2m"), Some(120_000.0));
        assert_eq!(wrk_millis("12"), None);
    }

    #[test]
    fn no_rate_is_no_run() {
        assert_eq!(parse_wrk("unable to connect"), None);
    }
}
