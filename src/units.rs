//! Byte sizes and durations as operators write them in the configuration: `"10MiB"`, `"30s"`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes. Written as an integer (bytes) or a string with a unit:
/// B, KiB, MiB, GiB (powers of 1024) or kB, MB, GB (powers of 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

const SIZE_UNITS: &[(&str, u64)] = &[
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("kB", 1_000),
    ("B", 1),
];

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let hint =
            || format!("`{text}` is not a size; write a number with a unit, such as \"10MiB\", \"512KiB\" or \"1GB\"");
        let text_trim = text.trim();
        let digits_end = text_trim.find(|c: char| !c.is_ascii_digit()).unwrap_or(text_trim.len());
        let number: u64 = text_trim[..digits_end].parse().map_err(|_| hint())?;
        let unit = text_trim[digits_end..].trim();
        let multiplier = if unit.is_empty() {
            1
        } else {
            SIZE_UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, m)| *m)
                .ok_or_else(hint)?
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, m) in &SIZE_UNITS[..3] {
            if self.0 >= *m && self.0 % m == 0 {
                return write!(f, "{}{name}", self.0 / m);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"10MiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A span of time, written as a string with a unit: us, ms, s, m, h or d (`"300us"`, `"250ms"`,
/// `"30s"`, `"5d"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl Span {
    pub fn parse(text: &str) -> Result<Span, String> {
        let hint = || {
            format!(
                "`{text}` is not a duration; write a number with a unit, such as \"30s\", \"5m\", \"1h\" or \"250ms\""
            )
        };
        let t = text.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let number: u64 = t[..digits_end].parse().map_err(|_| hint())?;
        let micros = match t[digits_end..].trim() {
            "us" => Some(number),
            "ms" => number.checked_mul(1000),
            "s" => number.checked_mul(1_000_000),
            "m" => number.checked_mul(60_000_000),
            "h" => number.checked_mul(3_600_000_000),
            "d" => number.checked_mul(86_400_000_000),
            _ => return Err(hint()),
        };
        micros
            .map(|us| Span(Duration::from_micros(us)))
            .ok_or_else(|| format!("`{text}` is too long"))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0.as_micros();
        if us % 1000 != 0 {
            return write!(f, "{us}us");
        }
        let ms = us / 1000;
        if ms % 86_400_000 == 0 && ms > 0 {
            write!(f, "{}d", ms / 86_400_000)
        } else if ms % 3_600_000 == 0 && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms % 60_000 == 0 && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms % 1000 == 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Span, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, such as \"30s\" or \"5m\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Span, E> {
                Err(E::custom(format!(
                    "`{v}` has no unit; write \"{v}s\" for seconds or \"{v}ms\" for milliseconds"
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Span, E> {
                Span::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(ByteSize::parse("10MiB"), Ok(ByteSize(10 << 20)));
        assert_eq!(ByteSize::parse("10 MiB"), Ok(ByteSize(10 << 20)));
        assert_eq!(ByteSize::parse("1GB"), Ok(ByteSize(1_000_000_000)));
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert!(ByteSize::parse("10Mb").is_err());
        assert!(ByteSize::parse("lots").is_err());
        assert!(ByteSize::parse("99999999999GiB").is_err());
        assert_eq!(ByteSize(64 << 20).to_string(), "64MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn spans_parse_and_print() {
        assert_eq!(Span::parse("30s"), Ok(Span(Duration::from_secs(30))));
        assert_eq!(Span::parse("5m"), Ok(Span(Duration::from_secs(300))));
        assert_eq!(Span::parse("250ms"), Ok(Span(Duration::from_millis(250))));
        assert!(Span::parse("30").is_err());
        assert!(Span::parse("soon").is_err());
        assert_eq!(Span(Duration::from_secs(300)).to_string(), "5m");
        assert_eq!(Span::parse("5d"), Ok(Span(Duration::from_secs(5 * 86400))));
        assert_eq!(Span(Duration::from_secs(2 * 86400)).to_string(), "2d");
        assert_eq!(Span(Duration::from_millis(1500)).to_string(), "1500ms");
        assert_eq!(Span::parse("300us"), Ok(Span(Duration::from_micros(300))));
        assert_eq!(Span(Duration::from_micros(300)).to_string(), "300us");
        assert_eq!(Span(Duration::from_micros(2000)).to_string(), "2ms");
        assert!(Span::parse("300µs").is_err());
    }
}
