//! `citadel-policy`: Istio `PeerAuthentication`, `AuthorizationPolicy` and
//! `RequestAuthentication` for Citadel.
//!
//! The pure decision core: read the YAML/JSON operators already have ([`Loader`]),
//! validate it with errors that name the object and field ([`Diagnostic`]), compile
//! it once into an index keyed by namespace and selector ([`PolicySet`]), then answer
//! per connection or request: the effective mTLS mode of a workload port
//! ([`PolicySet::effective_mtls`]) and the authorization decision with the policy
//! and rule that made it ([`PolicySet::decide`]). [`explain`] renders a check for
//! operators. No I/O anywhere: sources are `(name, text)` pairs.
//!
//! ```
//! use citadel_policy::{load_str, MeshConfig, OwnedRequest, Verdict};
//!
//! let yaml = r#"
//! apiVersion: security.istio.io/v1
//! kind: AuthorizationPolicy
//! metadata: {name: only-frontend, namespace: shop}
//! spec:
//!   selector: {matchLabels: {app: cart}}
//!   rules:
//!   - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
//! "#;
//! let set = load_str("policies.yaml", yaml, &MeshConfig::default()).unwrap();
//! let owned = OwnedRequest {
//!     principal: Some("cluster.local/ns/shop/sa/frontend".into()),
//!     namespace: "shop".into(),
//!     labels: vec![("app".into(), "cart".into())],
//!     port: 8080,
//!     ..Default::default()
//! };
//! let parts = owned.parts();
//! let decision = set.decide(&parts.request());
//! assert_eq!(decision.verdict, Verdict::Allow);
//! assert_eq!(decision.reason.rule().unwrap().name, "only-frontend");
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod applies;
mod attr;
pub mod authn;
mod authz;
mod compile;
mod diag;
pub mod explain;
mod index;
mod load;
mod matching;
pub mod model;
mod mtls;
mod request;
mod set;
mod timestamp;
mod validate;
mod validate_authn;

pub use applies::{applies_to, namespace_of_spiffe_id};
pub use authn::{
    AuthnOutcome, JwtProvider, Rejection, TokenLocation, Verified, authenticate, remote_jwks_key,
};
pub use authz::{Decision, Reason, RuleRef, Verdict};
pub use citadel_jwt;
pub use diag::{Diagnostic, Issue, LoadError, Severity};
pub use load::{Loaded, Loader, Origin, load_str};
pub use model::{AuthorizationPolicy, PeerAuthentication, PolicyObject, RequestAuthentication};
pub use mtls::{Mode, MtlsResolution, MtlsScope, PolicyRef};
pub use request::{
    Destination, Http, InputError, Jwt, OwnedHttp, OwnedJwt, OwnedRequest, Peer, Request,
    RequestParts, Workload, join_repeated_headers, parse_key_value, parse_labels,
    principal_from_spiffe_id, principal_parts,
};
pub use set::PolicySet;
pub use timestamp::Timestamp;
pub use validate::{MeshConfig, validate};
pub use validate_authn::parse_timeout;
