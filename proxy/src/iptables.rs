//! `citadel-proxy iptables`: the nat rules that send a pod's TCP through the
//! proxy's capture listeners, in chains of our own (`CITADEL_*`), as Istio's
//! init container does (`wire-facts.md` §8.1). [`rules`] is pure: it writes the
//! `iptables-restore` input; [`apply`] and [`clean`] run the commands.
//!
//! Inbound (`PREROUTING`): every TCP port (or the `--include-inbound-ports`)
//! is redirected to the inbound capture port, except the capture ports, the
//! admin port and `--exclude-inbound-ports`.
//!
//! Outbound (`OUTPUT`), in order:
//! 1. the proxy's connections to the application (source `127.0.0.6`/`::6` on
//!    `lo`) return;
//! 2. everything the proxy's uid (and `--proxy-gid`) sends returns, so its own
//!    upstream connections are never captured again;
//! 3. loopback traffic and `127.0.0.1`/`::1` return;
//! 4. `--exclude-outbound-ports` and `--exclude-outbound-cidrs` return;
//! 5. the rest (or only `--include-outbound-cidrs`) goes to the outbound capture port.

use std::fmt::Write as _;
use std::process::{Command, Stdio};

use crate::cidr::Cidr;

/// The inbound chain, jumped to from `PREROUTING`.
pub const INBOUND: &str = "CITADEL_INBOUND";
/// Redirects to the inbound capture port.
pub const IN_REDIRECT: &str = "CITADEL_IN_REDIRECT";
/// The outbound chain, jumped to from `OUTPUT`.
pub const OUTPUT: &str = "CITADEL_OUTPUT";
/// Redirects to the outbound capture port.
pub const REDIRECT: &str = "CITADEL_REDIRECT";

/// Our chains, and the built-in chain jumping to each entry chain.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND), ("OUTPUT", OUTPUT)];
const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT];

/// `*` or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Include<T> {
    /// Everything.
    All,
    /// Only these.
    Only(Vec<T>),
}

/// What to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    /// The inbound capture port (15006).
    pub inbound_port: u16,
    /// The outbound capture port (15001).
    pub outbound_port: u16,
    /// The uid the proxy runs as: its traffic is never captured.
    pub proxy_uid: u32,
    /// The gid likewise, when given.
    pub proxy_gid: Option<u32>,
    /// The proxy's admin port: never captured inbound.
    pub admin_port: u16,
    /// Inbound ports to capture.
    pub include_inbound_ports: Include<u16>,
    /// Inbound ports never captured.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destinations to capture.
    pub include_outbound_cidrs: Include<Cidr>,
    /// Outbound destinations never captured.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Outbound destination ports never captured.
    pub exclude_outbound_ports: Vec<u16>,
}

impl RuleSpec {
    /// Istio's defaults with the given proxy uid: capture ports 15006/15001,
    /// admin 15021, every port and destination captured.
    pub fn new(proxy_uid: u32) -> Self {
        RuleSpec {
            inbound_port: 15006,
            outbound_port: 15001,
            proxy_uid,
            proxy_gid: None,
            admin_port: 15021,
            include_inbound_ports: Include::All,
            exclude_inbound_ports: Vec::new(),
            include_outbound_cidrs: Include::All,
            exclude_outbound_cidrs: Vec::new(),
            exclude_outbound_ports: Vec::new(),
        }
    }
}

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    /// The application source (`127.0.0.6`) and localhost, as host prefixes.
    fn loopbacks(self) -> (&'static str, &'static str) {
        match self {
            Family::V4 => ("127.0.0.6/32", "127.0.0.1/32"),
            Family::V6 => ("::6/128", "::1/128"),
        }
    }
    fn holds(self, c: &Cidr) -> bool {
        c.is_ipv4() == (self == Family::V4)
    }
}

