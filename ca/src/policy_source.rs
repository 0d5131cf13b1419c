//! Where the CA's policies come from, and the task that follows them.
//!
//! [`PolicySource`] is the one seam: [`DirectorySource`] reads `--policies DIR` (a Kubernetes
//! CRD source will be the second implementation). [`PolicyPoller`] asks the source for changed
//! texts every interval, judges them with the pure [`crate::policy_set`] functions and
//! publishes a new [`PolicySnapshot`] through a `watch` channel; a bad reload keeps the last
//! good set, logs every error (file, object, field) and counts it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use citadel_policy::MeshConfig;
use tokio::sync::watch;

use crate::metrics::CaMetrics;
use crate::policy_set::{PolicySnapshot, ReloadDecision, SourceText, decide_reload, load_sources};

/// A source could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicySourceError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The path.
        path: String,
        /// What the operating system said.
        reason: String,
    },
}

/// Where policy texts come from.
#[async_trait::async_trait]
pub trait PolicySource: Send + 'static {
    /// What the source is, for logs (`directory /etc/citadel/policies`).
    fn describe(&self) -> String;

    /// Every source text if anything changed since the previous call (always on the first
    /// call), `None` when nothing did.
    async fn changed(&mut self) -> Result<Option<Vec<SourceText>>, PolicySourceError>;
}

/// Every policy file under `paths` (directories searched recursively for `.yaml`, `.yml` and
/// `.json`, each directory's files in sorted order); a path naming a file is taken as is.
/// The one file walk of both `citadel policy validate` and `citadel serve --policies`.
pub fn collect_policy_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PolicySourceError> {
    fn err(path: &Path, e: std::io::Error) -> PolicySourceError {
        PolicySourceError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    }
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PolicySourceError> {
        for entry in std::fs::read_dir(dir).map_err(|e| err(dir, e))? {
            let path = entry.map_err(|e| err(dir, e))?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| err(p, e))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found)?;
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Reads every policy file under `paths` ([`collect_policy_files`]).
pub fn read_policy_files(paths: &[PathBuf]) -> Result<Vec<SourceText>, PolicySourceError> {
    collect_policy_files(paths)?
        .into_iter()
        .map(|f| {
            std::fs::read_to_string(&f)
                .map(|text| SourceText {
                    name: f.display().to_string(),
                    text,
                })
                .map_err(|e| PolicySourceError::Read {
                    path: f.display().to_string(),
                    reason: e.to_string(),
                })
        })
        .collect()
}

/// Policies from a directory of YAML/JSON files. Each call reads the files again and compares
/// their names and contents with the previous read (a policy directory is small; contents,
/// unlike modification times, cannot miss an edit made within one clock tick).
#[derive(Debug)]
pub struct DirectorySource {
    dir: PathBuf,
    last: Option<Vec<SourceText>>,
}

impl DirectorySource {
    /// A source reading `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, last: None }
    }
}

#[async_trait::async_trait]
impl PolicySource for DirectorySource {
    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    async fn changed(&mut self) -> Result<Option<Vec<SourceText>>, PolicySourceError> {
        let dir = self.dir.clone();
        let texts = tokio::task::spawn_blocking(move || read_policy_files(&[dir]))
            .await
            .map_err(|e| PolicySourceError::Read {
                path: self.dir.display().to_string(),
                reason: e.to_string(),
            })??;
        if self.last.as_ref() == Some(&texts) {
            return Ok(None);
        }
        self.last = Some(texts.clone());
        Ok(Some(texts))
    }
}

/// Loads the first set from `source`: at start-up there is no last good set to keep, so an
/// unreadable source or an invalid object is an error (listing every diagnostic).
pub async fn load_initial(
    source: &mut dyn PolicySource,
    mesh: &MeshConfig,
) -> anyhow::Result<PolicySnapshot> {
    let texts = source.changed().await?.unwrap_or_default();
    match decide_reload("", load_sources(&texts, mesh)) {
        ReloadDecision::Publish(snapshot) => Ok(snapshot),
        ReloadDecision::Unchanged => Ok(PolicySnapshot::empty()),
        ReloadDecision::KeepLastGood(errors) => {
            let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::bail!(
                "the policies in {} are invalid:\n{}",
                source.describe(),
                list.join("\n")
            )
        }
    }
}

