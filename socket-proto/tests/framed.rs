//! `FrameCodec` under `tokio_util`'s `FramedRead`, as the helper uses it.
//! Driven by hand over an in-memory reader, so no runtime is needed.
#![cfg(feature = "tokio")]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures_core::Stream;
use serde_json::json;
use socket_proto::frame::{encode_frame, FrameCodec, FrameError};
use socket_proto::host::{HostMethod, HostRequest};
use tokio_util::codec::FramedRead;

fn next<S: Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(s).poll_next(&mut cx) {
        Poll::Ready(item) => item,
        Poll::Pending => panic!("an in-memory reader is never pending"),
    }
}

#[test]
fn framed_read_decodes_and_survives_a_bad_body() {
    let mut wire = encode_frame(&json!({"method": "isRunning", "id": 1})).unwrap();
    wire.extend_from_slice(&4u32.to_be_bytes());
    wire.extend_from_slice(b"nope");
    wire.extend(encode_frame(&json!({"method": "stopVM", "id": 2})).unwrap());

    let mut framed = FramedRead::new(&wire[..], FrameCodec);
    let first = next(&mut framed).unwrap().unwrap();
    assert_eq!(
        HostRequest::from_object(first).unwrap().method,
        HostMethod::IsRunning
    );
    // The bad body is an error the server answers...
    let e = next(&mut framed).unwrap().unwrap_err();
    assert!(matches!(e, FrameError::InvalidJson(_)), "{e:?}");
    assert!(e.is_recoverable());
    // ...then FramedRead yields one None, and polling on resumes.
    assert!(next(&mut framed).is_none());
    let third = next(&mut framed).unwrap().unwrap();
    assert_eq!(
        HostRequest::from_object(third).unwrap().method,
        HostMethod::StopVm
    );
    assert!(next(&mut framed).is_none(), "clean end of stream");
}

#[test]
fn framed_read_reports_a_truncated_frame() {
    let wire = encode_frame(&json!({"a": 1})).unwrap();
    let mut framed = FramedRead::new(&wire[..wire.len() - 2], FrameCodec);
    let e = next(&mut framed).unwrap().unwrap_err();
    assert!(matches!(e, FrameError::Truncated), "{e:?}");
}

#[test]
fn framed_read_stops_at_an_over_limit_length() {
    let mut wire = u32::MAX.to_be_bytes().to_vec();
    wire.extend_from_slice(b"{}");
    let mut framed = FramedRead::new(&wire[..], FrameCodec);
    let e = next(&mut framed).unwrap().unwrap_err();
    assert!(matches!(e, FrameError::TooLarge(_)), "{e:?}");
    assert!(!e.is_recoverable());
    assert!(framed.read_buffer().capacity() < 64 * 1024);
}

/// The agent's fast path for output events decodes to exactly what the
/// generic path encodes, escapes and non-ASCII text included.
#[test]
fn output_frames_match_the_generic_encoding() {
    use socket_proto::frame::read_frame;
    use socket_proto::guest::{encode_output_frame, GuestEvent, GuestFrame};
    let texts = [
        String::new(),
        "plain line\n".to_string(),
        "quote \" backslash \\ tab \t nul \u{0} bell \u{7} é ✓ 😀\r\n".to_string(),
        "x".repeat(70_000),
    ];
    for data in &texts {
        for stderr in [false, true] {
            let id = "p\"1";
            let ev = if stderr {
                GuestEvent::Stderr {
                    id: id.into(),
                    data: data.clone(),
                }
            } else {
                GuestEvent::Stdout {
                    id: id.into(),
                    data: data.clone(),
                }
            };
            let generic = encode_frame(&GuestFrame::event(&ev)).unwrap();
            let fast = encode_output_frame(stderr, id, data).unwrap();
            let a = read_frame(&mut &generic[..]).unwrap().unwrap();
            let b = read_frame(&mut &fast[..]).unwrap().unwrap();
            assert_eq!(a, b);
            let GuestFrame::Event { event, params } = GuestFrame::parse(b).unwrap().unwrap() else {
                panic!("not an event");
            };
            assert_eq!(GuestEvent::parse(&event, params).unwrap(), ev);
        }
    }
}
