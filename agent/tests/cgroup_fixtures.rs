//! Pod attestation's first step on real-world `/proc/<pid>/cgroup` files:
//! one fixture per cgroup version, driver and runtime
//! (`tests/fixtures/cgroup/`, whose `EXPECTED.tsv` lists the same answers),
//! each with its own test.

use citadel_agent::k8s::cgroup::{PodContainer, parse_cgroup_file};

fn parse(fixture: &str) -> Option<PodContainer> {
    let path = format!(
        "{}/tests/fixtures/cgroup/{fixture}",
        env!("CARGO_MANIFEST_DIR")
    );
    let contents = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    parse_cgroup_file(&contents).unwrap_or_else(|e| panic!("{fixture}: {e}"))
}

fn expect(fixture: &str, pod_uid: Option<&str>, container_id: &str) {
    let got = parse(fixture).unwrap_or_else(|| panic!("{fixture}: no container found"));
    assert_eq!(got.container_id, container_id, "{fixture}");
    assert_eq!(got.pod_uid.as_deref(), pod_uid, "{fixture}");
}

#[test]
fn a_host_process_in_user_slice_is_not_a_container() {
    assert_eq!(parse("host-process.txt"), None);
}

#[test]
fn cgroup_v1_cgroupfs_driver_docker_burstable() {
    expect(
        "v1-cgroupfs-docker.txt",
        Some("2c48913c-b29f-11e7-9350-020968147796"),
        "ff2353e83cbcffaed51d505cbcdf3559fb03f18470fc98877d0b113bebf35a01",
    );
}

#[test]
fn cgroup_v1_kind_node_container_prefix_is_skipped_for_the_last_id() {
    expect(
        "v1-kind-cgroupfs.txt",
        Some("0a1b2c3d-4e5f-4061-8273-8495a6b7c8d9"),
        "de43405a7a8f59329fb0904d9e32d3ded224fb575fd46aba64b33283e3aa22de",
    );
}

#[test]
fn cgroup_v1_lines_with_a_pod_uid_outrank_the_node_containers_lines() {
    expect(
        "v1-kind-macos-mixed.txt",
        Some("b0c1d2e3-f4a5-4b6c-9d7e-8f9a0b1c2d3e"),
        "64bbd1f8761f66e1fd0aa3a547c0a0b23b1c68483a3a7d12b9ede76b14f48289",
    );
}

#[test]
fn cgroup_v1_systemd_driver_containerd() {
    expect(
        "v1-systemd-containerd.txt",
        Some("a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80"),
        "68ef9301d108dfbdf04c2b66e7e3a02cafe08d1424271a009a53676be861fd7f",
    );
}

#[test]
fn cgroup_v1_systemd_driver_crio() {
    expect(
        "v1-systemd-crio.txt",
        Some("5b0c1f3e-9d4a-4c8e-8f21-6a7b3c2d1e0f"),
        "6ccd001963b18b04cdf6a3f40111f5da64e42be9670c8630781d2df869a8d634",
    );
}

#[test]
fn cgroup_v1_systemd_driver_docker_guaranteed() {
    expect(
        "v1-systemd-docker.txt",
        Some("0f7e6d5c-4b3a-4291-8a7b-6c5d4e3f2a1b"),
        "85ab95ac481cec731c7d60018cbd1bd621689c368bb384a227e35b59ac8dfca4",
    );
}

#[test]
fn cgroup_v2_cgroupfs_driver_containerd_besteffort() {
    expect(
        "v2-cgroupfs-containerd.txt",
        Some("3f2e1d0c-9b8a-4776-8554-433221100fed"),
        "250953d058b8d166174889c3ced343c57f630203801e6446d3e31ded2e71b0b9",
    );
}

#[test]
fn cgroup_v2_cgroupfs_driver_guaranteed_has_no_qos_level() {
    expect(
        "v2-cgroupfs-guaranteed.txt",
        Some("1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"),
        "429461e8378be29663a7b5ab10d38241fce9659140271fc9806640478ab13cee",
    );
}

#[test]
fn cgroup_v2_relative_to_the_agents_cgroup_namespace_keeps_the_pod_uid() {
    expect(
        "v2-nested-cgroupns-containerd.txt",
        Some("fedcba98-7654-4321-8fed-cba987654321"),
        "cef17401b542888e782616c6dd8e0ad3b80c44cbe2668a819370e7a73ec565e1",
    );
}

#[test]
fn cgroup_v2_relative_crio_path_gives_the_container_without_a_pod_uid() {
    expect(
        "v2-nested-cgroupns-crio.txt",
        None,
        "4af49e40dd1d2c89293d6ed552134da1b6222ae25eed380d368e9b4ee019715e",
    );
}

#[test]
fn cgroup_v2_systemd_driver_containerd_colon_form() {
    expect(
        "v2-systemd-colon-containerd.txt",
        Some("6e5d4c3b-2a19-4807-b6a5-948372615041"),
        "89f60fd9a9669cc956d2b0a718e76cbc95de491a024f1d2ea2915bc7461dfb16",
    );
}

#[test]
fn cgroup_v2_systemd_driver_containerd() {
    expect(
        "v2-systemd-containerd.txt",
        Some("7d3e2f1a-0b9c-4d8e-a7f6-5e4d3c2b1a09"),
        "9b05b48358b0d74d85305ac05fc30d1918752dc760205101ad9cfec0f58b8545",
    );
}

#[test]
fn cgroup_v2_systemd_driver_crio() {
    expect(
        "v2-systemd-crio.txt",
        Some("c1d2e3f4-a5b6-4c7d-8e9f-0a1b2c3d4e5f"),
        "e609bb8ce214364f406591541b3a5c70451d95d3b65c98bed4c3c718589d226d",
    );
}

#[test]
fn cgroup_v2_systemd_driver_docker() {
    expect(
        "v2-systemd-docker.txt",
        Some("99887766-5544-4332-9110-ffeeddccbbaa"),
        "359ba078235b33d189dd36900c1320008903b40b672f4c2aa397fb94d93e8c16",
    );
}

#[test]
fn every_fixture_has_its_line_in_expected_tsv() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cgroup");
    let expected = std::fs::read_to_string(format!("{dir}/EXPECTED.tsv")).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".txt") {
            let line = expected
                .lines()
                .find(|l| l.split('\t').next() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("{name} is not in EXPECTED.tsv"));
            let cols: Vec<&str> = line.split('\t').collect();
            let got = parse(&name);
            match cols.as_slice() {
                [_, "-", "-"] => assert_eq!(got, None, "{name}"),
                [_, uid, id] => {
                    let got = got.unwrap_or_else(|| panic!("{name}: nothing found"));
                    assert_eq!(got.container_id, *id, "{name}");
                    assert_eq!(
                        got.pod_uid.as_deref(),
                        (*uid != "-").then_some(*uid),
                        "{name}"
                    );
                }
                _ => panic!("bad EXPECTED.tsv line {line:?}"),
            }
        }
    }
}
