//! The wire protocols of coworkvm, in one place.
//!
//! Both protocols frame messages the same way: a 4-byte big-endian length,
//! then that many bytes (at most 10 MiB) of UTF-8 JSON whose top level is an
//! object ([`frame`]).
//!
//! - [`host`]: the desktop client and the helper (`coworkvm serve`):
//!   requests `{method, id?, params}`, replies `{success, result|error, id?}`,
//!   and event frames `{type, ...}`.
//! - [`guest`]: the helper and `coworkvm-agent` inside the VM: frames typed
//!   `request`, `response`, `notification` and `event`.
//! - [`redact`]: secrets (`env`, `oauthToken`, `token`) never reach a log.
//!
//! Decoding a request and answering it:
//!
//! ```
//! use socket_proto::frame::{encode_frame, read_frame};
//! use socket_proto::host::{HostMethod, RequestEnvelope, Response, RunningResult};
//!
//! // What the client sends on a persistent pipe.
//! let wire = encode_frame(&serde_json::json!({"method": "isRunning", "id": 7})).unwrap();
//!
//! let obj = read_frame(&mut wire.as_slice()).unwrap().expect("one frame");
//! let req = RequestEnvelope::from_object(obj).unwrap();
//! assert_eq!(req.method().unwrap(), HostMethod::IsRunning);
//!
//! // The reply echoes the id because the request had one.
//! let reply = Response::ok_with(req.id.clone(), &RunningResult { running: false });
//! let bytes = encode_frame(&reply).unwrap();
//! let back = read_frame(&mut bytes.as_slice()).unwrap().unwrap();
//! assert_eq!(back["id"], 7);
//! assert_eq!(back["result"]["running"], false);
//!
//! // An unknown method is a value the server answers, not a broken connection.
//! let odd = RequestEnvelope::from_object(
//!     serde_json::from_str(r#"{"method": "frobnicate"}"#).unwrap(),
//! )
//! .unwrap();
//! assert_eq!(odd.method().unwrap(), HostMethod::Unknown("frobnicate".into()));
//! ```

pub mod frame;
pub mod guest;
pub mod host;
pub mod redact;

pub use frame::{FrameError, JsonObject, MAX_FRAME_LEN};
