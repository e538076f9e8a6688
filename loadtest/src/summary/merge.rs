//! `loadtest merge`: adds several generators' summaries (the shards of one run) into one, as if
//! one generator had made all the load. Counters and histograms add; rooms' ledgers add by room
//! name, so `expected` and `lost` come out right only for the whole (see [`Summary::derive`]).

use std::collections::BTreeMap;

use super::{Point, RoomFigures, RunInfo, Summary, SCHEMA_VERSION};
use crate::spec::Shard;

fn add_maps(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

fn add_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x + y),
        (x, None) => x,
        (None, y) => y,
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

impl Summary {
    /// Adds several generators' summaries into one, as if one generator had made all the load.
    /// Judge the result with [`Summary::judge`].
    pub fn merge(parts: Vec<Summary>) -> Result<Summary, String> {
        let first = parts.first().ok_or("nothing to merge")?;
        for p in &parts {
            if p.version != SCHEMA_VERSION {
                return Err(format!(
                    "summary version {} (this load tester reads {SCHEMA_VERSION})",
                    p.version
                ));
            }
            if p.run.run_id != first.run.run_id {
                return Err(format!(
                    "run ids differ ({:08x} and {:08x}): these are not shards of one run (give every generator the same --room-prefix)",
                    first.run.run_id, p.run.run_id
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for p in &parts {
            if p.run.shard.is_split() && !seen.insert(p.run.shard.index) {
                return Err(format!("shard {} appears twice", p.run.shard));
            }
        }
        let mut out = Summary {
            run: RunInfo {
                shard: Shard::default(),
                generators: 0,
                complete: true,
                measure_s: 0.0,
                ..first.run.clone()
            },
            expect: first.expect.clone(),
            ..Summary::default()
        };
        out.run.hosts = 0;
        out.run.viewers = 0;
        out.run.source_addresses = 0;
        let mut rooms: BTreeMap<String, RoomFigures> = BTreeMap::new();
        let mut timeline: BTreeMap<u64, Point> = BTreeMap::new();
        let mut reasons = Vec::new();
        let mut notes = Vec::new();
        let (mut cpu, mut cores, mut threads) = (None::<f64>, 0usize, 0usize);
        for p in parts {
            let r = &mut out.run;
            r.hosts += p.run.hosts;
            r.viewers += p.run.viewers;
            r.source_addresses += p.run.source_addresses;
            r.measure_s = r.measure_s.max(p.run.measure_s);
            r.drain_s = r.drain_s.max(p.run.drain_s);
            r.complete &= p.run.complete;
            r.generators += p.run.generators;
            for t in &p.run.targets {
                if !r.targets.contains(t) {
                    r.targets.push(t.clone());
                }
            }
            let c = &mut out.connections;
            c.attempts += p.connections.attempts;
            c.joined += p.connections.joined;
            c.reconnects += p.connections.reconnects;
            add_maps(&mut c.errors_by_cause, &p.connections.errors_by_cause);
            add_maps(&mut c.closes_by_code, &p.connections.closes_by_code);
            let m = &mut out.messages;
            let pm = &p.messages;
            m.published += pm.published;
            m.api_published += pm.api_published;
            m.unsent += pm.unsent;
            m.publish_errors += pm.publish_errors;
            add_maps(&mut m.errors_by_code, &pm.errors_by_code);
            add_maps(&mut m.api_errors_by_cause, &pm.api_errors_by_cause);
            m.duplicates += pm.duplicates;
            m.reordered += pm.reordered;
            m.gaps += pm.gaps;
            m.open_holes += pm.open_holes;
            m.stale += pm.stale;
            m.late_member_deliveries += pm.late_member_deliveries;
            m.after_drain += pm.after_drain;
            m.before_welcome += pm.before_welcome;
            m.foreign += pm.foreign;
            let k = &mut out.continuity;
            let pk = &p.continuity;
            k.offsets_seen |= pk.offsets_seen;
            k.resumes += pk.resumes;
            k.incomplete += pk.incomplete;
            k.recovered += pk.recovered;
            k.offset_duplicates += pk.offset_duplicates;
            k.offset_reorders += pk.offset_reorders;
            k.acks += pk.acks;
            k.ack_duplicates += pk.ack_duplicates;
            k.resent += pk.resent;
            k.unacked_dropped += pk.unacked_dropped;
            out.presence.checked += p.presence.checked;
            out.presence.wrong += p.presence.wrong;
            out.presence.missing += p.presence.missing;
            let (l, pl) = (&mut out.lists, &p.lists);
            l.checked += pl.checked;
            l.wrong += pl.wrong;
            l.missing += pl.missing;
            l.over_limit += pl.over_limit;
            l.rereads += pl.rereads;
            let (w, pw) = (&mut out.webhooks, &p.webhooks);
            w.enabled |= pw.enabled;
            w.received += pw.received;
            w.bad_signature += pw.bad_signature;
            w.duplicates += pw.duplicates;
            w.missing += pw.missing;
            w.out_of_order += pw.out_of_order;
            w.unexpected += pw.unexpected;
            w.ignored += pw.ignored;
            w.unseen += pw.unseen;
            w.rooms += pw.rooms;
            w.keys += pw.keys;
            let h = &mut out.histograms;
            let ph = &p.histograms;
            for (a, b) in [
                (&mut h.latency_us, &ph.latency_us),
                (&mut h.fanout_us, &ph.fanout_us),
                (&mut h.publish_lag_us, &ph.publish_lag_us),
                (&mut h.connect_us, &ph.connect_us),
                (&mut h.join_us, &ph.join_us),
                (&mut h.timer_lag_us, &ph.timer_lag_us),
            ] {
                a.add(b)
                    .map_err(|e| format!("histograms do not add: {e:?}"))?;
            }
            let g = &mut out.generator;
            let pg = &p.generator;
            if let Some(c) = pg.cpu_percent {
                cpu = Some(cpu.unwrap_or(0.0) + c);
            }
            cores += pg.cores;
            threads += pg.threads;
            g.peak_rss_mib = max_opt(g.peak_rss_mib, pg.peak_rss_mib);
            g.cpu_s = add_opt(g.cpu_s, pg.cpu_s);
            g.received += pg.received;
            g.rss_growth_mib = add_opt(g.rss_growth_mib, pg.rss_growth_mib);
            g.load_average = max_opt(g.load_average, pg.load_average);
            g.bottleneck |= pg.bottleneck;
            for reason in &pg.reasons {
                reasons.push(if p.run.shard.is_split() {
                    format!("generator {}: {reason}", p.run.shard)
                } else {
                    reason.clone()
                });
            }
            for note in &pg.notes {
                notes.push(if p.run.shard.is_split() {
                    format!("generator {}: {note}", p.run.shard)
                } else {
                    note.clone()
                });
            }
            for room in p.rooms {
                let e = rooms
                    .entry(room.name.clone())
                    .or_insert_with(|| RoomFigures {
                        name: room.name.clone(),
                        ..RoomFigures::default()
                    });
                e.members_from_start += room.members_from_start;
                e.delivered += room.delivered;
                for (sec, n) in room.published {
                    *e.published.entry(sec).or_default() += n;
                }
            }
            for pt in p.timeline {
                let e = timeline.entry(pt.t).or_insert_with(|| Point::empty(pt.t));
                e.connected += pt.connected;
                e.sent += pt.sent;
                e.received += pt.received;
                e.delivered += pt.delivered;
                e.latency
                    .add(&pt.latency)
                    .map_err(|e| format!("histograms do not add: {e:?}"))?;
            }
        }
        out.generator.cpu_percent = cpu.map(|c| (c * 10.0).round() / 10.0);
        out.generator.cores = cores;
        out.generator.threads = threads;
        out.generator.reasons = reasons;
        out.generator.notes = notes;
        out.rooms = rooms.into_values().collect();
        out.timeline = timeline.into_values().collect();
        out.derive();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::pretend;
    use super::*;
    use crate::rules::Rule;

    #[test]
    fn merging_two_halves_equals_the_whole() {
        let rules: Vec<Rule> = ["lost<=6", "p99<80ms", "connect-errors==0"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        let mut whole = pretend(5, Shard::default());
        whole.judge(&rules);
        let halves: Vec<Summary> = (0..2)
            .map(|i| {
                let mut s = pretend(5, Shard { index: i, total: 2 });
                s.judge(&rules);
                // Through JSON, as `loadtest merge` reads them.
                serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap()
            })
            .collect();
        assert_ne!(
            halves[0].messages.expected + halves[1].messages.expected,
            whole.messages.expected,
            "per-shard expected counts do not add up: only the rooms' ledgers do"
        );
        let mut merged = Summary::merge(halves).unwrap();
        merged.judge(&rules);
        let (g, w) = (&merged.generator, &whole.generator);
        assert_eq!(g.received, w.received);
        assert_eq!(g.cpu_s, Some(0.5), "each half used 0.25 s");
        assert_eq!(
            g.kib_per_member, w.kib_per_member,
            "per member, whatever the split"
        );
        let (m, w) = (g.cpu_us_per_message.unwrap(), w.cpu_us_per_message.unwrap());
        assert!(
            (m - 2.0 * w).abs() <= 0.011,
            "twice the CPU for the same messages: {m} vs {w}"
        );
        assert_eq!(merged.run.generators, 2);
        assert_eq!(merged.run.hosts, whole.run.hosts);
        assert_eq!(merged.run.viewers, whole.run.viewers);
        let j = |s: &Summary| {
            let mut v = serde_json::to_value(s).unwrap();
            for k in ["run", "generator"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        };
        assert_eq!(j(&merged), j(&whole));
        assert_eq!(merged.rules, whole.rules);
        assert!(!merged.pass, "connect-errors==0 fails in both");
    }

    #[test]
    fn merge_refuses_mixed_runs() {
        let a = pretend(2, Shard { index: 0, total: 2 });
        let mut b = pretend(2, Shard { index: 1, total: 2 });
        b.run.run_id = 8;
        assert!(Summary::merge(vec![a.clone(), b])
            .unwrap_err()
            .contains("run ids"));
        assert!(Summary::merge(vec![a.clone(), a.clone()])
            .unwrap_err()
            .contains("twice"));
        let mut old = a;
        old.version = 0;
        assert!(Summary::merge(vec![old]).is_err());
        assert!(Summary::merge(vec![]).is_err());
    }
}
