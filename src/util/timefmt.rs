//! Times: snapshot ids, manifest timestamps and `--at` parsing.

use jiff::tz::TimeZone;
use jiff::{Timestamp, civil};

/// Seconds since the epoch and the RFC 3339 (UTC) form of now.
pub fn now() -> (i64, String) {
    let ts = Timestamp::now();
    (
        ts.as_second(),
        ts.round(jiff::Unit::Second)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| ts.to_string()),
    )
}

/// A new snapshot id: UTC time (sorts chronologically) plus a random suffix (unique).
pub fn new_snapshot_id(unix: i64) -> String {
    let ts = Timestamp::from_second(unix).unwrap_or(Timestamp::UNIX_EPOCH);
    let mut rnd = [0u8; 3];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut rnd);
    }
    format!("{}-{}", ts.strftime("%Y%m%dT%H%M%SZ"), hex::encode(rnd))
}

/// Parse a point in time: RFC 3339 with offset, or a local date/time ("2026-11-22 14:00",
/// "2026-11-22T14:00:05"), or a date (meaning the end of that day).
pub fn parse_point(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(ts) = s.parse::<Timestamp>() {
        return Some(ts.as_second());
    }
    let tz = TimeZone::system();
    if let Ok(dt) = s.parse::<civil::DateTime>() {
        return dt.to_zoned(tz).ok().map(|z| z.timestamp().as_second());
    }
    if let Ok(d) = s.parse::<civil::Date>() {
        let end = d.at(23, 59, 59, 0);
        return end.to_zoned(tz).ok().map(|z| z.timestamp().as_second());
    }
    None
}

/// Local time for display.
pub fn display(unix: i64) -> String {
    match Timestamp::from_second(unix) {
        Ok(ts) => ts
            .to_zoned(TimeZone::system())
            .strftime("%Y-%m-%d %H:%M:%S %Z")
            .to_string(),
        Err(_) => unix.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_points() {
        assert_eq!(parse_point("2026-11-22T10:00:00Z"), Some(1_795_341_600));
        assert!(parse_point("2026-11-22 10:00").is_some());
        assert!(parse_point("2026-11-22").is_some());
        assert_eq!(parse_point("yesterday-ish"), None);
        let id = new_snapshot_id(1_795_341_600);
        assert!(id.starts_with("20261122T100000Z-"), "{id}");
        crate::repo::manifest::check_snapshot_id(&id).unwrap();
    }
}
