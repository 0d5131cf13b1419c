//! The pure core of the proxy: what the first bytes of a connection are, whether a
//! connection is admitted on a port (PeerAuthentication, then AuthorizationPolicy),
//! and which open connections a new policy version no longer allows.

use std::net::IpAddr;

use citadel_policy::{
    Destination, Http, Jwt, Mode, OwnedJwt, Peer, PolicySet, Reason, Request, Verdict, Workload,
    join_repeated_headers,
};

/// The policies in force for this workload, and who this workload is.
#[derive(Debug, Clone)]
pub struct PolicyState {
    /// The CA's version of the set.
    pub version: String,
    /// This workload's SPIFFE ID, as the agent attested it.
    pub spiffe_id: String,
    /// This workload's namespace.
    pub namespace: String,
    /// This workload's labels (each key once).
    pub labels: Vec<(String, String)>,
    /// The compiled policies that apply to it.
    pub set: PolicySet,
}

impl PolicyState {
    /// Runs `f` with this workload as the policy engine names it (namespace and
    /// borrowed labels): the one place that builds it for the mTLS mode, request
    /// authentication and authorization.
    pub fn with_workload<R>(&self, f: impl FnOnce(&Workload<'_>) -> R) -> R {
        let labels: Vec<(&str, &str)> = self
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        f(&Workload {
            namespace: &self.namespace,
            labels: &labels,
        })
    }
}

/// What the first bytes of an inbound connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS handshake record (`0x16 0x03`).
    Tls,
    /// Anything else.
    Plaintext,
    /// Too few bytes to tell.
    NeedMore,
}

/// Tells a TLS ClientHello from plaintext by its first two bytes (a handshake
/// record, major version 3), without consuming anything.
pub fn sniff(first: &[u8]) -> Sniffed {
    match first {
        [] | [0x16] => Sniffed::NeedMore,
        [0x16, 0x03, ..] => Sniffed::Tls,
        _ => Sniffed::Plaintext,
    }
}

/// The HTTP version a plaintext connection speaks, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge (the connection preface).
    Http2,
    /// Too few bytes to tell.
    NeedMore,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 when the bytes are the whole connection preface, HTTP/1 as soon as
/// they differ from it.
pub fn http_version(first: &[u8]) -> HttpVersion {
    let n = first.len().min(H2_PREFACE.len());
    match (first.get(..n), H2_PREFACE.get(..n)) {
        (Some(a), Some(b)) if a != b => HttpVersion::Http1,
        _ if first.len() >= H2_PREFACE.len() => HttpVersion::Http2,
        _ => HttpVersion::NeedMore,
    }
}

/// The facts of one inbound connection, kept while it is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnFacts {
    /// Whether the peer came over mutual TLS.
    pub tls: bool,
    /// The peer's SPIFFE ID (mTLS only).
    pub peer_id: Option<String>,
    /// The peer's principal `<td>/ns/<ns>/sa/<sa>` (mTLS only).
    pub principal: Option<String>,
    /// The peer's IP.
    pub source_ip: Option<IpAddr>,
    /// The application port the connection is for.
    pub app_port: u16,
}

/// Whether the transport a peer chose is acceptable in a mode.
pub fn transport_allowed(mode: Mode, tls: bool) -> bool {
    match mode {
        Mode::Strict => tls,
        Mode::Disable => !tls,
        Mode::Permissive => true,
    }
}

/// The outcome of [`admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Allow or deny.
    pub verdict: Verdict,
    /// Why, for the log: the transport rule, the deciding policy and rule, or
    /// "no ALLOW policy matched".
    pub reason: String,
    /// When `istio.io/dry-run` policies apply: what they would have decided
    /// (logged, never enforced).
    pub dry_run: Option<String>,
}

