//! The node's identified sessions by id, with who they are (`sub`), where (room) and until when
//! (token `exp`): what moderation needs to find the sessions of a user a disconnect command
//! names, and what the [`expiry`](crate::node::expiry) timer needs to warn and close sessions whose
//! token lapses. Anonymous sessions (no token) are not kept: no user command can name them and
//! they have no deadline; a room-wide kick reaches them through the hub's members.
//!
//! One std `Mutex` over a map and an ordered set of deadlines: every operation is a map or set
//! change, or a non-blocking push to an outbox, and nothing awaits under it. A session without a
//! token has no deadline, so the timer never looks at it; only the moderation scans visit every
//! entry, and they are rare (an operator's command).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use crate::fanout::outbox::Outbox;
use crate::wire::close::CloseReason;
use crate::wire::protocol::{self, RoomName};

/// One session's entry.
#[derive(Debug)]
struct Entry {
    room: RoomName,
    user: Option<Arc<str>>,
    /// Token expiry, unix milliseconds; `None` without a token.
    exp_ms: Option<u64>,
    /// Whether the `expiring` event for the current `exp_ms` was sent.
    warned: bool,
    outbox: Arc<Outbox>,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<u64, Entry>,
    /// (when, session): the next expiry action of each session with a token.
    deadlines: BTreeSet<(u64, u64)>,
}

/// What a disconnect command selects.
#[derive(Debug, Clone, Copy)]
pub struct Selector<'a> {
    /// Only this user's sessions (every session when `None`).
    pub user: Option<&'a str>,
    /// Only sessions in this room (every room when `None`).
    pub room: Option<&'a str>,
}

/// The node's sessions.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    /// `--token-expiry-warning` in milliseconds.
    warning_ms: u64,
}

impl Registry {
    /// An empty registry that warns `warning_ms` before a token's expiry.
    pub fn new(warning_ms: u64) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            warning_ms,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_deadline(&self, exp_ms: u64, warned: bool) -> u64 {
        if warned {
            exp_ms
        } else {
            exp_ms.saturating_sub(self.warning_ms)
        }
    }

    /// Adds a session; `exp` is its token's expiry in seconds. A session with neither a user nor
    /// an expiry is not kept (see the module docs).
    pub fn register(
        &self,
        session: u64,
        room: RoomName,
        user: Option<Arc<str>>,
        exp: Option<u64>,
        outbox: Arc<Outbox>,
    ) {
        if user.is_none() && exp.is_none() {
            return;
        }
        let exp_ms = exp.map(|e| e.saturating_mul(1000));
        let mut inner = self.lock();
        if let Some(exp_ms) = exp_ms {
            inner
                .deadlines
                .insert((self.next_deadline(exp_ms, false), session));
        }
        inner.sessions.insert(
            session,
            Entry {
                room,
                user,
                exp_ms,
                warned: false,
                outbox,
            },
        );
    }

    /// Removes a session.
    pub fn unregister(&self, session: u64) {
        let mut inner = self.lock();
        if let Some(e) = inner.sessions.remove(&session) {
            if let Some(exp_ms) = e.exp_ms {
                let at = self.next_deadline(exp_ms, e.warned);
                inner.deadlines.remove(&(at, session));
            }
        }
    }

    /// A refreshed token: the session now expires at `exp` (seconds).
    pub fn extend(&self, session: u64, exp: u64) {
        let mut inner = self.lock();
        let exp_ms = exp.saturating_mul(1000);
        let Some(e) = inner.sessions.get_mut(&session) else {
            return;
        };
        let old = e.exp_ms.map(|x| self.next_deadline(x, e.warned));
        e.exp_ms = Some(exp_ms);
        e.warned = false;
        if let Some(old) = old {
            inner.deadlines.remove(&(old, session));
        }
        inner
            .deadlines
            .insert((self.next_deadline(exp_ms, false), session));
    }

