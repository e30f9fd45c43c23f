//! Property tests of the framing.

use bytes::BytesMut;
use proptest::prelude::*;
use serde_json::{json, Value};
use socket_proto::frame::{encode_frame, FrameCodec, FrameError, MAX_FRAME_LEN};
use tokio_util::codec::Decoder;

fn arb_object() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    let inner = leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..6)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

proptest! {
    #[test]
    fn chunked_frames_decode_to_the_same_frames(
        frames in prop::collection::vec(arb_object(), 1..8),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend(encode_frame(f).unwrap());
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.push(0);
        points.push(wire.len());
        points.sort();
        let mut codec = FrameCodec;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for w in points.windows(2) {
            buf.extend_from_slice(&wire[w[0]..w[1]]);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                out.push(Value::Object(frame));
            }
        }
        prop_assert_eq!(out, frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut codec = FrameCodec;
        let mut buf = BytesMut::from(bytes.as_slice());
        // Keep decoding until it wants more bytes or fails.
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) if e.is_recoverable() => continue,
                Err(_) => break,
            }
        }
    }

    #[test]
    fn over_limit_lengths_are_refused_without_allocating(len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX) {
        let mut codec = FrameCodec;
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(b"{}");
        let r = codec.decode(&mut buf);
        prop_assert!(matches!(r, Err(FrameError::TooLarge(_))));
        prop_assert!(buf.capacity() < 1024, "capacity grew to {}", buf.capacity());
    }
}

#[test]
fn a_bad_body_is_consumed_so_the_stream_goes_on() {
    let mut codec = FrameCodec;
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&3u32.to_be_bytes());
    buf.extend_from_slice(b"[1]");
    buf.extend_from_slice(&encode_frame(&json!({"ok": 1})).unwrap());
    assert!(matches!(
        codec.decode(&mut buf),
        Err(FrameError::NotAnObject(_))
    ));
    assert_eq!(codec.decode(&mut buf).unwrap().unwrap()["ok"], 1);
}

#[test]
fn half_a_frame_at_eof_is_truncated() {
    let mut codec = FrameCodec;
    let wire = encode_frame(&json!({"a": 1})).unwrap();
    let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert!(matches!(
        codec.decode_eof(&mut buf),
        Err(FrameError::Truncated)
    ));
}
