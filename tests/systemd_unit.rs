//! The shipped systemd unit (`tuning/comet.service`): hardened, watched, and consistent
//! with the sysctl kit (`tuning/99-comet.conf`).

use std::process::Command;

const UNIT: &str = include_str!("../tuning/comet.service");
const SYSCTL: &str = include_str!("../tuning/99-comet.conf");

/// The value of `key=` in the unit's text (the last one, as systemd reads it).
fn directive<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .map(str::trim)
}

fn sysctl(key: &str) -> Option<u64> {
    SYSCTL
        .lines()
        .filter_map(|line| line.trim().strip_prefix(key)?.trim().strip_prefix('='))
        .next_back()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn the_unit_is_watched_and_limited_within_the_sysctl_kit() {
    assert_eq!(directive(UNIT, "Type"), Some("notify"));
    assert_eq!(
        directive(UNIT, "NotifyAccess"),
        Some("all"),
        "a successor's MAINPID and pings count"
    );
    assert!(directive(UNIT, "WatchdogSec").is_some(), "no watchdog");
    assert_eq!(directive(UNIT, "NoNewPrivileges"), Some("yes"));
    assert_eq!(directive(UNIT, "CapabilityBoundingSet"), Some(""));
    let nofile: u64 = directive(UNIT, "LimitNOFILE").unwrap().parse().unwrap();
    let nr_open = sysctl("fs.nr_open").expect("fs.nr_open in 99-comet.conf");
    assert!(
        nofile <= nr_open,
        "LimitNOFILE {nofile} above fs.nr_open {nr_open}"
    );
}

/// systemd's own rating of the unit's exposure (offline, no running systemd needed):
/// at most 3.5 ("OK"); the unhardened unit rated 9.4 ("UNSAFE").
#[test]
fn systemd_rates_the_unit_ok() {
    let Ok(out) = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "tuning/comet.service"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    else {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let level: f64 = text
        .lines()
        .find_map(|line| line.split("comet.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    assert!(level <= 3.5, "exposure {level}:\n{text}");
}
