//! Istio's documentation examples validate unchanged; the documented CUSTOM
//! example is rejected as an unsupported provider.

use std::path::{Path, PathBuf};

use citadel_policy::{Loader, MeshConfig};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/istio_examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn validate_accepts_every_istio_documentation_example() {
    let files = yaml_files(&dir());
    assert!(
        files.len() >= 20,
        "expected the example set, found {}",
        files.len()
    );
    let mut kinds = std::collections::BTreeSet::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let mut loader = Loader::new(MeshConfig::default());
        loader.add_source(&f.display().to_string(), &text);
        for l in loader.objects() {
            kinds.insert(l.object.kind());
        }
        let n = loader.objects().len();
        match loader.finish() {
            Ok(_) => assert!(n >= 1, "{}: no object loaded", f.display()),
            Err(e) => panic!("{} rejected:\n{:#?}", f.display(), e.diagnostics),
        }
    }
    assert!(kinds.contains("PeerAuthentication") && kinds.contains("AuthorizationPolicy"));
    assert!(kinds.contains("RequestAuthentication"));
}

#[test]
fn rejects_request_authentication_with_both_jwks_and_jwks_uri() {
    let f = dir().join("unsupported/ra-jwks-and-jwks-uri.yaml");
    let text = std::fs::read_to_string(&f).unwrap();
    let mut loader = Loader::new(MeshConfig::default());
    loader.add_source("ra-jwks-and-jwks-uri.yaml", &text);
    let err = loader
        .finish()
        .expect_err("jwks with jwksUri must not load");
    let msgs: Vec<String> = err.diagnostics.iter().map(ToString::to_string).collect();
    assert!(
        msgs.iter().any(|m| m.contains(
            "RequestAuthentication foo/both: spec.jwtRules[0].jwks: cannot be set together with jwksUri"
        )),
        "{msgs:#?}"
    );
}

#[test]
fn rejects_documented_custom_example_as_unsupported_provider() {
    let f = dir().join("unsupported/custom-ext-authz.yaml");
    let text = std::fs::read_to_string(&f).unwrap();
    let mut loader = Loader::new(MeshConfig::default());
    loader.add_source("custom-ext-authz.yaml", &text);
    let err = loader.finish().expect_err("CUSTOM must not load");
    let msgs: Vec<String> = err.diagnostics.iter().map(ToString::to_string).collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains("spec.provider.name: unsupported provider \"my-custom-authz\"")),
        "{msgs:#?}"
    );
}
