//! `/proc/<pid>/cgroup` → the pod UID and container ID of the process.
//!
//! Pure and total: any input gives an answer or an error, never a panic,
//! because the file's contents describe a process we do not trust (it
//! cannot write its cgroup path, but it can be anything the runtime made).
//!
//! The formats covered (each has a fixture under `tests/fixtures/cgroup/`):
//! - lines `hierarchy-id:controllers:path`, split on the first two `:`
//!   only (cgroup v1: one line per hierarchy; v2: `0::/path`);
//! - the cgroupfs driver: `/kubepods[/<qos>]/pod<uid>/<id>`;
//! - the systemd driver: `…-pod<uid_with_underscores>.slice/<runtime>-<id>.scope`
//!   with `cri-containerd-`, `crio-` or `docker-`, and the colon form
//!   `…pod<uid>.slice:cri-containerd:<id>`;
//! - paths relative to the reader's cgroup namespace (`/../…`), which is
//!   why no `kubepods` prefix is required.
//!
//! The container ID is the last 64-hex-digit word of a line's path; the pod
//! UID is the last `pod<uid>` word before it. A line without a container
//! ID says nothing. A line with a pod UID outranks lines without one; two
//! lines that disagree are an error, not a guess.

use std::fmt;

/// Where a process runs, as its cgroup path says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// The pod's UID, lowercase with dashes; `None` when the path names the
    /// container only (e.g. CRI-O seen from a nested cgroup namespace),
    /// which leaves the pod to be found by container ID.
    pub pod_uid: Option<String>,
    /// The container ID: 64 lowercase hex digits, without the runtime
    /// prefix (compare with `containerStatuses[].containerID` after its
    /// `<runtime>://`).
    pub container_id: String,
}

/// Lines of one cgroup file that name different pods or containers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the cgroup file names two containers: {first} and {second}")]
pub struct CgroupConflict {
    /// The first container seen.
    pub first: Located,
    /// The one that disagrees with it.
    pub second: Located,
}

/// A pod UID and container ID, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located(pub PodContainer);

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.pod_uid {
            Some(uid) => write!(f, "pod {uid} container {}", self.0.container_id),
            None => write!(f, "container {} (no pod UID)", self.0.container_id),
        }
    }
}

/// Parses a whole `/proc/<pid>/cgroup` file. `Ok(None)`: not a container
/// (a host process, `/user.slice/…`).
pub fn parse_cgroup_file(contents: &str) -> Result<Option<PodContainer>, CgroupConflict> {
    let mut found: Option<PodContainer> = None;
    for line in contents.lines() {
        let Some(here) = parse_line(line) else {
            continue;
        };
        let Some(seen) = &found else {
            found = Some(here);
            continue;
        };
        match (seen.pod_uid.is_some(), here.pod_uid.is_some()) {
            // A pod UID outranks lines that had none (e.g. kind on macOS,
            // where one hierarchy shows the node container's own cgroup).
            (false, true) => found = Some(here),
            // ... and lines without one, after it, add nothing.
            (true, false) => {}
            _ if *seen != here => {
                return Err(CgroupConflict {
                    first: Located(seen.clone()),
                    second: Located(here),
                });
            }
            _ => {}
        }
    }
    Ok(found)
}

