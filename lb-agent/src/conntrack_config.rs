//! Connection-tracking timeouts as kube-proxy takes them
//! (`--conntrack-tcp-timeout-established` and friends, or the `conntrack`
//! section of a KubeProxyConfiguration), with Go's duration syntax
//! (`24h0m0s`, `1m30s`, `500ms`) since that is what users copy.

use std::time::Duration;

/// How long an idle conntrack entry lives, per kind of flow. The defaults
/// are kube-proxy's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    /// An established TCP connection (`--conntrack-tcp-timeout-established`).
    pub tcp_established: Duration,
    /// A TCP connection in CLOSE_WAIT (`--conntrack-tcp-timeout-close-wait`).
    pub tcp_close_wait: Duration,
    /// A UDP flow seen in one direction only (`--conntrack-udp-timeout`).
    pub udp: Duration,
    /// A UDP flow with replies, a "stream" (`--conntrack-udp-timeout-stream`).
    pub udp_stream: Duration,
}

impl Default for ConntrackTimeouts {
    fn default() -> Self {
        ConntrackTimeouts {
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_close_wait: Duration::from_secs(3600),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
        }
    }
}

/// Parses a Go duration (`time.ParseDuration`): an optional sign, then one
/// or more decimal numbers with a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`,
/// `h`), e.g. `24h0m0s`, `1.5h`, `500ms`; a bare `0` is zero. Negative
/// durations are refused (no timeout is negative). The error says what is
/// wrong; callers prefix the flag or field.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let original = text;
    let mut rest = text.trim();
    if let Some(stripped) = rest.strip_prefix('+') {
        rest = stripped;
    } else if rest.starts_with('-') {
        return Err(format!("{original:?} is negative"));
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(format!(
            "{original:?} is not a duration (like 24h0m0s, 30s, 500ms)"
        ));
    }
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            "" => {
                return Err(format!(
                    "{original:?}: {number:?} has no unit (ns, us, ms, s, m, h)"
                ));
            }
            other => return Err(format!("{original:?}: unknown unit {other:?}")),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(format!(
                "{original:?} is not a duration (like 24h0m0s, 30s, 500ms)"
            ));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole
                .parse()
                .map_err(|_| format!("{original:?}: {whole:?} is too large"))?
        };
        let mut nanos = whole
            .checked_mul(unit_nanos)
            .ok_or_else(|| format!("{original:?} is too large"))?;
        // Fractions as Go does: digits beyond the unit's resolution are cut.
        let mut scale = unit_nanos;
        for digit in fraction.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            nanos += u128::from(digit - b'0') * scale;
        }
        total_nanos = total_nanos
            .checked_add(nanos)
            .ok_or_else(|| format!("{original:?} is too large"))?;
        rest = after;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000)
        .map_err(|_| format!("{original:?} is too large"))?;
    // The remainder of a division by 10^9 fits a u32.
    let nanos = (total_nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Formats a duration as Go prints it (`24h0m0s`, `1m30s`, `500ms`), for
/// logs and `--help` defaults users recognise.
pub fn format_go_duration(duration: Duration) -> String {
    if duration.is_zero() {
        return "0s".to_owned();
    }
    let total = duration.as_nanos();
    if total < 1_000_000_000 {
        return if total.is_multiple_of(1_000_000) {
            format!("{}ms", total / 1_000_000)
        } else if total.is_multiple_of(1_000) {
            format!("{}µs", total / 1_000)
        } else {
            format!("{total}ns")
        };
    }
    let secs = duration.as_secs();
    let (hours, minutes, seconds) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let nanos = duration.subsec_nanos();
    let seconds = if nanos == 0 {
        format!("{seconds}s")
    } else {
        let fraction = format!("{nanos:09}");
        format!("{seconds}.{}s", fraction.trim_end_matches('0'))
    };
    match (hours, minutes) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_kube_proxys() {
        let d = ConntrackTimeouts::default();
        assert_eq!(format_go_duration(d.tcp_established), "24h0m0s");
        assert_eq!(format_go_duration(d.tcp_close_wait), "1h0m0s");
        assert_eq!(format_go_duration(d.udp), "30s");
        assert_eq!(format_go_duration(d.udp_stream), "2m0s");
    }

    #[test]
    fn go_durations_parse() {
        for (text, want) in [
            ("24h0m0s", Duration::from_secs(86_400)),
            ("1h0m0s", Duration::from_secs(3_600)),
            ("30s", Duration::from_secs(30)),
            ("2m0s", Duration::from_secs(120)),
            ("1m30s", Duration::from_secs(90)),
            ("500ms", Duration::from_millis(500)),
            ("1.5h", Duration::from_secs(5_400)),
            (".5s", Duration::from_millis(500)),
            ("1h1m1s1ms1us1ns", Duration::new(3_661, 1_001_001)),
            ("10µs", Duration::from_micros(10)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("+5s", Duration::from_secs(5)),
        ] {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_durations_say_why() {
        for (text, needle) in [
            ("", "not a duration"),
            ("30", "has no unit"),
            ("5d", "unknown unit \"d\""),
            ("-1s", "negative"),
            ("1..5s", "not a duration"),
            ("s", "not a duration"),
            ("99999999999999999999999h", "too large"),
        ] {
            let error = parse_go_duration(text).expect_err(text);
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn formatting_round_trips() {
        for text in [
            "24h0m0s", "1h0m0s", "30s", "2m0s", "1m30s", "500ms", "1.5s", "0s",
        ] {
            let parsed = parse_go_duration(text).expect(text);
            assert_eq!(format_go_duration(parsed), text);
        }
    }
}
