//! `citadel root status|prepare|activate|retire|remove|rotate`: the authority lifecycle from
//! the CLI, working on the store (the running CA replicas follow it). Decisions come from
//! the pure planner in [`crate::rotation`]; this module reads the store, acts and prints.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use citadel_identity::TrustDomain;
use citadel_store::{
    AckStore, AuthorityRecord, AuthorityState, AuthorityStore, BundleAck, LedgerEntry,
    LedgerFilter, LedgerStore,
};
use serde_json::json;

use crate::authorities::{bundle_of, record_of, save_key};
use crate::authority::{Authority, probe};
use crate::cli::fmt_time;
use crate::clock::unix_now;
use crate::keystore::KeyStore;
use crate::rotation::{
    AgentView, Blocker, Plan, PlanInput, Transition, agent_views, check_activate, check_remove,
    check_retire, plan,
};

/// The seams a rotation reads and changes: the authorities, the agents' acknowledgements and
/// the live certificates (any [`citadel_store::Store`] is one).
pub trait RotationStore: AuthorityStore + AckStore + LedgerStore {}

impl<T: AuthorityStore + AckStore + LedgerStore + ?Sized> RotationStore for T {}

/// Everything the planner needs, read from the store at one moment.
#[derive(Debug, Clone)]
pub struct StoreState {
    /// Every authority.
    pub authorities: Vec<AuthorityRecord>,
    /// The trust-bundle sequence (read before the authorities).
    pub bundle_sequence: u64,
    /// Every agent's latest acknowledgement.
    pub acks: Vec<BundleAck>,
    /// Every certificate valid at `now`.
    pub live_leaves: Vec<LedgerEntry>,
    /// When it was read.
    pub now: i64,
}

impl StoreState {
    /// Reads the store at `now`.
    pub async fn read<S: RotationStore + ?Sized>(
        store: &S,
        now: i64,
    ) -> anyhow::Result<StoreState> {
        let bundle_sequence = store.bundle_sequence().await?;
        let authorities = store.list_authorities().await?;
        let acks = store.list_bundle_acks().await?;
        let live_leaves = store
            .list_issuances(&LedgerFilter {
                live_at: Some(now),
                ..Default::default()
            })
            .await?;
        Ok(StoreState {
            authorities,
            bundle_sequence,
            acks,
            live_leaves,
            now,
        })
    }

    /// The planner's view of it.
    pub fn input(&self, stale_after_secs: i64) -> PlanInput<'_> {
        PlanInput {
            authorities: &self.authorities,
            bundle_sequence: self.bundle_sequence,
            acks: &self.acks,
            live_leaves: &self.live_leaves,
            now: self.now,
            stale_after_secs,
        }
    }

    fn live_count(&self, authority: &str) -> usize {
        self.live_leaves
            .iter()
            .filter(|l| l.issuance.authority_id == authority)
            .count()
    }
}

