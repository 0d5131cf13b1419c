//! SPIFFE IDs and trust-domain names, validated by the rules of the SPIFFE-ID
//! specification (`spiffe/spiffe` `standards/SPIFFE-ID.md`).
//!
//! Parsing is strict in the way go-spiffe is strict: the scheme and the trust
//! domain must already be lowercase (the specification calls them
//! case-insensitive but asks producers to emit lowercase), so every value of
//! [`SpiffeId`] is in canonical form and two IDs are equal exactly when their
//! strings are equal.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

/// The longest SPIFFE ID, in bytes, that this crate accepts or builds.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// The longest trust-domain name, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The only accepted scheme prefix, in its only accepted spelling.
const SCHEME_PREFIX: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID or trust-domain name.
///
/// Byte offsets (`at`) count from the start of the string that was checked:
/// the whole URI for [`SpiffeId::parse`], the bare name for
/// [`TrustDomain::new`], the path for [`SpiffeId::from_path`] and the single
/// name for the parts given to [`SpiffeId::for_service_account`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input is the empty string.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The URI is longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is {len} bytes long; the maximum is {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong {
        /// Length of the rejected URI in bytes.
        len: usize,
    },
    /// The URI does not start with `spiffe://`.
    #[error("SPIFFE ID must start with the scheme \"spiffe://\"")]
    WrongScheme,
    /// The scheme is `spiffe` in another case, such as `SPIFFE://`.
    #[error("SPIFFE ID scheme must be written in lowercase as \"spiffe://\"")]
    SchemeNotLowercase,
    /// The URI has a query component.
    #[error("SPIFFE ID must not have a query component ('?' at byte {at})")]
    HasQuery {
        /// Offset of the `?`.
        at: usize,
    },
    /// The URI has a fragment component.
    #[error("SPIFFE ID must not have a fragment component ('#' at byte {at})")]
    HasFragment {
        /// Offset of the `#`.
        at: usize,
    },
    /// A `%` appears in the trust domain or the path.
    #[error("SPIFFE ID must not contain percent-encoding ('%' at byte {at})")]
    PercentEncoded {
        /// Offset of the `%`.
        at: usize,
    },
    /// The trust domain (the URI authority) is empty.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// The authority carries user information (`user@host`).
    #[error("trust domain must not contain user information ('@' at byte {at})")]
    HasUserInfo {
        /// Offset of the `@`.
        at: usize,
    },
    /// The authority carries a port (`host:port`).
    #[error("trust domain must not contain a port (':' at byte {at})")]
    HasPort {
        /// Offset of the `:`.
        at: usize,
    },
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain is {len} bytes long; the maximum is {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong {
        /// Length of the rejected trust domain in bytes.
        len: usize,
    },
    /// The trust domain contains an uppercase ASCII letter.
    #[error(
        "trust domain contains an uppercase character '{ch}' at byte {at}; trust domains must be \
         lowercase (only lowercase letters, digits, '.', '-' and '_' are allowed)"
    )]
    TrustDomainUppercase {
        /// The offending character.
        ch: char,
        /// Its offset.
        at: usize,
    },
    /// The trust domain contains a character outside `[a-z0-9.-_]`.
    #[error(
        "trust domain contains an invalid character {ch:?} at byte {at}; only lowercase letters, \
         digits, '.', '-' and '_' are allowed"
    )]
    TrustDomainInvalidChar {
        /// The offending character.
        ch: char,
        /// Its offset.
        at: usize,
    },
    /// A whole `spiffe://…` URI was given where a bare trust-domain name was expected.
    #[error(
        "expected a bare trust-domain name such as \"example.org\", not a SPIFFE ID URI \
         (use SpiffeId::parse for URIs)"
    )]
    TrustDomainIsUri,
    /// A path given on its own does not start with `/`.
    #[error("SPIFFE ID path must be empty or start with '/'")]
    PathNotAbsolute,
    /// The path has an empty segment (`//`).
    #[error("SPIFFE ID path has an empty segment at byte {at}")]
    EmptySegment {
        /// Offset where the empty segment starts.
        at: usize,
    },
    /// The path has a `.` or `..` segment.
    #[error("SPIFFE ID path has a '.' or '..' segment at byte {at}")]
    DotSegment {
        /// Offset where the segment starts.
        at: usize,
    },
    /// The path ends with `/`.
    #[error("SPIFFE ID path must not end with '/'")]
    TrailingSlash,
    /// A path segment contains a character outside `[a-zA-Z0-9.-_]`.
    #[error(
        "SPIFFE ID path contains an invalid character {ch:?} at byte {at}; only letters, digits, \
         '.', '-' and '_' are allowed in path segments"
    )]
    PathInvalidChar {
        /// The offending character.
        ch: char,
        /// Its offset.
        at: usize,
    },
    /// The namespace given to [`SpiffeId::for_service_account`] is not a valid path segment.
    #[error("namespace is not a valid SPIFFE ID path segment: {0}")]
    InvalidNamespace(Box<SpiffeIdError>),
    /// The service-account name given to [`SpiffeId::for_service_account`] is not a valid path segment.
    #[error("service-account name is not a valid SPIFFE ID path segment: {0}")]
    InvalidServiceAccount(Box<SpiffeIdError>),
}

