//! `citadel-proxy-bench`: the same chain, load client → outbound proxy → mTLS →
//! inbound proxy → app, once through two `citadel-proxy` processes and once
//! through two Envoys, in one run on one machine, with certificates for both
//! from the real node agent over SDS and the real CA behind it.
//!
//! The `http` and `tcp-echo` cases are L4 on both pairs: `citadel-proxy` with
//! `--outbound`/`--inbound … :tcp`, Envoy with `tcp_proxy` and, on the inbound
//! side, an RBAC network filter allowing the same principals as the
//! AuthorizationPolicies in force. The `http-l7` cases keep both outbound sides
//! L4 but make the inbound L7: `citadel-proxy --inbound PORT:APP_PORT:http`
//! (one AuthorizationPolicy decision per request, pooled keep-alive to the
//! app), and Envoy with an HTTP connection manager, the HTTP RBAC filter
//! (`envoy.filters.http.rbac`, the same principals) and the router to the app
//! cluster, setting `x-forwarded-client-cert` as citadel-proxy does. Each case
//! runs HTTP/1.1 keep-alive requests or raw TCP echo round trips, with a fixed
//! number of connections for a fixed duration, with 1 and with 1,000
//! AuthorizationPolicies in force. The proxies run as two uids (the agent
//! attests them by uid), so it must run as root. Everything is on loopback.
//!
//! ```text
//! cargo build --release -p citadel-ca -p citadel-agent -p citadel-proxy -p citadel-e2e
//! target/release/citadel-proxy-bench --duration-secs 5 --connections 16 --workers 2
//! ```

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use citadel_e2e::mesh::{
    AgentOptions, AgentProcess, CitadelProxyProcess, EnvoyOptions, EnvoyProcess, create_join_token,
    envoy_binary, envoy_cluster, envoy_downstream_mtls, envoy_listener, envoy_rbac_allow,
    envoy_tcp_proxy, envoy_upstream_mtls,
};
use citadel_e2e::process::{CaProcess, free_port};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const WEB_UID: u32 = 61031;
const API_UID: u32 = 61032;
const ECHO_BYTES: usize = 64;
const HTTP_REQUEST: &[u8] = b"GET /bench HTTP/1.1\r\nHost: api\r\n\r\n";
const HTTP_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";

/// Benchmark of citadel-proxy against Envoy on the same chain.
#[derive(Parser, Debug)]
#[command(name = "citadel-proxy-bench", about)]
struct Args {
    /// Measured seconds per case (after the connections are open).
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
    /// Concurrent client connections, each doing one request at a time.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Worker threads of each proxy: TOKIO_WORKER_THREADS for citadel-proxy,
    /// --concurrency for Envoy.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Total request rate of the paced latency cases (requests/s spread evenly
    /// over the connections, each on a fixed schedule; latency from each send).
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Total rate of the new-connection-per-request echo case (connections/s;
    /// each request opens three loopback connections along the chain).
    #[arg(long, default_value_t = 500)]
    connection_rate: u32,
    /// AuthorizationPolicy counts to run with (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,1000")]
    policies: Vec<usize>,
    /// The Envoy binary (default: CITADEL_ENVOY, .venv-tools, PATH).
    #[arg(long)]
    envoy: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Load {
    Http,
    /// HTTP/1.1 keep-alive requests through the L7 (`:http`) inbound: the
    /// response is parsed (the proxies rewrite its head).
    HttpL7,
    Echo,
    /// One echo round trip on a new connection each time: the mTLS handshake
    /// and the per-connection policy decision are in every request.
    EchoNewConnection,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Http => "http",
            Load::HttpL7 => "http-l7",
            Load::Echo => "tcp-echo",
            Load::EchoNewConnection => "tcp-echo new-conn",
        }
    }
}

/// A load at full speed (each connection sends its next request as soon as
/// the last is answered) or paced at a fixed total rate.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Case {
    load: Load,
    rate: Option<u32>,
}

