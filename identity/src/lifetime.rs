//! Certificate lifetime math: which notBefore/notAfter a new leaf gets.
//!
//! Pure functions of a policy, the requested TTL, the signing chain's validity
//! window and `now` (all times are unix seconds). A request above the maximum
//! is rejected rather than clamped; the result is always clamped to the signing
//! chain, and an expired (or not yet valid) signer signs nothing.

/// One day, the default leaf lifetime.
pub const DEFAULT_TTL_SECS: i64 = 24 * 60 * 60;
/// Ninety days, the default maximum leaf lifetime.
pub const DEFAULT_MAX_TTL_SECS: i64 = 90 * DEFAULT_TTL_SECS;
/// Two minutes of backdating, to absorb clock skew between machines.
pub const DEFAULT_BACKDATE_SECS: i64 = 120;

/// How long leaves live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifetimePolicy {
    /// Lifetime given when the request asks for 0 (no preference); default 24 h.
    pub default_ttl_secs: i64,
    /// Longest lifetime a request may ask for; default 90 days.
    pub max_ttl_secs: i64,
    /// How far notBefore is moved into the past; default 120 s.
    pub backdate_secs: i64,
}

impl Default for LifetimePolicy {
    fn default() -> Self {
        LifetimePolicy {
            default_ttl_secs: DEFAULT_TTL_SECS,
            max_ttl_secs: DEFAULT_MAX_TTL_SECS,
            backdate_secs: DEFAULT_BACKDATE_SECS,
        }
    }
}

/// The window in which the whole signing chain is valid: the latest notBefore
/// and the earliest notAfter of the signing certificate and everything above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignerWindow {
    /// Latest notBefore in the signing chain.
    pub not_before: i64,
    /// Earliest notAfter in the signing chain.
    pub not_after: i64,
}

/// The validity period chosen for a new certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// notBefore, unix seconds.
    pub not_before: i64,
    /// notAfter, unix seconds.
    pub not_after: i64,
}

impl Validity {
    /// Length of the validity period in seconds.
    pub fn duration_secs(&self) -> i64 {
        self.not_after.saturating_sub(self.not_before)
    }
}

/// Why no validity period can be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LifetimeError {
    /// The request asked for a negative lifetime.
    #[error("requested certificate lifetime {requested}s is negative")]
    NegativeTtl {
        /// The requested TTL in seconds.
        requested: i64,
    },
    /// The request asked for more than the policy's maximum; it is rejected, not clamped.
    #[error("requested certificate lifetime {requested}s is above the maximum of {max}s")]
    AboveMaximum {
        /// The requested TTL in seconds.
        requested: i64,
        /// The policy's maximum TTL in seconds.
        max: i64,
    },
    /// The signing chain has expired (its earliest notAfter is not after `now`).
    #[error("the signing certificate chain expired at {not_after} (now {now})")]
    SignerExpired {
        /// Earliest notAfter of the signing chain.
        not_after: i64,
        /// The time of the request.
        now: i64,
    },
    /// The signing chain is not valid yet (its latest notBefore is after `now`).
    #[error("the signing certificate chain is not valid until {not_before} (now {now})")]
    SignerNotYetValid {
        /// Latest notBefore of the signing chain.
        not_before: i64,
        /// The time of the request.
        now: i64,
    },
    /// The policy's default TTL is zero or negative.
    #[error("lifetime policy: default TTL {0}s must be positive")]
    NonPositiveDefaultTtl(i64),
    /// The policy's maximum TTL is zero or negative.
    #[error("lifetime policy: maximum TTL {0}s must be positive")]
    NonPositiveMaxTtl(i64),
    /// The policy's backdate is negative.
    #[error("lifetime policy: backdate {0}s must not be negative")]
    NegativeBackdate(i64),
    /// The policy's default TTL exceeds its maximum.
    #[error("lifetime policy: default TTL {default}s is above the maximum TTL {max}s")]
    DefaultAboveMaximum {
        /// The policy's default TTL.
        default: i64,
        /// The policy's maximum TTL.
        max: i64,
    },
}

