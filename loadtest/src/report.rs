//! The HTML report: one self-contained page (inline SVG charts, no script, no outside resource)
//! drawn from a [`Summary`] — latency percentiles over time, members connected over time,
//! deliveries per second and losses over time, with the rules' thresholds drawn in — then the
//! verdicts and the figures. Works the same for one generator's summary and a merged one.

use std::fmt::Write as _;

use crate::rules::{Metric, Rule};
use crate::summary::Summary;

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

/// One line of a chart.
struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

/// A horizontal dashed line: a rule's threshold.
struct Threshold {
    label: String,
    y: f64,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round step for an axis spanning `max`.
fn nice_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    let step = if n <= 1.0 {
        1.0
    } else if n <= 2.0 {
        2.0
    } else if n <= 5.0 {
        5.0
    } else {
        10.0
    };
    step * mag
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn chart(title: &str, unit: &str, series: &[Series<'_>], thresholds: &[Threshold]) -> String {
    let mut o = String::new();
    let x_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let y_data = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let y_thr = thresholds.iter().map(|t| t.y).fold(0.0f64, f64::max);
    let y_max = (y_data.max(y_thr) * 1.1).max(1.0);
    let step = nice_step(y_max);
    let y_top = (y_max / step).ceil() * step;
    let pw = WIDTH - LEFT - RIGHT;
    let ph = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / x_max * pw;
    let sy = |y: f64| TOP + ph - y / y_top * ph;
    let _ = write!(
        o,
        r#"<figure><svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{t}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">"#,
        t = esc(title)
    );
    let _ = write!(
        o,
        r##"<text x="{LEFT}" y="18" class="title">{}</text>"##,
        esc(title)
    );
    let mut y = 0.0;
    while y <= y_top + step * 0.01 {
        let py = sy(y);
        let _ = write!(
            o,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" class="grid"/><text x="{:.1}" y="{:.1}" class="axis" text-anchor="end">{}{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            fmt_num(y),
            unit
        );
        y += step;
    }
    let xstep = nice_step(x_max);
    let mut x = 0.0;
    while x <= x_max + xstep * 0.01 {
        let _ = write!(
            o,
            r##"<text x="{:.1}" y="{:.1}" class="axis" text-anchor="middle">{}s</text>"##,
            sx(x),
            HEIGHT - BOTTOM + 16.0,
            fmt_num(x)
        );
        x += xstep;
    }
    for t in thresholds {
        let py = sy(t.y);
        let _ = write!(
            o,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" class="threshold"/><text x="{:.1}" y="{:.1}" class="threshold-label" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            WIDTH - RIGHT - 4.0,
            py - 4.0,
            esc(&t.label)
        );
    }
    for (i, s) in series.iter().enumerate() {
        if !s.points.is_empty() {
            let pts: Vec<String> = s
                .points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            let _ = write!(
                o,
                r##"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"##,
                s.color,
                pts.join(" ")
            );
        }
        let lx = LEFT + 10.0 + i as f64 * 150.0;
        let _ = write!(
            o,
            r##"<rect x="{lx:.1}" y="{:.1}" width="12" height="4" fill="{}"/><text x="{:.1}" y="{:.1}" class="legend">{}</text>"##,
            HEIGHT - 12.0,
            s.color,
            lx + 16.0,
            HEIGHT - 7.0,
            esc(s.name)
        );
    }
    o.push_str("</svg></figure>\n");
    o
}

/// The page.
pub fn html(s: &Summary) -> String {
    let t0 = s.timeline.first().map(|p| p.t).unwrap_or(0);
    let x = |t: u64| (t - t0) as f64;
    let ms = |us: u64| us as f64 / 1e3;
    let rules: Vec<Rule> = s.expect.iter().filter_map(|r| r.parse().ok()).collect();
    let latency_thresholds: Vec<Threshold> = rules
        .iter()
        .filter(|r| matches!(r.metric, Metric::Latency(_) | Metric::LatencyMax))
        .map(|r| Threshold {
            label: format!("rule {}", r.text),
            y: r.value / 1e3,
        })
        .collect();
    let loss_thresholds: Vec<Threshold> = rules
        .iter()
        .filter(|r| r.metric == Metric::Lost)
        .map(|r| Threshold {
            label: format!("rule {} (whole run)", r.text),
            y: r.value,
        })
        .collect();
    let lat = |f: fn(&crate::summary::Point) -> u64| -> Vec<(f64, f64)> {
        s.timeline
            .iter()
            .filter(|p| !p.latency.is_empty())
            .map(|p| (x(p.t), ms(f(p))))
            .collect()
    };
    let latency = chart(
        "End-to-end latency per second (ms)",
        "",
        &[
            Series {
                name: "p50",
                color: "#1f77b4",
                points: lat(|p| p.p50_us),
            },
            Series {
                name: "p99",
                color: "#ff7f0e",
                points: lat(|p| p.p99_us),
            },
            Series {
                name: "max",
                color: "#d62728",
                points: lat(|p| p.max_us),
            },
        ],
        &latency_thresholds,
    );
    let target = (s.run.hosts + s.run.viewers) as f64;
    let connections = chart(
        "Members connected",
        "",
        &[Series {
            name: "connected",
            color: "#2ca02c",
            points: s
                .timeline
                .iter()
                .map(|p| (x(p.t), p.connected as f64))
                .collect(),
        }],
        &[Threshold {
            label: format!("planned {target}"),
            y: target,
        }],
    );
    let per_s = |f: fn(&crate::summary::Point) -> u64| -> Vec<(f64, f64)> {
        s.timeline.iter().map(|p| (x(p.t), f(p) as f64)).collect()
    };
    let deliveries = chart(
        "Messages per second",
        "",
        &[
            Series {
                name: "received",
                color: "#9467bd",
                points: per_s(|p| p.received),
            },
            Series {
                name: "sent",
                color: "#8c564b",
                points: per_s(|p| p.sent),
            },
        ],
        &[],
    );
    let losses = chart(
        "Lost deliveries, by second of publication",
        "",
        &[Series {
            name: "lost",
            color: "#d62728",
            points: per_s(|p| p.lost),
        }],
        &loss_thresholds,
    );

    let mut o = String::new();
    let r = &s.run;
    let m = &s.messages;
    let c = &s.connections;
    let l = &s.latency_us;
    let _ = write!(
        o,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Load test {run:08x}: {verdict}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:900px}}
h1{{font-size:1.4em}} h2{{font-size:1.1em;margin-top:2em}}
.pass{{color:#2a7d2a}} .fail{{color:#c62828}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
svg .title{{font-weight:bold;font-size:14px}} svg .axis,svg .legend{{font-size:11px;fill:#555}}
svg .grid{{stroke:#eee}} svg .threshold{{stroke:#c62828;stroke-dasharray:6 4}}
svg .threshold-label{{font-size:11px;fill:#c62828}}
figure{{margin:1em 0}}
</style></head><body>
<h1>Load test <code>{run:08x}</code>: <span class="{class}">{verdict}</span></h1>
<p>{rooms} rooms ({spec}), {hosts} hosts, {viewers} viewers; window {measure:.0} s + drain {drain:.0} s; {generators} generator(s); targets {targets}.</p>
"#,
        run = r.run_id,
        verdict = if s.pass { "PASS" } else { "FAIL" },
        class = if s.pass { "pass" } else { "fail" },
        rooms = r.rooms,
        spec = esc(&r.rooms_spec.join(" ")),
        hosts = r.hosts,
        viewers = r.viewers,
        measure = r.measure_s,
        drain = r.drain_s,
        generators = r.generators,
        targets = esc(&r.targets.join(", ")),
    );
    o.push_str("<h2>Rules</h2>\n<table><tr><th>rule</th><th>verdict</th><th>note</th></tr>\n");
    for v in &s.rules {
        let _ = writeln!(
            o,
            r#"<tr><td><code>{}</code></td><td class="{}">{}</td><td>{}</td></tr>"#,
            esc(&v.rule),
            if v.pass { "pass" } else { "fail" },
            if v.pass { "PASS" } else { "FAIL" },
            esc(v.note.as_deref().unwrap_or(""))
        );
    }
    o.push_str("</table>\n<h2>Over time</h2>\n");
    o.push_str(&latency);
    o.push_str(&connections);
    o.push_str(&deliveries);
    o.push_str(&losses);
    let _ = write!(
        o,
        r#"<h2>Figures</h2>
<table>
<tr><th>published</th><td>{published} (HTTP API {api}, unsent {unsent}, errors {perr})</td></tr>
<tr><th>expected / delivered / lost</th><td>{expected} / {delivered} / {lost}</td></tr>
<tr><th>duplicates / reordered</th><td>{dup} / {reo}</td></tr>
<tr><th>latency p50 / p90 / p99 / p99.9 / max</th><td>{p50:.2} / {p90:.2} / {p99:.2} / {p999:.2} / {max:.2} ms ({count} samples)</td></tr>
<tr><th>connections</th><td>{attempts} attempts, {joined} joined, {cerr} errors, {closes} unexpected closes</td></tr>
<tr><th>continuity</th><td>{resumes} resumes ({incomplete} incomplete), {recovered} recovered, {resent} re-sent</td></tr>
<tr><th>generator</th><td>timer lag p99 {lag:.2} ms{bottleneck}</td></tr>
</table>
</body></html>
"#,
        published = m.published,
        api = m.api_published,
        unsent = m.unsent,
        perr = m.publish_errors,
        expected = m.expected,
        delivered = m.delivered,
        lost = m.lost,
        dup = m.duplicates,
        reo = m.reordered,
        p50 = ms(l.p50),
        p90 = ms(l.p90),
        p99 = ms(l.p99),
        p999 = ms(l.p99_9),
        max = ms(l.max),
        count = l.count,
        attempts = c.attempts,
        joined = c.joined,
        cerr = c.errors,
        closes = c.unexpected_closes,
        resumes = s.continuity.resumes,
        incomplete = s.continuity.incomplete,
        recovered = s.continuity.recovered,
        resent = s.continuity.resent,
        lag = ms(s.generator.timer_lag_us.p99),
        bottleneck = if s.generator.bottleneck {
            " — the generator was the bottleneck"
        } else {
            ""
        },
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Shard;
    use crate::summary::tests::pretend;

    #[test]
    fn the_page_draws_every_chart_with_thresholds() {
        let mut s = pretend(3, Shard::default());
        s.judge(&["p99<80ms".parse().unwrap(), "lost==0".parse().unwrap()]);
        let page = html(&s);
        assert_eq!(page.matches("<svg").count(), 4);
        assert!(page.contains("rule p99&lt;80ms"), "latency threshold drawn");
        assert!(
            page.contains("rule lost==0 (whole run)"),
            "loss threshold drawn"
        );
        assert!(page.contains("<polyline"));
        assert!(!page.contains("<script"), "no script, nothing to fail");
        assert!(
            !page.contains("http://") || !page.contains("src=\"http"),
            "no outside resource"
        );
        assert!(page.contains("FAIL"), "3 rooms with a loss in one");
    }

    #[test]
    fn axis_steps_are_round() {
        assert_eq!(nice_step(100.0), 20.0);
        assert_eq!(nice_step(7.0), 2.0);
        assert_eq!(nice_step(0.3), 0.1);
        assert_eq!(fmt_num(25_000.0), "25k");
    }
}
