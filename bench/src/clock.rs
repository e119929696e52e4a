//! A clock shared by every process on the machine (CLOCK_MONOTONIC), so that a publish
//! time stamped by the orchestrator can be compared with a receive time in a worker.

/// Nanoseconds on CLOCK_MONOTONIC.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A message payload carrying its publish time and a sequence number,
/// `t=<ns>;s=<seq>;`, padded to `size` bytes.
pub fn stamped(size: usize, seq: u64) -> String {
    let mut msg = format!("t={};s={seq};", now_ns());
    while msg.len() < size {
        msg.push('.');
    }
    msg
}

/// A realistic JSON message of about `size` bytes (at least one item) carrying its publish
/// time and a sequence number first, `{"t":<ns>,"s":<seq>,...}`: a feed update with a list
/// of items whose keys repeat and whose values vary (pseudo-random from `seq`), so that
/// deflate finds what it finds in real pushes (~2 KB compresses ~4-6x on its own).
pub fn stamped_json(size: usize, seq: u64) -> String {
    const TEAMS: [&str; 12] = [
        "Ajax",
        "PSV",
        "Feyenoord",
        "AZ",
        "Utrecht",
        "Twente",
        "Vitesse",
        "Heerenveen",
        "Groningen",
        "Sparta",
        "NEC",
        "Heracles",
    ];
    const STATUS: [&str; 4] = ["live", "halftime", "scheduled", "final"];
    let mut state = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move |m: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % m
    };
    let mut msg = format!(
        r#"{{"t":{},"s":{seq},"type":"feed.update","channel":"sports/football/eredivisie","items":["#,
        now_ns()
    );
    let mut item = 0;
    while item == 0 || msg.len() + 2 < size {
        if item > 0 {
            msg.push(',');
        }
        let (home, away) = (next(12) as usize, next(12) as usize);
        let _ = std::fmt::Write::write_fmt(
            &mut msg,
            format_args!(
                r#"{{"id":{},"home":"{}","away":"{}","score":[{},{}],"minute":{},"status":"{}","odds":{{"home":{}.{:02},"draw":{}.{:02},"away":{}.{:02}}},"updated":"2026-12-03T12:{:02}:{:02}Z"}}"#,
                100_000 + next(900_000),
                TEAMS[home],
                TEAMS[away],
                next(5),
                next(5),
                next(91),
                STATUS[next(4) as usize],
                1 + next(5),
                next(100),
                2 + next(3),
                next(100),
                1 + next(8),
                next(100),
                next(60),
                next(60),
            ),
        );
        item += 1;
    }
    msg.push_str("]}");
    msg
}

/// The publish time in a payload made by [`stamped`] or [`stamped_json`] (possibly
/// `\n`-joined).
pub fn publish_ns(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    if let Some(rest) = text.strip_prefix("{\"t\":") {
        return rest.split(',').next()?.parse().ok();
    }
    let rest = text.strip_prefix("t=")?;
    rest.split(';').next()?.parse().ok()
}
