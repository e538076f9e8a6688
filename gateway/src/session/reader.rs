//! The reading half of a session: frames in, commands out, limits enforced.
//!
//! The reader is the only caller of [`Decoder::read_frame`]; it runs in the session's task beside
//! the writer. It reassembles fragmented messages and enforces, each with its close code: message
//! size including reassembly (1009), fragment count (1009), UTF-8 of text (1007), masking and
//! framing rules (1002, found by the decoder). Pings are answered through the outbox; a client
//! Close ends the session with an echo. A publish waits for the broker, which paces a client to the speed
//! the cluster accepts its messages. Publishes are limited by `--max-publish-rate`, every other
//! command (`ping`, `refresh`, malformed ones) by `--max-control-rate`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::AuthError;
use crate::fanout::outbox::{Outbox, Outgoing, Pushed};
use crate::metrics::{DropReason, Source};
use crate::node::Node;
use crate::wire::close::CloseReason;
use crate::wire::frame::{opcode, DecodeError, Decoder};
use crate::wire::history::KeyScope;
use crate::wire::protocol::{self, ClientCommand, Role, RoomName};
use tokio::net::TcpStream;

/// The reader task's state.
pub struct Reader {
    node: Arc<Node>,
    outbox: Arc<Outbox>,
    room: RoomName,
    role: Role,
    name: Option<Arc<str>>,
    /// The publish rate limit; made at the first publish (most members never publish, and an
    /// idle session should stay small).
    rate: Option<Box<RateLimit>>,
    /// The control command rate limit (`ping`, `refresh`, malformed commands); made at the first
    /// such command, for the same reason.
    control: Option<Box<RateLimit>>,
    /// Who the token says the client is, and what it may do (see [`Reader::with_access`]).
    access: Access,
}

/// A session's identity and publish right.
struct Access {
    /// The session's id on this node (for the registry's token deadline).
    session: u64,
    /// The token's `sub`, `None` when anonymous or with `--auth none`.
    user: Option<Arc<str>>,
    /// Whether publishes are accepted; a refresh may change it.
    publish: bool,
    /// Whether the member is listed and sees the list ([`Node::lists`]).
    listed: bool,
}

/// A token bucket of publishes per connection, with a count of refusals for closing abusers.
struct RateLimit {
    /// Allowed per second; 0 disables the limit.
    rate: f64,
    /// Most tokens the bucket holds (the largest burst), at least 1.
    burst: f64,
    tokens: f64,
    last: Instant,
    /// Refusals in the current window.
    refused: u32,
    window_start: Instant,
}

/// Window over which refusals are counted towards closing a connection.
const ABUSE_WINDOW: Duration = Duration::from_secs(10);

/// The outcome of one publish attempt against the limit.
#[derive(Debug, PartialEq, Eq)]
enum Rate {
    Allowed,
    Refused,
    Abusive,
}

impl Reader {
    /// A reader for a member of `room`; publishes are limited by `--max-publish-rate`.
    pub fn new(
        node: Arc<Node>,
        outbox: Arc<Outbox>,
        room: RoomName,
        role: Role,
        name: Option<Arc<str>>,
    ) -> Self {
        let rate = None;
        Self {
            node,
            outbox,
            room,
            role,
            name,
            rate,
            control: None,
            access: Access {
                session: 0,
                user: None,
                publish: true,
                listed: false,
            },
        }
    }

    /// Sets the session's id, its user (`sub`) and whether it may publish.
    pub fn with_access(mut self, session: u64, user: Option<Arc<str>>, publish: bool) -> Self {
        self.access = Access {
            session,
            user,
            publish,
            listed: false,
        };
        self
    }

    /// Sets whether the member sees the room's list (the `members` command).
    pub fn with_list(mut self, listed: bool) -> Self {
        self.access.listed = listed;
        self
    }
}

impl RateLimit {
    /// A bucket of `rate` per second holding up to `burst`.
    fn new(rate: f64, burst: f64) -> Self {
        let now = Instant::now();
        let burst = burst.max(1.0);
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
            refused: 0,
            window_start: now,
        }
    }

    fn check(&mut self, now: Instant) -> Rate {
        if self.rate <= 0.0 {
            return Rate::Allowed;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Rate::Allowed;
        }
        if now.saturating_duration_since(self.window_start) > ABUSE_WINDOW {
            self.window_start = now;
            self.refused = 0;
        }
        self.refused += 1;
        let limit = (self.rate * 10.0).max(20.0) as u32;
        if self.refused > limit {
            Rate::Abusive
        } else {
            Rate::Refused
        }
    }
}

/// A fragmented message being reassembled.
struct Partial {
    opcode: u8,
    data: Vec<u8>,
    frames: usize,
}

