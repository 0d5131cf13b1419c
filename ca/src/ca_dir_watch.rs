//! The operator's CA directory (`--ca-dir`) watched while the CA runs, as Istio's plug-in
//! `cacerts` are: an operator (or a Kubernetes Secret volume) replaces the files, and the new
//! CA takes over by itself once it is safe.
//!
//! Every round of the renewal task ([`crate::rotation_driver`], run by the one replica
//! holding the lease) reads the recognised files and hashes them ([`content_hash`]); the
//! pure [`decide`] compares that with the last set taken. A new set is taken only once it has
//! stayed the same for two rounds, so an operator copying files one at a time is not caught
//! half-way. A taken set is checked exactly as at start-up (chain, key match, probe leaf
//! verified by our own chain verifier) and enters the store as `prepared`
//! ([`crate::authorities::record_ca_dir`]); [`plugin_activation`] then activates it with the
//! same gated step as `citadel root activate`: once every live agent acknowledged the bundle
//! that holds its root, whether or not automatic renewal is on. A bad set is logged once,
//! counted in `citadel_ca_dir_rejected_total`, and changes nothing: the last good set stays.
//!
//! Only a `prepared` authority not older than the active one is activated, so a set the CLI
//! moved on from (activated past, retired or removed) is never brought back.

use std::path::{Path, PathBuf};

use prometheus_client::metrics::counter::Counter;
use ring::digest::{Context, SHA256};

use citadel_identity::TrustDomain;

use crate::authorities::{check_ca_dir, record_ca_dir};
use crate::keystore::KeyStore;
use crate::rotation::{Blocker, Plan, PlanInput, Transition, propagation_blockers};
use citadel_store::{AuthorityState, AuthorityStore};

/// The files of both layouts [`crate::authority::Authority::import_dir`] reads.
pub const CA_DIR_FILES: [&str; 7] = [
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
    "tls.crt",
    "tls.key",
    "ca.crt",
];

/// SHA-256 of a set of CA files.
pub type DirHash = [u8; 32];

