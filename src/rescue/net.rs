//! The network in the rescue system: DHCP on the first wired interface that gets a lease
//! (busybox udhcpc, whose script writes resolv.conf), or a static address from `bmr.ip=`.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Wired interfaces with a driver behind them (no loopback, bridges or tunnels).
pub fn interfaces() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let p = e.path();
            p.join("device").exists()
                && fs::read_to_string(p.join("type"))
                    .map(|t| t.trim() == "1")
                    .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// A default route means someone (the host, or an earlier attempt) set the network up.
pub fn has_default_route() -> bool {
    fs::read_to_string("/proc/net/route")
        .map(|s| {
            s.lines()
                .skip(1)
                .any(|l| l.split_whitespace().nth(1) == Some("00000000"))
        })
        .unwrap_or(false)
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn carrier(iface: &str) -> bool {
    fs::read_to_string(format!("/sys/class/net/{iface}/carrier"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

fn addresses(iface: &str) -> String {
    Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", iface])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| {
                    let mut w = l.split_whitespace();
                    w.position(|x| x == "inet")?;
                    w.next().map(str::to_string)
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// `ADDR/PREFIX[:GATEWAY[:DNS[:IFACE]]]`, e.g. `192.168.1.50/24:192.168.1.1:192.168.1.53`.
#[derive(Debug, PartialEq)]
pub struct Static {
    pub addr: String,
    pub gateway: Option<String>,
    pub dns: Option<String>,
    pub iface: Option<String>,
}

pub fn parse_static(s: &str) -> Result<Static> {
    let mut it = s.split(':');
    let addr = it.next().unwrap_or_default().to_string();
    let ok = addr.split_once('/').is_some_and(|(a, p)| {
        a.parse::<std::net::Ipv4Addr>().is_ok() && p.parse::<u8>().is_ok_and(|p| p <= 32)
    });
    if !ok {
        bail!("bmr.ip={s}: use dhcp, off, or ADDR/PREFIX[:GATEWAY[:DNS[:IFACE]]]");
    }
    let mut next = || it.next().filter(|x| !x.is_empty()).map(str::to_string);
    Ok(Static {
        addr,
        gateway: next(),
        dns: next(),
        iface: next(),
    })
}

/// Bring the network up as `bmr.ip` says (None = DHCP); returns a one-line description.
pub fn up(ip: Option<&str>, wait: Duration) -> Result<String> {
    if has_default_route() && ip.is_none() {
        return Ok("already configured".into());
    }
    let ifaces = interfaces();
    if ifaces.is_empty() {
        bail!("no network: no network interface found (no driver for the network card?)");
    }
    for i in &ifaces {
        let _ = run("ip", &["link", "set", i, "up"]);
    }
    // Links need a moment to negotiate; prefer those with a cable in.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) && !ifaces.iter().any(|i| carrier(i)) {
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut order = ifaces.clone();
    order.sort_by_key(|i| !carrier(i));
    match ip {
        Some("off") => Ok("off (bmr.ip=off)".into()),
        None | Some("dhcp") => {
            let deadline = Instant::now() + wait;
            loop {
                for i in &order {
                    let ok = Command::new("udhcpc")
                        .args([
                            "-i",
                            i,
                            "-s",
                            "/etc/udhcpc/default.script",
                            "-n",
                            "-q",
                            "-t",
                            "4",
                            "-T",
                            "2",
                        ])
                        .output()
                        .map(|o| o.status.success())
                        .unwrap_or(false);
                    if ok {
                        return Ok(format!("{i} {} (DHCP)", addresses(i)));
                    }
                }
                if Instant::now() >= deadline {
                    bail!(
                        "no network: no DHCP answer on {}: check the cable and the DHCP server, or set bmr.ip=ADDR/PREFIX:GATEWAY:DNS",
                        order.join(", ")
                    );
                }
            }
        }
        Some(s) => {
            let st = parse_static(s)?;
            let iface = st.iface.clone().unwrap_or_else(|| order[0].clone());
            run("ip", &["addr", "add", &st.addr, "dev", &iface])?;
            if let Some(g) = &st.gateway {
                run("ip", &["route", "add", "default", "via", g, "dev", &iface])?;
            }
            if let Some(d) = &st.dns
                && Path::new("/etc").exists()
            {
                fs::write("/etc/resolv.conf", format!("nameserver {d}\n"))
                    .context("cannot write /etc/resolv.conf")?;
            }
            Ok(format!("{iface} {} (static)", st.addr))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_addresses() {
        let s = parse_static("192.168.1.50/24:192.168.1.1:192.168.1.53:eth1").unwrap();
        assert_eq!(s.addr, "192.168.1.50/24");
        assert_eq!(s.gateway.as_deref(), Some("192.168.1.1"));
        assert_eq!(s.dns.as_deref(), Some("192.168.1.53"));
        assert_eq!(s.iface.as_deref(), Some("eth1"));
        assert_eq!(parse_static("10.0.0.2/8").unwrap().gateway, None);
        assert!(parse_static("10.0.0.2").is_err());
        assert!(parse_static("10.0.0.2/33").is_err());
        assert!(parse_static("host/24").is_err());
    }
}
