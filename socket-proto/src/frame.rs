//! Framing shared by both protocols: a 4-byte big-endian length, then that
//! many bytes of UTF-8 JSON whose top level is an object.
//!
//! The length is checked against [`MAX_FRAME_LEN`] before anything is
//! allocated for the body, so an announced 4 GiB costs nothing.

use std::io::{self, Read, Write};

use serde_json::{Map, Value};

/// Largest body either side accepts or sends: 10 MiB.
pub const MAX_FRAME_LEN: usize = 10 * 1024 * 1024;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// A decoded frame body: a JSON object.
pub type JsonObject = Map<String, Value>;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame length is zero")]
    ZeroLength,
    #[error("frame length {0} exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(u64),
    #[error("frame body is not valid UTF-8")]
    InvalidUtf8,
    #[error("frame body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("frame body is JSON but not an object (found {0})")]
    NotAnObject(&'static str),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl FrameError {
    /// Whether the connection can go on after this error: the frame was
    /// read whole, only its content was bad.
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            FrameError::InvalidUtf8 | FrameError::InvalidJson(_) | FrameError::NotAnObject(_)
        )
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks an announced body length.
pub fn check_len(len: u32) -> Result<usize, FrameError> {
    match len as usize {
        0 => Err(FrameError::ZeroLength),
        n if n > MAX_FRAME_LEN => Err(FrameError::TooLarge(len as u64)),
        n => Ok(n),
    }
}

/// Parses a complete body.
pub fn decode_body(body: &[u8]) -> Result<JsonObject, FrameError> {
    let text = std::str::from_utf8(body).map_err(|_| FrameError::InvalidUtf8)?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(FrameError::NotAnObject(kind_of(&other))),
        Err(e) => Err(FrameError::InvalidJson(e.to_string())),
    }
}

/// Serializes `value` as one frame (prefix + body).
pub fn encode_frame<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(value).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body.len() as u64));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Blocking read of one frame. `Ok(None)` is a clean end of stream (EOF
/// before the first byte of a frame).
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<JsonObject>, FrameError> {
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
    let len = check_len(u32::from_be_bytes(header))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    decode_body(&body).map(Some)
}

/// Blocking write of one frame.
pub fn write_frame<W: Write, T: serde::Serialize + ?Sized>(
    w: &mut W,
    value: &T,
) -> Result<(), FrameError> {
    w.write_all(&encode_frame(value)?)?;
    Ok(())
}

#[cfg(feature = "tokio")]
pub use codec::FrameCodec;

#[cfg(feature = "tokio")]
mod codec {
    use bytes::{Buf, BufMut, BytesMut};
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;

    /// tokio codec for the helper's sockets: decodes [`JsonObject`]s,
    /// encodes anything serializable.
    ///
    /// A frame whose body is bad (not UTF-8, not JSON, not an object) is
    /// consumed whole before the error is returned, so the connection can
    /// answer it and go on ([`FrameError::is_recoverable`]). A bad length
    /// cannot be skipped: the stream's framing is lost.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct FrameCodec;

    impl Decoder for FrameCodec {
        type Item = JsonObject;
        type Error = FrameError;

        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<JsonObject>, FrameError> {
            if src.len() < HEADER_LEN {
                return Ok(None);
            }
            let len = check_len(u32::from_be_bytes([src[0], src[1], src[2], src[3]]))?;
            if src.len() < HEADER_LEN + len {
                // Ask for what the frame needs, which the check above bounded.
                src.reserve(HEADER_LEN + len - src.len());
                return Ok(None);
            }
            src.advance(HEADER_LEN);
            let body = src.split_to(len);
            decode_body(&body).map(Some)
        }

        fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<JsonObject>, FrameError> {
            match self.decode(src)? {
                Some(frame) => Ok(Some(frame)),
                None if src.is_empty() => Ok(None),
                None => Err(FrameError::Truncated),
            }
        }
    }

    impl<T: serde::Serialize> Encoder<T> for FrameCodec {
        type Error = FrameError;

        fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), FrameError> {
            let body =
                serde_json::to_vec(&item).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
            if body.len() > MAX_FRAME_LEN {
                return Err(FrameError::TooLarge(body.len() as u64));
            }
            dst.reserve(HEADER_LEN + body.len());
            dst.put_u32(body.len() as u32);
            dst.extend_from_slice(&body);
            Ok(())
        }
    }
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
    }

    #[test]
    fn oversized_encode_is_refused() {
        let big = "x".repeat(MAX_FRAME_LEN);
        assert!(matches!(
            encode_frame(&json!({ "d": big })),
            Err(FrameError::TooLarge(_))
        ));
    }
}