/// Maps a decoding error to the reason the session ends.
fn read_error_reason(e: &DecodeError) -> CloseReason {
    match e {
        DecodeError::TooLarge => CloseReason::TooLarge,
        DecodeError::Eof => CloseReason::Eof,
        DecodeError::Io(_) => CloseReason::IoError,
        DecodeError::Protocol(_) => CloseReason::ProtocolError,
    }
}

/// Whether a client may send this close code (RFC 6455 §7.4).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

impl Reader {
    /// Reads until the client leaves, breaks a rule, or the session is closed from elsewhere (then
    /// the session aborts this task).
    pub async fn run<S: AsRef<TcpStream>>(mut self, mut decoder: Decoder<S>) {
        // Boxed: a fragmented message is rare, and its state should not size every idle reader.
        let mut partial: Option<Box<Partial>> = None;
        let node = self.node.clone();
        let cfg = &node.config;
        loop {
            let frame = match decoder.read_frame().await {
                Ok(f) => f,
                Err(e) => return self.outbox.close(read_error_reason(&e)),
            };
            self.outbox.touch();
            match frame.opcode {
                opcode::TEXT | opcode::BINARY => {
                    if partial.is_some() {
                        return self.outbox.close(CloseReason::ProtocolError);
                    }
                    if frame.fin {
                        if frame.opcode == opcode::TEXT
                            && std::str::from_utf8(&frame.payload).is_err()
                        {
                            return self.outbox.close(CloseReason::InvalidUtf8);
                        }
                        Box::pin(self.on_message(frame.opcode, &frame.payload)).await;
                    } else {
                        if cfg.max_fragments < 2 {
                            return self.outbox.close(CloseReason::TooLarge);
                        }
                        partial = Some(Box::new(Partial {
                            opcode: frame.opcode,
                            data: frame.payload.to_vec(),
                            frames: 1,
                        }));
                    }
                }
                opcode::CONTINUATION => {
                    let Some(p) = partial.as_mut() else {
                        return self.outbox.close(CloseReason::ProtocolError);
                    };
                    p.frames += 1;
                    if p.frames > cfg.max_fragments
                        || p.data.len() + frame.payload.len() > cfg.max_message_size
                    {
                        return self.outbox.close(CloseReason::TooLarge);
                    }
                    p.data.extend_from_slice(&frame.payload);
                    if frame.fin {
                        let p = partial.take().expect("checked above");
                        if p.opcode == opcode::TEXT && std::str::from_utf8(&p.data).is_err() {
                            return self.outbox.close(CloseReason::InvalidUtf8);
                        }
                        Box::pin(self.on_message(p.opcode, &p.data)).await;
                    }
                }
                opcode::PING => {
                    let _ = self.outbox.push_item(Outgoing::Pong(frame.payload));
                }
                opcode::PONG => {}
                _ => {
                    // Close (the decoder lets no other opcode through).
                    let p = &frame.payload;
                    let reason = match p.len() {
                        0 => CloseReason::ClientClosed,
                        1 => CloseReason::ProtocolError,
                        _ => {
                            let code = u16::from_be_bytes([p[0], p[1]]);
                            if !close_code_allowed(code) {
                                CloseReason::ProtocolError
                            } else if std::str::from_utf8(&p[2..]).is_err() {
                                CloseReason::InvalidUtf8
                            } else {
                                CloseReason::ClientClosed
                            }
                        }
                    };
                    return self.outbox.close(reason);
                }
            }
        }
    }

    /// Handles one complete message.
    /// Handles one whole message. Callers box this future: its awaits (a publish waiting for the
    /// broker) would otherwise size the idle session's future.
    async fn on_message(&mut self, op: u8, payload: &[u8]) {
        if op == opcode::BINARY {
            if !self.control_allowed() {
                return;
            }
            return self.refuse(
                "unsupported_binary",
                "binary messages are not supported; send JSON or text",
            );
        }
        // Checked by the caller; kept as a guard rather than an unwrap.
        let Ok(text) = std::str::from_utf8(payload) else {
            return self.outbox.close(CloseReason::InvalidUtf8);
        };
        let command = protocol::parse_command(text);
        let control = !matches!(
            command,
            Ok(ClientCommand::Publish(..) | ClientCommand::Chat(_))
        );
        if control && !self.control_allowed() {
            return;
        }
        match command {
            Ok(ClientCommand::Publish(data, key)) => self.publish(data, key.as_deref()).await,
            Ok(ClientCommand::Chat(text)) => self.publish(&protocol::chat_data(text), None).await,
            Ok(ClientCommand::Ping) => self.send(protocol::pong()),
            Ok(ClientCommand::Members(cursor)) => {
                // Boxed: a Redis round trip, alive only while it runs.
                Box::pin(self.members(cursor.as_deref())).await
            }
            Ok(ClientCommand::Refresh(token)) => {
                // Boxed for the same reason as a publish: verification may wait for a JWKS
                // fetch and a ban check, and an idle reader task should stay small.
                Box::pin(self.refresh(&token)).await
            }
            Err(e) => self.refuse(e.code(), &e.to_string()),
        }
    }

