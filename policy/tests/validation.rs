//! Validation rules, one named test each: the error names the object, the field
//! path and the reason.

use citadel_policy::{Diagnostic, Loader, MeshConfig, Severity, load_str};

fn diagnostics(text: &str) -> Vec<Diagnostic> {
    let mut l = Loader::new(MeshConfig::default());
    l.add_source("test.yaml", text);
    match l.finish() {
        Ok((_, warnings)) => warnings,
        Err(e) => e.diagnostics,
    }
}

fn errors(text: &str) -> Vec<String> {
    diagnostics(text)
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(ToString::to_string)
        .collect()
}

fn assert_error(text: &str, expected: &str) {
    let errs = errors(text);
    assert!(
        errs.iter().any(|e| e.contains(expected)),
        "no error contains {expected:?}: {errs:#?}"
    );
}

fn ap(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: ns}}\nspec:\n{spec}"
    )
}

fn pa(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: ns}}\nspec:\n{spec}"
    )
}

#[test]
fn rejects_unknown_field_naming_its_path() {
    let e = errors(&ap(
        "  rules:\n  - from:\n    - source:\n        principalz: [x]\n",
    ));
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(
        e[0].starts_with("error: test.yaml (document 1): AuthorizationPolicy ns/p: spec.rules[0].from[0].source.principalz: unknown field"),
        "{}",
        e[0]
    );
}

#[test]
fn rejects_unknown_metadata_field_but_accepts_kubernetes_ones() {
    assert_error(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namspace: ns}\nspec: {}\n",
        "metadata.namspace: unknown field",
    );
    let ok = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: ns\n  uid: 7\n  resourceVersion: \"9\"\n  generation: 2\n  labels: {a: b}\n  managedFields: [{manager: kubectl}]\n  ownerReferences: []\n  finalizers: []\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\nspec: {}\nstatus: {validationMessages: []}\n";
    assert!(errors(ok).is_empty(), "{:#?}", errors(ok));
}

#[test]
fn rejects_wrong_type_naming_its_path() {
    assert_error(&ap("  rules: {}\n"), "spec.rules: wrong type");
    assert_error(&pa("  mtls: {mode: 3}\n"), "spec.mtls.mode");
    assert_error(
        &ap("  selector: {matchLabels: {version: 1}}\n"),
        "spec.selector.matchLabels.version: wrong type",
    );
}

#[test]
fn rejects_port_level_mtls_without_selector() {
    assert_error(
        &pa("  portLevelMtls: {8080: {mode: DISABLE}}\n"),
        "spec.portLevelMtls: portLevelMtls requires a workload selector",
    );
    assert_error(
        &pa("  selector: {}\n  portLevelMtls: {8080: {mode: DISABLE}}\n"),
        "portLevelMtls requires a workload selector",
    );
}

#[test]
fn rejects_port_level_mtls_port_out_of_range() {
    assert_error(
        &pa("  selector: {matchLabels: {a: b}}\n  portLevelMtls: {0: {mode: DISABLE}}\n"),
        "spec.portLevelMtls.0: port out of range",
    );
    assert_error(
        &pa("  selector: {matchLabels: {a: b}}\n  portLevelMtls: {65536: {mode: DISABLE}}\n"),
        "spec.portLevelMtls.65536: port out of range",
    );
}

#[test]
fn rejects_operation_and_condition_ports_out_of_range() {
    assert_error(
        &ap("  rules: [{to: [{operation: {ports: [\"65536\"]}}]}]\n"),
        "spec.rules[0].to[0].operation.ports[0]: port \"65536\" out of range",
    );
    assert_error(
        &ap("  rules: [{to: [{operation: {notPorts: [\"http\"]}}]}]\n"),
        "operation.notPorts[0]: port \"http\" is not a number",
    );
    assert_error(
        &ap("  rules: [{when: [{key: destination.port, notValues: [\"0\"]}]}]\n"),
        "spec.rules[0].when[0].notValues[0]: port \"0\" out of range",
    );
}

#[test]
fn rejects_service_accounts_mixed_with_principals() {
    assert_error(
        &ap("  rules: [{from: [{source: {serviceAccounts: [a/b], principals: [x]}}]}]\n"),
        "spec.rules[0].from[0].source.serviceAccounts: cannot be set together with principals or namespaces",
    );
}

#[test]
fn rejects_service_accounts_mixed_with_namespaces() {
    assert_error(
        &ap("  rules: [{from: [{source: {notServiceAccounts: [a/b], namespaces: [a]}}]}]\n"),
        "source.serviceAccounts: cannot be set together with principals or namespaces",
    );
}

#[test]
fn rejects_condition_with_neither_values_nor_not_values() {
    assert_error(
        &ap("  rules: [{when: [{key: source.ip}]}]\n"),
        "spec.rules[0].when[0]: at least one of values or notValues must be set",
    );
    assert_error(
        &ap("  rules: [{when: [{key: source.ip, values: [], notValues: []}]}]\n"),
        "at least one of values or notValues must be set",
    );
}

