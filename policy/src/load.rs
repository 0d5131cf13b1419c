//! Reading policy text: multi-document YAML or JSON, `kind: List` wrappers,
//! type errors with field paths, then validation. Pure: takes `(source_name, text)`.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_yaml_ng::Value;

use crate::diag::{Diagnostic, Issue, LoadError, Severity};
use crate::model::{
    ApiVersion, AuthorizationPolicy, AuthorizationPolicySpec, ObjectMeta, PeerAuthentication,
    PeerAuthenticationSpec, PolicyObject, RequestAuthentication, RequestAuthenticationSpec,
};
use crate::set::PolicySet;
use crate::validate::{MeshConfig, validate};

/// Where an object came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Source name (file path).
    pub source: String,
    /// 1-based YAML document index.
    pub document: usize,
}

/// An object that passed validation, with its origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The object.
    pub object: PolicyObject,
    /// Where it came from.
    pub origin: Origin,
    /// The object as read (apiVersion, kind, metadata, spec), as JSON, with
    /// `metadata.namespace` filled in when the source left it out; what a policy
    /// stream sends, so that its receiver parses it with this same loader. `None`
    /// for objects added with [`Loader::add_object`].
    pub json: Option<serde_json::Value>,
}

/// Collects objects from any number of sources, then builds a [`PolicySet`].
#[derive(Debug, Clone, Default)]
pub struct Loader {
    mesh: MeshConfig,
    objects: Vec<Loaded>,
    diagnostics: Vec<Diagnostic>,
    remote_jwks: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Envelope<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Option<ObjectMeta>,
    spec: Option<S>,
    #[allow(dead_code)]
    status: Option<IgnoredAny>,
}

const POLICY_KINDS: [&str; 3] = [
    "PeerAuthentication",
    "AuthorizationPolicy",
    "RequestAuthentication",
];

impl Loader {
    /// A loader for the given mesh settings.
    pub fn new(mesh: MeshConfig) -> Self {
        Self {
            mesh,
            ..Self::default()
        }
    }

