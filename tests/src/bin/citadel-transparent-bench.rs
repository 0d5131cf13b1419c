//! `citadel-transparent-bench`: the latency transparent capture adds against the
//! explicit listeners, in one run on one machine. Four network-namespace pods on
//! one bridge, the CA and the agent in the host namespace:
//!
//! - `direct`: a client in pod C dials the HTTP app in pod D, no proxy on the path;
//! - `explicit`: the client in C dials C's `--outbound` on 127.0.0.1, which
//!   originates mTLS to D's `--inbound PORT:8080:http` (per-request authorization);
//! - `transparent`: the client in pod A dials pod B's address; the rules of
//!   `citadel-proxy iptables` send it through A's and B's `run --transparent`
//!   (the same mTLS, HTTP sniffed, per-request authorization).
//!
//! Each path is timed request by request, one client at a time, on one kept-alive
//! connection and with a new connection per request. Needs root, `ip`, `iptables`.
//!
//! ```text
//! cargo build --release -p citadel-ca -p citadel-agent -p citadel-proxy -p citadel-e2e
//! sudo target/release/citadel-transparent-bench --requests 2000
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;

use citadel_e2e::mesh::{
    AgentOptions, AgentProcess, CitadelProxyProcess, MESH_API, MESH_API_UID, MESH_WEB,
    MESH_WEB_UID, create_join_token, start_ca_with_policies, web_api_entries,
};
use citadel_e2e::netns::{Lan, http_app, in_netns};
use citadel_e2e::process::binary;

#[derive(Parser)]
#[command(about = "Latency of transparent capture against explicit listeners")]
struct Args {
    /// Timed requests per path and mode.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Untimed requests first.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
}

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: shop-mtls, namespace: shop}
spec: {mtls: {mode: STRICT}}
";

/// Reads one response (content-length framed); errors on anything else.
fn read_response(r: &mut BufReader<TcpStream>) -> anyhow::Result<()> {
    let mut len = None;
    let mut status = String::new();
    r.read_line(&mut status)?;
    anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "answer: {status:?}");
    loop {
        let mut line = String::new();
        anyhow::ensure!(r.read_line(&mut line)? > 0, "closed mid-answer");
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse::<usize>().ok();
        }
    }
    let mut body = vec![0u8; len.context("no content-length")?];
    r.read_exact(&mut body)?;
    Ok(())
}

