//! Which policies can apply to one workload: what a node agent hands each workload.
//!
//! The same scoping [`crate::PolicySet`] uses to decide, so a proxy given only these objects
//! reaches the decisions the whole set would reach for its workload:
//!
//! - a policy in the workload's own namespace applies when it has no selector or its
//!   selector matches the workload's labels;
//! - in the root namespace, an AuthorizationPolicy applies mesh-wide when it has no
//!   selector or its selector matches; a PeerAuthentication only without a selector
//!   (selector PeerAuthentications in the root namespace are ignored, design §7);
//! - AuthorizationPolicies with `targetRef`/`targetRefs` apply to no workload;
//! - nothing from any other namespace applies.

use crate::index::{selector_matches, selector_of};
use crate::model::{PolicyObject, selector_is_empty};
use crate::request::{Workload, principal_parts};
use crate::validate::MeshConfig;

/// True when `object` can apply to `workload` (pure).
pub fn applies_to(object: &PolicyObject, workload: &Workload<'_>, mesh: &MeshConfig) -> bool {
    let namespace = object.metadata().namespace();
    let root = namespace == mesh.root_namespace;
    if !root && namespace != workload.namespace {
        return false;
    }
    let selector = match object {
        PolicyObject::AuthorizationPolicy(ap) => {
            if ap.spec.target_ref.is_some()
                || ap.spec.target_refs.as_ref().is_some_and(|t| !t.is_empty())
            {
                return false;
            }
            ap.spec.selector.as_ref()
        }
        PolicyObject::RequestAuthentication(ra) => {
            if ra.spec.target_ref.is_some()
                || ra.spec.target_refs.as_ref().is_some_and(|t| !t.is_empty())
            {
                return false;
            }
            ra.spec.selector.as_ref()
        }
        PolicyObject::PeerAuthentication(pa) => {
            if root && !selector_is_empty(pa.spec.selector.as_ref()) {
                return false;
            }
            pa.spec.selector.as_ref()
        }
    };
    selector_matches(&selector_of(selector), workload.labels)
}

/// The namespace of a workload SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>`; `None` for an ID
/// of any other form (such a workload gets only mesh-wide policies).
pub fn namespace_of_spiffe_id(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    principal_parts(rest).map(|(ns, _)| ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Loader;

    const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shop-wide, namespace: shop}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart-only, namespace: shop}
spec: {selector: {matchLabels: {app: cart}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart-v2, namespace: shop}
spec: {selector: {matchLabels: {app: cart, version: v2}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bank-wide, namespace: bank}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-carts, namespace: istio-system}
spec: {selector: {matchLabels: {app: cart}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gateway-ref, namespace: shop}
spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}], rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh-strict, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: root-selector, namespace: istio-system}
spec: {selector: {matchLabels: {app: cart}}, mtls: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: shop-permissive, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: cart-ports, namespace: shop}
spec: {selector: {matchLabels: {app: cart}}, portLevelMtls: {8080: {mode: DISABLE}}}
"#;

    fn names(namespace: &str, labels: &[(&str, &str)]) -> Vec<String> {
        let mesh = MeshConfig::default();
        let mut loader = Loader::new(mesh.clone());
        loader.add_source("policies.yaml", POLICIES);
        assert!(!loader.has_errors(), "{:?}", loader.diagnostics());
        let workload = Workload { namespace, labels };
        loader
            .objects()
            .iter()
            .filter(|l| applies_to(&l.object, &workload, &mesh))
            .map(|l| l.object.metadata().name().to_owned())
            .collect()
    }

    #[test]
    fn namespace_policies_without_selector_apply_to_every_workload_of_the_namespace() {
        assert_eq!(
            names("shop", &[("app", "web")]),
            ["shop-wide", "mesh-wide", "mesh-strict", "shop-permissive"]
        );
    }

    #[test]
    fn selector_policies_apply_only_when_every_selector_label_matches() {
        assert_eq!(
            names("shop", &[("app", "cart"), ("version", "v1")]),
            [
                "shop-wide",
                "cart-only",
                "mesh-wide",
                "mesh-carts",
                "mesh-strict",
                "shop-permissive",
                "cart-ports"
            ]
        );
        assert!(names("shop", &[("app", "cart"), ("version", "v2")]).contains(&"cart-v2".into()));
        assert!(!names("shop", &[("version", "v2")]).contains(&"cart-v2".into()));
    }

    #[test]
    fn policies_of_another_namespace_never_apply() {
        let got = names("bank", &[("app", "cart")]);
        assert_eq!(got, ["bank-wide", "mesh-wide", "mesh-carts", "mesh-strict"]);
    }

    #[test]
    fn root_namespace_peer_authentication_with_a_selector_applies_to_no_one() {
        assert!(!names("shop", &[("app", "cart")]).contains(&"root-selector".into()));
        assert!(!names("istio-system", &[("app", "cart")]).contains(&"root-selector".into()));
    }

    #[test]
    fn authorization_policies_with_target_refs_apply_to_no_workload() {
        assert!(!names("shop", &[]).contains(&"gateway-ref".into()));
    }

    #[test]
    fn workload_without_a_namespace_gets_root_namespace_policies_only() {
        assert_eq!(names("", &[]), ["mesh-wide", "mesh-strict"]);
    }

    #[test]
    fn root_namespace_follows_the_mesh_config() {
        let mesh = MeshConfig {
            root_namespace: "mesh-root".into(),
        };
        let mut loader = Loader::new(mesh.clone());
        loader.add_source("policies.yaml", POLICIES);
        let workload = Workload {
            namespace: "shop",
            labels: &[],
        };
        let got: Vec<_> = loader
            .objects()
            .iter()
            .filter(|l| applies_to(&l.object, &workload, &mesh))
            .map(|l| l.object.metadata().name())
            .collect();
        assert_eq!(got, ["shop-wide", "shop-permissive"]);
    }

    #[test]
    fn namespace_comes_from_workload_spiffe_ids_only() {
        assert_eq!(
            namespace_of_spiffe_id("spiffe://cluster.local/ns/shop/sa/cart"),
            Some("shop")
        );
        for id in [
            "spiffe://cluster.local/citadel/node/n1",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/cart/extra",
            "spiffe://cluster.local/ns//sa/cart",
            "cluster.local/ns/shop/sa/cart",
        ] {
            assert_eq!(namespace_of_spiffe_id(id), None, "{id}");
        }
    }

    #[test]
    fn loaded_objects_carry_their_json_with_the_effective_namespace() {
        let mut loader = Loader::new(MeshConfig::default());
        loader.add_source(
            "p.yaml",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {selector: {matchLabels: {app: x}}, portLevelMtls: {8080: {mode: STRICT}}}\n",
        );
        let json = loader.objects()[0].json.clone().unwrap();
        assert_eq!(json["metadata"]["namespace"], "default");
        // Read back by the same loader, the JSON gives the same object.
        let mut again = Loader::new(MeshConfig::default());
        again.add_source("p.json", &json.to_string());
        assert!(!again.has_errors(), "{:?}", again.diagnostics());
        let mut expected = loader.objects()[0].object.clone();
        if let PolicyObject::PeerAuthentication(pa) = &mut expected {
            pa.metadata.namespace = Some("default".into());
        }
        assert_eq!(again.objects()[0].object, expected);
    }
}
