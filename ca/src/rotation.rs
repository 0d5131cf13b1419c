//! The rotation planner: what the next step of a root rotation is, or what blocks it.
//!
//! Pure: it takes the authority records, the trust-bundle sequence, the agents'
//! acknowledgements, the live leaves from the ledger and `now`, and decides. The CLI
//! (`citadel root activate|retire|remove|rotate`) uses it to refuse or proceed; every rule
//! has a named unit test below.
//!
//! The lifecycle is `prepared → active → retired → removed`. The store keeps exactly one
//! authority active, so activating a new one retires the previous one in the same
//! transaction: there is never a moment with no signer, nor one with two.

use citadel_store::{AuthorityRecord, AuthorityState, BundleAck, LedgerEntry};

/// Default of `--stale-after`: an agent whose last acknowledgement or heartbeat is older
/// than this is stale. Agents heartbeat every 5 s and the CA records a heartbeat at most
/// every 5 s, so a live agent's `acked_at` is at most ~10 s old; 60 s leaves room for a
/// CA restart or a reconnect with backoff.
pub const DEFAULT_STALE_AFTER_SECS: i64 = 60;

/// What the planner looks at.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// Every authority record.
    pub authorities: &'a [AuthorityRecord],
    /// The store's trust-bundle sequence.
    pub bundle_sequence: u64,
    /// Every agent's latest acknowledgement.
    pub acks: &'a [BundleAck],
    /// Every ledger row valid at `now`.
    pub live_leaves: &'a [LedgerEntry],
    /// Unix seconds.
    pub now: i64,
    /// An agent not heard from for longer than this is stale.
    pub stale_after_secs: i64,
}

/// An agent as the rotation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentView {
    /// The agent's SPIFFE ID.
    pub agent_id: String,
    /// The highest bundle sequence it acknowledged.
    pub sequence: u64,
    /// When it last acknowledged or sent a heartbeat.
    pub acked_at: i64,
    /// Heard from within the stale window.
    pub live: bool,
    /// It acknowledged the store's current bundle sequence.
    pub current: bool,
}

/// A step the planner says to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Create a new root and add it to the bundle as prepared.
    Prepare,
    /// Make this prepared authority the signer (the active one is retired with it).
    Activate(String),
    /// Take this retired authority out of the bundle.
    Remove(String),
}

/// Why the next step cannot be taken yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// No authority is active: there is nothing to rotate from.
    NoActive,
    /// These live agents have not acknowledged the bundle that holds `authority`'s root.
    Propagation {
        /// The prepared authority.
        authority: String,
        /// The live agents behind.
        agents: Vec<AgentView>,
    },
    /// These live certificates of `authority` are neither expired nor superseded.
    LiveLeaves {
        /// The retired authority.
        authority: String,
        /// The certificates.
        leaves: Vec<LedgerEntry>,
    },
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Take this step now.
    Next(Transition),
    /// Wait: this blocks the next step.
    Wait(Blocker),
}

/// Why an operator's transition is refused outright (not merely not yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No authority with that ID.
    #[error("no authority {0}; `citadel root status` lists them")]
    Unknown(String),
    /// The authority is not in a state the transition starts from.
    #[error("authority {id} is {state}: {why}")]
    WrongState {
        /// The authority.
        id: String,
        /// Its state.
        state: AuthorityState,
        /// What to do instead.
        why: &'static str,
    },
}

/// Every agent with its liveness and whether it holds the current bundle (pure).
pub fn agent_views(
    acks: &[BundleAck],
    bundle_sequence: u64,
    now: i64,
    stale_after_secs: i64,
) -> Vec<AgentView> {
    acks.iter()
        .map(|a| AgentView {
            agent_id: a.agent_id.clone(),
            sequence: a.sequence,
            acked_at: a.acked_at,
            live: now.saturating_sub(a.acked_at) <= stale_after_secs,
            current: a.sequence >= bundle_sequence,
        })
        .collect()
}

/// The live agents that have not acknowledged the current bundle (pure). Stale agents
/// never block: they are listed by `root status` and by a refused activation.
pub fn propagation_blockers(input: &PlanInput<'_>) -> Vec<AgentView> {
    agent_views(
        input.acks,
        input.bundle_sequence,
        input.now,
        input.stale_after_secs,
    )
    .into_iter()
    .filter(|a| a.live && !a.current)
    .collect()
}

