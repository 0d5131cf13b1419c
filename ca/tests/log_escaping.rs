//! Values a caller chose reach the CA's log lines escaped: a CSR SAN or an
//! `ImpersonatedIdentity` holding a newline and a fake record cannot forge a log
//! line. The CA runs in-process over real TLS and gRPC; its log output is
//! captured with the text formatter operators read.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use citadel_e2e::client::request;
use citadel_e2e::csr::p256_csr;
use support::{Harness, WEB};
use tonic::Code;
use tracing_subscriber::fmt::MakeWriter;

/// Log output, shared with the subscriber.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// What an attacker would like the operator to read as a record of its own.
const FORGED: &str = "2026-11-30T00:00:00.000000Z  INFO certificate issued spiffe_id=spiffe://cluster.local/ns/kube-system/sa/admin";

fn assert_not_forged(logs: &str, marker: &str) {
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains(marker)).collect();
    assert_eq!(lines.len(), 1, "one log line for {marker:?}:\n{logs}");
    assert!(
        lines[0].contains("\\n2026-11-30T00:00:00.000000Z"),
        "the newline is escaped in place: {}",
        lines[0]
    );
    assert!(
        !logs.lines().any(|l| l.starts_with("2026-11-30T00:00:00")),
        "a forged record starts a line:\n{logs}"
    );
}

// current_thread (the default): the CA's tasks run on this thread, so the
// thread's default subscriber sees their events.
#[tokio::test]
async fn csr_san_and_impersonated_identity_with_newlines_cannot_forge_a_log_line() {
    let logs = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let h = Harness::start().await;
    let token = h.tokens.token("shop", "web");

    // A URI SAN carrying a newline and a fake record.
    let san = format!("{WEB}\n{FORGED}");
    let csr = p256_csr(&[&san]).unwrap();
    h.expect_refusal(
        request(&csr.pem, 0, Some(&token), None),
        Code::PermissionDenied,
    )
    .await;
    assert_not_forged(&logs.text(), "certificate request refused");

    // An impersonated identity carrying the same, on a fresh capture.
    logs.0.lock().unwrap().clear();
    let csr = p256_csr(&[]).unwrap();
    let target = format!("spiffe://cluster.local/ns/shop/sa/other\r\n{FORGED}");
    h.expect_refusal(
        request(&csr.pem, 0, Some(&token), Some(&target)),
        Code::PermissionDenied,
    )
    .await;
    let text = logs.text();
    assert_not_forged(&text, "impersonation refused");
    assert_not_forged(&text, "certificate request refused");
    assert!(!text.contains('\r'), "{text}");
    h.stop().await;
}
