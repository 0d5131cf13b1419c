//! The workload entries file: `WorkloadEntries::parse`, then `lookup` for
//! callers derived from the parsed entries and a few fixed ones.
#![no_main]

use std::path::PathBuf;

use citadel_agent::entries::{CallerFacts, WorkloadEntries};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(entries) = WorkloadEntries::parse(text) else {
        return;
    };
    let _ = entries.needs_exe();
    let mut callers = vec![
        CallerFacts {
            uid: 0,
            gid: 0,
            exe: None,
        },
        CallerFacts {
            uid: 1000,
            gid: 1000,
            exe: Some(PathBuf::from("/usr/bin/app")),
        },
    ];
    for e in entries.entries() {
        callers.push(CallerFacts {
            uid: e.uid.unwrap_or(0),
            gid: e.gid.unwrap_or(0),
            exe: e.path.clone(),
        });
    }
    for caller in &callers {
        if let Some(found) = entries.lookup(caller) {
            // The entry found must match the caller on every selector it has.
            assert!(found.uid.is_none_or(|u| u == caller.uid));
            assert!(found.gid.is_none_or(|g| g == caller.gid));
        }
    }
});
