//! The witness of an outage: when this node has lost a Redis master (one Cluster shard's, or
//! the master the sentinels name), someone else who watches that master — another Cluster node,
//! or a sentinel — is asked whether it lost it too. Its answer is an [`Outage`]: `Shared` (every
//! node lost it alike — a failover is coming, or the master is simply gone: moving clients helps
//! none of them) or `Alone` (no witness answers, or the witnesses reach the master: this node is
//! cut off, and a move to another node helps).
//!
//! What counts as "lost it too", each read from the witness's own view, never from its failure
//! verdict alone (that comes only after `cluster-node-timeout` / `down-after-milliseconds`,
//! which default to 15 s and 30 s — later than `--broker-loss-close`):
//! - Cluster (`CLUSTER NODES` on any node this node reaches): the shard's master is flagged
//!   `fail?` or `fail`, its bus link is `disconnected`, or a ping to it has waited over
//!   [`UNANSWERED`] (a frozen master); or no master owns the shard's first slot.
//! - Sentinel (`SENTINEL MASTER`): flags `s_down`, `o_down`, `disconnected` or
//!   `failover_in_progress`, or no ping answer for over [`UNANSWERED`].
//!
//! When the witness reaches the master fine, this node tries it itself: if it answers, this
//! node's connection is only recovering (`Shared`: nothing to hand over); if not, `Alone`.
//! One Redis without Sentinel has no witness: always `Alone` (today's behaviour: a node cannot
//! tell "Redis down" from "I am cut off").
//!
//! Not covered (docs/operations.md, "Hand-over"): a witness cut off on this node's side of a
//! partition (it answers and reports the master lost, though other nodes reach it: the node
//! waits, up to `--broker-failover-wait`); clocks of Cluster nodes more than [`UNANSWERED`] apart
//! from this node's (the ping age is read against this node's clock).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{AsyncConnectionConfig, Value};

use super::cluster;
use super::Shared;
use crate::broker::redis_endpoint::{Endpoint, Sentinels};
use crate::broker::Outage;

/// How long a witness's ping to the master may wait for its answer before the witness counts as
/// not reaching it either (Cluster nodes and sentinels ping every second or faster).
pub const UNANSWERED: Duration = Duration::from_millis(2000);

/// Asks the witnesses of shard `shard` (0 for one server or a Sentinel-managed master).
pub async fn ask(s: &Shared, shard: usize) -> Outage {
    match &s.endpoint {
        Endpoint::Single(_) => Outage::Alone("one Redis without Sentinel has no witness"),
        Endpoint::Sentinel(_, sentinels) => sentinel(s, sentinels).await,
        Endpoint::Cluster(_) => cluster(s, shard).await,
    }
}

async fn cluster(s: &Shared, shard: usize) -> Outage {
    let seeds = cluster::seeds(s);
    let t = s.timeouts.command;
    let Some((first_slot, mut ask)) = s.cluster.witness_plan(shard) else {
        return Outage::Alone("the shard is not known yet");
    };
    for a in &seeds.addrs {
        if !ask.contains(a) {
            ask.push(a.clone());
        }
    }
    for (host, port) in ask {
        let Ok(client) = seeds.node_client(&host, port) else {
            continue;
        };
        let Some(answer) = query(&client, redis::cmd("CLUSTER").arg("NODES"), t).await else {
            continue;
        };
        let text = match &answer {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::VerbatimString { text, .. } | Value::SimpleString(text) => text.clone(),
            _ => continue,
        };
        return match judge_cluster(&text, first_slot, now_ms()) {
            Seen::Lost(why) => Outage::Shared(why),
            Seen::Reached(host, port) => {
                let answers = match seeds.node_client(&host, port) {
                    Ok(c) => query(&c, &redis::cmd("PING"), t).await.is_some(),
                    Err(_) => false,
                };
                if answers {
                    Outage::Shared("the master answers this node too: its connection is recovering")
                } else {
                    Outage::Alone("the cluster reaches the shard's master, this node does not")
                }
            }
        };
    }
    Outage::Alone("no cluster node answers")
}

async fn sentinel(s: &Shared, sentinels: &Sentinels) -> Outage {
    let t = s.timeouts.command;
    let mut answered = false;
    for c in &sentinels.clients {
        let cmd = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(&sentinels.master)
            .to_owned();
        let Some(answer) = query(c, &cmd, t).await else {
            continue;
        };
        answered = true;
        if let Seen::Lost(why) = judge_sentinel(&fields(&answer)) {
            return Outage::Shared(why);
        }
    }
    if !answered {
        return Outage::Alone("no sentinel answers");
    }
    // The sentinels reach the master they name: does this node?
    let reached = match tokio::time::timeout(t, s.endpoint.client()).await {
        Ok(Ok(c)) => query(&c, &redis::cmd("PING"), t).await.is_some(),
        _ => false,
    };
    if reached {
        Outage::Shared("the master answers this node too: its connection is recovering")
    } else {
        Outage::Alone("the sentinels reach the master, this node does not")
    }
}

/// What a witness says of the master.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// The witness lost it too (why).
    Lost(&'static str),
    /// The witness reaches the master at this address.
    Reached(String, u16),
}

