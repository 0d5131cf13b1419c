//! The `citadel-mesh` executable itself, without a mesh: what a user sees
//! when there is nothing to stop, or when the other binaries are missing.
//!
//! (These also make `cargo test --workspace` build the executable that the
//! end-to-end quick-start test in `tests/` runs.)

use std::process::Command;

fn citadel_mesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_citadel-mesh"))
}

#[test]
fn down_without_a_mesh_stops_nothing_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = citadel_mesh()
        .args(["down", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("nothing to stop: no citadel-mesh state"),
        "{stdout}"
    );
}

#[test]
fn up_names_the_missing_binary_and_how_to_build_it() {
    let dir = tempfile::tempdir().unwrap();
    let empty_bin_dir = tempfile::tempdir().unwrap();
    let out = citadel_mesh()
        .args(["up", "--data-dir"])
        .arg(dir.path().join("mesh"))
        .arg("--bin-dir")
        .arg(empty_bin_dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not found"), "{stderr}");
    assert!(stderr.contains("cargo build --release"), "{stderr}");
}
