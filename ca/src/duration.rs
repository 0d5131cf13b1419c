//! Human durations on the command line: `90s`, `30m`, `24h`, `90d`, `10y`.

/// Parses `<number><unit>` (units s, m, h, d, y = 365 d) into seconds.
pub fn parse_duration_secs(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} needs a unit: s, m, h, d or y (e.g. 24h)"))?;
    let (digits, unit) = s.split_at(split);
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("duration {s:?} must start with a whole number"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "y" => 365 * 86_400,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {s:?}; use s, m, h, d or y"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("30m"), Ok(1800));
        assert_eq!(parse_duration_secs("24h"), Ok(86_400));
        assert_eq!(parse_duration_secs("90d"), Ok(90 * 86_400));
        assert_eq!(parse_duration_secs("10y"), Ok(3650 * 86_400));
    }

    #[test]
    fn rejects_missing_or_unknown_unit_and_garbage() {
        for bad in ["", "24", "h", "1w", "-5s", "1.5h", "99999999999999999999s"] {
            assert!(parse_duration_secs(bad).is_err(), "{bad}");
        }
    }
}
