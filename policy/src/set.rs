//! [`PolicySet`]: all policies compiled once and indexed by namespace and selector.

use std::collections::{BTreeMap, HashMap};

use crate::authn::JwtProvider;
use crate::authz::{CompiledPolicy, Decision, PolicyGroup, Tally};
use crate::compile::CompiledRule;
use crate::diag::LoadError;
use crate::index::{ScopeIndex, Selector, selector_matches, selector_of};
use crate::load::Loader;
use crate::model::{DRY_RUN_ANNOTATION, PolicyObject, selector_is_empty};
use crate::mtls::{CompiledPeer, Mode, MtlsResolution, compose};
use crate::request::{Request, Workload};
use crate::timestamp::Timestamp;
use crate::validate::MeshConfig;

/// PeerAuthentication policies of one (non-root) namespace.
#[derive(Debug, Clone, Default)]
struct PeerScope {
    /// The oldest policy without a selector.
    namespace_wide: Option<u32>,
    /// Policies with a selector.
    workloads: ScopeIndex,
}

/// Every policy, compiled and indexed. Build it with [`Loader`] or
/// [`PolicySet::from_objects`]; it is immutable and cheap to query.
#[derive(Debug, Clone)]
pub struct PolicySet {
    mesh: MeshConfig,
    /// AuthorizationPolicies sorted by (namespace, name): the ordinal is the index.
    authz: Vec<CompiledPolicy>,
    /// AuthorizationPolicies grouped by (namespace, selector); the scope indexes
    /// below hold group numbers.
    authz_groups: Vec<PolicyGroup>,
    authz_root: ScopeIndex,
    authz_by_ns: HashMap<Box<str>, ScopeIndex>,
    /// PeerAuthentications sorted oldest first (creationTimestamp, then namespace,
    /// then name; a missing timestamp counts as oldest).
    peers: Vec<CompiledPeer>,
    peer_mesh: Option<u32>,
    peer_by_ns: HashMap<Box<str>, PeerScope>,
    /// RequestAuthentications sorted by (namespace, name), each with its selector
    /// and compiled rules; the scope indexes hold their positions.
    authn: Vec<(Selector, Vec<JwtProvider>)>,
    authn_root: ScopeIndex,
    authn_by_ns: HashMap<Box<str>, ScopeIndex>,
    ignored: usize,
}

impl PolicySet {
    /// An empty set: every port PERMISSIVE, everything allowed.
    pub fn empty(mesh: MeshConfig) -> Self {
        Self {
            mesh,
            authz: Vec::new(),
            authz_groups: Vec::new(),
            authz_root: ScopeIndex::default(),
            authz_by_ns: HashMap::new(),
            peers: Vec::new(),
            peer_mesh: None,
            peer_by_ns: HashMap::new(),
            authn: Vec::new(),
            authn_root: ScopeIndex::default(),
            authn_by_ns: HashMap::new(),
            ignored: 0,
        }
    }

    /// Validates and compiles typed objects (source name `<objects>`).
    pub fn from_objects(objects: Vec<PolicyObject>, mesh: &MeshConfig) -> Result<Self, LoadError> {
        let mut loader = Loader::new(mesh.clone());
        for o in objects {
            loader.add_object("<objects>", o);
        }
        loader.finish().map(|(set, _)| set)
    }

