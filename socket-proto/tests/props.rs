//! Property tests of the framing and the parsers: chunking never changes
//! what is decoded, no input panics, and an over-limit length is refused
//! before anything is allocated for it.

use std::io::{self, Read};

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use socket_proto::frame::{encode_frame, read_frame, FrameError, JsonObject, MAX_FRAME_LEN};
use socket_proto::guest::{flatten_event, GuestEvent, GuestFrame, GuestNotification, GuestRequest};
use socket_proto::host::{ClientEvent, HostRequest};

/// Names and fields the parsers look at, so that random objects often hit
/// their interesting paths.
const WORDS: &[&str] = &[
    "type",
    "method",
    "id",
    "params",
    "event",
    "result",
    "error",
    "request",
    "response",
    "notification",
    "spawn",
    "kill",
    "exit",
    "code",
    "signal",
    "data",
    "env",
    "token",
    "oauthToken",
    "configure",
    "writeStdin",
    "stdin",
    "ready",
    "agent.info",
    "userDataName",
    "userDataRoot",
    "name",
    "command",
    "args",
    "message",
];

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(WORDS).prop_map(str::to_owned),
        "[a-zA-Z]{1,8}",
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        // Floats that serde_json parses back exactly (without its
        // `float_roundtrip` feature it may be off by one ulp on others).
        (-1_000_000i64..1_000_000).prop_map(|n| Value::from(n as f64 / 8.0)),
        prop::sample::select(WORDS).prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(arb_key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_object() -> impl Strategy<Value = JsonObject> {
    prop::collection::btree_map(arb_key(), arb_json(), 0..8).prop_map(|m| m.into_iter().collect())
}

/// Every frame's cut points: sorted offsets into `wire`, first 0, last its
/// length.
fn cut_points(len: usize, cuts: &[prop::sample::Index]) -> Vec<usize> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
    points.push(0);
    points.push(len);
    points.sort();
    points
}

/// A reader that hands out `wire` in the given pieces, one per `read`.
struct Chunked {
    pieces: std::collections::VecDeque<Vec<u8>>,
}

impl Read for Chunked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(front) = self.pieces.front_mut() else {
                return Ok(0);
            };
            if front.is_empty() {
                self.pieces.pop_front();
                continue;
            }
            let n = front.len().min(buf.len());
            buf[..n].copy_from_slice(&front[..n]);
            front.drain(..n);
            return Ok(n);
        }
    }
}

/// A reader that yields a header and panics if read any further.
struct HeaderOnly {
    header: [u8; 4],
    given: usize,
}

impl Read for HeaderOnly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        assert!(self.given < 4, "the body of a refused frame was read");
        let n = (4 - self.given).min(buf.len());
        buf[..n].copy_from_slice(&self.header[self.given..self.given + n]);
        self.given += n;
        Ok(n)
    }
}

/// Runs every parser of the crate on a frame body; none may panic.
fn parse_everything(obj: &JsonObject) {
    if let Ok(req) = HostRequest::from_object(obj.clone()) {
        let _ = format!("{req:?}");
        let _ = serde_json::to_value(&req);
        let _ = req.method.to_guest_request();
    }
    let _ = ClientEvent::from_object(obj.clone());
    if let Ok(Some(frame)) = GuestFrame::parse(obj.clone()) {
        let _ = format!("{frame:?}");
        let _ = frame.to_client_frame();
        match frame {
            GuestFrame::Request { method, params, .. } => {
                let _ = GuestRequest::parse(&method, params);
            }
            GuestFrame::Notification { method, params } => {
                let _ = GuestNotification::parse(&method, params);
            }
            GuestFrame::Event { event, params } => {
                let _ = flatten_event(&event, &params);
                if let Ok(ev) = GuestEvent::parse(&event, params) {
                    let _ = ev.to_client_event();
                }
            }
            GuestFrame::Response { .. } => {}
        }
    }
}

proptest! {
    #[test]
    fn chunked_frames_decode_to_the_same_frames_blocking(
        frames in prop::collection::vec(arb_object(), 1..8),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend(encode_frame(f).unwrap());
        }
        let points = cut_points(wire.len(), &cuts);
        let mut reader = Chunked {
            pieces: points.windows(2).map(|w| wire[w[0]..w[1]].to_vec()).collect(),
        };
        let mut out = Vec::new();
        while let Some(frame) = read_frame(&mut reader).unwrap() {
            out.push(frame);
        }
        prop_assert_eq!(out, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_blocking_reader(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
    ) {
        let mut r = bytes.as_slice();
        loop {
            match read_frame(&mut r) {
                Ok(Some(obj)) => parse_everything(&obj),
                Ok(None) => break,
                Err(e) if e.is_recoverable() => continue,
                Err(_) => break,
            }
        }
    }

    #[test]
    fn arbitrary_objects_never_panic_the_parsers(obj in arb_object()) {
        parse_everything(&obj);
        // And every object survives the framing.
        let wire = encode_frame(&obj).unwrap();
        prop_assert_eq!(read_frame(&mut wire.as_slice()).unwrap().unwrap(), obj);
    }

    #[test]
    fn arbitrary_frames_never_panic_the_parsers(
        ty in prop::sample::select(&["request", "response", "notification", "event"][..]),
        name in prop::sample::select(WORDS),
        params in arb_json(),
    ) {
        let mut obj = Map::new();
        obj.insert("type".into(), json!(ty));
        obj.insert("method".into(), json!(name));
        obj.insert("event".into(), json!(name));
        obj.insert("id".into(), json!("1"));
        obj.insert("params".into(), params);
        parse_everything(&obj);
    }

    #[test]
    fn over_limit_lengths_are_refused_before_the_body_is_read(
        len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX,
    ) {
        let mut r = HeaderOnly { header: len.to_be_bytes(), given: 0 };
        let e = read_frame(&mut r).unwrap_err();
        prop_assert!(matches!(e, FrameError::TooLarge(n) if n == u64::from(len)));
    }
}