    /// Runs the expiry actions due at `now_ms`: an `expiring` event to sessions within the warning
    /// time of their `exp`, a 4010 close to those past it. Returns (warned, closed).
    pub fn expire(&self, now_ms: u64) -> (usize, usize) {
        let mut inner = self.lock();
        let (mut warned, mut closed) = (0, 0);
        while let Some(&(at, session)) = inner.deadlines.first() {
            if at > now_ms {
                break;
            }
            inner.deadlines.pop_first();
            let Some(e) = inner.sessions.get_mut(&session) else {
                continue;
            };
            let Some(exp_ms) = e.exp_ms else { continue };
            if !e.warned && now_ms < exp_ms {
                e.warned = true;
                let _ = e.outbox.push(protocol::expiring(exp_ms / 1000));
                warned += 1;
                inner.deadlines.insert((exp_ms, session));
            } else {
                e.outbox.close(CloseReason::TokenExpired);
                closed += 1;
            }
        }
        (warned, closed)
    }

    /// Closes every session `selector` names with `reason`; returns how many.
    pub fn close_matching(&self, selector: Selector<'_>, reason: CloseReason) -> usize {
        let inner = self.lock();
        let mut n = 0;
        for e in inner.sessions.values() {
            let user_ok = match selector.user {
                Some(u) => e.user.as_deref() == Some(u),
                None => true,
            };
            let room_ok = match selector.room {
                Some(r) => e.room.as_str() == r,
                None => true,
            };
            if user_ok && room_ok {
                e.outbox.close(reason);
                n += 1;
            }
        }
        n
    }

    /// Sessions registered.
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(8, 4096).0)
    }

    #[test]
    fn warns_then_closes_and_a_refresh_postpones_both() {
        let r = Registry::new(30_000);
        let room = RoomName::parse("r").unwrap();
        let a = outbox();
        let b = outbox();
        let c = outbox();
        r.register(1, room.clone(), Some("u1".into()), Some(100), a.clone());
        r.register(2, room.clone(), Some("u2".into()), Some(100), b.clone());
        r.register(3, room.clone(), None, None, c.clone());
        assert_eq!(r.expire(69_999), (0, 0));
        assert_eq!(r.expire(70_000), (2, 0), "warned 30 s before exp");
        r.extend(2, 200);
        assert_eq!(r.expire(100_000), (0, 1));
        assert_eq!(a.close_reason(), Some(CloseReason::TokenExpired));
        assert_eq!(b.close_reason(), None, "refreshed");
        assert_eq!(r.expire(170_000), (1, 0));
        r.unregister(2);
        assert_eq!(
            r.expire(1_000_000),
            (0, 0),
            "unregistered sessions leave no deadline"
        );
        assert_eq!(c.close_reason(), None, "no token, no expiry");
    }

    #[test]
    fn selectors() {
        let r = Registry::new(0);
        let (x, y) = (RoomName::parse("x").unwrap(), RoomName::parse("y").unwrap());
        let boxes: Vec<_> = (0..4).map(|_| outbox()).collect();
        r.register(1, x.clone(), Some("u1".into()), None, boxes[0].clone());
        r.register(2, y.clone(), Some("u1".into()), None, boxes[1].clone());
        r.register(3, x.clone(), Some("u2".into()), None, boxes[2].clone());
        r.register(4, y.clone(), None, None, boxes[3].clone());
        assert_eq!(r.len(), 3, "an anonymous session is not kept");
        let sel = |user, room| Selector { user, room };
        assert_eq!(
            r.close_matching(sel(Some("u1"), Some("x")), CloseReason::Banned),
            1
        );
        assert_eq!(
            r.close_matching(sel(None, Some("y")), CloseReason::Kicked),
            1
        );
        assert_eq!(
            r.close_matching(sel(Some("u2"), None), CloseReason::Kicked),
            1
        );
        assert_eq!(boxes[0].close_reason(), Some(CloseReason::Banned));
        assert_eq!(boxes[1].close_reason(), Some(CloseReason::Kicked));
        assert_eq!(
            boxes[3].close_reason(),
            None,
            "reached through the hub instead"
        );
    }
}
