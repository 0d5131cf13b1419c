//! Peer values in log lines.
//!
//! A value a peer chose (a CSR's SANs, gRPC metadata, an HTTP path or header, a
//! token claim, an SDS nonce) must not be able to forge a log line: a newline
//! would start a fake record, an ANSI escape would repaint the operator's
//! terminal, a `"` or ` key=value` would fake a field. Every such value is
//! logged through [`Escaped`] (`field = %Escaped(value)`).
//!
//! Why a helper and not `?` (Debug) formatting: Debug quotes every value, so
//! the many ordinary ones (SPIFFE IDs, paths) would read `"spiffe://…"` in text
//! logs and `"\"spiffe://…\""` in JSON logs, and a value of a type whose Debug
//! is derived would print its struct fields. [`Escaped`] leaves plain values as
//! they are and quotes only values that could be mistaken for more than one
//! field (logfmt's rule), so a line stays one record with unambiguous fields in
//! the text format, and JSON output stays readable.

use std::fmt::{self, Display, Write};

/// Displays a value with every character that could forge or garble a log line
/// escaped: control characters (`\n`, `\r`, `\t`, ESC, C1 controls), Unicode line
/// and paragraph separators and bidirectional overrides as `\u{..}`, and `\`
/// and `"` with a backslash. The result is wrapped in `"` when it is empty or
/// contains whitespace (a newline included), `=` or `"`, so it reads as one
/// field value.
///
/// ```
/// use citadel_identity::log::Escaped;
/// assert_eq!(Escaped("spiffe://td/ns/a/sa/b").to_string(), "spiffe://td/ns/a/sa/b");
/// assert_eq!(Escaped("a\u{1b}[31m").to_string(), r"a\u{1b}[31m");
/// assert_eq!(Escaped("a\nb").to_string(), r#""a\nb""#);
/// assert_eq!(Escaped("x y=1").to_string(), r#""x y=1""#);
/// ```
#[derive(Clone, Copy)]
pub struct Escaped<T>(pub T);

impl<T: Display> Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.to_string();
        let quote = text.is_empty()
            || text
                .chars()
                .any(|c| c.is_whitespace() || c == '=' || c == '"');
        if quote {
            f.write_char('"')?;
        }
        for c in text.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                c => f.write_char(c)?,
            }
        }
        if quote {
            f.write_char('"')?;
        }
        Ok(())
    }
}

impl<T: Display> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Display::fmt(self, f)
    }
}

/// Characters that are invisible, move the cursor or reorder text.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            // Line and paragraph separators: some viewers break lines on them.
            '\u{2028}' | '\u{2029}'
            // Bidirectional embeddings, overrides and isolates ("Trojan Source").
            | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
            // Zero-width characters and the byte-order mark.
            | '\u{200b}'..='\u{200d}' | '\u{2060}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &str) -> String {
        Escaped(s).to_string()
    }

    #[test]
    fn peer_value_with_newline_cannot_forge_a_log_line() {
        let forged = "spiffe://td/ns/a/sa/b\n2026-01-01T00:00:00Z  INFO certificate issued spiffe_id=spiffe://td/ns/admin/sa/root";
        let out = esc(forged);
        assert!(!out.contains('\n'), "{out}");
        assert!(!out.contains('\r'), "{out}");
        assert_eq!(
            out,
            "\"spiffe://td/ns/a/sa/b\\n2026-01-01T00:00:00Z  INFO certificate issued spiffe_id=spiffe://td/ns/admin/sa/root\""
        );
        assert_eq!(esc("a\r\nb"), "\"a\\r\\nb\"");
    }

    #[test]
    fn peer_value_with_ansi_escape_cannot_repaint_the_terminal() {
        assert_eq!(esc("\u{1b}[2J\u{1b}[1;31mok"), "\\u{1b}[2J\\u{1b}[1;31mok");
        assert_eq!(esc("\u{9b}31m"), "\\u{9b}31m"); // C1 CSI
        assert_eq!(esc("\u{7f}"), "\\u{7f}");
        assert_eq!(esc("nul\0"), "nul\\u{0}");
    }

    #[test]
    fn peer_value_with_quotes_or_fields_stays_one_field_value() {
        assert_eq!(esc(r#"x" admin="true"#), r#""x\" admin=\"true""#);
        assert_eq!(esc("a=b"), "\"a=b\"");
        assert_eq!(esc("two words"), "\"two words\"");
        assert_eq!(esc(""), "\"\"");
        assert_eq!(esc(r"back\slash"), r"back\\slash");
    }

    #[test]
    fn peer_value_with_invisible_or_reordering_characters_is_escaped() {
        assert_eq!(esc("a\u{202e}b"), "a\\u{202e}b");
        assert_eq!(esc("a\u{2028}b"), "\"a\\u{2028}b\"");
        assert_eq!(esc("a\u{200b}b"), "a\\u{200b}b");
    }

    #[test]
    fn plain_values_are_logged_as_they_are() {
        for plain in [
            "spiffe://cluster.local/ns/default/sa/web",
            "/api/v1/items?x=1&y=2",
            "Kubernetes",
            "GET",
            "héllo-ünïcode",
        ] {
            let expected = if plain.contains('=') {
                format!("\"{plain}\"")
            } else {
                plain.to_owned()
            };
            assert_eq!(esc(plain), expected);
        }
    }

    #[test]
    fn display_values_are_escaped_too() {
        let err = std::io::Error::other("bad\nthing");
        assert_eq!(Escaped(&err).to_string(), "\"bad\\nthing\"");
        assert_eq!(format!("{:?}", Escaped("a\u{1b}b")), "a\\u{1b}b");
    }
}