    /// Compiles validated objects. Objects that cannot compile (impossible after
    /// validation) are reported as errors.
    pub(crate) fn compile(
        objects: &[PolicyObject],
        mesh: &MeshConfig,
        remote_jwks: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let mut set = Self::empty(mesh.clone());
        let root = mesh.root_namespace.as_str();

        let mut aps: Vec<_> = objects
            .iter()
            .filter_map(|o| match o {
                PolicyObject::AuthorizationPolicy(ap) => Some(ap),
                _ => None,
            })
            .collect();
        aps.sort_by(|a, b| {
            (a.metadata.namespace(), a.metadata.name())
                .cmp(&(b.metadata.namespace(), b.metadata.name()))
        });
        let mut group_of: HashMap<(Box<str>, crate::index::Selector), u32> = HashMap::new();
        for ap in aps {
            if ap.spec.target_ref.is_some()
                || ap.spec.target_refs.as_ref().is_some_and(|t| !t.is_empty())
            {
                set.ignored += 1;
                continue;
            }
            let rules = ap
                .spec
                .rules()
                .iter()
                .map(CompiledRule::compile)
                .collect::<Result<Box<[_]>, _>>()
                .map_err(|e| {
                    format!(
                        "AuthorizationPolicy {}/{}: {e}",
                        ap.metadata.namespace(),
                        ap.metadata.name()
                    )
                })?;
            let ordinal =
                u32::try_from(set.authz.len()).map_err(|_| "too many policies".to_owned())?;
            let selector = selector_of(ap.spec.selector.as_ref());
            let ns = ap.metadata.namespace();
            let policy = CompiledPolicy {
                namespace: ns.into(),
                name: ap.metadata.name().into(),
                action: ap.spec.action(),
                dry_run: ap.metadata.annotation(DRY_RUN_ANNOTATION) == Some("true"),
                rules,
            };
            let group = match group_of.get(&(ns.into(), selector.clone())) {
                Some(&g) => g,
                None => {
                    let g = u32::try_from(set.authz_groups.len())
                        .map_err(|_| "too many policies".to_owned())?;
                    if ns == root {
                        set.authz_root.insert(g, &selector);
                    } else {
                        set.authz_by_ns
                            .entry(ns.into())
                            .or_default()
                            .insert(g, &selector);
                    }
                    group_of.insert((ns.into(), selector.clone()), g);
                    set.authz_groups.push(PolicyGroup::new(selector));
                    g
                }
            };
            set.authz_groups[group as usize].push(ordinal, &policy);
            set.authz.push(policy);
        }

        let mut pas: Vec<_> = objects
            .iter()
            .filter_map(|o| match o {
                PolicyObject::PeerAuthentication(pa) => Some(pa),
                _ => None,
            })
            .collect();
        let age = |m: &crate::model::ObjectMeta| {
            m.creation_timestamp.as_deref().and_then(Timestamp::parse)
        };
        pas.sort_by(|a, b| {
            (age(&a.metadata), a.metadata.namespace(), a.metadata.name()).cmp(&(
                age(&b.metadata),
                b.metadata.namespace(),
                b.metadata.name(),
            ))
        });
        for pa in pas {
            let ns = pa.metadata.namespace();
            let has_selector = !selector_is_empty(pa.spec.selector.as_ref());
            if has_selector && ns == root {
                set.ignored += 1;
                continue;
            }
            let ordinal =
                u32::try_from(set.peers.len()).map_err(|_| "too many policies".to_owned())?;
            let selector = selector_of(pa.spec.selector.as_ref());
            let ports = pa
                .spec
                .port_level_mtls
                .iter()
                .flatten()
                .filter_map(|(k, v)| u16::try_from(k.0).ok().map(|p| (p, v.mode())))
                .collect();
            if ns == root {
                set.peer_mesh.get_or_insert(ordinal);
            } else {
                let scope = set.peer_by_ns.entry(ns.into()).or_default();
                if has_selector {
                    scope.workloads.insert(ordinal, &selector);
                } else {
                    scope.namespace_wide.get_or_insert(ordinal);
                }
            }
            set.peers.push(CompiledPeer {
                namespace: ns.into(),
                name: pa.metadata.name().into(),
                selector,
                mode: pa.spec.mtls.as_ref().map(|m| m.mode()).unwrap_or_default(),
                ports,
            });
        }
        set.compile_request_authentications(objects, remote_jwks)?;
        Ok(set)
    }

