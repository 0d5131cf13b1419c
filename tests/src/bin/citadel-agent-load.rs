//! `citadel-agent-load`: N simulated workloads open SDS streams at once
//! against one real `citadel-agent` and one real `citadel` CA.
//!
//! Each workload is a distinct uid in the agent's entries file, so every
//! one is attested by SO_PEERCRED exactly as a real process would be: the
//! client thread switches its own effective uid (a raw `setresuid` changes
//! only the calling thread) for the `connect()` and back. Must run as root.
//!
//! Two waves: cold (every identity is new: key, CSR, CA round trip) and
//! warm (the same identities asked again on new connections, served from
//! the agent's memory), so the cost of issuance shows as a ratio measured
//! in the same run. Agent RSS is read from /proc before and after.
//!
//! ```text
//! cargo build --release -p citadel-ca -p citadel-agent -p citadel-e2e
//! target/release/citadel-agent-load --workloads 1000
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use citadel_e2e::mesh::{AgentOptions, AgentProcess, create_join_token};
use citadel_e2e::process::CaProcess;
use citadel_proto::SECRET_TYPE_URL;
use citadel_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use citadel_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use clap::Parser;
use tonic::transport::Endpoint;

/// Load generator for the node agent.
#[derive(Parser, Debug)]
#[command(name = "citadel-agent-load", about)]
struct Args {
    /// Simulated workloads (distinct uids from --first-uid).
    #[arg(long, default_value_t = 1000)]
    workloads: u32,
    /// The first uid used.
    #[arg(long, default_value_t = 200_000)]
    first_uid: u32,
}

fn workload_id(i: u32) -> String {
    format!("spiffe://cluster.local/ns/bench/sa/w{i}")
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// Connects to `path` with effective uid `uid` on this thread only.
fn connect_as(path: &std::path::Path, uid: u32) -> anyhow::Result<std::os::unix::net::UnixStream> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: raw setresuid changes the credentials of this thread
            // only (glibc's wrapper would change every thread); -1 leaves
            // the real and saved uid (root), so the switch back is allowed.
            let r = unsafe { libc::syscall(libc::SYS_setresuid, -1i64, uid as i64, -1i64) };
            anyhow::ensure!(
                r == 0,
                "setresuid({uid}) failed: {}",
                std::io::Error::last_os_error()
            );
            let stream = std::os::unix::net::UnixStream::connect(path);
            // SAFETY: as above, back to effective uid 0.
            let back = unsafe { libc::syscall(libc::SYS_setresuid, -1i64, 0i64, -1i64) };
            anyhow::ensure!(back == 0, "could not switch back to uid 0");
            Ok(stream?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
    })
}

/// An SDS stream kept open (so its identity stays in demand).
struct OpenStream {
    _requests: tokio::sync::mpsc::Sender<DiscoveryRequest>,
    _responses: tonic::Streaming<DiscoveryResponse>,
}

/// Opens an SDS stream for `default` on a connection made as `uid` and
/// waits for the first response.
async fn fetch_as(
    path: std::path::PathBuf,
    uid: u32,
) -> anyhow::Result<(DiscoveryResponse, OpenStream)> {
    let std_stream = tokio::task::spawn_blocking({
        let path = path.clone();
        move || connect_as(&path, uid)
    })
    .await??;
    std_stream.set_nonblocking(true)?;
    let slot = Arc::new(Mutex::new(Some(tokio::net::UnixStream::from_std(
        std_stream,
    )?)));
    let channel = Endpoint::try_from("http://agent.local")?
        .connect_with_connector(tower::service_fn(move |_| {
            let slot = slot.clone();
            async move {
                let s = slot
                    .lock()
                    .map_err(|_| std::io::Error::other("poisoned"))?
                    .take()
                    .ok_or_else(|| std::io::Error::other("connection already used"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await?;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(DiscoveryRequest {
        resource_names: vec!["default".into()],
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    })
    .await?;
    let mut responses = client
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = responses.message().await?.context("stream ended")?;
    Ok((
        first,
        OpenStream {
            _requests: tx,
            _responses: responses,
        },
    ))
}

/// Every workload opens a stream at once; the time until all hold
/// certificates, and the streams (open until dropped).
async fn wave(path: &std::path::Path, args: &Args) -> anyhow::Result<(Duration, Vec<OpenStream>)> {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(args.workloads as usize);
    for i in 0..args.workloads {
        tasks.push(tokio::spawn(fetch_as(path.to_owned(), args.first_uid + i)));
    }
    let mut open = Vec::with_capacity(tasks.len());
    for (i, t) in tasks.into_iter().enumerate() {
        let (resp, stream) = t.await?.with_context(|| format!("workload {i}"))?;
        anyhow::ensure!(resp.resources.len() == 1, "workload {i}: no certificate");
        open.push(stream);
    }
    Ok((start.elapsed(), open))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        effective_uid() == 0,
        "run as root: each simulated workload connects with its own uid"
    );
    let tmp = tempfile::tempdir()?;
    let ca = CaProcess::start(&tmp.path().join("ca"), &[]).await?;
    let ids: Vec<String> = (0..args.workloads).map(workload_id).collect();
    let allow: Vec<&str> = ids.iter().map(String::as_str).collect();
    let token = create_join_token(&ca.data_dir, "bench-node", &allow, "10m")?;
    let mut entries = String::from("entries:\n");
    for (i, id) in ids.iter().enumerate() {
        entries.push_str(&format!(
            "  - spiffe_id: {id}\n    uid: {}\n",
            args.first_uid + i as u32
        ));
    }
    let dir = tmp.path().join("agent");
    let agent = AgentProcess::start(
        &ca,
        &AgentOptions {
            dir: &dir,
            entries_yaml: &entries,
            join_token: Some(&token),
            extra: &["--idle-linger", "10m"],
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(agent.pid())?;

    let (cold, _cold_streams) = wave(&agent.socket, &args).await?;
    let after_cold = rss_kib(agent.pid())?;
    let (warm, _warm_streams) = wave(&agent.socket, &args).await?;
    let after_warm = rss_kib(agent.pid())?;
    let metrics = agent.metrics().await?;
    let issued = metrics
        .lines()
        .find(|l| l.starts_with("citadel_agent_certificate_issuances_total{result=\"success\"}"))
        .unwrap_or("(no issuance metric)")
        .to_owned();
    let n = f64::from(args.workloads);
    println!("workloads:                 {}", args.workloads);
    println!(
        "cold wave (all new ids):   {:.2} s until all hold certificates ({:.0} workloads/s)",
        cold.as_secs_f64(),
        n / cold.as_secs_f64()
    );
    println!(
        "warm wave (held ids):      {:.2} s ({:.0} workloads/s)",
        warm.as_secs_f64(),
        n / warm.as_secs_f64()
    );
    println!(
        "cold / warm:               {:.2}",
        cold.as_secs_f64() / warm.as_secs_f64()
    );
    println!("agent RSS idle:            {} KiB", idle);
    println!(
        "agent RSS, 1 stream each:  {} KiB (+{:.1} KiB per workload)",
        after_cold,
        (after_cold as f64 - idle as f64) / n
    );
    println!(
        "agent RSS, 2 streams each: {} KiB (+{:.1} KiB per workload)",
        after_warm,
        (after_warm as f64 - idle as f64) / n
    );
    println!("{issued}");
    Ok(())
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
