//! The fast path for the one event a generator reads at audience scale: a `message` event
//! (`docs/protocol.md`, section 2) in the gateway's own compact form, read by a scan for the
//! few fields the load tester needs (`ts`, `offset`, `epoch`, and in `data` our stamp) instead
//! of a full `serde` parse, which was about a tenth of a generator's CPU per received message
//! (docs/benchmarks.md, "Audience scale").
//!
//! It is never less strict than the parse it stands in for (`parse_event_full` in `ws.rs`): it
//! accepts only what that parse accepts, with the same result, and answers `None` ("not sure")
//! for anything else — whitespace between tokens, escapes in keys, `\u` escapes, floats, nested values in
//! fields it does not read, a field it does not expect, a repeated field, trailing bytes — so
//! that the full parse decides. The tests hold it to the full parse frame by frame.

use super::{Event, Position, Stamp};

/// The prefix of every `message` event the gateway writes.
const PREFIX: &[u8] = br#"{"type":"message","#;

/// A `message` event read by the scan; `None` when the full parse must decide.
pub fn message(text: &str) -> Option<Event> {
    let b = text.as_bytes();
    let mut s = Scanner { b, i: PREFIX.len() };
    if !b.starts_with(PREFIX) {
        return None;
    }
    let (mut ts, mut data, mut offset, mut epoch) = (None, None, None, None);
    loop {
        let key = s.key()?;
        match key {
            b"ts" => set(&mut ts, s.uint()?)?,
            b"offset" => set(&mut offset, s.uint()?)?,
            b"epoch" => match s.peek()? {
                b'"' => set(&mut epoch, Some(s.plain_string()?))?,
                b'n' => {
                    s.literal(b"null")?;
                    set(&mut epoch, None)?;
                }
                _ => return None,
            },
            b"data" => set(&mut data, s.data()?)?,
            // Read by the full parse for other events, with their own types: not here.
            b"type" | b"code" | b"key" | b"recovered" | b"duplicate" | b"hosts" | b"viewers" => {
                return None
            }
            _ => s.skip_simple()?,
        }
        match s.next()? {
            b',' => continue,
            b'}' if s.i == b.len() => break,
            _ => return None,
        }
    }
    let position = match (epoch.flatten(), offset) {
        (Some(epoch), Some(offset)) => Some(Position {
            epoch: epoch.to_string(),
            offset,
        }),
        _ => None,
    };
    Some(Event::Message {
        ts: ts.unwrap_or(0),
        stamp: data.flatten(),
        position,
    })
}

