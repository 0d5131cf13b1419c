//! What `up` and `down` print: for people, and (`up --json`) for scripts.

use std::fmt::Write;

use serde::Serialize;

use crate::down::{Outcome, StopReport};
use crate::plan::{self, Attestation, Commands, POLICY_POLL_SECS};
use crate::up::{Join, Mesh};

/// One process in the JSON summary.
#[derive(Serialize)]
struct ProcessJson<'a> {
    name: &'a str,
    role: &'a str,
    pid: u32,
    uid: Option<u32>,
    spiffe_id: Option<&'a str>,
    log: String,
    detail: &'a str,
}

/// The JSON summary of `up --json`.
#[derive(Serialize)]
struct UpJson<'a> {
    data_dir: String,
    runtime_dir: String,
    state_file: String,
    logs_dir: String,
    policies_dir: String,
    policy_file: String,
    policy_poll_interval_secs: u64,
    attestation: &'a Attestation,
    identities: String,
    agent_join: &'static str,
    runtime_note: Option<&'a str>,
    processes: Vec<ProcessJson<'a>>,
    commands: &'a Commands,
}

fn join_text(join: Join) -> &'static str {
    match join {
        Join::FreshToken => "joined with a fresh single-use token from `citadel token create`",
        Join::SavedIdentity => "reused its saved node identity (no token spent)",
        Join::RejoinedWithFreshToken => {
            "its saved node identity was refused, so it re-joined with a fresh token"
        }
    }
}

/// `up --json`.
pub fn up_json(mesh: &Mesh) -> String {
    let l = &mesh.layout;
    let doc = UpJson {
        data_dir: l.data_dir.display().to_string(),
        runtime_dir: l.runtime_dir.display().to_string(),
        state_file: l.state_file().display().to_string(),
        logs_dir: l.logs_dir().display().to_string(),
        policies_dir: l.policies_dir().display().to_string(),
        policy_file: l.authorization_file().display().to_string(),
        policy_poll_interval_secs: POLICY_POLL_SECS,
        attestation: &mesh.attestation,
        identities: mesh.attestation.explain(l),
        agent_join: join_text(mesh.join),
        runtime_note: mesh.runtime_note.as_deref(),
        processes: mesh
            .processes
            .iter()
            .map(|p| ProcessJson {
                name: &p.spec.name,
                role: &p.spec.role,
                pid: p.pid,
                uid: p.spec.uid,
                spiffe_id: p.spec.spiffe_id.as_deref(),
                log: p.log.display().to_string(),
                detail: &p.spec.detail,
            })
            .collect(),
        commands: &mesh.commands,
    };
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// `up`'s summary for people.
pub fn up_text(mesh: &Mesh) -> String {
    let l = &mesh.layout;
    let c = &mesh.commands;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nThe mesh is up: a CA, a node agent, and two services (frontend, backend), each \
         behind its own citadel-proxy.\n"
    );
    for p in &mesh.processes {
        let uid = p.spec.uid.map(|u| format!("uid {u}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "  {:<15} pid {:<8} {:<10} {}",
            p.spec.name, p.pid, uid, p.spec.role
        );
        if let Some(id) = &p.spec.spiffe_id {
            let _ = writeln!(s, "  {:<15} identity {id}", "");
        }
        let _ = writeln!(s, "  {:<15} {}", "", p.spec.detail);
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Identities: {}", mesh.attestation.explain(l));
    let _ = writeln!(s, "Node agent: {}.", join_text(mesh.join));
    if let Some(note) = &mesh.runtime_note {
        let _ = writeln!(s, "Runtime: {note}.");
    }
    let _ = writeln!(s, "Data directory: {}", l.data_dir.display());
    let _ = writeln!(
        s,
        "  pids:     {}  (what `down` stops)",
        l.state_file().display()
    );
    let _ = writeln!(s, "  logs:     {}/<name>.log", l.logs_dir().display());
    let _ = writeln!(
        s,
        "  policies: {}  (PeerAuthentication: STRICT in namespace {}, PERMISSIVE on frontend; \
         AuthorizationPolicy {}/backend)",
        l.policies_dir().display(),
        plan::NAMESPACE,
        plan::NAMESPACE
    );
    let _ = writeln!(s, "\nTry it:\n");
    let _ = writeln!(
        s,
        "  # 1. Allowed: you → frontend's proxy → frontend → mutual TLS → backend's proxy → backend: 200"
    );
    let _ = writeln!(s, "  {}\n", c.allowed.command);
    let _ = writeln!(
        s,
        "  # 2. Denied by the AuthorizationPolicy (frontend may only GET /api/*): 403 RBAC: access denied"
    );
    let _ = writeln!(s, "  {}\n", c.denied.command);
    let _ = writeln!(
        s,
        "  # 3. Why: citadel policy check explains both decisions"
    );
    let _ = writeln!(s, "  {}\n", c.policy_check);
    let _ = writeln!(
        s,
        "Change the policy: edit {} (e.g. add \"{}\" to paths). The CA re-reads the directory \
         every {}s and the agent pushes the change to the proxies, so the next call follows it \
         within seconds.\n",
        l.authorization_file().display(),
        plan::DENIED_PATH,
        POLICY_POLL_SECS
    );
    let _ = writeln!(
        s,
        "Stop everything (the data directory stays; `up` again reuses it):\n  {}",
        c.down
    );
    s
}

/// `down`'s summary.
pub fn down_text(report: &StopReport) -> String {
    let mut s = String::new();
    if !report.found_state {
        let _ = writeln!(
            s,
            "nothing to stop: no citadel-mesh state in {}",
            report.data_dir.display()
        );
        return s;
    }
    if report.processes.is_empty() {
        let _ = writeln!(
            s,
            "nothing to stop: no process recorded in {}",
            report.data_dir.display()
        );
    }
    for (r, outcome) in &report.processes {
        let what = match outcome {
            Outcome::Stopped => "stopped".to_owned(),
            Outcome::Killed => "killed (did not stop within 10 s of SIGTERM)".to_owned(),
            Outcome::AlreadyGone => "had already exited".to_owned(),
            Outcome::PidReused => {
                "had exited; its pid now belongs to another process, left alone".to_owned()
            }
            Outcome::Failed(e) => format!("could not be stopped: {e}"),
        };
        let _ = writeln!(s, "  {:<15} pid {:<8} {what}", r.name, r.pid);
    }
    if let Some(dir) = &report.removed_runtime_dir {
        let _ = writeln!(
            s,
            "Removed {} (the socket and the services' executables).",
            dir.display()
        );
    }
    let _ = writeln!(
        s,
        "The data directory {} is left as it was (logs, CA, policies); `citadel-mesh up --data-dir {}` reuses it.",
        report.data_dir.display(),
        plan::shell_quote(&report.data_dir.display().to_string())
    );
    s
}