/// The live certificates of `authority` that are not superseded (pure). A certificate is
/// superseded when the active authority has issued the same identity to the same requester
/// after it (a later ledger row that is live too): whoever held it has its replacement.
pub fn unsuperseded_leaves(input: &PlanInput<'_>, authority: &str) -> Vec<LedgerEntry> {
    let active = active_of(input.authorities).map(|a| a.id.as_str());
    input
        .live_leaves
        .iter()
        .filter(|l| l.issuance.authority_id == authority && l.issuance.not_after > input.now)
        .filter(|l| {
            !input.live_leaves.iter().any(|m| {
                Some(m.issuance.authority_id.as_str()) == active
                    && m.issuance.authority_id != authority
                    && m.seq > l.seq
                    && m.issuance.not_after > input.now
                    && m.issuance.spiffe_id == l.issuance.spiffe_id
                    && m.issuance.requester == l.issuance.requester
            })
        })
        .cloned()
        .collect()
}

fn active_of(authorities: &[AuthorityRecord]) -> Option<&AuthorityRecord> {
    authorities
        .iter()
        .find(|a| a.state == AuthorityState::Active)
}

fn find<'a>(input: &PlanInput<'a>, id: &str) -> Result<&'a AuthorityRecord, Refusal> {
    input
        .authorities
        .iter()
        .find(|a| a.id == id)
        .ok_or_else(|| Refusal::Unknown(id.to_owned()))
}

/// Whether `id` may be activated now: `Ok(vec![])` yes, `Ok(agents)` not until these live
/// agents acknowledged the current bundle, `Err` never from its state (pure). A prepared
/// authority, or a retired one (rolling back), may be activated; its root is in the bundle.
pub fn check_activate(input: &PlanInput<'_>, id: &str) -> Result<Vec<AgentView>, Refusal> {
    let rec = find(input, id)?;
    match rec.state {
        AuthorityState::Prepared | AuthorityState::Retired => Ok(propagation_blockers(input)),
        AuthorityState::Active => Err(Refusal::WrongState {
            id: id.to_owned(),
            state: rec.state,
            why: "it already signs",
        }),
        AuthorityState::Removed => Err(Refusal::WrongState {
            id: id.to_owned(),
            state: rec.state,
            why: "its root has left the trust bundle; prepare a new authority",
        }),
    }
}

/// Whether `id` may be retired (pure): a prepared one may (it never signed); the active
/// one may not (activate its successor instead, which retires it in the same step, so the
/// CA is never without a signer); a retired one already is (`Ok(false)`: nothing to do).
pub fn check_retire(input: &PlanInput<'_>, id: &str) -> Result<bool, Refusal> {
    let rec = find(input, id)?;
    match rec.state {
        AuthorityState::Prepared => Ok(true),
        AuthorityState::Retired => Ok(false),
        AuthorityState::Active => Err(Refusal::WrongState {
            id: id.to_owned(),
            state: rec.state,
            why: "activate its successor instead (`citadel root activate NEW_ID` retires it in the same step)",
        }),
        AuthorityState::Removed => Err(Refusal::WrongState {
            id: id.to_owned(),
            state: rec.state,
            why: "it has left the trust bundle already",
        }),
    }
}

/// Whether `id` may be removed now: `Ok(vec![])` yes, `Ok(leaves)` not while these live
/// certificates of it are neither expired nor superseded, `Err` never from its state
/// (pure).
pub fn check_remove(input: &PlanInput<'_>, id: &str) -> Result<Vec<LedgerEntry>, Refusal> {
    let rec = find(input, id)?;
    match rec.state {
        AuthorityState::Prepared | AuthorityState::Retired => Ok(unsuperseded_leaves(input, id)),
        AuthorityState::Active => Err(Refusal::WrongState {
            id: id.to_owned(),
            state: rec.state,
            why: "it signs; activate its successor first",
        }),
        AuthorityState::Removed => Err(Refusal::WrongState {
            id: id.to_owned(),
            state: rec.state,
            why: "it was removed already",
        }),
    }
}

