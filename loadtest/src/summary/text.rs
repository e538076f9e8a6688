//! The block printed at the end of a run: the figures in a few lines, then one verdict line per
//! rule and the result.

use std::fmt::Write as _;

use super::Summary;
use crate::rules;

impl Summary {
    /// The block printed at the end of a run: figures, then one line per rule.
    pub fn human(&self) -> String {
        let ms = |us: u64| us as f64 / 1e3;
        let mut o = String::new();
        let r = &self.run;
        let c = &self.connections;
        let m = &self.messages;
        let l = &self.latency_us;
        let _ = writeln!(
            o,
            "=== LIVE ROOMS SUMMARY (run {:08x}{}) ===",
            r.run_id,
            if r.shard.is_split() {
                format!(", shard {}", r.shard)
            } else if r.generators > 1 {
                format!(", {} generators merged", r.generators)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            o,
            "rooms {} ({}), hosts {}, viewers {}; window {:.0}s + drain {:.0}s{}",
            r.rooms,
            r.rooms_spec.join(" "),
            r.hosts,
            r.viewers,
            r.measure_s,
            r.drain_s,
            if r.complete { "" } else { "  [INCOMPLETE]" }
        );
        let _ = writeln!(
            o,
            "connections: {} attempts, {} joined, {} errors {:?}, {} unexpected closes {:?}, {} members from the start",
            c.attempts, c.joined, c.errors, c.errors_by_cause, c.unexpected_closes, c.closes_by_code, c.members_from_start
        );
        let _ = writeln!(
            o,
            "  connect p50 {:.2} ms p99 {:.2} ms max {:.2} ms; join p50 {:.2} ms p99 {:.2} ms",
            ms(c.connect_us.p50),
            ms(c.connect_us.p99),
            ms(c.connect_us.max),
            ms(c.join_us.p50),
            ms(c.join_us.p99)
        );
        let _ = writeln!(
            o,
            "messages: published {} (HTTP API {}, unsent {}, errors {}), expected {}, delivered {} ({:.0}/s), lost {} ({:.4}%)",
            m.published, m.api_published, m.unsent, m.publish_errors, m.expected, m.delivered, m.delivered_per_sec, m.lost, self.observations().loss_percent()
        );
        let _ = writeln!(
            o,
            "  duplicates {}, reordered {}, gaps {} (open {}), stale {}, rooms with loss {}, after drain {}, late members {}",
            m.duplicates, m.reordered, m.gaps, m.open_holes, m.stale, m.rooms_with_loss, m.after_drain, m.late_member_deliveries
        );
        if r.shard.is_split() {
            let _ = writeln!(
                o,
                "  (shard {}: its members also hear the other shards' publishers, so expected/lost are not the run's; judge the whole with `loadtest merge`)",
                r.shard
            );
        }
        let k = &self.continuity;
        if k.offsets_seen || k.resumes > 0 || k.acks > 0 {
            let _ = writeln!(
                o,
                "continuity: {} resumes ({} incomplete), {} recovered; offsets: {} duplicates, {} reorders; acks {} ({} duplicate), re-sent {}",
                k.resumes, k.incomplete, k.recovered, k.offset_duplicates, k.offset_reorders, k.acks, k.ack_duplicates, k.resent
            );
        }
        let pr = &self.presence;
        if pr.checked + pr.missing > 0 {
            let _ = writeln!(
                o,
                "presence at the end: {} of {} members saw their room's exact counts ({} wrong, {} without a presence)",
                pr.checked - pr.wrong,
                pr.checked + pr.missing,
                pr.wrong,
                pr.missing
            );
        }
        let li = &self.lists;
        if li.checked + li.missing + li.over_limit > 0 {
            let _ = writeln!(
                o,
                "lists at the end: {} of {} members held their room's exact list ({} wrong, {} unread; {} rooms over the bound, not judged; {} re-reads)",
                li.checked - li.wrong,
                li.checked + li.missing,
                li.wrong,
                li.missing,
                li.over_limit,
                li.rereads
            );
        }
        let w = &self.webhooks;
        if w.enabled {
            let _ = writeln!(
                o,
                "webhooks: {} received ({} bad signatures, {} duplicates, {} ignored); {} rooms and {} members judged: {} missing, {} out of order, {} unexpected ({} unseen connections)",
                w.received, w.bad_signature, w.duplicates, w.ignored, w.rooms, w.keys, w.missing, w.out_of_order, w.unexpected, w.unseen
            );
        }
        let _ = writeln!(
            o,
            "latency end to end: p50 {:.2} ms, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2} ({} samples)",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p99_9),
            ms(l.max),
            l.count
        );
        let _ = writeln!(
            o,
            "  fan-out (gateway ts → received): p50 {:.2} ms, p99 {:.2}; publish lag p99 {:.2} ms, max {:.2}",
            ms(self.fanout_us.p50),
            ms(self.fanout_us.p99),
            ms(self.publish_lag_us.p99),
            ms(self.publish_lag_us.max)
        );
        let g = &self.generator;
        let _ = writeln!(
            o,
            "generator: timer lag p99 {:.2} ms, max {:.2} ms; CPU {}% of {} cores, {} threads (load average {}); peak RSS {} MiB{}",
            ms(g.timer_lag_us.p99),
            ms(g.timer_lag_us.max),
            g.cpu_percent.map(|c| format!("{c:.0}")).unwrap_or("?".into()),
            g.cores,
            g.threads,
            g.load_average
                .map(|c| format!("{c:.1}"))
                .unwrap_or("?".into()),
            g.peak_rss_mib.map(|c| format!("{c:.0}")).unwrap_or("?".into()),
            if g.bottleneck { "  [BOTTLENECK]" } else { "" }
        );
        let _ = writeln!(
            o,
            "  cost: {} µs CPU per received message ({} messages, {} CPU s); {} KiB per member (RSS grew {} MiB for {} members)",
            g.cpu_us_per_message.map(|c| format!("{c:.2}")).unwrap_or("?".into()),
            g.received,
            g.cpu_s.map(|c| format!("{c:.2}")).unwrap_or("?".into()),
            g.kib_per_member.map(|k| format!("{k:.1}")).unwrap_or("?".into()),
            g.rss_growth_mib.map(|m| format!("{m:.1}")).unwrap_or("?".into()),
            r.hosts + r.viewers
        );
        for reason in &g.reasons {
            let _ = writeln!(o, "  WARNING: the generator is the bottleneck: {reason}");
        }
        for note in &g.notes {
            let _ = writeln!(o, "  note: {note}");
        }
        for v in &self.rules {
            let _ = writeln!(o, "rule {}", rules::verdict_line(v));
        }
        if !self.rules.is_empty() {
            let _ = writeln!(o, "result: {}", if self.pass { "PASS" } else { "FAIL" });
        }
        o
    }
}