/// A validated trust-domain name such as `cluster.local` (the authority of a SPIFFE ID).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain {
    name: String,
}

impl TrustDomain {
    /// Validates a bare trust-domain name (`example.org`, not `spiffe://example.org`).
    pub fn new(name: &str) -> Result<TrustDomain, SpiffeIdError> {
        if name
            .get(..SCHEME_PREFIX.len())
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case(SCHEME_PREFIX))
        {
            return Err(SpiffeIdError::TrustDomainIsUri);
        }
        validate_trust_domain(name, 0)?;
        Ok(TrustDomain {
            name: name.to_owned(),
        })
    }

    /// The trust-domain name.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<trust-domain>` (no path).
    pub fn id(&self) -> SpiffeId {
        let uri = format!("{SCHEME_PREFIX}{}", self.name);
        SpiffeId {
            path_start: uri.len(),
            uri,
            trust_domain: self.clone(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::new(s)
    }
}

impl AsRef<str> for TrustDomain {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

/// A validated SPIFFE ID, `spiffe://<trust-domain>[/<segment>…]`, kept in canonical form.
#[derive(Debug, Clone)]
pub struct SpiffeId {
    /// The full URI.
    uri: String,
    /// The authority part of `uri`, validated.
    trust_domain: TrustDomain,
    /// Byte offset in `uri` where the path starts (`uri.len()` when there is no path).
    path_start: usize,
}

/// The namespace and service-account name of an ID whose path is exactly
/// `/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceAccountRef<'a> {
    /// The Kubernetes namespace.
    pub namespace: &'a str,
    /// The service-account name.
    pub name: &'a str,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID URI.
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let Some(rest) = s.strip_prefix(SCHEME_PREFIX) else {
            let looks_like_spiffe = s
                .get(..SCHEME_PREFIX.len())
                .is_some_and(|prefix| prefix.eq_ignore_ascii_case(SCHEME_PREFIX));
            return Err(if looks_like_spiffe {
                SpiffeIdError::SchemeNotLowercase
            } else {
                SpiffeIdError::WrongScheme
            });
        };
        let base = SCHEME_PREFIX.len();
        if let Some(at) = rest.find(['?', '#']) {
            return Err(if rest.as_bytes()[at] == b'?' {
                SpiffeIdError::HasQuery { at: base + at }
            } else {
                SpiffeIdError::HasFragment { at: base + at }
            });
        }
        let authority_len = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_len);
        validate_trust_domain(authority, base)?;
        validate_path(path, base + authority_len)?;
        Ok(SpiffeId {
            uri: s.to_owned(),
            trust_domain: TrustDomain {
                name: authority.to_owned(),
            },
            path_start: base + authority_len,
        })
    }

    /// Builds an ID from a trust domain and a path; `""` gives the root ID,
    /// anything else must start with `/` and follow the path rules.
    pub fn from_path(td: &TrustDomain, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        validate_path(path, 0)?;
        let uri = format!("{SCHEME_PREFIX}{}{path}", td.as_str());
        if uri.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: uri.len() });
        }
        Ok(SpiffeId {
            path_start: uri.len() - path.len(),
            uri,
            trust_domain: td.clone(),
        })
    }

    /// Builds the Kubernetes-style ID `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    ///
    /// Each name must be a single valid path segment (so, for instance, a `/`
    /// inside a name is an error rather than extra path segments).
    pub fn for_service_account(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeIdError> {
        validate_segment(namespace, 0, false)
            .map_err(|e| SpiffeIdError::InvalidNamespace(Box::new(e)))?;
        validate_segment(service_account, 0, false)
            .map_err(|e| SpiffeIdError::InvalidServiceAccount(Box::new(e)))?;
        SpiffeId::from_path(td, &format!("/ns/{namespace}/sa/{service_account}"))
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, including its leading `/`; empty for a root ID.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// Whether this is a trust domain's root ID (no path).
    pub fn is_root(&self) -> bool {
        self.path_start == self.uri.len()
    }

    /// The namespace and service account when the path is exactly `/ns/<ns>/sa/<sa>`.
    pub fn service_account(&self) -> Option<ServiceAccountRef<'_>> {
        let mut parts = self.path().strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(namespace), Some("sa"), Some(name), None) => {
                Some(ServiceAccountRef { namespace, name })
            }
            _ => None,
        }
    }

    /// Whether this ID belongs to the trust domain `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain == *td
    }

    /// The full canonical URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl PartialEq for SpiffeId {
    fn eq(&self, other: &Self) -> bool {
        self.uri == other.uri
    }
}