/// The next step of a rotation, or what blocks it (pure). Rules, in order:
/// 1. no active authority: nothing to rotate from ([`Blocker::NoActive`]);
/// 2. a prepared authority not older than the active one is activated once every live
///    agent acknowledged the current bundle (which holds its root); older prepared ones
///    were passed over and are left alone;
/// 3. a retired authority is removed once none of its live certificates is unsuperseded
///    (the oldest removable first);
/// 4. otherwise nothing is in progress: prepare a new authority.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let Some(active) = active_of(input.authorities) else {
        return Plan::Wait(Blocker::NoActive);
    };
    if let Some(step) = activation_step(input, active) {
        return step;
    }
    removal_step(input).unwrap_or(Plan::Next(Transition::Prepare))
}

/// Rule 2 of [`plan`]: the newest prepared authority not older than `active`, activated
/// once propagated; `None` when there is none.
fn activation_step(input: &PlanInput<'_>, active: &AuthorityRecord) -> Option<Plan> {
    let next = input
        .authorities
        .iter()
        .filter(|a| a.state == AuthorityState::Prepared && is_newer(a, active))
        .max_by_key(|a| (a.created_at, a.id.clone()))?;
    let agents = propagation_blockers(input);
    Some(if agents.is_empty() {
        Plan::Next(Transition::Activate(next.id.clone()))
    } else {
        Plan::Wait(Blocker::Propagation {
            authority: next.id.clone(),
            agents,
        })
    })
}

/// Rule 3 of [`plan`]: remove the oldest removable retired authority, or wait for the first
/// blocked one; `None` when none is retired.
fn removal_step(input: &PlanInput<'_>) -> Option<Plan> {
    removal_step_of(input, |_| true)
}

/// [`removal_step`] over the retired authorities `eligible` accepts.
fn removal_step_of(
    input: &PlanInput<'_>,
    eligible: impl Fn(&AuthorityRecord) -> bool,
) -> Option<Plan> {
    let mut retired: Vec<&AuthorityRecord> = input
        .authorities
        .iter()
        .filter(|a| a.state == AuthorityState::Retired && eligible(a))
        .collect();
    retired.sort_by_key(|a| (a.created_at, a.id.clone()));
    let mut first_blocked = None;
    for r in retired {
        let leaves = unsuperseded_leaves(input, &r.id);
        if leaves.is_empty() {
            return Some(Plan::Next(Transition::Remove(r.id.clone())));
        }
        first_blocked.get_or_insert(Blocker::LiveLeaves {
            authority: r.id.clone(),
            leaves,
        });
    }
    first_blocked.map(Plan::Wait)
}

/// Default of `--root-renewal-at`: a self-signed root is renewed once two thirds of its
/// lifetime have passed, which leaves a third of it (over three years of a 10-year root)
/// for propagation, re-issuance and removal, and for an operator to notice a stuck step.
pub const DEFAULT_RENEWAL_FRACTION: f64 = 2.0 / 3.0;

/// When the running CA renews its root by itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewalPolicy {
    /// The fraction of the active root's lifetime (notBefore to notAfter) after which a new
    /// root is prepared; strictly between 0 and 1.
    pub prepare_at: f64,
}

impl RenewalPolicy {
    /// A policy preparing at `prepare_at`, which must be strictly between 0 and 1.
    pub fn new(prepare_at: f64) -> Result<RenewalPolicy, String> {
        if prepare_at.is_finite() && prepare_at > 0.0 && prepare_at < 1.0 {
            Ok(RenewalPolicy { prepare_at })
        } else {
            Err(format!(
                "the renewal fraction must be strictly between 0 and 1, got {prepare_at}"
            ))
        }
    }

    /// The instant `authority` is due for renewal (pure): `prepare_at` of the way from its
    /// notBefore to its notAfter, rounded down to the second.
    pub fn due_at(&self, authority: &AuthorityRecord) -> i64 {
        let span = authority
            .not_after
            .saturating_sub(authority.not_before)
            .max(0);
        // f64 holds any realistic certificate lifetime in seconds exactly.
        let offset = (span as f64 * self.prepare_at).floor() as i64;
        authority.not_before.saturating_add(offset)
    }
}

/// Whether an authority is a self-signed root the CA made (it can make another one); an
/// operator's plug-in intermediate is not.
pub fn is_self_signed(a: &AuthorityRecord) -> bool {
    !a.root_pem.is_empty() && a.cert_pem == a.root_pem
}

