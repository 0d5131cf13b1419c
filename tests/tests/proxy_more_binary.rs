//! More end-to-end tests of `citadel-proxy` with the real binaries (CA with
//! `--policies`, join token, `citadel-agent`, proxies run as two uids so that they
//! get `shop/web` and `shop/api`, a TCP echo application): PERMISSIVE and DISABLE
//! ports, a client from a foreign root, a rotation under an open connection, a
//! proxy started before its agent, and an agent that goes away and returns. Needs
//! root (to run the proxies as other uids); each test skips itself otherwise.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use citadel_e2e::mesh::{
    AgentOptions, AgentProcess, CitadelProxyProcess, MESH_API, MESH_API_UID, MESH_WEB,
    MESH_WEB_UID, TwoProxies, allow_sa_to_api_strict, create_join_token, deny_sa_to_api, echo_app,
    is_root, start_ca_with_policies, web_api_entries,
};
use citadel_e2e::process::{free_port, http_get};
use citadel_tls::testing::TestCa;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `ping` on `s` and expects it echoed within 5 s.
async fn echo_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<(), String> {
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"ping" => Ok(()),
        Ok(Ok(_)) => Err(format!("echoed {buf:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no echo within 5 s".to_owned()),
    }
}

/// A plain TCP connection to 127.0.0.1:`port` that echoed once.
async fn echoed_through(port: u16) -> Result<TcpStream, String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    echo_on(&mut s).await?;
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_port_takes_mtls_and_plaintext_and_disable_port_takes_plaintext_only() {
    if !is_root() {
        eprintln!("skipped: running proxies as other uids needs root");
        return;
    }
    let permissive_app = echo_app().await.port();
    let disable_app = echo_app().await.port();
    let yaml = format!(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: api-permissive, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  mtls: {{mode: PERMISSIVE}}
  portLevelMtls: {{{disable_app}: {{mode: DISABLE}}}}
"
    );
    let mesh = TwoProxies::start_with(
        "peer-auth.yaml",
        &yaml,
        &[],
        &[&permissive_app.to_string(), &disable_app.to_string()],
    )
    .await;
    let logs = || mesh.logs();
    let (permissive_in, disable_in) = (mesh.api_ins[0], mesh.api_ins[1]);
    let (to_permissive, to_disable) = (mesh.web_outs[0], mesh.web_outs[1]);

    // PERMISSIVE: plaintext straight to api's inbound, and mTLS through web's outbound.
    echoed_through(permissive_in)
        .await
        .unwrap_or_else(|e| panic!("plaintext refused on the PERMISSIVE port: {e}\n{}", logs()));
    echoed_through(to_permissive)
        .await
        .unwrap_or_else(|e| panic!("mTLS refused on the PERMISSIVE port: {e}\n{}", logs()));

    // DISABLE (port level): plaintext is taken, web's outbound mTLS is refused.
    echoed_through(disable_in)
        .await
        .unwrap_or_else(|e| panic!("plaintext refused on the DISABLE port: {e}\n{}", logs()));
    assert!(
        echoed_through(to_disable).await.is_err(),
        "mTLS got through the DISABLE port\n{}",
        logs()
    );

    // And both kinds were counted as what they were.
    let metrics = mesh.api.metrics().await.unwrap();
    assert!(
        metrics.contains(r#"source_principal="plaintext""#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"source_principal="cluster.local/ns/shop/sa/web""#),
        "{metrics}"
    );
}

/// A server verifier that accepts any server (checking only the handshake
/// signature) and records the leaf certificate it was shown.
#[derive(Debug)]
struct RecordServerLeaf {
    provider: Arc<CryptoProvider>,
    leaf: Mutex<Option<Vec<u8>>>,
}

impl ServerCertVerifier for RecordServerLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.leaf.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a TLS 1.3 client presenting an SVID of a foreign root (for `spiffe_id`)
/// got from 127.0.0.1:`port`: the leaf the server showed (if it got that far), and
/// whether a `ping` was echoed after the handshake.
async fn foreign_client(port: u16, spiffe_id: &str) -> (Option<Vec<u8>>, Result<(), String>) {
    let foreign = TestCa::new("cluster.local", "foreign root").svid(spiffe_id);
    let provider = citadel_tls::provider();
    let recorder = Arc::new(RecordServerLeaf {
        provider: provider.clone(),
        leaf: Mutex::new(None),
    });
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(foreign.key_pkcs8.clone()));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_client_auth_cert(foreign.chain.clone(), key)
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let result = async {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let connect = connector.connect(ServerName::try_from("api.shop").unwrap(), tcp);
        let mut tls = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| "no handshake within 5 s".to_owned())?
            .map_err(|e| format!("handshake: {e}"))?;
        echo_on(&mut tls).await
    }
    .await;
    let leaf = recorder.leaf.lock().unwrap().clone();
    (leaf, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_a_foreign_root_is_refused_by_a_real_proxy() {
    if !is_root() {
        eprintln!("skipped: running proxies as other uids needs root");
        return;
    }
    let app = echo_app().await.port();
    let mesh = TwoProxies::start(
        "allow.yaml",
        &allow_sa_to_api_strict("web"),
        &[],
        &app.to_string(),
    )
    .await;
    let logs = || mesh.logs();

    // A client whose certificate names web but chains to another root: the server
    // showed its certificate (the client got that far) and then refused it.
    let (leaf, result) = foreign_client(mesh.api_in, MESH_WEB).await;
    assert!(
        leaf.is_some(),
        "api's inbound never showed a certificate: {result:?}\n{}",
        logs()
    );
    assert!(
        result.is_err(),
        "a foreign root's client got an echo\n{}",
        logs()
    );

    // Web's outbound, with the real certificate, keeps working.
    echoed_through(mesh.web_out).await.unwrap_or_else(|e| {
        panic!(
            "web → api refused after the foreign client: {e}\n{}",
            logs()
        )
    });
    let metrics = mesh.api.metrics().await.unwrap();
    assert!(
        metrics.contains(r#"source_principal="unknown""#),
        "the refused handshake was not counted\n{metrics}"
    );
}

/// The serial (lowercase hex) of a DER certificate.
fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("a certificate");
    cert.raw_serial_as_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_an_open_connection_keeps_it_open_and_new_handshakes_use_the_new_certificate()
 {
    if !is_root() {
        eprintln!("skipped: running proxies as other uids needs root");
        return;
    }
    let app = echo_app().await.port();
    let mesh = TwoProxies::start(
        "allow.yaml",
        &allow_sa_to_api_strict("web"),
        &[],
        &app.to_string(),
    )
    .await;
    let logs = || mesh.logs();

    // An open connection web → api, and the certificate api serves now.
    let mut open = echoed_through(mesh.web_out)
        .await
        .unwrap_or_else(|e| panic!("web → api refused: {e}\n{}", logs()));
    let (leaf, _) = foreign_client(mesh.api_in, MESH_WEB).await;
    let before = serial_of(&leaf.expect("api showed no certificate"));

    // SIGUSR1: the agent renews every certificate; api's next handshakes show a new one.
    mesh.agent.signal("-USR1").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        if let (Some(leaf), _) = foreign_client(mesh.api_in, MESH_WEB).await {
            let serial = serial_of(&leaf);
            if serial != before {
                break serial;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "api still serves serial {before} 20 s after SIGUSR1\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(before, after);

    // The connection opened before the rotation still echoes, and a new one works.
    echo_on(&mut open)
        .await
        .unwrap_or_else(|e| panic!("the open connection broke on rotation: {e}\n{}", logs()));
    echoed_through(mesh.web_out)
        .await
        .unwrap_or_else(|e| panic!("web → api refused after rotation: {e}\n{}", logs()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_started_before_its_agent_becomes_ready_when_the_agent_comes() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        eprintln!("skipped: running proxies as other uids needs root");
        return;
    }
    let app = echo_app().await.port();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ca, _policies) = start_ca_with_policies(
        tmp.path(),
        "allow.yaml",
        &allow_sa_to_api_strict("web"),
        &[],
    )
    .await
    .unwrap();
    let agent_dir = tmp.path().join("agent");
    let socket = agent_dir.join("agent.sock");
    assert!(!socket.exists());

    // api's proxy first, pointed at a socket where no agent listens yet.
    let api_in = free_port();
    let mut api = CitadelProxyProcess::spawn(
        tmp.path(),
        "api",
        Some(MESH_API_UID),
        &socket,
        &["--inbound".to_owned(), format!("{api_in}:{app}")],
        &[],
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok((status, _)) = http_get(api.admin, "/healthz/ready").await {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "api's admin never answered\n{}",
            api.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "ready without an agent\n{}", api.log_text());

    // The agent comes: api becomes ready and serves web through web's outbound.
    let token = create_join_token(&ca.data_dir, "node-a", &[MESH_WEB, MESH_API], "10m").unwrap();
    let entries = web_api_entries();
    let _agent = AgentProcess::start(&ca, &AgentOptions::new(&agent_dir, &entries, Some(&token)))
        .await
        .unwrap();
    api.wait_ready(60)
        .await
        .unwrap_or_else(|e| panic!("api not ready once the agent came: {e}"));
    let web_out = free_port();
    let mut web = CitadelProxyProcess::spawn(
        tmp.path(),
        "web",
        Some(MESH_WEB_UID),
        &socket,
        &[
            "--outbound".to_owned(),
            format!("{web_out}=127.0.0.1:{api_in},{MESH_API}"),
        ],
        &[],
    )
    .unwrap();
    web.wait_ready(30).await.unwrap();
    echoed_through(web_out).await.unwrap_or_else(|e| {
        panic!(
            "web → api refused: {e}\napi:\n{}\nweb:\n{}",
            api.log_text(),
            web.log_text()
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_going_away_keeps_proxies_serving_and_they_reconnect_when_it_returns() {
    if !is_root() {
        eprintln!("skipped: running proxies as other uids needs root");
        return;
    }
    let app = echo_app().await.port();
    let mut mesh = TwoProxies::start(
        "allow.yaml",
        &allow_sa_to_api_strict("web"),
        &[],
        &app.to_string(),
    )
    .await;
    let agent_log = |m: &TwoProxies| std::fs::read_to_string(&m.agent.log).unwrap_or_default();
    echoed_through(mesh.web_out)
        .await
        .unwrap_or_else(|e| panic!("web → api refused: {e}\n{}", mesh.logs()));

    let version_before = mesh.api.policy_version().await;
    assert!(
        version_before.is_some(),
        "api has no policy\n{}",
        mesh.logs()
    );

    // The agent goes away (SIGTERM) and exits.
    mesh.agent.signal("-TERM").unwrap();
    mesh.agent
        .wait_exit(20)
        .await
        .unwrap_or_else(|e| panic!("the agent did not exit on SIGTERM: {e}"));

    // While it is gone, a new connection web → api still echoes: the proxies keep
    // their certificates and policies.
    echoed_through(mesh.web_out).await.unwrap_or_else(|e| {
        panic!(
            "web → api refused while the agent is gone: {e}\n{}",
            mesh.logs()
        )
    });

    // The agent returns on the same socket and data dir, without a join token (it
    // reuses its saved node identity).
    let entries = web_api_entries();
    let dir = mesh.tmp.path().join("agent");
    let agent = AgentProcess::start(&mesh.ca, &AgentOptions::new(&dir, &entries, None))
        .await
        .unwrap_or_else(|e| panic!("the agent did not come back without a token: {e}"));
    assert_eq!(agent.socket, mesh.agent.socket);
    mesh.agent = agent;

    // A DENY for web reaches api only through the restarted agent's policy stream:
    // new connections web → api end up refused.
    std::fs::write(mesh.policies.join("deny.yaml"), deny_sa_to_api("web")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if echoed_through(mesh.web_out).await.is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "web → api still echoes 60 s after the DENY was written\n{}\nagent:\n{}",
            mesh.logs(),
            agent_log(&mesh)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Refused because api took a new policy set, not because it broke.
    let version_after = mesh.api.policy_version().await;
    assert!(
        version_after.is_some() && version_after != version_before,
        "api's policy version {version_after:?} (was {version_before:?})\n{}",
        mesh.logs()
    );
}