/// The task that follows a source.
pub struct PolicyPoller {
    /// The source.
    pub source: Box<dyn PolicySource>,
    /// Mesh settings for validation.
    pub mesh: MeshConfig,
    /// Time between two reads.
    pub interval: Duration,
    /// Where new sets are published.
    pub snapshots: watch::Sender<Arc<PolicySnapshot>>,
    /// Reload errors and the object gauge.
    pub metrics: Arc<CaMetrics>,
}

impl PolicyPoller {
    /// Follows the source until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            self.poll_once().await;
        }
    }

    /// One read and its consequences.
    pub async fn poll_once(&mut self) {
        let texts = match self.source.changed().await {
            Ok(Some(texts)) => texts,
            Ok(None) => return,
            Err(e) => {
                self.metrics.policy_reload_errors.inc();
                tracing::warn!(source = %self.source.describe(), error = %e, "cannot read the policies; the last good set stays in force");
                return;
            }
        };
        let in_force = self.snapshots.borrow().version.clone();
        match decide_reload(&in_force, load_sources(&texts, &self.mesh)) {
            ReloadDecision::Unchanged => {}
            ReloadDecision::Publish(snapshot) => {
                tracing::info!(
                    source = %self.source.describe(),
                    version = %snapshot.version,
                    objects = snapshot.objects.len(),
                    "policy set changed"
                );
                self.metrics
                    .policy_objects
                    .set(i64::try_from(snapshot.objects.len()).unwrap_or(i64::MAX));
                self.snapshots.send_replace(Arc::new(snapshot));
            }
            ReloadDecision::KeepLastGood(errors) => {
                self.metrics.policy_reload_errors.inc();
                for e in &errors {
                    tracing::warn!(source = %self.source.describe(), "{e}");
                }
                tracing::warn!(
                    source = %self.source.describe(),
                    errors = errors.len(),
                    version = %in_force,
                    "invalid policies; the last good set stays in force"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {rules: [{}]}\n";

    #[tokio::test]
    async fn directory_source_reports_changes_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let mut source = DirectorySource::new(dir.path().to_owned());
        let first = source.changed().await.unwrap().unwrap();
        assert_eq!(first.len(), 1);
        assert!(source.changed().await.unwrap().is_none());
        std::fs::write(dir.path().join("a.yaml"), GOOD.replace("shop", "bank")).unwrap();
        assert!(source.changed().await.unwrap().is_some());
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b.json"), "{}").unwrap();
        assert_eq!(source.changed().await.unwrap().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn invalid_reload_keeps_the_published_set_and_counts_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        let mut source = DirectorySource::new(dir.path().to_owned());
        let mesh = MeshConfig::default();
        let first = load_initial(&mut source, &mesh).await.unwrap();
        let (tx, rx) = watch::channel(Arc::new(first.clone()));
        let metrics = Arc::new(CaMetrics::new());
        let mut poller = PolicyPoller {
            source: Box::new(source),
            mesh,
            interval: Duration::from_secs(1),
            snapshots: tx,
            metrics: metrics.clone(),
        };
        std::fs::write(dir.path().join("b.yaml"), "kind: AuthorizationPolicy\n").unwrap();
        poller.poll_once().await;
        assert_eq!(rx.borrow().version, first.version);
        assert_eq!(metrics.policy_reload_errors.get(), 1);
        // Unchanged files are not judged again.
        poller.poll_once().await;
        assert_eq!(metrics.policy_reload_errors.get(), 1);
        std::fs::write(
            dir.path().join("b.yaml"),
            GOOD.replace("name: a", "name: b"),
        )
        .unwrap();
        poller.poll_once().await;
        assert_ne!(rx.borrow().version, first.version);
        assert_eq!(rx.borrow().objects.len(), 2);
        assert_eq!(metrics.policy_objects.get(), 2);
    }

    #[tokio::test]
    async fn invalid_policies_at_start_up_are_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.yaml"), GOOD.replace("rules", "rulez")).unwrap();
        let mut source = DirectorySource::new(dir.path().to_owned());
        let err = load_initial(&mut source, &MeshConfig::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.yaml") && err.contains("rulez"), "{err}");
    }
}