/// Checks that a policy is usable: positive default and maximum, default ≤
/// maximum, and a backdate that is not negative (0 disables backdating).
pub fn validate_policy(policy: &LifetimePolicy) -> Result<(), LifetimeError> {
    if policy.default_ttl_secs <= 0 {
        return Err(LifetimeError::NonPositiveDefaultTtl(
            policy.default_ttl_secs,
        ));
    }
    if policy.max_ttl_secs <= 0 {
        return Err(LifetimeError::NonPositiveMaxTtl(policy.max_ttl_secs));
    }
    if policy.backdate_secs < 0 {
        return Err(LifetimeError::NegativeBackdate(policy.backdate_secs));
    }
    if policy.default_ttl_secs > policy.max_ttl_secs {
        return Err(LifetimeError::DefaultAboveMaximum {
            default: policy.default_ttl_secs,
            max: policy.max_ttl_secs,
        });
    }
    Ok(())
}

/// Chooses a leaf's validity period.
///
/// `requested_ttl_secs` is the caller's request: 0 means the policy default,
/// a negative value or one above the maximum is an error. notBefore is `now`
/// minus the backdate but never before the signer's notBefore; notAfter is
/// `now` plus the TTL but never after the signer's notAfter. The policy is
/// validated first, so the result always satisfies
/// `not_before <= now < not_after`.
pub fn leaf_validity(
    policy: &LifetimePolicy,
    requested_ttl_secs: i64,
    signer: SignerWindow,
    now: i64,
) -> Result<Validity, LifetimeError> {
    validate_policy(policy)?;
    let ttl = match requested_ttl_secs {
        t if t < 0 => return Err(LifetimeError::NegativeTtl { requested: t }),
        0 => policy.default_ttl_secs,
        t if t > policy.max_ttl_secs => {
            return Err(LifetimeError::AboveMaximum {
                requested: t,
                max: policy.max_ttl_secs,
            });
        }
        t => t,
    };
    if signer.not_before > now {
        return Err(LifetimeError::SignerNotYetValid {
            not_before: signer.not_before,
            now,
        });
    }
    if signer.not_after <= now {
        return Err(LifetimeError::SignerExpired {
            not_after: signer.not_after,
            now,
        });
    }
    Ok(Validity {
        not_before: now
            .saturating_sub(policy.backdate_secs)
            .max(signer.not_before),
        not_after: now.saturating_add(ttl).min(signer.not_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;
    const DAY: i64 = 86_400;

    /// A signer valid from a year ago until a year from now.
    fn wide_signer() -> SignerWindow {
        SignerWindow {
            not_before: NOW - 365 * DAY,
            not_after: NOW + 365 * DAY,
        }
    }

    fn validity(ttl: i64, signer: SignerWindow) -> Result<Validity, LifetimeError> {
        leaf_validity(&LifetimePolicy::default(), ttl, signer, NOW)
    }

    #[test]
    fn default_policy_values() {
        let p = LifetimePolicy::default();
        assert_eq!(p.default_ttl_secs, 86_400);
        assert_eq!(p.max_ttl_secs, 90 * 86_400);
        assert_eq!(p.backdate_secs, 120);
        assert_eq!(validate_policy(&p), Ok(()));
    }

    #[test]
    fn requested_ttl_is_honoured_with_backdate() {
        let v = validity(3600, wide_signer()).unwrap();
        assert_eq!(
            v,
            Validity {
                not_before: NOW - 120,
                not_after: NOW + 3600
            }
        );
        assert_eq!(v.duration_secs(), 3720);
    }

    #[test]
    fn zero_ttl_means_default() {
        let v = validity(0, wide_signer()).unwrap();
        assert_eq!(v.not_after, NOW + DAY);
    }

    #[test]
    fn negative_ttl_is_rejected() {
        assert_eq!(
            validity(-1, wide_signer()),
            Err(LifetimeError::NegativeTtl { requested: -1 })
        );
    }

    #[test]
    fn ttl_at_maximum_is_accepted() {
        let v = validity(90 * DAY, wide_signer()).unwrap();
        assert_eq!(v.not_after, NOW + 90 * DAY);
    }

    #[test]
    fn ttl_above_maximum_is_rejected_not_clamped() {
        assert_eq!(
            validity(90 * DAY + 1, wide_signer()),
            Err(LifetimeError::AboveMaximum {
                requested: 90 * DAY + 1,
                max: 90 * DAY
            })
        );
    }

    #[test]
    fn not_after_clamped_to_signer_expiry() {
        let signer = SignerWindow {
            not_before: NOW - DAY,
            not_after: NOW + 600,
        };
        let v = validity(3600, signer).unwrap();
        assert_eq!(v.not_after, NOW + 600);
        assert_eq!(v.not_before, NOW - 120);
    }

    #[test]
    fn not_before_clamped_to_signer_start() {
        let signer = SignerWindow {
            not_before: NOW - 30,
            not_after: NOW + DAY,
        };
        let v = validity(3600, signer).unwrap();
        assert_eq!(v.not_before, NOW - 30);
        assert_eq!(v.not_after, NOW + 3600);
    }

    #[test]
    fn expired_signer_signs_nothing() {
        let signer = SignerWindow {
            not_before: NOW - DAY,
            not_after: NOW - 1,
        };
        assert_eq!(
            validity(3600, signer),
            Err(LifetimeError::SignerExpired {
                not_after: NOW - 1,
                now: NOW
            })
        );
    }

    #[test]
    fn signer_expiring_exactly_now_signs_nothing() {
        let signer = SignerWindow {
            not_before: NOW - DAY,
            not_after: NOW,
        };
        assert!(matches!(
            validity(3600, signer),
            Err(LifetimeError::SignerExpired { .. })
        ));
    }

    #[test]
    fn not_yet_valid_signer_signs_nothing() {
        let signer = SignerWindow {
            not_before: NOW + 1,
            not_after: NOW + DAY,
        };
        assert_eq!(
            validity(3600, signer),
            Err(LifetimeError::SignerNotYetValid {
                not_before: NOW + 1,
                now: NOW
            })
        );
    }

    #[test]
    fn signer_starting_exactly_now_may_sign() {
        let signer = SignerWindow {
            not_before: NOW,
            not_after: NOW + DAY,
        };
        let v = validity(3600, signer).unwrap();
        assert_eq!(v.not_before, NOW);
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let policy = LifetimePolicy {
            default_ttl_secs: i64::MAX,
            max_ttl_secs: i64::MAX,
            backdate_secs: i64::MAX,
        };
        let signer = SignerWindow {
            not_before: i64::MIN,
            not_after: i64::MAX,
        };
        let v = leaf_validity(&policy, 0, signer, NOW).unwrap();
        assert_eq!(v.not_before, NOW - i64::MAX);
        assert_eq!(v.not_after, i64::MAX);
    }

    #[test]
    fn invalid_policy_is_rejected_before_issuing() {
        let policy = LifetimePolicy {
            default_ttl_secs: 0,
            ..LifetimePolicy::default()
        };
        assert_eq!(
            leaf_validity(&policy, 3600, wide_signer(), NOW),
            Err(LifetimeError::NonPositiveDefaultTtl(0))
        );
    }

    #[test]
    fn policy_default_must_be_positive() {
        let p = LifetimePolicy {
            default_ttl_secs: -5,
            ..LifetimePolicy::default()
        };
        assert_eq!(
            validate_policy(&p),
            Err(LifetimeError::NonPositiveDefaultTtl(-5))
        );
    }

    #[test]
    fn policy_maximum_must_be_positive() {
        let p = LifetimePolicy {
            max_ttl_secs: 0,
            ..LifetimePolicy::default()
        };
        assert_eq!(
            validate_policy(&p),
            Err(LifetimeError::NonPositiveMaxTtl(0))
        );
    }

    #[test]
    fn policy_backdate_must_not_be_negative() {
        let p = LifetimePolicy {
            backdate_secs: -1,
            ..LifetimePolicy::default()
        };
        assert_eq!(
            validate_policy(&p),
            Err(LifetimeError::NegativeBackdate(-1))
        );
        let no_backdate = LifetimePolicy {
            backdate_secs: 0,
            ..LifetimePolicy::default()
        };
        assert_eq!(validate_policy(&no_backdate), Ok(()));
    }

    #[test]
    fn policy_default_must_not_exceed_maximum() {
        let p = LifetimePolicy {
            default_ttl_secs: 2 * DAY,
            max_ttl_secs: DAY,
            backdate_secs: 0,
        };
        assert_eq!(
            validate_policy(&p),
            Err(LifetimeError::DefaultAboveMaximum {
                default: 2 * DAY,
                max: DAY
            })
        );
    }
}
