//! Runners for the node agent and for a real Envoy, beside a CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::process::{CaProcess, binary, citadel, free_port, http_get};

/// `citadel token create` on the CA's data dir: the token.
pub fn create_join_token(
    ca_data_dir: &Path,
    node: &str,
    allow: &[&str],
    ttl: &str,
) -> anyhow::Result<String> {
    let dir = ca_data_dir.to_string_lossy().into_owned();
    let mut args = vec![
        "token",
        "create",
        "--data-dir",
        dir.as_str(),
        "--node",
        node,
        "--ttl",
        ttl,
    ];
    for a in allow {
        args.push("--allow");
        args.push(a);
    }
    let out = citadel(&args)?;
    anyhow::ensure!(
        out.status.success(),
        "token create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_owned();
    anyhow::ensure!(
        !token.is_empty() && !token.contains('\n'),
        "token create printed more than a token"
    );
    Ok(token)
}

/// A `citadel-agent run` child process.
pub struct AgentProcess {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
    /// Its metrics/health address.
    pub http_addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its log (stderr).
    pub log: PathBuf,
}

/// How to start an agent.
pub struct AgentOptions<'a> {
    /// Directory for the socket, data dir and entries file.
    pub dir: &'a Path,
    /// Entries YAML.
    pub entries_yaml: &'a str,
    /// Join token (given through the environment).
    pub join_token: Option<&'a str>,
    /// Extra flags.
    pub extra: &'a [&'a str],
}

impl<'a> AgentOptions<'a> {
    /// Options with no extra flags.
    pub fn new(dir: &'a Path, entries_yaml: &'a str, join_token: Option<&'a str>) -> Self {
        AgentOptions {
            dir,
            entries_yaml,
            join_token,
            extra: &[],
        }
    }
}

impl AgentProcess {
    /// Spawns the agent against `ca` without waiting for readiness; creates
    /// `opts.dir` if needed.
    pub fn spawn(
        ca_addr: SocketAddr,
        bundle_file: &Path,
        opts: &AgentOptions<'_>,
    ) -> anyhow::Result<AgentProcess> {
        std::fs::create_dir_all(opts.dir)?;
        let socket = opts.dir.join("agent.sock");
        let entries = opts.dir.join("entries.yaml");
        std::fs::write(&entries, opts.entries_yaml)?;
        let data_dir = opts.dir.join("agent-data");
        let http_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut cmd = Command::new(binary("citadel-agent"));
        cmd.arg("run")
            .arg("--ca")
            .arg(ca_addr.to_string())
            .arg("--ca-bundle")
            .arg(bundle_file)
            .arg("--socket")
            .arg(&socket)
            .arg("--entries")
            .arg(&entries)
            .arg("--entries-poll")
            .arg("200ms")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--http-listen")
            .arg(http_addr.to_string())
            .args(opts.extra)
            .env_remove("CITADEL_JOIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(opts.dir.join("agent.log"))?);
        if let Some(t) = opts.join_token {
            cmd.env("CITADEL_JOIN_TOKEN", t);
        }
        let child = cmd.spawn().context("spawning citadel-agent")?;
        Ok(AgentProcess {
            child,
            log: opts.dir.join("agent.log"),
            socket,
            http_addr,
            data_dir,
        })
    }

    /// Spawns the agent and waits until `/readyz` answers 200 (bundle loaded).
    pub async fn start(ca: &CaProcess, opts: &AgentOptions<'_>) -> anyhow::Result<AgentProcess> {
        let bundle = ca.data_dir.join("bundle.pem");
        let mut agent = Self::spawn(ca.grpc_addr, &bundle, opts)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = agent.child.try_wait()? {
                let stderr = agent.stderr_text();
                anyhow::bail!("citadel-agent exited early ({status}): {stderr}");
            }
            if let Ok((200, _)) = http_get(agent.http_addr, "/readyz").await
                && agent.socket.exists()
            {
                return Ok(agent);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "citadel-agent not ready after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the process to exit (up to `secs`) and returns its status
    /// and stderr.
    pub async fn wait_exit(
        &mut self,
        secs: u64,
    ) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, self.stderr_text()));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "citadel-agent still running after {secs} s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stderr_text(&mut self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`-USR1`, `-TERM`, …).
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()?
            .success();
        anyhow::ensure!(ok, "kill {sig} failed");
        Ok(())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(http_get(self.http_addr, "/metrics").await?.1)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The Envoy binary (the real executable, not the Python shim): `CITADEL_ENVOY`,
/// else `.venv-tools` at the workspace root (made by `.ci/run`), else `envoy` on
/// `PATH`. `None` when there is none.
pub fn envoy_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CITADEL_ENVOY") {
        return Some(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .to_path_buf();
    if let Ok(entries) = std::fs::read_dir(root.join(".venv-tools/lib")) {
        for e in entries.flatten() {
            let candidate = e.path().join("site-packages/envoy/_bin/envoy");
            if candidate.exists() {
                return Some(candidate);
            }
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("envoy"))
            .find(|p| p.exists())
    })
}

/// A running Envoy.
pub struct EnvoyProcess {
    child: Child,
    /// Admin address.
    pub admin: SocketAddr,
    /// The first listener's address.
    pub listener: SocketAddr,
    /// Its log (stderr).
    pub log: PathBuf,
}

/// How to run an Envoy beyond its listeners and clusters.
#[derive(Clone, Debug)]
pub struct EnvoyOptions<'a> {
    /// Names the config and log files (`<name>.json`, `<name>.log`) in the directory.
    pub name: &'a str,
    /// Run as this uid and gid (needs root); the agent attests the process by it.
    pub uid: Option<u32>,
    /// `--concurrency` (worker threads); Envoy's default otherwise.
    pub concurrency: Option<u32>,
    /// `-l` log level.
    pub log_level: &'a str,
}

