//! Sans-IO check of the node name a ractor_cluster peer claims, read off the bytes it sends.
//!
//! ractor_cluster frames are a big-endian `u64` length and a protobuf `meta.NetworkMessage`. Field 1
//! of that message is an `auth.AuthenticationMessage`, whose `name` (field 1, a `NameMessage`, sent
//! by a dialer) and `server_challenge` (field 4, a `Challenge`, sent by the accepting side) both carry
//! the sender's node name in their field 1. [`NameCheck`] walks the top-level fields of every frame,
//! skips all but the authentication ones without buffering them, and fails as soon as an
//! authentication message names anyone but the expected node — before ractor has decoded it.

use std::fmt;

/// The largest authentication field we buffer; real ones are well under 200 bytes.
const MAX_AUTH_FIELD: u64 = 16 * 1024;
/// `meta.NetworkMessage.auth`.
const FIELD_AUTH: u64 = 1;
/// `auth.AuthenticationMessage.name` and `.server_challenge`.
const FIELD_NAME_MESSAGE: u64 = 1;
const FIELD_CHALLENGE: u64 = 4;
/// `NameMessage.name` and `Challenge.name`.
const FIELD_NAME: u64 = 1;

/// Why a peer's byte stream was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WireError {
    /// The peer claimed another node name.
    Mismatch { claimed: String },
    /// Not a well-formed ractor_cluster stream.
    Malformed(&'static str),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Mismatch { claimed } => {
                write!(
                    f,
                    "peer claims ractor node {claimed:?}, not its certificate name"
                )
            }
            WireError::Malformed(what) => write!(f, "malformed cluster frame: {what}"),
        }
    }
}

#[derive(Debug, Default)]
struct Varint {
    value: u64,
    shift: u32,
}

impl Varint {
    /// Add one byte; the value once it is complete.
    fn push(&mut self, b: u8) -> Result<Option<u64>, WireError> {
        if self.shift > 63 {
            return Err(WireError::Malformed("varint too long"));
        }
        self.value |= u64::from(b & 0x7f) << self.shift;
        if b & 0x80 == 0 {
            return Ok(Some(self.value));
        }
        self.shift += 7;
        Ok(None)
    }
}

#[derive(Debug)]
enum State {
    /// Reading a frame's length prefix.
    Len { buf: [u8; 8], have: usize },
    /// Reading a field tag; `left` counts the frame's remaining bytes.
    Tag { left: u64, v: Varint },
    /// Reading the length of a length-delimited field.
    FieldLen { left: u64, field: u64, v: Varint },
    /// Skipping a varint field.
    SkipVarint { left: u64 },
    /// Skipping `n` bytes of a field.
    Skip { left: u64, n: u64 },
    /// Collecting an authentication field of `need` bytes.
    Auth {
        left: u64,
        need: usize,
        buf: Vec<u8>,
    },
}

impl State {
    fn frame_start() -> Self {
        State::Len {
            buf: [0; 8],
            have: 0,
        }
    }

    fn after_field(left: u64) -> Self {
        if left == 0 {
            State::frame_start()
        } else {
            State::Tag {
                left,
                v: Varint::default(),
            }
        }
    }
}

/// Watches one direction of a ractor_cluster session for the name the sender claims.
#[derive(Debug)]
pub(crate) struct NameCheck {
    expected: String,
    state: State,
}

impl NameCheck {
    /// `expected` is the full ractor name, `node@host`.
    pub(crate) fn new(expected: String) -> Self {
        Self {
            expected,
            state: State::frame_start(),
        }
    }

