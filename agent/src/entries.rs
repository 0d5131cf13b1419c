//! The workload-entries file: which local callers get which identity.
//!
//! ```yaml
//! entries:
//!   - spiffe_id: spiffe://cluster.local/ns/shop/sa/web
//!     uid: 1000            # selectors: any of uid, gid, path; all given must match
//!     labels: {app: web}
//! ```
//!
//! Parsing and matching are pure; the file is read and re-read by
//! [`crate::attest`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use citadel_identity::SpiffeId;
use serde::Deserialize;

/// One entry: selectors and the identity they grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadEntry {
    /// The identity granted.
    pub spiffe_id: SpiffeId,
    /// The caller's effective uid must equal this, if set.
    pub uid: Option<u32>,
    /// The caller's effective gid must equal this, if set.
    pub gid: Option<u32>,
    /// The caller's executable (`/proc/<pid>/exe`) must be this path, if set.
    pub path: Option<PathBuf>,
    /// Labels of the workload (for policy selection).
    pub labels: BTreeMap<String, String>,
}

/// The parsed file: entries in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadEntries {
    entries: Vec<WorkloadEntry>,
}

/// What is known about a caller when entries are matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerFacts {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Executable path, when it could be read.
    pub exe: Option<PathBuf>,
}

/// Why an entries file was refused. Names the entry (by index, from 0) and
/// the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntriesError {
    /// Not YAML of the expected shape (unknown field, wrong type, …).
    #[error("entries file does not parse: {0}")]
    Syntax(String),
    /// An entry's `spiffe_id` is not a valid SPIFFE ID.
    #[error("entries[{index}].spiffe_id: {reason}")]
    BadSpiffeId {
        /// Which entry.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry has no selector and would match every caller.
    #[error("entries[{index}]: give at least one selector (uid, gid or path)")]
    NoSelector {
        /// Which entry.
        index: usize,
    },
    /// A `path` selector without `uid` or `gid`: a process of any user could
    /// connect, then exec the named binary while a child of its own sends
    /// the request, so the executable alone proves too little.
    #[error("entries[{index}]: a path selector needs a uid or gid selector beside it")]
    PathWithoutUser {
        /// Which entry.
        index: usize,
    },
    /// A `path` selector is not absolute.
    #[error("entries[{index}].path: {path:?} is not an absolute path")]
    RelativePath {
        /// Which entry.
        index: usize,
        /// The path given.
        path: String,
    },
    /// Two entries have the same selectors but different identities: the
    /// caller's identity would depend on file order.
    #[error("entries[{index}] has the same selectors as entries[{other}] but another spiffe_id")]
    Ambiguous {
        /// The later entry.
        index: usize,
        /// The earlier one.
        other: usize,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    entries: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    spiffe_id: String,
    uid: Option<u32>,
    gid: Option<u32>,
    path: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl WorkloadEntries {
    /// Parses and validates the YAML text of an entries file. An empty file
    /// means no entries.
    pub fn parse(yaml: &str) -> Result<WorkloadEntries, EntriesError> {
        if yaml.trim().is_empty() {
            return Ok(WorkloadEntries::default());
        }
        let raw: RawFile =
            serde_yaml_ng::from_str(yaml).map_err(|e| EntriesError::Syntax(e.to_string()))?;
        let mut entries: Vec<WorkloadEntry> = Vec::with_capacity(raw.entries.len());
        for (index, e) in raw.entries.into_iter().enumerate() {
            let spiffe_id =
                SpiffeId::parse(&e.spiffe_id).map_err(|err| EntriesError::BadSpiffeId {
                    index,
                    reason: err.to_string(),
                })?;
            if e.uid.is_none() && e.gid.is_none() && e.path.is_none() {
                return Err(EntriesError::NoSelector { index });
            }
            if e.path.is_some() && e.uid.is_none() && e.gid.is_none() {
                return Err(EntriesError::PathWithoutUser { index });
            }
            let path = match e.path {
                Some(p) if !p.starts_with('/') => {
                    return Err(EntriesError::RelativePath { index, path: p });
                }
                p => p.map(PathBuf::from),
            };
            let entry = WorkloadEntry {
                spiffe_id,
                uid: e.uid,
                gid: e.gid,
                path,
                labels: e.labels,
            };
            if let Some(other) = entries.iter().position(|o| {
                o.uid == entry.uid
                    && o.gid == entry.gid
                    && o.path == entry.path
                    && o.spiffe_id != entry.spiffe_id
            }) {
                return Err(EntriesError::Ambiguous { index, other });
            }
            entries.push(entry);
        }
        Ok(WorkloadEntries { entries })
    }

    /// The entries, in file order.
    pub fn entries(&self) -> &[WorkloadEntry] {
        &self.entries
    }

    /// Whether any entry has a `path` selector (then the caller's executable
    /// must be read).
    pub fn needs_exe(&self) -> bool {
        self.entries.iter().any(|e| e.path.is_some())
    }

    /// The entry for a caller: of the entries whose every selector matches,
    /// the most specific one (most selectors), the first in file order among
    /// equals. `None` when nothing matches.
    pub fn lookup(&self, caller: &CallerFacts) -> Option<&WorkloadEntry> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.matches(caller))
            .max_by_key(|(i, e)| (e.selector_count(), std::cmp::Reverse(*i)))
            .map(|(_, e)| e)
    }
}