    /// Parses and validates every document of one source.
    pub fn add_source(&mut self, source_name: &str, text: &str) {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let document = i + 1;
            match Value::deserialize(doc) {
                Ok(value) => self.add_value(source_name, document, "", value),
                Err(e) => {
                    self.push(
                        source_name,
                        document,
                        None,
                        Issue::error("", format!("not valid YAML/JSON: {e}")),
                    );
                    // A syntax error ends the stream: later documents cannot be read.
                    return;
                }
            }
        }
    }

    fn push(&mut self, source: &str, document: usize, object: Option<String>, issue: Issue) {
        self.diagnostics.push(Diagnostic {
            severity: issue.severity,
            source: source.to_owned(),
            document,
            object,
            path: issue.path,
            message: issue.message,
        });
    }

    fn add_value(&mut self, source: &str, document: usize, prefix: &str, value: Value) {
        let value = match value {
            Value::Null => return, // an empty document (e.g. a trailing `---`)
            Value::Tagged(t) => t.value,
            v => v,
        };
        let Value::Mapping(map) = &value else {
            self.push(
                source,
                document,
                None,
                Issue::error(prefix, "expected a Kubernetes object (a mapping)"),
            );
            return;
        };
        let kind = map
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let api_version = map
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let meta = map.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("?");
        let ns = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or(crate::model::DEFAULT_NAMESPACE);
        let label = format!("{kind} {ns}/{name}");

        if kind.ends_with("List") && map.contains_key("items") {
            let Some(Value::Sequence(items)) = map.get("items").cloned() else {
                self.push(
                    source,
                    document,
                    None,
                    Issue::error(join(prefix, "items"), "expected a list"),
                );
                return;
            };
            for (i, item) in items.into_iter().enumerate() {
                self.add_value(
                    source,
                    document,
                    &format!("{}[{i}]", join(prefix, "items")),
                    item,
                );
            }
            return;
        }
        if kind.is_empty() {
            self.push(
                source,
                document,
                None,
                Issue::error(join(prefix, "kind"), "missing"),
            );
            return;
        }
        if !POLICY_KINDS.contains(&kind.as_str()) {
            self.push(
                source,
                document,
                Some(label),
                Issue::warning(
                    join(prefix, "kind"),
                    format!("{kind:?} is not a policy kind; skipped"),
                ),
            );
            return;
        }
        let Some(version) = ApiVersion::parse(&api_version) else {
            self.push(
                source,
                document,
                Some(label),
                Issue::error(
                    join(prefix, "apiVersion"),
                    format!(
                        "{api_version:?} is not supported (use security.istio.io/v1 or v1beta1)"
                    ),
                ),
            );
            return;
        };
        let object = if kind == "PeerAuthentication" {
            typed::<PeerAuthenticationSpec>(value.clone()).map(|(metadata, spec)| {
                PolicyObject::PeerAuthentication(PeerAuthentication {
                    api_version: version,
                    metadata,
                    spec,
                })
            })
        } else if kind == "RequestAuthentication" {
            typed::<RequestAuthenticationSpec>(value.clone()).map(|(metadata, spec)| {
                PolicyObject::RequestAuthentication(RequestAuthentication {
                    api_version: version,
                    metadata,
                    spec,
                })
            })
        } else {
            typed::<AuthorizationPolicySpec>(value.clone()).map(|(metadata, spec)| {
                PolicyObject::AuthorizationPolicy(AuthorizationPolicy {
                    api_version: version,
                    metadata,
                    spec,
                })
            })
        };
        let json = match as_json(&value, ns) {
            Ok(json) => json,
            Err(message) => {
                self.push(source, document, Some(label), Issue::error(prefix, message));
                return;
            }
        };
        match object {
            Err(mut issue) => {
                issue.path = join(prefix, &issue.path);
                self.push(source, document, Some(label), issue);
            }
            Ok(object) => {
                let issues = validate(&object, &self.mesh);
                let ok = !issues.iter().any(|i| i.severity == Severity::Error);
                for mut issue in issues {
                    issue.path = join(prefix, &issue.path);
                    self.push(source, document, Some(label.clone()), issue);
                }
                if ok {
                    self.objects.push(Loaded {
                        object,
                        origin: Origin {
                            source: source.to_owned(),
                            document,
                        },
                        json: Some(json),
                    });
                }
            }
        }
    }

    /// Adds an already-typed object (validated like parsed ones).
    pub fn add_object(&mut self, source_name: &str, object: PolicyObject) {
        let label = format!(
            "{} {}/{}",
            object.kind(),
            object.metadata().namespace(),
            object.metadata().name()
        );
        let issues = validate(&object, &self.mesh);
        let ok = !issues.iter().any(|i| i.severity == Severity::Error);
        let document = self.objects.len() + 1;
        for issue in issues {
            self.push(source_name, document, Some(label.clone()), issue);
        }
        if ok {
            self.objects.push(Loaded {
                object,
                origin: Origin {
                    source: source_name.to_owned(),
                    document,
                },
                json: None,
            });
        }
    }

    /// The JWKS document fetched from `jwks_uri` (by the CA), for the
    /// RequestAuthentication rules that name that URI. A rule whose URI has no
    /// document gets no keys, so every token of its issuer fails.
    pub fn add_remote_jwks(&mut self, jwks_uri: &str, jwks_json: &str) {
        self.remote_jwks
            .insert(jwks_uri.to_owned(), jwks_json.to_owned());
    }

    /// Every diagnostic so far.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }

    /// True when some diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    /// The valid objects so far.
    pub fn objects(&self) -> &[Loaded] {
        &self.objects
    }

    /// Checks cross-object rules (duplicates) and compiles. On success returns the
    /// set and the warnings; on failure every diagnostic.
    pub fn finish(mut self) -> Result<(PolicySet, Vec<Diagnostic>), LoadError> {
        let mut seen: std::collections::HashMap<(&'static str, String, String), Origin> =
            std::collections::HashMap::new();
        let mut dups = Vec::new();
        for l in &self.objects {
            let m = l.object.metadata();
            let key = (
                l.object.kind(),
                m.namespace().to_owned(),
                m.name().to_owned(),
            );
            if let Some(first) = seen.get(&key) {
                dups.push(Diagnostic {
                    severity: Severity::Error,
                    source: l.origin.source.clone(),
                    document: l.origin.document,
                    object: Some(format!("{} {}/{}", key.0, key.1, key.2)),
                    path: "metadata.name".to_owned(),
                    message: format!(
                        "duplicate object: already defined in {} (document {})",
                        first.source, first.document
                    ),
                });
            } else {
                seen.insert(key, l.origin.clone());
            }
        }
        self.diagnostics.extend(dups);
        if self.has_errors() {
            return Err(LoadError {
                diagnostics: self.diagnostics,
            });
        }
        let objects: Vec<PolicyObject> = self.objects.into_iter().map(|l| l.object).collect();
        match PolicySet::compile(&objects, &self.mesh, &self.remote_jwks) {
            Ok(set) => Ok((set, self.diagnostics)),
            Err(message) => {
                self.diagnostics.push(Diagnostic {
                    severity: Severity::Error,
                    source: "<compile>".to_owned(),
                    document: 0,
                    object: None,
                    path: String::new(),
                    message,
                });
                Err(LoadError {
                    diagnostics: self.diagnostics,
                })
            }
        }
    }
}

