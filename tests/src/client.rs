//! A host-protocol client for tests, behaving as the desktop client does on
//! the helper's socket: one frame per request, one-shot calls with no id
//! that half-close and read one reply.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use socket_proto::frame::{read_frame, write_frame};

/// A connection to the helper with a 10 s read timeout.
pub fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// The next frame, or `None` at EOF (or on a read error).
pub fn recv(s: &mut UnixStream) -> Option<Value> {
    read_frame(s).ok().flatten().map(Value::Object)
}

/// A one-shot request: no id, half-close, one reply, then EOF.
pub fn one_shot(socket: &Path, method: &str, params: Value) -> Value {
    let mut s = connect(socket);
    write_frame(&mut s, &json!({"method": method, "params": params})).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let reply = recv(&mut s).expect("a reply");
    assert!(
        reply.get("id").is_none(),
        "one-shot replies carry no id: {reply}"
    );
    assert!(
        recv(&mut s).is_none(),
        "the helper closes after a one-shot reply"
    );
    reply
}

/// `isRunning`'s answer.
pub fn is_running(socket: &Path) -> bool {
    one_shot(socket, "isRunning", json!({}))["result"]["running"]
        .as_bool()
        .unwrap()
}
