//! The fake API server's storage: every object as JSON, one cluster-wide
//! monotonically increasing `resourceVersion` (as etcd's revision), and the
//! log of changes that watches replay.

use std::collections::{BTreeMap, HashSet};

use serde_json::{Value, json};

use super::resources::Resource;
use super::selectors::Selector;

/// An API error, answered as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `reason` (`NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, …).
    pub reason: &'static str,
    /// Human-readable message, worded as the real server words it.
    pub message: String,
}

impl ApiError {
    /// The `Status` body of this error.
    pub fn status(&self) -> Value {
        status(self.code, self.reason, &self.message)
    }
}

/// A failure `Status` object.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn not_found(res: &Resource, name: &str) -> ApiError {
    ApiError {
        code: 404,
        reason: "NotFound",
        message: format!("{} \"{name}\" not found", res.qualified()),
    }
}

/// What a stored change was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Created.
    Added,
    /// Updated.
    Modified,
    /// Deleted (the object is its last state).
    Deleted,
}

/// One change in the log.
#[derive(Debug, Clone)]
pub struct Change {
    /// The resourceVersion the change created.
    pub rv: u64,
    /// Kind of object.
    pub resource: Resource,
    /// Namespace (`""` for cluster-scoped objects).
    pub namespace: String,
    /// The state before (updates and deletions).
    pub old: Option<Value>,
    /// The state after (for a deletion, the last state with the deletion's RV).
    pub new: Value,
    /// What happened.
    pub kind: ChangeKind,
}

type Key = (&'static str, &'static str, String, String);

fn key(res: &Resource, ns: &str, name: &str) -> Key {
    (res.group, res.plural, ns.to_owned(), name.to_owned())
}

/// All objects and their history.
#[derive(Debug, Default)]
pub struct Objects {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<Change>,
    /// Changes up to this RV were compacted: a watch from an older RV gets `410 Gone`.
    compacted: u64,
    /// The next watch of these plurals gets `410 Gone` whatever its RV (test control).
    expire_next: HashSet<&'static str>,
}

fn random_uid() -> String {
    let mut b = [0u8; 16];
    // A test fake: a failing RNG only makes UIDs less random.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::from_second(crate::unix_now())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn name_of(obj: &Value) -> Option<String> {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
}

