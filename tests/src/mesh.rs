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
    /// The mTLS listener.
    pub listener: SocketAddr,
}

impl EnvoyProcess {
    /// Starts Envoy with an mTLS listener whose certificate (`default`) and
    /// validation context (`ROOTCA`) come over SDS from the agent at
    /// `agent_socket`, answering 200 "ok" to every request.
    pub fn start(envoy: &Path, dir: &Path, agent_socket: &Path) -> anyhow::Result<EnvoyProcess> {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let listener: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let sds = |name: &str| {
            format!(
                r#"name: {name}
              sds_config:
                resource_api_version: V3
                initial_fetch_timeout: 20s
                api_config_source:
                  api_type: GRPC
                  transport_api_version: V3
                  grpc_services:
                  - envoy_grpc: {{ cluster_name: sds-grpc }}"#
            )
        };
        let config = format!(
            r#"node: {{ id: envoy-e2e, cluster: e2e }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  clusters:
  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: sds-grpc
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ pipe: {{ path: {socket} }} }} }}
  listeners:
  - name: mtls
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen_port} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - {default_sds}
            validation_context_sds_secret_config:
              {rootca_sds}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "ok" }} }}
"#,
            admin_port = admin.port(),
            listen_port = listener.port(),
            socket = agent_socket.display(),
            default_sds = sds("default"),
            rootca_sds = sds("ROOTCA"),
        );
        let path = dir.join("envoy.yaml");
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(dir.join("envoy.log"))?;
        let child = Command::new(envoy)
            .arg("-c")
            .arg(&path)
            .arg("--use-dynamic-base-id")
            .arg("-l")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning envoy")?;
        Ok(EnvoyProcess {
            child,
            admin,
            listener,
        })
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
