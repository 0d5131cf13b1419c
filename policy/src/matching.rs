//! Value matchers: Istio strings (`exact`, `prefix*`, `*suffix`, `*`), IP blocks,
//! ports and HTTP paths (including `{*}` / `{**}` templates).
//!
//! Each parser is shared by validation (which reports the error) and compilation.

use std::net::IpAddr;

/// An Istio string pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrMatch {
    /// `*`: any non-empty value.
    Present,
    /// A literal value.
    Exact(Box<str>),
    /// `abc*`: values starting with `abc`.
    Prefix(Box<str>),
    /// `*abc`: values ending with `abc`.
    Suffix(Box<str>),
}

impl StrMatch {
    /// Reads a pattern. `*` alone is presence; a leading `*` makes a suffix match
    /// (checked first, as Istio does), a trailing one a prefix match.
    pub fn parse(pattern: &str) -> Self {
        if pattern == "*" {
            Self::Present
        } else if let Some(s) = pattern.strip_prefix('*') {
            Self::Suffix(s.into())
        } else if let Some(p) = pattern.strip_suffix('*') {
            Self::Prefix(p.into())
        } else {
            Self::Exact(pattern.into())
        }
    }

    /// Case-sensitive match.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Present => !value.is_empty(),
            Self::Exact(e) => value == &**e,
            Self::Prefix(p) => value.starts_with(&**p),
            Self::Suffix(s) => value.ends_with(&**s),
        }
    }

    /// ASCII case-insensitive match (HTTP hosts).
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        let v = value.as_bytes();
        match self {
            Self::Present => !value.is_empty(),
            Self::Exact(e) => value.eq_ignore_ascii_case(e),
            Self::Prefix(p) => {
                v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            Self::Suffix(s) => {
                v.len() >= s.len() && v[v.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

/// An IP address or CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    addr: IpAddr,
    prefix: u8,
}

impl IpBlock {
    /// Reads `10.1.2.3`, `10.0.0.0/8`, `2001:db8::/32`, ...
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr_part, prefix_part) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_part
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_part {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => return Err(format!("{s:?} has an invalid prefix length (0..={max})")),
            },
        };
        Ok(Self {
            addr: addr.to_canonical(),
            prefix: if addr.to_canonical().is_ipv4() && max == 128 {
                prefix.saturating_sub(96)
            } else {
                prefix
            },
        })
    }

    /// True when `ip` lies in the block (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(u32::from(net)),
                u128::from(u32::from(ip)),
                32,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), 128, self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, width: u32, prefix: u8) -> bool {
    let shift = width - u32::from(prefix);
    if shift >= 128 {
        return true;
    }
    (a >> shift) == (b >> shift)
}

/// Reads a port string: a decimal number in `1..=65535`.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<i64>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        Ok(_) => Err(format!("port {s:?} out of range (1..=65535)")),
        Err(_) => Err(format!("port {s:?} is not a number")),
    }
}

/// A path pattern: an Istio string pattern or a URI template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// `exact`, `prefix*`, `*suffix` or `*`.
    Str(StrMatch),
    /// A template with `{*}` (one segment) and `{**}` (anything, last operator).
    Template(Template),
}

/// A compiled path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Tokens before a `{**}` (or all tokens when there is none).
    head: Box<[Token]>,
    /// Literal text after `{**}`, when the template has one.
    tail: Option<Box<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Lit(Box<str>),
    /// `{*}`: one or more characters other than `/`.
    Segment,
}

impl PathMatch {
    /// Reads a path pattern. A pattern containing `{*}` or `{**}` is a template and
    /// must follow the template rules; anything else is a string pattern.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if !pattern.contains("{*}") && !pattern.contains("{**}") {
            return Ok(Self::Str(StrMatch::parse(pattern)));
        }
        Template::parse(pattern).map(Self::Template)
    }

    /// Matches a request path; the query string and fragment are not part of it.
    pub fn matches(&self, path: &str) -> bool {
        let path = strip_query(path);
        match self {
            Self::Str(m) => m.matches(path),
            Self::Template(t) => t.matches(path),
        }
    }
}

/// The path without `?query` or `#fragment`.
pub fn strip_query(path: &str) -> &str {
    match path.find(['?', '#']) {
        Some(i) => &path[..i],
        None => path,
    }
}

impl Template {
    fn parse(pattern: &str) -> Result<Self, String> {
        let Some(body) = pattern.strip_prefix('/') else {
            return Err(format!("path template {pattern:?} must start with '/'"));
        };
        let mut head: Vec<Token> = vec![Token::Lit("/".into())];
        let mut tail: Option<String> = None;
        for (i, seg) in body.split('/').enumerate() {
            let sep = if i == 0 { "" } else { "/" };
            match seg {
                "{*}" | "{**}" if tail.is_some() => {
                    return Err(format!(
                        "path template {pattern:?}: {{**}} must be the last operator"
                    ));
                }
                "{*}" => {
                    push_lit(&mut head, sep);
                    head.push(Token::Segment);
                }
                "{**}" => {
                    push_lit(&mut head, sep);
                    tail = Some(String::new());
                }
                lit if lit.contains(['*', '{', '}']) => {
                    return Err(format!(
                        "path template {pattern:?}: segment {lit:?} mixes an operator with other characters \
                         (a segment is either literal text, {{*}} or {{**}})"
                    ));
                }
                lit => match tail.as_mut() {
                    Some(t) => {
                        t.push_str(sep);
                        t.push_str(lit);
                    }
                    None => {
                        push_lit(&mut head, sep);
                        push_lit(&mut head, lit);
                    }
                },
            }
        }
        Ok(Self {
            head: head.into_boxed_slice(),
            tail: tail.map(String::into_boxed_str),
        })
    }