/// The `iptables-restore --noflush` input for `family`: our four chains
/// (declaring them empties them) and the two jumps into them.
pub fn rules(spec: &RuleSpec, family: Family) -> String {
    let mut r = String::from("*nat\n");
    for c in CHAINS {
        let _ = writeln!(r, ":{c} - [0:0]");
    }
    let _ = writeln!(
        r,
        "-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        spec.inbound_port
    );
    let _ = writeln!(
        r,
        "-A {REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        spec.outbound_port
    );

    let mut never_in = vec![spec.inbound_port, spec.outbound_port, spec.admin_port];
    never_in.extend(&spec.exclude_inbound_ports);
    never_in.dedup();
    for p in &never_in {
        let _ = writeln!(r, "-A {INBOUND} -p tcp --dport {p} -j RETURN");
    }
    match &spec.include_inbound_ports {
        Include::All => {
            let _ = writeln!(r, "-A {INBOUND} -p tcp -j {IN_REDIRECT}");
        }
        Include::Only(ports) => {
            for p in ports {
                let _ = writeln!(r, "-A {INBOUND} -p tcp --dport {p} -j {IN_REDIRECT}");
            }
        }
    }

    let (app_source, localhost) = family.loopbacks();
    let _ = writeln!(r, "-A {OUTPUT} -o lo -s {app_source} -j RETURN");
    let _ = writeln!(
        r,
        "-A {OUTPUT} -m owner --uid-owner {} -j RETURN",
        spec.proxy_uid
    );
    if let Some(gid) = spec.proxy_gid {
        let _ = writeln!(r, "-A {OUTPUT} -m owner --gid-owner {gid} -j RETURN");
    }
    let _ = writeln!(r, "-A {OUTPUT} -o lo -j RETURN");
    let _ = writeln!(r, "-A {OUTPUT} -d {localhost} -j RETURN");
    for p in &spec.exclude_outbound_ports {
        let _ = writeln!(r, "-A {OUTPUT} -p tcp --dport {p} -j RETURN");
    }
    for c in spec
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| family.holds(c))
    {
        let _ = writeln!(r, "-A {OUTPUT} -d {c} -j RETURN");
    }
    match &spec.include_outbound_cidrs {
        Include::All => {
            let _ = writeln!(r, "-A {OUTPUT} -p tcp -j {REDIRECT}");
        }
        Include::Only(cidrs) => {
            for c in cidrs.iter().filter(|c| family.holds(c)) {
                let _ = writeln!(r, "-A {OUTPUT} -d {c} -p tcp -j {REDIRECT}");
            }
        }
    }
    for (builtin, chain) in JUMPS {
        let _ = writeln!(r, "-A {builtin} -p tcp -j {chain}");
    }
    r.push_str("COMMIT\n");
    r
}

