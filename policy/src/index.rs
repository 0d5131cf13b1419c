//! The selector index of one scope (a namespace, or the root namespace).
//!
//! Policies without a selector are listed once; a policy with a selector is filed
//! under one of its `(key, value)` pairs. A workload then visits the unselected list
//! and, for each of its own labels, one bucket: the cost depends on the workload's
//! labels and the policies that could apply to it, never on unrelated policies.

use std::collections::HashMap;

/// A selector as sorted `(key, value)` pairs; empty = every workload.
pub(crate) type Selector = Box<[(Box<str>, Box<str>)]>;

/// Index of policy ordinals (AuthorizationPolicies: policy group numbers) in one scope.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScopeIndex {
    unselected: Vec<u32>,
    by_label: HashMap<Box<str>, HashMap<Box<str>, Vec<u32>>>,
}

impl ScopeIndex {
    /// Files a policy under its selector.
    pub(crate) fn insert(&mut self, ordinal: u32, selector: &Selector) {
        match selector.first() {
            None => self.unselected.push(ordinal),
            Some((k, v)) => self
                .by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(ordinal),
        }
    }

    /// Calls `f` with every policy that may select a workload with `labels` (each at
    /// most once when label keys are unique); the caller checks the full selector.
    pub(crate) fn for_each_candidate(&self, labels: &[(&str, &str)], mut f: impl FnMut(u32)) {
        for &o in &self.unselected {
            f(o);
        }
        if self.by_label.is_empty() {
            return;
        }
        for (k, v) in labels {
            if let Some(list) = self.by_label.get(*k).and_then(|by_value| by_value.get(*v)) {
                for &o in list {
                    f(o);
                }
            }
        }
    }
}

/// True when every pair of the selector is among the workload's labels.
pub(crate) fn selector_matches(selector: &Selector, labels: &[(&str, &str)]) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.iter().any(|(lk, lv)| **k == **lk && **v == **lv))
}

/// Builds a selector from a model selector (sorted, as BTreeMap iterates).
pub(crate) fn selector_of(sel: Option<&crate::model::WorkloadSelector>) -> Selector {
    sel.and_then(|s| s.match_labels.as_ref())
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect()
        })
        .unwrap_or_default()
}
