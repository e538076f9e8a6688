//! Riders: a presence event or a keepalive Ping that waits, for a short while, for the member's
//! next room message and goes out in the same write.
//!
//! In a room with traffic, a presence round or a ping round costs every member a `send` of its
//! own (and the client a wake-up of its own) on top of the room's messages: at audience scale,
//! presence that changes every tick adds a fifth to the sends of a room at 1 msg/s. The node's
//! timers therefore *defer* these frames for members of rooms that had a fan-out lately
//! ([`Outbox::defer`]): the next fan-out to the member puts them in front of its messages in
//! one write ([`Outbox::push_messages`] with the room's presence frame), and what is still due
//! when the timer's wait is over is pushed on its own ([`Outbox::take_due`]). A member whose
//! session is catching up on history, or closing, is never deferred to.
//!
//! A due rider costs one bit in the queue's lock-guarded state; the presence frame itself is the
//! room's ([`crate::fanout::hub::Hub::set_presence_rider`]), shared by every member.

use arrayvec::ArrayVec;
use bytes::Bytes;

use super::Outbox;
use crate::wire::frame::PING_FRAME;

/// A frame that may ride with the next room message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rider {
    /// The room's latest presence event (a text frame).
    Presence,
    /// A keepalive Ping.
    Ping,
}

impl Rider {
    pub(super) fn bit(self) -> u8 {
        match self {
            Rider::Presence => 1,
            Rider::Ping => 2,
        }
    }
}

/// The riders one push takes along, framed (and whether each is a text frame), in the order they
/// go out: presence, then Ping; with room for the message they ride with.
pub(super) type Riders = ArrayVec<(Bytes, bool), 3>;

impl Outbox {
    /// Marks `rider` due: the next [`Outbox::push_messages`] takes it along. Returns false (and
    /// marks nothing) when the session is closing or catching up on history: push it instead.
    pub fn defer(&self, rider: Rider) -> bool {
        if self.is_closing() {
            return false;
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.held.is_some() {
            return false;
        }
        q.due |= rider.bit();
        true
    }

    /// Clears `rider` if it is still due and says whether it was: the timer then pushes it on
    /// its own.
    pub fn take_due(&self, rider: Rider) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let due = q.due & rider.bit() != 0;
        q.due &= !rider.bit();
        due && !self.is_closing()
    }
}

/// Takes the due riders out of `due` (the presence rider only when the room has a frame for it),
/// framed, presence first.
pub(super) fn take(due: &mut u8, presence: Option<&Bytes>) -> Riders {
    let mut out = Riders::new();
    if *due == 0 {
        return out;
    }
    if let Some(frame) = presence.filter(|_| *due & Rider::Presence.bit() != 0) {
        out.push((frame.clone(), true));
        *due &= !Rider::Presence.bit();
    }
    if *due & Rider::Ping.bit() != 0 {
        out.push((Bytes::from_static(&PING_FRAME), false));
        *due &= !Rider::Ping.bit();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::outbox::{Outgoing, PushedMany};
    use crate::wire::close::CloseReason;
    use crate::wire::frame::frame_text;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    fn framed(items: &[Outgoing]) -> Vec<(Vec<u8>, bool)> {
        items
            .iter()
            .map(|i| match i {
                Outgoing::Framed(b, text) => (b.to_vec(), *text),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn due_riders_go_in_front_of_the_next_message_in_its_write() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        let (outbox, mut rx) = Outbox::new(64, 1 << 20);
        outbox.attach(server);
        // The writer goes idle: pushes write directly from now on.
        let mut batch = Vec::new();
        let idle = tokio::time::timeout(
            Duration::from_millis(10),
            rx.recv_batch(&outbox, &mut batch, 8),
        );
        assert!(idle.await.is_err());
        let presence = frame_text(br#"{"type":"presence","hosts":1,"viewers":2}"#);
        let msg = frame_text(br#"{"type":"message","data":"hi"}"#);
        assert!(outbox.defer(Rider::Presence));
        assert!(outbox.defer(Rider::Ping));
        let out = outbox.push_messages(&[(msg.clone(), None)], true, Some(&presence));
        assert_eq!(
            out,
            PushedMany {
                written: 1,
                riders: 2,
                presence_written: 1,
                ..Default::default()
            }
        );
        assert!(!outbox.take_due(Rider::Presence) && !outbox.take_due(Rider::Ping));
        let want = [&presence[..], &PING_FRAME, &msg[..]].concat();
        let mut got = vec![0u8; want.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
        // Nothing due: the next message goes alone.
        let out = outbox.push_messages(&[(msg.clone(), None)], true, Some(&presence));
        assert_eq!((out.written, out.riders), (1, 0));
    }

    #[tokio::test]
    async fn riders_queue_in_front_while_the_writer_is_busy() {
        let (outbox, mut rx) = Outbox::new(64, 1 << 20);
        let presence = frame_text(b"p");
        let msgs = [(frame_text(b"m1"), None), (frame_text(b"m2"), None)];
        assert!(outbox.defer(Rider::Ping));
        assert!(outbox.defer(Rider::Presence));
        let out = outbox.push_messages(&msgs, true, Some(&presence));
        assert_eq!((out.queued, out.riders, out.written), (2, 2, 0));
        let mut batch = Vec::new();
        rx.recv_batch(&outbox, &mut batch, 8).await;
        assert_eq!(
            framed(&batch),
            vec![
                (presence.to_vec(), true),
                (PING_FRAME.to_vec(), false),
                (msgs[0].0.to_vec(), true),
                (msgs[1].0.to_vec(), true),
            ]
        );
    }

    #[tokio::test]
    async fn a_presence_rider_waits_for_the_rooms_frame_and_is_never_deferred_when_held_or_closing()
    {
        let (outbox, mut rx) = Outbox::new(64, 1 << 20);
        assert!(outbox.defer(Rider::Presence));
        assert!(outbox.defer(Rider::Ping));
        // No presence frame for the room (a member event, say): only the Ping rides.
        let out = outbox.push_messages(&[(frame_text(b"e"), None)], true, None);
        assert_eq!(out.riders, 1);
        let mut batch = Vec::new();
        rx.recv_batch(&outbox, &mut batch, 8).await;
        assert_eq!(framed(&batch)[0], (PING_FRAME.to_vec(), false));
        assert!(outbox.take_due(Rider::Presence), "still due");
        assert!(!outbox.take_due(Rider::Presence), "taken once");

        outbox.hold();
        assert!(!outbox.defer(Rider::Ping), "catching up: push it instead");
        outbox.release(std::iter::empty(), None);
        assert!(outbox.defer(Rider::Ping));
        outbox.close(CloseReason::Shutdown);
        assert!(!outbox.take_due(Rider::Ping), "closing: nothing to push");
        assert!(!outbox.defer(Rider::Ping));
    }

    #[tokio::test]
    async fn riders_count_against_the_bounds() {
        let (outbox, _rx) = Outbox::new(2, 1 << 20);
        outbox.push(bytes::Bytes::from_static(b"x")).unwrap();
        assert!(outbox.defer(Rider::Presence));
        assert!(outbox.defer(Rider::Ping));
        let out = outbox.push_messages(&[(frame_text(b"m"), None)], true, Some(&frame_text(b"p")));
        // The presence takes the last place; the Ping finds the outbox full: the message is
        // dropped and the session closes as a slow consumer.
        assert_eq!((out.queued, out.dropped, out.riders), (0, 1, 2));
        assert_eq!(outbox.close_reason(), Some(CloseReason::SlowConsumer));
    }
}
