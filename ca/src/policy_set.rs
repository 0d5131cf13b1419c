//! The policy set the CA distributes, and the decisions around reloading it (pure).
//!
//! A [`PolicySnapshot`] is every valid PeerAuthentication, AuthorizationPolicy and
//! RequestAuthentication (with the JWKS the CA fetched for it), sorted by
//! kind, namespace and name, each carried as canonical JSON, with a version that is the
//! lowercase hex SHA-256 of that canonical form: every replica reading the same objects
//! announces the same version, whatever the order or formatting of its files. Parsing and
//! validation are the policy crate's [`Loader`], the same code `citadel policy validate` runs.

use citadel_policy::{Diagnostic, Loader, MeshConfig};
use citadel_proto::citadel::v1::{PolicyObject, PolicySet};

/// One source text: a name for diagnostics (a file path) and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceText {
    /// File path or other name, as diagnostics show it.
    pub name: String,
    /// YAML or JSON, one or more documents.
    pub text: String,
}

/// The set in force: its objects in canonical order and its version.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySnapshot {
    /// Lowercase hex SHA-256 of the canonical set.
    pub version: String,
    /// The objects, sorted by kind, namespace, name.
    pub objects: Vec<PolicyObject>,
}

impl PolicySnapshot {
    /// The snapshot of `objects` in any order: sorted, then versioned.
    pub fn new(mut objects: Vec<PolicyObject>) -> Self {
        objects.sort_by(|a, b| {
            (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name))
        });
        let version = canonical_version(&objects);
        Self { version, objects }
    }

    /// The empty set (what a CA without `--policies` serves).
    pub fn empty() -> Self {
        Self::new(Vec::new())
    }

    /// The wire form sent to node agents.
    pub fn to_update(&self) -> PolicySet {
        PolicySet {
            version: self.version.clone(),
            objects: self.objects.clone(),
        }
    }
}

/// The version of objects already in canonical order: SHA-256 over every field of every
/// object, each length-prefixed so that no two different sets share an encoding.
pub fn canonical_version(objects: &[PolicyObject]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"citadel.v1.PolicySet\0");
    ctx.update(&(objects.len() as u64).to_be_bytes());
    for o in objects {
        for field in [&o.kind, &o.api_version, &o.namespace, &o.name, &o.json] {
            ctx.update(&(field.len() as u64).to_be_bytes());
            ctx.update(field.as_bytes());
        }
        // Fetched keys are part of the set: a rotation at an issuer is a new version.
        // Sets without any keep the encoding (and versions) they always had.
        if !o.resolved_jwks.is_empty() {
            ctx.update(b"\0resolved_jwks");
            ctx.update(&(o.resolved_jwks.len() as u64).to_be_bytes());
            for k in &o.resolved_jwks {
                for field in [&k.uri, &k.jwks] {
                    ctx.update(&(field.len() as u64).to_be_bytes());
                    ctx.update(field.as_bytes());
                }
            }
        }
    }
    hex::encode(ctx.finish().as_ref())
}

