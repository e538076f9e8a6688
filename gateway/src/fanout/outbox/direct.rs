//! The non-blocking writes a push makes to an idle socket: one frame (header from the stack,
//! the shared payload itself) or up to [`WRITE_FRAMES`] framed messages in one `send`/`sendmsg`.

use std::io::{ErrorKind, IoSlice};

use arrayvec::ArrayVec;
use bytes::Bytes;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::Outgoing;
use crate::wire::frame::frame_head;

/// Most frames one direct write carries (two iovecs each, far below the kernel's `IOV_MAX`).
pub(super) const WRITE_FRAMES: usize = 32;

/// What a direct write did.
pub(super) enum Direct {
    /// The whole frame was written.
    All,
    /// Only a part: these bytes (framed already) remain.
    Part(Bytes),
    /// Nothing: the socket's send buffer is full.
    None,
    /// The socket failed.
    Failed,
}

/// A non-blocking `sendmsg` through the runtime's readiness tracking (a `WouldBlock` clears it,
/// so the writer's next wait is a real one). `sendmsg` rather than `writev`: a socket call skips
/// the VFS write path, which showed as ~10 % of the gateway's CPU in a broadcast profile.
pub fn send_vectored(socket: &TcpStream, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
    socket.try_io(Interest::WRITABLE, || {
        socket2::SockRef::from(socket).send_vectored(bufs)
    })
}

/// A non-blocking `sendmsg` that skips the runtime's readiness check: a push writes only to a
/// socket whose writer is idle, which is writable unless the kernel says otherwise, and reading
/// the readiness of thousands of sockets per message cost a cache miss each (~2.4 % of the
/// gateway's CPU in a broadcast profile). A `WouldBlock` here leaves the readiness stale: the
/// writer's wait then returns at once, its own write (through [`send_vectored`]) meets the
/// `WouldBlock` and clears it, and its next wait is a real one.
fn send_now(socket: &TcpStream, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
    socket2::SockRef::from(socket).send_vectored(bufs)
}

/// One vectored non-blocking write of a whole frame: the header from the stack, the payload the
/// shared bytes themselves (no copy).
pub(super) fn write_now(socket: &TcpStream, item: &Outgoing) -> Direct {
    let Some((opcode, payload)) = item.frame() else {
        return Direct::None;
    };
    let mut head = [0u8; 16];
    let n = frame_head(&mut head, opcode, payload);
    let total = n + payload.len();
    match send_now(socket, &[IoSlice::new(&head[..n]), IoSlice::new(payload)]) {
        Ok(w) if w == total => Direct::All,
        Ok(w) if w >= n => Direct::Part(match item {
            Outgoing::Text(b) | Outgoing::Pong(b) => b.slice(w - n..),
            _ => Bytes::copy_from_slice(&payload[w - n..]),
        }),
        Ok(w) => {
            let mut rest = Vec::with_capacity(total - w);
            rest.extend_from_slice(&head[w..n]);
            rest.extend_from_slice(payload);
            Direct::Part(Bytes::from(rest))
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => Direct::None,
        Err(_) => Direct::Failed,
    }
}

/// What a direct write of framed messages did.
pub(super) enum Written {
    /// This many whole frames went out, and this many bytes of the next one (0: none).
    Frames(usize, usize),
    /// The socket failed.
    Failed,
}

/// One non-blocking write of up to [`WRITE_FRAMES`] framed messages, without the runtime's
/// readiness check (see [`send_now`]): a plain `send` of the shared bytes for one (no message header or iovec array for the kernel to copy in: ~3 % of the
/// gateway's CPU in a broadcast profile went to `sendmsg`'s own handling), one vectored
/// `sendmsg` for several.
pub(super) fn write_frames(socket: &TcpStream, frames: &[&[u8]]) -> Written {
    let sock = socket2::SockRef::from(socket);
    let sent = if let [one] = frames {
        sock.send(one)
    } else {
        let iov: ArrayVec<IoSlice<'_>, WRITE_FRAMES> =
            frames.iter().map(|f| IoSlice::new(f)).collect();
        sock.send_vectored(&iov)
    };
    match sent {
        Ok(mut w) => {
            for (k, f) in frames.iter().enumerate() {
                if w < f.len() {
                    return Written::Frames(k, w);
                }
                w -= f.len();
            }
            Written::Frames(frames.len(), 0)
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => Written::Frames(0, 0),
        Err(_) => Written::Failed,
    }
}