impl Case {
    fn all(rate: u32, connection_rate: u32) -> [Case; 7] {
        [
            Case {
                load: Load::Http,
                rate: None,
            },
            Case {
                load: Load::Http,
                rate: Some(rate),
            },
            Case {
                load: Load::HttpL7,
                rate: None,
            },
            Case {
                load: Load::HttpL7,
                rate: Some(rate),
            },
            Case {
                load: Load::Echo,
                rate: None,
            },
            Case {
                load: Load::Echo,
                rate: Some(rate),
            },
            Case {
                load: Load::EchoNewConnection,
                rate: Some(connection_rate),
            },
        ]
    }

    fn name(self) -> String {
        match self.rate {
            None => format!("{} max", self.load.name()),
            Some(r) => format!("{} @{r}/s", self.load.name()),
        }
    }
}

/// One measured case.
#[derive(Debug)]
struct Figures {
    requests: u64,
    errors: u64,
    req_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
    cpu_s_per_10k: f64,
}

/// The chain's entry points for one proxy pair.
struct Entry {
    http: SocketAddr,
    http_l7: SocketAddr,
    echo: SocketAddr,
    pids: [u32; 2],
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        is_root(),
        "run as root: the two proxies of a pair run as two uids, which the agent attests"
    );
    anyhow::ensure!(
        !args.policies.is_empty() && args.policies.iter().all(|&n| n >= 1),
        "--policies: counts of at least 1"
    );
    anyhow::ensure!(args.connections >= 1, "--connections: at least 1");
    let envoy = args
        .envoy
        .clone()
        .or_else(envoy_binary)
        .context("Envoy not found: pass --envoy, set CITADEL_ENVOY, or run .ci/run")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("bench.yaml"), policies_yaml(args.policies[0]))?;
    let policies_arg = policies.display().to_string();
    let ca = CaProcess::start(
        &dir.join("ca"),
        &[
            "--policies",
            &policies_arg,
            "--policies-poll-interval",
            "1s",
        ],
    )
    .await?;
    let token = create_join_token(&ca.data_dir, "bench-node", &[WEB, API], "1h")?;
    let entries = format!(
        "entries:\n  - spiffe_id: {WEB}\n    uid: {WEB_UID}\n    labels: {{app: web}}\n  - spiffe_id: {API}\n    uid: {API_UID}\n    labels: {{app: api}}\n"
    );
    let agent = AgentProcess::start(
        &ca,
        &AgentOptions::new(&dir.join("agent"), &entries, Some(&token)),
    )
    .await?;

    let http_app = serve(http_app_conn).await?;
    let echo_app = serve(echo_app_conn).await?;

    // citadel-proxy pair, kept for every policy count (new versions are pushed to it).
    let workers_env = [("TOKIO_WORKER_THREADS", args.workers.to_string())];
    let (api_http, api_http_l7, api_echo) = (free_port(), free_port(), free_port());
    let mut api = CitadelProxyProcess::spawn(
        dir,
        "citadel-api",
        Some(API_UID),
        &agent.socket,
        &[
            "--inbound".to_owned(),
            format!("{api_http}:{}", http_app.port()),
            "--inbound".to_owned(),
            format!("{api_http_l7}:{}:http", http_app.port()),
            "--inbound".to_owned(),
            format!("{api_echo}:{}", echo_app.port()),
        ],
        &workers_env,
    )?;
    let (web_http, web_http_l7, web_echo) = (free_port(), free_port(), free_port());
    let mut web = CitadelProxyProcess::spawn(
        dir,
        "citadel-web",
        Some(WEB_UID),
        &agent.socket,
        &[
            "--outbound".to_owned(),
            format!("{web_http}=127.0.0.1:{api_http},{API}"),
            "--outbound".to_owned(),
            format!("{web_http_l7}=127.0.0.1:{api_http_l7},{API}"),
            "--outbound".to_owned(),
            format!("{web_echo}=127.0.0.1:{api_echo},{API}"),
        ],
        &workers_env,
    )?;
    api.wait_ready(30).await?;
    web.wait_ready(30).await?;
    let citadel = Entry {
        http: loopback(web_http),
        http_l7: loopback(web_http_l7),
        echo: loopback(web_echo),
        pids: [web.pid(), api.pid()],
    };

    let duration = Duration::from_secs(args.duration_secs);
    let mut rows: Vec<(usize, Case, &str, Figures)> = Vec::new();
    for (i, &n) in args.policies.iter().enumerate() {
        let before = api.policy_version().await;
        if i > 0 {
            std::fs::write(policies.join("bench.yaml"), policies_yaml(n))?;
        }
        // Wait for the version carrying n policies (the first is in force from the start).
        let deadline = Instant::now() + Duration::from_secs(60);
        while i > 0 && api.policy_version().await == before {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the proxy did not get the {n}-policy version within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        check_chain(&citadel)
            .await
            .with_context(|| format!("citadel-proxy chain: {}", api.log_text()))?;

        let (envoy_api_http, envoy_api_http_l7, envoy_api_echo) = (
            loopback(free_port()),
            loopback(free_port()),
            loopback(free_port()),
        );
        let principals: Vec<String> = std::iter::once(WEB.to_owned())
            .chain((1..n).map(other_principal))
            .collect();
        let inbound = |name: &str, addr: SocketAddr, cluster: &str| {
            envoy_listener(
                name,
                addr,
                Some(envoy_downstream_mtls()),
                vec![envoy_rbac_allow(&principals), envoy_tcp_proxy(cluster)],
            )
        };
        let mut envoy_api = EnvoyProcess::start_with(
            &envoy,
            dir,
            &agent.socket,
            vec![
                inbound("http-in", envoy_api_http, "http-app"),
                envoy_listener(
                    "http-l7-in",
                    envoy_api_http_l7,
                    Some(envoy_downstream_mtls()),
                    vec![envoy_http_rbac_router(&principals, "http-app")],
                ),
                inbound("echo-in", envoy_api_echo, "echo-app"),
            ],
            vec![
                envoy_cluster("http-app", http_app, None),
                envoy_cluster("echo-app", echo_app, None),
            ],
            &EnvoyOptions {
                name: "envoy-api",
                uid: Some(API_UID),
                concurrency: Some(args.workers),
                log_level: "warn",
            },
        )?;
        let (envoy_web_http, envoy_web_http_l7, envoy_web_echo) = (
            loopback(free_port()),
            loopback(free_port()),
            loopback(free_port()),
        );
        let mut envoy_web = EnvoyProcess::start_with(
            &envoy,
            dir,
            &agent.socket,
            vec![
                envoy_listener(
                    "http-out",
                    envoy_web_http,
                    None,
                    vec![envoy_tcp_proxy("api-http")],
                ),
                envoy_listener(
                    "http-l7-out",
                    envoy_web_http_l7,
                    None,
                    vec![envoy_tcp_proxy("api-http-l7")],
                ),
                envoy_listener(
                    "echo-out",
                    envoy_web_echo,
                    None,
                    vec![envoy_tcp_proxy("api-echo")],
                ),
            ],
            vec![
                envoy_cluster("api-http", envoy_api_http, Some(envoy_upstream_mtls(API))),
                envoy_cluster(
                    "api-http-l7",
                    envoy_api_http_l7,
                    Some(envoy_upstream_mtls(API)),
                ),
                envoy_cluster("api-echo", envoy_api_echo, Some(envoy_upstream_mtls(API))),
            ],
            &EnvoyOptions {
                name: "envoy-web",
                uid: Some(WEB_UID),
                concurrency: Some(args.workers),
                log_level: "warn",
            },
        )?;
        envoy_api.wait_ready(60).await?;
        envoy_web.wait_ready(60).await?;
        let envoys = Entry {
            http: envoy_web_http,
            http_l7: envoy_web_http_l7,
            echo: envoy_web_echo,
            pids: [envoy_web.pid(), envoy_api.pid()],
        };
        check_chain(&envoys)
            .await
            .with_context(|| format!("Envoy chain: {}", envoy_api.log_text()))?;

        for case in Case::all(args.rate, args.connection_rate) {
            for (name, entry) in [("citadel", &citadel), ("envoy", &envoys)] {
                let figures = measure(entry, case, args.connections, duration).await?;
                eprintln!(
                    "{n:>5} policies {:<24} {name:<8} {:>10.0} req/s, p99 {:.3} ms",
                    case.name(),
                    figures.req_per_sec,
                    figures.p99_ms
                );
                rows.push((n, case, name, figures));
            }
        }
    }
    print_report(&args, &rows);
    Ok(())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn other_principal(i: usize) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/caller-{i}")
}