/// Reads the recognised files of `dir` that exist, in [`CA_DIR_FILES`] order, as (name,
/// contents). A missing file is left out (the hash then differs from the complete set); any
/// other read error is returned, and the round is skipped.
pub fn read_ca_dir(dir: &Path) -> std::io::Result<Vec<(&'static str, Vec<u8>)>> {
    let mut files = Vec::new();
    for name in CA_DIR_FILES {
        match std::fs::read(dir.join(name)) {
            Ok(bytes) => files.push((name, bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(files)
}

/// SHA-256 over the names and contents of `files` (pure). Each name and content is prefixed
/// by its length, so moving bytes from one file to the next changes the hash.
pub fn content_hash(files: &[(&str, Vec<u8>)]) -> DirHash {
    let mut ctx = Context::new(&SHA256);
    for (name, bytes) in files {
        for part in [name.as_bytes(), bytes.as_slice()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// What the watch remembers between rounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchState {
    /// The last set taken (imported, or rejected as bad); `None` before the first.
    pub taken: Option<DirHash>,
    /// A set seen once that differs from the taken one, waiting to be seen again.
    pub pending: Option<DirHash>,
}

/// What to do with the set read this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirDecision {
    /// The set taken last: nothing to do.
    Unchanged,
    /// A new set, seen for the first time: wait one round for it to settle.
    Settling,
    /// A new set, the same as last round: check and import it.
    Changed,
}

/// Compares the set read this round (`current`) with what the watch remembers (pure); returns
/// the decision and the state for the next round. After [`DirDecision::Changed`] the caller
/// marks the set taken with [`WatchState::take`] once it was imported or rejected (a store
/// error leaves it pending, so the next round tries again).
pub fn decide(state: &WatchState, current: DirHash) -> (DirDecision, WatchState) {
    if state.taken == Some(current) {
        return (
            DirDecision::Unchanged,
            WatchState {
                taken: state.taken,
                pending: None,
            },
        );
    }
    if state.pending == Some(current) {
        return (DirDecision::Changed, *state);
    }
    (
        DirDecision::Settling,
        WatchState {
            taken: state.taken,
            pending: Some(current),
        },
    )
}

impl WatchState {
    /// The state once `hash` was imported or rejected.
    pub fn take(hash: DirHash) -> WatchState {
        WatchState {
            taken: Some(hash),
            pending: None,
        }
    }
}

/// The step for the operator's authority `id` (pure): `None` unless it is `prepared` and not
/// older than the active authority (one the CLI passed over, retired or removed stays as it
/// is); otherwise its activation, or the live agents that have not yet acknowledged the
/// bundle holding its root ([`Blocker::Propagation`]), exactly as for `citadel root activate`.
pub fn plugin_activation(input: &PlanInput<'_>, id: &str) -> Option<Plan> {
    let active = input
        .authorities
        .iter()
        .find(|a| a.state == AuthorityState::Active)?;
    let rec = input.authorities.iter().find(|a| a.id == id)?;
    if rec.state != AuthorityState::Prepared || rec.created_at < active.created_at {
        return None;
    }
    let agents = propagation_blockers(input);
    Some(if agents.is_empty() {
        Plan::Next(Transition::Activate(id.to_owned()))
    } else {
        Plan::Wait(Blocker::Propagation {
            authority: id.to_owned(),
            agents,
        })
    })
}

/// The watch of one `--ca-dir`, owned by the renewal task.
pub struct CaDirWatch {
    /// The operator's directory.
    pub dir: PathBuf,
    /// `citadel_ca_dir_rejected_total`.
    pub rejected: Counter,
    state: WatchState,
    /// The authority of the last good set imported.
    authority: Option<String>,
    /// The last error reading the directory, logged once until it changes or clears.
    read_error: Option<String>,
}

impl CaDirWatch {
    /// A watch of `dir` that has taken nothing yet: its first set is imported again (a
    /// no-op for the set imported at start-up, which the store knows).
    pub fn new(dir: PathBuf, rejected: Counter) -> CaDirWatch {
        CaDirWatch {
            dir,
            rejected,
            state: WatchState::default(),
            authority: None,
            read_error: None,
        }
    }

    /// The authority of the last good set, if any.
    pub fn authority(&self) -> Option<&str> {
        self.authority.as_deref()
    }

    /// One round: reads the directory and, on a settled change, checks the set and records
    /// it as `prepared`. A bad set is logged and counted once; an unreadable directory is
    /// logged once (until the error changes); a store error is returned and the set is tried
    /// again next round.
    pub async fn poll(
        &mut self,
        store: &dyn AuthorityStore,
        keys: &dyn KeyStore,
        trust_domain: &TrustDomain,
        now: i64,
    ) -> anyhow::Result<()> {
        let files = match read_ca_dir(&self.dir) {
            Ok(files) => {
                self.read_error = None;
                files
            }
            Err(e) => {
                // Unreadable (not merely incomplete): nothing to judge; say so once.
                let msg = e.to_string();
                if self.read_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(dir = %self.dir.display(), error = %msg, "cannot read the CA directory; the last good set stays");
                    self.read_error = Some(msg);
                }
                return Ok(());
            }
        };
        let hash = content_hash(&files);
        let (decision, next) = decide(&self.state, hash);
        self.state = next;
        if decision != DirDecision::Changed {
            return Ok(());
        }
        match check_ca_dir(&self.dir, trust_domain, now) {
            Ok((authority, key)) => {
                record_ca_dir(store, keys, &authority, &key, &self.dir, now).await?;
                self.state = WatchState::take(hash);
                self.authority = Some(authority.id().to_owned());
                tracing::info!(authority = authority.id(), dir = %self.dir.display(), "took the CA directory's set");
            }
            Err(e) => {
                self.state = WatchState::take(hash);
                self.rejected.inc();
                tracing::warn!(
                    dir = %self.dir.display(),
                    set = %hex::encode(&hash[..8]),
                    error = %e,
                    "the CA directory holds a set that cannot sign; it is ignored and the last good set stays (fix the files: they are checked again when they change)"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::{AgentView, DEFAULT_STALE_AFTER_SECS};
    use citadel_store::{AuthorityRecord, BundleAck};

    fn files(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, c)| (*n, c.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn the_hash_covers_names_contents_and_file_boundaries() {
        let base = content_hash(&files(&[("ca-cert.pem", "a"), ("ca-key.pem", "b")]));
        assert_eq!(
            base,
            content_hash(&files(&[("ca-cert.pem", "a"), ("ca-key.pem", "b")]))
        );
        assert_ne!(
            base,
            content_hash(&files(&[("ca-cert.pem", "a"), ("ca-key.pem", "c")]))
        );
        assert_ne!(
            base,
            content_hash(&files(&[("tls.crt", "a"), ("ca-key.pem", "b")]))
        );
        assert_ne!(
            base,
            content_hash(&files(&[("ca-cert.pem", "ab"), ("ca-key.pem", "")]))
        );
        assert_ne!(base, content_hash(&files(&[("ca-cert.pem", "a")])));
    }

    #[test]
    fn a_new_set_is_taken_only_after_it_stayed_the_same_for_two_rounds() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let (d, s) = decide(&WatchState::default(), a);
        assert_eq!(d, DirDecision::Settling);
        // Still being copied: another new hash settles again.
        let (d, s) = decide(&s, b);
        assert_eq!(d, DirDecision::Settling);
        let (d, _) = decide(&s, b);
        assert_eq!(d, DirDecision::Changed);
        let s = WatchState::take(b);
        let (d, _) = decide(&s, b);
        assert_eq!(d, DirDecision::Unchanged);
    }

    #[test]
    fn a_taken_set_even_a_rejected_one_is_not_tried_again_until_it_changes() {
        let bad = [3u8; 32];
        let s = WatchState::take(bad);
        for _ in 0..3 {
            assert_eq!(decide(&s, bad).0, DirDecision::Unchanged);
        }
        // A set that is pending after a store error is tried again at once.
        let pending = WatchState {
            taken: Some(bad),
            pending: Some([4u8; 32]),
        };
        assert_eq!(decide(&pending, [4u8; 32]).0, DirDecision::Changed);
    }

    #[test]
    fn going_back_to_the_taken_set_while_a_change_settles_is_unchanged() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let (_, s) = decide(&WatchState::take(a), b);
        let (d, s) = decide(&s, a);
        assert_eq!(d, DirDecision::Unchanged);
        assert_eq!(s, WatchState::take(a));
    }

    fn auth(id: &str, state: AuthorityState, created_at: i64) -> AuthorityRecord {
        AuthorityRecord {
            id: id.into(),
            state,
            cert_pem: String::new(),
            chain_pem: String::new(),
            root_pem: String::new(),
            not_before: 0,
            not_after: i64::MAX,
            key_ref: String::new(),
            created_at,
        }
    }

    fn input<'a>(a: &'a [AuthorityRecord], acks: &'a [BundleAck]) -> PlanInput<'a> {
        PlanInput {
            authorities: a,
            bundle_sequence: 5,
            acks,
            live_leaves: &[],
            now: 1_000,
            stale_after_secs: DEFAULT_STALE_AFTER_SECS,
        }
    }

    #[test]
    fn an_imported_prepared_authority_is_activated_once_propagated_without_renewal() {
        let a = [
            auth("old", AuthorityState::Active, 1),
            auth("ops", AuthorityState::Prepared, 2),
        ];
        assert_eq!(
            plugin_activation(&input(&a, &[]), "ops"),
            Some(Plan::Next(Transition::Activate("ops".into())))
        );
    }

    #[test]
    fn an_imported_authority_waits_for_every_live_agent() {
        let a = [
            auth("old", AuthorityState::Active, 1),
            auth("ops", AuthorityState::Prepared, 2),
        ];
        let acks = [
            BundleAck {
                agent_id: "behind".into(),
                sequence: 4,
                acked_at: 999,
            },
            BundleAck {
                agent_id: "stale".into(),
                sequence: 1,
                acked_at: 0,
            },
        ];
        match plugin_activation(&input(&a, &acks), "ops") {
            Some(Plan::Wait(Blocker::Propagation { authority, agents })) => {
                assert_eq!(authority, "ops");
                let ids: Vec<&AgentView> = agents.iter().collect();
                assert_eq!(ids.len(), 1);
                assert_eq!(ids[0].agent_id, "behind");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_ca_dir_never_undoes_a_cli_transition() {
        // Activated from the CLI past it (an authority created after it signs).
        let passed = [
            auth("ops", AuthorityState::Prepared, 2),
            auth("cli", AuthorityState::Active, 3),
        ];
        assert_eq!(plugin_activation(&input(&passed, &[]), "ops"), None);
        // Rolled back from it, or removed.
        for state in [AuthorityState::Retired, AuthorityState::Removed] {
            let a = [
                auth("old", AuthorityState::Active, 1),
                auth("ops", state, 2),
            ];
            assert_eq!(plugin_activation(&input(&a, &[]), "ops"), None);
        }
        // Already signing.
        let a = [auth("ops", AuthorityState::Active, 2)];
        assert_eq!(plugin_activation(&input(&a, &[]), "ops"), None);
    }
}
