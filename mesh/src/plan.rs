//! What `up` starts, decided without touching anything: the identities, the
//! agent's entries, the sample policies, each process's command line and the
//! commands printed for the user.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::Layout;

/// The trust domain of the sample mesh (the CA's default).
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The namespace of both sample services.
pub const NAMESPACE: &str = "demo";
/// The join token's node name.
pub const NODE_NAME: &str = "citadel-mesh-node";
/// How often the CA re-reads the policy directory (its smallest setting).
pub const POLICY_POLL_SECS: u64 = 1;
/// The path the sample AuthorizationPolicy allows.
pub const ALLOWED_PATH: &str = "/api/hello";
/// A path it does not allow.
pub const DENIED_PATH: &str = "/admin";
/// The uid frontend runs as when `up` runs as root; backend gets the next.
/// Numeric uids without passwd entries are enough: the kernel reports them
/// to the agent, and nothing the services touch needs a name.
pub const FIRST_UID: u32 = 61501;

/// One of the two sample services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    /// Takes calls from the user and relays them to backend.
    Frontend,
    /// Answers, naming the caller's identity.
    Backend,
}

impl Service {
    /// Both, in start order (backend first: frontend calls it).
    pub const ALL: [Service; 2] = [Service::Backend, Service::Frontend];

    /// `frontend` or `backend`: the service account and the `app` label.
    pub fn name(self) -> &'static str {
        match self {
            Service::Frontend => "frontend",
            Service::Backend => "backend",
        }
    }

    /// `spiffe://cluster.local/ns/demo/sa/<name>`.
    pub fn spiffe_id(self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{}", self.name())
    }

    /// The principal policies name it by (the SPIFFE ID without the scheme).
    pub fn principal(self) -> String {
        format!("{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{}", self.name())
    }
}

/// Every port of the mesh, all on loopback except the proxies' inbound
/// listeners (citadel-proxy binds those on 0.0.0.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    /// The CA's CSR API (gRPC over TLS).
    pub ca_grpc: u16,
    /// The CA's `/readyz` and `/metrics`.
    pub ca_http: u16,
    /// The agent's `/readyz` and `/metrics`.
    pub agent_http: u16,
    /// The frontend application.
    pub frontend_app: u16,
    /// Frontend's proxy inbound (the user calls this).
    pub frontend_inbound: u16,
    /// Frontend's proxy outbound to backend (the frontend application calls this).
    pub frontend_outbound: u16,
    /// Frontend's proxy admin.
    pub frontend_admin: u16,
    /// The backend application.
    pub backend_app: u16,
    /// Backend's proxy inbound.
    pub backend_inbound: u16,
    /// Backend's proxy admin.
    pub backend_admin: u16,
}

impl Ports {
    /// Every port, in field order.
    pub fn all(&self) -> [u16; 10] {
        [
            self.ca_grpc,
            self.ca_http,
            self.agent_http,
            self.frontend_app,
            self.frontend_inbound,
            self.frontend_outbound,
            self.frontend_admin,
            self.backend_app,
            self.backend_inbound,
            self.backend_admin,
        ]
    }

    /// Builds ports from ten values in field order.
    pub fn from_array(p: [u16; 10]) -> Ports {
        Ports {
            ca_grpc: p[0],
            ca_http: p[1],
            agent_http: p[2],
            frontend_app: p[3],
            frontend_inbound: p[4],
            frontend_outbound: p[5],
            frontend_admin: p[6],
            backend_app: p[7],
            backend_inbound: p[8],
            backend_admin: p[9],
        }
    }

    /// The application port of a service.
    pub fn app(&self, service: Service) -> u16 {
        match service {
            Service::Frontend => self.frontend_app,
            Service::Backend => self.backend_app,
        }
    }

    /// The proxy admin port of a service.
    pub fn admin(&self, service: Service) -> u16 {
        match service {
            Service::Frontend => self.frontend_admin,
            Service::Backend => self.backend_admin,
        }
    }
}

/// Keeps the ports of the last `up` (so the printed commands stay the same)
/// where they are still free and distinct; takes a fresh one for the others.
pub fn choose_ports(
    recorded: Option<Ports>,
    is_free: impl Fn(u16) -> bool,
    mut fresh: impl FnMut(&[u16]) -> u16,
) -> Ports {
    let mut chosen: Vec<u16> = Vec::with_capacity(10);
    let wanted = recorded.map(|p| p.all());
    for i in 0..10 {
        let keep = wanted
            .map(|w| w[i])
            .filter(|&p| p != 0 && !chosen.contains(&p) && is_free(p));
        let port = match keep {
            Some(p) => p,
            None => fresh(&chosen),
        };
        chosen.push(port);
    }
    let mut arr = [0u16; 10];
    arr.copy_from_slice(&chosen);
    Ports::from_array(arr)
}

