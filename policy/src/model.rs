//! The Istio objects as operators write them: `security.istio.io/v1` and `v1beta1`
//! `PeerAuthentication`, `AuthorizationPolicy` and `RequestAuthentication`.
//!
//! Every struct refuses unknown fields, so a typo (`principalz`) is an error that names
//! the field instead of a rule that silently matches more than intended. Optional lists
//! stay `Option` so that "absent" and "empty" can be told apart where Istio does.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};

/// The API group and version of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiVersion {
    /// `security.istio.io/v1`.
    V1,
    /// `security.istio.io/v1beta1`.
    V1beta1,
}

impl ApiVersion {
    /// Parses an `apiVersion` string; `None` when it is not one we accept.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "security.istio.io/v1" => Some(Self::V1),
            "security.istio.io/v1beta1" => Some(Self::V1beta1),
            _ => None,
        }
    }

    /// The `apiVersion` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "security.istio.io/v1",
            Self::V1beta1 => "security.istio.io/v1beta1",
        }
    }
}

/// Kubernetes object metadata. The fields Citadel uses are typed; the other usual
/// Kubernetes fields are accepted and ignored; anything else is an error.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// `metadata.name` (required).
    pub name: Option<String>,
    /// `metadata.namespace`; `default` when absent, as with `kubectl apply`.
    pub namespace: Option<String>,
    /// `metadata.creationTimestamp` (RFC 3339); decides precedence between policies.
    pub creation_timestamp: Option<String>,
    /// `metadata.annotations`; `istio.io/dry-run` is read from here.
    pub annotations: Option<BTreeMap<String, String>>,
    /// `metadata.labels` (not used for decisions).
    pub labels: Option<BTreeMap<String, String>>,
    /// Accepted and ignored.
    pub generate_name: Option<IgnoredAny>,
    /// Accepted and ignored.
    pub uid: Option<IgnoredAny>,
    /// Accepted and ignored.
    pub resource_version: Option<IgnoredAny>,
    /// Accepted and ignored.
    pub generation: Option<IgnoredAny>,
    /// Accepted and ignored.
    pub managed_fields: Option<IgnoredAny>,
    /// Accepted and ignored.
    pub owner_references: Option<IgnoredAny>,
    /// Accepted and ignored.
    pub finalizers: Option<IgnoredAny>,
    /// Accepted and ignored.
    pub self_link: Option<IgnoredAny>,
    /// Accepted and ignored.
    pub deletion_timestamp: Option<IgnoredAny>,
    /// Accepted and ignored.
    pub deletion_grace_period_seconds: Option<IgnoredAny>,
}

impl ObjectMeta {
    /// The object's name, or `""` when missing (validation reports that).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    /// The object's namespace, `default` when absent.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }

    /// The value of an annotation.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

/// The namespace of an object whose `metadata.namespace` is absent.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The annotation that turns an AuthorizationPolicy into a dry run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// `selector: {matchLabels: {...}}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must all carry.
    pub match_labels: Option<BTreeMap<String, String>>,
}

impl WorkloadSelector {
    /// True when the selector names no label (Istio treats it as absent).
    pub fn is_empty(&self) -> bool {
        self.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
    }
}

/// True when `selector` is absent or selects no label.
pub fn selector_is_empty(selector: Option<&WorkloadSelector>) -> bool {
    selector.is_none_or(WorkloadSelector::is_empty)
}

/// `mtls.mode` as written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum MtlsMode {
    /// Inherit from the enclosing scope.
    #[default]
    #[serde(rename = "UNSET")]
    Unset,
    /// Plaintext only.
    #[serde(rename = "DISABLE")]
    Disable,
    /// Mutual TLS or plaintext.
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    /// Mutual TLS only.
    #[serde(rename = "STRICT")]
    Strict,
}

/// `{mode: ...}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    /// The mode; absent means UNSET.
    pub mode: Option<MtlsMode>,
}

impl MutualTls {
    /// The mode, UNSET when absent.
    pub fn mode(&self) -> MtlsMode {
        self.mode.unwrap_or_default()
    }
}