/// STRICT mTLS for the namespace and `n` ALLOW AuthorizationPolicies on api:
/// one for web, the others for principals that never call.
fn policies_yaml(n: usize) -> String {
    let mut out = String::from(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
    );
    for i in 0..n {
        let principal = if i == 0 {
            WEB.to_owned()
        } else {
            other_principal(i)
        };
        out.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-{i}, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  rules:\n  - from: [{{source: {{principals: [{}]}}}}]\n",
            principal.trim_start_matches("spiffe://")
        ));
    }
    out
}

/// Envoy's L7 inbound: an HTTP connection manager with the HTTP RBAC filter
/// (the same ALLOW policies as [`envoy_rbac_allow`], one per principal, decided
/// per request on the peer certificate's URI SAN) and the router to `cluster`.
/// `x-forwarded-client-cert` is sanitized and set (`By`, `URI`) as Istio's
/// sidecar and citadel-proxy's `:http` ports do.
fn envoy_http_rbac_router(principals: &[String], cluster: &str) -> serde_json::Value {
    let rules = envoy_rbac_allow(principals)["typed_config"]["rules"].clone();
    serde_json::json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "inbound_http",
            "codec_type": "AUTO",
            "forward_client_cert_details": "SANITIZE_SET",
            "set_current_client_cert_details": { "uri": true },
            "http_filters": [
                {
                    "name": "envoy.filters.http.rbac",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                        "rules": rules,
                    }
                },
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
                }
            ],
            "route_config": {
                "name": "inbound",
                "virtual_hosts": [{
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": cluster } }]
                }]
            }
        }
    })
}