/// How the agent tells frontend from backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Attestation {
    /// Each service (its proxy and its application) runs as its own uid.
    Uids {
        /// Frontend's uid.
        frontend: u32,
        /// Backend's uid.
        backend: u32,
    },
    /// Everything runs as `uid`; each proxy is its own copy of the executable
    /// and the agent matches uid and executable path.
    ExecutablePaths {
        /// The one uid.
        uid: u32,
    },
}

impl Attestation {
    /// Distinct uids when running as root (uid 0), else executable paths.
    /// `taken` says whether a uid already belongs to an account or group.
    pub fn choose(euid: u32, taken: impl Fn(u32) -> bool) -> Attestation {
        if euid != 0 {
            return Attestation::ExecutablePaths { uid: euid };
        }
        let mut uid = FIRST_UID;
        while taken(uid) || taken(uid + 1) {
            uid += 2;
        }
        Attestation::Uids {
            frontend: uid,
            backend: uid + 1,
        }
    }

    /// The uid a service runs as; `None`: the caller's own.
    pub fn run_as(&self, service: Service) -> Option<u32> {
        match (self, service) {
            (Attestation::Uids { frontend, .. }, Service::Frontend) => Some(*frontend),
            (Attestation::Uids { backend, .. }, Service::Backend) => Some(*backend),
            (Attestation::ExecutablePaths { .. }, _) => None,
        }
    }

    /// Whether other uids must reach the socket and executables.
    pub fn uses_other_uids(&self) -> bool {
        matches!(self, Attestation::Uids { .. })
    }

    /// One paragraph for the user: how identities are told apart, and why.
    pub fn explain(&self, layout: &Layout) -> String {
        match self {
            Attestation::Uids { frontend, backend } => format!(
                "frontend runs as uid {frontend} and backend as uid {backend} (numeric uids \
                 without accounts), each proxy beside its application; the agent gives each \
                 proxy its identity from the uid the kernel reports on the agent socket."
            ),
            Attestation::ExecutablePaths { uid } => format!(
                "not running as root, so every process runs as your uid {uid}: the services \
                 cannot get a uid each. The agent tells the two proxies apart by uid and \
                 executable path instead (each service runs its own copy of citadel-proxy under \
                 {}). That is enough for this demo but is no security boundary: any process of \
                 uid {uid} can run either copy and get either identity (docs/agent.md, \
                 Attestation). Run `up` as root (sudo) to give each service its own uid.",
                layout.runtime_dir.join("bin").display()
            ),
        }
    }
}

/// The agent's entries file for the two services.
pub fn entries_yaml(attestation: &Attestation, layout: &Layout) -> String {
    let mut out = String::from(
        "# Written by citadel-mesh up: which process gets which identity.\nentries:\n",
    );
    for service in Service::ALL {
        out.push_str(&format!("  - spiffe_id: {}\n", service.spiffe_id()));
        match attestation {
            Attestation::Uids { .. } => {
                let uid = attestation.run_as(service).unwrap_or_default();
                out.push_str(&format!("    uid: {uid}\n"));
            }
            Attestation::ExecutablePaths { uid } => {
                out.push_str(&format!("    uid: {uid}\n"));
                out.push_str(&format!(
                    "    path: {}\n",
                    yaml_string(&layout.service_proxy(service).display().to_string())
                ));
            }
        }
        out.push_str(&format!("    labels: {{app: {}}}\n", service.name()));
    }
    out
}

/// A double-quoted YAML string.
fn yaml_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The sample PeerAuthentications: STRICT for the namespace, PERMISSIVE on
/// frontend (it takes plaintext calls from the user's shell).
pub fn peer_authentication_yaml() -> String {
    format!(
        "# Written by citadel-mesh up. Mutual TLS for every workload of namespace {NAMESPACE}:
# a plaintext connection to backend is refused.
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: {NAMESPACE}
spec:
  mtls:
    mode: STRICT
---
# Except on frontend, which takes plaintext calls from your shell (in
# Kubernetes an ingress gateway would play that part).
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: frontend
  namespace: {NAMESPACE}
spec:
  selector:
    matchLabels:
      app: frontend
  mtls:
    mode: PERMISSIVE
"
    )
}