impl Admission {
    /// Whether the connection may proceed.
    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

/// Decides a connection: the effective mTLS mode of the port must accept its
/// transport, then the AuthorizationPolicies for (source, this workload, port) decide.
pub fn admit(state: &PolicyState, facts: &ConnFacts) -> Admission {
    admit_request(state, facts, None)
}

/// The HTTP attributes of one request that AuthorizationPolicy can test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAttrs {
    /// The method.
    pub method: String,
    /// The path with its query (path matching ignores the query).
    pub path: String,
    /// The `Host` header, else the URI's authority (`:authority` on HTTP/2).
    pub host: String,
    /// Every header, repeated names joined with `,`.
    pub headers: Vec<(String, String)>,
    /// The end-user token request authentication verified, if any.
    pub jwt: Option<OwnedJwt>,
}

/// Reads the attributes of a request: method, path, host (the `Host` header or
/// `:authority`) and headers. Header values that are not UTF-8 are read lossily.
pub fn http_attributes(
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> HttpAttrs {
    let text = |v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let host = headers
        .get(http::header::HOST)
        .map(text)
        .or_else(|| uri.authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_default();
    let path = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
    let headers = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), text(v)))
        .collect();
    HttpAttrs {
        method: method.as_str().to_owned(),
        path,
        host,
        headers: join_repeated_headers(headers),
        jwt: None,
    }
}

/// Decides a connection (`http: None`) or one HTTP request on it: the transport
/// rule of the port, then the AuthorizationPolicies with the HTTP attributes.
pub fn admit_request(
    state: &PolicyState,
    facts: &ConnFacts,
    http: Option<&HttpAttrs>,
) -> Admission {
    state.with_workload(|workload| admit_workload(state, workload, facts, http))
}

