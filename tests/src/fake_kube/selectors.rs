//! Label and field selectors, as the API server evaluates them on list and
//! watch: comma-separated requirements that must all hold.
//!
//! Labels: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`.
//! Fields: `path=v`, `path==v`, `path!=v` for `metadata.name`, `metadata.namespace` and, on
//! pods, `spec.nodeName`, `spec.serviceAccountName`, `status.phase`, `status.podIP`; an
//! unsupported field is a 400, as on the real server.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq(String),
    NotEq(String),
    Exists,
    NotExists,
    In(Vec<String>),
    NotIn(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn set_of(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_owned()).collect())
}

fn parse_requirement(part: &str, allow_sets: bool) -> Result<Requirement, String> {
    let bad = || format!("unable to parse requirement: {part:?}");
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(Requirement {
            key: k.trim().into(),
            op: Op::NotEq(v.trim().into()),
        });
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Requirement {
            key: k.trim().into(),
            op: Op::Eq(v.trim().into()),
        });
    }
    if allow_sets {
        if let Some((k, set)) = part.split_once(" notin ") {
            let set = set_of(set).ok_or_else(bad)?;
            return Ok(Requirement {
                key: k.trim().into(),
                op: Op::NotIn(set),
            });
        }
        if let Some((k, set)) = part.split_once(" in ") {
            let set = set_of(set).ok_or_else(bad)?;
            return Ok(Requirement {
                key: k.trim().into(),
                op: Op::In(set),
            });
        }
        if let Some(k) = part.strip_prefix('!') {
            return Ok(Requirement {
                key: k.trim().into(),
                op: Op::NotExists,
            });
        }
        if !part.contains(' ') {
            return Ok(Requirement {
                key: part.into(),
                op: Op::Exists,
            });
        }
    }
    Err(bad())
}

/// Fields the fake can select on for `kind`.
fn field_supported(kind: &str, key: &str) -> bool {
    matches!(key, "metadata.name" | "metadata.namespace")
        || (kind == "Pod"
            && matches!(
                key,
                "spec.nodeName" | "spec.serviceAccountName" | "status.phase" | "status.podIP"
            ))
}

fn field_value<'a>(obj: &'a Value, key: &str) -> &'a str {
    let mut v = obj;
    for part in key.split('.') {
        v = v.get(part).unwrap_or(&Value::Null);
    }
    v.as_str().unwrap_or("")
}

impl Selector {
    /// Parses `labelSelector` and `fieldSelector` for objects of `kind`; `Err` is the message
    /// of a 400 BadRequest.
    pub fn parse(labels: Option<&str>, fields: Option<&str>, kind: &str) -> Result<Self, String> {
        let labels = split_top(labels.unwrap_or(""))
            .into_iter()
            .map(|p| parse_requirement(p, true))
            .collect::<Result<Vec<_>, _>>()?;
        let fields = split_top(fields.unwrap_or(""))
            .into_iter()
            .map(|p| parse_requirement(p, false))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(r) = fields.iter().find(|r| !field_supported(kind, &r.key)) {
            return Err(format!(
                "field label not supported: {} (the fake serves only the common ones)",
                r.key
            ));
        }
        Ok(Self { labels, fields })
    }

    /// Whether `obj` satisfies every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match &r.op {
            Op::Eq(v) => label(&r.key) == Some(v.as_str()),
            Op::NotEq(v) => label(&r.key) != Some(v.as_str()),
            Op::Exists => label(&r.key).is_some(),
            Op::NotExists => label(&r.key).is_none(),
            Op::In(set) => label(&r.key).is_some_and(|l| set.iter().any(|s| s == l)),
            Op::NotIn(set) => label(&r.key).is_none_or(|l| set.iter().all(|s| s != l)),
        });
        labels_ok
            && self.fields.iter().all(|r| match &r.op {
                Op::Eq(v) => field_value(obj, &r.key) == v,
                Op::NotEq(v) => field_value(obj, &r.key) != v,
                _ => false,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({"metadata": {"name": "p", "namespace": "n", "labels": {"app": "web", "tier": "x"}},
               "spec": {"nodeName": "node-a"}})
    }

    #[test]
    fn field_selectors_match_node_and_name() {
        let s = Selector::parse(None, Some("spec.nodeName=node-a"), "Pod").unwrap();
        assert!(s.matches(&pod()));
        let s = Selector::parse(None, Some("spec.nodeName=node-b"), "Pod").unwrap();
        assert!(!s.matches(&pod()));
        let s =
            Selector::parse(None, Some("metadata.name=p,metadata.namespace!=m"), "Pod").unwrap();
        assert!(s.matches(&pod()));
        assert!(Selector::parse(None, Some("spec.nodeName=x"), "ConfigMap").is_err());
    }

    #[test]
    fn label_selectors_support_equality_existence_and_sets() {
        for (sel, want) in [
            ("app=web", true),
            ("app==web,tier", true),
            ("app!=web", false),
            ("!tier", false),
            ("app in (db, web)", true),
            ("app notin (web)", false),
            ("missing", false),
        ] {
            let s = Selector::parse(Some(sel), None, "Pod").unwrap();
            assert_eq!(s.matches(&pod()), want, "{sel}");
        }
    }
}
