//! Async frame reading for the helper's sockets (client and agent side).
//!
//! Unlike a codec over a growing buffer, this reads one frame at a time:
//! the announced length is checked before anything is allocated, the body
//! buffer grows only as bytes arrive, and a frame begun but not finished
//! within [`BODY_TIMEOUT`] ends the connection (a peer that sends half a
//! frame and goes silent holds nothing for long).

use std::time::Duration;

use socket_proto::frame::{check_len, decode_body, FrameError, HEADER_LEN};
use socket_proto::JsonObject;
use tokio::io::{AsyncRead, AsyncReadExt};

/// How long the rest of a frame may take once its first byte arrived.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads one frame. `Ok(None)`: clean end of stream between frames.
///
/// Errors are [`FrameError`]s: a recoverable one
/// ([`FrameError::is_recoverable`]) leaves the reader at the next frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<JsonObject>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    // Between frames a connection may stay idle as long as it likes.
    let n = r.read(&mut header).await?;
    if n == 0 {
        return Ok(None);
    }
    let rest = async {
        read_full(r, &mut header[n..]).await?;
        let len = check_len(u32::from_be_bytes(header))?;
        // Grows as the body arrives; never the announced size up front.
        let mut body = Vec::with_capacity(len.min(64 * 1024));
        let got = (&mut *r).take(len as u64).read_to_end(&mut body).await?;
        if got < len {
            return Err(FrameError::Truncated);
        }
        Ok(body)
    };
    let body = tokio::time::timeout(BODY_TIMEOUT, rest)
        .await
        .map_err(|_| {
            FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the rest of the frame did not arrive in time",
            ))
        })??;
    decode_body(&body).map(Some)
}

async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    r.read_exact(buf).await.map(|_| ()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket_proto::frame::encode_frame;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn frames_errors_and_eof() {
        rt().block_on(async {
            let mut wire = encode_frame(&serde_json::json!({"a": 1})).unwrap();
            wire.extend_from_slice(&3u32.to_be_bytes());
            wire.extend_from_slice(b"[1]");
            wire.extend(encode_frame(&serde_json::json!({"b": 2})).unwrap());
            let mut r = wire.as_slice();
            assert_eq!(read_frame(&mut r).await.unwrap().unwrap()["a"], 1);
            let e = read_frame(&mut r).await.unwrap_err();
            assert!(e.is_recoverable(), "{e}");
            assert_eq!(read_frame(&mut r).await.unwrap().unwrap()["b"], 2);
            assert!(read_frame(&mut r).await.unwrap().is_none());

            let big = u32::MAX.to_be_bytes();
            let e = read_frame(&mut big.as_slice()).await.unwrap_err();
            assert!(matches!(e, FrameError::TooLarge(_)), "{e}");

            let mut half = 100u32.to_be_bytes().to_vec();
            half.extend_from_slice(b"{\"x\":");
            let e = read_frame(&mut half.as_slice()).await.unwrap_err();
            assert!(matches!(e, FrameError::Truncated), "{e}");
            let e = read_frame(&mut [0u8, 0].as_slice()).await.unwrap_err();
            assert!(matches!(e, FrameError::Truncated), "{e}");
        });
    }
}