impl WorkloadEntry {
    fn matches(&self, c: &CallerFacts) -> bool {
        self.uid.is_none_or(|u| u == c.uid)
            && self.gid.is_none_or(|g| g == c.gid)
            && self
                .path
                .as_ref()
                .is_none_or(|p| c.exe.as_ref().is_some_and(|exe| exe == p))
    }

    fn selector_count(&self) -> usize {
        usize::from(self.uid.is_some())
            + usize::from(self.gid.is_some())
            + usize::from(self.path.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, gid: u32, exe: Option<&str>) -> CallerFacts {
        CallerFacts {
            uid,
            gid,
            exe: exe.map(PathBuf::from),
        }
    }

    const FILE: &str = r#"
entries:
  - spiffe_id: spiffe://cluster.local/ns/shop/sa/web
    uid: 1000
    labels: {app: web}
  - spiffe_id: spiffe://cluster.local/ns/shop/sa/web-admin
    uid: 1000
    path: /usr/bin/admin
  - spiffe_id: spiffe://cluster.local/ns/ops/sa/backup
    gid: 50
"#;

    #[test]
    fn rejects_path_selector_without_uid_or_gid() {
        let err =
            WorkloadEntries::parse("entries:\n  - spiffe_id: spiffe://td/a\n    path: /bin/x\n")
                .unwrap_err();
        assert_eq!(err, EntriesError::PathWithoutUser { index: 0 });
    }

    #[test]
    fn parses_the_documented_format() {
        let e = WorkloadEntries::parse(FILE).unwrap();
        assert_eq!(e.entries().len(), 3);
        assert_eq!(
            e.entries()[0].labels.get("app").map(String::as_str),
            Some("web")
        );
        assert!(e.needs_exe());
    }

    #[test]
    fn uid_selects_an_entry() {
        let e = WorkloadEntries::parse(FILE).unwrap();
        let hit = e.lookup(&caller(1000, 1000, Some("/bin/sh"))).unwrap();
        assert_eq!(
            hit.spiffe_id.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
    }

    #[test]
    fn the_most_specific_entry_wins() {
        let e = WorkloadEntries::parse(FILE).unwrap();
        let hit = e
            .lookup(&caller(1000, 1000, Some("/usr/bin/admin")))
            .unwrap();
        assert_eq!(
            hit.spiffe_id.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web-admin"
        );
    }

    #[test]
    fn every_given_selector_must_match() {
        let e = WorkloadEntries::parse(
            "entries:\n  - spiffe_id: spiffe://td/a\n    uid: 1\n    gid: 2\n",
        )
        .unwrap();
        assert!(e.lookup(&caller(1, 3, None)).is_none());
        assert!(e.lookup(&caller(1, 2, None)).is_some());
    }

    #[test]
    fn a_path_selector_never_matches_an_unknown_executable() {
        let e = WorkloadEntries::parse(
            "entries:\n  - spiffe_id: spiffe://td/a\n    uid: 0\n    path: /bin/x\n",
        )
        .unwrap();
        assert!(e.lookup(&caller(0, 0, None)).is_none());
        assert!(e.lookup(&caller(0, 0, Some("/bin/x"))).is_some());
    }

    #[test]
    fn no_match_is_none() {
        let e = WorkloadEntries::parse(FILE).unwrap();
        assert!(e.lookup(&caller(7, 7, None)).is_none());
    }

    #[test]
    fn rejects_entry_without_selector() {
        let err = WorkloadEntries::parse("entries:\n  - spiffe_id: spiffe://td/a\n").unwrap_err();
        assert_eq!(err, EntriesError::NoSelector { index: 0 });
    }

    #[test]
    fn rejects_unknown_field() {
        let err = WorkloadEntries::parse("entries:\n  - spiffe_id: spiffe://td/a\n    uuid: 1\n")
            .unwrap_err();
        assert!(matches!(err, EntriesError::Syntax(m) if m.contains("uuid")));
    }

    #[test]
    fn rejects_bad_spiffe_id() {
        let err = WorkloadEntries::parse("entries:\n  - spiffe_id: http://td/a\n    uid: 1\n")
            .unwrap_err();
        assert!(matches!(err, EntriesError::BadSpiffeId { index: 0, .. }));
    }

    #[test]
    fn rejects_relative_path() {
        let err = WorkloadEntries::parse(
            "entries:\n  - spiffe_id: spiffe://td/a\n    uid: 1\n    path: bin/x\n",
        )
        .unwrap_err();
        assert!(matches!(err, EntriesError::RelativePath { index: 0, .. }));
    }

    #[test]
    fn rejects_negative_uid() {
        assert!(matches!(
            WorkloadEntries::parse("entries:\n  - spiffe_id: spiffe://td/a\n    uid: -1\n"),
            Err(EntriesError::Syntax(_))
        ));
    }

    #[test]
    fn rejects_ambiguous_entries() {
        let err = WorkloadEntries::parse(
            "entries:\n  - spiffe_id: spiffe://td/a\n    uid: 1\n  - spiffe_id: spiffe://td/b\n    uid: 1\n",
        )
        .unwrap_err();
        assert_eq!(err, EntriesError::Ambiguous { index: 1, other: 0 });
    }

    #[test]
    fn empty_file_has_no_entries() {
        assert_eq!(WorkloadEntries::parse("").unwrap().entries().len(), 0);
        assert_eq!(
            WorkloadEntries::parse("entries: []")
                .unwrap()
                .entries()
                .len(),
            0
        );
    }
}