/// Accepts on a loopback port and runs `conn` on each connection.
async fn serve<F, Fut>(conn: F) -> anyhow::Result<SocketAddr>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(conn(s));
        }
    });
    Ok(addr)
}

/// The HTTP application: a fixed 200 for each request head, kept alive.
async fn http_app_conn(mut s: TcpStream) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = find_head_end(&buf) {
            buf.drain(..end);
            if s.write_all(HTTP_RESPONSE).await.is_err() {
                return;
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
}

/// The echo application.
async fn echo_app_conn(mut s: TcpStream) {
    let (mut r, mut w) = s.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// One request on a kept-alive connection; the response must be the app's.
async fn round_trip(s: &mut TcpStream, load: Load, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let (request, expected): (&[u8], &[u8]) = match load {
        Load::HttpL7 => return http_round_trip(s, buf).await,
        Load::Http => (HTTP_REQUEST, HTTP_RESPONSE),
        Load::Echo | Load::EchoNewConnection => (&[0x5a; ECHO_BYTES], &[0x5a; ECHO_BYTES]),
    };
    s.write_all(request).await?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    while buf.len() < expected.len() {
        let k = s.read(&mut chunk).await?;
        anyhow::ensure!(k > 0, "closed after {} bytes", buf.len());
        buf.extend_from_slice(&chunk[..k]);
    }
    anyhow::ensure!(buf.as_slice() == expected, "unexpected response");
    Ok(())
}

/// One request through an L7 proxy, whose response head differs from the
/// app's (header case, `date`, `server`, …): it must be a 200 with the app's
/// body, framed by `Content-Length` or chunked.
async fn http_round_trip(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    s.write_all(HTTP_REQUEST).await?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    let mut head: Option<(usize, Option<usize>)> = None;
    loop {
        if head.is_none()
            && let Some(end) = find_head_end(buf)
        {
            let text = std::str::from_utf8(&buf[..end]).context("response head")?;
            anyhow::ensure!(
                text.starts_with("HTTP/1.1 200 "),
                "unexpected response: {}",
                text.lines().next().unwrap_or_default()
            );
            let length = text.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                if name.eq_ignore_ascii_case("content-length") {
                    value.trim().parse::<usize>().ok()
                } else {
                    None
                }
            });
            head = Some((end, length));
        }
        match head {
            Some((end, Some(length))) if buf.len() >= end + length => {
                anyhow::ensure!(&buf[end..end + length] == b"ok", "unexpected body");
                return Ok(());
            }
            Some((end, None)) if buf[end..].ends_with(b"0\r\n\r\n") => {
                anyhow::ensure!(&buf[end..] == b"2\r\nok\r\n0\r\n\r\n", "unexpected body");
                return Ok(());
            }
            _ => {}
        }
        let k = s.read(&mut chunk).await?;
        anyhow::ensure!(k > 0, "closed after {} bytes", buf.len());
        buf.extend_from_slice(&chunk[..k]);
    }
}

