//! Durations as the catalogue writes them: `"90s"`, `"90m"`, `"6h"`, `"3d"`.
//!
//! Deliberately small and strict (an integer, then one unit, nothing else), because
//! a catalogue is written by hand and a typo such as `"6 h"`, `"1.5h"` or `"6hr"` must be
//! refused rather than guessed at. `humantime` is not a dependency of this crate, and the
//! grammar is too small to need it.

/// Why a duration text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The text had no leading digits (empty, a sign, a space, a fraction…).
    #[error("duration {0:?} must be a whole number followed by s, m, h or d")]
    Malformed(String),
    /// The unit after the number was not one of `ms`, `s`, `m`, `h`, `d`.
    #[error("duration {0:?} has unknown unit (expected ms, s, m, h or d)")]
    UnknownUnit(String),
    /// The duration was zero.
    #[error("duration {0:?} must be positive")]
    Zero(String),
    /// The duration does not fit in a `u64` of milliseconds.
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

/// Parses `"<digits><unit>"` with unit `ms`, `s`, `m`, `h` or `d` into milliseconds.
///
/// Refuses zero, fractions, signs, whitespace, compound forms (`"1h30m"`) and anything that
/// overflows a `u64` of milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, DurationError> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(DurationError::Malformed(text.to_owned()));
    }
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => crate::model::HOUR_MS,
        "d" => crate::model::DAY_MS,
        u if !u.is_empty() && u.bytes().all(|b| b.is_ascii_alphabetic()) => {
            return Err(DurationError::UnknownUnit(text.to_owned()));
        }
        // Nothing after the number, or more than letters: a space, a fraction, "1h30m".
        _ => return Err(DurationError::Malformed(text.to_owned())),
    };
    // Only ASCII digits are left, so a parse failure can only be overflow.
    let count: u64 = digits
        .parse()
        .map_err(|_| DurationError::Overflow(text.to_owned()))?;
    if count == 0 {
        return Err(DurationError::Zero(text.to_owned()));
    }
    count
        .checked_mul(unit_ms)
        .ok_or_else(|| DurationError::Overflow(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DAY_MS, HOUR_MS};

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("90m"), Ok(90 * 60_000));
        assert_eq!(parse_duration_ms("6h"), Ok(6 * HOUR_MS));
        assert_eq!(parse_duration_ms("3d"), Ok(3 * DAY_MS));
        assert_eq!(parse_duration_ms("007m"), Ok(7 * 60_000));
    }

    #[test]
    fn zero_is_refused() {
        assert_eq!(
            parse_duration_ms("0h"),
            Err(DurationError::Zero("0h".into()))
        );
        assert!(matches!(
            parse_duration_ms("000s"),
            Err(DurationError::Zero(_))
        ));
    }

    #[test]
    fn unknown_units_are_refused() {
        assert_eq!(
            parse_duration_ms("5x"),
            Err(DurationError::UnknownUnit("5x".into()))
        );
        for text in ["6hr", "6H", "5us", "6sec"] {
            assert!(
                matches!(parse_duration_ms(text), Err(DurationError::UnknownUnit(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn malformed_text_is_refused() {
        for text in [
            "",
            "6",
            "h",
            " 6h",
            "6 h",
            "6h ",
            "-6h",
            "+6h",
            "1.5h",
            "1h30m",
            "six hours",
            "６h",
        ] {
            assert!(
                matches!(parse_duration_ms(text), Err(DurationError::Malformed(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn overflow_is_refused() {
        // u64::MAX ms is about 213 503 982 334 days.
        assert!(parse_duration_ms("213503982334d").is_ok());
        for text in [
            "213503982335d",
            "18446744073709551616s",
            "99999999999999999999999d",
        ] {
            assert!(
                matches!(parse_duration_ms(text), Err(DurationError::Overflow(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn errors_name_the_text() {
        let err = parse_duration_ms("5x").unwrap_err().to_string();
        assert!(err.contains("\"5x\""), "{err}");
        assert!(err.contains("unknown unit"), "{err}");
    }
}