/// Loads one source into a set (convenience for tests and tools).
pub fn load_str(source_name: &str, text: &str, mesh: &MeshConfig) -> Result<PolicySet, LoadError> {
    let mut loader = Loader::new(mesh.clone());
    loader.add_source(source_name, text);
    loader.finish().map(|(set, _)| set)
}

fn typed<S: for<'de> Deserialize<'de> + Default>(value: Value) -> Result<(ObjectMeta, S), Issue> {
    let env: Envelope<S> = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        describe_serde_error(path, &e.inner().to_string())
    })?;
    Ok((
        env.metadata.unwrap_or_default(),
        env.spec.unwrap_or_default(),
    ))
}

/// Turns serde's message into "path: reason", naming the unknown field in the path.
fn describe_serde_error(path: String, msg: &str) -> Issue {
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some((field, tail)) = rest.split_once('`')
    {
        // serde_path_to_error's path already ends with the unknown key.
        let path = if path.is_empty() {
            field.to_owned()
        } else {
            path
        };
        let hint = tail.trim_start_matches(", ").trim();
        let message = if hint.is_empty() {
            "unknown field".to_owned()
        } else {
            format!("unknown field ({hint})")
        };
        return Issue::error(path, message);
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        return Issue::error(path, format!("wrong type: {rest}"));
    }
    if let Some(rest) = msg.strip_prefix("missing field `")
        && let Some((field, _)) = rest.split_once('`')
    {
        return Issue::error(join(&path, field), "missing");
    }
    Issue::error(path, msg.to_owned())
}

/// The object as JSON with `metadata.namespace` set to `namespace` (its effective one).
fn as_json(value: &Value, namespace: &str) -> Result<serde_json::Value, String> {
    let mut json =
        serde_json::to_value(value).map_err(|e| format!("cannot be represented as JSON: {e}"))?;
    if let Some(object) = json.as_object_mut() {
        let metadata = object
            .entry("metadata")
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        if let Some(metadata) = metadata.as_object_mut() {
            metadata
                .entry("namespace")
                .or_insert_with(|| serde_json::Value::String(namespace.to_owned()));
        }
    }
    Ok(json)
}

fn join(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty()) {
        (true, _) => path.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) => format!("{prefix}.{path}"),
    }
}
