//! Diagnostics: what is wrong, in which object, at which field, and why.

use std::fmt;

/// How serious a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The input is accepted but probably does not do what its author meant.
    Warning,
    /// The input is rejected.
    Error,
}

/// A problem found at one field of one object (before the source is known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Error or warning.
    pub severity: Severity,
    /// The field path, e.g. `spec.rules[0].from[0].source.principals`.
    pub path: String,
    /// Why.
    pub message: String,
}

impl Issue {
    /// An error at `path`.
    pub fn error(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            path: path.into(),
            message: message.into(),
        }
    }

    /// A warning at `path`.
    pub fn warning(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A problem with its location: source (file name), document, object and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The source name given to the loader (usually a file path).
    pub source: String,
    /// 1-based index of the YAML document within the source (0 = the whole source).
    pub document: usize,
    /// `Kind namespace/name`, when known.
    pub object: Option<String>,
    /// The field path (may be empty).
    pub path: String,
    /// Why.
    pub message: String,
}

impl Diagnostic {
    /// True for errors.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}", self.source)?;
        if self.document > 0 {
            write!(f, " (document {})", self.document)?;
        }
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Loading failed; every error (and warning) found is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} error(s) in policy input", .diagnostics.iter().filter(|d| d.is_error()).count())]
pub struct LoadError {
    /// All diagnostics, errors and warnings, in input order.
    pub diagnostics: Vec<Diagnostic>,
}
