//! AuthorizationPolicy decisions: compiled policies and the order in which their
//! verdicts combine (DENY, then "no ALLOW policy", then ALLOW, else deny).

use std::collections::HashMap;
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

/// The AuthorizationPolicies of one scope (namespace, or the root namespace) that
/// share one selector: they apply to exactly the same workloads, so a decision
/// checks the selector once for all of them.
///
/// Rules that only test the peer principal against exact values are filed in a map
/// by principal. A request then looks up its own principal instead of evaluating
/// each such rule: with many "allow client N" policies on one workload the cost no
/// longer grows with their number. Everything else is evaluated as before.
#[derive(Debug, Clone)]
pub(crate) struct PolicyGroup {
    pub(crate) selector: Selector,
    /// Policies with a rule not in `by_principal`, ascending. They are evaluated in
    /// full; finding one of their indexed rules again changes nothing, because the
    /// tally keeps the lowest (policy, rule).
    evaluated: Vec<u32>,
    /// Exact principal -> (policy ordinal, rule index) of each rule it matches.
    by_principal: HashMap<Box<str>, Vec<(u32, usize)>>,
    /// An enforced ALLOW policy is in the group (it applies even when it matches nothing).
    allow_enforced: bool,
    /// Any ALLOW policy, dry-run included, is in the group.
    allow_any: bool,
    /// A dry-run policy is in the group.
    pub(crate) dry_run: bool,
}

impl PolicyGroup {
    pub(crate) fn new(selector: Selector) -> Self {
        Self {
            selector,
            evaluated: Vec::new(),
            by_principal: HashMap::new(),
            allow_enforced: false,
            allow_any: false,
            dry_run: false,
        }
    }

    /// Adds a policy; ordinals must come in ascending order.
    pub(crate) fn push(&mut self, ordinal: u32, p: &CompiledPolicy) {
        self.dry_run |= p.dry_run;
        if p.action == Action::Allow {
            self.allow_any = true;
            self.allow_enforced |= !p.dry_run;
        }
        // CUSTOM never loads; should one get here, `Tally::add` keeps its meaning.
        let mut all_indexed = p.action != Action::Custom;
        for (rule, compiled) in p.rules.iter().enumerate() {
            match compiled.exact_principals() {
                Some(principals) if p.action != Action::Custom => {
                    for principal in principals {
                        let hits = self.by_principal.entry(principal.into()).or_default();
                        if hits.last() != Some(&(ordinal, rule)) {
                            hits.push((ordinal, rule));
                        }
                    }
                }
                _ => all_indexed = false,
            }
        }
        if !all_indexed {
            self.evaluated.push(ordinal);
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

/// Keeps the lowest (policy ordinal, rule): the first match in policy order, and
/// within a policy the lowest rule index, whatever order the matches are found in.
fn keep_first(slot: &mut Option<(u32, usize)>, ordinal: u32, rule: Option<usize>) {
    if let Some(rule) = rule
        && slot.is_none_or(|best| (ordinal, rule) < best)
    {
        *slot = Some((ordinal, rule));
    }
}

impl Tally {
    /// Adds the verdicts of a group of applicable policies; dry-run policies count
    /// only when `with_dry_run`.
    pub(crate) fn add_group(
        &mut self,
        g: &PolicyGroup,
        policies: &[CompiledPolicy],
        with_dry_run: bool,
        req: &Request<'_>,
        avail: u8,
    ) {
        let counts = |p: &CompiledPolicy| with_dry_run || !p.dry_run;
        self.has_allow |= if with_dry_run {
            g.allow_any
        } else {
            g.allow_enforced
        };
        for &o in &g.evaluated {
            let p = &policies[o as usize];
            if counts(p) {
                self.add(p, o, req, avail);
            }
        }
        if g.by_principal.is_empty() {
            return; // nothing indexed: do not spend a hash of the principal
        }
        // Indexed rules test only the principal, which every request carries (or
        // lacks) for judging: they are never dropped or widened, so a hit is a match.
        let hits = req.source.principal.and_then(|pr| g.by_principal.get(pr));
        for &(o, rule) in hits.into_iter().flatten() {
            let p = &policies[o as usize];
            let slot = match p.action {
                Action::Deny => &mut self.deny,
                Action::Audit => &mut self.audit,
                Action::Allow => &mut self.allow,
                Action::Custom => continue,
            };
            if counts(p) {
                keep_first(slot, o, Some(rule));
            }
        }
    }

    fn add(&mut self, p: &CompiledPolicy, ordinal: u32, req: &Request<'_>, avail: u8) {
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
