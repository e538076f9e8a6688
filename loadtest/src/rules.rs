//! Pass/fail rules (`--expect p99<250ms`): parsing, and judging them against [`Observations`],
//! the plain figures a summary (one generator's, or merged ones) hands over. Goose's own
//! `--threshold` rules judge goose's rows; these judge what goose cannot see (loss, end-to-end
//! latency, connection failures). Nothing here imports the rest of the crate.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// What a rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// Expected deliveries that did not arrive.
    Lost,
    /// `lost` as a percentage of expected deliveries.
    Loss,
    /// Unique deliveries to measured members.
    Delivered,
    /// Failed connection attempts (TCP, HTTP refusal, handshake, welcome).
    ConnectErrors,
    /// Closes the load tester did not ask for.
    Closes,
    /// `error` events answering a publish, and failed writes.
    PublishErrors,
    /// Scheduled messages the publishers never managed to send.
    Unsent,
    /// Receipts of a message a member already had.
    Duplicates,
    /// Receipts after a later message of the same publisher.
    Reordered,
    /// Members whose last `presence` at the end was not their room's size (or none came).
    PresenceWrong,
    /// Members whose list view at the end was wrong or unread (`--lists`).
    ListWrong,
    /// Expected webhook events that never came.
    WebhookMissing,
    /// Webhook events received more than once.
    WebhookDuplicates,
    /// Webhook events after a later one of their room.
    WebhookOutOfOrder,
    /// Webhook events out of turn or for unknown members.
    WebhookUnexpected,
    /// Webhook requests with a bad signature.
    WebhookBadSignature,
    /// (connect errors + unexpected closes + publish errors) / (connect attempts + publishes), %.
    ErrorRate,
    /// End-to-end latency percentile (in per cent, e.g. 99.9), microseconds.
    Latency(f64),
    /// End-to-end latency maximum, microseconds.
    LatencyMax,
    /// The generator's own timer lag, p99, microseconds.
    GeneratorLag,
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `==`
    Eq,
}

impl Op {
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Eq => a == b,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
        }
    }
}

/// `METRIC OP VALUE`, as written on the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// As written, for messages.
    pub text: String,
    /// What is compared.
    pub metric: Metric,
    /// How.
    pub op: Op,
    /// Against what, in the metric's unit (microseconds for times, per cent for rates).
    pub value: f64,
}

/// One rule's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The rule as written.
    pub rule: String,
    /// What was observed, in the rule's unit.
    pub observed: Option<f64>,
    /// Whether it held.
    pub pass: bool,
    /// Why it failed, when it did.
    pub note: Option<String>,
}

fn is_time(m: Metric) -> bool {
    matches!(
        m,
        Metric::Latency(_) | Metric::LatencyMax | Metric::GeneratorLag
    )
}

