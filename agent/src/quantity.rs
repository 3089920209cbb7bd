//! Kubernetes resource quantities (`500m`, `1.5`, `128Mi`, `1G`, `2e3`) as numbers.
//!
//! k8s-openapi carries a `Quantity` as its text only (apimachinery's parser is Go); this is the
//! part of that grammar a pod's cpu and memory use: a decimal number, then a binary suffix
//! (Ki … Ei), a decimal one (n u m k M G T P E) or a decimal exponent (e3, E-2).

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{value:?} is not a quantity ({reason})")]
pub struct QuantityError {
    pub value: String,
    pub reason: &'static str,
}

/// The quantity's value, exact to 1e-9 (nanounits, rounded up), as apimachinery keeps it.
fn nano_units(text: &str) -> Result<u128, QuantityError> {
    let err = |reason| QuantityError {
        value: text.to_string(),
        reason,
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    if s.starts_with('-') {
        return Err(err("negative"));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(err("no number"));
    }
    // (multiplier as a power of 10 or of 2, in nanounits)
    let (ten_exp, two_exp): (i32, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        s if s.starts_with(['e', 'E']) => {
            (s[1..].parse::<i32>().map_err(|_| err("bad exponent"))?, 0)
        }
        _ => return Err(err("unknown suffix")),
    };
    if !(-9..=18).contains(&ten_exp) {
        return Err(err("exponent out of range"));
    }
    // number × 10^9 (nanounits) × 10^ten_exp × 2^two_exp, from the digits, exactly.
    let digits = format!("{whole}{fraction}");
    let mut value: u128 = 0;
    for d in digits.bytes() {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u128::from(d - b'0')))
            .ok_or(err("too large"))?;
    }
    let scale = 9 + ten_exp - i32::try_from(fraction.len()).map_err(|_| err("too long"))?;
    let pow10 = |e: u32| 10u128.checked_pow(e).ok_or(err("too large"));
    let value = if scale >= 0 {
        value
            .checked_mul(pow10(scale.unsigned_abs())?)
            .ok_or(err("too large"))?
    } else {
        value.div_ceil(pow10(scale.unsigned_abs())?)
    };
    value.checked_shl(two_exp).ok_or(err("too large"))
}

/// CPU in millicores, rounded up (`250m` → 250, `1.5` → 1500).
pub fn cpu_millis(text: &str) -> Result<u64, QuantityError> {
    let n = nano_units(text)?;
    u64::try_from(n.div_ceil(1_000_000)).map_err(|_| QuantityError {
        value: text.to_string(),
        reason: "too large",
    })
}

/// Memory in bytes, rounded up (`128Mi` → 134217728, `1G` → 10^9).
pub fn bytes(text: &str) -> Result<u64, QuantityError> {
    let n = nano_units(text)?;
    u64::try_from(n.div_ceil(1_000_000_000)).map_err(|_| QuantityError {
        value: text.to_string(),
        reason: "too large",
    })
}

/// Memory as people read it: `512Mi`, `1.5Gi`, `300k`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if b >= size {
            return if b.is_multiple_of(size) {
                format!("{}{unit}", b / size)
            } else {
                format!("{:.1}{unit}", b as f64 / size as f64)
            };
        }
    }
    format!("{b}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        assert_eq!(cpu_millis("250m"), Ok(250));
        assert_eq!(cpu_millis("1"), Ok(1000));
        assert_eq!(cpu_millis("1.5"), Ok(1500));
        assert_eq!(cpu_millis("0.0001"), Ok(1), "rounded up");
        assert_eq!(cpu_millis("100000u"), Ok(100));
        assert_eq!(cpu_millis("2e3"), Ok(2_000_000));
    }

    #[test]
    fn memory() {
        assert_eq!(bytes("128Mi"), Ok(128 << 20));
        assert_eq!(bytes("1G"), Ok(1_000_000_000));
        assert_eq!(bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(bytes("300k"), Ok(300_000));
        assert_eq!(bytes("1e3"), Ok(1000));
        assert_eq!(bytes("129M"), Ok(129_000_000));
        assert_eq!(bytes("1500m"), Ok(2), "millibytes round up");
    }

    #[test]
    fn bad_quantities_say_why() {
        for (text, reason) in [
            ("", "empty"),
            ("-1", "negative"),
            ("12Zi", "unknown suffix"),
            ("Mi", "no number"),
            ("1.2.3", "no number"),
            ("1e99", "exponent out of range"),
            ("99999999999999999999999999999999999999Ei", "too large"),
        ] {
            let e = bytes(text).unwrap_err();
            assert_eq!(e.reason, reason, "{text}");
            assert!(e.to_string().contains(&format!("{text:?}")));
        }
    }

    #[test]
    fn formatted() {
        assert_eq!(format_bytes(512 << 20), "512Mi");
        assert_eq!(format_bytes(3 << 29), "1.5Gi");
        assert_eq!(format_bytes(100), "100");
    }
}