#[test]
fn rejects_unknown_condition_key() {
    assert_error(
        &ap("  rules: [{when: [{key: \"request.header[x]\", values: [a]}]}]\n"),
        "spec.rules[0].when[0].key: unknown key \"request.header[x]\"",
    );
    assert_error(
        &ap("  rules: [{when: [{key: \"request.auth.claims[a][]\", values: [a]}]}]\n"),
        "a name in brackets is empty",
    );
    assert_error(
        &ap("  rules: [{when: [{values: [a]}]}]\n"),
        "spec.rules[0].when[0].key: missing",
    );
}

#[test]
fn rejects_custom_without_provider() {
    assert_error(
        &ap("  action: CUSTOM\n  rules: [{}]\n"),
        "spec.provider: CUSTOM action requires provider.name",
    );
}

#[test]
fn rejects_custom_with_provider_as_unsupported_not_silently_allowed() {
    assert_error(
        &ap("  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]\n"),
        "spec.provider.name: unsupported provider \"opa\"",
    );
    assert!(
        load_str(
            "x",
            &ap("  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]\n"),
            &MeshConfig::default()
        )
        .is_err()
    );
}

#[test]
fn rejects_provider_with_non_custom_action() {
    assert_error(
        &ap("  action: DENY\n  provider: {name: opa}\n  rules: [{}]\n"),
        "spec.provider: must not be set with action DENY",
    );
}

#[test]
fn rejects_selector_together_with_target_refs() {
    assert_error(
        &ap("  selector: {matchLabels: {a: b}}\n  targetRefs: [{kind: Service, name: s}]\n"),
        "spec.targetRefs: cannot be set together with selector",
    );
    assert_error(
        &ap("  selector: {matchLabels: {a: b}}\n  targetRef: {kind: Gateway, name: g}\n"),
        "spec.targetRef: cannot be set together with selector",
    );
    assert_error(
        &ap("  targetRefs: [{kind: Pod, name: s}]\n"),
        "spec.targetRefs[0].kind: \"Pod\" is not one of",
    );
}

#[test]
fn rejects_wildcards_in_selectors() {
    assert_error(
        &ap("  selector: {matchLabels: {app: \"web*\"}}\n"),
        "spec.selector.matchLabels.app: wildcards are not supported",
    );
}

#[test]
fn rejects_empty_from_and_to_lists_and_empty_operations() {
    assert_error(
        &ap("  rules: [{from: []}]\n"),
        "spec.rules[0].from: must not be empty when set",
    );
    assert_error(
        &ap("  rules: [{to: [{}]}]\n"),
        "spec.rules[0].to[0].operation: missing",
    );
    assert_error(
        &ap("  rules: [{to: [{operation: {paths: []}}]}]\n"),
        "spec.rules[0].to[0].operation: must not be empty",
    );
}

#[test]
fn rejects_invalid_ip_blocks_everywhere() {
    assert_error(
        &ap("  rules: [{from: [{source: {notRemoteIpBlocks: [\"1.2.3\"]}}]}]\n"),
        "source.notRemoteIpBlocks[0]",
    );
    assert_error(
        &ap("  rules: [{when: [{key: destination.ip, values: [\"10.0.0.0/40\"]}]}]\n"),
        "when[0].values[0]",
    );
}

#[test]
fn rejects_malformed_path_templates() {
    assert_error(
        &ap("  rules: [{to: [{operation: {paths: [\"/a/{*}.txt\"]}}]}]\n"),
        "operation.paths[0]: path template",
    );
    assert_error(
        &ap("  rules: [{to: [{operation: {notPaths: [\"/{**}/{*}\"]}}]}]\n"),
        "{**} must be the last operator",
    );
}

#[test]
fn rejects_missing_name_and_bad_api_version() {
    assert_error(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {namespace: a}\nspec: {}\n",
        "metadata.name: missing",
    );
    assert_error(
        "apiVersion: networking.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {}\n",
        "apiVersion: \"networking.istio.io/v1\" is not supported",
    );
}

#[test]
fn reports_errors_of_every_document_together() {
    let text = format!(
        "{}\n---\n{}\n---\n{}",
        ap("  rules: [{when: [{key: nope, values: [a]}]}]"),
        pa("  portLevelMtls: {80: {mode: STRICT}}"),
        ap("  rules: [{from: [{source: {principals: [\"\"]}}]}]"),
    )
    .replace(
        "name: p, namespace: ns}\nspec:\n  portLevelMtls",
        "name: q, namespace: ns}\nspec:\n  portLevelMtls",
    );
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e.contains("(document 1)") && e.contains("unknown key")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("(document 2)") && e.contains("portLevelMtls")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("(document 3)") && e.contains("empty value not allowed")),
        "{errs:#?}"
    );
}

#[test]
fn rejects_yaml_syntax_errors_with_location() {
    assert_error("apiVersion: [\n", "not valid YAML/JSON");
}

#[test]
fn warns_but_accepts_target_refs_policies() {
    let d = diagnostics(&ap(
        "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: w}]\n  rules: [{}]\n",
    ));
    assert!(d.iter().all(|d| d.severity == Severity::Warning), "{d:#?}");
    assert!(
        d.iter()
            .any(|d| d.message.contains("not to Citadel's workload proxies"))
    );
}
