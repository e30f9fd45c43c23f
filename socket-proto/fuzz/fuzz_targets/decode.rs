#![no_main]
//! Feeds arbitrary bytes to the frame reader, whole and in arbitrary
//! chunks, and every decoded frame to all the host and guest message
//! parsers. Nothing may panic, and chunking must not change the frames.

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use socket_proto::frame::{read_frame, JsonObject};
use socket_proto::guest::{flatten_event, GuestEvent, GuestFrame, GuestNotification, GuestRequest};
use socket_proto::host::{ClientEvent, HostRequest};

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

/// A reader that hands out its bytes at most `chunk` at a time.
struct Chunked<'a> {
    rest: &'a [u8],
    chunk: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.rest.len().min(self.chunk).min(buf.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Ok(n)
    }
}

/// Every frame `r` yields (`None` for a recoverable bad body) until the
/// end or the first unrecoverable error.
fn frames(mut r: impl Read, parse: bool) -> Vec<Option<JsonObject>> {
    let mut out = Vec::new();
    loop {
        match read_frame(&mut r) {
            Ok(Some(obj)) => {
                if parse {
                    parse_everything(&obj);
                }
                out.push(Some(obj));
            }
            Ok(None) => break,
            Err(e) if e.is_recoverable() => out.push(None),
            Err(_) => break,
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = (chunk as usize % 64) + 1;
    let whole = frames(rest, true);
    let chunked = frames(Chunked { rest, chunk }, false);
    assert_eq!(whole, chunked);
});