impl Objects {
    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// One object.
    pub fn get(&self, res: &Resource, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&key(res, ns, name))
            .cloned()
            .ok_or_else(|| not_found(res, name))
    }

    /// Objects of `res` (in `ns`, or all namespaces) matching `selector`, ordered by
    /// namespace and name, and the list's resourceVersion.
    pub fn list(&self, res: &Resource, ns: Option<&str>, selector: &Selector) -> (Vec<Value>, u64) {
        let items = self
            .objects
            .iter()
            .filter(|((g, p, n, _), _)| {
                *g == res.group && *p == res.plural && ns.is_none_or(|ns| ns == n)
            })
            .map(|(_, v)| v)
            .filter(|v| selector.matches(v))
            .cloned()
            .collect();
        (items, self.rv)
    }

    fn record(
        &mut self,
        res: &Resource,
        ns: &str,
        old: Option<Value>,
        new: Value,
        kind: ChangeKind,
    ) {
        self.log.push(Change {
            rv: self.rv,
            resource: *res,
            namespace: ns.to_owned(),
            old,
            new,
            kind,
        });
    }

    /// Creates `obj` (201), or 409 AlreadyExists. Sets uid, creationTimestamp, namespace,
    /// kind, apiVersion and resourceVersion as the server does; `keep_identity` (test
    /// control only) keeps a uid and creationTimestamp the object already has.
    pub fn create(
        &mut self,
        res: &Resource,
        ns: &str,
        mut obj: Value,
        keep_identity: bool,
    ) -> Result<Value, ApiError> {
        let name = name_of(&obj).ok_or_else(|| ApiError {
            code: 422,
            reason: "Invalid",
            message: format!(
                "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                res.kind
            ),
        })?;
        let k = key(res, ns, &name);
        if self.objects.contains_key(&k) {
            return Err(ApiError {
                code: 409,
                reason: "AlreadyExists",
                message: format!("{} \"{name}\" already exists", res.qualified()),
            });
        }
        let rv = self.next_rv();
        obj["kind"] = json!(res.kind);
        obj["apiVersion"] = json!(res.api_version());
        let meta = &mut obj["metadata"];
        if res.namespaced {
            meta["namespace"] = json!(ns);
        }
        if !keep_identity || meta.get("uid").and_then(Value::as_str).is_none() {
            meta["uid"] = json!(random_uid());
        }
        if !keep_identity || meta.get("creationTimestamp").is_none() {
            meta["creationTimestamp"] = json!(now_rfc3339());
        }
        meta["resourceVersion"] = json!(rv.to_string());
        if !keep_identity && let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
        }
        self.objects.insert(k, obj.clone());
        self.record(res, ns, None, obj.clone(), ChangeKind::Added);
        Ok(obj)
    }

    /// Replaces `name` with `obj` (PUT): 409 Conflict on a stale `metadata.resourceVersion`,
    /// 422 without one where the kind requires it, 404 for a missing object unless the kind
    /// is created on update.
    pub fn replace(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        obj: Value,
    ) -> Result<Value, ApiError> {
        self.replace_inner(res, ns, name, obj, false)
    }

    /// Test control: replaces `name` unconditionally, keeping a `deletionTimestamp` the new
    /// state sets (a pod becoming terminating).
    pub fn replace_direct(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        self.replace_inner(res, ns, name, obj, true)
    }

    fn replace_inner(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        mut obj: Value,
        direct: bool,
    ) -> Result<Value, ApiError> {
        if name_of(&obj).as_deref() != Some(name) {
            return Err(ApiError {
                code: 400,
                reason: "BadRequest",
                message: "the name of the object does not match the name on the URL".into(),
            });
        }
        let k = key(res, ns, name);
        let Some(current) = self.objects.get(&k).cloned() else {
            if res.create_on_update {
                if let Some(m) = obj["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                return self.create(res, ns, obj, false);
            }
            return Err(not_found(res, name));
        };
        let sent_rv = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let current_rv = current
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match sent_rv.as_deref() {
            None if res.update_requires_rv && !direct => {
                return Err(ApiError {
                    code: 422,
                    reason: "Invalid",
                    message: format!(
                        "{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: \
                         must be specified for an update",
                        res.kind
                    ),
                });
            }
            Some(rv) if rv != current_rv => {
                return Err(ApiError {
                    code: 409,
                    reason: "Conflict",
                    message: format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been \
                         modified; please apply your changes to the latest version and try again",
                        res.qualified()
                    ),
                });
            }
            _ => {}
        }
        let rv = self.next_rv();
        obj["kind"] = json!(res.kind);
        obj["apiVersion"] = json!(res.api_version());
        // Immutable metadata stays the server's.
        let fields: &[&str] = if direct {
            &["uid", "creationTimestamp", "namespace"]
        } else {
            &["uid", "creationTimestamp", "namespace", "deletionTimestamp"]
        };
        for &field in fields {
            match current["metadata"].get(field) {
                Some(v) => obj["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = obj["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(k, obj.clone());
        self.record(res, ns, Some(current), obj.clone(), ChangeKind::Modified);
        Ok(obj)
    }

    /// Deletes `name` at once (no finalizers, no grace period) and answers its last state.
    pub fn delete(&mut self, res: &Resource, ns: &str, name: &str) -> Result<Value, ApiError> {
        let Some(old) = self.objects.remove(&key(res, ns, name)) else {
            return Err(not_found(res, name));
        };
        let rv = self.next_rv();
        let mut last = old.clone();
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(res, ns, Some(old), last.clone(), ChangeKind::Deleted);
        Ok(last)
    }

    /// Changes after `rv` (exclusive).
    pub fn changes_after(&self, rv: u64) -> Vec<Change> {
        let start = self.log.partition_point(|c| c.rv <= rv);
        self.log
            .get(start..)
            .map(<[Change]>::to_vec)
            .unwrap_or_default()
    }

    /// Forgets the history up to now: a watch from an older resourceVersion gets `410 Gone`.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.log.clear();
    }

    /// Makes the next watch of `res` answer `410 Gone`.
    pub fn expire_next_watch(&mut self, res: &Resource) {
        self.expire_next.insert(res.plural);
    }

    /// `Some(oldest available RV)` when a watch of `res` from `rv` must get `410 Gone`;
    /// consumes an [`Objects::expire_next_watch`].
    pub fn watch_expired(&mut self, res: &Resource, rv: u64) -> Option<u64> {
        if self.expire_next.remove(res.plural) || rv < self.compacted {
            Some(self.compacted.max(rv + 1))
        } else {
            None
        }
    }
}
