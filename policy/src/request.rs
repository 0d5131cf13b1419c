//! What a decision is about: one connection, or one HTTP request on it.
//!
//! [`Request`] borrows everything, so the proxy builds one per connection or request
//! without allocating. [`OwnedRequest`] holds owned values for tools and tests.

use std::net::IpAddr;

/// A destination workload: its namespace and labels (each key at most once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload<'a> {
    /// Kubernetes namespace.
    pub namespace: &'a str,
    /// Pod labels as `(key, value)` pairs.
    pub labels: &'a [(&'a str, &'a str)],
}

impl Workload<'_> {
    /// The value of a label.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// The peer that opened the connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer<'a> {
    /// Its verified mTLS identity `<td>/ns/<ns>/sa/<sa>` (the SPIFFE ID without
    /// `spiffe://`); `None` for a plaintext peer.
    pub principal: Option<&'a str>,
    /// Its IP address; `None` when unknown (then `source.ip` cannot be judged).
    pub ip: Option<IpAddr>,
    /// The original client IP (X-Forwarded-For / PROXY protocol); when `None`,
    /// `remote.ip` is the peer IP.
    pub remote_ip: Option<IpAddr>,
}

/// Where the connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination<'a> {
    /// The workload receiving it.
    pub workload: Workload<'a>,
    /// Its IP address; `None` when unknown (then `destination.ip` cannot be judged).
    pub ip: Option<IpAddr>,
    /// The workload port.
    pub port: u16,
}

/// The verified JWT of an HTTP request (from request authentication).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jwt<'a> {
    /// `<iss>/<sub>`.
    pub principal: &'a str,
    /// `aud` values.
    pub audiences: &'a [&'a str],
    /// `azp`.
    pub presenter: Option<&'a str>,
    /// Top-level claims as `(name, value)`; a list claim appears once per element.
    pub claims: &'a [(&'a str, &'a str)],
}

/// The HTTP part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:path` (the query string is ignored by path matching).
    pub path: &'a str,
    /// `:authority` / `Host`.
    pub host: &'a str,
    /// Headers as `(name, value)`; names match case-insensitively, and a name that
    /// appears more than once is matched on its first value, so callers join
    /// repeated headers with `,` first (see [`join_repeated_headers`]).
    pub headers: &'a [(&'a str, &'a str)],
    /// The verified JWT, if any.
    pub jwt: Option<Jwt<'a>>,
}

impl Http<'_> {
    /// The first value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// One decision's input. `http: None` means a plain TCP connection, on which
/// HTTP-only attributes cannot be judged (they fail closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The peer.
    pub source: Peer<'a>,
    /// The destination.
    pub destination: Destination<'a>,
    /// TLS SNI, if the peer sent one.
    pub sni: Option<&'a str>,
    /// The HTTP request, or `None` for TCP.
    pub http: Option<Http<'a>>,
}

/// Attribute groups that a request may lack (bit set).
pub(crate) mod avail {
    /// HTTP attributes.
    pub const HTTP: u8 = 1;
    /// The peer IP.
    pub const SOURCE_IP: u8 = 2;
    /// The original client IP.
    pub const REMOTE_IP: u8 = 4;
    /// The destination IP.
    pub const DEST_IP: u8 = 8;
}

impl<'a> Request<'a> {
    /// Which attribute groups this request carries.
    pub(crate) fn available(&self) -> u8 {
        let mut a = 0;
        if self.http.is_some() {
            a |= avail::HTTP;
        }
        if self.source.ip.is_some() {
            a |= avail::SOURCE_IP;
        }
        if self.remote_ip().is_some() {
            a |= avail::REMOTE_IP;
        }
        if self.destination.ip.is_some() {
            a |= avail::DEST_IP;
        }
        a
    }

    /// `remote.ip`: the original client IP, else the peer IP.
    pub fn remote_ip(&self) -> Option<IpAddr> {
        self.source.remote_ip.or(self.source.ip)
    }