impl Eq for SpiffeId {}

impl Hash for SpiffeId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.uri.hash(state);
    }
}

impl PartialOrd for SpiffeId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SpiffeId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.uri.cmp(&other.uri)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.uri
    }
}

/// Checks a trust-domain name; `base` is its offset in the string being parsed.
fn validate_trust_domain(td: &str, base: usize) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: td.len() });
    }
    // Userinfo may itself contain ':', so it is reported before the port.
    if let Some(at) = td.find('@') {
        return Err(SpiffeIdError::HasUserInfo { at: base + at });
    }
    if let Some(at) = td.find(':') {
        return Err(SpiffeIdError::HasPort { at: base + at });
    }
    for (i, ch) in td.char_indices() {
        let at = base + i;
        match ch {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            '%' => return Err(SpiffeIdError::PercentEncoded { at }),
            'A'..='Z' => return Err(SpiffeIdError::TrustDomainUppercase { ch, at }),
            _ => return Err(SpiffeIdError::TrustDomainInvalidChar { ch, at }),
        }
    }
    Ok(())
}

/// Checks a path (`""` or `/seg[/seg…]`); `base` is its offset in the string being parsed.
fn validate_path(path: &str, base: usize) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(SpiffeIdError::PathNotAbsolute);
    };
    let mut at = base + 1;
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        validate_segment(segment, at, segments.peek().is_none())?;
        at += segment.len() + 1;
    }
    Ok(())
}