/// A command that failed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// It could not be run.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("{program} failed: {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// What it said.
        stderr: String,
    },
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), IptablesError> {
    use std::io::Write as _;
    let spawn = |source| IptablesError::Spawn {
        program: program.to_owned(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IptablesError::Failed {
            program: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Removes our jumps and chains from the nat table of `family`; what is not
/// there is skipped, so cleaning twice is cleaning once.
pub fn clean(family: Family) -> Result<(), IptablesError> {
    let ipt = family.iptables();
    for (builtin, chain) in JUMPS {
        // A jump added more than once (by another tool) goes too.
        for _ in 0..64 {
            if run(
                ipt,
                &["-t", "nat", "-D", builtin, "-p", "tcp", "-j", chain],
                None,
            )
            .is_err()
            {
                break;
            }
        }
    }
    for chain in CHAINS {
        let _ = run(ipt, &["-t", "nat", "-F", chain], None);
    }
    for chain in CHAINS {
        let _ = run(ipt, &["-t", "nat", "-X", chain], None);
    }
    Ok(())
}

/// Cleans, then installs [`rules`] for `family`: applying twice leaves the
/// same rules as applying once. For IPv6, `::6` is put on `lo` first so the
/// proxy can connect to the application from it.
pub fn apply(spec: &RuleSpec, family: Family) -> Result<(), IptablesError> {
    clean(family)?;
    if family == Family::V6 {
        run(
            "ip",
            &["-6", "addr", "replace", "::6/128", "dev", "lo"],
            None,
        )?;
    }
    run(family.restore(), &["--noflush"], Some(&rules(spec, family)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(rules: &str, needle: &str) -> usize {
        rules
            .lines()
            .position(|l| l == needle)
            .unwrap_or_else(|| panic!("no {needle:?} in\n{rules}"))
    }

    #[test]
    fn defaults_capture_everything_but_the_proxy_itself() {
        let r = rules(&RuleSpec::new(1337), Family::V4);
        for line in [
            "-A CITADEL_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A CITADEL_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A CITADEL_INBOUND -p tcp --dport 15006 -j RETURN",
            "-A CITADEL_INBOUND -p tcp --dport 15001 -j RETURN",
            "-A CITADEL_INBOUND -p tcp --dport 15021 -j RETURN",
            "-A CITADEL_INBOUND -p tcp -j CITADEL_IN_REDIRECT",
            "-A PREROUTING -p tcp -j CITADEL_INBOUND",
            "-A OUTPUT -p tcp -j CITADEL_OUTPUT",
        ] {
            position(&r, line);
        }
        assert!(r.starts_with("*nat\n") && r.ends_with("COMMIT\n"));
    }

    #[test]
    fn rejects_redirect_loops_the_proxy_and_its_app_source_return_before_any_redirect() {
        let mut spec = RuleSpec::new(1337);
        spec.proxy_gid = Some(1337);
        for (family, source) in [(Family::V4, "127.0.0.6/32"), (Family::V6, "::6/128")] {
            let r = rules(&spec, family);
            let redirect = position(&r, "-A CITADEL_OUTPUT -p tcp -j CITADEL_REDIRECT");
            for returns in [
                format!("-A CITADEL_OUTPUT -o lo -s {source} -j RETURN"),
                "-A CITADEL_OUTPUT -m owner --uid-owner 1337 -j RETURN".to_owned(),
                "-A CITADEL_OUTPUT -m owner --gid-owner 1337 -j RETURN".to_owned(),
                "-A CITADEL_OUTPUT -o lo -j RETURN".to_owned(),
            ] {
                assert!(position(&r, &returns) < redirect, "{returns}\n{r}");
            }
            // The capture ports themselves are never captured inbound.
            let in_redirect = position(&r, "-A CITADEL_INBOUND -p tcp -j CITADEL_IN_REDIRECT");
            assert!(
                position(&r, "-A CITADEL_INBOUND -p tcp --dport 15006 -j RETURN") < in_redirect
            );
        }
    }

    #[test]
    fn include_and_exclude_lists_like_istio() {
        let mut spec = RuleSpec::new(7);
        spec.include_inbound_ports = Include::Only(vec![8080, 9090]);
        spec.exclude_inbound_ports = vec![22];
        spec.include_outbound_cidrs = Include::Only(vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]);
        spec.exclude_outbound_cidrs = vec!["10.244.9.0/24".parse().unwrap()];
        spec.exclude_outbound_ports = vec![5432];
        let r = rules(&spec, Family::V4);
        position(
            &r,
            "-A CITADEL_INBOUND -p tcp --dport 8080 -j CITADEL_IN_REDIRECT",
        );
        position(
            &r,
            "-A CITADEL_INBOUND -p tcp --dport 9090 -j CITADEL_IN_REDIRECT",
        );
        assert!(!r.contains("-A CITADEL_INBOUND -p tcp -j CITADEL_IN_REDIRECT"));
        position(&r, "-A CITADEL_INBOUND -p tcp --dport 22 -j RETURN");
        let excluded = position(&r, "-A CITADEL_OUTPUT -d 10.244.9.0/24 -j RETURN");
        let included = position(
            &r,
            "-A CITADEL_OUTPUT -d 10.244.0.0/16 -p tcp -j CITADEL_REDIRECT",
        );
        assert!(excluded < included);
        position(&r, "-A CITADEL_OUTPUT -p tcp --dport 5432 -j RETURN");
        assert!(!r.contains("fd00::"), "an IPv6 range in IPv4 rules:\n{r}");
        let r6 = rules(&spec, Family::V6);
        position(
            &r6,
            "-A CITADEL_OUTPUT -d fd00::/8 -p tcp -j CITADEL_REDIRECT",
        );
        assert!(!r6.contains("10.244."));
    }
}