/// Reads `CLUSTER NODES` (one line per node: `id addr flags master ping-sent pong-recv epoch
/// link-state slots…`) for the master that owns `slot`.
fn judge_cluster(nodes: &str, slot: u16, now_ms: u64) -> Seen {
    for line in nodes.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let flags: Vec<&str> = f[2].split(',').collect();
        if !flags.contains(&"master") {
            continue;
        }
        let owns = f[8..].iter().any(|r| {
            if r.starts_with('[') {
                return false; // a slot being migrated or imported: not ownership
            }
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
        });
        if !owns {
            continue;
        }
        if flags.iter().any(|x| *x == "fail" || *x == "fail?") {
            return Seen::Lost("the cluster flags the shard's master failing");
        }
        let myself = flags.contains(&"myself");
        if !myself && f[7] == "disconnected" {
            return Seen::Lost("the cluster's link to the shard's master is down too");
        }
        let ping_sent: u64 = f[4].parse().unwrap_or(0);
        if !myself
            && ping_sent > 0
            && now_ms.saturating_sub(ping_sent) > UNANSWERED.as_millis() as u64
        {
            return Seen::Lost("the cluster's pings to the shard's master go unanswered too");
        }
        // `ip:port@cport[,hostname]`
        let addr = f[1].split(['@', ',']).next().unwrap_or_default();
        return match addr.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => {
                Seen::Reached(h.trim_matches(['[', ']']).to_string(), p.parse().unwrap())
            }
            _ => Seen::Lost("the shard's master has no address (noaddr)"),
        };
    }
    Seen::Lost("no master owns the shard's slots (a failover is under way)")
}

/// Reads `SENTINEL MASTER`'s fields.
fn judge_sentinel(fields: &HashMap<String, String>) -> Seen {
    let flags = fields.get("flags").map(String::as_str).unwrap_or("");
    if flags.split(',').any(|f| {
        matches!(
            f,
            "s_down" | "o_down" | "disconnected" | "failover_in_progress"
        )
    }) {
        return Seen::Lost("the sentinels see the master down or failing over");
    }
    let since_ok: u64 = fields
        .get("last-ok-ping-reply")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if since_ok > UNANSWERED.as_millis() as u64 {
        return Seen::Lost("the sentinels' pings to the master go unanswered too");
    }
    let host = fields.get("ip").cloned().unwrap_or_default();
    let port = fields.get("port").and_then(|p| p.parse().ok()).unwrap_or(0);
    Seen::Reached(host, port)
}

/// A flat field/value array (RESP2) or a map (RESP3) as strings.
fn fields(v: &Value) -> HashMap<String, String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    };
    match v {
        Value::Array(a) => a
            .chunks(2)
            .filter_map(|p| match p {
                [k, v] => Some((text(k), text(v))),
                _ => None,
            })
            .collect(),
        Value::Map(m) => m.iter().map(|(k, v)| (text(k), text(v))).collect(),
        _ => HashMap::new(),
    }
}

/// One command on a fresh connection, within `t` for the connect and `t` for the answer; the
/// connection is dropped after (a witness is asked at most once a second, and only in an outage).
async fn query(client: &redis::Client, cmd: &redis::Cmd, t: Duration) -> Option<Value> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(t))
        .set_response_timeout(Some(t));
    let mut c = tokio::time::timeout(
        t,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .ok()?
    .ok()?;
    match tokio::time::timeout(t, cmd.query_async::<Value>(&mut c)).await {
        Ok(Ok(Value::ServerError(_))) | Ok(Err(_)) | Err(_) => None,
        Ok(Ok(v)) => Some(v),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:30002@40002 master - 0 1700000000000 2 connected 5461-10922
c3 127.0.0.1:30003@40003 master,fail? - 1700000000000 1699999999000 3 connected 10923-16383
d4 127.0.0.1:30004@40004 slave a1 0 1700000000000 1 connected
";

    #[test]
    fn cluster_nodes_say_who_lost_the_master() {
        let now = 1_700_000_000_500;
        assert_eq!(
            judge_cluster(NODES, 100, now),
            Seen::Reached("127.0.0.1".into(), 30001)
        );
        assert_eq!(
            judge_cluster(NODES, 6000, now),
            Seen::Reached("127.0.0.1".into(), 30002)
        );
        assert!(matches!(judge_cluster(NODES, 12000, now), Seen::Lost(_)));
        let down = NODES.replace("2 connected", "2 disconnected");
        assert!(matches!(judge_cluster(&down, 6000, now), Seen::Lost(_)));
        let waiting = NODES.replace("master - 0 1700000000000 2", "master - 1700000000000 1 2");
        assert_eq!(
            judge_cluster(&waiting, 6000, now),
            Seen::Reached("127.0.0.1".into(), 30002),
            "a ping in flight for 500 ms is normal"
        );
        assert!(matches!(
            judge_cluster(&waiting, 6000, now + 3000),
            Seen::Lost(_)
        ));
        assert!(matches!(judge_cluster("", 1, now), Seen::Lost(_)));
    }

    #[test]
    fn sentinel_master_fields_say_who_lost_the_master() {
        let f = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let ok = f(&[
            ("ip", "127.0.0.1"),
            ("port", "6379"),
            ("flags", "master"),
            ("last-ok-ping-reply", "300"),
        ]);
        assert_eq!(judge_sentinel(&ok), Seen::Reached("127.0.0.1".into(), 6379));
        for flags in [
            "master,s_down",
            "master,s_down,o_down",
            "master,disconnected",
        ] {
            let mut m = ok.clone();
            m.insert("flags".into(), flags.into());
            assert!(matches!(judge_sentinel(&m), Seen::Lost(_)), "{flags}");
        }
        let mut frozen = ok.clone();
        frozen.insert("last-ok-ping-reply".into(), "2500".into());
        assert!(matches!(judge_sentinel(&frozen), Seen::Lost(_)));
        let resp2 = Value::Array(vec![
            Value::BulkString(b"flags".to_vec()),
            Value::BulkString(b"master,o_down".to_vec()),
        ]);
        assert!(matches!(judge_sentinel(&fields(&resp2)), Seen::Lost(_)));
    }
}