impl Default for EnvoyOptions<'_> {
    fn default() -> Self {
        EnvoyOptions {
            name: "envoy",
            uid: None,
            concurrency: None,
            log_level: "info",
        }
    }
}

/// An SDS secret config naming `name` (`default`, `ROOTCA`), fetched from the
/// agent through the `sds-grpc` cluster every [`EnvoyProcess::start_with`] config has.
pub fn envoy_sds_secret(name: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "initial_fetch_timeout": "20s",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "sds-grpc" } }]
            }
        }
    })
}

fn envoy_tls_context(validation: (&str, serde_json::Value)) -> serde_json::Value {
    let mut ctx = serde_json::json!({
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificate_sds_secret_configs": [envoy_sds_secret("default")],
    });
    ctx[validation.0] = validation.1;
    ctx
}

/// A listener transport socket: TLS 1.3 with `default` as the server
/// certificate, client certificates required and verified against `ROOTCA`.
pub fn envoy_downstream_mtls() -> serde_json::Value {
    serde_json::json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": envoy_tls_context(
                ("validation_context_sds_secret_config", envoy_sds_secret("ROOTCA"))
            ),
        }
    })
}

/// A cluster transport socket: TLS 1.3 with `default` as the client
/// certificate, the server verified against `ROOTCA` and required to carry the
/// URI SAN `expected_spiffe_id` (secure naming). It offers the ALPN values of
/// an Istio sidecar's TCP cluster (`istio-peer-exchange`, `istio`), so a
/// PERMISSIVE server knows it for a mesh client.
pub fn envoy_upstream_mtls(expected_spiffe_id: &str) -> serde_json::Value {
    let validation = serde_json::json!({
        "default_validation_context": {
            "match_typed_subject_alt_names": [
                { "san_type": "URI", "matcher": { "exact": expected_spiffe_id } }
            ]
        },
        "validation_context_sds_secret_config": envoy_sds_secret("ROOTCA"),
    });
    let mut upstream_ctx = envoy_tls_context(("combined_validation_context", validation));
    upstream_ctx["alpn_protocols"] = serde_json::json!(["istio-peer-exchange", "istio"]);
    serde_json::json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": upstream_ctx,
        }
    })
}

/// A `tcp_proxy` network filter to `cluster`.
pub fn envoy_tcp_proxy(cluster: &str) -> serde_json::Value {
    serde_json::json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster,
            "cluster": cluster,
        }
    })
}

