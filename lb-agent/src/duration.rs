//! Durations as kube-proxy's flags and configuration write them (Go's
//! `time.ParseDuration`): `24h0m0s`, `30s`, `1m30s`, `500ms`.

use std::time::Duration;

/// A duration that is not in Go's format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a duration (like 24h0m0s, 30s, 500ms)")]
pub struct BadDuration(pub String);

/// Parses a Go duration: a sequence of decimal numbers with a unit each
/// (`h`, `m`, `s`, `ms`, `us`/`µs`, `ns`); `0` alone is zero. Negative
/// durations are refused.
pub fn parse_go_duration(text: &str) -> Result<Duration, BadDuration> {
    let bad = || BadDuration(text.to_string());
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, tail) = rest.split_at(number_end);
        let value: f64 = number.parse().map_err(|_| bad())?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kube_proxys_spellings() {
        let secs = |s: &str| parse_go_duration(s).map(|d| d.as_secs_f64());
        assert_eq!(secs("24h0m0s"), Ok(86400.0));
        assert_eq!(secs("1h0m0s"), Ok(3600.0));
        assert_eq!(secs("30s"), Ok(30.0));
        assert_eq!(secs("2m0s"), Ok(120.0));
        assert_eq!(secs("1m30s"), Ok(90.0));
        assert_eq!(secs("500ms"), Ok(0.5));
        assert_eq!(secs("1.5h"), Ok(5400.0));
        assert_eq!(secs("0"), Ok(0.0));
    }

    #[test]
    fn refuses_what_go_refuses() {
        for bad in ["", "30", "s", "-5s", "5x", "1h-2m", "1..5s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} accepted");
        }
    }
}