/// Why the renewal task does nothing this time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idle {
    /// The active root is not due yet: it will be at this instant.
    NotDue {
        /// The active authority.
        authority: String,
        /// When it is due (unix seconds).
        due_at: i64,
    },
    /// The active authority is an operator's plug-in CA: the CA cannot mint its successor,
    /// the operator renews it (a new `--ca-dir` set or `citadel root prepare --ca-dir`).
    PlugIn {
        /// The active authority.
        authority: String,
        /// When it was due (unix seconds).
        due_at: i64,
    },
}

/// What the renewal task does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewalPlan {
    /// Take this step, or wait for what blocks it (the same gated steps as `root rotate`).
    Step(Plan),
    /// Nothing to do.
    Idle(Idle),
}

/// The next step of the automatic renewal, or why there is none (pure). Rules, in order:
/// 1. no active authority: blocked ([`Blocker::NoActive`]);
/// 2. the active authority is due (its lifetime has passed `prepare_at`) and a prepared
///    authority not older than it exists: activate it once propagated ([`plan`]'s rule 2;
///    no second one is prepared);
/// 3. a retired authority is removed once none of its live certificates is unsuperseded,
///    whether or not anything is due ([`plan`]'s rule 3);
/// 4. not due: idle until [`RenewalPolicy::due_at`]; a prepared authority waits for the
///    operator meanwhile (`root prepare` without `activate` is left alone);
/// 5. due, but the active authority is a plug-in CA: idle (never renewed automatically;
///    only an operator's new set, once prepared, is activated by rule 2);
/// 6. due and self-signed: prepare a new root.
pub fn plan_renewal(input: &PlanInput<'_>, policy: &RenewalPolicy) -> RenewalPlan {
    let Some(active) = active_of(input.authorities) else {
        return RenewalPlan::Step(Plan::Wait(Blocker::NoActive));
    };
    let due_at = policy.due_at(active);
    let due = input.now >= due_at;
    if due && let Some(step) = activation_step(input, active) {
        return RenewalPlan::Step(step);
    }
    // Only a retired root that had itself reached its renewal point is removed
    // automatically: that is the one renewal replaced. A root an operator retired
    // early (by `root activate` of a successor) stays for the operator's
    // `root remove` or `root rotate`, so a roll-back stays possible and the two
    // never race for the same step.
    if let Some(step) = removal_step_of(input, |a| input.now >= policy.due_at(a)) {
        return RenewalPlan::Step(step);
    }
    let authority = active.id.clone();
    if !due {
        return RenewalPlan::Idle(Idle::NotDue { authority, due_at });
    }
    if !is_self_signed(active) {
        return RenewalPlan::Idle(Idle::PlugIn { authority, due_at });
    }
    RenewalPlan::Step(Plan::Next(Transition::Prepare))
}

/// Whether `a` was not created before `b`. Creation times are whole seconds, so an authority
/// prepared in the same second as the active one was created counts as newer: passing it
/// over would end a rotation that has not happened.
fn is_newer(a: &AuthorityRecord, b: &AuthorityRecord) -> bool {
    a.created_at >= b.created_at
}

#[cfg(test)]
mod tests {
    use super::*;
    use citadel_store::NewIssuance;

    const NOW: i64 = 10_000;

    fn auth(id: &str, state: AuthorityState, created_at: i64) -> AuthorityRecord {
        AuthorityRecord {
            id: id.into(),
            state,
            cert_pem: String::new(),
            chain_pem: String::new(),
            root_pem: String::new(),
            not_before: 0,
            not_after: i64::MAX,
            key_ref: format!("{id}.key.pem"),
            created_at,
        }
    }

    fn ack(agent: &str, sequence: u64, acked_at: i64) -> BundleAck {
        BundleAck {
            agent_id: agent.into(),
            sequence,
            acked_at,
        }
    }

    fn leaf(seq: i64, authority: &str, id: &str, requester: &str, not_after: i64) -> LedgerEntry {
        LedgerEntry {
            seq,
            issuance: NewIssuance {
                serial_hex: format!("{seq:x}"),
                spiffe_id: id.into(),
                authority_id: authority.into(),
                not_before: 0,
                not_after,
                requester: requester.into(),
                node: None,
                der_sha256: [0; 32],
                issued_at: 0,
            },
            prev_hash: [0; 32],
            row_hash: [0; 32],
        }
    }

