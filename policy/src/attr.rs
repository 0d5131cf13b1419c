//! Request attributes that rules test, the `when` keys that name them, and which
//! rule fields map to which attribute.

use crate::model::{Operation, Source};
use crate::request::avail;

/// An attribute of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attr {
    /// `source.principal` / `principals`.
    Principal,
    /// `source.namespace` / `namespaces`.
    Namespace,
    /// `source.serviceAccount` / `serviceAccounts` (`<ns>/<sa>`).
    ServiceAccount,
    /// `source.ip` / `ipBlocks`.
    SourceIp,
    /// `remote.ip` / `remoteIpBlocks`.
    RemoteIp,
    /// `destination.ip`.
    DestIp,
    /// `destination.port` / `ports`.
    DestPort,
    /// `connection.sni`.
    Sni,
    /// `hosts` (HTTP).
    Host,
    /// `methods` (HTTP).
    Method,
    /// `paths` (HTTP).
    Path,
    /// `request.auth.principal` / `requestPrincipals` (HTTP).
    RequestPrincipal,
    /// `request.auth.audiences` (HTTP).
    Audiences,
    /// `request.auth.presenter` (HTTP).
    Presenter,
    /// `request.headers[name]` (HTTP).
    Header(Box<str>),
    /// `request.auth.claims[name]` (HTTP); a nested claim `[a][b]` is named `a][b`.
    Claim(Box<str>),
}

/// How the values of an attribute are written and matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Istio string patterns, case-sensitive.
    Str,
    /// Istio string patterns, case-insensitive (hosts).
    StrIgnoreCase,
    /// IP addresses / CIDR blocks.
    Ip,
    /// Port numbers.
    Port,
    /// Path patterns and templates.
    Path,
    /// `<namespace>/<service-account>`.
    ServiceAccount,
}

impl Attr {
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Self::SourceIp | Self::RemoteIp | Self::DestIp => Kind::Ip,
            Self::DestPort => Kind::Port,
            Self::Path => Kind::Path,
            Self::Host => Kind::StrIgnoreCase,
            Self::ServiceAccount => Kind::ServiceAccount,
            _ => Kind::Str,
        }
    }

    /// The attribute group a request must carry for this attribute to be judged.
    pub(crate) fn needs(&self) -> u8 {
        match self {
            Self::Host
            | Self::Method
            | Self::Path
            | Self::RequestPrincipal
            | Self::Audiences
            | Self::Presenter
            | Self::Header(_)
            | Self::Claim(_) => avail::HTTP,
            Self::SourceIp => avail::SOURCE_IP,
            Self::RemoteIp => avail::REMOTE_IP,
            Self::DestIp => avail::DEST_IP,
            Self::Principal
            | Self::Namespace
            | Self::ServiceAccount
            | Self::DestPort
            | Self::Sni => 0,
        }
    }

    /// Parses a `when` key.
    pub(crate) fn parse_key(key: &str) -> Result<Self, String> {
        let simple = match key {
            "source.ip" => Some(Self::SourceIp),
            "remote.ip" => Some(Self::RemoteIp),
            "source.namespace" => Some(Self::Namespace),
            "source.principal" => Some(Self::Principal),
            "source.serviceAccount" => Some(Self::ServiceAccount),
            "request.auth.principal" => Some(Self::RequestPrincipal),
            "request.auth.audiences" => Some(Self::Audiences),
            "request.auth.presenter" => Some(Self::Presenter),
            "destination.ip" => Some(Self::DestIp),
            "destination.port" => Some(Self::DestPort),
            "connection.sni" => Some(Self::Sni),
            _ => None,
        };
        if let Some(a) = simple {
            return Ok(a);
        }
        if let Some(name) = bracketed(key, "request.headers") {
            return Ok(Self::Header(name?.to_ascii_lowercase().into()));
        }
        if let Some(name) = bracketed(key, "request.auth.claims") {
            return Ok(Self::Claim(name?.into()));
        }
        if key.starts_with("experimental.envoy.filters.") {
            return Err(format!(
                "unsupported key {key:?}: experimental Envoy filter metadata is not available in Citadel"
            ));
        }
        Err(format!("unknown key {key:?}"))
    }
}

