//! `/proc/<pid>/cgroup` contents → `parse_cgroup_file` (the Kubernetes
//! attestor's container and pod UID reader), and each line through
//! `parse_line`.
#![no_main]

use citadel_agent::k8s::cgroup::{parse_cgroup_file, parse_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Some(found)) = parse_cgroup_file(text) {
        assert!(!found.container_id.is_empty());
    }
    for line in text.lines() {
        let _ = parse_line(line);
    }
});
