//! The generator watching itself, so that a slow generator is never mistaken for a slow gateway:
//! a 10 ms timer whose oversleep is the runtime's scheduling delay, and the process's CPU time
//! and peak memory from `/proc/self`, and the machine's load average from `/proc/loadavg`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::stats::Recorder;

const PERIOD: Duration = Duration::from_millis(10);

/// CPU used by the generator over the window and drain.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// CPU seconds / wall seconds × 100 (200 = two cores busy).
    pub cpu_percent: f64,
}

/// Where the probe leaves its result; a std `Mutex` written once.
pub type UsageSlot = Mutex<Option<Usage>>;

/// User + system CPU seconds of this process (`/proc/self/stat`, in USER_HZ = 100 ticks).
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Peak resident memory of this process in MiB (`VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The machine's 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs the timer probe from now until `until`, recording its oversleep into `lag`; yields the
/// CPU usage over that time.
pub fn spawn(lag: Arc<Recorder>, until: Instant) -> JoinHandle<Option<Usage>> {
    tokio::spawn(async move {
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        while Instant::now() < until {
            let before = Instant::now();
            tokio::time::sleep(PERIOD).await;
            let over = before.elapsed().saturating_sub(PERIOD);
            lag.record(0, over.as_micros() as u64);
            if over > Duration::from_millis(50) {
                log::debug!("generator stalled {over:?}");
            }
        }
        let (a, b) = (cpu0?, cpu_seconds()?);
        let wall = t0.elapsed().as_secs_f64().max(1e-3);
        Some(Usage {
            cpu_percent: (b - a) / wall * 100.0,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let cpu = cpu_seconds().expect("linux /proc");
        assert!(cpu >= 0.0);
        assert!(peak_rss_mib().expect("linux /proc") > 0.0);
        assert!(load_average().expect("linux /proc") >= 0.0);
    }

    #[tokio::test]
    async fn the_timer_probe_records_and_reports() {
        let lag = Arc::new(Recorder::default());
        let usage = spawn(lag.clone(), Instant::now() + Duration::from_millis(100))
            .await
            .unwrap();
        assert!(usage.is_some());
        assert!(lag.merged().len() >= 3, "about ten 10 ms rounds");
    }
}