/// Checks one path segment starting at offset `at`; `is_last` turns an empty
/// segment into a trailing-slash error.
fn validate_segment(segment: &str, at: usize, is_last: bool) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(if is_last {
            SpiffeIdError::TrailingSlash
        } else {
            SpiffeIdError::EmptySegment { at }
        });
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeIdError::DotSegment { at });
    }
    for (i, ch) in segment.char_indices() {
        match ch {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
            '%' => return Err(SpiffeIdError::PercentEncoded { at: at + i }),
            _ => return Err(SpiffeIdError::PathInvalidChar { ch, at: at + i }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn parse_err(s: &str) -> SpiffeIdError {
        SpiffeId::parse(s).unwrap_err()
    }

    #[test]
    fn parses_service_account_id() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert!(!id.is_root());
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(
            id.service_account(),
            Some(ServiceAccountRef {
                namespace: "default",
                name: "web"
            })
        );
    }

    #[test]
    fn parses_root_id() {
        let id = SpiffeId::parse("spiffe://example.org").unwrap();
        assert!(id.is_root());
        assert_eq!(id.path(), "");
        assert_eq!(id, td("example.org").id());
        assert_eq!(id.service_account(), None);
    }

    #[test]
    fn accepts_every_allowed_character() {
        let id = SpiffeId::parse("spiffe://a-b_c.9/AZaz09.-_/x..y/.hidden").unwrap();
        assert_eq!(id.path(), "/AZaz09.-_/x..y/.hidden");
    }

    // --- scheme ---

    #[test]
    fn rejects_empty_string() {
        assert_eq!(parse_err(""), SpiffeIdError::Empty);
    }

    #[test]
    fn rejects_scheme_other_than_spiffe() {
        for s in [
            "https://example.org/a",
            "spiffe:/example.org/a",
            "spiffe:example.org",
            "example.org/a",
            "spiffe",
            "xspiffe://example.org",
        ] {
            assert_eq!(parse_err(s), SpiffeIdError::WrongScheme, "{s}");
        }
    }

    #[test]
    fn rejects_uppercase_scheme() {
        for s in ["SPIFFE://example.org/a", "Spiffe://example.org/a"] {
            assert_eq!(parse_err(s), SpiffeIdError::SchemeNotLowercase, "{s}");
        }
    }

    // --- query and fragment ---

    #[test]
    fn rejects_query() {
        assert_eq!(
            parse_err("spiffe://example.org/a?x=1"),
            SpiffeIdError::HasQuery { at: 22 }
        );
        assert_eq!(
            parse_err("spiffe://example.org?x"),
            SpiffeIdError::HasQuery { at: 20 }
        );
    }

    #[test]
    fn rejects_fragment() {
        assert_eq!(
            parse_err("spiffe://example.org/a#frag"),
            SpiffeIdError::HasFragment { at: 22 }
        );
    }

    // --- authority ---

    #[test]
    fn rejects_userinfo() {
        assert_eq!(
            parse_err("spiffe://user@example.org/a"),
            SpiffeIdError::HasUserInfo { at: 13 }
        );
        assert_eq!(
            parse_err("spiffe://user:pw@example.org/a"),
            SpiffeIdError::HasUserInfo { at: 16 }
        );
    }

    #[test]
    fn rejects_port() {
        assert_eq!(
            parse_err("spiffe://example.org:8443/a"),
            SpiffeIdError::HasPort { at: 20 }
        );
    }

    #[test]
    fn rejects_missing_trust_domain() {
        assert_eq!(parse_err("spiffe://"), SpiffeIdError::MissingTrustDomain);
        assert_eq!(parse_err("spiffe:///a"), SpiffeIdError::MissingTrustDomain);
        assert_eq!(
            TrustDomain::new("").unwrap_err(),
            SpiffeIdError::MissingTrustDomain
        );
    }

    #[test]
    fn rejects_trust_domain_with_uppercase() {
        assert_eq!(
            parse_err("spiffe://exAmple.org/a"),
            SpiffeIdError::TrustDomainUppercase { ch: 'A', at: 11 }
        );
        let err = TrustDomain::new("Example.org").unwrap_err();
        assert_eq!(err, SpiffeIdError::TrustDomainUppercase { ch: 'E', at: 0 });
        assert!(err.to_string().contains("lowercase"), "{err}");
    }

    #[test]
    fn rejects_trust_domain_with_invalid_character() {
        for (s, ch, at) in [
            ("spiffe://exa+mple.org", '+', 12),
            ("spiffe://ex ample", ' ', 11),
            ("spiffe://exämple.org", 'ä', 11),
            ("spiffe://a\\b", '\\', 10),
        ] {
            assert_eq!(
                parse_err(s),
                SpiffeIdError::TrustDomainInvalidChar { ch, at },
                "{s}"
            );
        }
        let err = TrustDomain::new("a/b").unwrap_err();
        assert_eq!(
            err,
            SpiffeIdError::TrustDomainInvalidChar { ch: '/', at: 1 }
        );
        assert!(
            err.to_string()
                .contains("only lowercase letters, digits, '.', '-' and '_' are allowed"),
            "{err}"
        );
    }

    #[test]
    fn rejects_ipv6_trust_domain() {
        // An IPv6 literal carries ':', which reads as a port; without one, '[' is invalid.
        assert!(matches!(
            parse_err("spiffe://[::1]/a"),
            SpiffeIdError::HasPort { .. }
        ));
        assert_eq!(
            parse_err("spiffe://[fe80]/a"),
            SpiffeIdError::TrustDomainInvalidChar { ch: '[', at: 9 }
        );
    }

    #[test]
    fn accepts_ipv4_trust_domain() {
        assert!(SpiffeId::parse("spiffe://10.0.0.1/a").is_ok());
    }

    #[test]
    fn rejects_trust_domain_longer_than_255_bytes() {
        let ok = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        assert!(TrustDomain::new(&ok).is_ok());
        assert!(SpiffeId::parse(&format!("spiffe://{ok}/x")).is_ok());
        let long = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert_eq!(
            TrustDomain::new(&long).unwrap_err(),
            SpiffeIdError::TrustDomainTooLong { len: 256 }
        );
        assert_eq!(
            parse_err(&format!("spiffe://{long}/x")),
            SpiffeIdError::TrustDomainTooLong { len: 256 }
        );
    }

    #[test]
    fn trust_domain_new_rejects_a_uri() {
        assert_eq!(
            TrustDomain::new("spiffe://example.org").unwrap_err(),
            SpiffeIdError::TrustDomainIsUri
        );
        assert_eq!(
            TrustDomain::new("SPIFFE://example.org").unwrap_err(),
            SpiffeIdError::TrustDomainIsUri
        );
    }

    // --- percent-encoding ---

    #[test]
    fn rejects_percent_encoding_in_trust_domain() {
        assert_eq!(
            parse_err("spiffe://exa%6Dple.org/a"),
            SpiffeIdError::PercentEncoded { at: 12 }
        );
    }

    #[test]
    fn rejects_percent_encoding_in_path() {
        assert_eq!(
            parse_err("spiffe://example.org/a%2Fb"),
            SpiffeIdError::PercentEncoded { at: 22 }
        );
        assert_eq!(
            parse_err("spiffe://example.org/%2e"),
            SpiffeIdError::PercentEncoded { at: 21 }
        );
    }

    // --- path ---

    #[test]
    fn rejects_empty_path_segment() {
        assert_eq!(
            parse_err("spiffe://example.org//a"),
            SpiffeIdError::EmptySegment { at: 21 }
        );
        assert_eq!(
            parse_err("spiffe://example.org/a//b"),
            SpiffeIdError::EmptySegment { at: 23 }
        );
    }

    #[test]
    fn rejects_dot_segments() {
        assert_eq!(
            parse_err("spiffe://example.org/./a"),
            SpiffeIdError::DotSegment { at: 21 }
        );
        assert_eq!(
            parse_err("spiffe://example.org/a/.."),
            SpiffeIdError::DotSegment { at: 23 }
        );
    }

    #[test]
    fn rejects_trailing_slash() {
        assert_eq!(
            parse_err("spiffe://example.org/"),
            SpiffeIdError::TrailingSlash
        );
        assert_eq!(
            parse_err("spiffe://example.org/a/"),
            SpiffeIdError::TrailingSlash
        );
    }

    #[test]
    fn rejects_invalid_path_character() {
        for (s, ch, at) in [
            ("spiffe://example.org/a b", ' ', 22),
            ("spiffe://example.org/a+b", '+', 22),
            ("spiffe://example.org/ns/défaut", 'é', 25),
            ("spiffe://example.org/a:b", ':', 22),
            ("spiffe://example.org/a@b", '@', 22),
        ] {
            assert_eq!(
                parse_err(s),
                SpiffeIdError::PathInvalidChar { ch, at },
                "{s}"
            );
        }
    }

    #[test]
    fn path_is_case_sensitive() {
        let lower = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let upper = SpiffeId::parse("spiffe://example.org/Web").unwrap();
        assert_ne!(lower, upper);
    }

    // --- length ---

    #[test]
    fn rejects_id_longer_than_2048_bytes() {
        let prefix = "spiffe://example.org/";
        let fits = format!("{prefix}{}", "a".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
        assert_eq!(fits.len(), MAX_SPIFFE_ID_LEN);
        assert!(SpiffeId::parse(&fits).is_ok());
        let long = format!("{fits}a");
        assert_eq!(parse_err(&long), SpiffeIdError::TooLong { len: 2049 });

        let td = td("example.org");
        let path = format!("/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert!(matches!(
            SpiffeId::from_path(&td, &path),
            Err(SpiffeIdError::TooLong { .. })
        ));
    }

    // --- builders ---

    #[test]
    fn from_path_builds_ids() {
        let td = td("example.org");
        assert_eq!(SpiffeId::from_path(&td, "").unwrap(), td.id());
        let id = SpiffeId::from_path(&td, "/a/b").unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/a/b");
        assert_eq!(id.path(), "/a/b");
        assert_eq!(id.trust_domain(), &td);
    }

    #[test]
    fn from_path_requires_leading_slash() {
        assert_eq!(
            SpiffeId::from_path(&td("example.org"), "a/b").unwrap_err(),
            SpiffeIdError::PathNotAbsolute
        );
    }

    #[test]
    fn from_path_applies_path_rules() {
        let td = td("example.org");
        assert_eq!(
            SpiffeId::from_path(&td, "/a/").unwrap_err(),
            SpiffeIdError::TrailingSlash
        );
        assert_eq!(
            SpiffeId::from_path(&td, "/a/../b").unwrap_err(),
            SpiffeIdError::DotSegment { at: 3 }
        );
    }

    #[test]
    fn for_service_account_builds_kubernetes_id() {
        let id = SpiffeId::for_service_account(&td("cluster.local"), "prod", "api").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/prod/sa/api");
        assert_eq!(
            id.service_account(),
            Some(ServiceAccountRef {
                namespace: "prod",
                name: "api"
            })
        );
    }

    #[test]
    fn for_service_account_rejects_slash_in_names() {
        let td = td("cluster.local");
        assert_eq!(
            SpiffeId::for_service_account(&td, "a/sa/b", "x").unwrap_err(),
            SpiffeIdError::InvalidNamespace(Box::new(SpiffeIdError::PathInvalidChar {
                ch: '/',
                at: 1
            }))
        );
        assert_eq!(
            SpiffeId::for_service_account(&td, "ns", "x/y").unwrap_err(),
            SpiffeIdError::InvalidServiceAccount(Box::new(SpiffeIdError::PathInvalidChar {
                ch: '/',
                at: 1
            }))
        );
    }

    #[test]
    fn for_service_account_rejects_empty_and_dot_names() {
        let td = td("cluster.local");
        assert!(matches!(
            SpiffeId::for_service_account(&td, "", "x"),
            Err(SpiffeIdError::InvalidNamespace(_))
        ));
        assert!(matches!(
            SpiffeId::for_service_account(&td, "ns", ".."),
            Err(SpiffeIdError::InvalidServiceAccount(_))
        ));
    }

    #[test]
    fn service_account_requires_exact_shape() {
        for path in ["/ns/a/sa", "/ns/a/sa/b/c", "/ns/a/x/b", "/x/a/sa/b", "/ns"] {
            let id = SpiffeId::from_path(&td("example.org"), path).unwrap();
            assert_eq!(id.service_account(), None, "{path}");
        }
    }

    #[test]
    fn membership_compares_trust_domains() {
        let id = SpiffeId::parse("spiffe://a.example/x").unwrap();
        assert!(id.is_member_of(&td("a.example")));
        assert!(!id.is_member_of(&td("b.example")));
        assert!(!id.is_member_of(&td("example")));
    }

    #[test]
    fn display_and_from_str_round_trip() {
        let id: SpiffeId = "spiffe://example.org/ns/a/sa/b".parse().unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/ns/a/sa/b");
        let td: TrustDomain = "example.org".parse().unwrap();
        assert_eq!(td.to_string(), "example.org");
        assert_eq!(td.id().to_string(), "spiffe://example.org");
    }

    #[test]
    fn ordering_follows_the_uri() {
        let a = SpiffeId::parse("spiffe://a/x").unwrap();
        let b = SpiffeId::parse("spiffe://a/y").unwrap();
        let c = SpiffeId::parse("spiffe://b").unwrap();
        assert!(a < b && b < c);
    }

    // --- properties ---

    fn trust_domain_strategy() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,40}"
    }

    fn segment_strategy() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,16}".prop_filter("dot segments are invalid", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn parse_of_display_is_identity(
            td in trust_domain_strategy(),
            segments in proptest::collection::vec(segment_strategy(), 0..6),
        ) {
            let td = TrustDomain::new(&td).unwrap();
            let path: String = segments.iter().map(|s| format!("/{s}")).collect();
            let id = SpiffeId::from_path(&td, &path).unwrap();
            // Through Display on purpose: that is the text other systems see.
            let text = id.to_string();
            let reparsed = SpiffeId::parse(&text).unwrap();
            prop_assert_eq!(reparsed.path(), id.path());
            prop_assert_eq!(reparsed.trust_domain(), id.trust_domain());
            prop_assert_eq!(reparsed, id);
        }

        #[test]
        fn parse_never_panics_on_arbitrary_strings(s in any::<String>()) {
            let _ = SpiffeId::parse(&s);
            let _ = TrustDomain::new(&s);
        }

        #[test]
        fn parse_never_panics_on_spiffe_like_strings(s in "(spiffe|SPIFFE|spiffe:)(/|//)?[a-zA-Z0-9./%:@?#_é -]{0,40}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id);
            }
        }
    }
}
