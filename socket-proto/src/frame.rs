//! Framing shared by both protocols: a 4-byte big-endian length, then that
//! many bytes of UTF-8 JSON whose top level is an object.
//!
//! The announced length is checked against [`MAX_FRAME_LEN`] before anything
//! is allocated for the body, so an announced 4 GiB costs nothing.
//!
//! - Blocking side (the guest agent, the tests): [`read_frame`],
//!   [`write_frame`], [`encode_frame`].
//! - The pieces an async reader needs (the helper's `wire::read_frame`,
//!   which reads one frame at a time under a timeout): [`check_len`] before
//!   anything is allocated, then [`decode_body`].
//!
//! | condition | error | can the connection go on? |
//! |---|---|---|
//! | length 0 | [`FrameError::ZeroLength`] | no |
//! | length > 10 MiB | [`FrameError::TooLarge`] | no |
//! | body not UTF-8 | [`FrameError::InvalidUtf8`] | yes, the frame was consumed |
//! | body not JSON | [`FrameError::InvalidJson`] | yes |
//! | body JSON but not an object | [`FrameError::NotAnObject`] | yes |
//! | end of stream inside a frame | [`FrameError::Truncated`] | no |

use std::io::{self, Read, Write};

use serde_json::{Map, Value};

/// Largest body either side accepts or sends: 10 MiB.
pub const MAX_FRAME_LEN: usize = 10 * 1024 * 1024;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// A decoded frame body: a JSON object.
pub type JsonObject = Map<String, Value>;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is 0: no JSON object fits in zero bytes.
    #[error("frame length is zero")]
    ZeroLength,
    /// The length prefix (or, when encoding, the body) exceeds
    /// [`MAX_FRAME_LEN`].
    #[error("frame length {0} exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(u64),
    /// The body is not UTF-8.
    #[error("frame body is not valid UTF-8")]
    InvalidUtf8,
    /// The body is UTF-8 but not JSON (the parser's message).
    #[error("frame body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The body is JSON but its top level is not an object (what it is).
    #[error("frame body is JSON but not an object (found {0})")]
    NotAnObject(&'static str),
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// A value to send could not be serialized.
    #[error("cannot serialize the frame: {0}")]
    Encode(String),
    /// The underlying reader or writer failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl FrameError {
    /// Whether the connection can go on after this error: the frame was
    /// read whole and only its content was bad, so the next frame starts
    /// right after it. Any other error loses the framing (or the stream).
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            FrameError::InvalidUtf8 | FrameError::InvalidJson(_) | FrameError::NotAnObject(_)
        )
    }
}

/// What a JSON value is, for messages ("a string", "an array", ...).
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks an announced body length; returns it as a `usize`.
pub fn check_len(len: u32) -> Result<usize, FrameError> {
    match usize::try_from(len) {
        Ok(0) => Err(FrameError::ZeroLength),
        Ok(n) if n <= MAX_FRAME_LEN => Ok(n),
        _ => Err(FrameError::TooLarge(u64::from(len))),
    }
}

/// Parses a complete body (without its length prefix).
pub fn decode_body(body: &[u8]) -> Result<JsonObject, FrameError> {
    let text = std::str::from_utf8(body).map_err(|_| FrameError::InvalidUtf8)?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(FrameError::NotAnObject(json_kind(&other))),
        Err(e) => Err(FrameError::InvalidJson(e.to_string())),
    }
}

/// Serializes `value` as one whole frame: length prefix, then body.
pub fn encode_frame<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, FrameError> {
    encode_frame_with_capacity(value, 256)
}

/// [`encode_frame`] serializing straight behind the length prefix in one
/// buffer of `capacity` bytes to start with (no copy of the body; a good
/// guess spares the reallocations of a large one).
pub fn encode_frame_with_capacity<T: serde::Serialize + ?Sized>(
    value: &T,
    capacity: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(HEADER_LEN + capacity);
    out.extend_from_slice(&[0; HEADER_LEN]);
    serde_json::to_writer(&mut out, value).map_err(|e| FrameError::Encode(e.to_string()))?;
    let body = &out[HEADER_LEN..];
    // serde_json writes an object, and only an object, starting with '{'.
    if body.first() != Some(&b'{') {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        return Err(FrameError::NotAnObject(json_kind(&v)));
    }
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body.len() as u64));
    }
    let len = (body.len() as u32).to_be_bytes();
    out[..HEADER_LEN].copy_from_slice(&len);
    Ok(out)
}