async fn check_chain(entry: &Entry) -> anyhow::Result<()> {
    for (addr, load) in [
        (entry.http, Load::Http),
        (entry.http_l7, Load::HttpL7),
        (entry.echo, Load::Echo),
    ] {
        let mut s = TcpStream::connect(addr).await?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), round_trip(&mut s, load, &mut buf))
            .await
            .with_context(|| format!("{} through {addr}: no answer", load.name()))?
            .with_context(|| format!("{} through {addr}", load.name()))?;
        // An L7 inbound writes its own response head (hyper's `date`, Envoy's
        // `server`, …): the app's bytes unchanged would mean an L4 path.
        anyhow::ensure!(
            load != Load::HttpL7 || buf != HTTP_RESPONSE,
            "{} through {addr}: the response head is the app's, unchanged: not an L7 inbound",
            load.name()
        );
    }
    Ok(())
}

/// utime + stime of `pid` in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("/proc/pid/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / hz.max(1) as f64)
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    Ok(kib / 1024.0)
}

async fn measure(
    entry: &Entry,
    case: Case,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let load = case.load;
    // Each connection's gap between scheduled requests, when paced.
    let gap = case
        .rate
        .map(|r| Duration::from_secs_f64(connections as f64 / f64::from(r.max(1))));
    let addr = match load {
        Load::Http => entry.http,
        Load::HttpL7 => entry.http_l7,
        Load::Echo | Load::EchoNewConnection => entry.echo,
    };
    // Open (and handshake) every kept-alive connection before the clock starts.
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        if load == Load::EchoNewConnection {
            streams.push(None);
            continue;
        }
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        round_trip(&mut s, load, &mut Vec::new()).await?;
        streams.push(Some(s));
    }
    let cpu_before: f64 = entry
        .pids
        .iter()
        .map(|&p| cpu_seconds(p))
        .sum::<anyhow::Result<f64>>()?;
    let start = Instant::now();
    let end = start + duration;
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            // Paced connections start staggered across one gap.
            let first = gap.map(|g| start + g.mul_f64(i as f64 / connections as f64));
            tokio::spawn(async move {
                let mut latencies_us: Vec<u32> = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                let mut buf = Vec::with_capacity(256);
                let mut scheduled = first;
                while Instant::now() < end {
                    if let (Some(at), Some(g)) = (scheduled, gap) {
                        tokio::time::sleep_until(at.into()).await;
                        scheduled = Some(at + g);
                    }
                    // From the send: the timer's millisecond granularity would
                    // otherwise dominate at these latencies.
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    let done = match s.as_mut() {
                        Some(s) => round_trip(s, load, &mut buf).await,
                        None => {
                            async {
                                let mut fresh = TcpStream::connect(addr).await?;
                                fresh.set_nodelay(true)?;
                                round_trip(&mut fresh, load, &mut buf).await
                            }
                            .await
                        }
                    };
                    if done.is_err() {
                        errors += 1;
                        break;
                    }
                    latencies_us.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                (latencies_us, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_after: f64 = entry
        .pids
        .iter()
        .map(|&p| cpu_seconds(p))
        .sum::<anyhow::Result<f64>>()?;
    let rss: f64 = entry
        .pids
        .iter()
        .map(|&p| rss_mib(p))
        .sum::<anyhow::Result<f64>>()?;
    latencies.sort_unstable();
    let pct = |q: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[i]) / 1000.0
    };
    let requests = latencies.len() as u64;
    Ok(Figures {
        requests,
        errors,
        req_per_sec: requests as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        rss_mib: rss,
        cpu_s_per_10k: if requests == 0 {
            f64::NAN
        } else {
            (cpu_after - cpu_before) / requests as f64 * 10_000.0
        },
    })
}

fn print_report(args: &Args, rows: &[(usize, Case, &str, Figures)]) {
    println!(
        "citadel-proxy vs Envoy: {} connections, {} s per case, {} worker threads per proxy; \
         RSS and CPU are the sums over both proxies of a pair",
        args.connections, args.duration_secs, args.workers
    );
    println!(
        "\"max\": every connection sends as soon as it is answered; \"@R/s\": paced at R requests/s in total \
         (fixed schedule per connection, latency from each send)"
    );
    println!(
        "{:>8} {:<24} {:<8} {:>10} {:>8} {:>9} {:>9} {:>9} {:>10} {:>7}",
        "policies",
        "load",
        "proxy",
        "req/s",
        "p50 ms",
        "p99 ms",
        "RSS MiB",
        "CPU s/10k",
        "requests",
        "errors"
    );
    for (n, case, name, f) in rows {
        println!(
            "{:>8} {:<24} {:<8} {:>10.0} {:>8.3} {:>9.3} {:>9.1} {:>9.3} {:>10} {:>7}",
            n,
            case.name(),
            name,
            f.req_per_sec,
            f.p50_ms,
            f.p99_ms,
            f.rss_mib,
            f.cpu_s_per_10k,
            f.requests,
            f.errors
        );
    }
    println!();
    println!("ratios citadel/envoy (req/s: higher is better; p99, RSS, CPU: lower is better)");
    println!(
        "{:>8} {:<24} {:>8} {:>8} {:>8} {:>8}",
        "policies", "load", "req/s", "p99", "RSS", "CPU"
    );
    let find = |n: usize, case: Case, name: &str| {
        rows.iter()
            .find(|(rn, rc, rname, _)| *rn == n && *rc == case && *rname == name)
            .map(|r| &r.3)
    };
    for &n in &args.policies {
        for case in Case::all(args.rate, args.connection_rate) {
            if let (Some(c), Some(e)) = (find(n, case, "citadel"), find(n, case, "envoy")) {
                println!(
                    "{:>8} {:<24} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                    n,
                    case.name(),
                    c.req_per_sec / e.req_per_sec,
                    c.p99_ms / e.p99_ms,
                    c.rss_mib / e.rss_mib,
                    c.cpu_s_per_10k / e.cpu_s_per_10k
                );
            }
        }
    }
    if let (Some(&first), Some(&last)) = (args.policies.first(), args.policies.last())
        && first != last
    {
        println!();
        println!("citadel-proxy with {last} policies relative to {first} (change in %)");
        for case in Case::all(args.rate, args.connection_rate) {
            if let (Some(a), Some(b)) = (find(first, case, "citadel"), find(last, case, "citadel"))
            {
                let change = |x: f64, y: f64| (y / x - 1.0) * 100.0;
                println!(
                    "{:<24} req/s {:+.1}%  p99 {:+.1}%  CPU/10k {:+.1}%",
                    case.name(),
                    change(a.req_per_sec, b.req_per_sec),
                    change(a.p99_ms, b.p99_ms),
                    change(a.cpu_s_per_10k, b.cpu_s_per_10k)
                );
            }
        }
    }
}
