//! Runs every case of tests/scenarios/*.yaml against the compiled evaluator and
//! the reference evaluator, and checks both against the expected outcome.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;

use citadel_policy::explain::check;
use citadel_policy::{Loader, MeshConfig, MtlsScope, PolicyObject, Reason, Severity};
use support::reference;
use support::scenario::{Case, File};

fn by(reason: &Reason<'_>) -> String {
    match reason {
        Reason::DeniedBy(r) | Reason::AllowedBy(r) => r.to_string(),
        Reason::NoAllowPolicy => "no ALLOW policy applies".into(),
        Reason::NoAllowMatched => "no ALLOW policy matched".into(),
    }
}

fn ref_by(kind: &str, rule: &Option<reference::RefRule>) -> String {
    match (kind, rule) {
        (_, Some((ns, n, i))) => format!("{ns}/{n} rule {i}"),
        ("no_allow_policy", None) => "no ALLOW policy applies".into(),
        _ => "no ALLOW policy matched".into(),
    }
}

fn verdict_of(kind: &str) -> &'static str {
    if matches!(kind, "no_allow_policy" | "allowed_by") {
        "ALLOW"
    } else {
        "DENY"
    }
}

/// Runs one case; returns a failure description.
fn run_case(file_policies: Option<&str>, case: &Case) -> Result<(), String> {
    let mesh = MeshConfig {
        root_namespace: case
            .root_namespace
            .clone()
            .unwrap_or_else(|| "istio-system".into()),
    };
    let text = case.policies.as_deref().or(file_policies).unwrap_or("");
    let mut loader = Loader::new(mesh.clone());
    loader.add_source(&case.name, text);
    let objects: Vec<PolicyObject> = loader.objects().iter().map(|l| l.object.clone()).collect();
    let warnings: Vec<String> = loader
        .diagnostics()
        .iter()
        .filter(|d| d.severity == Severity::Warning)
        .map(ToString::to_string)
        .collect();
    if let Some(w) = &case.expect.warning
        && !warnings.iter().any(|d| d.contains(w.as_str()))
    {
        return Err(format!(
            "expected a warning containing {w:?}, got {warnings:?}"
        ));
    }
    let loaded = loader.finish();
    if let Some(needle) = &case.expect.invalid {
        return match loaded {
            Ok(_) => Err(format!("expected the policies to be rejected ({needle:?})")),
            Err(e) => {
                let all: Vec<String> = e
                    .diagnostics
                    .iter()
                    .filter(|d| d.is_error())
                    .map(ToString::to_string)
                    .collect();
                if all.iter().any(|d| d.contains(needle.as_str())) {
                    Ok(())
                } else {
                    Err(format!("no error contains {needle:?}; errors: {all:#?}"))
                }
            }
        };
    }
    let (set, _) = loaded.map_err(|e| format!("policies rejected: {:#?}", e.diagnostics))?;
    let req = case
        .request
        .as_ref()
        .ok_or("a case without `invalid` needs a request")?;
    let owned = req.owned();
    let parts = owned.parts();
    let request = parts.request();
    let report = check(&set, &request);
    let d = set.decide(&request);

    // Expectations. Authorization is judged on the request as given (no mTLS
    // adjustment) unless `check` is asked for.
    let plain = d;
    let e = &case.expect;
    if let Some(want) = &e.decision
        && plain.verdict.as_str() != want
    {
        return Err(format!(
            "decision {} ({}), expected {want}",
            plain.verdict, plain.reason
        ));
    }
    if let Some(want) = &e.by
        && by(&plain.reason) != *want
    {
        return Err(format!(
            "decided by {:?}, expected {want:?}",
            by(&plain.reason)
        ));
    }
    if let Some(want) = &e.mtls
        && report.mtls.mode.as_str() != want
    {
        return Err(format!("mTLS {}, expected {want}", report.mtls.mode));
    }
    if let Some(want) = &e.mtls_by {
        let got = match (report.mtls.policy, report.mtls.scope) {
            (None, _) | (_, MtlsScope::Default) => "default".to_owned(),
            (Some(p), s) => format!("{p} ({})", s.as_str()),
        };
        if got != *want {
            return Err(format!("mTLS decided by {got:?}, expected {want:?}"));
        }
    }
    if let Some(want) = &e.audit {
        let got = plain
            .audited_by
            .map_or("none".to_owned(), |a| a.to_string());
        if got != *want {
            return Err(format!("audit {got:?}, expected {want:?}"));
        }
    }
    if let Some(want) = &e.dry_run {
        let got = plain.dry_run.map_or("none".to_owned(), |x| {
            format!("{} ({})", x.verdict(), by(&x))
        });
        if got != *want {
            return Err(format!("dry run {got:?}, expected {want:?}"));
        }
    }
    if let Some(want) = &e.check
        && report.verdict.as_str() != want
    {
        return Err(format!("check verdict {}, expected {want}", report.verdict));
    }
    if let Some(want) = e.skipped_allow_rules
        && plain.skipped_allow_rules != want
    {
        return Err(format!(
            "skipped {} ALLOW rules, expected {want}",
            plain.skipped_allow_rules
        ));
    }
    // The reference evaluator must agree on everything.
    let r = reference::decide(&objects, &mesh, &request);
    let got = (
        d.verdict.as_str(),
        by(&d.reason),
        d.audited_by.map(|a| a.to_string()),
        d.skipped_allow_rules,
    );
    let want_ref = (
        verdict_of(r.kind),
        ref_by(r.kind, &r.rule),
        r.audit
            .as_ref()
            .map(|(ns, n, i)| format!("{ns}/{n} rule {i}")),
        r.skipped,
    );
    if got != want_ref {
        return Err(format!("compiled {got:?} != reference {want_ref:?}"));
    }
    let dry = d.dry_run.map(|x| format!("{} ({})", x.verdict(), by(&x)));
    let ref_dry = r
        .dry_run
        .as_ref()
        .map(|(k, rule)| format!("{} ({})", verdict_of(k), ref_by(k, rule)));
    if dry != ref_dry {
        return Err(format!(
            "dry run: compiled {dry:?} != reference {ref_dry:?}"
        ));
    }
    let rm = reference::mtls(&objects, &mesh, &request);
    let got_m = (
        report.mtls.mode.as_str(),
        report.mtls.policy.map(|p| p.to_string()),
    );
    let want_m = (rm.mode, rm.policy.map(|(ns, n)| format!("{ns}/{n}")));
    if got_m != want_m {
        return Err(format!("mTLS: compiled {got_m:?} != reference {want_m:?}"));
    }

    Ok(())
}

#[test]
fn scenario_table() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut names = BTreeSet::new();
    let mut failures = Vec::new();
    let mut count = 0;
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let file: File =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for case in &file.cases {
            count += 1;
            assert!(
                names.insert(case.name.clone()),
                "duplicate case name {}",
                case.name
            );
            assert!(
                !case.why.trim().is_empty(),
                "case {} has no `why`",
                case.name
            );
            if let Err(msg) = run_case(file.policies.as_deref(), case) {
                failures.push(format!(
                    "{} :: {}\n    why: {}\n    {msg}",
                    path.file_name().unwrap().to_string_lossy(),
                    case.name,
                    case.why.trim()
                ));
            }
        }
    }
    println!("{count} scenario cases in {} files", files.len());
    assert!(
        failures.is_empty(),
        "{} of {count} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(count >= 80, "only {count} scenario cases");
}
