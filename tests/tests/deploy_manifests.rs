//! `deploy/kustomize`: the base, the Istio CRDs and every overlay render with
//! `kubectl kustomize` and pass `kubernetes-validate` (strict schemas of the
//! built-in kinds, offline), and the rendered objects say what the design
//! needs: the CA in Kubernetes mode (one replica on SQLite, two on PostgreSQL), RBAC for TokenReview, the
//! agent's projected token for audience `istio-ca`, the socket directory on
//! the host, the database URL from a Secret.
//!
//! Under `CI` a missing `kubectl` or an unset `CITADEL_KUBERNETES_VALIDATE`
//! (the validator's path, exported by `.ci/run`) fails; elsewhere the test
//! skips that part and says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

fn kustomize_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test kit lives in the workspace")
        .join("deploy/kustomize")
}

/// Every directory that must render: the base, the CRDs, each overlay.
fn kustomizations() -> Vec<PathBuf> {
    let root = kustomize_root();
    let mut dirs = vec![root.join("base"), root.join("istio-crds")];
    let mut overlays: Vec<PathBuf> = std::fs::read_dir(root.join("overlays"))
        .expect("deploy/kustomize/overlays exists")
        .map(|e| e.expect("readable overlays directory").path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    overlays.sort();
    assert!(
        overlays.len() >= 2,
        "expected the postgres and plugin-ca overlays, found {overlays:?}"
    );
    dirs.extend(overlays);
    dirs
}

fn kubectl_available() -> bool {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            !in_ci(),
            "kubectl is missing; .ci/run installs it (Debian package kubectl)"
        );
        eprintln!("SKIPPED: kubectl is not installed, the manifests were not rendered");
    }
    found
}

/// `kubectl kustomize DIR`, which must succeed.
fn render(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kustomize prints UTF-8")
}

/// The rendered objects, one JSON value per YAML document.
fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn rendered(relative: &str) -> Option<Vec<Value>> {
    kubectl_available().then(|| objects(&render(&kustomize_root().join(relative))))
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn volume<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The value following `flag` in `args` (or given as `flag=value`).
fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if *a == flag {
            args.get(i + 1).copied()
        } else {
            a.strip_prefix(prefix.as_str())
        }
    })
}

/// Runs `kubernetes-validate --strict` on one rendering, for the oldest
/// Kubernetes we support (1.30: node name in bound tokens by default) and the
/// validator's newest. A WARN means an object went unvalidated (no schema
/// for its kind): allowed only for Istio's own kinds, never a built-in one.
fn validate(validator: &Path, name: &str, yaml: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).expect("write rendering");
    for version in [Some("1.30.0"), None] {
        let mut cmd = Command::new(validator);
        cmd.arg("--strict");
        if let Some(v) = version {
            cmd.args(["-k", v]);
        }
        let out = cmd.arg(&file).output().unwrap_or_else(|e| {
            panic!("running {}: {e}", validator.display());
        });
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{name} does not validate (kubernetes {version:?}):\n{stdout}{stderr}"
        );
        let unvalidated: Vec<&str> = stdout
            .lines()
            .filter(|l| !l.starts_with("INFO"))
            .filter(|l| !l.contains("security.istio.io"))
            .collect();
        assert!(
            unvalidated.is_empty(),
            "{name}: objects not validated:\n{}",
            unvalidated.join("\n")
        );
        let passed = stdout.lines().filter(|l| l.contains(" passed ")).count();
        assert_eq!(
            passed,
            objects(yaml).len(),
            "{name}: every object is validated:\n{stdout}"
        );
    }
}

#[test]
fn every_kustomization_renders_and_passes_kubernetes_validate() {
    if !kubectl_available() {
        return;
    }
    let validator = match std::env::var_os("CITADEL_KUBERNETES_VALIDATE") {
        Some(p) => Some(PathBuf::from(p)),
        None if in_ci() => panic!(
            "CITADEL_KUBERNETES_VALIDATE is unset under CI; .ci/run installs kubernetes-validate and exports it"
        ),
        None => {
            eprintln!(
                "SKIPPED validation: CITADEL_KUBERNETES_VALIDATE is unset (the path of kubernetes-validate); rendering only"
            );
            None
        }
    };
    for dir in kustomizations() {
        let yaml = render(&dir);
        assert!(
            !objects(&yaml).is_empty(),
            "{} renders nothing",
            dir.display()
        );
        if let Some(v) = &validator {
            let name = dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("rendering");
            validate(v, name, &yaml);
        }
    }
}

