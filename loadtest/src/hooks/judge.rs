//! Judges the webhook receiver's record at the end of the run: per room, events in stream-id
//! order and `room.occupied`/`room.vacated` alternating (occupied first, vacated last); per list
//! key this generator saw welcomed, `member.joined`/`member.left` alternating (joined first, left
//! last), exactly one of each for a per-connection key (`conn:…`).

use std::collections::HashMap;

use super::{Kind, Record};

/// What the judge found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Judged {
    /// Expected events that did not come: a room without its `room.occupied` or final
    /// `room.vacated`, a key without its `member.joined` or final `member.left`.
    pub missing: u64,
    /// Events that came after a later one of their room (by stream id).
    pub out_of_order: u64,
    /// Events that break the alternation, a second join of a per-connection key, or member
    /// events for keys this generator never saw welcomed.
    pub unexpected: u64,
    /// Keys no member here was welcomed with whose events are one `member.joined` then one
    /// `member.left`: a connection the gateway took but whose welcome never reached the
    /// generator (its node died, or the attempt timed out, in between). Not judged.
    pub unseen: u64,
    /// Rooms judged.
    pub rooms: u64,
    /// Keys judged.
    pub keys: u64,
}

/// Walks one alternation (`open` → `close` → `open` …) that must start with `open` and end with
/// `close`: events out of turn are unexpected, an unfinished or absent one is missing.
fn alternation(kinds: impl Iterator<Item = Kind>, open: Kind, out: &mut Judged) -> usize {
    let mut is_open = false;
    let mut opens = 0;
    for k in kinds {
        if (k == open) != is_open {
            is_open = !is_open;
            if is_open {
                opens += 1;
            }
        } else {
            out.unexpected += 1;
        }
    }
    if is_open || opens == 0 {
        out.missing += 1;
    }
    opens
}

/// Judges `r`.
pub fn judge(r: &Record) -> Judged {
    let mut out = Judged::default();
    let empty = Vec::new();
    for (room, hooks) in &r.rooms {
        let mut last = (0, 0);
        for h in hooks {
            if h.seq < last {
                out.out_of_order += 1;
            }
            last = last.max(h.seq);
        }
        if !r.expected_rooms.contains(room) {
            continue; // a room of the run another generator's members were in
        }
        let _ = alternation(
            hooks
                .iter()
                .map(|h| h.kind)
                .filter(|k| matches!(k, Kind::Occupied | Kind::Vacated)),
            Kind::Occupied,
            &mut out,
        );
    }
    for room in &r.expected_rooms {
        if !r.rooms.contains_key(room) {
            out.missing += 1; // no event at all
        }
        out.rooms += 1;
    }
    for (room, keys) in &r.expected_keys {
        let hooks = r.rooms.get(room).unwrap_or(&empty);
        let mut by_key: HashMap<&str, Vec<Kind>> = HashMap::new();
        for h in hooks {
            if let (Some(k), Kind::Joined | Kind::Left) = (&h.key, h.kind) {
                by_key.entry(k.as_str()).or_default().push(h.kind);
            }
        }
        for key in keys {
            out.keys += 1;
            let kinds = by_key.remove(key.as_str()).unwrap_or_default();
            let joins = alternation(kinds.into_iter(), Kind::Joined, &mut out);
            if key.starts_with("conn:") && joins > 1 {
                out.unexpected += joins as u64 - 1;
            }
        }
        // Keys nobody here was welcomed with.
        for kinds in by_key.values() {
            if kinds[..] == [Kind::Joined, Kind::Left] {
                out.unseen += 1;
            } else {
                out.unexpected += kinds.len() as u64;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::Hook;
    use super::*;

    fn hook(seq: u64, kind: Kind, key: Option<&str>) -> Hook {
        Hook {
            seq: (seq, 0),
            kind,
            key: key.map(str::to_string),
        }
    }

    fn record(events: Vec<Hook>, keys: &[&str]) -> Record {
        let mut r = Record::default();
        r.expected_rooms.insert("lt-r0".into());
        r.expected_keys
            .insert("lt-r0".into(), keys.iter().map(|k| k.to_string()).collect());
        r.rooms.insert("lt-r0".into(), events);
        r
    }

    #[test]
    fn a_clean_run_across_a_node_kill() {
        use Kind::*;
        // conn:a on the killed node left (node_lost), reconnected as conn:c; user u twice.
        let r = record(
            vec![
                hook(1, Occupied, None),
                hook(2, Joined, Some("conn:a")),
                hook(3, Joined, Some("conn:b")),
                hook(4, Joined, Some("u")),
                hook(5, Left, Some("conn:a")),
                hook(6, Joined, Some("conn:c")),
                hook(7, Left, Some("u")),
                hook(8, Joined, Some("u")),
                hook(9, Left, Some("conn:b")),
                hook(10, Left, Some("conn:c")),
                hook(11, Left, Some("u")),
                hook(12, Vacated, None),
            ],
            &["conn:a", "conn:b", "conn:c", "u"],
        );
        let j = judge(&r);
        assert_eq!(
            j,
            Judged {
                rooms: 1,
                keys: 4,
                ..Judged::default()
            }
        );
    }

    #[test]
    fn missing_unexpected_and_out_of_order_events_count() {
        use Kind::*;
        let r = record(
            vec![
                hook(1, Occupied, None),
                hook(3, Joined, Some("conn:a")),
                hook(2, Joined, Some("conn:b")), // out of order
                hook(4, Left, Some("conn:a")),
                hook(5, Joined, Some("conn:a")), // a connection key joins once
                hook(6, Left, Some("conn:a")),
                hook(7, Joined, Some("conn:x")), // not ours, and unfinished
                hook(7, Joined, Some("conn:y")), // not ours: a welcome that never came
                hook(7, Left, Some("conn:y")),
                hook(8, Left, Some("u")), // left before joined
                                          // conn:b never leaves; no vacated; conn:c nothing at all
            ],
            &["conn:a", "conn:b", "conn:c", "u"],
        );
        let j = judge(&r);
        assert_eq!(j.out_of_order, 1);
        // conn:b unfinished, conn:c absent, u absent (its left is unexpected), no vacated.
        assert_eq!(j.missing, 4);
        // conn:a's second join, conn:x's join, u's stray left.
        assert_eq!(j.unexpected, 3);
        assert_eq!(j.unseen, 1);
    }

    #[test]
    fn rooms_must_alternate() {
        use Kind::*;
        let r = record(
            vec![
                hook(1, Vacated, None),
                hook(2, Occupied, None),
                hook(3, Occupied, None),
                hook(4, Vacated, None),
            ],
            &[],
        );
        let j = judge(&r);
        assert_eq!((j.unexpected, j.missing), (2, 0));
        let mut r = Record::default();
        r.expected_rooms.insert("lt-r9".into());
        assert_eq!(judge(&r).missing, 1);
    }
}