/// An RBAC network filter that allows only connections whose verified peer
/// certificate carries one of `principals` (SPIFFE IDs), one Envoy policy each,
/// as Istio translates one ALLOW AuthorizationPolicy per principal.
pub fn envoy_rbac_allow(principals: &[String]) -> serde_json::Value {
    let policies: serde_json::Map<String, serde_json::Value> = principals
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                format!("allow-{i}"),
                serde_json::json!({
                    "permissions": [{ "any": true }],
                    "principals": [{ "authenticated": { "principal_name": { "exact": p } } }],
                }),
            )
        })
        .collect();
    serde_json::json!({
        "name": "envoy.filters.network.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
            "stat_prefix": "rbac",
            "rules": { "action": "ALLOW", "policies": policies },
        }
    })
}

/// A listener on `addr` with one filter chain.
pub fn envoy_listener(
    name: &str,
    addr: SocketAddr,
    transport_socket: Option<serde_json::Value>,
    filters: Vec<serde_json::Value>,
) -> serde_json::Value {
    let mut chain = serde_json::json!({ "filters": filters });
    if let Some(ts) = transport_socket {
        chain["transport_socket"] = ts;
    }
    serde_json::json!({
        "name": name,
        "address": { "socket_address": { "address": addr.ip().to_string(), "port_value": addr.port() } },
        "filter_chains": [chain],
    })
}

/// A static cluster of one endpoint.
pub fn envoy_cluster(
    name: &str,
    addr: SocketAddr,
    transport_socket: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut c = serde_json::json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": addr.ip().to_string(), "port_value": addr.port() }
            } } }] }]
        }
    });
    if let Some(ts) = transport_socket {
        c["transport_socket"] = ts;
    }
    c
}