#[test]
fn every_overlay_keeps_the_base_whole() {
    let Some(base) = rendered("base") else { return };
    let kinds_and_names = |objs: &[Value]| {
        let mut v: Vec<String> = objs
            .iter()
            .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
            .collect();
        v.sort();
        v
    };
    for overlay in kustomizations().into_iter().skip(2) {
        let objs = objects(&render(&overlay));
        let mut expected = kinds_and_names(&base);
        // The postgres overlay trades the SQLite volume for a disruption budget over
        // its two replicas; nothing else may come or go.
        if overlay.ends_with("postgres") {
            expected.retain(|o| o != r#""PersistentVolumeClaim"/"citadel-data""#);
            expected.push(r#""PodDisruptionBudget"/"citadel""#.to_string());
            expected.sort();
        }
        assert_eq!(
            kinds_and_names(&objs),
            expected,
            "{} adds or drops objects",
            overlay.display()
        );
    }
}

#[test]
fn base_runs_one_ca_replica_on_a_persistent_sqlite_volume() {
    let Some(objs) = rendered("base") else { return };
    let ca = find(&objs, "Deployment", "citadel");
    // Two replicas with a SQLite file each would be two CAs with two roots.
    assert_eq!(ca["spec"]["replicas"], 1);
    assert_eq!(ca["spec"]["strategy"]["type"], "Recreate");
    assert_eq!(
        volume(ca, "data")["persistentVolumeClaim"]["claimName"],
        "citadel-data"
    );
    let pvc = find(&objs, "PersistentVolumeClaim", "citadel-data");
    assert_eq!(pvc["spec"]["accessModes"][0], "ReadWriteOnce");
    assert!(
        !objs.iter().any(|o| o["kind"] == "PodDisruptionBudget"),
        "a budget of one over one replica would block every node drain"
    );
}

#[test]
fn ca_runs_in_kubernetes_mode_with_probes_on_15014() {
    let Some(objs) = rendered("base") else { return };
    let ca = find(&objs, "Deployment", "citadel");
    assert_eq!(ca["metadata"]["namespace"], "citadel-system");
    let c = container(ca, "citadel");
    let args = strings(&c["args"]);
    assert_eq!(args.first(), Some(&"serve"));
    assert!(args.contains(&"--kubernetes"), "{args:?}");
    assert_eq!(
        flag_value(&args, "--token-review-audience"),
        Some("istio-ca")
    );
    assert_eq!(
        flag_value(&args, "--trusted-agent"),
        Some("citadel-system/citadel-agent")
    );
    assert_eq!(flag_value(&args, "--ca-namespace"), Some("citadel-system"));
    let env_field = |name: &str| {
        c["env"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["name"] == name))
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
    };
    assert_eq!(env_field("POD_NAME"), Some("metadata.name".into()));
    assert_eq!(
        env_field("POD_NAMESPACE"),
        Some("metadata.namespace".into())
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let ports: Vec<(i64, &str)> = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["containerPort"].as_i64().unwrap_or(0),
                p["name"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(ports.contains(&(15012, "grpc")), "{ports:?}");
    assert!(ports.contains(&(15014, "http-monitoring")), "{ports:?}");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        ca["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    assert_eq!(
        ca["spec"]["template"]["spec"]["serviceAccountName"],
        "citadel-ca"
    );

    let svc = find(&objs, "Service", "citadel");
    let svc_ports: Vec<i64> = svc["spec"]["ports"]
        .as_array()
        .expect("service ports")
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(svc_ports, vec![15012, 15014]);
}

#[test]
fn ca_rbac_allows_tokenreviews_create_and_keeps_secrets_and_leases_in_its_namespace() {
    let Some(objs) = rendered("base") else { return };
    let grants = |role: &Value, group: &str, resource: &str| -> Vec<String> {
        role["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .filter(|r| strings(&r["apiGroups"]).contains(&group))
            .filter(|r| strings(&r["resources"]).contains(&resource))
            .flat_map(|r| strings(&r["verbs"]).into_iter().map(str::to_owned))
            .collect()
    };
    let cluster = find(&objs, "ClusterRole", "citadel-ca");
    assert!(
        grants(cluster, "authentication.k8s.io", "tokenreviews").contains(&"create".to_owned())
    );
    for resource in ["pods", "namespaces"] {
        let verbs = grants(cluster, "", resource);
        for v in ["get", "list", "watch"] {
            assert!(verbs.contains(&v.to_owned()), "{resource}: {verbs:?}");
        }
    }
    let cm = grants(cluster, "", "configmaps");
    for v in ["get", "list", "watch", "create", "update", "patch"] {
        assert!(cm.contains(&v.to_owned()), "configmaps: {cm:?}");
    }
    for kind in [
        "authorizationpolicies",
        "peerauthentications",
        "requestauthentications",
    ] {
        assert!(grants(cluster, "security.istio.io", kind).contains(&"watch".to_owned()));
    }
    // Secrets (the authority keys) and Leases never cluster-wide.
    assert!(grants(cluster, "", "secrets").is_empty());
    assert!(grants(cluster, "coordination.k8s.io", "leases").is_empty());
    let role = find(&objs, "Role", "citadel-ca");
    assert_eq!(role["metadata"]["namespace"], "citadel-system");
    assert!(grants(role, "", "secrets").contains(&"update".to_owned()));
    assert!(grants(role, "coordination.k8s.io", "leases").contains(&"update".to_owned()));

    for (binding, sa) in [
        ("ClusterRoleBinding", "citadel-ca"),
        ("RoleBinding", "citadel-ca"),
    ] {
        let b = find(&objs, binding, sa);
        assert_eq!(b["subjects"][0]["name"], sa);
        assert_eq!(b["subjects"][0]["namespace"], "citadel-system");
    }
    // The agent reads pods, nothing else.
    let agent = find(&objs, "ClusterRole", "citadel-agent");
    assert_eq!(agent["rules"].as_array().map(Vec::len), Some(1));
    assert_eq!(strings(&agent["rules"][0]["resources"]), vec!["pods"]);
    assert_eq!(
        strings(&agent["rules"][0]["verbs"]),
        vec!["get", "list", "watch"]
    );
}

#[test]
fn agent_token_is_projected_for_audience_istio_ca_and_passed_as_token_file() {
    let Some(objs) = rendered("base") else { return };
    let ds = find(&objs, "DaemonSet", "citadel-agent");
    let token = &volume(ds, "citadel-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "istio-ca");
    assert_eq!(token["expirationSeconds"], 3600);
    let c = container(ds, "citadel-agent");
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "citadel-token"))
        .expect("token mounted");
    let path = format!(
        "{}/{}",
        mount["mountPath"].as_str().expect("mountPath"),
        token["path"].as_str().expect("token path")
    );
    let args = strings(&c["args"]);
    assert_eq!(args.first(), Some(&"run"));
    assert!(args.contains(&"--kubernetes"), "{args:?}");
    assert_eq!(flag_value(&args, "--token-file"), Some(path.as_str()));
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        "citadel-agent"
    );
}

#[test]
fn agent_socket_directory_is_host_path_var_run_citadel_and_it_sees_host_pids() {
    let Some(objs) = rendered("base") else { return };
    let ds = find(&objs, "DaemonSet", "citadel-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    let dir = &volume(ds, "socket-dir")["hostPath"];
    assert_eq!(dir["path"], "/var/run/citadel");
    assert_eq!(dir["type"], "DirectoryOrCreate");
    let c = container(ds, "citadel-agent");
    let args = strings(&c["args"]);
    assert_eq!(
        flag_value(&args, "--socket"),
        Some("/var/run/citadel/agent.sock")
    );
    // The node name comes from the downward API and reaches --node-name.
    let node = c["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "NODE_NAME"))
        .expect("NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert_eq!(flag_value(&args, "--node-name"), Some("$(NODE_NAME)"));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["ports"][0]["containerPort"], 15020);
}

#[test]
fn postgres_overlay_takes_the_database_url_from_a_secret() {
    let Some(objs) = rendered("overlays/postgres") else {
        return;
    };
    let c = container(find(&objs, "Deployment", "citadel"), "citadel");
    let env = c["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "CITADEL_DATABASE_URL"))
        .expect("CITADEL_DATABASE_URL set");
    assert!(env.get("value").is_none(), "the URL is never inline");
    let secret = &env["valueFrom"]["secretKeyRef"];
    assert_eq!(secret["name"], "citadel-database");
    assert_eq!(secret["key"], "url");
    // Nothing else of the container was lost by the patch.
    assert!(strings(&c["args"]).contains(&"--kubernetes"));
    assert!(
        c["env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["name"] == "POD_NAME"))
    );
    assert!(!strings(&c["args"]).iter().any(|a| a.contains("postgres")));
}

#[test]
fn postgres_overlay_runs_two_replicas_without_the_sqlite_volume() {
    let Some(objs) = rendered("overlays/postgres") else {
        return;
    };
    let ca = find(&objs, "Deployment", "citadel");
    assert_eq!(ca["spec"]["replicas"], 2);
    assert_eq!(ca["spec"]["strategy"]["type"], "RollingUpdate");
    let data = volume(ca, "data");
    assert!(data["persistentVolumeClaim"].is_null(), "{data:?}");
    assert!(data["emptyDir"].is_object(), "{data:?}");
    assert!(
        !objs.iter().any(|o| o["kind"] == "PersistentVolumeClaim"),
        "no SQLite volume on the shared database"
    );
    let pdb = find(&objs, "PodDisruptionBudget", "citadel");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
}

#[test]
fn plugin_ca_overlay_mounts_cacerts_and_points_ca_dir_at_it() {
    let Some(objs) = rendered("overlays/plugin-ca") else {
        return;
    };
    let ca = find(&objs, "Deployment", "citadel");
    assert_eq!(
        volume(ca, "cacerts-secret")["secret"]["secretName"],
        "cacerts"
    );
    // The CA refuses group-readable keys, so the Secret's files reach it as
    // 0600 copies in a memory volume, made before it starts.
    assert_eq!(volume(ca, "cacerts")["emptyDir"]["medium"], "Memory");
    let init = ca["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .and_then(|cs| cs.first())
        .expect("an init container copies the files");
    let script = strings(&init["command"]).join(" ");
    assert!(
        script.contains("install -m 0600 /etc/cacerts-secret/* /etc/cacerts/"),
        "{script}"
    );
    let c = container(ca, "citadel");
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "cacerts"))
        .expect("cacerts mounted");
    assert_eq!(mount["readOnly"], true);
    assert_eq!(mount["mountPath"], "/etc/cacerts");
    let args = strings(&c["args"]);
    assert_eq!(flag_value(&args, "--ca-dir"), Some("/etc/cacerts"));
    assert!(args.contains(&"--kubernetes"));
}

#[test]
fn istio_crds_serve_v1_and_v1beta1_with_open_spec_and_stay_out_of_the_base() {
    let Some(crds) = rendered("istio-crds") else {
        return;
    };
    let mut kinds: Vec<&str> = crds
        .iter()
        .map(|c| {
            assert_eq!(c["kind"], "CustomResourceDefinition");
            assert_eq!(c["spec"]["group"], "security.istio.io");
            let versions = c["spec"]["versions"].as_array().expect("versions");
            let names: Vec<&str> = versions.iter().filter_map(|v| v["name"].as_str()).collect();
            assert_eq!(names, vec!["v1", "v1beta1"]);
            assert!(versions.iter().all(|v| v["served"] == true));
            assert_eq!(versions.iter().filter(|v| v["storage"] == true).count(), 1);
            for v in versions {
                let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
                assert_eq!(spec["x-kubernetes-preserve-unknown-fields"], true);
            }
            c["spec"]["names"]["kind"].as_str().expect("kind")
        })
        .collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        vec![
            "AuthorizationPolicy",
            "PeerAuthentication",
            "RequestAuthentication"
        ]
    );
    let Some(base) = rendered("base") else { return };
    assert!(
        base.iter().all(|o| o["kind"] != "CustomResourceDefinition"),
        "a cluster with Istio must be able to leave the CRDs out"
    );
}