    fn matches(&self, path: &str) -> bool {
        let mut rest = path;
        for token in self.head.iter() {
            match token {
                Token::Lit(l) => match rest.strip_prefix(&**l) {
                    Some(r) => rest = r,
                    None => return false,
                },
                Token::Segment => {
                    let n = rest.find('/').unwrap_or(rest.len());
                    if n == 0 {
                        return false;
                    }
                    rest = &rest[n..];
                }
            }
        }
        match &self.tail {
            None => rest.is_empty(),
            Some(t) => rest.ends_with(&**t),
        }
    }
}

fn push_lit(tokens: &mut Vec<Token>, s: &str) {
    if s.is_empty() {
        return;
    }
    if let Some(Token::Lit(prev)) = tokens.last_mut() {
        let mut joined = String::with_capacity(prev.len() + s.len());
        joined.push_str(prev);
        joined.push_str(s);
        *prev = joined.into_boxed_str();
    } else {
        tokens.push(Token::Lit(s.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_patterns_follow_istio_forms() {
        assert!(StrMatch::parse("abc").matches("abc"));
        assert!(!StrMatch::parse("abc").matches("abcd"));
        assert!(StrMatch::parse("abc*").matches("abc"));
        assert!(StrMatch::parse("abc*").matches("abcd"));
        assert!(StrMatch::parse("*abc").matches("xabc"));
        assert!(!StrMatch::parse("*abc").matches("abcx"));
        assert!(StrMatch::parse("*").matches("x"));
        assert!(!StrMatch::parse("*").matches(""));
        // A leading star wins: "*a*" is a suffix match for the literal "a*".
        assert_eq!(StrMatch::parse("*a*"), StrMatch::Suffix("a*".into()));
        // A star in the middle is literal.
        assert!(StrMatch::parse("a*b").matches("a*b"));
        assert!(!StrMatch::parse("a*b").matches("axb"));
    }

    #[test]
    fn host_matching_ignores_case() {
        assert!(StrMatch::parse("Example.COM").matches_ignore_case("example.com"));
        assert!(StrMatch::parse("*.Example.com").matches_ignore_case("a.EXAMPLE.com"));
        assert!(StrMatch::parse("API.*").matches_ignore_case("api.x"));
        assert!(!StrMatch::parse("api.*").matches_ignore_case("ap"));
    }

    #[test]
    fn ip_blocks_match_addresses_and_cidrs() {
        let b = IpBlock::parse("10.1.0.0/16").unwrap();
        assert!(b.contains("10.1.2.3".parse().unwrap()));
        assert!(!b.contains("10.2.0.1".parse().unwrap()));
        assert!(b.contains("::ffff:10.1.9.9".parse().unwrap()));
        let one = IpBlock::parse("192.0.2.7").unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let all = IpBlock::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        assert!(!all.contains("2001:db8::1".parse().unwrap()));
        let v6 = IpBlock::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
    }

    #[test]
    fn rejects_invalid_ip_blocks() {
        for bad in [
            "",
            "10.0.0",
            "10.0.0.0/33",
            "10.0.0.0/-1",
            "::/129",
            "host",
            "10.0.0.0/+8",
        ] {
            assert!(IpBlock::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_ports_out_of_range() {
        assert_eq!(parse_port("8080"), Ok(8080));
        assert!(parse_port("0").is_err());
        assert!(parse_port("65536").is_err());
        assert!(parse_port("-1").is_err());
        assert!(parse_port("http").is_err());
    }

    #[test]
    fn paths_ignore_the_query_string() {
        let p = PathMatch::parse("/api").unwrap();
        assert!(p.matches("/api?x=1"));
        assert!(p.matches("/api#frag"));
        assert!(!p.matches("/api/x"));
    }

    #[test]
    fn single_segment_template_matches_exactly_one_segment() {
        let t = PathMatch::parse("/foo/{*}").unwrap();
        assert!(t.matches("/foo/bar"));
        assert!(!t.matches("/foo/bar/baz"));
        assert!(!t.matches("/foo/"));
        assert!(!t.matches("/foo"));
        let mid = PathMatch::parse("/foo/{*}/bar").unwrap();
        assert!(mid.matches("/foo/x/bar"));
        assert!(!mid.matches("/foo/x/y/bar"));
    }

    #[test]
    fn multi_segment_template_matches_the_rest() {
        let t = PathMatch::parse("/foo/{**}").unwrap();
        assert!(t.matches("/foo/"));
        assert!(t.matches("/foo/a/b/c"));
        assert!(!t.matches("/foo"));
        assert!(!t.matches("/food/a"));
        let both = PathMatch::parse("/foo/{*}/bar/{**}").unwrap();
        assert!(both.matches("/foo/buzz/bar/"));
        assert!(both.matches("/foo/buzz/bar/baz"));
        assert!(!both.matches("/foo/buzz/baz/bar/"));
        let suffix = PathMatch::parse("/foo/{**}/end").unwrap();
        assert!(suffix.matches("/foo/a/b/end"));
        assert!(suffix.matches("/foo//end"));
        assert!(!suffix.matches("/foo/a/b/ends"));
    }

    #[test]
    fn rejects_malformed_path_templates() {
        for bad in [
            "/{**}/foo/{*}",
            "/foo/{*}.txt",
            "/*/baz/{*}",
            "/**/baz/{*}",
            "foo/{*}",
            "/{**}/{**}",
        ] {
            assert!(PathMatch::parse(bad).is_err(), "{bad}");
        }
    }
}