    fn compile_request_authentications(
        &mut self,
        objects: &[PolicyObject],
        remote_jwks: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let root = self.mesh.root_namespace.clone();
        let mut ras: Vec<_> = objects
            .iter()
            .filter_map(|o| match o {
                PolicyObject::RequestAuthentication(ra) => Some(ra),
                _ => None,
            })
            .collect();
        ras.sort_by(|a, b| {
            (a.metadata.namespace(), a.metadata.name())
                .cmp(&(b.metadata.namespace(), b.metadata.name()))
        });
        for ra in ras {
            if ra.spec.target_ref.is_some()
                || ra.spec.target_refs.as_ref().is_some_and(|t| !t.is_empty())
            {
                self.ignored += 1;
                continue;
            }
            let ordinal =
                u32::try_from(self.authn.len()).map_err(|_| "too many policies".to_owned())?;
            let selector = selector_of(ra.spec.selector.as_ref());
            let ns = ra.metadata.namespace();
            if ns == root {
                self.authn_root.insert(ordinal, &selector);
            } else {
                self.authn_by_ns
                    .entry(ns.into())
                    .or_default()
                    .insert(ordinal, &selector);
            }
            let rules = ra
                .spec
                .jwt_rules
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| JwtProvider::compile(ra, i, r, remote_jwks))
                .collect();
            self.authn.push((selector, rules));
        }
        Ok(())
    }

    /// The JWT rules of every RequestAuthentication that applies to the workload
    /// (its namespace's, by selector, and the root namespace's), in (namespace, name)
    /// order. Empty: request authentication is off for the workload.
    pub fn jwt_providers(&self, workload: &Workload<'_>) -> Vec<&JwtProvider> {
        let mut ordinals = Vec::new();
        let mut visit = |o: u32| {
            if let Some((selector, _)) = self.authn.get(o as usize)
                && selector_matches(selector, workload.labels)
            {
                ordinals.push(o);
            }
        };
        self.authn_root
            .for_each_candidate(workload.labels, &mut visit);
        if workload.namespace != self.mesh.root_namespace
            && let Some(scope) = self.authn_by_ns.get(workload.namespace)
        {
            scope.for_each_candidate(workload.labels, &mut visit);
        }
        ordinals.sort_unstable();
        ordinals
            .into_iter()
            .filter_map(|o| self.authn.get(o as usize))
            .flat_map(|(_, rules)| rules.iter())
            .collect()
    }

    /// Number of RequestAuthentications that can apply to workloads.
    pub fn request_authentication_count(&self) -> usize {
        self.authn.len()
    }

    /// The mesh settings.
    pub fn mesh(&self) -> &MeshConfig {
        &self.mesh
    }

    /// Number of AuthorizationPolicies that apply to workloads.
    pub fn authorization_policy_count(&self) -> usize {
        self.authz.len()
    }

    /// Number of PeerAuthentications that can apply to workloads.
    pub fn peer_authentication_count(&self) -> usize {
        self.peers.len()
    }

    /// Policies accepted but applying to no workload (targetRefs; selector
    /// PeerAuthentications in the root namespace).
    pub fn ignored_count(&self) -> usize {
        self.ignored
    }

    /// The effective mTLS mode of a workload port.
    pub fn effective_mtls(&self, workload: &Workload<'_>, port: u16) -> Mode {
        self.resolve_mtls(workload, port).mode
    }

    /// The effective mTLS mode of a workload port and the policy that set it.
    pub fn resolve_mtls(&self, workload: &Workload<'_>, port: u16) -> MtlsResolution<'_> {
        let mesh = self.peer_mesh.map(|o| &self.peers[o as usize]);
        let mut namespace = None;
        let mut best: Option<u32> = None;
        if workload.namespace != self.mesh.root_namespace
            && let Some(scope) = self.peer_by_ns.get(workload.namespace)
        {
            namespace = scope.namespace_wide.map(|o| &self.peers[o as usize]);
            scope.workloads.for_each_candidate(workload.labels, |o| {
                if best.is_none_or(|b| o < b)
                    && selector_matches(&self.peers[o as usize].selector, workload.labels)
                {
                    best = Some(o);
                }
            });
        }
        compose(mesh, namespace, best.map(|o| &self.peers[o as usize]), port)
    }

    /// Calls `f` with every group of AuthorizationPolicies that apply to the workload.
    fn for_each_group(&self, workload: &Workload<'_>, mut f: impl FnMut(&PolicyGroup)) {
        let mut visit = |g: u32| {
            let g = &self.authz_groups[g as usize];
            if selector_matches(&g.selector, workload.labels) {
                f(g);
            }
        };
        self.authz_root
            .for_each_candidate(workload.labels, &mut visit);
        if workload.namespace != self.mesh.root_namespace
            && let Some(scope) = self.authz_by_ns.get(workload.namespace)
        {
            scope.for_each_candidate(workload.labels, &mut visit);
        }
    }

    /// The authorization decision for a request.
    pub fn decide(&self, req: &Request<'_>) -> Decision<'_> {
        let avail = req.available();
        let wl = &req.destination.workload;
        let mut enforced = Tally::default();
        let mut any_dry_run = false;
        self.for_each_group(wl, |g| {
            any_dry_run |= g.dry_run;
            enforced.add_group(g, &self.authz, false, req, avail);
        });
        let dry_run = any_dry_run.then(|| {
            let mut all = Tally::default();
            self.for_each_group(wl, |g| all.add_group(g, &self.authz, true, req, avail));
            all.reason(&self.authz)
        });
        let reason = enforced.reason(&self.authz);
        Decision {
            verdict: reason.verdict(),
            reason,
            audited_by: enforced.audit(&self.authz),
            dry_run,
            skipped_allow_rules: enforced.skipped(),
        }
    }
}
