//! Who may start a `CreateCertificate` now: a per-key rate limit (token buckets) and a
//! global concurrency bound with two lanes, first issuances ahead of renewals.
//!
//! Under pressure a workload without a certificate is worse off than one renewing a
//! certificate that is still valid for hours, so renewals (a caller authenticated by its
//! own client certificate, asking for itself) hold at most part of the permits and never
//! overtake a waiting first issuance. Requests that cannot start are queued for a bounded
//! time; beyond that, or when the queue is full, they get `ResourceExhausted`.
//!
//! The decisions ([`take`], [`on_arrival`], [`next_to_start`], [`renewal_lane`]) are pure
//! and take `now` where time matters; [`RateLimiter`] and [`Admission`] are the thin
//! shells holding the state.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// A sustained rate with a burst allowance. `per_sec == 0` turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Bucket size: how many requests may come at once after a quiet period.
    pub burst: f64,
}

impl Rate {
    /// Whether this rate limits anything.
    pub fn is_on(&self) -> bool {
        self.per_sec > 0.0
    }
}

/// One key's bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The tokens a bucket holds at `now` (pure): refilled since its last update, capped at the
/// burst; a new key starts full.
pub fn level(bucket: Option<Bucket>, rate: Rate, now: Instant) -> f64 {
    match bucket {
        None => rate.burst,
        Some(b) => {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            (b.tokens + elapsed * rate.per_sec).min(rate.burst)
        }
    }
}

/// Takes one token at `now` (pure): the new bucket, and `Err(retry_after)` when it was empty.
pub fn take(bucket: Option<Bucket>, rate: Rate, now: Instant) -> (Bucket, Result<(), Duration>) {
    let tokens = level(bucket, rate, now);
    if tokens >= 1.0 {
        return (
            Bucket {
                tokens: tokens - 1.0,
                updated: now,
            },
            Ok(()),
        );
    }
    let wait = if rate.per_sec > 0.0 {
        (1.0 - tokens) / rate.per_sec
    } else {
        0.0
    };
    (
        Bucket {
            tokens,
            updated: now,
        },
        Err(Duration::from_secs_f64(wait.clamp(0.0, 3600.0))),
    )
}

/// Token buckets by key (an identity, or a peer address), at most `max_keys` of them.
pub struct RateLimiter {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// A limiter allowing `rate` per key.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key` at `now`; `Err(retry_after)` when its bucket is empty.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if !self.rate.is_on() {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= self.max_keys {
            // A full bucket says nothing a missing one does not: forget those first, then
            // (many keys at once: a spray of addresses) any, rather than grow without bound.
            let rate = self.rate;
            buckets.retain(|_, b| level(Some(*b), rate, now) < rate.burst);
            if buckets.len() >= self.max_keys {
                let drop: Vec<String> = buckets
                    .keys()
                    .take(buckets.len() / 2 + 1)
                    .cloned()
                    .collect();
                for k in drop {
                    buckets.remove(&k);
                }
            }
        }
        let (bucket, result) = take(buckets.get(key).copied(), self.rate, now);
        buckets.insert(key.to_owned(), bucket);
        result
    }
}

/// Which lane a request waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Any request that is not a renewal: a workload or node without a certificate yet, a
    /// node agent asking for one of its workloads, a token-authenticated caller.
    First,
    /// A caller authenticated by its own client certificate asking for its own identity.
    Renewal,
}

/// The lane of a request (pure): a renewal is a caller that authenticated with a client
/// certificate and asks for nothing but itself.
pub fn renewal_lane(by_client_certificate: bool, impersonating: bool) -> Lane {
    if by_client_certificate && !impersonating {
        Lane::Renewal
    } else {
        Lane::First
    }
}

/// The global bound on concurrent issuances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Issuances running at once.
    pub max_in_flight: usize,
    /// Of those, at most this many renewals (the rest is kept for first issuances).
    pub max_renewals_in_flight: usize,
    /// Requests waiting for a permit, both lanes together; more are refused at once.
    pub max_queued: usize,
    /// How long a request waits for a permit before it is refused.
    pub max_wait: Duration,
}

/// What runs and waits now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Issuances running (both lanes).
    pub in_flight: usize,
    /// Renewals among them.
    pub renewals_in_flight: usize,
    /// First issuances waiting.
    pub first_queued: usize,
    /// Renewals waiting.
    pub renewals_queued: usize,
}

/// What becomes of an arriving request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// It may start now.
    Start,
    /// It waits for a permit.
    Queue,
    /// It is refused (`ResourceExhausted`).
    Refuse,
}

fn has_room(lane: Lane, occ: &Occupancy, limits: &AdmissionLimits) -> bool {
    occ.in_flight < limits.max_in_flight
        && (lane == Lane::First || occ.renewals_in_flight < limits.max_renewals_in_flight)
}

