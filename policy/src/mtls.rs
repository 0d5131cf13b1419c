//! PeerAuthentication resolution: which mTLS mode a workload port runs in, and
//! which policy decided it.

use std::fmt;

use crate::index::Selector;
use crate::model::MtlsMode;

/// An effective mTLS mode (UNSET never survives resolution).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plaintext only; no peer identity is available.
    Disable,
    /// Mutual TLS or plaintext.
    Permissive,
    /// Mutual TLS only.
    Strict,
}

impl Mode {
    /// `DISABLE`, `PERMISSIVE` or `STRICT`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "DISABLE",
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
        }
    }

    fn from_model(m: MtlsMode) -> Option<Self> {
        match m {
            MtlsMode::Unset => None,
            MtlsMode::Disable => Some(Self::Disable),
            MtlsMode::Permissive => Some(Self::Permissive),
            MtlsMode::Strict => Some(Self::Strict),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scope of the policy that set the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsScope {
    /// No policy set a mode: the default, PERMISSIVE.
    Default,
    /// The mesh-wide policy (root namespace, no selector).
    Mesh,
    /// The namespace-wide policy.
    Namespace,
    /// A workload policy (selector) for all ports.
    Workload,
    /// A workload policy's `portLevelMtls` entry for this port.
    Port,
}

impl MtlsScope {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Mesh => "mesh",
            Self::Namespace => "namespace",
            Self::Workload => "workload",
            Self::Port => "port",
        }
    }
}

/// A policy by namespace and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyRef<'p> {
    /// Namespace.
    pub namespace: &'p str,
    /// Name.
    pub name: &'p str,
}

impl fmt::Display for PolicyRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The effective mode and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MtlsResolution<'p> {
    /// The mode.
    pub mode: Mode,
    /// The scope that set it.
    pub scope: MtlsScope,
    /// The policy that set it (`None` for the default).
    pub policy: Option<PolicyRef<'p>>,
}

/// A compiled PeerAuthentication.
#[derive(Debug, Clone)]
pub(crate) struct CompiledPeer {
    pub(crate) namespace: Box<str>,
    pub(crate) name: Box<str>,
    pub(crate) selector: Selector,
    pub(crate) mode: MtlsMode,
    pub(crate) ports: Box<[(u16, MtlsMode)]>,
}

impl CompiledPeer {
    fn policy_ref(&self) -> PolicyRef<'_> {
        PolicyRef {
            namespace: &self.namespace,
            name: &self.name,
        }
    }
}

/// Composes mesh, namespace and workload policies (each the oldest of its scope,
/// any of them possibly absent) for one port: a set mode overrides the one from the
/// enclosing scope; UNSET inherits; a port-level entry overrides the workload's mode.
pub(crate) fn compose<'p>(
    mesh: Option<&'p CompiledPeer>,
    namespace: Option<&'p CompiledPeer>,
    workload: Option<&'p CompiledPeer>,
    port: u16,
) -> MtlsResolution<'p> {
    let mut r = MtlsResolution {
        mode: Mode::Permissive,
        scope: MtlsScope::Default,
        policy: None,
    };
    let mut apply = |p: &'p CompiledPeer, m: MtlsMode, scope: MtlsScope| {
        if let Some(mode) = Mode::from_model(m) {
            r = MtlsResolution {
                mode,
                scope,
                policy: Some(p.policy_ref()),
            };
        }
    };
    if let Some(p) = mesh {
        apply(p, p.mode, MtlsScope::Mesh);
    }
    if let Some(p) = namespace {
        apply(p, p.mode, MtlsScope::Namespace);
    }
    if let Some(p) = workload {
        apply(p, p.mode, MtlsScope::Workload);
        if let Some((_, m)) = p.ports.iter().find(|(n, _)| *n == port) {
            apply(p, *m, MtlsScope::Port);
        }
    }
    r
}