/// One line: the path after the second `:`, if it names a container.
pub fn parse_line(line: &str) -> Option<PodContainer> {
    let mut parts = line.splitn(3, ':');
    let (_hierarchy, _controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
    parse_path(path)
}

/// A cgroup path: the last container ID, and the last pod UID before it.
pub fn parse_path(path: &str) -> Option<PodContainer> {
    let (id_start, container_id) = last_container_id(path)?;
    let before = path.get(..id_start)?;
    Some(PodContainer {
        pod_uid: last_pod_uid(before),
        container_id,
    })
}

/// Word characters in the sense of a regex `\b`: `[A-Za-z0-9_]`.
fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The last maximal word that is exactly 64 hex digits, with its offset.
fn last_container_id(path: &str) -> Option<(usize, String)> {
    let bytes = path.as_bytes();
    let mut end = bytes.len();
    // Walk words from the end: [start, end) is one maximal word run.
    while end > 0 {
        while end > 0 && !bytes.get(end - 1).copied().is_some_and(is_word) {
            end -= 1;
        }
        let mut start = end;
        while start > 0 && bytes.get(start - 1).copied().is_some_and(is_word) {
            start -= 1;
        }
        if let Some(word) = bytes.get(start..end)
            && word.len() == 64
            && word.iter().all(u8::is_ascii_hexdigit)
        {
            let id = String::from_utf8_lossy(word).to_ascii_lowercase();
            return Some((start, id));
        }
        end = start;
    }
    None
}

/// The last `pod<uid>` with word boundaries around it, where the UID is
/// 8-4-4-4-12 hex digits separated by `-` or `_` (systemd slices swap `-`
/// for `_`). Returned lowercase with dashes, as the API server writes it.
fn last_pod_uid(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    const UID_LEN: usize = 36;
    let mut best = None;
    let mut from = 0;
    while let Some(rel) = path.get(from..).and_then(|rest| rest.find("pod")) {
        let at = from + rel;
        from = at + 1;
        let boundary_before = at == 0 || !bytes.get(at - 1).copied().is_some_and(is_word);
        let uid_start = at + 3;
        let Some(candidate) = bytes.get(uid_start..uid_start + UID_LEN) else {
            continue;
        };
        let boundary_after = !bytes.get(uid_start + UID_LEN).copied().is_some_and(is_word);
        if !boundary_before || !boundary_after {
            continue;
        }
        let mut uid = String::with_capacity(UID_LEN);
        let mut pos = 0;
        let mut ok = true;
        for (i, len) in GROUPS.iter().enumerate() {
            if i > 0 {
                match candidate.get(pos) {
                    Some(b'-' | b'_') => uid.push('-'),
                    _ => ok = false,
                }
                pos += 1;
            }
            match candidate.get(pos..pos + len) {
                Some(group) if group.iter().all(u8::is_ascii_hexdigit) => {
                    uid.push_str(&String::from_utf8_lossy(group).to_ascii_lowercase());
                }
                _ => ok = false,
            }
            pos += len;
        }
        if ok {
            best = Some(uid);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";

    #[test]
    fn a_host_process_is_no_container() {
        let file = "0::/user.slice/user-1000.slice/session-2.scope\n";
        assert_eq!(parse_cgroup_file(file), Ok(None));
        assert_eq!(parse_cgroup_file(""), Ok(None));
    }

    #[test]
    fn colons_in_the_path_belong_to_the_path() {
        let line = format!(
            "0::/kubepods-pod{}.slice:cri-containerd:{ID}",
            UID.replace('-', "_")
        );
        let got = parse_line(&line).unwrap();
        assert_eq!(got.container_id, ID);
        assert_eq!(got.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn a_64_hex_run_inside_a_longer_word_is_not_an_id() {
        assert_eq!(parse_path(&format!("/kubepods/pod{UID}/x{ID}")), None);
        assert_eq!(parse_path(&format!("/kubepods/pod{UID}/{ID}0")), None);
        assert_eq!(parse_path(&format!("/kubepods/pod{UID}/{ID}_x")), None);
    }

    #[test]
    fn the_pod_uid_must_come_before_the_container_id() {
        let got = parse_path(&format!("/kubepods/{ID}/pod{UID}")).unwrap();
        assert_eq!(got.pod_uid, None);
    }

    #[test]
    fn a_pod_word_needs_boundaries_and_the_exact_uid_shape() {
        assert_eq!(last_pod_uid(&format!("/xpod{UID}/")), None);
        assert_eq!(last_pod_uid(&format!("/pod{UID}0/")), None);
        assert_eq!(
            last_pod_uid("/pod2c48913c-b29f-11e7-9350-02096814779/"),
            None
        );
        assert_eq!(
            last_pod_uid("/pod2c48913c.b29f-11e7-9350-020968147796/"),
            None
        );
        assert_eq!(
            last_pod_uid("/POD/pod2C48913C_B29F_11E7_9350_020968147796.slice"),
            Some(UID.to_owned())
        );
    }

    #[test]
    fn lines_that_disagree_are_an_error_not_a_guess() {
        let other = ID.replace('0', "f");
        let file = format!("1:cpu:/kubepods/pod{UID}/{ID}\n2:memory:/kubepods/pod{UID}/{other}\n");
        let err = parse_cgroup_file(&file).unwrap_err();
        assert!(err.to_string().contains(&other), "{err}");
    }

    #[test]
    fn a_line_with_a_pod_uid_outranks_lines_without_one() {
        let node = ID.replace('1', "e");
        let file = format!(
            "2:cpu:/docker/{node}\n1:memory:/kubepods/pod{UID}/{ID}\n0::/docker/{node}/x.service\n"
        );
        let got = parse_cgroup_file(&file).unwrap().unwrap();
        assert_eq!(got.container_id, ID);
        assert_eq!(got.pod_uid.as_deref(), Some(UID));
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(s in ".{0,400}") {
            let _ = parse_cgroup_file(&s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_cgroup_file(&String::from_utf8_lossy(&b));
        }

        #[test]
        fn near_miss_paths_never_panic(
            prefix in "[a-z0-9_:/.-]{0,40}",
            cut in 0usize..120,
        ) {
            let full = format!("0::{prefix}pod{UID}/cri-containerd-{ID}.scope");
            let cut = cut.min(full.len());
            let _ = parse_cgroup_file(&full[..cut]);
            let _ = parse_cgroup_file(&full[cut..]);
        }
    }
}