    /// Feed the next bytes of the stream, in order.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<(), WireError> {
        let mut i = 0;
        while i < data.len() {
            let next = match &mut self.state {
                State::Len { buf, have } => {
                    buf[*have] = data[i];
                    i += 1;
                    *have += 1;
                    if *have < 8 {
                        continue;
                    }
                    State::after_field(u64::from_be_bytes(*buf))
                }
                State::Tag { left, v } => {
                    let b = data[i];
                    i += 1;
                    *left -= 1;
                    let Some(tag) = v.push(b)? else {
                        if *left == 0 {
                            return Err(WireError::Malformed("frame ends inside a tag"));
                        }
                        continue;
                    };
                    let left = *left;
                    let need = |n: u64| {
                        if n > left {
                            Err(WireError::Malformed("field overruns its frame"))
                        } else {
                            Ok(())
                        }
                    };
                    match tag & 7 {
                        0 => {
                            need(1)?;
                            State::SkipVarint { left }
                        }
                        1 => {
                            need(8)?;
                            State::Skip { left, n: 8 }
                        }
                        5 => {
                            need(4)?;
                            State::Skip { left, n: 4 }
                        }
                        2 => {
                            need(1)?;
                            State::FieldLen {
                                left,
                                field: tag >> 3,
                                v: Varint::default(),
                            }
                        }
                        _ => return Err(WireError::Malformed("unsupported wire type")),
                    }
                }
                State::FieldLen { left, field, v } => {
                    let b = data[i];
                    i += 1;
                    *left -= 1;
                    let Some(n) = v.push(b)? else {
                        if *left == 0 {
                            return Err(WireError::Malformed("frame ends inside a length"));
                        }
                        continue;
                    };
                    if n > *left {
                        return Err(WireError::Malformed("field overruns its frame"));
                    }
                    if *field != FIELD_AUTH {
                        State::Skip { left: *left, n }
                    } else if n > MAX_AUTH_FIELD {
                        return Err(WireError::Malformed("authentication field too large"));
                    } else if n == 0 {
                        // An empty AuthenticationMessage names nobody.
                        State::after_field(*left)
                    } else {
                        let need = n as usize; // <= MAX_AUTH_FIELD
                        State::Auth {
                            left: *left,
                            need,
                            buf: Vec::with_capacity(need),
                        }
                    }
                }
                State::SkipVarint { left } => {
                    let b = data[i];
                    i += 1;
                    *left -= 1;
                    if b & 0x80 != 0 {
                        if *left == 0 {
                            return Err(WireError::Malformed("frame ends inside a varint"));
                        }
                        continue;
                    }
                    State::after_field(*left)
                }
                State::Skip { left, n } => {
                    let avail = (data.len() - i) as u64;
                    let k = avail.min(*n);
                    i += k as usize;
                    *n -= k;
                    *left -= k;
                    if *n > 0 {
                        continue;
                    }
                    State::after_field(*left)
                }
                State::Auth { left, need, buf } => {
                    let k = (data.len() - i).min(*need - buf.len());
                    buf.extend_from_slice(&data[i..i + k]);
                    i += k;
                    *left -= k as u64;
                    if buf.len() < *need {
                        continue;
                    }
                    check_auth(buf, &self.expected)?;
                    State::after_field(*left)
                }
            };
            self.state = next;
        }
        Ok(())
    }
}

/// Read a varint from the front of `buf`.
fn take_varint(buf: &mut &[u8]) -> Result<u64, WireError> {
    let mut v = Varint::default();
    while let Some((&b, rest)) = buf.split_first() {
        *buf = rest;
        if let Some(n) = v.push(b)? {
            return Ok(n);
        }
    }
    Err(WireError::Malformed("truncated varint"))
}

/// One field of a buffered message: its number and, for length-delimited ones, the payload.
fn take_field<'a>(buf: &mut &'a [u8]) -> Result<(u64, Option<&'a [u8]>), WireError> {
    let tag = take_varint(buf)?;
    let skip = |buf: &mut &'a [u8], n: usize| -> Result<&'a [u8], WireError> {
        if buf.len() < n {
            return Err(WireError::Malformed("truncated field"));
        }
        let (head, rest) = buf.split_at(n);
        *buf = rest;
        Ok(head)
    };
    match tag & 7 {
        0 => {
            take_varint(buf)?;
            Ok((tag >> 3, None))
        }
        1 => skip(buf, 8).map(|_| (tag >> 3, None)),
        5 => skip(buf, 4).map(|_| (tag >> 3, None)),
        2 => {
            let n = usize::try_from(take_varint(buf)?)
                .map_err(|_| WireError::Malformed("field length"))?;
            skip(buf, n).map(|p| (tag >> 3, Some(p)))
        }
        _ => Err(WireError::Malformed("unsupported wire type")),
    }
}