/// Latencies of `n` sequential GETs to `addr` from inside `ns`, in microseconds.
fn measure(ns: &str, addr: SocketAddr, n: usize, keep_alive: bool) -> anyhow::Result<Vec<u64>> {
    in_netns(ns, || -> anyhow::Result<Vec<u64>> {
        let mut out = Vec::with_capacity(n);
        let connect = || -> anyhow::Result<(TcpStream, BufReader<TcpStream>)> {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let r = BufReader::new(s.try_clone()?);
            Ok((s, r))
        };
        let mut conn = if keep_alive { Some(connect()?) } else { None };
        let request = if keep_alive {
            format!("GET /bench HTTP/1.1\r\nHost: {addr}\r\n\r\n")
        } else {
            format!("GET /bench HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        };
        for _ in 0..n {
            let start = Instant::now();
            let (s, r) = match conn.as_mut() {
                Some(c) => (&mut c.0, &mut c.1),
                None => {
                    conn = Some(connect()?);
                    let c = conn.as_mut().context("connection")?;
                    (&mut c.0, &mut c.1)
                }
            };
            s.write_all(request.as_bytes())?;
            read_response(r)?;
            out.push(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
            if !keep_alive {
                conn = None;
            }
        }
        Ok(out)
    })?
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        citadel_e2e::mesh::is_root(),
        "needs root (network namespaces, proxies as other uids)"
    );
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir()?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;
    let (ca, _policies) = start_ca_with_policies(tmp.path(), "mesh.yaml", STRICT, &[]).await?;
    let token = create_join_token(&ca.data_dir, "node-a", &[MESH_WEB, MESH_API], "10m")?;
    let entries = web_api_entries();
    let agent = AgentProcess::start(
        &ca,
        &AgentOptions::new(&tmp.path().join("agent"), &entries, Some(&token)),
    )
    .await?;

    let mut lan = Lan::create()?;
    let a = lan.add_pod("ba", 2)?;
    let b = lan.add_pod("bb", 3)?;
    let c = lan.add_pod("bc", 5)?;
    let d = lan.add_pod("bd", 6)?;
    let name = |i: usize| lan.pods[i].0.name().to_owned();
    let (ip_b, ip_d) = (lan.pods[b].1, lan.pods[d].1);
    http_app(&name(b), 8080, "B")?;
    http_app(&name(d), 8080, "D")?;
    let proxy_bin = binary("citadel-proxy");
    let proxy_bin = proxy_bin.to_str().context("path")?;
    for (i, uid) in [(a, MESH_WEB_UID), (b, MESH_API_UID)] {
        lan.pods[i].0.exec(&[
            proxy_bin,
            "iptables",
            "--apply",
            "--proxy-uid",
            &uid.to_string(),
        ])?;
    }
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let transparent = strings(&["--transparent", "--mesh-cidr", "10.77.0.0/25"]);
    let mut proxies = vec![
        (
            name(a),
            CitadelProxyProcess::spawn_in(
                &name(a),
                tmp.path(),
                "a",
                Some(MESH_WEB_UID),
                &agent.socket,
                &transparent,
            )?,
        ),
        (
            name(b),
            CitadelProxyProcess::spawn_in(
                &name(b),
                tmp.path(),
                "b",
                Some(MESH_API_UID),
                &agent.socket,
                &transparent,
            )?,
        ),
        (
            name(c),
            CitadelProxyProcess::spawn_in(
                &name(c),
                tmp.path(),
                "c",
                Some(MESH_WEB_UID),
                &agent.socket,
                &strings(&["--outbound", &format!("9000={ip_d}:15006,{MESH_API}")]),
            )?,
        ),
        (
            name(d),
            CitadelProxyProcess::spawn_in(
                &name(d),
                tmp.path(),
                "d",
                Some(MESH_API_UID),
                &agent.socket,
                &strings(&["--inbound", "15006:8080:http"]),
            )?,
        ),
    ];
    for (ns, p) in &mut proxies {
        p.wait_ready_in(ns, 30)?;
    }

    let paths = [
        ("direct", name(c), SocketAddr::from((ip_d, 8080))),
        (
            "explicit",
            name(c),
            SocketAddr::from(([127, 0, 0, 1], 9000)),
        ),
        ("transparent", name(a), SocketAddr::from((ip_b, 8080))),
    ];
    println!(
        "{:<12} {:<11} {:>9} {:>9} {:>9}",
        "path", "mode", "p50 µs", "p99 µs", "mean µs"
    );
    let mut p50s = std::collections::HashMap::new();
    for keep_alive in [true, false] {
        let mode = if keep_alive { "keep-alive" } else { "new-conn" };
        for (label, ns, addr) in &paths {
            measure(ns, *addr, args.warmup, keep_alive)
                .with_context(|| format!("{label} {mode} (warm-up)"))?;
            let mut lat = measure(ns, *addr, args.requests, keep_alive)
                .with_context(|| format!("{label} {mode}"))?;
            lat.sort_unstable();
            let mean = lat.iter().sum::<u64>() / lat.len().max(1) as u64;
            let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
            p50s.insert((*label, mode), (p50, p99));
            println!("{label:<12} {mode:<11} {p50:>9} {p99:>9} {mean:>9}");
        }
    }
    println!();
    for mode in ["keep-alive", "new-conn"] {
        let (d50, d99) = p50s[&("direct", mode)];
        let (e50, e99) = p50s[&("explicit", mode)];
        let (t50, t99) = p50s[&("transparent", mode)];
        println!(
            "{mode}: transparent/explicit p50 {:.2}x p99 {:.2}x; added over direct: explicit {} µs, transparent {} µs (p50)",
            t50 as f64 / e50.max(1) as f64,
            t99 as f64 / e99.max(1) as f64,
            e50.saturating_sub(d50),
            t50.saturating_sub(d50),
        );
        let _ = d99;
    }
    drop(proxies);
    drop(lan);
    drop(agent);
    Ok(())
}