/// Blocking read of one frame. `Ok(None)` is a clean end of stream (EOF
/// before the first byte of a frame).
///
/// After a recoverable error ([`FrameError::is_recoverable`]) the reader is
/// positioned at the next frame; after any other, the stream is unusable.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Option<JsonObject>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    // Checked before the body buffer exists.
    let len = check_len(u32::from_be_bytes(header))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    decode_body(&body).map(Some)
}

/// Blocking write of one frame, in a single `write_all` (so frames written
/// by several threads under one lock never interleave). Does not flush.
pub fn write_frame<W: Write + ?Sized, T: serde::Serialize + ?Sized>(
    w: &mut W,
    value: &T,
) -> Result<(), FrameError> {
    w.write_all(&encode_frame(value)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_blocking() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &json!({"method": "isRunning"})).unwrap();
        write_frame(&mut buf, &json!({"a": [1, 2]})).unwrap();
        assert_eq!(&buf[..4], &(buf.len() as u32 - 4 - 15).to_be_bytes());
        let mut r = buf.as_slice();
        assert_eq!(read_frame(&mut r).unwrap().unwrap()["method"], "isRunning");
        assert_eq!(read_frame(&mut r).unwrap().unwrap()["a"], json!([1, 2]));
        assert!(read_frame(&mut r).unwrap().is_none(), "clean EOF");
    }

    #[test]
    fn typed_errors() {
        let frame = |len: u32, body: &[u8]| {
            let mut v = len.to_be_bytes().to_vec();
            v.extend_from_slice(body);
            v
        };
        let read = |bytes: Vec<u8>| read_frame(&mut bytes.as_slice());
        assert!(matches!(read(frame(0, b"")), Err(FrameError::ZeroLength)));
        assert!(matches!(
            read(frame(u32::MAX, b"")),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            read(frame(MAX_FRAME_LEN as u32 + 1, b"")),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            read(frame(2, b"\xff\xfe")),
            Err(FrameError::InvalidUtf8)
        ));
        assert!(matches!(
            read(frame(3, b"{x}")),
            Err(FrameError::InvalidJson(_))
        ));
        assert!(matches!(
            read(frame(3, b"[1]")),
            Err(FrameError::NotAnObject("an array"))
        ));
        assert!(matches!(read(frame(10, b"{}")), Err(FrameError::Truncated)));
        assert!(matches!(read(vec![0, 0]), Err(FrameError::Truncated)));
        assert!(FrameError::InvalidUtf8.is_recoverable());
        assert!(!FrameError::ZeroLength.is_recoverable());
        assert!(!FrameError::TooLarge(1).is_recoverable());
        assert!(!FrameError::Truncated.is_recoverable());
    }

    #[test]
    fn exactly_the_limit_is_accepted() {
        assert_eq!(check_len(MAX_FRAME_LEN as u32).unwrap(), MAX_FRAME_LEN);
        assert!(matches!(
            check_len(MAX_FRAME_LEN as u32 + 1),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn a_bad_body_leaves_the_reader_at_the_next_frame() {
        let mut wire = 3u32.to_be_bytes().to_vec();
        wire.extend_from_slice(b"\"x\"");
        wire.extend(encode_frame(&json!({"ok": true})).unwrap());
        let mut r = wire.as_slice();
        let e = read_frame(&mut r).unwrap_err();
        assert!(matches!(e, FrameError::NotAnObject("a string")), "{e:?}");
        assert!(e.is_recoverable());
        assert_eq!(read_frame(&mut r).unwrap().unwrap()["ok"], true);
    }

    #[test]
    fn encoding_refuses_what_the_peer_would_refuse() {
        let big = "x".repeat(MAX_FRAME_LEN);
        assert!(matches!(
            encode_frame(&json!({ "d": big })),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            encode_frame(&json!([1])),
            Err(FrameError::NotAnObject("an array"))
        ));
        assert!(matches!(
            encode_frame("text"),
            Err(FrameError::NotAnObject("a string"))
        ));
    }
}
