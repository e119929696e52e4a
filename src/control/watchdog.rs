//! The systemd watchdog (`WatchdogSec=` in the unit): `WATCHDOG=1` is sent only while
//! every shard answers a liveness probe through its inbox, so a stuck shard (a busy loop,
//! a blocking call that never returns) gets the whole node restarted by systemd instead
//! of leaving a half-alive node whose listener still accepts.
//!
//! Owns nothing but its timer. Never pings on behalf of a shard it has not heard from;
//! never blocks the control thread (the probe is a future with a deadline).

use std::rc::Rc;
use std::time::Duration;

use super::Node;

/// The watchdog interval systemd asks for, from `WATCHDOG_USEC`; `None` when there is
/// no watchdog. `WATCHDOG_PID` is deliberately not compared with our pid: a successor
/// started by a zero-downtime restart inherits the predecessor's environment, becomes
/// the unit's main process (`MAINPID=`), and must go on feeding the watchdog.
pub(crate) fn interval_from_env() -> Option<Duration> {
    parse_usec(&std::env::var("WATCHDOG_USEC").ok()?)
}

fn parse_usec(text: &str) -> Option<Duration> {
    let usec: u64 = text.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// How often to probe and ping: twice per interval, as sd_watchdog_enabled(3) advises,
/// so one late tick does not trip it.
fn ping_period(interval: Duration) -> Duration {
    interval / 2
}

/// Feeds the watchdog for as long as the control thread runs.
pub(crate) async fn feed(node: Rc<Node>, interval: Duration) {
    let period = ping_period(interval);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withheld = false;
    loop {
        ticker.tick().await;
        match node.unanswering_shard(period).await {
            None => {
                if withheld {
                    tracing::warn!("every shard answers again; watchdog pings resumed");
                    withheld = false;
                }
                crate::sys::notify_systemd("WATCHDOG=1");
            }
            Some(shard) => {
                if !withheld {
                    tracing::error!(
                        shard,
                        "shard not answering its liveness probe: watchdog pings withheld, \
                         so systemd restarts the node"
                    );
                    withheld = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_comes_from_watchdog_usec() {
        assert_eq!(parse_usec("30000000"), Some(Duration::from_secs(30)));
        assert_eq!(parse_usec(" 500000\n"), Some(Duration::from_millis(500)));
        assert_eq!(parse_usec("0"), None);
        assert_eq!(parse_usec("soon"), None);
        assert_eq!(parse_usec("-1"), None);
    }

    #[test]
    fn pings_twice_per_interval() {
        assert_eq!(
            ping_period(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
    }
}
