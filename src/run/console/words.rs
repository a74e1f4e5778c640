//! Numbers and durations in plain words, as the console shows them.

use std::time::Duration;

/// `41200` → "41,200".
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "3 h 12 min", "45 s", "2 d 4 h": the two largest units.
pub fn span(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match () {
        _ if days > 0 && hours > 0 => format!("{days} d {hours} h"),
        _ if days > 0 => format!("{days} d"),
        _ if hours > 0 && mins > 0 => format!("{hours} h {mins} min"),
        _ if hours > 0 => format!("{hours} h"),
        _ if mins > 0 => format!("{mins} min"),
        _ => format!("{secs} s"),
    }
}

/// A byte count with a binary unit: "812 KiB", "1.4 GiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v >= 10.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_words() {
        assert_eq!(thousands(41200), "41,200");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(-1234567), "-1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(
            span(Duration::from_secs(3 * 3600 + 12 * 60 + 5)),
            "3 h 12 min"
        );
        assert_eq!(span(Duration::from_secs(45)), "45 s");
        assert_eq!(span(Duration::from_secs(9 * 86400 + 3600)), "9 d 1 h");
        assert_eq!(span(Duration::from_secs(7200)), "2 h");
        assert_eq!(bytes(812 * 1024), "812 KiB");
        assert_eq!(bytes(1536 * 1024 * 1024), "1.5 GiB");
        assert_eq!(bytes(100), "100 B");
    }
}