    /// `source.namespace`, from the principal.
    pub fn source_namespace(&self) -> Option<&'a str> {
        principal_parts(self.source.principal?).map(|(ns, _)| ns)
    }

    /// `(namespace, service account)` of the peer, from the principal.
    pub fn source_service_account(&self) -> Option<(&'a str, &'a str)> {
        principal_parts(self.source.principal?)
    }
}

/// Splits `<td>/ns/<ns>/sa/<sa>` into `(ns, sa)`; `None` for any other shape.
pub fn principal_parts(principal: &str) -> Option<(&str, &str)> {
    let mut it = principal.split('/');
    let (td, ns_kw, ns, sa_kw, sa) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || td.is_empty() || ns_kw != "ns" || sa_kw != "sa" {
        return None;
    }
    if ns.is_empty() || sa.is_empty() {
        return None;
    }
    Some((ns, sa))
}

/// An input that the check command could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// `--from` is not `spiffe://<td>/ns/<ns>/sa/<sa>`.
    #[error(
        "{0:?} is not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
    )]
    SpiffeId(String),
    /// A `k=v` list item without `=` or with an empty key.
    #[error("{0:?} is not key=value")]
    KeyValue(String),
    /// The same label given twice.
    #[error("label {0:?} given more than once")]
    DuplicateLabel(String),
}

/// Turns `spiffe://td/ns/a/sa/x` into the Istio principal `td/ns/a/sa/x`.
pub fn principal_from_spiffe_id(id: &str) -> Result<String, InputError> {
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| InputError::SpiffeId(id.to_owned()))?;
    if principal_parts(rest).is_none() {
        return Err(InputError::SpiffeId(id.to_owned()));
    }
    Ok(rest.to_owned())
}

/// Reads `app=web,version=v1` (empty string = no labels).
pub fn parse_labels(s: &str) -> Result<Vec<(String, String)>, InputError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = parse_key_value(item)?;
        if out.iter().any(|(ek, _)| *ek == k) {
            return Err(InputError::DuplicateLabel(k));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// Reads one `key=value` (the value may contain `=`).
pub fn parse_key_value(s: &str) -> Result<(String, String), InputError> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(InputError::KeyValue(s.to_owned())),
    }
}

/// Joins headers that appear more than once into one `a,b` value (names compared
/// case-insensitively, first spelling kept), the way HTTP allows them to be combined.
pub fn join_repeated_headers(headers: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        match out.iter_mut().find(|(ek, _)| ek.eq_ignore_ascii_case(&k)) {
            Some((_, ev)) => {
                ev.push(',');
                ev.push_str(&v);
            }
            None => out.push((k, v)),
        }
    }
    out
}

/// An owned request description (for the CLI, scenario files and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedRequest {
    /// Peer principal (`<td>/ns/<ns>/sa/<sa>`), `None` for plaintext.
    pub principal: Option<String>,
    /// Peer IP.
    pub source_ip: Option<IpAddr>,
    /// Original client IP.
    pub remote_ip: Option<IpAddr>,
    /// Destination namespace.
    pub namespace: String,
    /// Destination labels.
    pub labels: Vec<(String, String)>,
    /// Destination IP.
    pub destination_ip: Option<IpAddr>,
    /// Destination port.
    pub port: u16,
    /// SNI.
    pub sni: Option<String>,
    /// HTTP part, `None` for TCP.
    pub http: Option<OwnedHttp>,
}

/// Owned HTTP part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedHttp {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Host.
    pub host: String,
    /// Headers (already joined).
    pub headers: Vec<(String, String)>,
    /// JWT, if any.
    pub jwt: Option<OwnedJwt>,
}

/// Owned JWT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedJwt {
    /// `<iss>/<sub>`.
    pub principal: String,
    /// Audiences.
    pub audiences: Vec<String>,
    /// Presenter.
    pub presenter: Option<String>,
    /// Claims as `(name, value)` pairs.
    pub claims: Vec<(String, String)>,
}

