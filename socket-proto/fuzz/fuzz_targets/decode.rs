#![no_main]
//! Feeds arbitrary bytes, in arbitrary chunks, to both frame decoders (the
//! tokio codec and the blocking reader) and every decoded frame to all the
//! host and guest message parsers. Nothing may panic, and both decoders
//! must agree on the frames.

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use socket_proto::frame::{read_frame, FrameCodec, JsonObject};
use socket_proto::guest::{flatten_event, GuestEvent, GuestFrame, GuestNotification, GuestRequest};
use socket_proto::host::{ClientEvent, HostRequest};
use tokio_util::codec::Decoder;

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

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = (chunk as usize % 64) + 1;

    // The tokio codec, fed in chunks.
    let mut codec = FrameCodec;
    let mut buf = BytesMut::new();
    let mut from_codec = Vec::new();
    'feed: for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(obj)) => {
                    parse_everything(&obj);
                    from_codec.push(Some(obj));
                }
                Ok(None) => break,
                Err(e) if e.is_recoverable() => from_codec.push(None),
                Err(_) => break 'feed,
            }
        }
    }

    // The blocking reader, on the same bytes.
    let mut r = rest;
    let mut from_reader = Vec::new();
    loop {
        match read_frame(&mut r) {
            Ok(Some(obj)) => from_reader.push(Some(obj)),
            Ok(None) => break,
            Err(e) if e.is_recoverable() => from_reader.push(None),
            Err(_) => break,
        }
    }
    // The reader sees the whole input; the codec may stop short of a
    // frame still incomplete. Everything the codec produced, the reader did.
    assert!(from_codec.len() <= from_reader.len());
    assert_eq!(from_codec[..], from_reader[..from_codec.len()]);
});
