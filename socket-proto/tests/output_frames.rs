//! The agent's output frames against the generic encoding.

use socket_proto::frame::encode_frame;

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
