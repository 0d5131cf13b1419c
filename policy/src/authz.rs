//! AuthorizationPolicy decisions: compiled policies and the order in which their
//! verdicts combine (DENY, then "no ALLOW policy", then ALLOW, else deny).

use std::fmt;

use crate::compile::CompiledRule;
use crate::index::Selector;
use crate::model::Action;
use crate::request::Request;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny,
}

impl Verdict {
    /// `ALLOW` or `DENY`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule of a policy: namespace, name and rule index (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleRef<'p> {
    /// Policy namespace.
    pub namespace: &'p str,
    /// Policy name.
    pub name: &'p str,
    /// Index in `spec.rules`.
    pub rule: usize,
}

impl fmt::Display for RuleRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} rule {}", self.namespace, self.name, self.rule)
    }
}

/// Why the verdict is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason<'p> {
    /// A DENY policy rule matched.
    DeniedBy(RuleRef<'p>),
    /// No ALLOW policy applies to the workload, so everything not denied is allowed.
    NoAllowPolicy,
    /// An ALLOW policy rule matched.
    AllowedBy(RuleRef<'p>),
    /// ALLOW policies apply but none matched.
    NoAllowMatched,
}

impl Reason<'_> {
    /// The verdict this reason gives.
    pub fn verdict(&self) -> Verdict {
        match self {
            Self::DeniedBy(_) | Self::NoAllowMatched => Verdict::Deny,
            Self::NoAllowPolicy | Self::AllowedBy(_) => Verdict::Allow,
        }
    }

    /// The deciding rule, if a rule decided.
    pub fn rule(&self) -> Option<RuleRef<'_>> {
        match self {
            Self::DeniedBy(r) | Self::AllowedBy(r) => Some(*r),
            _ => None,
        }
    }
}

impl fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DeniedBy(r) => write!(f, "denied by DENY policy {r}"),
            Self::NoAllowPolicy => f.write_str("no ALLOW policy applies to the workload"),
            Self::AllowedBy(r) => write!(f, "allowed by ALLOW policy {r}"),
            Self::NoAllowMatched => f.write_str("no ALLOW policy matched"),
        }
    }
}

/// The outcome of [`crate::PolicySet::decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'p> {
    /// Allow or deny (from the enforced policies only).
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason<'p>,
    /// The first matching AUDIT policy rule, if any (never changes the verdict).
    pub audited_by: Option<RuleRef<'p>>,
    /// When `istio.io/dry-run` policies apply to the workload: the reason the
    /// decision would have had with them enforced.
    pub dry_run: Option<Reason<'p>>,
    /// ALLOW rules of applicable policies that were dropped because they test an
    /// attribute this request does not carry (HTTP fields on TCP, unknown IPs).
    pub skipped_allow_rules: u32,
}

/// A compiled AuthorizationPolicy (never CUSTOM: those are rejected at load).
#[derive(Debug, Clone)]
pub(crate) struct CompiledPolicy {
    pub(crate) namespace: Box<str>,
    pub(crate) name: Box<str>,
    pub(crate) action: Action,
    pub(crate) dry_run: bool,
    pub(crate) selector: Selector,
    pub(crate) rules: Box<[CompiledRule]>,
}

impl CompiledPolicy {
    fn first_match(&self, req: &Request<'_>, avail: u8, widen: bool) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(req, avail, widen))
    }

    fn rule_ref(&self, rule: usize) -> RuleRef<'_> {
        RuleRef {
            namespace: &self.namespace,
            name: &self.name,
            rule,
        }
    }
}

/// What the applicable policies said, as (policy ordinal, rule) of the first match
/// in policy order (namespace, name).
#[derive(Debug, Default)]
pub(crate) struct Tally {
    deny: Option<(u32, usize)>,
    allow: Option<(u32, usize)>,
    audit: Option<(u32, usize)>,
    has_allow: bool,
    skipped: u32,
}

fn keep_first(slot: &mut Option<(u32, usize)>, ordinal: u32, rule: Option<usize>) {
    if let Some(rule) = rule
        && slot.is_none_or(|(o, _)| ordinal < o)
    {
        *slot = Some((ordinal, rule));
    }
}

impl Tally {
    pub(crate) fn add(&mut self, p: &CompiledPolicy, ordinal: u32, req: &Request<'_>, avail: u8) {
        match p.action {
            Action::Deny => keep_first(&mut self.deny, ordinal, p.first_match(req, avail, true)),
            Action::Audit => keep_first(&mut self.audit, ordinal, p.first_match(req, avail, true)),
            Action::Allow => {
                self.has_allow = true;
                let dropped = p.rules.iter().filter(|r| r.lacks_attributes(avail)).count();
                self.skipped = self
                    .skipped
                    .saturating_add(u32::try_from(dropped).unwrap_or(u32::MAX));
                keep_first(&mut self.allow, ordinal, p.first_match(req, avail, false));
            }
            // Unreachable after validation; a CUSTOM policy never allows anything.
            Action::Custom => self.has_allow = true,
        }
    }

    pub(crate) fn reason<'p>(&self, policies: &'p [CompiledPolicy]) -> Reason<'p> {
        let r = |(o, rule): (u32, usize)| policies[o as usize].rule_ref(rule);
        if let Some(d) = self.deny {
            Reason::DeniedBy(r(d))
        } else if !self.has_allow {
            Reason::NoAllowPolicy
        } else if let Some(a) = self.allow {
            Reason::AllowedBy(r(a))
        } else {
            Reason::NoAllowMatched
        }
    }

    pub(crate) fn audit<'p>(&self, policies: &'p [CompiledPolicy]) -> Option<RuleRef<'p>> {
        self.audit
            .map(|(o, rule)| policies[o as usize].rule_ref(rule))
    }

    pub(crate) fn skipped(&self) -> u32 {
        self.skipped
    }
}