/// Borrowed slices built from an [`OwnedRequest`]; [`RequestParts::request`] then
/// lends a [`Request`].
#[derive(Debug)]
pub struct RequestParts<'a> {
    owned: &'a OwnedRequest,
    labels: Vec<(&'a str, &'a str)>,
    headers: Vec<(&'a str, &'a str)>,
    audiences: Vec<&'a str>,
    claims: Vec<(&'a str, &'a str)>,
}

impl OwnedRequest {
    /// Borrows the pieces a [`Request`] needs.
    pub fn parts(&self) -> RequestParts<'_> {
        let http = self.http.as_ref();
        let jwt = http.and_then(|h| h.jwt.as_ref());
        RequestParts {
            owned: self,
            labels: pairs(&self.labels),
            headers: http.map(|h| pairs(&h.headers)).unwrap_or_default(),
            audiences: jwt
                .map(|j| j.audiences.iter().map(String::as_str).collect())
                .unwrap_or_default(),
            claims: jwt.map(|j| pairs(&j.claims)).unwrap_or_default(),
        }
    }
}

fn pairs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

impl<'a> RequestParts<'a> {
    /// The request.
    pub fn request(&self) -> Request<'_> {
        let o = self.owned;
        Request {
            source: Peer {
                principal: o.principal.as_deref(),
                ip: o.source_ip,
                remote_ip: o.remote_ip,
            },
            destination: Destination {
                workload: Workload {
                    namespace: &o.namespace,
                    labels: &self.labels,
                },
                ip: o.destination_ip,
                port: o.port,
            },
            sni: o.sni.as_deref(),
            http: o.http.as_ref().map(|h| Http {
                method: &h.method,
                path: &h.path,
                host: &h.host,
                headers: &self.headers,
                jwt: h.jwt.as_ref().map(|j| Jwt {
                    principal: &j.principal,
                    audiences: &self.audiences,
                    presenter: j.presenter.as_deref(),
                    claims: &self.claims,
                }),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_parts_require_the_istio_shape() {
        assert_eq!(principal_parts("cluster.local/ns/a/sa/x"), Some(("a", "x")));
        assert_eq!(principal_parts("cluster.local/ns/a/sa/x/extra"), None);
        assert_eq!(principal_parts("cluster.local/sa/a/ns/x"), None);
        assert_eq!(principal_parts("/ns/a/sa/x"), None);
        assert_eq!(principal_parts("cluster.local/ns//sa/x"), None);
    }

    #[test]
    fn spiffe_ids_become_principals() {
        assert_eq!(
            principal_from_spiffe_id("spiffe://td/ns/a/sa/x").unwrap(),
            "td/ns/a/sa/x"
        );
        assert!(principal_from_spiffe_id("td/ns/a/sa/x").is_err());
        assert!(principal_from_spiffe_id("spiffe://td/a/x").is_err());
    }

    #[test]
    fn labels_parse_and_reject_duplicates() {
        assert_eq!(
            parse_labels("app=web, version=v1").unwrap(),
            vec![
                ("app".into(), "web".into()),
                ("version".into(), "v1".into())
            ]
        );
        assert!(parse_labels("").unwrap().is_empty());
        assert!(matches!(parse_labels("app"), Err(InputError::KeyValue(_))));
        assert!(matches!(
            parse_labels("app=a,app=b"),
            Err(InputError::DuplicateLabel(_))
        ));
    }

    #[test]
    fn repeated_headers_are_joined() {
        let h = join_repeated_headers(vec![
            ("X-A".into(), "1".into()),
            ("x-a".into(), "2".into()),
            ("b".into(), "3".into()),
        ]);
        assert_eq!(
            h,
            vec![("X-A".into(), "1,2".into()), ("b".into(), "3".into())]
        );
    }
}