impl EnvoyProcess {
    /// Starts Envoy with an mTLS listener whose certificate (`default`) and
    /// validation context (`ROOTCA`) come over SDS from the agent at
    /// `agent_socket`, answering 200 "ok" to every request.
    pub fn start(envoy: &Path, dir: &Path, agent_socket: &Path) -> anyhow::Result<EnvoyProcess> {
        let listener: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let hcm = serde_json::json!({
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "ingress",
                "codec_type": "AUTO",
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
                }],
                "route_config": {
                    "name": "local",
                    "virtual_hosts": [{
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{
                            "match": { "prefix": "/" },
                            "direct_response": { "status": 200, "body": { "inline_string": "ok" } }
                        }]
                    }]
                }
            }
        });
        let listeners = vec![envoy_listener(
            "mtls",
            listener,
            Some(envoy_downstream_mtls()),
            vec![hcm],
        )];
        Self::start_with(
            envoy,
            dir,
            agent_socket,
            listeners,
            Vec::new(),
            &EnvoyOptions::default(),
        )
    }

    /// Starts Envoy with `listeners` and `clusters` (built with the `envoy_*`
    /// helpers) plus the `sds-grpc` cluster to the agent at `agent_socket`, an
    /// admin listener on a free loopback port, and hot restart disabled (so any
    /// number of Envoys, under any uid, can run side by side). `listener` is the
    /// first listener's address.
    pub fn start_with(
        envoy: &Path,
        dir: &Path,
        agent_socket: &Path,
        listeners: Vec<serde_json::Value>,
        mut clusters: Vec<serde_json::Value>,
        opts: &EnvoyOptions<'_>,
    ) -> anyhow::Result<EnvoyProcess> {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let first =
            &listeners.first().context("an Envoy needs a listener")?["address"]["socket_address"];
        let listener = SocketAddr::new(
            first["address"]
                .as_str()
                .context("listener address")?
                .parse()?,
            u16::try_from(first["port_value"].as_u64().context("listener port")?)?,
        );
        clusters.push(serde_json::json!({
            "name": "sds-grpc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": { "http2_protocol_options": {} }
                }
            },
            "load_assignment": {
                "cluster_name": "sds-grpc",
                "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                    "pipe": { "path": agent_socket.display().to_string() }
                } } }] }]
            }
        }));
        let config = serde_json::json!({
            "node": { "id": opts.name, "cluster": "e2e" },
            "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": admin.port() } } },
            "static_resources": { "listeners": listeners, "clusters": clusters },
        });
        let path = dir.join(format!("{}.json", opts.name));
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        let log = dir.join(format!("{}.log", opts.name));
        let mut cmd = Command::new(envoy);
        cmd.arg("-c")
            .arg(&path)
            .arg("--disable-hot-restart")
            .arg("-l")
            .arg(opts.log_level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        if let Some(n) = opts.concurrency {
            cmd.arg("--concurrency").arg(n.to_string());
        }
        if let Some(uid) = opts.uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        let child = cmd.spawn().context("spawning envoy")?;
        Ok(EnvoyProcess {
            child,
            admin,
            listener,
            log,
        })
    }

    /// Waits (up to `secs`) until Envoy is live with every listener and
    /// cluster warmed, that is, until it holds its SDS secrets.
    pub async fn wait_ready(&mut self, secs: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("envoy exited ({status}): {}", self.log_text());
            }
            if let Ok((200, _)) = self.admin_get("/ready").await
                && self.stat("listener_manager.total_listeners_warming").await == Some(0)
                && self.stat("cluster_manager.warming_clusters").await == Some(0)
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "envoy not ready after {secs} s: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET path` on the admin listener: (status, body). Envoy's admin speaks
    /// HTTP/1.1 only (it refuses HTTP/1.0), so a real client asks.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let resp = reqwest::get(format!("http://{}{path}", self.admin)).await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    /// One counter or gauge from `/stats` (`None` when Envoy does not report it).
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let (_, text) = self
            .admin_get(&format!("/stats?filter=^{name}$"))
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.parse().ok())
    }

    /// `GET /certs` from the admin endpoint, parsed.
    pub async fn certs(&self) -> anyhow::Result<serde_json::Value> {
        // Envoy's admin answers HTTP/1.1 (chunked); a real client reads it.
        let resp = reqwest::get(format!("http://{}/certs", self.admin)).await?;
        anyhow::ensure!(resp.status() == 200, "/certs answered {}", resp.status());
        Ok(resp.json().await?)
    }

    /// The (uri SAN, serial) pairs of the serving certificate chain Envoy holds.
    pub async fn serving_certs(&self) -> Vec<(String, String)> {
        let Ok(v) = self.certs().await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for c in v["certificates"].as_array().into_iter().flatten() {
            for cert in c["cert_chain"].as_array().into_iter().flatten() {
                let uri = cert["subject_alt_names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|s| s["uri"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                let serial = cert["serial_number"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                out.push((uri, serial));
            }
        }
        out
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `citadel-proxy run` child process.
pub struct CitadelProxyProcess {
    child: Child,
    /// Its admin address.
    pub admin: SocketAddr,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl CitadelProxyProcess {
    /// Spawns `citadel-proxy run --agent-socket SOCKET --admin <free port> LISTENERS…`
    /// (the binary next to this executable), as
    /// `uid` when given, logging at `info` to `<dir>/<name>.log`, with `env` added.
    pub fn spawn(
        dir: &Path,
        name: &str,
        uid: Option<u32>,
        agent_socket: &Path,
        listeners: &[String],
        env: &[(&str, String)],
    ) -> anyhow::Result<CitadelProxyProcess> {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(binary("citadel-proxy"));
        cmd.arg("run")
            .arg("--agent-socket")
            .arg(agent_socket)
            .arg("--admin")
            .arg(admin.to_string())
            .args(listeners)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        let child = cmd.spawn().context("spawning citadel-proxy")?;
        Ok(CitadelProxyProcess { child, admin, log })
    }

    /// As [`Self::spawn`], inside network namespace `ns` (its admin port is
    /// on that namespace's loopback: use [`Self::wait_ready_in`], [`Self::metrics_in`]).
    pub fn spawn_in(
        ns: &str,
        dir: &Path,
        name: &str,
        uid: Option<u32>,
        agent_socket: &Path,
        args: &[String],
    ) -> anyhow::Result<CitadelProxyProcess> {
        crate::netns::in_netns(ns, || Self::spawn(dir, name, uid, agent_socket, args, &[]))?
    }

    /// Waits (up to `secs`, blocking) for `/healthz/ready` inside `ns` to answer 200.
    pub fn wait_ready_in(&mut self, ns: &str, secs: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("citadel-proxy exited ({status}): {}", self.log_text());
            }
            if let Ok((200, _)) = crate::netns::http_get_in(ns, self.admin, "/healthz/ready") {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "citadel-proxy not ready after {secs} s: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET /metrics` inside `ns` (blocking).
    pub fn metrics_in(&self, ns: &str) -> anyhow::Result<String> {
        Ok(crate::netns::http_get_in(ns, self.admin, "/metrics")?.1)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (up to `secs`) for `/healthz/ready` to answer 200.
    pub async fn wait_ready(&mut self, secs: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("citadel-proxy exited ({status}): {}", self.log_text());
            }
            if let Ok((200, _)) = http_get(self.admin, "/healthz/ready").await {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "citadel-proxy not ready after {secs} s: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(http_get(self.admin, "/metrics").await?.1)
    }

    /// The policy version in force (from `/metrics`), if any.
    pub async fn policy_version(&self) -> Option<String> {
        let metrics = self.metrics().await.ok()?;
        metrics.lines().filter(|l| l.ends_with(" 1")).find_map(|l| {
            let rest = l.strip_prefix("citadel_proxy_policy_version_info{version=\"")?;
            Some(rest.split('"').next()?.to_owned())
        })
    }
}

impl Drop for CitadelProxyProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Istio YAML for namespace `shop`: an AuthorizationPolicy `api-allow-SA` on
/// app=api allowing principal `cluster.local/ns/shop/sa/SA`, and STRICT mTLS.
pub fn allow_sa_to_api_strict(sa: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-allow-{sa}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/{sa}]}}}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: strict, namespace: shop}}
spec: {{mtls: {{mode: STRICT}}}}
"
    )
}