/// Check every name an `AuthenticationMessage` carries. A name-bearing message without a name
/// (it would decode as "") is a mismatch too.
fn check_auth(mut msg: &[u8], expected: &str) -> Result<(), WireError> {
    while !msg.is_empty() {
        let (field, payload) = take_field(&mut msg)?;
        let Some(mut inner) = payload else { continue };
        if field != FIELD_NAME_MESSAGE && field != FIELD_CHALLENGE {
            continue;
        }
        let mut named = false;
        while !inner.is_empty() {
            let (f, p) = take_field(&mut inner)?;
            if let (FIELD_NAME, Some(name)) = (f, p) {
                named = true;
                if name != expected.as_bytes() {
                    return Err(WireError::Mismatch {
                        claimed: String::from_utf8_lossy(name).into_owned(),
                    });
                }
            }
        }
        if !named {
            return Err(WireError::Mismatch {
                claimed: String::new(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn len_field(field: u64, payload: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }

    fn frame(msg: &[u8]) -> Vec<u8> {
        let mut out = (msg.len() as u64).to_be_bytes().to_vec();
        out.extend_from_slice(msg);
        out
    }

    /// A `NetworkMessage{auth: AuthenticationMessage{<which>: {name, flags{version 1}, ...}}}`.
    fn auth_frame(which: u64, name: &str) -> Vec<u8> {
        let mut inner = Vec::new();
        len_field(FIELD_NAME, name.as_bytes(), &mut inner);
        len_field(2, &[0x08, 0x01], &mut inner); // flags { version: 1 }
        if which == FIELD_CHALLENGE {
            inner.extend_from_slice(&[0x18, 0xB9, 0x60]); // challenge: 12345
        }
        len_field(3, b"swarm:0", &mut inner);
        let mut auth = Vec::new();
        len_field(which, &inner, &mut auth);
        let mut net = Vec::new();
        len_field(FIELD_AUTH, &auth, &mut net);
        frame(&net)
    }

    /// A control frame with a varint, a fixed64 and a long payload.
    fn control_frame(n: usize) -> Vec<u8> {
        let mut ctl = vec![0x08, 0x96, 0x01, 0x11, 1, 2, 3, 4, 5, 6, 7, 8];
        len_field(7, &vec![0xAB; n], &mut ctl);
        let mut net = Vec::new();
        len_field(3, &ctl, &mut net);
        frame(&net)
    }

    fn stream(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    fn feed_in_chunks(bytes: &[u8], chunk: usize) -> Result<(), WireError> {
        let mut check = NameCheck::new("node-b@swarm".into());
        for c in bytes.chunks(chunk) {
            check.feed(c)?;
        }
        Ok(())
    }

    #[test]
    fn the_expected_name_passes_in_any_chunking() {
        let s = stream(&[
            auth_frame(FIELD_NAME_MESSAGE, "node-b@swarm"),
            control_frame(3000),
            auth_frame(FIELD_CHALLENGE, "node-b@swarm"),
            frame(&[]),
            control_frame(0),
        ]);
        for chunk in [1, 2, 3, 7, 64, 1000, s.len()] {
            assert_eq!(feed_in_chunks(&s, chunk), Ok(()), "chunk {chunk}");
        }
    }

    #[test]
    fn another_name_is_refused_as_a_dialer_or_a_server() {
        for which in [FIELD_NAME_MESSAGE, FIELD_CHALLENGE] {
            let s = stream(&[control_frame(10), auth_frame(which, "mallory@swarm")]);
            for chunk in [1, 5, s.len()] {
                assert_eq!(
                    feed_in_chunks(&s, chunk),
                    Err(WireError::Mismatch {
                        claimed: "mallory@swarm".into()
                    })
                );
            }
        }
        // The node part alone, or another host, is not the same name either.
        let s = auth_frame(FIELD_NAME_MESSAGE, "node-b");
        assert!(matches!(
            feed_in_chunks(&s, 4),
            Err(WireError::Mismatch { .. })
        ));
    }

    #[test]
    fn a_name_message_without_a_name_is_refused() {
        let mut auth = Vec::new();
        len_field(FIELD_NAME_MESSAGE, &[0x20, 0x05], &mut auth); // only connection_id
        let mut net = Vec::new();
        len_field(FIELD_AUTH, &auth, &mut net);
        assert_eq!(
            feed_in_chunks(&frame(&net), 3),
            Err(WireError::Mismatch {
                claimed: String::new()
            })
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut f = (5u64).to_be_bytes().to_vec();
        f.extend_from_slice(&[0x0A, 0x7F, 0, 0, 0]); // auth field longer than its frame
        assert!(matches!(
            feed_in_chunks(&f, 2),
            Err(WireError::Malformed(_))
        ));
        let mut f = (2u64).to_be_bytes().to_vec();
        f.extend_from_slice(&[0x0B, 0x00]); // group wire type
        assert!(matches!(
            feed_in_chunks(&f, 1),
            Err(WireError::Malformed(_))
        ));
        // Pseudo-random bytes never panic.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..200 {
            let bytes: Vec<u8> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = feed_in_chunks(&bytes, 1 + (x % 9) as usize);
        }
    }
}