/// `value` as JSON with object keys sorted and no whitespace.
pub fn canonical_json(value: &serde_json::Value) -> String {
    fn write(value: &serde_json::Value, out: &mut String) {
        match value {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            serde_json::Value::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(v, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

/// What loading the sources gave.
#[derive(Debug, Clone)]
pub enum Loaded {
    /// Every object is valid: the new snapshot and the warnings (e.g. other kinds skipped).
    Valid {
        /// The set.
        snapshot: PolicySnapshot,
        /// Warnings to log.
        warnings: Vec<Diagnostic>,
    },
    /// At least one error: every diagnostic, each naming its file, object and field.
    Invalid(Vec<Diagnostic>),
}

/// Parses and validates `sources` with the policy crate, exactly as `citadel policy validate`
/// does (duplicates and compilation included), and builds the snapshot (pure).
pub fn load_sources(sources: &[SourceText], mesh: &MeshConfig) -> Loaded {
    let mut loader = Loader::new(mesh.clone());
    for s in sources {
        loader.add_source(&s.name, &s.text);
    }
    let objects: Vec<PolicyObject> = loader
        .objects()
        .iter()
        .map(|l| {
            let m = l.object.metadata();
            PolicyObject {
                kind: l.object.kind().to_owned(),
                api_version: l
                    .json
                    .as_ref()
                    .and_then(|j| j.get("apiVersion"))
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                namespace: m.namespace().to_owned(),
                name: m.name().to_owned(),
                json: l.json.as_ref().map(canonical_json).unwrap_or_default(),
                resolved_jwks: Vec::new(),
            }
        })
        .collect();
    match loader.finish() {
        Ok((_, warnings)) => Loaded::Valid {
            snapshot: PolicySnapshot::new(objects),
            warnings,
        },
        Err(e) => Loaded::Invalid(e.diagnostics),
    }
}

/// What a reload does to the set in force.
#[derive(Debug, Clone)]
pub enum ReloadDecision {
    /// The sources are valid and give the set already in force: nothing to publish.
    Unchanged,
    /// Publish this set.
    Publish(PolicySnapshot),
    /// The sources are invalid: the last good set stays in force; log these errors.
    KeepLastGood(Vec<Diagnostic>),
}

/// Judges a reload against the version in force (pure).
pub fn decide_reload(in_force: &str, loaded: Loaded) -> ReloadDecision {
    match loaded {
        Loaded::Invalid(diagnostics) => ReloadDecision::KeepLastGood(
            diagnostics
                .into_iter()
                .filter(Diagnostic::is_error)
                .collect(),
        ),
        Loaded::Valid { snapshot, .. } if snapshot.version == in_force => ReloadDecision::Unchanged,
        Loaded::Valid { snapshot, .. } => ReloadDecision::Publish(snapshot),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {rules: [{}]}\n";
    const B: &str = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: b, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n";
    const C: &str = "{\"apiVersion\": \"security.istio.io/v1\", \"kind\": \"AuthorizationPolicy\", \"metadata\": {\"namespace\": \"bank\", \"name\": \"c\"}, \"spec\": {\"action\": \"DENY\"}}";

    fn src(name: &str, text: &str) -> SourceText {
        SourceText {
            name: name.into(),
            text: text.into(),
        }
    }

    fn snapshot(sources: &[SourceText]) -> PolicySnapshot {
        match load_sources(sources, &MeshConfig::default()) {
            Loaded::Valid { snapshot, .. } => snapshot,
            Loaded::Invalid(d) => panic!("{d:?}"),
        }
    }

    #[test]
    fn same_set_in_any_order_or_layout_has_the_same_version() {
        let split = snapshot(&[src("a.yaml", A), src("b.yaml", B), src("c.json", C)]);
        let reversed = snapshot(&[src("c.json", C), src("b.yaml", B), src("a.yaml", A)]);
        let one_file = snapshot(&[src("all.yaml", &format!("{B}---\n{C}\n---\n{A}"))]);
        // Same objects, other key order and flow/block style.
        let restyled = snapshot(&[
            src(
                "a.yaml",
                "kind: AuthorizationPolicy\napiVersion: security.istio.io/v1\nspec:\n  rules:\n  - {}\nmetadata:\n  namespace: shop\n  name: a\n",
            ),
            src("b.yaml", B),
            src("c.json", C),
        ]);
        assert_eq!(split.version, reversed.version);
        assert_eq!(split.version, one_file.version);
        assert_eq!(split.version, restyled.version);
        assert_eq!(split, one_file);
        assert_eq!(split.version.len(), 64);
        assert!(
            split
                .version
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let names: Vec<_> = split.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["c", "a", "b"], "sorted by kind, namespace, name");
    }

    #[test]
    fn any_change_to_the_set_gives_a_new_version() {
        let base = snapshot(&[src("a.yaml", A), src("b.yaml", B)]).version;
        let variants = [
            vec![src("a.yaml", A)],
            vec![src("a.yaml", A), src("b.yaml", B), src("c.json", C)],
            vec![
                src("a.yaml", &A.replace("rules: [{}]", "rules: []")),
                src("b.yaml", B),
            ],
            vec![
                src("a.yaml", &A.replace("name: a", "name: a2")),
                src("b.yaml", B),
            ],
            vec![src("a.yaml", &A.replace("shop", "shop2")), src("b.yaml", B)],
            vec![src("a.yaml", A), src("b.yaml", &B.replace("v1beta1", "v1"))],
            vec![
                src("a.yaml", A),
                src("b.yaml", &B.replace("STRICT", "PERMISSIVE")),
            ],
        ];
        let mut seen = std::collections::HashSet::from([base.clone()]);
        for (i, v) in variants.iter().enumerate() {
            let version = snapshot(v).version;
            assert!(seen.insert(version), "variant {i} repeats a version");
        }
    }

    #[test]
    fn empty_set_has_the_hash_of_the_empty_canonical_form() {
        let empty = PolicySnapshot::empty();
        assert!(empty.objects.is_empty());
        assert_eq!(empty.version, snapshot(&[]).version);
        assert_eq!(empty.version, canonical_version(&[]));
    }

    #[test]
    fn bad_file_keeps_the_last_good_set_and_names_file_object_and_field() {
        let good = snapshot(&[src("a.yaml", A)]);
        let bad = A.replace("rules: [{}]", "rulez: [{}]");
        let loaded = load_sources(
            &[src("a.yaml", &bad), src("b.yaml", B)],
            &MeshConfig::default(),
        );
        match decide_reload(&good.version, loaded) {
            ReloadDecision::KeepLastGood(errors) => {
                assert!(!errors.is_empty());
                let text = errors[0].to_string();
                assert!(text.contains("a.yaml"), "{text}");
                assert!(text.contains("shop/a"), "{text}");
                assert!(text.contains("rulez"), "{text}");
            }
            other => panic!("expected KeepLastGood, got {other:?}"),
        }
    }

    #[test]
    fn unparsable_file_and_duplicate_objects_keep_the_last_good_set() {
        for sources in [
            vec![src("a.yaml", A), src("broken.yaml", "kind: [unclosed")],
            vec![src("a.yaml", A), src("a-again.yaml", A)],
        ] {
            let loaded = load_sources(&sources, &MeshConfig::default());
            assert!(matches!(
                decide_reload("v", loaded),
                ReloadDecision::KeepLastGood(e) if !e.is_empty()
            ));
        }
    }

    #[test]
    fn valid_reload_publishes_only_when_the_version_changes() {
        let good = snapshot(&[src("a.yaml", A)]);
        let same = load_sources(&[src("renamed.yaml", A)], &MeshConfig::default());
        assert!(matches!(
            decide_reload(&good.version, same),
            ReloadDecision::Unchanged
        ));
        let more = load_sources(
            &[src("a.yaml", A), src("b.yaml", B)],
            &MeshConfig::default(),
        );
        match decide_reload(&good.version, more) {
            ReloadDecision::Publish(s) => assert_eq!(s.objects.len(), 2),
            other => panic!("expected Publish, got {other:?}"),
        }
    }

    #[test]
    fn other_kinds_are_skipped_with_a_warning_not_an_error() {
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";
        match load_sources(
            &[src("a.yaml", A), src("cm.yaml", cm)],
            &MeshConfig::default(),
        ) {
            Loaded::Valid { snapshot, warnings } => {
                assert_eq!(snapshot.objects.len(), 1);
                assert_eq!(warnings.len(), 1);
            }
            Loaded::Invalid(d) => panic!("{d:?}"),
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"b": {"z": 1, "a": [ {"y": true, "x": null} ]}, "a": "s\"q"}"#,
        )
        .unwrap();
        assert_eq!(
            canonical_json(&v),
            r#"{"a":"s\"q","b":{"a":[{"x":null,"y":true}],"z":1}}"#
        );
    }
}