/// Sets a field once; a second time, the full parse decides (it refuses duplicates).
fn set<T>(slot: &mut Option<T>, v: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(v);
    Some(())
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn literal(&mut self, lit: &[u8]) -> Option<()> {
        if !self.b[self.i..].starts_with(lit) {
            return None;
        }
        self.i += lit.len();
        Some(())
    }

    /// `"KEY":`, a key without escapes.
    fn key(&mut self) -> Option<&'a [u8]> {
        let k = self.plain_string()?;
        (self.next()? == b':').then_some(k.as_bytes())
    }

    /// A string without any escape (anything else: the full parse decides).
    fn plain_string(&mut self) -> Option<&'a str> {
        if self.next()? != b'"' {
            return None;
        }
        let start = self.i;
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' => return None,
                c if c < 0x20 => return None,
                _ => {}
            }
        }
        std::str::from_utf8(&self.b[start..self.i - 1]).ok()
    }

    /// A string with the escapes JSON allows but `\u` (validated, not decoded).
    fn skip_string(&mut self) -> Option<()> {
        if self.next()? != b'"' {
            return None;
        }
        loop {
            match self.next()? {
                b'"' => return Some(()),
                b'\\' => match self.next()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    _ => return None,
                },
                c if c < 0x20 => return None,
                _ => {}
            }
        }
    }

    /// An unsigned integer as JSON writes it (no sign, no leading zero, no fraction or
    /// exponent), that fits in a `u64`.
    fn uint(&mut self) -> Option<u64> {
        let start = self.i;
        let mut n: u64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            self.i += 1;
        }
        let len = self.i - start;
        if len == 0 || (len > 1 && self.b[start] == b'0') {
            return None;
        }
        // A fraction or an exponent: not an integer for the full parse either, but let it say.
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(n)
    }

    /// A value of a field the load tester does not read: a string, an unsigned integer,
    /// `null`, `true` or `false`.
    fn skip_simple(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.skip_string(),
            b'0'..=b'9' => self.uint().map(|_| ()),
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            _ => None,
        }
    }

    /// `data`: our stamp when it is an object with `lt`, `p`, `s` and `t`; `Some(None)` for a
    /// string or an object without them (someone else's message).
    fn data(&mut self) -> Option<Option<Stamp>> {
        if self.peek()? == b'"' {
            self.skip_string()?;
            return Some(None);
        }
        if self.next()? != b'{' {
            return None;
        }
        let (mut lt, mut p, mut s, mut t) = (None, None, None, None);
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(None);
        }
        loop {
            match self.key()? {
                b"lt" => set(&mut lt, u32::try_from(self.uint()?).ok()?)?,
                b"p" => set(&mut p, u32::try_from(self.uint()?).ok()?)?,
                b"s" => set(&mut s, self.uint()?)?,
                b"t" => set(&mut t, self.uint()?)?,
                _ => self.skip_simple()?,
            }
            match self.next()? {
                b',' => continue,
                b'}' => break,
                _ => return None,
            }
        }
        Some(match (lt, p, s, t) {
            (Some(lt), Some(p), Some(s), Some(t)) => Some(Stamp { lt, p, s, t }),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{parse_event, parse_event_full, publish_frame};

    /// The scan either says the same as the full parse or leaves it to it.
    fn agrees(frame: &str) -> Option<Event> {
        let fast = message(frame);
        if fast.is_some() {
            assert_eq!(fast, parse_event_full(frame), "{frame}");
        }
        fast
    }

    fn stamp() -> Stamp {
        Stamp {
            lt: 0xdead_beef,
            p: 3,
            s: 41,
            t: 1_795_713_452_926_009,
        }
    }

    /// A message event as the gateway writes it, with our publish's data.
    fn gateway_frame(numbered: bool) -> String {
        let publish: serde_json::Value =
            serde_json::from_str(&publish_frame(stamp(), "xxxx", true)).unwrap();
        let mut f = format!(
            r#"{{"type":"message","room":"r-1","from":"h\"3","role":"host","data":{},"id":"n1-a-1","ts":1795713452927000"#,
            publish["data"]
        );
        f.push_str(if numbered {
            r#","offset":12,"epoch":"e7"}"#
        } else {
            "}"
        });
        f
    }

    #[test]
    fn reads_the_gateways_message_events() {
        for numbered in [false, true] {
            let f = gateway_frame(numbered);
            let e = agrees(&f).expect("the scan reads the gateway's own form");
            assert_eq!(
                e,
                Event::Message {
                    ts: 1_795_713_452_927_000,
                    stamp: Some(stamp()),
                    position: numbered.then(|| Position {
                        epoch: "e7".into(),
                        offset: 12
                    }),
                }
            );
            assert_eq!(parse_event(&f), Some(e));
        }
        // Someone else's data, and server messages.
        for f in [
            r#"{"type":"message","room":"r","from":null,"role":"server","data":"hi","id":"x","ts":5}"#,
            r#"{"type":"message","room":"r","from":null,"role":"server","data":{"text":"hi"},"id":"x","ts":5}"#,
            r#"{"type":"message","room":"r","from":"a","role":"viewer","data":{"lt":1,"p":2,"s":3},"id":"x","ts":5}"#,
            r#"{"type":"message","room":"r","from":"a","role":"viewer","data":{},"id":"x","ts":5,"epoch":null,"offset":3}"#,
        ] {
            match agrees(f).expect(f) {
                Event::Message { stamp, ts, .. } => assert_eq!((stamp, ts), (None, 5), "{f}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn leaves_anything_unusual_to_the_full_parse() {
        let f = gateway_frame(true);
        let cases = [
            // Not a message, or not in the gateway's order and form.
            r#"{"type":"welcome","node":"n1"}"#.to_string(),
            r#"{"room":"r","type":"message","ts":5}"#.to_string(),
            r#"{ "type":"message","ts":5}"#.to_string(),
            r#"{"type":"message", "ts":5}"#.to_string(),
            // Malformed or not what the full parse takes.
            format!("{f} "),
            format!("{f}x"),
            f[..f.len() - 1].to_string(),
            f.replace(r#""ts":1795713452927000"#, r#""ts":-1"#),
            f.replace(r#""ts":1795713452927000"#, r#""ts":1.5"#),
            f.replace(r#""ts":1795713452927000"#, r#""ts":01"#),
            f.replace(r#""ts":1795713452927000"#, r#""ts":99999999999999999999"#),
            f.replace(r#""ts":1795713452927000"#, r#""ts":"5""#),
            f.replace(r#""offset":12"#, r#""offset":12,"offset":13"#),
            f.replace(r#""id":"n1-a-1""#, r#""id":"n1\u0041""#),
            f.replace(r#""id":"n1-a-1""#, r#""id":"n1\qa""#),
            f.replace(r#""id":"n1-a-1""#, "\"id\":\"n1\ta\""),
            f.replace(r#""id":"n1-a-1""#, r#""id":[1,2]"#),
            f.replace(r#""id":"n1-a-1""#, r#""t\u0073":5"#),
            f.replace(r#""id":"n1-a-1""#, r#""hosts":"x""#),
            f.replace(r#""id":"n1-a-1""#, r#""type":"ack""#),
            f.replace(r#""epoch":"e7""#, r#""epoch":5"#),
            f.replace(r#""lt":"#, r#""lt":4294967296,"x":"#),
            f.replace(r#""s":41"#, r#""s":41,"s":42"#),
            f.replace(r#""f":"xxxx""#, r#""f":{"a":1}"#),
        ];
        for c in &cases {
            assert_eq!(agrees(c), None, "{c}");
            // The full parse still decides: the public entry point says what it says.
            assert_eq!(parse_event(c), parse_event_full(c), "{c}");
        }
    }

    #[test]
    fn agrees_with_the_full_parse_on_every_cut_and_byte_change() {
        // Every prefix and every single-byte change of a real frame: the scan either agrees
        // with the full parse or leaves it to it, and never panics.
        let f = gateway_frame(true);
        for n in 0..f.len() {
            agrees(&f[..n]);
        }
        let bytes = f.as_bytes();
        for i in 0..bytes.len() {
            for c in [
                b'"', b'\\', b',', b':', b'}', b'{', b'0', b'9', b'a', b' ', b'-',
            ] {
                let mut v = bytes.to_vec();
                v[i] = c;
                if let Ok(s) = std::str::from_utf8(&v) {
                    agrees(s);
                }
            }
        }
    }
}
