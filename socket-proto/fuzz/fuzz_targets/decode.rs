#![no_main]
//! Feeds arbitrary bytes, in arbitrary chunks, to the frame decoder and
//! every decoded frame to the host and guest message parsers.

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use socket_proto::guest::GuestFrame;
use socket_proto::host::RequestEnvelope;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = (chunk as usize % 64) + 1;
    let mut codec = socket_proto::frame::FrameCodec;
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(obj)) => {
                    if let Ok(env) = RequestEnvelope::from_object(obj.clone()) {
                        let _ = env.method();
                    }
                    let _ = GuestFrame::parse(obj);
                }
                Ok(None) => break,
                Err(e) if e.is_recoverable() => continue,
                Err(_) => return,
            }
        }
    }
    let _ = socket_proto::frame::read_frame(&mut &rest[..]);
});