fn subject_of(rec: &AuthorityRecord) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok(certs) = crate::pemutil::certs_from_pem(&rec.cert_pem, "cert") else {
        return "?".into();
    };
    certs
        .first()
        .and_then(|der| {
            X509Certificate::from_der(der)
                .ok()
                .map(|(_, c)| c.subject().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn agent_json(a: &AgentView) -> serde_json::Value {
    json!({
        "agent_id": a.agent_id,
        "acknowledged_sequence": a.sequence,
        "last_seen": fmt_time(a.acked_at),
        "live": a.live,
        "current": a.current,
    })
}

fn leaf_json(l: &LedgerEntry) -> serde_json::Value {
    json!({
        "seq": l.seq,
        "serial": l.issuance.serial_hex,
        "spiffe_id": l.issuance.spiffe_id,
        "requester": l.issuance.requester,
        "not_after": fmt_time(l.issuance.not_after),
    })
}

/// `citadel root status`: each authority (ID, state, subject, expiry, live certificates it
/// signed), the trust-bundle sequence, each agent (live or stale, the sequence it
/// acknowledged), then the trust bundle PEM. With `json`, one JSON object.
pub async fn status<S: RotationStore + ?Sized>(
    store: &S,
    trust_domain: &TrustDomain,
    stale_after_secs: i64,
    json_out: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let state = StoreState::read(store, unix_now()).await?;
    let bundle = bundle_of(&state.authorities, trust_domain)?;
    let agents = agent_views(
        &state.acks,
        state.bundle_sequence,
        state.now,
        stale_after_secs,
    );
    let next = plan(&state.input(stale_after_secs));
    if json_out {
        let authorities: Vec<_> = state
            .authorities
            .iter()
            .map(|a| {
                json!({
                    "id": a.id,
                    "state": a.state.as_str(),
                    "subject": subject_of(a),
                    "not_before": fmt_time(a.not_before),
                    "not_after": fmt_time(a.not_after),
                    "live_leaves": state.live_count(&a.id),
                    "self_signed": a.cert_pem == a.root_pem,
                    "created_at": fmt_time(a.created_at),
                })
            })
            .collect();
        let value = json!({
            "bundle_sequence": state.bundle_sequence,
            "authorities": authorities,
            "agents": agents.iter().map(agent_json).collect::<Vec<_>>(),
            "stale_after_secs": stale_after_secs,
            "next_step": describe_plan(&next),
            "bundle_pem": bundle.to_pem(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<34} {:<9} {:<22} {:>11}  {:<12}  SUBJECT",
        "AUTHORITY", "STATE", "NOT AFTER", "LIVE LEAVES", "KIND"
    )?;
    for a in &state.authorities {
        let kind = if a.cert_pem == a.root_pem {
            "self-signed"
        } else {
            "intermediate"
        };
        writeln!(
            out,
            "{:<34} {:<9} {:<22} {:>11}  {:<12}  {}",
            a.id,
            a.state.as_str(),
            fmt_time(a.not_after),
            state.live_count(&a.id),
            kind,
            subject_of(a)
        )?;
    }
    if !state
        .authorities
        .iter()
        .any(|a| a.state == AuthorityState::Active)
    {
        writeln!(out, "warning: no active authority")?;
    }
    writeln!(out, "\nTrust-bundle sequence: {}", state.bundle_sequence)?;
    if agents.is_empty() {
        writeln!(out, "Agents: none has acknowledged a trust bundle")?;
    } else {
        let current = agents.iter().filter(|a| a.current).count();
        let live = agents.iter().filter(|a| a.live).count();
        writeln!(
            out,
            "Agents: {current} of {} hold the current bundle; {live} live, {} stale (not heard from for over {stale_after_secs}s)",
            agents.len(),
            agents.len() - live
        )?;
        writeln!(
            out,
            "{:<56} {:>9}  {:<22} {:<8} LIVENESS",
            "AGENT", "ACKED SEQ", "LAST SEEN", "BUNDLE"
        )?;
        for a in &agents {
            writeln!(
                out,
                "{:<56} {:>9}  {:<22} {:<8} {}",
                a.agent_id,
                a.sequence,
                fmt_time(a.acked_at),
                if a.current { "current" } else { "behind" },
                if a.live { "live" } else { "stale" }
            )?;
        }
    }
    writeln!(out, "Next rotation step: {}", describe_plan(&next))?;
    writeln!(out, "\nTrust bundle ({} root(s)):", bundle.roots().len())?;
    write!(out, "{}", bundle.to_pem())?;
    Ok(())
}

/// One line saying what the planner would do next.
pub fn describe_plan(p: &Plan) -> String {
    match p {
        Plan::Next(Transition::Prepare) => {
            "none in progress (`root rotate` would prepare a new root)".into()
        }
        Plan::Next(Transition::Activate(id)) => format!("activate {id} (propagated)"),
        Plan::Next(Transition::Remove(id)) => format!("remove {id} (no live certificate left)"),
        Plan::Wait(b) => format!("waiting: {}", describe_blocker(b)),
    }
}

/// What blocks, naming every agent or certificate.
pub fn describe_blocker(b: &Blocker) -> String {
    match b {
        Blocker::NoActive => "no authority is active".into(),
        Blocker::Propagation { authority, agents } => format!(
            "the bundle holding {authority} has not reached {} live agent(s): {}",
            agents.len(),
            agents
                .iter()
                .map(|a| format!("{} (acknowledged {})", a.agent_id, a.sequence))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Blocker::LiveLeaves { authority, leaves } => format!(
            "{} live certificate(s) of {authority} are neither expired nor re-issued: {}",
            leaves.len(),
            leaves
                .iter()
                .map(|l| format!(
                    "{} for {} (until {})",
                    l.issuance.spiffe_id,
                    l.issuance.requester,
                    fmt_time(l.issuance.not_after)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// How to make the new authority of `root prepare`.
#[derive(Debug, Clone)]
pub struct PrepareArgs<'a> {
    /// The trust domain.
    pub trust_domain: &'a TrustDomain,
    /// Import this operator CA directory instead of creating a self-signed root.
    pub ca_dir: Option<&'a Path>,
    /// Lifetime of a new self-signed root.
    pub root_lifetime_secs: i64,
}

/// `citadel root prepare`: a new self-signed root (or the operator's CA from `ca_dir`,
/// checked with a probe leaf), its key in the key store, added to the bundle as prepared.
/// Returns its ID.
pub async fn prepare<S: AuthorityStore + ?Sized>(
    store: &S,
    keys: &dyn KeyStore,
    args: &PrepareArgs<'_>,
    now: i64,
) -> anyhow::Result<String> {
    let (authority, key) = match args.ca_dir {
        Some(dir) => Authority::import_dir(dir)?,
        None => Authority::create_root(args.trust_domain, now, args.root_lifetime_secs)?,
    };
    probe(&authority, args.trust_domain, now)?;
    if let Some(known) = store
        .list_authorities()
        .await?
        .into_iter()
        .find(|r| r.id == authority.id())
    {
        anyhow::bail!(
            "authority {} is known already (state {}); nothing prepared",
            known.id,
            known.state
        );
    }
    let key_ref = save_key(keys, &authority, &key).await?;
    store
        .insert_authority(&record_of(
            &authority,
            AuthorityState::Prepared,
            &key_ref,
            now,
        ))
        .await?;
    Ok(authority.id().to_owned())
}

/// The result of `activate`, `retire` or `remove`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Done,
    /// Nothing to do (already in that state).
    Unchanged,
    /// Refused until what is printed changes (exit 1).
    Blocked,
}

fn emit(
    out: &mut dyn Write,
    json_out: bool,
    value: serde_json::Value,
    text: &str,
) -> anyhow::Result<()> {
    if json_out {
        writeln!(out, "{}", serde_json::to_string(&value)?)?;
    } else {
        writeln!(out, "{text}")?;
    }
    Ok(())
}

/// `citadel root activate ID [--force]`: refuses, naming every live agent that has not
/// acknowledged the current bundle (stale agents are listed, not blocking), unless `force`.
pub async fn activate<S: RotationStore + ?Sized>(
    store: &S,
    id: &str,
    force: bool,
    stale_after_secs: i64,
    json_out: bool,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let state = StoreState::read(store, unix_now()).await?;
    let input = state.input(stale_after_secs);
    let blockers = check_activate(&input, id)?;
    let stale: Vec<AgentView> = agent_views(
        &state.acks,
        state.bundle_sequence,
        state.now,
        stale_after_secs,
    )
    .into_iter()
    .filter(|a| !a.live && !a.current)
    .collect();
    let previous = state
        .authorities
        .iter()
        .find(|a| a.state == AuthorityState::Active)
        .map(|a| a.id.clone());
    if !blockers.is_empty() && !force {
        let text = format!(
            "refusing to activate {id}: {} live agent(s) have not acknowledged bundle {} (which holds its root) from all their proxies:\n{}{}\nwait for them, or pass --force",
            blockers.len(),
            state.bundle_sequence,
            blockers
                .iter()
                .map(|a| format!(
                    "  {} (acknowledged {}, last seen {})\n",
                    a.agent_id,
                    a.sequence,
                    fmt_time(a.acked_at)
                ))
                .collect::<String>(),
            stale_note(&stale),
        );
        emit(
            out,
            json_out,
            json!({"result": "blocked", "authority": id, "bundle_sequence": state.bundle_sequence,
                   "blocking_agents": blockers.iter().map(agent_json).collect::<Vec<_>>(),
                   "stale_agents": stale.iter().map(agent_json).collect::<Vec<_>>()}),
            text.trim_end(),
        )?;
        return Ok(Outcome::Blocked);
    }
    store
        .set_authority_state(id, AuthorityState::Active)
        .await?;
    let forced = if blockers.is_empty() {
        ""
    } else {
        " (forced past live agents that had not acknowledged it)"
    };
    emit(
        out,
        json_out,
        json!({"result": "activated", "authority": id, "retired": previous, "forced": !blockers.is_empty(),
               "stale_agents": stale.iter().map(agent_json).collect::<Vec<_>>()}),
        &format!(
            "activated {id}{forced}; {} retired (stops signing, stays in the bundle){}",
            previous.as_deref().unwrap_or("no authority"),
            stale_note(&stale).trim_end()
        ),
    )?;
    Ok(Outcome::Done)
}

fn stale_note(stale: &[AgentView]) -> String {
    if stale.is_empty() {
        return String::new();
    }
    format!(
        "\nstale agents (not blocking; they get the bundle when they return): {}\n",
        stale
            .iter()
            .map(|a| format!("{} (last seen {})", a.agent_id, fmt_time(a.acked_at)))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `citadel root retire ID`: a prepared authority is withdrawn from activation (its root
/// stays in the bundle until removed); the active one is refused (activate its successor).
pub async fn retire<S: RotationStore + ?Sized>(
    store: &S,
    id: &str,
    json_out: bool,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let state = StoreState::read(store, unix_now()).await?;
    if !check_retire(&state.input(0), id)? {
        emit(
            out,
            json_out,
            json!({"result": "unchanged", "authority": id, "state": "retired"}),
            &format!("{id} is retired already"),
        )?;
        return Ok(Outcome::Unchanged);
    }
    store
        .set_authority_state(id, AuthorityState::Retired)
        .await?;
    emit(
        out,
        json_out,
        json!({"result": "retired", "authority": id}),
        &format!("retired {id}: it does not sign and stays in the bundle until removed"),
    )?;
    Ok(Outcome::Done)
}

/// `citadel root remove ID [--force]`: takes the authority's root out of the bundle;
/// refuses while a certificate it signed is neither expired nor superseded, unless `force`.
pub async fn remove<S: RotationStore + ?Sized>(
    store: &S,
    id: &str,
    force: bool,
    json_out: bool,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let state = StoreState::read(store, unix_now()).await?;
    let leaves = check_remove(&state.input(0), id)?;
    if !leaves.is_empty() && !force {
        let blocker = Blocker::LiveLeaves {
            authority: id.to_owned(),
            leaves: leaves.clone(),
        };
        emit(
            out,
            json_out,
            json!({"result": "blocked", "authority": id, "live_leaves": leaves.iter().map(leaf_json).collect::<Vec<_>>()}),
            &format!(
                "refusing to remove {id}: {}\nwait until they are re-issued or expire, or pass --force (their holders will fail to connect)",
                describe_blocker(&blocker)
            ),
        )?;
        return Ok(Outcome::Blocked);
    }
    store
        .set_authority_state(id, AuthorityState::Removed)
        .await?;
    emit(
        out,
        json_out,
        json!({"result": "removed", "authority": id, "forced": !leaves.is_empty()}),
        &format!("removed {id}: its root leaves the trust bundle"),
    )?;
    Ok(Outcome::Done)
}

/// What [`take_step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepTaken {
    /// A new self-signed root was prepared.
    Prepared(String),
    /// `id` was activated; `retired` (the previously active one) was retired with it.
    Activated {
        /// The new signer.
        id: String,
        /// The previous signer, now retired.
        retired: Option<String>,
    },
    /// `id` left the trust bundle.
    Removed(String),
}

/// Takes one transition the planner decided, on the store: the one place where `root rotate`
/// and the running CA's automatic renewal act, so both take exactly the same steps.
pub async fn take_step<S: AuthorityStore + ?Sized>(
    store: &S,
    keys: &dyn KeyStore,
    trust_domain: &TrustDomain,
    state: &StoreState,
    step: &Transition,
    root_lifetime_secs: i64,
) -> anyhow::Result<StepTaken> {
    match step {
        Transition::Prepare => {
            let id = prepare(
                store,
                keys,
                &PrepareArgs {
                    trust_domain,
                    ca_dir: None,
                    root_lifetime_secs,
                },
                unix_now(),
            )
            .await?;
            Ok(StepTaken::Prepared(id))
        }
        Transition::Activate(id) => {
            let retired = state
                .authorities
                .iter()
                .find(|a| a.state == AuthorityState::Active)
                .map(|a| a.id.clone());
            store
                .set_authority_state(id, AuthorityState::Active)
                .await?;
            Ok(StepTaken::Activated {
                id: id.clone(),
                retired,
            })
        }
        Transition::Remove(id) => {
            store
                .set_authority_state(id, AuthorityState::Removed)
                .await?;
            Ok(StepTaken::Removed(id.clone()))
        }
    }
}

/// Settings of `citadel root rotate`.
#[derive(Debug, Clone)]
pub struct RotateOptions {
    /// The longest one phase may wait.
    pub timeout: Duration,
    /// Time between two reads of the store.
    pub poll: Duration,
    /// The stale window for agents.
    pub stale_after_secs: i64,
    /// Lifetime of the new root.
    pub root_lifetime_secs: i64,
    /// JSON lines instead of text.
    pub json: bool,
}

/// How a rotation run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateEnd {
    /// Every step is done.
    Completed,
    /// A phase waited longer than the timeout; the message names what blocks it.
    TimedOut(String),
}

/// `citadel root rotate`: prepare → wait for propagation → activate (retiring the old
/// authority) → wait until every certificate of the old one is re-issued or expired →
/// remove. Every step is decided by [`plan`] from the store alone, so a run that stops
/// (Ctrl-C, crash, timeout) is continued by the next one.
pub async fn rotate<S: RotationStore + ?Sized>(
    store: &S,
    keys: &dyn KeyStore,
    trust_domain: &TrustDomain,
    opts: &RotateOptions,
    out: &mut dyn Write,
) -> anyhow::Result<RotateEnd> {
    let mut started = false;
    let mut phase: Option<(String, tokio::time::Instant)> = None;
    let mut last_report: Option<(String, tokio::time::Instant)> = None;
    loop {
        let state = StoreState::read(store, unix_now()).await?;
        let next = plan(&state.input(opts.stale_after_secs));
        let (name, authority) = phase_of(&next);
        let key = format!("{name}:{authority}");
        if phase.as_ref().is_none_or(|(k, _)| *k != key) {
            phase = Some((key.clone(), tokio::time::Instant::now()));
        }
        match next {
            Plan::Next(Transition::Prepare) if started => {
                report(
                    out,
                    opts.json,
                    "done",
                    "",
                    "rotation complete: the new root signs and the old one has left the trust bundle",
                    &[],
                )?;
                return Ok(RotateEnd::Completed);
            }
            Plan::Next(step) => {
                match take_step(
                    store,
                    keys,
                    trust_domain,
                    &state,
                    &step,
                    opts.root_lifetime_secs,
                )
                .await?
                {
                    StepTaken::Prepared(id) => report(
                        out,
                        opts.json,
                        "prepare",
                        &id,
                        &format!(
                            "prepared {id}: its root is in the trust bundle, it does not sign yet"
                        ),
                        &[],
                    )?,
                    StepTaken::Activated { id, retired } => {
                        let previous = retired.unwrap_or_default();
                        report(
                            out,
                            opts.json,
                            "activate",
                            &id,
                            &format!(
                                "activated {id}: every live agent's proxies hold its root; agents now re-issue their certificates"
                            ),
                            &[],
                        )?;
                        report(
                            out,
                            opts.json,
                            "retire",
                            &previous,
                            &format!(
                                "retired {previous}: it no longer signs and stays in the bundle while its certificates live"
                            ),
                            &[],
                        )?;
                    }
                    StepTaken::Removed(id) => report(
                        out,
                        opts.json,
                        "remove",
                        &id,
                        &format!("removed {id} from the trust bundle"),
                        &[],
                    )?,
                }
            }
            Plan::Wait(blocker) => {
                let blocking = blocking_names(&blocker);
                let message = describe_blocker(&blocker);
                let since = phase
                    .as_ref()
                    .map_or_else(tokio::time::Instant::now, |(_, t)| *t);
                if since.elapsed() > opts.timeout {
                    let msg = format!(
                        "phase {name} exceeded --timeout {}s; {message}. Run `citadel root rotate` again to continue",
                        opts.timeout.as_secs()
                    );
                    report(out, opts.json, name, &authority, &msg, &blocking)?;
                    return Ok(RotateEnd::TimedOut(msg));
                }
                let due = last_report
                    .as_ref()
                    .is_none_or(|(m, t)| *m != message || t.elapsed() >= Duration::from_secs(5));
                if due {
                    report(
                        out,
                        opts.json,
                        name,
                        &authority,
                        &format!("waiting: {message}"),
                        &blocking,
                    )?;
                    last_report = Some((message, tokio::time::Instant::now()));
                }
                tokio::time::sleep(opts.poll).await;
                // A run that finds a rotation under way continues it to the end.
                started = true;
                continue;
            }
        }
        started = true;
    }
}

/// The phase a plan belongs to, and its authority.
fn phase_of(p: &Plan) -> (&'static str, String) {
    match p {
        Plan::Next(Transition::Prepare) => ("prepare", String::new()),
        Plan::Next(Transition::Activate(id)) => ("activate", id.clone()),
        Plan::Next(Transition::Remove(id)) => ("remove", id.clone()),
        Plan::Wait(Blocker::NoActive) => ("blocked", String::new()),
        Plan::Wait(Blocker::Propagation { authority, .. }) => ("propagate", authority.clone()),
        Plan::Wait(Blocker::LiveLeaves { authority, .. }) => ("reissue", authority.clone()),
    }
}

fn blocking_names(b: &Blocker) -> Vec<String> {
    match b {
        Blocker::NoActive => Vec::new(),
        Blocker::Propagation { agents, .. } => agents.iter().map(|a| a.agent_id.clone()).collect(),
        Blocker::LiveLeaves { leaves, .. } => leaves
            .iter()
            .map(|l| format!("{} ({})", l.issuance.spiffe_id, l.issuance.requester))
            .collect(),
    }
}

fn report(
    out: &mut dyn Write,
    json_out: bool,
    phase: &str,
    authority: &str,
    message: &str,
    blocking: &[String],
) -> anyhow::Result<()> {
    if json_out {
        writeln!(
            out,
            "{}",
            serde_json::to_string(&json!({
                "time": fmt_time(unix_now()),
                "phase": phase,
                "authority": authority,
                "message": message,
                "blocking": blocking,
            }))?
        )?;
    } else {
        writeln!(out, "[{}] {phase:<9} {message}", fmt_time(unix_now()))?;
    }
    out.flush()?;
    Ok(())
}