    /// Checks a control command (anything but a publish: `ping`, `refresh`, a malformed command)
    /// against `--max-control-rate`; each costs the node a reply and maybe a signature check and
    /// a Redis read, so a client may not make it do them without bound. A refused one is answered
    /// with `rate_limited` and counted; an abusive client is closed (1008).
    fn control_allowed(&mut self) -> bool {
        let max_rate = self.node.config.max_control_rate;
        let limit = self
            .control
            .get_or_insert_with(|| Box::new(RateLimit::new(max_rate, max_rate * 2.0)));
        match limit.check(Instant::now()) {
            Rate::Allowed => true,
            Rate::Refused => {
                self.node.metrics.control_rate_limited.increment(1);
                self.refuse(
                    "rate_limited",
                    "sending commands too fast; this one was not executed",
                );
                false
            }
            Rate::Abusive => {
                self.node.metrics.control_rate_limited.increment(1);
                self.outbox.close(CloseReason::RateLimited);
                false
            }
        }
    }

    /// A new token on the open socket: same `sub`, rights re-read, ban re-checked. Rights that
    /// no longer cover this room and role close the session (4503), a ban closes it (4502).
    async fn refresh(&mut self, token: &str) {
        let node = self.node.clone();
        let Some(verifier) = &node.auth else {
            return self.refuse("refresh_failed", "authentication is off on this node");
        };
        let identity = match verifier.verify(token).await {
            Ok(i) => i,
            Err(e) => {
                node.metrics.auth_failure(e);
                return self.refuse("refresh_failed", &e.to_string());
            }
        };
        if self.access.user.as_deref() != Some(&*identity.sub) {
            return self.refuse(
                "refresh_failed",
                "a refresh must carry a token for the same user (sub)",
            );
        }
        match identity.right(&self.room) {
            Some(right) if right.role == self.role => self.access.publish = right.publish,
            _ => {
                let reason = if identity.right(&self.room).is_some() {
                    AuthError::RoleNotGranted
                } else {
                    AuthError::RoomNotGranted
                };
                node.metrics.auth_failure(reason);
                return self.outbox.close(CloseReason::Forbidden);
            }
        }
        if crate::node::moderation::is_banned(&node, &identity.sub, &self.room).await {
            node.metrics.auth_failure(AuthError::Banned);
            return self.outbox.close(CloseReason::Banned);
        }
        node.registry.extend(self.access.session, identity.exp);
        let _ = self.outbox.push(protocol::refreshed(identity.exp));
    }

    /// Answers a `members` command with a page of the room's list; counted against
    /// `--max-control-rate` like every command but a publish.
    async fn members(&mut self, cursor: Option<&str>) {
        if !self.access.listed {
            return self.refuse(
                "not_listed",
                "this room does not list its members to you (see --list-rooms and the grant's list)",
            );
        }
        self.node.metrics.members_commands.increment(1);
        let page = self
            .node
            .broker
            .members(&self.room, cursor, crate::broker::roster::PAGE)
            .await;
        match page {
            Ok(page) => self.send(protocol::members(
                &self.room,
                page.version,
                &page.members,
                page.cursor.as_deref(),
                page.over,
            )),
            Err(crate::broker::BrokerError::Config(_)) => {
                self.refuse("invalid_command", "malformed members cursor")
            }
            Err(_) => self.refuse("unavailable", "the member list cannot be read right now"),
        }
    }