/// The `paths` line of the sample AuthorizationPolicy (the docs and the test
/// edit exactly this line).
pub const AUTHZ_PATHS_LINE: &str = "        paths: [\"/api/*\"]";

/// The sample AuthorizationPolicy: backend takes `GET /api/*` from frontend
/// and nothing else.
pub fn authorization_yaml() -> String {
    format!(
        "# Written by citadel-mesh up. Who may call backend, and how. Once an ALLOW
# policy applies to a workload, every request it does not match is denied
# (403 RBAC: access denied). The CA re-reads this directory every {POLICY_POLL_SECS}s:
# add \"{DENIED_PATH}\" to paths and the next call to {DENIED_PATH} gets 200.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: backend
  namespace: {NAMESPACE}
spec:
  selector:
    matchLabels:
      app: backend
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"{}\"]
    to:
    - operation:
        methods: [\"GET\"]
{AUTHZ_PATHS_LINE}
",
        Service::Frontend.principal()
    )
}

/// How `up` knows a process is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ready {
    /// `GET path` answers 200.
    Http(SocketAddr, &'static str),
    /// Something accepts TCP connections here.
    Tcp(SocketAddr),
}

/// One process `up` starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// `ca`, `agent`, `backend`, `backend-proxy`, `frontend`, `frontend-proxy`.
    pub name: String,
    /// What it is, for the summary.
    pub role: String,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Run as this uid (and gid); `None`: as the caller.
    pub uid: Option<u32>,
    /// The identity it gets, if it is a proxy.
    pub spiffe_id: Option<String>,
    /// How to tell it is ready.
    pub ready: Ready,
    /// One line on what it listens on.
    pub detail: String,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// The CA: SQLite and a self-signed root in the data dir, the sample
/// policies, re-read every [`POLICY_POLL_SECS`].
pub fn ca_spec(layout: &Layout, ports: &Ports, bin_dir: &Path) -> ProcessSpec {
    ProcessSpec {
        name: "ca".into(),
        role: "CA (citadel serve)".into(),
        program: bin_dir.join("citadel"),
        args: vec![
            "serve".into(),
            "--data-dir".into(),
            path_arg(&layout.ca_dir()),
            "--listen".into(),
            loopback(ports.ca_grpc).to_string(),
            "--http-listen".into(),
            loopback(ports.ca_http).to_string(),
            "--policies".into(),
            path_arg(&layout.policies_dir()),
            "--policies-poll-interval".into(),
            format!("{POLICY_POLL_SECS}s"),
        ],
        uid: None,
        spiffe_id: None,
        ready: Ready::Http(loopback(ports.ca_http), "/readyz"),
        detail: format!(
            "CSR API 127.0.0.1:{}, /readyz 127.0.0.1:{}",
            ports.ca_grpc, ports.ca_http
        ),
    }
}

/// The node agent (its join token, when it needs one, goes in the environment).
pub fn agent_spec(layout: &Layout, ports: &Ports, bin_dir: &Path) -> ProcessSpec {
    ProcessSpec {
        name: "agent".into(),
        role: "node agent (citadel-agent)".into(),
        program: bin_dir.join("citadel-agent"),
        args: vec![
            "run".into(),
            "--ca".into(),
            loopback(ports.ca_grpc).to_string(),
            "--ca-bundle".into(),
            path_arg(&layout.ca_bundle()),
            "--socket".into(),
            path_arg(&layout.socket()),
            "--entries".into(),
            path_arg(&layout.entries_file()),
            "--data-dir".into(),
            path_arg(&layout.agent_data_dir()),
            "--http-listen".into(),
            loopback(ports.agent_http).to_string(),
        ],
        uid: None,
        spiffe_id: None,
        ready: Ready::Http(loopback(ports.agent_http), "/readyz"),
        detail: format!("socket {}", layout.socket().display()),
    }
}

/// A service's sample application (`citadel-mesh sample-app …`).
pub fn app_spec(
    service: Service,
    layout: &Layout,
    ports: &Ports,
    attestation: &Attestation,
) -> ProcessSpec {
    let mut args = vec![
        "sample-app".into(),
        service.name().into(),
        "--listen".into(),
        loopback(ports.app(service)).to_string(),
    ];
    let detail = match service {
        Service::Frontend => {
            args.push("--backend".into());
            args.push(loopback(ports.frontend_outbound).to_string());
            format!(
                "HTTP on 127.0.0.1:{}, relays every request to backend through its proxy's \
                 outbound 127.0.0.1:{}",
                ports.frontend_app, ports.frontend_outbound
            )
        }
        Service::Backend => format!(
            "HTTP on 127.0.0.1:{}, answers with the caller's identity",
            ports.backend_app
        ),
    };
    ProcessSpec {
        name: service.name().into(),
        role: format!("{} application", service.name()),
        program: layout.service_app(service),
        args,
        uid: attestation.run_as(service),
        spiffe_id: None,
        ready: Ready::Tcp(loopback(ports.app(service))),
        detail,
    }
}

/// A service's proxy: an HTTP inbound in front of its application; frontend's
/// also has the outbound to backend, which must present backend's identity.
pub fn proxy_spec(
    service: Service,
    layout: &Layout,
    ports: &Ports,
    attestation: &Attestation,
) -> ProcessSpec {
    let inbound = match service {
        Service::Frontend => ports.frontend_inbound,
        Service::Backend => ports.backend_inbound,
    };
    let mut args = vec![
        "run".into(),
        "--agent-socket".into(),
        path_arg(&layout.socket()),
        "--admin".into(),
        loopback(ports.admin(service)).to_string(),
        "--inbound".into(),
        format!("{inbound}:{}:http", ports.app(service)),
    ];
    let mut detail = format!(
        "inbound :{inbound} (HTTP) → 127.0.0.1:{}",
        ports.app(service)
    );
    if service == Service::Frontend {
        args.push("--outbound".into());
        args.push(format!(
            "{}=127.0.0.1:{},{}",
            ports.frontend_outbound,
            ports.backend_inbound,
            Service::Backend.spiffe_id()
        ));
        detail.push_str(&format!(
            "; outbound 127.0.0.1:{} → mTLS → 127.0.0.1:{} (must be {})",
            ports.frontend_outbound,
            ports.backend_inbound,
            Service::Backend.spiffe_id()
        ));
    }
    ProcessSpec {
        name: format!("{}-proxy", service.name()),
        role: format!("{} proxy (citadel-proxy)", service.name()),
        program: layout.service_proxy(service),
        args,
        uid: attestation.run_as(service),
        spiffe_id: Some(service.spiffe_id()),
        ready: Ready::Http(loopback(ports.admin(service)), "/healthz/ready"),
        detail,
    }
}

/// Quotes `s` for a POSIX shell when it needs quoting.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=,@+%".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A call the user can paste.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// The URL (frontend's inbound).
    pub url: String,
    /// `curl -sS -i URL`.
    pub command: String,
    /// The status the sample policy gives it.
    pub expect_status: u16,
    /// What the answer's body starts with.
    pub expect_body: String,
}

