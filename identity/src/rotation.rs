//! When to renew a certificate and how long to wait after a failure.
//!
//! Both are pure functions: the caller passes the certificate's validity,
//! the current time and a random sample, so every schedule is reproducible
//! in tests.

use std::time::Duration;

/// The share of a certificate's lifetime after which it is renewed.
pub const RENEW_AT_FRACTION: f64 = 0.5;

/// The most a renewal is moved earlier by jitter, as a share of the
/// lifetime. Spreads the renewals of certificates issued in one burst (a node
/// restart, a root rotation) so they do not return to the CA together.
pub const RENEW_JITTER_FRACTION: f64 = 0.1;

/// When to renew a certificate valid from `not_before` to `not_after`
/// (unix seconds), for a jitter sample in `[0, 1)`: half-way through its
/// lifetime, moved earlier by up to a tenth of the lifetime. Never before
/// `not_before`. A certificate whose `not_after` is not after its
/// `not_before` is due at once (`not_before`).
pub fn renew_at(not_before: i64, not_after: i64, jitter_sample: f64) -> i64 {
    let lifetime = not_after.saturating_sub(not_before);
    if lifetime <= 0 {
        return not_before;
    }
    let sample = clamp_sample(jitter_sample);
    let fraction = RENEW_AT_FRACTION - RENEW_JITTER_FRACTION * sample;
    not_before + (lifetime as f64 * fraction).floor() as i64
}

/// How long to wait from `now` until [`renew_at`]; zero when it is due.
pub fn until_renewal(not_before: i64, not_after: i64, now: i64, jitter_sample: f64) -> Duration {
    let due = renew_at(not_before, not_after, jitter_sample);
    Duration::from_secs(due.saturating_sub(now).max(0) as u64)
}

/// Exponential backoff with jitter after failed attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The delay after the first failure (before jitter).
    pub initial: Duration,
    /// The cap on the delay (before jitter).
    pub max: Duration,
    /// The factor between consecutive delays.
    pub multiplier: f64,
    /// The delay is drawn from `[d * (1 - jitter), d]`: full delays never
    /// exceed the cap and a crowd of agents does not retry in lock step.
    pub jitter: f64,
}

impl Default for Backoff {
    /// 0.5 s, doubling, capped at 60 s, up to 20% earlier by jitter.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 = the first), for a
    /// jitter sample in `[0, 1)`. `failures == 0` means no delay.
    pub fn delay(&self, failures: u32, jitter_sample: f64) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let exponent = (failures - 1).min(64) as i32;
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0) * clamp_sample(jitter_sample);
        Duration::from_secs_f64(capped * (1.0 - jitter))
    }
}

fn clamp_sample(sample: f64) -> f64 {
    if sample.is_nan() {
        0.0
    } else {
        sample.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NB: i64 = 1_700_000_000;

    #[test]
    fn renews_at_half_life_without_jitter() {
        assert_eq!(renew_at(NB, NB + 86_400, 0.0), NB + 43_200);
    }

    #[test]
    fn jitter_moves_renewal_earlier_by_at_most_a_tenth() {
        let lifetime = 86_400;
        let earliest = renew_at(NB, NB + lifetime, 0.999_999);
        assert!(earliest >= NB + lifetime * 4 / 10, "{earliest}");
        assert!(earliest < NB + lifetime / 2);
        for s in [0.0, 0.25, 0.5, 0.75, 0.99] {
            let at = renew_at(NB, NB + lifetime, s);
            assert!(
                (NB + lifetime * 4 / 10..=NB + lifetime / 2).contains(&at),
                "{s}: {at}"
            );
        }
    }

    #[test]
    fn different_samples_spread_renewals() {
        let a = renew_at(NB, NB + 3_600, 0.1);
        let b = renew_at(NB, NB + 3_600, 0.9);
        assert!(b < a);
    }

    #[test]
    fn degenerate_validity_is_due_at_once() {
        assert_eq!(renew_at(NB, NB, 0.3), NB);
        assert_eq!(renew_at(NB, NB - 10, 0.3), NB);
        assert_eq!(until_renewal(NB, NB - 10, NB + 5, 0.3), Duration::ZERO);
    }

    #[test]
    fn until_renewal_counts_down_from_now() {
        assert_eq!(
            until_renewal(NB, NB + 100, NB + 20, 0.0),
            Duration::from_secs(30)
        );
        assert_eq!(until_renewal(NB, NB + 100, NB + 80, 0.0), Duration::ZERO);
    }

    #[test]
    fn bad_samples_are_clamped() {
        assert_eq!(renew_at(NB, NB + 100, f64::NAN), NB + 50);
        assert_eq!(renew_at(NB, NB + 100, -3.0), NB + 50);
        assert_eq!(renew_at(NB, NB + 100, 7.0), NB + 40);
    }

    #[test]
    fn backoff_doubles_from_half_a_second_to_a_minute() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.0), Duration::ZERO);
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(500));
        assert_eq!(b.delay(2, 0.0), Duration::from_secs(1));
        assert_eq!(b.delay(3, 0.0), Duration::from_secs(2));
        assert_eq!(b.delay(8, 0.0), Duration::from_secs(60));
        assert_eq!(b.delay(u32::MAX, 0.0), Duration::from_secs(60));
    }

    #[test]
    fn backoff_jitter_only_shortens() {
        let b = Backoff::default();
        let d = b.delay(4, 0.5);
        assert!(
            d < Duration::from_secs(4) && d >= Duration::from_millis(3_200),
            "{d:?}"
        );
        assert!(b.delay(30, 0.999) >= Duration::from_secs(48));
    }
}