/// A `portLevelMtls` key: a number in YAML, a numeric string in JSON. Kept wide so
/// that an out-of-range port is reported as such rather than as a type error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey(pub i64);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl Visitor<'_> for PortVisitor {
            type Value = PortKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortKey, E> {
                Ok(PortKey(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortKey, E> {
                Ok(PortKey(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortKey, E> {
                v.parse::<i64>()
                    .map(PortKey)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(PortVisitor)
    }
}

/// `spec` of a PeerAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Workloads the policy applies to; absent = the whole namespace.
    pub selector: Option<WorkloadSelector>,
    /// The mode for all ports.
    pub mtls: Option<MutualTls>,
    /// Per workload port overrides (requires a selector).
    pub port_level_mtls: Option<BTreeMap<PortKey, MutualTls>>,
}

/// `spec.action` of an AuthorizationPolicy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Action {
    /// Allow when a rule matches (the default).
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    /// Deny when a rule matches.
    #[serde(rename = "DENY")]
    Deny,
    /// Mark the request audited when a rule matches; never changes the decision.
    #[serde(rename = "AUDIT")]
    Audit,
    /// Delegate to an external provider (unsupported by Citadel: rejected at load).
    #[serde(rename = "CUSTOM")]
    Custom,
}

impl Action {
    /// The name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
            Self::Custom => "CUSTOM",
        }
    }
}

/// `spec.provider`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    /// The provider name from MeshConfig.
    pub name: Option<String>,
}

/// `spec.targetRef` / `spec.targetRefs[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    /// API group of the target.
    pub group: Option<String>,
    /// Kind of the target (`Gateway`, `Service`, `ServiceEntry`, `GatewayClass`).
    pub kind: Option<String>,
    /// Name of the target.
    pub name: Option<String>,
    /// Namespace of the target.
    pub namespace: Option<String>,
}

/// `spec` of an AuthorizationPolicy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to; absent = every workload in scope.
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single target reference.
    pub target_ref: Option<PolicyTargetReference>,
    /// Target references (gateways and waypoints).
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    /// The rules; absent or empty = the policy matches nothing.
    pub rules: Option<Vec<Rule>>,
    /// ALLOW (default), DENY, AUDIT or CUSTOM.
    pub action: Option<Action>,
    /// CUSTOM provider.
    pub provider: Option<ExtensionProvider>,
}

impl AuthorizationPolicySpec {
    /// The action, ALLOW when absent.
    pub fn action(&self) -> Action {
        self.action.unwrap_or_default()
    }

    /// The rules (empty when absent).
    pub fn rules(&self) -> &[Rule] {
        self.rules.as_deref().unwrap_or(&[])
    }
}

/// One rule: some `from`, some `to` and every `when` must match.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Sources (OR); absent = any.
    pub from: Option<Vec<RuleFrom>>,
    /// Operations (OR); absent = any.
    pub to: Option<Vec<RuleTo>>,
    /// Conditions (AND); absent = none.
    pub when: Option<Vec<Condition>>,
}

/// `from[]` item.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    /// The source.
    pub source: Option<Source>,
}

/// `to[]` item.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    /// The operation.
    pub operation: Option<Operation>,
}

/// Who sends the request. Fields AND, list items OR.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities `<td>/ns/<ns>/sa/<sa>` (mTLS).
    pub principals: Option<Vec<String>>,
    /// Negated `principals`.
    pub not_principals: Option<Vec<String>>,
    /// JWT identities `<iss>/<sub>` (HTTP only).
    pub request_principals: Option<Vec<String>>,
    /// Negated `requestPrincipals`.
    pub not_request_principals: Option<Vec<String>>,
    /// Peer namespaces (from the mTLS identity).
    pub namespaces: Option<Vec<String>>,
    /// Negated `namespaces`.
    pub not_namespaces: Option<Vec<String>>,
    /// Peer service accounts `<ns>/<sa>` (from the mTLS identity).
    pub service_accounts: Option<Vec<String>>,
    /// Negated `serviceAccounts`.
    pub not_service_accounts: Option<Vec<String>>,
    /// Source IP addresses or CIDRs.
    pub ip_blocks: Option<Vec<String>>,
    /// Negated `ipBlocks`.
    pub not_ip_blocks: Option<Vec<String>>,
    /// Original client IPs or CIDRs.
    pub remote_ip_blocks: Option<Vec<String>>,
    /// Negated `remoteIpBlocks`.
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