/// Istio YAML for namespace `shop`: an AuthorizationPolicy `api-deny-SA` on app=api
/// denying principal `cluster.local/ns/shop/sa/SA`.
pub fn deny_sa_to_api(sa: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-deny-{sa}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: DENY
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/{sa}]}}}}]
"
    )
}

/// Writes `yaml` as `<dir>/policies/<file>` and starts the CA on `<dir>/ca` with
/// `--policies <dir>/policies` and `extra`; the CA and the policies directory.
pub async fn start_ca_with_policies(
    dir: &Path,
    file: &str,
    yaml: &str,
    extra: &[&str],
) -> anyhow::Result<(CaProcess, PathBuf)> {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join(file), yaml)?;
    let policies_arg = policies.display().to_string();
    let mut args = vec!["--policies", policies_arg.as_str()];
    args.extend_from_slice(extra);
    let ca = CaProcess::start(&dir.join("ca"), &args).await?;
    Ok((ca, policies))
}

/// A TCP application on 127.0.0.1 that echoes every byte; its address.
pub async fn echo_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The SPIFFE ID [`TwoProxies`] gives the web workload.
pub const MESH_WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
/// The SPIFFE ID [`TwoProxies`] gives the api workload.
pub const MESH_API: &str = "spiffe://cluster.local/ns/shop/sa/api";
/// The uid [`TwoProxies`] runs web's proxy as.
pub const MESH_WEB_UID: u32 = 61001;
/// The uid [`TwoProxies`] runs api's proxy as.
pub const MESH_API_UID: u32 = 61002;

/// Whether this process runs as root (needed to run proxies as other uids).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The agent's entries YAML mapping [`MESH_WEB_UID`] to `shop/web` (app=web) and
/// [`MESH_API_UID`] to `shop/api` (app=api).
pub fn web_api_entries() -> String {
    format!(
        "entries:\n  - spiffe_id: {MESH_WEB}\n    uid: {MESH_WEB_UID}\n    labels: {{app: web}}\n  - spiffe_id: {MESH_API}\n    uid: {MESH_API_UID}\n    labels: {{app: api}}\n"
    )
}

