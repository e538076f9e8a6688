//! Pass/fail rules (`--expect p99<250ms`): parsing, and judging them against a [`Summary`].
//! Goose's own `--threshold` rules judge goose's rows; these judge what goose cannot see (loss,
//! end-to-end latency, connection failures).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::summary::Summary;

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
#[derive(Debug, Clone, Serialize)]
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

/// Parses a time in microseconds: `250ms`, `2s`, `900us`; a bare number is milliseconds.
fn parse_micros(s: &str) -> Option<f64> {
    let (n, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        (s, 1e3)
    };
    n.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v * mult)
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
                    "`{s}`: unknown metric `{other}` (lost, loss, delivered, connect-errors, closes, publish-errors, unsent, error-rate, p50…p99.9, max, generator-lag)"
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

impl Rule {
    /// The observed value in the rule's unit, `None` when there is nothing to judge (no latency
    /// sample at all).
    pub fn observe(&self, s: &Summary) -> Option<f64> {
        let lat = &s.latency_us;
        Some(match self.metric {
            Metric::Lost => s.messages.lost as f64,
            Metric::Loss => s.messages.loss_percent(),
            Metric::Delivered => s.messages.delivered as f64,
            Metric::ConnectErrors => s.connections.errors as f64,
            Metric::Closes => s.connections.unexpected_closes as f64,
            Metric::PublishErrors => s.messages.publish_errors as f64,
            Metric::Unsent => s.messages.unsent as f64,
            Metric::ErrorRate => s.error_rate_percent(),
            Metric::Latency(q) => {
                if lat.count == 0 {
                    return None;
                }
                s.latency_percentile(q)? as f64
            }
            Metric::LatencyMax => {
                if lat.count == 0 {
                    return None;
                }
                lat.max as f64
            }
            Metric::GeneratorLag => s.generator.timer_lag_us.p99 as f64,
        })
    }

    /// Judges the rule against a summary.
    pub fn judge(&self, s: &Summary) -> Verdict {
        let observed = self.observe(s);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::tests::sample_summary;

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

    #[test]
    fn judges_rules() {
        let s = sample_summary();
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
        let v = verdict("p99<1ms");
        assert!(v.note.unwrap().contains("observed"), "says what it saw");
        let mut empty = sample_summary();
        empty.latency_us = Default::default();
        let v = "p99<1s".parse::<Rule>().unwrap().judge(&empty);
        assert!(!v.pass, "a latency rule with no sample fails");
    }
}