/// Admission of an arriving request (pure): it starts when there is room in its lane and
/// nobody it must not overtake is waiting (a renewal never overtakes a waiting first
/// issuance); otherwise it queues while the queue has room.
pub fn on_arrival(lane: Lane, occ: &Occupancy, limits: &AdmissionLimits) -> Arrival {
    let waiting_ahead = match lane {
        Lane::First => occ.first_queued,
        Lane::Renewal => occ.first_queued + occ.renewals_queued,
    };
    if waiting_ahead == 0 && has_room(lane, occ, limits) {
        Arrival::Start
    } else if occ.first_queued + occ.renewals_queued < limits.max_queued {
        Arrival::Queue
    } else {
        Arrival::Refuse
    }
}

/// Which waiting request starts next when a permit is free (pure): first issuances before
/// renewals; a renewal only within its share.
pub fn next_to_start(occ: &Occupancy, limits: &AdmissionLimits) -> Option<Lane> {
    if occ.first_queued > 0 && has_room(Lane::First, occ, limits) {
        Some(Lane::First)
    } else if occ.first_queued == 0
        && occ.renewals_queued > 0
        && has_room(Lane::Renewal, occ, limits)
    {
        Some(Lane::Renewal)
    } else {
        None
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overloaded {
    /// The queue was full.
    #[error("the CA is at capacity ({0} certificate requests waiting); retry later")]
    QueueFull(usize),
    /// No permit came within the wait limit.
    #[error("the CA is at capacity (no issuance slot within {0:?}); retry later")]
    Timeout(Duration),
}

#[derive(Default)]
struct State {
    in_flight: usize,
    renewals_in_flight: usize,
    first: VecDeque<oneshot::Sender<()>>,
    renewals: VecDeque<oneshot::Sender<()>>,
}

impl State {
    fn occupancy(&mut self) -> Occupancy {
        // Waiters that gave up are no longer waiting.
        self.first.retain(|w| !w.is_closed());
        self.renewals.retain(|w| !w.is_closed());
        Occupancy {
            in_flight: self.in_flight,
            renewals_in_flight: self.renewals_in_flight,
            first_queued: self.first.len(),
            renewals_queued: self.renewals.len(),
        }
    }

    fn start(&mut self, lane: Lane) {
        self.in_flight += 1;
        if lane == Lane::Renewal {
            self.renewals_in_flight += 1;
        }
    }
}

/// The shell around [`on_arrival`] and [`next_to_start`]: permits handed over in order.
pub struct Admission {
    limits: AdmissionLimits,
    state: Mutex<State>,
}

/// A running issuance; dropping it frees its slot for the next waiter.
pub struct Permit {
    admission: Arc<Admission>,
    lane: Lane,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.lane);
    }
}

impl Admission {
    /// A bound with these limits.
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What runs and waits now.
    pub fn occupancy(&self) -> Occupancy {
        self.lock().occupancy()
    }

    /// Waits for a permit in `lane`, at most `max_wait`.
    pub async fn admit(self: &Arc<Self>, lane: Lane) -> Result<Permit, Overloaded> {
        let mut rx = {
            let mut state = self.lock();
            let occ = state.occupancy();
            match on_arrival(lane, &occ, &self.limits) {
                Arrival::Start => {
                    state.start(lane);
                    return Ok(self.permit(lane));
                }
                Arrival::Refuse => {
                    return Err(Overloaded::QueueFull(
                        occ.first_queued + occ.renewals_queued,
                    ));
                }
                Arrival::Queue => {
                    let (tx, rx) = oneshot::channel();
                    match lane {
                        Lane::First => state.first.push_back(tx),
                        Lane::Renewal => state.renewals.push_back(tx),
                    }
                    rx
                }
            }
        };
        match tokio::time::timeout(self.limits.max_wait, &mut rx).await {
            // The releaser counted us in before handing over.
            Ok(Ok(())) => Ok(self.permit(lane)),
            Ok(Err(_)) | Err(_) => {
                rx.close();
                // Handed over just as we gave up: give the slot back.
                if rx.try_recv().is_ok() {
                    drop(self.permit(lane));
                }
                Err(Overloaded::Timeout(self.limits.max_wait))
            }
        }
    }

    fn permit(self: &Arc<Self>, lane: Lane) -> Permit {
        Permit {
            admission: self.clone(),
            lane,
        }
    }

    fn release(&self, lane: Lane) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if lane == Lane::Renewal {
            state.renewals_in_flight = state.renewals_in_flight.saturating_sub(1);
        }
        loop {
            let occ = state.occupancy();
            let Some(next) = next_to_start(&occ, &self.limits) else {
                return;
            };
            let waiter = match next {
                Lane::First => state.first.pop_front(),
                Lane::Renewal => state.renewals.pop_front(),
            };
            let Some(waiter) = waiter else { return };
            // Counted in before the hand-over, so a new arrival cannot take the slot.
            state.start(next);
            if waiter.send(()).is_err() {
                // It gave up in the meantime.
                state.in_flight = state.in_flight.saturating_sub(1);
                if next == Lane::Renewal {
                    state.renewals_in_flight = state.renewals_in_flight.saturating_sub(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