/// The CA (with `policy_yaml` as `policy_file` in its `--policies` directory, and
/// `ca_extra` flags), a join token for web and api, the agent mapping
/// [`MESH_WEB_UID`] to `shop/web` and [`MESH_API_UID`] to `shop/api`, and a proxy
/// run as each uid: for each api inbound `PORT:APP_PORT[:PROTO]` spec, api's inbound
/// on a free port and one outbound of web's to it expecting [`MESH_API`]; both ready.
pub struct TwoProxies {
    /// Web's proxy (outbounds only).
    pub web: CitadelProxyProcess,
    /// Api's proxy (inbounds only).
    pub api: CitadelProxyProcess,
    /// Api's first inbound port.
    pub api_in: u16,
    /// Web's first outbound port (to `api_in`).
    pub web_out: u16,
    /// Api's inbound ports, in the order of the specs.
    pub api_ins: Vec<u16>,
    /// Web's outbound ports, `web_outs[i]` to `api_ins[i]`.
    pub web_outs: Vec<u16>,
    /// The CA's policies directory.
    pub policies: PathBuf,
    /// The agent.
    pub agent: AgentProcess,
    /// The CA.
    pub ca: CaProcess,
    /// Holds every file.
    pub tmp: tempfile::TempDir,
}

impl TwoProxies {
    /// As [`Self::start_with`] with one api inbound `<free port>:<api_inbound>`.
    pub async fn start(
        policy_file: &str,
        policy_yaml: &str,
        ca_extra: &[&str],
        api_inbound: &str,
    ) -> TwoProxies {
        Self::start_with(policy_file, policy_yaml, ca_extra, &[api_inbound]).await
    }

    /// Starts the CA, the agent and both proxies; api listens on a free port for
    /// each `APP_PORT[:PROTO]` in `api_inbounds`. Panics on failure.
    pub async fn start_with(
        policy_file: &str,
        policy_yaml: &str,
        ca_extra: &[&str],
        api_inbounds: &[&str],
    ) -> TwoProxies {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        // The proxies run as other uids: they must reach the agent socket's directory.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (ca, policies) = start_ca_with_policies(tmp.path(), policy_file, policy_yaml, ca_extra)
            .await
            .unwrap();
        let token =
            create_join_token(&ca.data_dir, "node-a", &[MESH_WEB, MESH_API], "10m").unwrap();
        let entries = web_api_entries();
        let dir = tmp.path().join("agent");
        let agent = AgentProcess::start(&ca, &AgentOptions::new(&dir, &entries, Some(&token)))
            .await
            .unwrap();

        let api_ins: Vec<u16> = api_inbounds.iter().map(|_| free_port()).collect();
        let web_outs: Vec<u16> = api_inbounds.iter().map(|_| free_port()).collect();
        let mut api_flags = Vec::new();
        let mut web_flags = Vec::new();
        for ((spec, api_in), web_out) in api_inbounds.iter().zip(&api_ins).zip(&web_outs) {
            api_flags.push("--inbound".to_owned());
            api_flags.push(format!("{api_in}:{spec}"));
            web_flags.push("--outbound".to_owned());
            web_flags.push(format!("{web_out}=127.0.0.1:{api_in},{MESH_API}"));
        }
        let mut api = CitadelProxyProcess::spawn(
            tmp.path(),
            "api",
            Some(MESH_API_UID),
            &agent.socket,
            &api_flags,
            &[],
        )
        .unwrap();
        let mut web = CitadelProxyProcess::spawn(
            tmp.path(),
            "web",
            Some(MESH_WEB_UID),
            &agent.socket,
            &web_flags,
            &[],
        )
        .unwrap();
        api.wait_ready(30).await.unwrap();
        web.wait_ready(30).await.unwrap();
        TwoProxies {
            web,
            api,
            api_in: api_ins[0],
            web_out: web_outs[0],
            api_ins,
            web_outs,
            policies,
            agent,
            ca,
            tmp,
        }
    }

    /// Both proxies' logs (for failure messages).
    pub fn logs(&self) -> String {
        format!(
            "api:\n{}\nweb:\n{}",
            self.api.log_text(),
            self.web.log_text()
        )
    }
}