/// What the request does. Fields AND, list items OR.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// HTTP hosts (case-insensitive; HTTP only).
    pub hosts: Option<Vec<String>>,
    /// Negated `hosts`.
    pub not_hosts: Option<Vec<String>>,
    /// Destination ports (numeric strings).
    pub ports: Option<Vec<String>>,
    /// Negated `ports`.
    pub not_ports: Option<Vec<String>>,
    /// HTTP methods (HTTP only).
    pub methods: Option<Vec<String>>,
    /// Negated `methods`.
    pub not_methods: Option<Vec<String>>,
    /// HTTP paths (HTTP only).
    pub paths: Option<Vec<String>>,
    /// Negated `paths`.
    pub not_paths: Option<Vec<String>>,
}

/// `when[]` item.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// The attribute (`source.ip`, `request.headers[x-token]`, ...).
    pub key: Option<String>,
    /// Values of which one must match.
    pub values: Option<Vec<String>>,
    /// Values of which none may match.
    pub not_values: Option<Vec<String>>,
}

/// A PeerAuthentication object.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerAuthentication {
    /// Its apiVersion.
    pub api_version: ApiVersion,
    /// Its metadata.
    pub metadata: ObjectMeta,
    /// Its spec (`{}` when absent).
    pub spec: PeerAuthenticationSpec,
}

/// An AuthorizationPolicy object.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizationPolicy {
    /// Its apiVersion.
    pub api_version: ApiVersion,
    /// Its metadata.
    pub metadata: ObjectMeta,
    /// Its spec (`{}` when absent).
    pub spec: AuthorizationPolicySpec,
}

/// `fromHeaders[]` item: a header carrying the token, after an optional prefix.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    /// Header name (case-insensitive).
    pub name: Option<String>,
    /// Text before the token, e.g. `Bearer `.
    pub prefix: Option<String>,
}

/// `outputClaimToHeaders[]` item.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    /// The header to set.
    pub header: Option<String>,
    /// The claim whose value it gets (`a.b` for a nested claim).
    pub claim: Option<String>,
}

/// `jwtRules[]` item: one issuer and how its tokens are found and checked.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// Required `iss` (empty = any issuer, then `jwksUri` is required).
    pub issuer: Option<String>,
    /// Accepted `aud` values; absent or empty = any.
    pub audiences: Option<Vec<String>>,
    /// HTTPS URL of the issuer's JWKS; the CA fetches it.
    pub jwks_uri: Option<String>,
    /// The JWKS inline, as a JSON string.
    pub jwks: Option<String>,
    /// Headers carrying the token; absent = `Authorization: Bearer` and `access_token`.
    pub from_headers: Option<Vec<JwtHeader>>,
    /// Query parameters carrying the token.
    pub from_params: Option<Vec<String>>,
    /// Cookies carrying the token.
    pub from_cookies: Option<Vec<String>>,
    /// Header that receives the base64url payload of a verified token.
    pub output_payload_to_header: Option<String>,
    /// Send the token to the application (default: strip it).
    pub forward_original_token: Option<bool>,
    /// Claims copied into headers for the application.
    pub output_claim_to_headers: Option<Vec<ClaimToHeader>>,
    /// Time limit of a JWKS fetch (e.g. `5s`).
    pub timeout: Option<String>,
    /// Claims read as space-separated lists (unsupported: rejected).
    pub space_delimited_claims: Option<Vec<String>>,
}

/// `spec` of a RequestAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    /// Workloads the policy applies to; absent = every workload in scope.
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single target reference.
    pub target_ref: Option<PolicyTargetReference>,
    /// Target references (gateways and waypoints).
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    /// The issuers accepted.
    pub jwt_rules: Option<Vec<JwtRule>>,
}

/// A RequestAuthentication object.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestAuthentication {
    /// Its apiVersion.
    pub api_version: ApiVersion,
    /// Its metadata.
    pub metadata: ObjectMeta,
    /// Its spec (`{}` when absent).
    pub spec: RequestAuthenticationSpec,
}

/// Any policy kind.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyObject {
    /// A PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
    /// An AuthorizationPolicy.
    AuthorizationPolicy(AuthorizationPolicy),
    /// A RequestAuthentication.
    RequestAuthentication(RequestAuthentication),
}

impl PolicyObject {
    /// `PeerAuthentication`, `AuthorizationPolicy` or `RequestAuthentication`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PeerAuthentication(_) => "PeerAuthentication",
            Self::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Self::RequestAuthentication(_) => "RequestAuthentication",
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::PeerAuthentication(p) => &p.metadata,
            Self::AuthorizationPolicy(p) => &p.metadata,
            Self::RequestAuthentication(p) => &p.metadata,
        }
    }
}
