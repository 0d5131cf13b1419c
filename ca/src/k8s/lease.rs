//! Leader election with a `coordination.k8s.io/v1` Lease (`citadel-ca-leader` in
//! `--ca-namespace`), with client-go's rules: a holder renews `renewTime`; another replica
//! takes over only once the record it observed has not changed for `leaseDurationSeconds`
//! *by its own clock* (never comparing `renewTime` to the local clock), bumping
//! `leaseTransitions`; every write carries the read `resourceVersion`, so of two
//! contenders one gets 409 Conflict and follows.

use std::sync::Mutex;

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

use crate::leadership::{Leadership, LeadershipError};

/// Name of the Lease.
pub const LEASE_NAME: &str = "citadel-ca-leader";
/// Default `leaseDurationSeconds` (client-go's default).
pub const DEFAULT_LEASE_DURATION_SECS: i32 = 15;

/// What to do about the Lease (pure decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// There is none: create it, held by us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or its holder stopped renewing: take it over.
    TakeOver,
    /// Someone else holds it.
    Follow,
}

/// Decides at local time `now`, given the Lease's spec (`None`: no Lease), our identity, and
/// when (local time) its current record was first observed (pure).
pub fn decide(spec: Option<&LeaseSpec>, me: &str, observed_at: i64, now: i64) -> LeaseAction {
    let Some(spec) = spec else {
        return LeaseAction::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => LeaseAction::Renew,
        None | Some("") => LeaseAction::TakeOver,
        Some(_) => {
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(1));
            if observed_at.saturating_add(duration) <= now {
                LeaseAction::TakeOver
            } else {
                LeaseAction::Follow
            }
        }
    }
}

/// The record whose change proves the holder alive.
fn record(spec: Option<&LeaseSpec>) -> String {
    spec.map(|s| {
        format!(
            "{}|{:?}|{}",
            s.holder_identity.as_deref().unwrap_or(""),
            s.renew_time.as_ref().map(|t| t.0),
            s.lease_transitions.unwrap_or(0)
        )
    })
    .unwrap_or_default()
}

fn micro_now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// This replica's side of the Lease.
pub struct KubeLease {
    api: Api<Lease>,
    holder: String,
    duration_secs: i32,
    /// The last record seen and the local time it was first seen.
    observed: Mutex<(String, i64)>,
}

impl KubeLease {
    /// The Lease [`LEASE_NAME`] in `namespace`, contended for as `holder`.
    pub fn new(client: kube::Client, namespace: &str, holder: String, duration_secs: i32) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            holder,
            duration_secs: duration_secs.max(1),
            observed: Mutex::new((String::new(), 0)),
        }
    }

    async fn write(
        &self,
        action: LeaseAction,
        current: Option<Lease>,
    ) -> Result<bool, kube::Error> {
        let now = micro_now();
        let pp = PostParams::default();
        let mut lease = current.unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec::default()),
        });
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.renew_time = Some(now.clone());
        spec.lease_duration_seconds = Some(self.duration_secs);
        if action != LeaseAction::Renew {
            spec.holder_identity = Some(self.holder.clone());
            spec.acquire_time = Some(now);
            if action == LeaseAction::TakeOver {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        let out = match action {
            LeaseAction::Create => self.api.create(&pp, &lease).await,
            _ => self.api.replace(LEASE_NAME, &pp, &lease).await,
        };
        match out {
            Ok(_) => Ok(true),
            // Another replica wrote first: it leads.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl Leadership for KubeLease {
    async fn lead(&self, now: i64) -> Result<bool, LeadershipError> {
        let current = self
            .api
            .get_opt(LEASE_NAME)
            .await
            .map_err(|e| LeadershipError(format!("reading Lease {LEASE_NAME}: {e}")))?;
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let observed_at = {
            let mut seen = self.observed.lock().unwrap_or_else(|p| p.into_inner());
            let rec = record(spec);
            if seen.0 != rec {
                *seen = (rec, now);
            }
            seen.1
        };
        let action = decide(spec, &self.holder, observed_at, now);
        if action == LeaseAction::Follow {
            return Ok(false);
        }
        let led = self
            .write(action, current)
            .await
            .map_err(|e| LeadershipError(format!("writing Lease {LEASE_NAME}: {e}")))?;
        if led && action != LeaseAction::Renew {
            tracing::info!(holder = %self.holder, ?action, "took the leader Lease");
        }
        Ok(led)
    }

    async fn step_down(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(LEASE_NAME).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = Some(micro_now());
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(holder = %self.holder, "released the leader Lease"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the leader Lease; it lapses by itself")
            }
        }
    }

    fn holder(&self) -> &str {
        &self.holder
    }
}

/// Publishes whether this replica leads, deciding every `interval` until `shutdown`, then
/// steps down. An undecidable round (API server unreachable) counts as not leading: a
/// replica that cannot renew must stop the leader's jobs before its lease can lapse.
pub async fn run_leader_flag(
    leadership: std::sync::Arc<dyn Leadership>,
    interval: std::time::Duration,
    leader: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        let leads = match leadership.lead(crate::clock::unix_now()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "leader election round failed");
                false
            }
        };
        leader.send_if_modified(|l| std::mem::replace(l, leads) != leads);
    }
    let _ = leader.send(false);
    leadership.step_down().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    #[test]
    fn no_lease_is_created_and_our_own_is_renewed() {
        assert_eq!(decide(None, "me", 0, 100), LeaseAction::Create);
        assert_eq!(
            decide(Some(&spec(Some("me"), 15)), "me", 0, 100),
            LeaseAction::Renew
        );
    }

    #[test]
    fn another_holder_is_followed_until_its_record_is_unchanged_for_the_lease_duration() {
        let other = spec(Some("other"), 15);
        assert_eq!(decide(Some(&other), "me", 100, 114), LeaseAction::Follow);
        assert_eq!(decide(Some(&other), "me", 100, 115), LeaseAction::TakeOver);
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        assert_eq!(
            decide(Some(&spec(None, 15)), "me", 100, 100),
            LeaseAction::TakeOver
        );
        assert_eq!(
            decide(Some(&spec(Some(""), 15)), "me", 100, 100),
            LeaseAction::TakeOver
        );
    }
}
