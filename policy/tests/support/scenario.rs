//! The scenario file format (tests/scenarios/*.yaml): named cases of policies, a
//! request and the expected outcome.

use std::collections::BTreeMap;
use std::net::IpAddr;

use citadel_policy::{OwnedHttp, OwnedJwt, OwnedRequest, join_repeated_headers};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Policies shared by the cases that have none of their own.
    #[serde(default)]
    pub policies: Option<String>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub why: String,
    #[serde(default)]
    pub root_namespace: Option<String>,
    #[serde(default)]
    pub policies: Option<String>,
    #[serde(default)]
    pub request: Option<Req>,
    pub expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Req {
    /// Peer principal; absent = plaintext peer.
    #[serde(default)]
    pub from: Option<String>,
    /// Default 10.0.0.1; `unknown` = not known.
    #[serde(default)]
    pub source_ip: Option<String>,
    #[serde(default)]
    pub remote_ip: Option<String>,
    pub to: To,
    /// Default 10.0.0.2; `unknown` = not known.
    #[serde(default)]
    pub destination_ip: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub http: Option<HttpReq>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpReq {
    #[serde(default = "get")]
    pub method: String,
    #[serde(default = "slash")]
    pub path: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub jwt: Option<JwtReq>,
}

fn get() -> String {
    "GET".into()
}

fn slash() -> String {
    "/".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtReq {
    pub principal: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub presenter: Option<String>,
    #[serde(default)]
    pub claims: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// ALLOW / DENY from authorization.
    #[serde(default)]
    pub decision: Option<String>,
    /// `ns/name rule N`, `no ALLOW policy applies`, `no ALLOW policy matched`.
    #[serde(default)]
    pub by: Option<String>,
    /// Effective mTLS mode.
    #[serde(default)]
    pub mtls: Option<String>,
    /// `ns/name (scope)` or `default`.
    #[serde(default)]
    pub mtls_by: Option<String>,
    /// `ns/name rule N` or `none`.
    #[serde(default)]
    pub audit: Option<String>,
    /// `VERDICT (by)` or `none`.
    #[serde(default)]
    pub dry_run: Option<String>,
    /// Final verdict of `check` (mTLS then authorization).
    #[serde(default)]
    pub check: Option<String>,
    #[serde(default)]
    pub skipped_allow_rules: Option<u32>,
    /// The policies must be rejected with an error containing this text.
    #[serde(default)]
    pub invalid: Option<String>,
    /// Loading must produce a warning containing this text.
    #[serde(default)]
    pub warning: Option<String>,
}

fn ip(v: &Option<String>, default: Option<&str>) -> Option<IpAddr> {
    match v.as_deref().or(default) {
        None | Some("unknown") => None,
        Some(s) => Some(s.parse().unwrap_or_else(|_| panic!("bad IP {s}"))),
    }
}

impl Req {
    pub fn owned(&self) -> OwnedRequest {
        OwnedRequest {
            principal: self.from.clone(),
            source_ip: ip(&self.source_ip, Some("10.0.0.1")),
            remote_ip: ip(&self.remote_ip, None),
            namespace: self.to.namespace.clone(),
            labels: self.to.labels.clone().into_iter().collect(),
            destination_ip: ip(&self.destination_ip, Some("10.0.0.2")),
            port: self.port,
            sni: self.sni.clone(),
            http: self.http.as_ref().map(|h| OwnedHttp {
                method: h.method.clone(),
                path: h.path.clone(),
                host: h.host.clone(),
                headers: join_repeated_headers(h.headers.clone().into_iter().collect()),
                jwt: h.jwt.as_ref().map(|j| OwnedJwt {
                    principal: j.principal.clone(),
                    audiences: j.audiences.clone(),
                    presenter: j.presenter.clone(),
                    claims: j
                        .claims
                        .iter()
                        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.clone(), v.clone())))
                        .collect(),
                }),
            }),
        }
    }
}
