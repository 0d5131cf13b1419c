//! More end-to-end tests of `citadel-proxy` with the real binaries (CA with
//! `--policies`, join token, `citadel-agent`, proxies run as two uids so that they
//! get `shop/web` and `shop/api`, a TCP echo application): PERMISSIVE and DISABLE
//! ports, a client from a foreign root, a rotation under an open connection, and a
//! proxy started before its agent. Needs root (to run the proxies as other uids);
//! each test skips itself otherwise.

use std::net::SocketAddr;
use std::time::Duration;

use citadel_e2e::mesh::{TwoProxies, echo_app, is_root};
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