    fn input<'a>(
        authorities: &'a [AuthorityRecord],
        sequence: u64,
        acks: &'a [BundleAck],
        leaves: &'a [LedgerEntry],
    ) -> PlanInput<'a> {
        PlanInput {
            authorities,
            bundle_sequence: sequence,
            acks,
            live_leaves: leaves,
            now: NOW,
            stale_after_secs: DEFAULT_STALE_AFTER_SECS,
        }
    }

    #[test]
    fn nothing_in_progress_means_prepare() {
        let a = [auth("old", AuthorityState::Active, 1)];
        assert_eq!(
            plan(&input(&a, 1, &[], &[])),
            Plan::Next(Transition::Prepare)
        );
    }

    #[test]
    fn no_active_authority_blocks_the_rotation() {
        let a = [auth("p", AuthorityState::Prepared, 1)];
        assert_eq!(plan(&input(&a, 1, &[], &[])), Plan::Wait(Blocker::NoActive));
    }

    #[test]
    fn prepared_authority_waits_for_every_live_agent_to_acknowledge_the_current_bundle() {
        let a = [
            auth("old", AuthorityState::Active, 1),
            auth("new", AuthorityState::Prepared, 2),
        ];
        let acks = [ack("node-a", 2, NOW - 1), ack("node-b", 1, NOW - 3)];
        match plan(&input(&a, 2, &acks, &[])) {
            Plan::Wait(Blocker::Propagation { authority, agents }) => {
                assert_eq!(authority, "new");
                assert_eq!(agents.len(), 1);
                assert_eq!(agents[0].agent_id, "node-b");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stale_agents_do_not_block_activation() {
        let a = [
            auth("old", AuthorityState::Active, 1),
            auth("new", AuthorityState::Prepared, 2),
        ];
        let acks = [
            ack("node-a", 2, NOW),
            ack("gone", 1, NOW - DEFAULT_STALE_AFTER_SECS - 1),
        ];
        assert_eq!(
            plan(&input(&a, 2, &acks, &[])),
            Plan::Next(Transition::Activate("new".into()))
        );
        let views = agent_views(&acks, 2, NOW, DEFAULT_STALE_AFTER_SECS);
        assert!(views[0].live && views[0].current);
        assert!(!views[1].live && !views[1].current);
    }

    #[test]
    fn an_agent_at_the_edge_of_the_stale_window_is_still_live() {
        let acks = [ack("edge", 1, NOW - DEFAULT_STALE_AFTER_SECS)];
        assert!(agent_views(&acks, 2, NOW, DEFAULT_STALE_AFTER_SECS)[0].live);
    }

    #[test]
    fn prepared_authority_is_activated_once_propagated() {
        let a = [
            auth("old", AuthorityState::Active, 1),
            auth("new", AuthorityState::Prepared, 2),
        ];
        let acks = [ack("node-a", 2, NOW), ack("node-b", 3, NOW)];
        assert_eq!(
            plan(&input(&a, 2, &acks, &[])),
            Plan::Next(Transition::Activate("new".into()))
        );
    }

    #[test]
    fn prepared_authority_older_than_the_active_one_is_left_alone() {
        let a = [
            auth("passed-over", AuthorityState::Prepared, 1),
            auth("current", AuthorityState::Active, 2),
        ];
        assert_eq!(
            plan(&input(&a, 3, &[], &[])),
            Plan::Next(Transition::Prepare)
        );
    }

    #[test]
    fn a_prepared_authority_created_in_the_active_one_s_second_is_activated() {
        for (active, prepared) in [("zzz", "aaa"), ("aaa", "zzz")] {
            let a = [
                auth(active, AuthorityState::Active, 5),
                auth(prepared, AuthorityState::Prepared, 5),
            ];
            assert_eq!(
                plan(&input(&a, 2, &[], &[])),
                Plan::Next(Transition::Activate(prepared.into()))
            );
        }
    }

    #[test]
    fn the_newest_prepared_authority_is_the_one_activated() {
        let a = [
            auth("old", AuthorityState::Active, 1),
            auth("p1", AuthorityState::Prepared, 2),
            auth("p2", AuthorityState::Prepared, 3),
        ];
        assert_eq!(
            plan(&input(&a, 3, &[], &[])),
            Plan::Next(Transition::Activate("p2".into()))
        );
    }

    #[test]
    fn retired_authority_with_an_unsuperseded_live_leaf_waits_for_reissue() {
        let a = [
            auth("old", AuthorityState::Retired, 1),
            auth("new", AuthorityState::Active, 2),
        ];
        let leaves = [
            leaf(
                1,
                "old",
                "spiffe://td/web",
                "spiffe://td/citadel/node/a",
                NOW + 50,
            ),
            leaf(
                2,
                "old",
                "spiffe://td/api",
                "spiffe://td/citadel/node/a",
                NOW + 50,
            ),
            leaf(
                3,
                "new",
                "spiffe://td/web",
                "spiffe://td/citadel/node/a",
                NOW + 90,
            ),
        ];
        match plan(&input(&a, 3, &[], &leaves)) {
            Plan::Wait(Blocker::LiveLeaves { authority, leaves }) => {
                assert_eq!(authority, "old");
                assert_eq!(leaves.len(), 1);
                assert_eq!(leaves[0].issuance.spiffe_id, "spiffe://td/api");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retired_authority_whose_leaves_are_expired_or_superseded_is_removed() {
        let a = [
            auth("old", AuthorityState::Retired, 1),
            auth("new", AuthorityState::Active, 2),
        ];
        let leaves = [
            leaf(1, "old", "spiffe://td/web", "node-a", NOW),
            leaf(2, "old", "spiffe://td/api", "node-a", NOW + 50),
            leaf(3, "new", "spiffe://td/api", "node-a", NOW + 90),
        ];
        assert_eq!(
            plan(&input(&a, 3, &[], &leaves)),
            Plan::Next(Transition::Remove("old".into()))
        );
    }

    #[test]
    fn superseded_means_same_identity_and_requester_reissued_later_by_the_active_authority() {
        let a = [
            auth("old", AuthorityState::Retired, 1),
            auth("other", AuthorityState::Retired, 2),
            auth("new", AuthorityState::Active, 3),
        ];
        let l = |seq, authority, requester| {
            leaf(seq, authority, "spiffe://td/web", requester, NOW + 50)
        };
        let cases = [
            // (replacement, superseded?)
            (l(5, "new", "node-a"), true),
            (l(5, "new", "node-b"), false),   // another requester
            (l(5, "other", "node-a"), false), // not the active authority
            (leaf(5, "new", "spiffe://td/api", "node-a", NOW + 50), false), // another identity
            (l(0, "new", "node-a"), false),   // issued before it
            (leaf(5, "new", "spiffe://td/web", "node-a", NOW), false), // expired replacement
        ];
        for (replacement, superseded) in cases {
            let leaves = [l(1, "old", "node-a"), replacement.clone()];
            let remaining = unsuperseded_leaves(&input(&a, 1, &[], &leaves), "old");
            assert_eq!(remaining.is_empty(), superseded, "{replacement:?}");
        }
    }

    #[test]
    fn a_prepared_authority_is_activated_before_a_retired_one_is_removed() {
        let a = [
            auth("older", AuthorityState::Retired, 1),
            auth("old", AuthorityState::Active, 2),
            auth("new", AuthorityState::Prepared, 3),
        ];
        assert_eq!(
            plan(&input(&a, 3, &[], &[])),
            Plan::Next(Transition::Activate("new".into()))
        );
    }

    #[test]
    fn removed_authorities_play_no_part() {
        let a = [
            auth("gone", AuthorityState::Removed, 1),
            auth("cur", AuthorityState::Active, 2),
        ];
        let leaves = [leaf(1, "gone", "spiffe://td/web", "n", NOW + 50)];
        assert_eq!(
            plan(&input(&a, 3, &[], &leaves)),
            Plan::Next(Transition::Prepare)
        );
    }

    #[test]
    fn rejects_activating_the_active_or_a_removed_authority() {
        let a = [
            auth("gone", AuthorityState::Removed, 1),
            auth("cur", AuthorityState::Active, 2),
        ];
        let i = input(&a, 1, &[], &[]);
        assert!(matches!(
            check_activate(&i, "cur"),
            Err(Refusal::WrongState { .. })
        ));
        assert!(matches!(
            check_activate(&i, "gone"),
            Err(Refusal::WrongState { .. })
        ));
        assert!(matches!(
            check_activate(&i, "nope"),
            Err(Refusal::Unknown(_))
        ));
    }

    #[test]
    fn activation_is_blocked_by_a_live_agent_behind_and_names_it() {
        let a = [
            auth("cur", AuthorityState::Active, 1),
            auth("new", AuthorityState::Prepared, 2),
        ];
        let acks = [ack("stopped", 1, NOW - 5)];
        let blockers = check_activate(&input(&a, 2, &acks, &[]), "new").unwrap();
        assert_eq!(blockers.len(), 1);
        assert_eq!(blockers[0].agent_id, "stopped");
    }

    #[test]
    fn rejects_retiring_the_active_authority() {
        let a = [
            auth("cur", AuthorityState::Active, 1),
            auth("p", AuthorityState::Prepared, 2),
            auth("r", AuthorityState::Retired, 0),
        ];
        let i = input(&a, 1, &[], &[]);
        assert!(matches!(
            check_retire(&i, "cur"),
            Err(Refusal::WrongState { .. })
        ));
        assert_eq!(check_retire(&i, "p"), Ok(true));
        assert_eq!(check_retire(&i, "r"), Ok(false));
    }

    #[test]
    fn rejects_removing_while_a_live_leaf_remains_and_the_active_authority_ever() {
        let a = [
            auth("old", AuthorityState::Retired, 1),
            auth("cur", AuthorityState::Active, 2),
        ];
        let leaves = [leaf(1, "old", "spiffe://td/web", "n", NOW + 50)];
        let i = input(&a, 1, &[], &leaves);
        assert_eq!(check_remove(&i, "old").unwrap().len(), 1);
        assert!(matches!(
            check_remove(&i, "cur"),
            Err(Refusal::WrongState { .. })
        ));
    }

    // --- automatic renewal -------------------------------------------------------------

    const POLICY: RenewalPolicy = RenewalPolicy { prepare_at: 0.5 };

    /// A self-signed root valid 0..2*NOW: due at NOW under [`POLICY`].
    fn root(id: &str, state: AuthorityState, created_at: i64) -> AuthorityRecord {
        AuthorityRecord {
            cert_pem: format!("root {id}"),
            root_pem: format!("root {id}"),
            not_before: 0,
            not_after: 2 * NOW,
            ..auth(id, state, created_at)
        }
    }

    fn plug_in(id: &str, state: AuthorityState, created_at: i64) -> AuthorityRecord {
        AuthorityRecord {
            cert_pem: format!("intermediate {id}"),
            ..root(id, state, created_at)
        }
    }

    fn at(mut i: PlanInput<'_>, now: i64) -> PlanInput<'_> {
        i.now = now;
        i
    }

    #[test]
    fn renewal_is_not_due_before_the_fraction_of_the_lifetime() {
        let a = [root("cur", AuthorityState::Active, 1)];
        assert_eq!(
            plan_renewal(&at(input(&a, 1, &[], &[]), NOW - 1), &POLICY),
            RenewalPlan::Idle(Idle::NotDue {
                authority: "cur".into(),
                due_at: NOW
            })
        );
    }

    #[test]
    fn a_due_self_signed_root_is_renewed_by_preparing_a_new_one() {
        let a = [root("cur", AuthorityState::Active, 1)];
        for now in [NOW, NOW + 1, 2 * NOW + 5] {
            assert_eq!(
                plan_renewal(&at(input(&a, 1, &[], &[]), now), &POLICY),
                RenewalPlan::Step(Plan::Next(Transition::Prepare)),
                "at {now}"
            );
        }
    }

    #[test]
    fn renewal_fraction_is_measured_over_the_root_s_own_lifetime() {
        let p = RenewalPolicy::new(2.0 / 3.0).unwrap();
        let r = AuthorityRecord {
            not_before: 1_000,
            not_after: 1_000 + 3_000,
            ..root("r", AuthorityState::Active, 1)
        };
        assert_eq!(p.due_at(&r), 3_000);
        assert_eq!(DEFAULT_RENEWAL_FRACTION, 2.0 / 3.0);
    }

    #[test]
    fn rejects_a_renewal_fraction_outside_zero_to_one() {
        for f in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            assert!(RenewalPolicy::new(f).is_err(), "{f}");
        }
        assert!(RenewalPolicy::new(0.9).is_ok());
    }

    #[test]
    fn an_already_prepared_root_is_activated_once_propagated_not_prepared_again() {
        let a = [
            root("cur", AuthorityState::Active, 1),
            root("next", AuthorityState::Prepared, 2),
        ];
        let behind = [ack("node-a", 1, NOW)];
        match plan_renewal(&input(&a, 2, &behind, &[]), &POLICY) {
            RenewalPlan::Step(Plan::Wait(Blocker::Propagation { authority, agents })) => {
                assert_eq!(authority, "next");
                assert_eq!(agents[0].agent_id, "node-a");
            }
            other => panic!("{other:?}"),
        }
        let current = [ack("node-a", 2, NOW)];
        assert_eq!(
            plan_renewal(&input(&a, 2, &current, &[]), &POLICY),
            RenewalPlan::Step(Plan::Next(Transition::Activate("next".into())))
        );
    }

    #[test]
    fn a_prepared_root_is_left_to_the_operator_while_the_active_one_is_not_due() {
        let a = [
            root("cur", AuthorityState::Active, 1),
            root("held", AuthorityState::Prepared, 2),
        ];
        assert!(matches!(
            plan_renewal(&at(input(&a, 2, &[], &[]), NOW - 1), &POLICY),
            RenewalPlan::Idle(Idle::NotDue { .. })
        ));
    }

    #[test]
    fn a_retired_root_is_removed_when_allowed_even_when_nothing_is_due() {
        // "old" lived 0..NOW, so it was due at NOW / 2; "cur" is not due yet.
        let old = AuthorityRecord {
            not_after: NOW,
            ..root("old", AuthorityState::Retired, 1)
        };
        let a = [old, root("cur", AuthorityState::Active, 2)];
        let live = [leaf(1, "old", "spiffe://td/web", "n", NOW + 50)];
        let early = NOW - 10;
        match plan_renewal(&at(input(&a, 3, &[], &live), early), &POLICY) {
            RenewalPlan::Step(Plan::Wait(Blocker::LiveLeaves { authority, .. })) => {
                assert_eq!(authority, "old")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            plan_renewal(&at(input(&a, 3, &[], &[]), early), &POLICY),
            RenewalPlan::Step(Plan::Next(Transition::Remove("old".into())))
        );
    }

    #[test]
    fn a_retired_root_that_was_not_due_is_left_to_the_operator() {
        // Retired early by an operator's activation of "cur": neither is due.
        let a = [
            root("old", AuthorityState::Retired, 1),
            root("cur", AuthorityState::Active, 2),
        ];
        assert_eq!(
            plan_renewal(&at(input(&a, 3, &[], &[]), NOW - 10), &POLICY),
            RenewalPlan::Idle(Idle::NotDue {
                authority: "cur".into(),
                due_at: NOW
            })
        );
    }

    #[test]
    fn a_plug_in_root_is_never_renewed_automatically() {
        let a = [plug_in("op", AuthorityState::Active, 1)];
        assert_eq!(
            plan_renewal(&at(input(&a, 1, &[], &[]), NOW + 1), &POLICY),
            RenewalPlan::Idle(Idle::PlugIn {
                authority: "op".into(),
                due_at: NOW
            })
        );
    }

    #[test]
    fn a_due_plug_in_root_hands_over_to_an_operator_prepared_successor() {
        let a = [
            plug_in("op", AuthorityState::Active, 1),
            plug_in("op2", AuthorityState::Prepared, 2),
        ];
        assert_eq!(
            plan_renewal(&at(input(&a, 2, &[], &[]), NOW + 1), &POLICY),
            RenewalPlan::Step(Plan::Next(Transition::Activate("op2".into())))
        );
    }

    #[test]
    fn renewal_without_an_active_authority_is_blocked() {
        let a = [root("p", AuthorityState::Prepared, 1)];
        assert_eq!(
            plan_renewal(&input(&a, 1, &[], &[]), &POLICY),
            RenewalPlan::Step(Plan::Wait(Blocker::NoActive))
        );
    }
}