/// Parses a time in microseconds: `250ms`, `2s`, `900us` (humantime units); a bare number is
/// milliseconds.
fn parse_micros(s: &str) -> Option<f64> {
    if let Ok(ms) = s.trim().parse::<f64>() {
        return (ms.is_finite() && ms >= 0.0).then_some(ms * 1e3);
    }
    humantime::parse_duration(s.trim())
        .ok()
        .map(|d: Duration| d.as_secs_f64() * 1e6)
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let pos = text
            .find(['<', '>', '='])
            .ok_or_else(|| format!("`{s}`: a rule is METRIC OP VALUE, e.g. p99<250ms"))?;
        let (name, rest) = text.split_at(pos);
        let (op, value) = if let Some(v) = rest.strip_prefix("<=") {
            (Op::Le, v)
        } else if let Some(v) = rest.strip_prefix(">=") {
            (Op::Ge, v)
        } else if let Some(v) = rest.strip_prefix("==") {
            (Op::Eq, v)
        } else if let Some(v) = rest.strip_prefix('<') {
            (Op::Lt, v)
        } else if let Some(v) = rest.strip_prefix('>') {
            (Op::Gt, v)
        } else {
            return Err(format!("`{s}`: the operator is one of < <= > >= =="));
        };
        let metric = match name {
            "lost" => Metric::Lost,
            "loss" => Metric::Loss,
            "delivered" => Metric::Delivered,
            "connect-errors" => Metric::ConnectErrors,
            "closes" => Metric::Closes,
            "publish-errors" => Metric::PublishErrors,
            "unsent" => Metric::Unsent,
            "duplicates" => Metric::Duplicates,
            "reordered" => Metric::Reordered,
            "presence-wrong" => Metric::PresenceWrong,
            "list-wrong" => Metric::ListWrong,
            "webhook-missing" => Metric::WebhookMissing,
            "webhook-duplicates" => Metric::WebhookDuplicates,
            "webhook-out-of-order" => Metric::WebhookOutOfOrder,
            "webhook-unexpected" => Metric::WebhookUnexpected,
            "webhook-bad-signature" => Metric::WebhookBadSignature,
            "error-rate" => Metric::ErrorRate,
            "max" => Metric::LatencyMax,
            "generator-lag" => Metric::GeneratorLag,
            p if p.starts_with('p') => {
                let q: f64 = p[1..]
                    .parse()
                    .map_err(|_| format!("`{s}`: `{p}` is not a percentile such as p99 or p99.9"))?;
                if !(q > 0.0 && q <= 100.0) {
                    return Err(format!("`{s}`: a percentile is between 0 and 100"));
                }
                Metric::Latency(q)
            }
            other => {
                return Err(format!(
                    "`{s}`: unknown metric `{other}` (lost, loss, delivered, connect-errors, closes, publish-errors, unsent, duplicates, reordered, presence-wrong, list-wrong, webhook-missing, webhook-duplicates, webhook-out-of-order, webhook-unexpected, webhook-bad-signature, error-rate, p50…p99.9, max, generator-lag)"
                ))
            }
        };
        let value = if is_time(metric) {
            parse_micros(value)
                .ok_or_else(|| format!("`{s}`: `{value}` is not a time such as 250ms"))?
        } else {
            value
                .trim_end_matches('%')
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("`{s}`: `{value}` is not a number"))?
        };
        Ok(Rule {
            text,
            metric,
            op,
            value,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The plain figures rules are judged on: what one generator measured, or what `loadtest merge`
/// added up from several.
#[derive(Debug, Clone)]
pub struct Observations {
    /// Expected deliveries that did not arrive.
    pub lost: u64,
    /// Expected deliveries.
    pub expected: u64,
    /// Unique deliveries to measured members.
    pub delivered: u64,
    /// Failed connection attempts.
    pub connect_errors: u64,
    /// Connection attempts.
    pub connect_attempts: u64,
    /// Attempts that got their welcome.
    pub joined: u64,
    /// Unexpected closes.
    pub closes: u64,
    /// Publish errors.
    pub publish_errors: u64,
    /// Publishes written.
    pub published: u64,
    /// Scheduled messages never sent.
    pub unsent: u64,
    /// Duplicate receipts.
    pub duplicates: u64,
    /// Reordered receipts.
    pub reordered: u64,
    /// Members whose last `presence` at the end was wrong or missing.
    pub presence_wrong: u64,
    /// Members whose list view at the end was wrong or unread.
    pub list_wrong: u64,
    /// Expected webhook events that never came.
    pub webhook_missing: u64,
    /// Repeated webhook events.
    pub webhook_duplicates: u64,
    /// Webhook events out of their room's order.
    pub webhook_out_of_order: u64,
    /// Webhook events out of turn or for unknown members.
    pub webhook_unexpected: u64,
    /// Webhook requests with a bad signature.
    pub webhook_bad_signature: u64,
    /// End-to-end latency, µs.
    pub latency: Histogram<u64>,
    /// The generator's timer lag p99, µs (the worst generator's when merged).
    pub generator_lag_p99: u64,
    /// Whether the window and drain ran to their end (every generator's, when merged).
    pub complete: bool,
    /// Whether a generator limited the run.
    pub bottleneck: bool,
}

impl Default for Observations {
    fn default() -> Self {
        Self {
            lost: 0,
            expected: 0,
            delivered: 0,
            connect_errors: 0,
            connect_attempts: 0,
            joined: 0,
            closes: 0,
            publish_errors: 0,
            published: 0,
            unsent: 0,
            duplicates: 0,
            reordered: 0,
            presence_wrong: 0,
            list_wrong: 0,
            webhook_missing: 0,
            webhook_duplicates: 0,
            webhook_out_of_order: 0,
            webhook_unexpected: 0,
            webhook_bad_signature: 0,
            latency: Histogram::new(3).expect("3 significant digits is valid"),
            generator_lag_p99: 0,
            complete: false,
            bottleneck: false,
        }
    }
}

impl Observations {
    /// `lost` as a percentage of `expected` (0 when nothing was expected).
    pub fn loss_percent(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.lost as f64 * 100.0 / self.expected as f64
        }
    }

    /// (connect errors + unexpected closes + publish errors) / (attempts + publishes), per cent.
    pub fn error_rate_percent(&self) -> f64 {
        let errors = self.connect_errors + self.closes + self.publish_errors;
        let ops = self.connect_attempts + self.published;
        if ops == 0 {
            0.0
        } else {
            errors as f64 * 100.0 / ops as f64
        }
    }
}

impl Rule {
    /// The observed value in the rule's unit, `None` when there is nothing to judge (no latency
    /// sample at all).
    pub fn observe(&self, o: &Observations) -> Option<f64> {
        let lat = &o.latency;
        Some(match self.metric {
            Metric::Lost => o.lost as f64,
            Metric::Loss => o.loss_percent(),
            Metric::Delivered => o.delivered as f64,
            Metric::ConnectErrors => o.connect_errors as f64,
            Metric::Closes => o.closes as f64,
            Metric::PublishErrors => o.publish_errors as f64,
            Metric::Unsent => o.unsent as f64,
            Metric::Duplicates => o.duplicates as f64,
            Metric::Reordered => o.reordered as f64,
            Metric::PresenceWrong => o.presence_wrong as f64,
            Metric::ListWrong => o.list_wrong as f64,
            Metric::WebhookMissing => o.webhook_missing as f64,
            Metric::WebhookDuplicates => o.webhook_duplicates as f64,
            Metric::WebhookOutOfOrder => o.webhook_out_of_order as f64,
            Metric::WebhookUnexpected => o.webhook_unexpected as f64,
            Metric::WebhookBadSignature => o.webhook_bad_signature as f64,
            Metric::ErrorRate => o.error_rate_percent(),
            Metric::Latency(q) => {
                if lat.is_empty() {
                    return None;
                }
                lat.value_at_percentile(q) as f64
            }
            Metric::LatencyMax => {
                if lat.is_empty() {
                    return None;
                }
                lat.max() as f64
            }
            Metric::GeneratorLag => o.generator_lag_p99 as f64,
        })
    }

    /// Judges the rule.
    pub fn judge(&self, o: &Observations) -> Verdict {
        let observed = self.observe(o);
        let pass = observed.is_some_and(|v| self.op.holds(v, self.value));
        let note = match observed {
            None => Some("no samples: nothing was delivered".to_string()),
            Some(v) if !pass => Some(format!(
                "observed {} (rule: {} {} {})",
                self.show(v),
                self.name(),
                self.op.as_str(),
                self.show(self.value)
            )),
            _ => None,
        };
        Verdict {
            rule: self.text.clone(),
            observed,
            pass,
            note,
        }
    }

    /// Whether the rule is about latency (and so cannot be trusted when the generator lagged).
    pub fn is_latency(&self) -> bool {
        matches!(self.metric, Metric::Latency(_) | Metric::LatencyMax)
    }

    fn name(&self) -> &str {
        let end = self.text.find(['<', '>', '=']).unwrap_or(self.text.len());
        &self.text[..end]
    }

    fn show(&self, v: f64) -> String {
        if is_time(self.metric) {
            format!("{:.2}ms", v / 1e3)
        } else if matches!(self.metric, Metric::Loss | Metric::ErrorRate) {
            format!("{v:.4}%")
        } else {
            format!("{v}")
        }
    }
}

/// Judges `rules`, plus the rules every judged run must meet: it ran to its end, and it
/// expected something. Returns the verdicts and whether all held (true without rules).
///
/// Built in: a run in which no member ever joined fails, rules or not (it measured nothing, and
/// an exit status of 0 would hide a wrong target or an untrusted certificate). With rules, the
/// run must also have completed, expected something, and the generator must have kept up (a
/// saturated generator measures itself, not the gateway).
pub fn judge_all(rules: &[Rule], o: &Observations) -> (Vec<Verdict>, bool) {
    let mut verdicts: Vec<Verdict> = rules.iter().map(|r| r.judge(o)).collect();
    if !rules.is_empty() || o.joined == 0 {
        verdicts.push(Verdict {
            rule: "joined>0".into(),
            observed: Some(o.joined as f64),
            pass: o.joined > 0,
            note: (o.joined == 0).then(|| {
                format!(
                    "no member ever joined ({} attempts failed; see connections.errors_by_cause): nothing was measured",
                    o.connect_attempts
                )
            }),
        });
    }
    if !rules.is_empty() {
        verdicts.push(Verdict {
            rule: "complete".into(),
            observed: Some(f64::from(u8::from(o.complete))),
            pass: o.complete,
            note: (!o.complete).then(|| {
                "the run stopped before its window and drain ended (goose --run-time, Ctrl-C or the watchdog)".to_string()
            }),
        });
        verdicts.push(Verdict {
            rule: "expected>0".into(),
            observed: Some(o.expected as f64),
            pass: o.expected > 0,
            note: (o.expected == 0)
                .then(|| "nothing was published to a member: nothing was measured".to_string()),
        });
        verdicts.push(Verdict {
            rule: "generator-kept-up".into(),
            observed: None,
            pass: !o.bottleneck,
            note: o.bottleneck.then(|| {
                "the generator was the bottleneck (see generator.reasons): its figures are not the gateway's".to_string()
            }),
        });
    }
    if o.bottleneck {
        for (v, r) in verdicts.iter_mut().zip(rules) {
            if r.is_latency() && !v.pass {
                let note = v.note.take().unwrap_or_default();
                v.note = Some(format!(
                    "{note}; the generator was the bottleneck, so this latency is not the gateway's"
                ));
            }
        }
    }
    let pass = verdicts.iter().all(|v| v.pass);
    (verdicts, pass)
}

/// The one-line verdict of a rule, as CI logs show it: `PASS lost==0 (observed 0)`.
pub fn verdict_line(v: &Verdict) -> String {
    let shown = |o: f64| match v.rule.parse::<Rule>() {
        Ok(r) if is_time(r.metric) || matches!(r.metric, Metric::Loss | Metric::ErrorRate) => {
            r.show(o)
        }
        _ => trim_float(o),
    };
    let observed = v
        .observed
        .map(|o| format!(" (observed {})", shown(o)))
        .unwrap_or_default();
    let note = v
        .note
        .as_ref()
        .map(|n| format!(" — {n}"))
        .unwrap_or_default();
    format!(
        "{} {}{}{}",
        if v.pass { "PASS" } else { "FAIL" },
        v.rule,
        if v.pass { observed } else { String::new() },
        note
    )
}

fn trim_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        let r: Rule = "p99 < 250ms".parse().unwrap();
        assert_eq!(r.metric, Metric::Latency(99.0));
        assert_eq!((r.op, r.value), (Op::Lt, 250_000.0));
        let r: Rule = "p99.9<=1s".parse().unwrap();
        assert_eq!(r.metric, Metric::Latency(99.9));
        assert_eq!((r.op, r.value), (Op::Le, 1_000_000.0));
        let r: Rule = "lost==0".parse().unwrap();
        assert_eq!((r.metric, r.op, r.value), (Metric::Lost, Op::Eq, 0.0));
        let r: Rule = "loss<0.1%".parse().unwrap();
        assert_eq!((r.metric, r.value), (Metric::Loss, 0.1));
        let r: Rule = "max<800".parse().unwrap();
        assert_eq!(r.value, 800_000.0, "a bare time is milliseconds");
        let r: Rule = "delivered>1000".parse().unwrap();
        assert_eq!((r.op, r.value), (Op::Gt, 1000.0));
        for bad in [
            "p99",
            "p99<",
            "p0<1ms",
            "p101<1ms",
            "latency<1ms",
            "lost<x",
            "p99=1ms",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
    }

    /// 1000 expected, 998 delivered, latency 1…100 ms uniformly.
    pub(crate) fn sample() -> Observations {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for ms in 1..=100u64 {
            h.record(ms * 1000).unwrap();
        }
        Observations {
            lost: 2,
            expected: 1000,
            delivered: 998,
            connect_errors: 1,
            connect_attempts: 100,
            joined: 99,
            published: 100,
            latency: h,
            complete: true,
            ..Observations::default()
        }
    }

    #[test]
    fn judges_rules() {
        let s = sample();
        let verdict = |r: &str| r.parse::<Rule>().unwrap().judge(&s);
        assert!(verdict("lost==2").pass);
        assert!(!verdict("lost==0").pass);
        assert!(verdict("loss<1").pass, "2 of 1000 is 0.2%");
        assert!(!verdict("loss<0.1").pass);
        assert!(verdict("connect-errors<=1").pass);
        assert!(verdict("p50<=51ms").pass);
        assert!(!verdict("p50<=10ms").pass);
        assert!(verdict("p99<100ms").pass);
        assert!(!verdict("p99<1ms").pass);
        assert!(verdict("max<=1s").pass);
        assert!(verdict("duplicates==0").pass);
        let v = verdict("p99<1ms");
        assert!(v.note.unwrap().contains("observed"), "says what it saw");
        let mut empty = sample();
        empty.latency = Histogram::new(3).unwrap();
        let v = "p99<1s".parse::<Rule>().unwrap().judge(&empty);
        assert!(!v.pass, "a latency rule with no sample fails");
        assert!((s.loss_percent() - 0.2).abs() < 1e-9);
        assert!((s.error_rate_percent() - 0.5).abs() < 1e-9, "1 of 200");
        assert_eq!(Observations::default().loss_percent(), 0.0);
    }

    #[test]
    fn judged_runs_must_complete_and_measure_something() {
        let rules: Vec<Rule> = vec!["lost<=2".parse().unwrap()];
        let (v, pass) = judge_all(&rules, &sample());
        assert!(pass, "{v:?}");
        let mut s = sample();
        s.complete = false;
        assert!(!judge_all(&rules, &s).1);
        let mut s = sample();
        s.expected = 0;
        s.lost = 0;
        assert!(
            !judge_all(&rules, &s).1,
            "lost 0 of 0 expected is not a pass"
        );
        let (v, pass) = judge_all(&[], &sample());
        assert!(pass && v.is_empty(), "no rules, no verdicts");
    }

    #[test]
    fn a_run_where_nobody_joined_fails_even_without_rules() {
        let mut s = sample();
        s.joined = 0;
        let (v, pass) = judge_all(&[], &s);
        assert!(!pass, "{v:?}");
        assert_eq!(v.len(), 1);
        let line = verdict_line(&v[0]);
        assert!(line.starts_with("FAIL joined>0"), "{line}");
        assert!(
            line.contains("no member ever joined (100 attempts failed"),
            "{line}"
        );
        let (_, pass) = judge_all(&["lost<=1000".parse().unwrap()], &s);
        assert!(!pass, "rules or not");
    }

    #[test]
    fn a_saturated_generator_fails_a_judged_run() {
        let rules: Vec<Rule> = vec!["lost<=2".parse().unwrap()];
        let mut s = sample();
        s.bottleneck = true;
        let (v, pass) = judge_all(&rules, &s);
        assert!(!pass, "{v:?}");
        let kept_up = v.iter().find(|v| v.rule == "generator-kept-up").unwrap();
        assert!(verdict_line(kept_up)
            .starts_with("FAIL generator-kept-up — the generator was the bottleneck"));
        s.bottleneck = false;
        assert!(judge_all(&rules, &s).1);
    }

    #[test]
    fn a_lagging_generator_is_named_in_latency_failures() {
        let mut s = sample();
        s.bottleneck = true;
        let (v, pass) = judge_all(&["p99<1ms".parse().unwrap()], &s);
        assert!(!pass);
        assert!(v[0].note.as_ref().unwrap().contains("generator"));
        assert!(verdict_line(&v[0]).starts_with("FAIL p99<1ms — observed"));
        let (v, _) = judge_all(&["lost<=2".parse().unwrap(), "p50<1s".parse().unwrap()], &s);
        assert_eq!(verdict_line(&v[0]), "PASS lost<=2 (observed 2)");
        assert_eq!(verdict_line(&v[1]), "PASS p50<1s (observed 50.02ms)");
    }
}
