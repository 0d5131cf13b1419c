//! The operator's view of one check: the mTLS mode of the port, what it means for
//! this peer, the authorization decision and who made it; as text or JSON. Pure.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::authz::{Decision, Reason, RuleRef, Verdict};
use crate::mtls::{Mode, MtlsResolution};
use crate::request::Request;
use crate::set::PolicySet;

/// What the port's mTLS mode does with this peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerCheck {
    /// The peer is accepted as it is.
    Accepted,
    /// STRICT and the peer is plaintext: refused before authorization.
    RefusedPlaintext,
    /// DISABLE: the connection is plaintext, so the peer identity is not
    /// available to authorization (it is judged without a principal).
    IdentityUnavailable,
}

impl PeerCheck {
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::RefusedPlaintext => "refused_plaintext",
            Self::IdentityUnavailable => "identity_unavailable",
        }
    }
}

/// Everything `citadel policy check` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckReport<'p> {
    /// Effective mTLS mode of the destination port.
    pub mtls: MtlsResolution<'p>,
    /// What that mode does with this peer.
    pub peer: PeerCheck,
    /// The authorization decision (judged without a principal under DISABLE).
    pub decision: Decision<'p>,
    /// The final verdict: DENY when the peer is refused, else the decision's.
    pub verdict: Verdict,
}

/// Resolves the mTLS mode, applies it to the peer, and decides.
pub fn check<'p>(set: &'p PolicySet, req: &Request<'_>) -> CheckReport<'p> {
    let mtls = set.resolve_mtls(&req.destination.workload, req.destination.port);
    let mut judged = *req;
    let peer = match (mtls.mode, req.source.principal) {
        (Mode::Strict, None) => PeerCheck::RefusedPlaintext,
        (Mode::Disable, Some(_)) => {
            judged.source.principal = None;
            PeerCheck::IdentityUnavailable
        }
        _ => PeerCheck::Accepted,
    };
    let decision = set.decide(&judged);
    let verdict = if peer == PeerCheck::RefusedPlaintext {
        Verdict::Deny
    } else {
        decision.verdict
    };
    CheckReport {
        mtls,
        peer,
        decision,
        verdict,
    }
}

fn describe_mtls(m: &MtlsResolution<'_>) -> String {
    match m.policy {
        None => format!("{} (default: no PeerAuthentication applies)", m.mode),
        Some(p) => format!("{} ({} policy {p})", m.mode, m.scope.as_str()),
    }
}

/// Renders a report as text for a terminal.
pub fn render_text(report: &CheckReport<'_>, req: &Request<'_>) -> String {
    let mut s = String::new();
    let wl = &req.destination.workload;
    let labels: Vec<String> = wl.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        s,
        "destination:   namespace {} labels {{{}}} port {}",
        wl.namespace,
        labels.join(","),
        req.destination.port
    );
    let _ = match &req.http {
        None => writeln!(
            s,
            "request:       TCP connection (HTTP-only attributes cannot be judged)"
        ),
        Some(h) => writeln!(
            s,
            "request:       HTTP {} {} host {:?}",
            h.method, h.path, h.host
        ),
    };
    let _ = writeln!(
        s,
        "peer:          {}",
        req.source
            .principal
            .map_or("plaintext (no mTLS identity)".to_owned(), |p| p.to_owned())
    );
    let _ = writeln!(s, "mTLS mode:     {}", describe_mtls(&report.mtls));
    match report.peer {
        PeerCheck::Accepted => {}
        PeerCheck::RefusedPlaintext => {
            let _ = writeln!(
                s,
                "mTLS check:    refused: STRICT requires mutual TLS and this peer is plaintext"
            );
        }
        PeerCheck::IdentityUnavailable => {
            let _ = writeln!(
                s,
                "mTLS check:    DISABLE: the connection is plaintext, so the peer identity is not available to authorization"
            );
        }
    }
    let d = &report.decision;
    let _ = writeln!(s, "authorization: {} ({})", d.verdict, d.reason);
    if let Some(a) = d.audited_by {
        let _ = writeln!(s, "audit:         audited by AUDIT policy {a}");
    }
    if let Some(r) = d.dry_run {
        let _ = writeln!(
            s,
            "dry run:       with dry-run policies enforced: {} ({r})",
            r.verdict()
        );
    }
    if d.skipped_allow_rules > 0 {
        let _ = writeln!(
            s,
            "note:          {} ALLOW rule(s) skipped: they test attributes this request does not carry (fail closed)",
            d.skipped_allow_rules
        );
    }
    let _ = writeln!(s, "decision:      {}", report.verdict);
    s
}

fn rule_json(r: Option<RuleRef<'_>>) -> Value {
    match r {
        None => Value::Null,
        Some(r) => json!({"policy": format!("{}/{}", r.namespace, r.name), "rule": r.rule}),
    }
}

fn reason_json(r: &Reason<'_>) -> Value {
    let kind = match r {
        Reason::DeniedBy(_) => "denied_by_policy",
        Reason::NoAllowPolicy => "no_allow_policy",
        Reason::AllowedBy(_) => "allowed_by_policy",
        Reason::NoAllowMatched => "no_allow_policy_matched",
    };
    let rule = r.rule();
    json!({
        "verdict": r.verdict().as_str(),
        "reason": kind,
        "message": r.to_string(),
        "policy": rule.map(|r| format!("{}/{}", r.namespace, r.name)),
        "rule": rule.map(|r| r.rule),
    })
}

/// Renders a report as JSON.
pub fn render_json(report: &CheckReport<'_>) -> Value {
    let d = &report.decision;
    json!({
        "decision": report.verdict.as_str(),
        "mtls": {
            "mode": report.mtls.mode.as_str(),
            "scope": report.mtls.scope.as_str(),
            "policy": report.mtls.policy.map(|p| p.to_string()),
        },
        "peer": report.peer.as_str(),
        "authorization": reason_json(&d.reason),
        "audited_by": rule_json(d.audited_by),
        "dry_run": d.dry_run.as_ref().map(reason_json),
        "skipped_allow_rules": d.skipped_allow_rules,
    })
}