/// For `prefix[name]`: `Some(Ok(name))`, `Some(Err(..))` when malformed, `None` when
/// the key does not start with `prefix`.
fn bracketed<'k>(key: &'k str, prefix: &str) -> Option<Result<&'k str, String>> {
    let rest = key.strip_prefix(prefix)?;
    let Some(inner) = rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
        return Some(Err(format!("{key:?} must be {prefix}[<name>]")));
    };
    if inner.is_empty() {
        return Some(Err(format!("{key:?}: the name in brackets is empty")));
    }
    // `claims[a][b]` names the nested claim b of a: the text between the outer
    // brackets is `a][b`, which is also how the request side names nested claims.
    let nested_ok = prefix == "request.auth.claims";
    for part in inner.split("][") {
        if part.is_empty() {
            return Some(Err(format!("{key:?}: a name in brackets is empty")));
        }
        if part.contains(['[', ']']) {
            return Some(Err(format!("{key:?}: unbalanced brackets")));
        }
    }
    if inner.contains("][") && !nested_ok {
        return Some(Err(format!("{key:?} must be {prefix}[<name>]")));
    }
    Some(Ok(inner))
}

/// One list field of a `source` or `operation`.
pub(crate) struct Field<'a> {
    /// YAML name.
    pub name: &'static str,
    /// The list, if set.
    pub values: Option<&'a [String]>,
    /// Attribute tested.
    pub attr: Attr,
    /// `not*` form.
    pub negate: bool,
}

fn field<'a>(
    name: &'static str,
    v: &'a Option<Vec<String>>,
    attr: Attr,
    negate: bool,
) -> Field<'a> {
    Field {
        name,
        values: v.as_deref(),
        attr,
        negate,
    }
}

/// The fields of a `source`, in declaration order.
pub(crate) fn source_fields(s: &Source) -> [Field<'_>; 12] {
    [
        field("principals", &s.principals, Attr::Principal, false),
        field("notPrincipals", &s.not_principals, Attr::Principal, true),
        field(
            "requestPrincipals",
            &s.request_principals,
            Attr::RequestPrincipal,
            false,
        ),
        field(
            "notRequestPrincipals",
            &s.not_request_principals,
            Attr::RequestPrincipal,
            true,
        ),
        field("namespaces", &s.namespaces, Attr::Namespace, false),
        field("notNamespaces", &s.not_namespaces, Attr::Namespace, true),
        field(
            "serviceAccounts",
            &s.service_accounts,
            Attr::ServiceAccount,
            false,
        ),
        field(
            "notServiceAccounts",
            &s.not_service_accounts,
            Attr::ServiceAccount,
            true,
        ),
        field("ipBlocks", &s.ip_blocks, Attr::SourceIp, false),
        field("notIpBlocks", &s.not_ip_blocks, Attr::SourceIp, true),
        field("remoteIpBlocks", &s.remote_ip_blocks, Attr::RemoteIp, false),
        field(
            "notRemoteIpBlocks",
            &s.not_remote_ip_blocks,
            Attr::RemoteIp,
            true,
        ),
    ]
}

/// The fields of an `operation`, in declaration order.
pub(crate) fn operation_fields(o: &Operation) -> [Field<'_>; 8] {
    [
        field("hosts", &o.hosts, Attr::Host, false),
        field("notHosts", &o.not_hosts, Attr::Host, true),
        field("ports", &o.ports, Attr::DestPort, false),
        field("notPorts", &o.not_ports, Attr::DestPort, true),
        field("methods", &o.methods, Attr::Method, false),
        field("notMethods", &o.not_methods, Attr::Method, true),
        field("paths", &o.paths, Attr::Path, false),
        field("notPaths", &o.not_paths, Attr::Path, true),
    ]
}

/// Checks `<namespace>/<service-account>`.
pub(crate) fn parse_service_account(s: &str) -> Result<(&str, &str), String> {
    match s.split_once('/') {
        Some((ns, sa))
            if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') && !s.contains('*') =>
        {
            Ok((ns, sa))
        }
        _ => Err(format!(
            "{s:?} must be <namespace>/<service-account> (no wildcards)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_keys_are_recognised() {
        assert_eq!(Attr::parse_key("source.ip"), Ok(Attr::SourceIp));
        assert_eq!(
            Attr::parse_key("request.headers[User-Agent]"),
            Ok(Attr::Header("user-agent".into()))
        );
        assert_eq!(
            Attr::parse_key("request.auth.claims[groups]"),
            Ok(Attr::Claim("groups".into()))
        );
        assert_eq!(
            Attr::parse_key("request.auth.claims[realm][roles]"),
            Ok(Attr::Claim("realm][roles".into()))
        );
    }

    #[test]
    fn rejects_unknown_when_keys() {
        for bad in [
            "source.ips",
            "request.headers",
            "request.headers[]",
            "request.headers[a",
            "request.auth.claims[a][]",
            "request.auth.claims[a]]",
            "request.headers[a][b]",
            "destination.labels[app]",
            "experimental.envoy.filters.x",
        ] {
            assert!(Attr::parse_key(bad).is_err(), "{bad}");
        }
    }
}
