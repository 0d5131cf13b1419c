//! The resource kinds the fake Kubernetes API server serves, and how a
//! request path names them.

/// One kind of object the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    /// API group (`""` for core).
    pub group: &'static str,
    /// API version.
    pub version: &'static str,
    /// Lowercase plural used in paths (`pods`).
    pub plural: &'static str,
    /// `kind` of one object (`Pod`).
    pub kind: &'static str,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Custom resources keep `kind`/`apiVersion` on list items; built-in kinds do not.
    pub custom: bool,
    /// A `PUT` of an object that does not exist creates it (Lease); otherwise 404.
    pub create_on_update: bool,
    /// A `PUT` without `metadata.resourceVersion` is refused with 422 (Lease), instead of
    /// overwriting unconditionally (Pod, ConfigMap, Secret).
    pub update_requires_rv: bool,
    /// Only `POST` is served (TokenReview): nothing is stored.
    pub create_only: bool,
}

impl Resource {
    /// `apiVersion` of its objects (`v1`, `coordination.k8s.io/v1`).
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Resource name as errors spell it (`pods`, `leases.coordination.k8s.io`).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const fn builtin(
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> Resource {
    Resource {
        group,
        version: "v1",
        plural,
        kind,
        namespaced,
        custom: false,
        create_on_update: false,
        update_requires_rv: false,
        create_only: false,
    }
}

const fn istio(plural: &'static str, kind: &'static str) -> Resource {
    Resource {
        group: "security.istio.io",
        version: "v1",
        plural,
        kind,
        namespaced: true,
        custom: true,
        create_on_update: false,
        update_requires_rv: false,
        create_only: false,
    }
}

/// core/v1 Pod.
pub const PODS: Resource = builtin("", "pods", "Pod", true);
/// core/v1 Namespace.
pub const NAMESPACES: Resource = builtin("", "namespaces", "Namespace", false);
/// core/v1 ConfigMap.
pub const CONFIGMAPS: Resource = builtin("", "configmaps", "ConfigMap", true);
/// core/v1 Secret.
pub const SECRETS: Resource = builtin("", "secrets", "Secret", true);
/// coordination.k8s.io/v1 Lease.
pub const LEASES: Resource = Resource {
    create_on_update: true,
    update_requires_rv: true,
    ..builtin("coordination.k8s.io", "leases", "Lease", true)
};
/// authentication.k8s.io/v1 TokenReview (create only).
pub const TOKEN_REVIEWS: Resource = Resource {
    create_only: true,
    ..builtin(
        "authentication.k8s.io",
        "tokenreviews",
        "TokenReview",
        false,
    )
};
/// security.istio.io/v1 AuthorizationPolicy.
pub const AUTHORIZATION_POLICIES: Resource = istio("authorizationpolicies", "AuthorizationPolicy");
/// security.istio.io/v1 PeerAuthentication.
pub const PEER_AUTHENTICATIONS: Resource = istio("peerauthentications", "PeerAuthentication");
/// security.istio.io/v1 RequestAuthentication.
pub const REQUEST_AUTHENTICATIONS: Resource =
    istio("requestauthentications", "RequestAuthentication");

/// Every resource the fake serves.
pub const ALL: [Resource; 9] = [
    PODS,
    NAMESPACES,
    CONFIGMAPS,
    SECRETS,
    LEASES,
    TOKEN_REVIEWS,
    AUTHORIZATION_POLICIES,
    PEER_AUTHENTICATIONS,
    REQUEST_AUTHENTICATIONS,
];

/// What a request path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The resource.
    pub resource: Resource,
    /// The namespace from the path (`None`: all namespaces, or a cluster-scoped kind).
    pub namespace: Option<String>,
    /// The object name, for item paths.
    pub name: Option<String>,
}

/// Parses `/api/v1/…` and `/apis/<group>/<version>/…` (pure); `None` when the path names
/// nothing the fake serves.
pub fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let find = |plural: &str| {
        ALL.into_iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    };
    let (resource, namespace, name) = match rest {
        [plural] => (find(plural)?, None, None),
        ["namespaces", ns, plural] => (find(plural)?, Some(*ns), None),
        ["namespaces", ns, plural, name] => (find(plural)?, Some(*ns), Some(*name)),
        [plural, name] => (find(plural)?, None, Some(*name)),
        _ => return None,
    };
    // A namespaced item needs its namespace; a cluster-scoped kind has none.
    if resource.namespaced != namespace.is_some() && (name.is_some() || !resource.namespaced) {
        return None;
    }
    Some(Target {
        resource,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_resources_namespaces_and_items() {
        let t = parse_path("/api/v1/pods").unwrap();
        assert_eq!((t.resource, t.namespace, t.name), (PODS, None, None));
        let t = parse_path("/api/v1/namespaces/ns1/pods/p").unwrap();
        assert_eq!(
            (t.resource, t.namespace.as_deref(), t.name.as_deref()),
            (PODS, Some("ns1"), Some("p"))
        );
        let t = parse_path("/api/v1/namespaces/ns1").unwrap();
        assert_eq!((t.resource, t.name.as_deref()), (NAMESPACES, Some("ns1")));
        let t = parse_path("/apis/coordination.k8s.io/v1/namespaces/x/leases/l").unwrap();
        assert_eq!(t.resource, LEASES);
        let t = parse_path("/apis/security.istio.io/v1/authorizationpolicies").unwrap();
        assert_eq!(t.resource, AUTHORIZATION_POLICIES);
        assert!(
            parse_path("/api/v1/pods/p").is_none(),
            "a pod needs a namespace"
        );
        assert!(parse_path("/api/v1/widgets").is_none());
    }
}
