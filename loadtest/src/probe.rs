//! The generator watching itself, so that a slow generator is never mistaken for a slow gateway:
//! a 10 ms timer whose oversleep is the runtime's scheduling delay, and the process's CPU time
//! and peak memory from `/proc/self`, and the machine's load average from `/proc/loadavg`. Its
//! CPU time from the end of the ramp (the conductor starts it when every member has made its
//! first attempt) through the drain, divided by the messages it received meanwhile, is its
//! cost per message; its resident memory's growth over the run, divided by the members it
//! simulates, its cost per member.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::stats::Stats;

const PERIOD: Duration = Duration::from_millis(10);

/// CPU used by the generator from the end of the ramp through the drain.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// CPU seconds / wall seconds × 100 (200 = two cores busy).
    pub cpu_percent: f64,
    /// CPU seconds used.
    pub cpu_seconds: f64,
    /// Our messages received meanwhile (every member, duplicates too).
    pub received: u64,
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

/// Why the generator was its own bottleneck by CPU, if it was: over 90 % of the cores its
/// `threads` worker threads can use (at most `cores`; one thread can use one core).
pub fn cpu_saturated(cpu_percent: f64, threads: usize, cores: usize) -> Option<String> {
    let usable = threads.clamp(1, cores.max(1));
    (cpu_percent > 90.0 * usable as f64).then(|| {
        format!(
            "it used {cpu_percent:.0}% CPU of the {usable} core(s) its {threads} thread(s) can use"
        )
    })
}

/// A `kB` line of `/proc/self/status`, in MiB.
fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Peak resident memory of this process in MiB (`VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

/// Resident memory of this process now, in MiB (`VmRSS`).
pub fn rss_mib() -> Option<f64> {
    status_mib("VmRSS:")
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

/// Runs the timer probe from now until `until`, recording its oversleep into the timer lag of
/// `stats`; yields the CPU usage and the messages received over that time.
pub fn spawn(stats: Arc<Stats>, until: Instant) -> JoinHandle<Option<Usage>> {
    tokio::spawn(async move {
        let lag = stats.timer_lag.clone();
        let received0 = stats.received_total.load(Ordering::Relaxed);
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
        let received = stats.received_total.load(Ordering::Relaxed) - received0;
        let (a, b) = (cpu0?, cpu_seconds()?);
        let wall = t0.elapsed().as_secs_f64().max(1e-3);
        Some(Usage {
            cpu_percent: (b - a) / wall * 100.0,
            cpu_seconds: b - a,
            received,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_saturation_counts_the_cores_its_threads_can_use() {
        // One thread on two cores: saturated at 90 % of one core, not of two.
        let one = cpu_saturated(95.0, 1, 2).expect("one thread at 95 %");
        assert!(one.contains("of the 1 core(s) its 1 thread(s)"), "{one}");
        assert_eq!(cpu_saturated(85.0, 1, 2), None);
        // One per core: 90 % of both.
        assert_eq!(cpu_saturated(150.0, 2, 2), None);
        assert!(cpu_saturated(185.0, 2, 2).is_some());
        // More threads than cores use no more than the cores.
        assert!(cpu_saturated(185.0, 8, 2).is_some());
    }

    #[test]
    fn reads_its_own_process() {
        let cpu = cpu_seconds().expect("linux /proc");
        assert!(cpu >= 0.0);
        assert!(peak_rss_mib().expect("linux /proc") > 0.0);
        assert!(rss_mib().expect("linux /proc") <= peak_rss_mib().unwrap());
        assert!(load_average().expect("linux /proc") >= 0.0);
    }

    #[tokio::test]
    async fn the_timer_probe_records_and_reports() {
        let stats = Arc::new(Stats::default());
        let probe = spawn(stats.clone(), Instant::now() + Duration::from_millis(100));
        // Once the probe has taken its starting count.
        tokio::time::sleep(Duration::from_millis(30)).await;
        stats.received_total.fetch_add(7, Ordering::Relaxed);
        let usage = probe.await.unwrap().expect("linux /proc");
        assert_eq!(usage.received, 7);
        assert!(usage.cpu_seconds >= 0.0);
        assert!(
            stats.timer_lag.merged().len() >= 3,
            "about ten 10 ms rounds"
        );
    }
}