    /// Publishes `data`; with an idempotency `key`, answers `ack` (or an `error` carrying the key).
    async fn publish(&mut self, data: &serde_json::value::RawValue, key: Option<&str>) {
        if !self.access.publish {
            return self.refuse_publish(key, "forbidden", "you may not publish in this room");
        }
        let max_rate = self.node.config.max_publish_rate;
        let rate = self
            .rate
            .get_or_insert_with(|| Box::new(RateLimit::new(max_rate, max_rate)));
        match rate.check(Instant::now()) {
            Rate::Allowed => {}
            Rate::Refused => {
                self.node
                    .metrics
                    .dropped(DropReason::RateLimited)
                    .increment(1);
                return self.refuse_publish(
                    key,
                    "rate_limited",
                    "publishing too fast; this message was not published",
                );
            }
            Rate::Abusive => {
                self.node
                    .metrics
                    .dropped(DropReason::RateLimited)
                    .increment(1);
                return self.outbox.close(CloseReason::RateLimited);
            }
        }
        if !protocol::encoded_within(data, self.node.config.max_message_size) {
            self.node.metrics.dropped(DropReason::TooLarge).increment(1);
            return self.refuse_publish(
                key,
                "too_large",
                "this message is larger than --max-message-size once encoded (JSON escaping of \
                 control characters and quotes); it was not published",
            );
        }
        let from = self.name.as_deref();
        // Boxed: the publish future (a Redis round trip) is large and only alive while publishing,
        // so an idle reader task stays small.
        // A token holder's keys are its user's (a resend after a reconnect is still a repeat);
        // without a token there is nothing that outlives the connection but the shared scope.
        let scope = match &self.access.user {
            Some(sub) => KeyScope::User(sub.to_string()),
            None => KeyScope::Anonymous,
        };
        let publish = Box::pin(self.node.publish(
            &self.room,
            from,
            self.role,
            data,
            Source::Client,
            key.is_none(),
            key.map(|k| (&scope, k)),
        ));
        match (publish.await, key) {
            (Ok(p), Some(key)) => {
                let _ = self.outbox.push(protocol::ack(key, &p.ack));
            }
            (Ok(_), None) => {}
            (Err(e), key) => {
                tracing::debug!(room = %self.room, cause = %e, "client publish failed");
                let message = "the cluster's broker is unavailable: this message reached only the members on this node";
                match key {
                    // Keyed: the publisher retries with the same key; nothing was delivered locally
                    // either (see below), so the retry cannot make a duplicate.
                    Some(key) => {
                        self.node.metrics.client_error("unavailable");
                        let _ = self.outbox.push(protocol::error_for_key(
                            "unavailable",
                            "the cluster's broker is unavailable: not published; retry with the same key",
                            key,
                        ));
                    }
                    None => self.refuse("unavailable", message),
                }
            }
        }
    }

    /// Sends an `error` event; the connection stays open.
    fn refuse(&self, code: &str, message: &str) {
        self.node.metrics.client_error(code);
        self.send(protocol::error(code, message));
    }

    /// Refuses a publish: the `error` carries the publish's idempotency key when it had one, so
    /// that the publisher knows which one to send again (after a `rate_limited`) or drop.
    fn refuse_publish(&self, key: Option<&str>, code: &str, message: &str) {
        match key {
            Some(key) => {
                self.node.metrics.client_error(code);
                self.send(protocol::error_for_key(code, message, key));
            }
            None => self.refuse(code, message),
        }
    }

    /// Sends an event to this client (counted as delivered when the socket took it at once; the
    /// writer counts what it writes).
    fn send(&self, frame: bytes::Bytes) {
        if let Ok(Pushed::Written) = self.outbox.push(frame) {
            self.node.metrics.delivered.increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_refuses_excess_then_closes_abusers() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(2.0, 2.0);
        assert_eq!(r.check(t0), Rate::Allowed);
        assert_eq!(r.check(t0), Rate::Allowed);
        assert_eq!(r.check(t0), Rate::Refused, "burst of 2 used up");
        assert_eq!(
            r.check(t0 + Duration::from_millis(500)),
            Rate::Allowed,
            "refilled one token"
        );
        let mut verdicts = Vec::new();
        for i in 0..25 {
            verdicts.push(r.check(t0 + Duration::from_millis(500) + Duration::from_micros(i)));
        }
        assert_eq!(verdicts.iter().filter(|v| **v == Rate::Refused).count(), 19);
        assert_eq!(verdicts.last(), Some(&Rate::Abusive));
        let mut slow = RateLimit::new(0.5, 0.5);
        assert_eq!(
            slow.check(t0),
            Rate::Allowed,
            "a slow limit still allows a first publish"
        );
        assert_eq!(slow.check(t0), Rate::Refused);
        assert_eq!(slow.check(t0 + Duration::from_secs(2)), Rate::Allowed);
        let mut off = RateLimit::new(0.0, 0.0);
        assert!((0..1000).all(|_| off.check(t0) == Rate::Allowed));
    }

    #[test]
    fn control_limit_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        // The control limit's shape: 5 per second, bursts of 10.
        let mut c = RateLimit::new(5.0, 10.0);
        assert!((0..10).all(|_| c.check(t0) == Rate::Allowed), "the burst");
        assert_eq!(c.check(t0), Rate::Refused, "one more than the burst");
        assert_eq!(c.check(t0 + Duration::from_millis(199)), Rate::Refused);
        assert_eq!(
            c.check(t0 + Duration::from_millis(201)),
            Rate::Allowed,
            "one token per 200 ms"
        );
        // A long pause refills to the burst, never beyond it.
        let later = t0 + Duration::from_secs(60);
        assert!((0..10).all(|_| c.check(later) == Rate::Allowed));
        assert_eq!(c.check(later), Rate::Refused);
    }
}
