//! IP ranges (`--mesh-cidr`, the iptables include/exclude lists).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 prefix such as `10.244.0.0/16` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

/// A range that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP range (expected ADDRESS/PREFIX_LENGTH, e.g. 10.244.0.0/16)")]
pub struct CidrError(pub String);

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_owned());
        let (a, l) = s.split_once('/').ok_or_else(err)?;
        let addr: IpAddr = a.parse().map_err(|_| err())?;
        let len: u8 = l.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(err());
        }
        Ok(Cidr { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask_bits(bits: u128, width: u32, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        let keep = u32::from(len).min(width);
        let drop = width - keep;
        (bits >> drop) << drop
    }
}

impl Cidr {
    /// Whether `ip` is in the range (an IPv4 range never holds an IPv6 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_bits(u32::from(net).into(), 32, self.len)
                    == mask_bits(u32::from(ip).into(), 32, self.len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_bits(u128::from(net), 128, self.len)
                    == mask_bits(u128::from(ip), 128, self.len)
            }
            _ => false,
        }
    }

    /// Whether the range is IPv4.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_by_prefix_and_family() {
        let c: Cidr = "10.244.0.0/16".parse().unwrap();
        assert!(c.contains("10.244.9.9".parse().unwrap()));
        assert!(!c.contains("10.245.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        let host: Cidr = "10.0.0.5/32".parse().unwrap();
        assert!(host.contains("10.0.0.5".parse().unwrap()));
        assert!(!host.contains("10.0.0.6".parse().unwrap()));
        assert_eq!(c.to_string(), "10.244.0.0/16");
    }

    #[test]
    fn rejects_ranges_that_do_not_parse() {
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "::/129", "10.0.0.0/-1"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