/// The three commands `up` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commands {
    /// Frontend → backend on the allowed path: 200.
    pub allowed: Call,
    /// Frontend → backend on a path the policy does not allow: 403.
    pub denied: Call,
    /// `citadel policy check` for both requests.
    pub policy_check: String,
    /// `citadel-mesh down …`.
    pub down: String,
}

/// The printed commands: absolute paths, so they work from any directory.
pub fn commands(layout: &Layout, ports: &Ports, citadel: &Path, mesh: &Path) -> Commands {
    let call = |path: &str, status: u16, body: &str| {
        let url = format!("http://127.0.0.1:{}{path}", ports.frontend_inbound);
        Call {
            command: format!("curl -sS -i {url}"),
            url,
            expect_status: status,
            expect_body: body.to_owned(),
        }
    };
    let policy_check = format!(
        "for path in {ALLOWED_PATH} {DENIED_PATH}; do {} policy check --policies {} --from {} \
         --to-namespace {NAMESPACE} --to-labels app={} --port {} --method GET --path \"$path\"; \
         echo; done",
        shell_quote(&citadel.display().to_string()),
        shell_quote(&layout.policies_dir().display().to_string()),
        Service::Frontend.spiffe_id(),
        Service::Backend.name(),
        ports.backend_app,
    );
    Commands {
        allowed: call(ALLOWED_PATH, 200, "backend: GET /api/hello"),
        denied: call(DENIED_PATH, 403, "RBAC: access denied"),
        policy_check,
        down: format!(
            "{} down --data-dir {}",
            shell_quote(&mesh.display().to_string()),
            shell_quote(&layout.data_dir.display().to_string())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            data_dir: PathBuf::from("/srv/mesh data"),
            runtime_dir: PathBuf::from("/srv/mesh data/runtime"),
        }
    }

    fn ports() -> Ports {
        Ports::from_array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    }

    #[test]
    fn root_gets_two_distinct_unused_uids_and_others_fall_back_to_paths() {
        let a = Attestation::choose(0, |_| false);
        assert_eq!(
            a,
            Attestation::Uids {
                frontend: FIRST_UID,
                backend: FIRST_UID + 1
            }
        );
        let taken = Attestation::choose(0, |u| u == FIRST_UID + 1);
        assert_eq!(
            taken,
            Attestation::Uids {
                frontend: FIRST_UID + 2,
                backend: FIRST_UID + 3
            }
        );
        assert_eq!(
            Attestation::choose(1000, |_| false),
            Attestation::ExecutablePaths { uid: 1000 }
        );
        assert!(
            Attestation::choose(1000, |_| false)
                .explain(&layout())
                .contains("no security boundary")
        );
    }

    #[test]
    fn entries_separate_the_services_by_uid_or_by_executable() {
        let l = layout();
        let by_uid = entries_yaml(&Attestation::choose(0, |_| false), &l);
        assert!(by_uid.contains(&format!(
            "spiffe_id: spiffe://cluster.local/ns/demo/sa/backend\n    uid: {}\n",
            FIRST_UID + 1
        )));
        assert!(!by_uid.contains("path:"));
        let by_path = entries_yaml(&Attestation::ExecutablePaths { uid: 1000 }, &l);
        assert!(
            by_path.contains(
                "uid: 1000\n    path: \"/srv/mesh data/runtime/bin/frontend/citadel-proxy\"\n"
            ),
            "{by_path}"
        );
        assert!(by_path.contains("labels: {app: backend}"));
    }

    #[test]
    fn frontend_outbound_requires_backends_identity_and_proxies_run_as_their_service() {
        let a = Attestation::choose(0, |_| false);
        let p = proxy_spec(Service::Frontend, &layout(), &ports(), &a);
        assert!(p.args.contains(&"5:4:http".to_owned()), "{:?}", p.args);
        assert!(
            p.args
                .contains(&format!("6=127.0.0.1:9,{}", Service::Backend.spiffe_id()))
        );
        assert_eq!(p.uid, Some(FIRST_UID));
        let b = proxy_spec(Service::Backend, &layout(), &ports(), &a);
        assert_eq!(b.uid, Some(FIRST_UID + 1));
        assert!(!b.args.iter().any(|a| a == "--outbound"));
        assert_eq!(
            app_spec(Service::Backend, &layout(), &ports(), &a).uid,
            b.uid
        );
        assert_ne!(p.program, b.program, "each service its own executable");
    }

    #[test]
    fn ca_rereads_the_policies_every_second() {
        let ca = ca_spec(&layout(), &ports(), Path::new("/bin"));
        let i = ca
            .args
            .iter()
            .position(|a| a == "--policies-poll-interval")
            .unwrap();
        assert_eq!(ca.args[i + 1], "1s");
    }

    #[test]
    fn ports_are_kept_when_free_and_distinct() {
        let recorded = Ports::from_array([11, 12, 13, 14, 15, 16, 17, 18, 19, 11]);
        let mut next = 100;
        let p = choose_ports(
            Some(recorded),
            |p| p != 13,
            |_| {
                next += 1;
                next
            },
        );
        assert_eq!(p.ca_grpc, 11);
        assert_eq!(p.agent_http, 101, "13 was taken");
        assert_eq!(p.backend_admin, 102, "11 was already used");
        let fresh = choose_ports(None, |_| true, |taken| taken.len() as u16 + 500);
        assert_eq!(fresh.backend_admin, 509);
    }

    #[test]
    fn printed_commands_are_pasteable() {
        let c = commands(
            &layout(),
            &ports(),
            Path::new("/x/citadel"),
            Path::new("/x/citadel-mesh"),
        );
        assert_eq!(
            c.allowed.command,
            "curl -sS -i http://127.0.0.1:5/api/hello"
        );
        assert_eq!(c.denied.url, "http://127.0.0.1:5/admin");
        assert_eq!(c.denied.expect_body, "RBAC: access denied");
        assert!(
            c.policy_check
                .contains("--policies '/srv/mesh data/policies'")
        );
        assert!(c.policy_check.contains("--port 8 "), "backend's app port");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn the_sample_authorization_has_the_line_the_docs_edit() {
        assert!(authorization_yaml().contains(&format!("\n{AUTHZ_PATHS_LINE}\n")));
    }
}
