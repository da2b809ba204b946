//! The lvm tool, for what bmr asks of LVM: JSON reports (physical volumes, volume groups, the
//! segments of logical volumes) and the few commands a restore's grow step runs. Every report
//! scans the devices itself (no hints file: without udev it goes stale).

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

pub fn lvm(args: &[&str]) -> Result<String> {
    let out = Command::new("lvm")
        .args(args)
        // lvm complains about every inherited descriptor otherwise.
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .with_context(|| {
            format!(
                "cannot run lvm {}: is lvm2 installed?",
                args.first().unwrap_or(&"")
            )
        })?;
    super::tool_output("lvm", args, out)
}

pub type Row = BTreeMap<String, String>;

/// Rows of an lvm JSON report (`--reportformat json`): all values are strings.
pub fn parse_report(json: &str) -> Result<Vec<Row>> {
    #[derive(Deserialize)]
    struct Report {
        report: Vec<BTreeMap<String, Vec<Row>>>,
    }
    let r: Report = serde_json::from_str(json).context("cannot parse lvm's JSON report")?;
    Ok(r.report
        .into_iter()
        .flat_map(|m| m.into_values().flatten())
        .collect())
}

pub fn report(cmd: &str, fields: &str, extra: &[&str]) -> Result<Vec<Row>> {
    // Scan the devices rather than trust lvm's hints file: without udev to refresh it (a rescue
    // system, loop devices) it can name a device that is now something else.
    let mut args = vec![
        cmd,
        "--config",
        "devices/hints=\"none\"",
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        fields,
    ];
    args.extend_from_slice(extra);
    parse_report(&lvm(&args)?)
}

pub fn field<'a>(row: &'a Row, name: &str) -> Result<&'a str> {
    row.get(name)
        .map(|s| s.trim())
        .with_context(|| format!("lvm's report has no {name}"))
}

pub fn num(row: &Row, name: &str) -> Result<u64> {
    let v = field(row, name)?;
    v.parse()
        .with_context(|| format!("lvm reported {name} = {v:?}, not a number"))
}

/// A segment's physical extents: "/dev/sda3:0-255" -> ("/dev/sda3", 0, 256).
pub fn parse_pe_range(s: &str) -> Result<(String, u64, u64)> {
    let s = s.trim();
    let bad = || format!("unexpected extent range {s:?} in lvm's report");
    let (dev, range) = s.rsplit_once(':').with_context(bad)?;
    let (a, b) = range.split_once('-').with_context(bad)?;
    let (a, b): (u64, u64) = (a.parse().with_context(bad)?, b.parse().with_context(bad)?);
    if b < a || dev.is_empty() || s.contains(' ') {
        bail!("{}", bad());
    }
    Ok((dev.to_string(), a, b - a + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pe_ranges() {
        assert_eq!(
            parse_pe_range("/dev/vda4:0-7").unwrap(),
            ("/dev/vda4".to_string(), 0, 8)
        );
        assert!(parse_pe_range("/dev/vda4:7-0").is_err());
        assert!(parse_pe_range("/dev/vda4:0-7 /dev/vdb1:0-3").is_err());
        assert!(parse_pe_range("garbage").is_err());
        assert!(parse_pe_range("").is_err());
    }

    #[test]
    fn report_rows() {
        let json = r#"{"report":[{"pv":[{"pv_name":"/dev/loop0","vg_name":"vgt","pe_start":"1048576"}]}]}"#;
        let rows = parse_report(json).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(num(&rows[0], "pe_start").unwrap(), 1 << 20);
        assert!(num(&rows[0], "vg_name").is_err());
        assert!(field(&rows[0], "missing").is_err());
        assert!(parse_report("{\"report\": 3").is_err());
    }
}
