//! The standard `process_*` figures of a Prometheus exporter, read from `/proc`: CPU
//! seconds, resident and virtual memory, open and maximum descriptors (every client is a
//! descriptor: the gateway's main limit), and the start time.
//!
//! Reading `/proc/self/fd` lists one entry per descriptor (a million at full load), so
//! [`ProcessFigures::read`] is run off the control thread (`spawn_blocking`). Owns no
//! state; the parsers are pure and tested on captured text.

/// One reading of the process figures; a figure `/proc` did not give is `None`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ProcessFigures {
    pub(crate) cpu_seconds: Option<f64>,
    pub(crate) resident_bytes: Option<u64>,
    pub(crate) virtual_bytes: Option<u64>,
    pub(crate) open_fds: Option<u64>,
    pub(crate) max_fds: Option<u64>,
    pub(crate) start_time_seconds: Option<f64>,
}

impl ProcessFigures {
    /// Reads them now (blocking: a directory listing and four small files).
    pub(crate) fn read() -> ProcessFigures {
        let ticks = crate::sys::clock_ticks_per_second() as f64;
        let page = crate::sys::page_size();
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let stat = stat.as_deref().and_then(parse_stat);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| parse_boot_time(&text));
        ProcessFigures {
            cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / ticks),
            resident_bytes: stat.map(|s| s.rss_pages * page),
            virtual_bytes: stat.map(|s| s.vsize),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|entries| entries.count() as u64),
            max_fds: std::fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|text| parse_max_open_files(&text)),
            start_time_seconds: stat
                .zip(boot)
                .map(|(s, boot)| boot as f64 + s.start_ticks as f64 / ticks),
        }
    }
}

/// The fields of `/proc/<pid>/stat` used here.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    utime: u64,
    stime: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so the fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let after_name = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; proc(5) numbers from 1.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        start_ticks: field(22)?,
        vsize: field(23)?,
        rss_pages: field(24)?,
    })
}

/// The `btime` line of `/proc/stat`: boot time in seconds since the epoch.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The soft limit of `Max open files` in `/proc/<pid>/limits`.
fn parse_max_open_files(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let text = "4242 (shard (1) x) S 1 4242 4242 0 -1 4194560 2210 0 0 0 \
                    150 37 0 0 20 0 5 0 98765 123456789 3000 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                utime: 150,
                stime: 37,
                start_ticks: 98765,
                vsize: 123456789,
                rss_pages: 3000,
            })
        );
        assert_eq!(parse_stat("4242 (truncated"), None);
        assert_eq!(parse_stat("4242 (x) S 1 2"), None);
    }

    #[test]
    fn boot_time_and_fd_limit_come_from_their_lines() {
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1764740000\nprocesses 9\n"),
            Some(1_764_740_000)
        );
        assert_eq!(parse_boot_time("cpu 1\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(parse_max_open_files(limits), Some(20_000));
        assert_eq!(
            parse_max_open_files("Max open files unlimited unlimited files\n"),
            None
        );
    }

    #[test]
    fn this_process_reads_itself() {
        let figures = ProcessFigures::read();
        assert!(figures.open_fds.unwrap() >= 3);
        assert!(figures.max_fds.unwrap() >= figures.open_fds.unwrap());
        assert!(figures.resident_bytes.unwrap() > 0);
        assert!(figures.cpu_seconds.is_some());
        assert!(figures.start_time_seconds.unwrap() > 1_600_000_000.0);
    }
}
