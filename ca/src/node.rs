//! Node names and node identities: the agent of node `NAME` is
//! `spiffe://<trust-domain>/citadel/node/NAME`.

use citadel_identity::{SpiffeId, TrustDomain};

/// Path prefix of node-agent identities.
pub const NODE_PATH_PREFIX: &str = "/citadel/node/";
/// Path prefix reserved for Citadel's own identities; never granted to workloads.
pub const RESERVED_PATH_PREFIX: &str = "/citadel/";
/// Longest node name (a DNS name).
pub const MAX_NODE_NAME_LEN: usize = 253;

/// A node name that is not `[a-z0-9]([a-z0-9.-]*[a-z0-9])?` of at most 253 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "node name {0:?} is invalid: use lowercase letters, digits, '-' and '.', starting and \
     ending with a letter or digit, at most 253 characters"
)]
pub struct InvalidNodeName(pub String);

/// Checks a node name: lowercase, DNS-like, `[a-z0-9]([a-z0-9.-]*[a-z0-9])?`, ≤ 253 (pure).
pub fn validate_node_name(name: &str) -> Result<(), InvalidNodeName> {
    let edge_ok = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let bytes = name.as_bytes();
    let ok = name.len() <= MAX_NODE_NAME_LEN
        && edge_ok(bytes.first().copied())
        && edge_ok(bytes.last().copied())
        && bytes
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
    if ok {
        Ok(())
    } else {
        Err(InvalidNodeName(name.to_owned()))
    }
}

/// The identity of node `name`'s agent (the name must be valid).
pub fn node_identity(td: &TrustDomain, name: &str) -> Result<SpiffeId, InvalidNodeName> {
    validate_node_name(name)?;
    SpiffeId::from_path(td, &format!("{NODE_PATH_PREFIX}{name}"))
        .map_err(|_| InvalidNodeName(name.to_owned()))
}

/// The node name of a node-agent identity in trust domain `td`, or `None` when `id` is not one.
pub fn node_name_of<'a>(id: &'a SpiffeId, td: &TrustDomain) -> Option<&'a str> {
    if !id.is_member_of(td) {
        return None;
    }
    let name = id.path().strip_prefix(NODE_PATH_PREFIX)?;
    validate_node_name(name).ok().map(|()| name)
}

/// True for identities under `/citadel/`, which only Citadel itself hands out.
pub fn is_reserved(id: &SpiffeId) -> bool {
    id.path().starts_with(RESERVED_PATH_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_lowercase_dns_like() {
        for good in ["a", "node-1", "ip-10-0-0-1.eu-west-1.compute.internal", "0"] {
            validate_node_name(good).unwrap();
        }
        validate_node_name(&"a".repeat(253)).unwrap();
        for bad in [
            "",
            "Node",
            "-a",
            "a-",
            ".a",
            "a.",
            "a_b",
            "a/b",
            "a b",
            "ä",
            &"a".repeat(254),
        ] {
            assert!(validate_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn node_identity_round_trips_through_node_name_of() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = node_identity(&td, "node-a").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/citadel/node/node-a");
        assert_eq!(node_name_of(&id, &td), Some("node-a"));
    }

    #[test]
    fn only_node_paths_of_our_trust_domain_name_a_node() {
        let td = TrustDomain::new("cluster.local").unwrap();
        for other in [
            "spiffe://other.td/citadel/node/node-a",
            "spiffe://cluster.local/ns/citadel/sa/node-a",
            "spiffe://cluster.local/citadel/node/node-a/extra",
            "spiffe://cluster.local/citadel/node/Node-A",
            "spiffe://cluster.local/citadel/nodes/node-a",
        ] {
            let id = SpiffeId::parse(other).unwrap();
            assert_eq!(node_name_of(&id, &td), None, "{other}");
        }
    }

    #[test]
    fn citadel_paths_are_reserved() {
        let reserved = SpiffeId::parse("spiffe://td/citadel/node/a").unwrap();
        let workload = SpiffeId::parse("spiffe://td/ns/citadel/sa/a").unwrap();
        assert!(is_reserved(&reserved));
        assert!(!is_reserved(&workload));
    }
}