fn admit_workload(
    state: &PolicyState,
    workload: &Workload<'_>,
    facts: &ConnFacts,
    http: Option<&HttpAttrs>,
) -> Admission {
    let mode = state.set.effective_mtls(workload, facts.app_port);
    if !transport_allowed(mode, facts.tls) {
        let what = if facts.tls { "mTLS" } else { "plaintext" };
        return Admission {
            verdict: Verdict::Deny,
            reason: format!(
                "{what} refused: PeerAuthentication mode {mode} on port {}",
                facts.app_port
            ),
            dry_run: None,
        };
    }
    let headers: Vec<(&str, &str)> = http
        .map(|h| {
            h.headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect()
        })
        .unwrap_or_default();
    let jwt = http.and_then(|h| h.jwt.as_ref());
    let audiences: Vec<&str> = jwt
        .map(|j| j.audiences.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let claims: Vec<(&str, &str)> = jwt
        .map(|j| {
            j.claims
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect()
        })
        .unwrap_or_default();
    let request = Request {
        source: Peer {
            principal: facts.principal.as_deref(),
            ip: facts.source_ip,
            remote_ip: None,
        },
        destination: Destination {
            workload: *workload,
            ip: None,
            port: facts.app_port,
        },
        sni: None,
        http: http.map(|h| Http {
            method: &h.method,
            path: &h.path,
            host: &h.host,
            headers: &headers,
            jwt: jwt.map(|j| Jwt {
                principal: &j.principal,
                audiences: &audiences,
                presenter: j.presenter.as_deref(),
                claims: &claims,
            }),
        }),
    };
    let decision = state.set.decide(&request);
    let reason = match decision.reason {
        Reason::NoAllowMatched => "no ALLOW policy matched".to_owned(),
        other => other.to_string(),
    };
    Admission {
        verdict: decision.verdict,
        reason,
        dry_run: decision
            .dry_run
            .map(|r| format!("{}: {r}", r.verdict().as_str())),
    }
}

/// The open connections (by key) that `state` no longer admits.
pub fn to_close<'a, K: Copy + 'a>(
    state: &PolicyState,
    open: impl IntoIterator<Item = (K, &'a ConnFacts)>,
) -> Vec<(K, Admission)> {
    open.into_iter()
        .filter_map(|(k, facts)| {
            let a = admit(state, facts);
            (!a.allowed()).then_some((k, a))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use citadel_policy::{MeshConfig, load_str};

    fn state(yaml: &str) -> PolicyState {
        PolicyState {
            version: "v1".into(),
            spiffe_id: "spiffe://cluster.local/ns/shop/sa/api".into(),
            namespace: "shop".into(),
            labels: vec![("app".into(), "api".into())],
            set: load_str("test.yaml", yaml, &MeshConfig::default()).unwrap(),
        }
    }

    fn mtls_from(sa: &str, port: u16) -> ConnFacts {
        ConnFacts {
            tls: true,
            peer_id: Some(format!("spiffe://cluster.local/ns/shop/sa/{sa}")),
            principal: Some(format!("cluster.local/ns/shop/sa/{sa}")),
            source_ip: Some([127, 0, 0, 1].into()),
            app_port: port,
        }
    }

    fn plaintext(port: u16) -> ConnFacts {
        ConnFacts {
            tls: false,
            peer_id: None,
            principal: None,
            source_ip: Some([127, 0, 0, 1].into()),
            app_port: port,
        }
    }

    const ONLY_WEB: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-web, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
"#;

    const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
"#;

    #[test]
    fn a_client_hello_is_told_from_plaintext_by_two_bytes() {
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x02]), Sniffed::Tls);
        assert_eq!(sniff(&[0x16, 0x03]), Sniffed::Tls);
        assert_eq!(sniff(b"GET / HTTP/1.1"), Sniffed::Plaintext);
        assert_eq!(sniff(&[0x16, 0x01]), Sniffed::Plaintext);
        assert_eq!(sniff(&[0x16]), Sniffed::NeedMore);
        assert_eq!(sniff(&[]), Sniffed::NeedMore);
    }

    #[test]
    fn http2_prior_knowledge_is_told_by_the_whole_preface() {
        assert_eq!(http_version(H2_PREFACE), HttpVersion::Http2);
        assert_eq!(http_version(&H2_PREFACE[..10]), HttpVersion::NeedMore);
        assert_eq!(http_version(b""), HttpVersion::NeedMore);
        assert_eq!(http_version(b"GET / HTTP/1.1\r\n"), HttpVersion::Http1);
        assert_eq!(http_version(b"PRI * HTTP/1.1\r\n"), HttpVersion::Http1);
        assert_eq!(http_version(b"P"), HttpVersion::NeedMore);
        assert_eq!(http_version(b"POST"), HttpVersion::Http1);
    }

    #[test]
    fn modes_accept_their_transports_only() {
        assert!(transport_allowed(Mode::Strict, true));
        assert!(!transport_allowed(Mode::Strict, false));
        assert!(transport_allowed(Mode::Permissive, true));
        assert!(transport_allowed(Mode::Permissive, false));
        assert!(!transport_allowed(Mode::Disable, true));
        assert!(transport_allowed(Mode::Disable, false));
    }

    #[test]
    fn strict_port_denies_plaintext_before_authorization() {
        let s = state(STRICT);
        let a = admit(&s, &plaintext(8080));
        assert_eq!(a.verdict, Verdict::Deny);
        assert!(a.reason.contains("STRICT"), "{}", a.reason);
        assert!(admit(&s, &mtls_from("web", 8080)).allowed());
    }

    #[test]
    fn allow_policy_admits_its_principal_and_names_the_rule() {
        let s = state(ONLY_WEB);
        let a = admit(&s, &mtls_from("web", 8080));
        assert!(a.allowed());
        assert!(a.reason.contains("shop/only-web rule 0"), "{}", a.reason);
    }

    #[test]
    fn allow_policy_denies_other_principals_with_no_allow_matched() {
        let s = state(ONLY_WEB);
        let a = admit(&s, &mtls_from("other", 8080));
        assert_eq!(a.verdict, Verdict::Deny);
        assert_eq!(a.reason, "no ALLOW policy matched");
        assert_eq!(admit(&s, &plaintext(8080)).verdict, Verdict::Deny);
    }

    #[test]
    fn dry_run_policies_are_reported_but_not_enforced() {
        let s = state(&ONLY_WEB.replace(
            "metadata: {name: only-web, namespace: shop}",
            "metadata: {name: only-web, namespace: shop, annotations: {istio.io/dry-run: \"true\"}}",
        ));
        let a = admit(&s, &mtls_from("other", 8080));
        assert!(a.allowed(), "{a:?}");
        let dry = a.dry_run.unwrap();
        assert!(dry.starts_with("DENY"), "{dry}");
        assert!(
            admit(&s, &mtls_from("web", 8080))
                .dry_run
                .unwrap()
                .starts_with("ALLOW")
        );
    }

    #[test]
    fn no_policies_allow_everything() {
        let s = state("");
        assert!(admit(&s, &plaintext(8080)).allowed());
        assert!(admit(&s, &mtls_from("x", 8080)).allowed());
    }

    #[test]
    fn a_new_policy_closes_exactly_the_connections_it_no_longer_allows() {
        let open = [
            (1u64, mtls_from("web", 8080)),
            (2, mtls_from("other", 8080)),
            (3, plaintext(8080)),
        ];
        let everything = state("");
        assert!(to_close(&everything, open.iter().map(|(k, f)| (*k, f))).is_empty());
        let only_web = state(ONLY_WEB);
        let closed: Vec<u64> = to_close(&only_web, open.iter().map(|(k, f)| (*k, f)))
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(closed, vec![2, 3]);
        let strict = state(STRICT);
        let closed: Vec<u64> = to_close(&strict, open.iter().map(|(k, f)| (*k, f)))
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(closed, vec![3]);
    }

    /// The Istio docs' example shape: ALLOW GET on `/info*` from one principal.
    const GET_INFO_FROM_WEB: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-info, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/info*"]}}]
    when: [{key: "request.headers[x-team]", notValues: ["blocked"]}]
"#;

    fn attrs(method: &str, uri: &str, headers: &[(&str, &str)]) -> HttpAttrs {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        http_attributes(
            &method.parse().unwrap(),
            &uri.parse::<http::Uri>().unwrap(),
            &map,
        )
    }

    #[test]
    fn http_attributes_take_host_from_the_host_header_else_the_authority() {
        let a = attrs(
            "GET",
            "/info?x=1",
            &[("host", "api.shop"), ("x-a", "1"), ("X-A", "2")],
        );
        assert_eq!(a.method, "GET");
        assert_eq!(a.path, "/info?x=1");
        assert_eq!(a.host, "api.shop");
        assert!(
            a.headers.contains(&("x-a".to_owned(), "1,2".to_owned())),
            "{a:?}"
        );
        // HTTP/2: no Host header, the :authority is in the URI.
        let a = attrs("POST", "https://api.shop:8080/v1", &[]);
        assert_eq!(a.host, "api.shop:8080");
        assert_eq!(a.path, "/v1");
        let a = attrs("OPTIONS", "*", &[]);
        assert_eq!(a.path, "*");
    }

    #[test]
    fn istio_docs_example_allows_get_on_info_from_web_only() {
        let s = state(GET_INFO_FROM_WEB);
        let web = mtls_from("web", 8080);
        let a = admit_request(&s, &web, Some(&attrs("GET", "/info/v1", &[])));
        assert!(a.allowed(), "{a:?}");
        assert!(a.reason.contains("shop/get-info rule 0"), "{}", a.reason);
        for (method, path, headers, from) in [
            ("POST", "/info", &[][..], "web"),
            ("GET", "/admin", &[][..], "web"),
            ("GET", "/info", &[][..], "other"),
            ("GET", "/info", &[("x-team", "blocked")][..], "web"),
        ] {
            let a = admit_request(
                &s,
                &mtls_from(from, 8080),
                Some(&attrs(method, path, headers)),
            );
            assert_eq!(
                a.verdict,
                Verdict::Deny,
                "{method} {path} {headers:?} from {from}"
            );
            assert_eq!(a.reason, "no ALLOW policy matched");
        }
    }

    #[test]
    fn http_rules_cannot_allow_a_connection_without_http_attributes() {
        let s = state(GET_INFO_FROM_WEB);
        assert_eq!(admit(&s, &mtls_from("web", 8080)).verdict, Verdict::Deny);
    }

    #[test]
    fn the_transport_rule_applies_to_each_request_too() {
        let s = state(STRICT);
        let a = admit_request(&s, &plaintext(8080), Some(&attrs("GET", "/", &[])));
        assert_eq!(a.verdict, Verdict::Deny);
        assert!(a.reason.contains("STRICT"), "{}", a.reason);
    }
}
