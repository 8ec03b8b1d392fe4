//! Sizes (`1MiB`, `512KiB`, `10GiB`, `4096`) and durations (`250ms`, `5s`, `2m`, `1h`) as operators
//! write them in the YAML. Parsing is pure and never panics; a bad value is an error that serde
//! turns into a message carrying the key path and line.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;

/// A byte count. A plain number is bytes; suffixes are binary (`KiB` = 1024 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

/// A rate in bytes per second: `16KiB/s`, `1MiB/s`, `100B/s`, or a plain number of bytes per
/// second. Units are binary, as for sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate(pub u64);

/// A duration with a unit suffix; a plain number is seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

/// Parse `123`, `123B`, `4KiB`, `1MiB`, `2GiB`, `1TiB` (also `KB`/`MB`/`GB` as binary units, as
/// nginx does, and lower case).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("invalid size {text:?}: expected a number with an optional unit B, KiB, MiB, GiB or TiB"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}: number too large"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// Parse `16KiB/s`, `1MiB/s`, `2GiB/s`, `100B/s` or a plain number (bytes per second).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let amount = match t.strip_suffix("/s") {
        Some(a) => a,
        None if t.chars().all(|c| c.is_ascii_digit()) => t,
        None => {
            return Err(format!(
                "invalid rate {text:?}: expected bytes per second such as 16KiB/s, 1MiB/s or a plain number"
            ))
        }
    };
    parse_size(amount).map_err(|e| format!("invalid rate {text:?}: {e}"))
}

/// Parse `500ms`, `5s`, `2m`, `1h`, `1d`; a plain number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "invalid duration {text:?}: expected a number with a unit ms, s, m, h or d"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: number too large"))?;
    let ms_per: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("invalid duration {text:?}: too large"))
}

/// A fraction between 0 and 1: `10%` or `0.1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fraction(pub f64);

/// Parse `10%`, `0.1`, `0` or `1` into a fraction of at most 1.
pub fn parse_fraction(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let (number, scale) = match t.strip_suffix('%') {
        Some(n) => (n.trim(), 100.0),
        None => (t, 1.0),
    };
    let value: f64 = number.parse().map_err(|_| {
        format!(
            "invalid fraction {text:?}: expected a percentage such as 10% or a number such as 0.1"
        )
    })?;
    let f = value / scale;
    if !(0.0..=1.0).contains(&f) {
        return Err(format!(
            "invalid fraction {text:?}: must be between 0 and 100%"
        ));
    }
    Ok(f)
}

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextOrInt("a fraction such as 10%", parse_fraction))
            .map(Fraction)
    }
}

/// Accepts a YAML integer or string and hands the text to `parse`.
struct TextOrInt<F>(&'static str, F);

impl<'de, T, F: Fn(&str) -> Result<T, String>> Visitor<'de> for TextOrInt<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.1)(&v.to_string()).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.1)(&v.to_string()).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.1)(&v.to_string()).map_err(E::custom)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.1)(v).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextOrInt("a size such as 1MiB", parse_size))
            .map(Size)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextOrInt("a rate such as 16KiB/s", parse_rate))
            .map(Rate)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextOrInt("a duration such as 5s", parse_duration))
            .map(Dur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fractions() {
        assert_eq!(parse_fraction("10%"), Ok(0.1));
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
        assert_eq!(parse_fraction("0"), Ok(0.0));
        assert_eq!(parse_fraction("100 %"), Ok(1.0));
        assert!(parse_fraction("150%").is_err());
        assert!(parse_fraction("-1").is_err());
        assert!(parse_fraction("ten").is_err());
        assert!(parse_fraction("NaN").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("256 KiB"), Ok(256 << 10));
        assert_eq!(parse_size("3b"), Ok(3));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("18446744073709551615d").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("16KiB/s"), Ok(16 << 10));
        assert_eq!(parse_rate("1MiB/s"), Ok(1 << 20));
        assert_eq!(parse_rate("2GiB/s"), Ok(2 << 30));
        assert_eq!(parse_rate("100B/s"), Ok(100));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert_eq!(parse_rate("0"), Ok(0));
        assert!(parse_rate("16KiB").is_err(), "a unit needs /s");
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("1XB/s").is_err());
        assert!(parse_rate("/s").is_err());
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,24}") {
            let _ = parse_rate(&s);
            let _ = parse_size(&s);
            let _ = parse_duration(&s);
        }
    }
}
