//! Rules compiled into matchers: every pattern parsed once, every attribute a rule
//! needs recorded, so that a decision only compares values.

use std::net::IpAddr;

use crate::attr::{self, Attr, Field, Kind};
use crate::matching::{IpBlock, PathMatch, StrMatch, parse_port};
use crate::model::{Rule, Source};
use crate::request::Request;

/// Parsed values of one check.
#[derive(Debug, Clone)]
pub(crate) enum Matcher {
    Str(Box<[StrMatch]>),
    StrIgnoreCase(Box<[StrMatch]>),
    Ip(Box<[IpBlock]>),
    Port(Box<[u16]>),
    Path(Box<[PathMatch]>),
    ServiceAccount(Box<[(Box<str>, Box<str>)]>),
}

impl Matcher {
    fn compile(kind: Kind, values: &[String]) -> Result<Self, String> {
        Ok(match kind {
            Kind::Str => Self::Str(values.iter().map(|v| StrMatch::parse(v)).collect()),
            Kind::StrIgnoreCase => {
                Self::StrIgnoreCase(values.iter().map(|v| StrMatch::parse(v)).collect())
            }
            Kind::Ip => Self::Ip(
                values
                    .iter()
                    .map(|v| IpBlock::parse(v))
                    .collect::<Result<_, _>>()?,
            ),
            Kind::Port => Self::Port(
                values
                    .iter()
                    .map(|v| parse_port(v))
                    .collect::<Result<_, _>>()?,
            ),
            Kind::Path => Self::Path(
                values
                    .iter()
                    .map(|v| PathMatch::parse(v))
                    .collect::<Result<_, _>>()?,
            ),
            Kind::ServiceAccount => Self::ServiceAccount(
                values
                    .iter()
                    .map(|v| attr::parse_service_account(v).map(|(n, s)| (n.into(), s.into())))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    fn str(&self, v: &str) -> bool {
        match self {
            Self::Str(ms) => ms.iter().any(|m| m.matches(v)),
            Self::StrIgnoreCase(ms) => ms.iter().any(|m| m.matches_ignore_case(v)),
            Self::Path(ms) => ms.iter().any(|m| m.matches(v)),
            _ => false,
        }
    }

    fn ip(&self, ip: IpAddr) -> bool {
        matches!(self, Self::Ip(bs) if bs.iter().any(|b| b.contains(ip)))
    }

    fn port(&self, port: u16) -> bool {
        matches!(self, Self::Port(ps) if ps.contains(&port))
    }

    fn service_account(&self, (ns, sa): (&str, &str)) -> bool {
        matches!(self, Self::ServiceAccount(list) if list.iter().any(|(n, s)| **n == *ns && **s == *sa))
    }
}

/// One field or condition: an attribute, its values, and whether it is a `not*` form.
#[derive(Debug, Clone)]
pub(crate) struct Check {
    attr: Attr,
    negate: bool,
    matcher: Matcher,
}

impl Check {
    fn new(attr: Attr, negate: bool, values: &[String]) -> Result<Self, String> {
        let matcher = Matcher::compile(attr.kind(), values)?;
        Ok(Self {
            attr,
            negate,
            matcher,
        })
    }

    /// Whether the request satisfies this check (the attribute must be available).
    fn eval(&self, req: &Request<'_>) -> bool {
        let m = &self.matcher;
        let http = req.http.as_ref();
        let jwt = http.and_then(|h| h.jwt.as_ref());
        let hit = match &self.attr {
            Attr::Principal => req.source.principal.is_some_and(|p| m.str(p)),
            Attr::Namespace => req.source_namespace().is_some_and(|n| m.str(n)),
            Attr::ServiceAccount => req
                .source_service_account()
                .is_some_and(|s| m.service_account(s)),
            Attr::SourceIp => req.source.ip.is_some_and(|ip| m.ip(ip)),
            Attr::RemoteIp => req.remote_ip().is_some_and(|ip| m.ip(ip)),
            Attr::DestIp => req.destination.ip.is_some_and(|ip| m.ip(ip)),
            Attr::DestPort => m.port(req.destination.port),
            Attr::Sni => req.sni.is_some_and(|s| m.str(s)),
            Attr::Host => http.is_some_and(|h| m.str(h.host)),
            Attr::Method => http.is_some_and(|h| m.str(h.method)),
            Attr::Path => http.is_some_and(|h| m.str(h.path)),
            Attr::Header(name) => http.and_then(|h| h.header(name)).is_some_and(|v| m.str(v)),
            Attr::RequestPrincipal => jwt.is_some_and(|j| m.str(j.principal)),
            Attr::Audiences => jwt.is_some_and(|j| j.audiences.iter().any(|a| m.str(a))),
            Attr::Presenter => jwt.and_then(|j| j.presenter).is_some_and(|p| m.str(p)),
            Attr::Claim(name) => {
                jwt.is_some_and(|j| j.claims.iter().any(|(k, v)| *k == &**name && m.str(v)))
            }
        };
        hit != self.negate
    }

    /// Satisfied, or dropped because the request lacks the attribute (widening).
    fn eval_or_dropped(&self, req: &Request<'_>, avail: u8) -> bool {
        self.attr.needs() & !avail != 0 || self.eval(req)
    }
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    /// Sources, OR of ANDs; empty = any.
    from: Box<[Box<[Check]>]>,
    /// Operations, OR of ANDs; empty = any.
    to: Box<[Box<[Check]>]>,
    /// Conditions, AND.
    when: Box<[Check]>,
    /// Attribute groups some check of this rule needs.
    needs: u8,
}

impl CompiledRule {
    pub(crate) fn compile(rule: &Rule) -> Result<Self, String> {
        let mut needs = 0u8;
        let mut group = |fields: &[Field<'_>]| -> Result<Box<[Check]>, String> {
            let mut checks = Vec::new();
            for f in fields {
                if let Some(values) = f.values.filter(|v| !v.is_empty()) {
                    needs |= f.attr.needs();
                    checks.push(Check::new(f.attr.clone(), f.negate, values)?);
                }
            }
            Ok(checks.into_boxed_slice())
        };
        let empty_source = Source::default();
        let from = rule
            .from
            .iter()
            .flatten()
            .map(|f| {
                group(&attr::source_fields(
                    f.source.as_ref().unwrap_or(&empty_source),
                ))
            })
            .collect::<Result<Box<[_]>, _>>()?;
        let empty_op = crate::model::Operation::default();
        let to = rule
            .to
            .iter()
            .flatten()
            .map(|t| {
                group(&attr::operation_fields(
                    t.operation.as_ref().unwrap_or(&empty_op),
                ))
            })
            .collect::<Result<Box<[_]>, _>>()?;
        let mut when = Vec::new();
        for c in rule.when.iter().flatten() {
            let attr = Attr::parse_key(c.key.as_deref().unwrap_or_default())?;
            needs |= attr.needs();
            if let Some(v) = c.values.as_deref().filter(|v| !v.is_empty()) {
                when.push(Check::new(attr.clone(), false, v)?);
            }
            if let Some(v) = c.not_values.as_deref().filter(|v| !v.is_empty()) {
                when.push(Check::new(attr, true, v)?);
            }
        }
        Ok(Self {
            from,
            to,
            when: when.into_boxed_slice(),
            needs,
        })
    }

    /// The principals of a rule that tests nothing but the peer principal against
    /// exact values (every `from` source is only `principals` without wildcards; no
    /// `to`, no `when`). Such a rule matches exactly when the peer principal is one
    /// of them, on any request (principals are always judged), so a decision can
    /// find it by a map lookup instead of evaluating it. `None` for any other rule.
    pub(crate) fn exact_principals(&self) -> Option<Vec<&str>> {
        if self.from.is_empty() || !self.to.is_empty() || !self.when.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        for source in self.from.iter() {
            let [check] = &**source else { return None };
            let (Attr::Principal, false, Matcher::Str(values)) =
                (&check.attr, check.negate, &check.matcher)
            else {
                return None;
            };
            for v in values.iter() {
                let StrMatch::Exact(e) = v else { return None };
                out.push(&**e);
            }
        }
        Some(out)
    }

    /// True when the request lacks an attribute this rule tests.
    pub(crate) fn lacks_attributes(&self, avail: u8) -> bool {
        self.needs & !avail != 0
    }

    /// Whether the rule matches. `widen = false` (ALLOW): a rule that tests an
    /// attribute the request lacks is dropped (matches nothing). `widen = true`
    /// (DENY, AUDIT): only the checks on missing attributes are dropped.
    pub(crate) fn matches(&self, req: &Request<'_>, avail: u8, widen: bool) -> bool {
        if !widen && self.lacks_attributes(avail) {
            return false;
        }
        let ok = |c: &Check| c.eval_or_dropped(req, avail);
        (self.from.is_empty() || self.from.iter().any(|f| f.iter().all(ok)))
            && (self.to.is_empty() || self.to.iter().any(|t| t.iter().all(ok)))
            && self.when.iter().all(ok)
    }
}
