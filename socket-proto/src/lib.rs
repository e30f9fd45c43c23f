//! The wire protocols of coworkvm, in one place: nothing else parses frames.
//!
//! Both protocols frame messages the same way: a 4-byte big-endian length,
//! then that many bytes (at most 10 MiB) of UTF-8 JSON whose top level is an
//! object ([`frame`]: blocking [`read_frame`]/[`write_frame`] for the agent
//! and the tests; [`frame::check_len`] and [`frame::decode_body`] for the
//! helper's async reader, which lives with its tokio runtime).
//!
//! - [`host`]: the desktop client and the helper: requests
//!   `{method, id?, params}` ([`HostRequest`], [`HostMethod`]), replies
//!   `{success, result|error, id?}` ([`Response`]), and event frames
//!   `{type, ...}` ([`ClientEvent`]).
//! - [`guest`]: the helper and `coworkvm-agent` inside the VM: frames typed
//!   `request`, `response`, `notification` and `event` ([`GuestFrame`]), and
//!   the conversions between the two protocols.
//! - [`params`]: typed decoding with errors that name the field.
//! - [`sdk`]: coworkvm's SDK transfer extension (`installSdk.chunk`,
//!   `installSdk.commit`) and [`sdk::upload_sdk`], the helper's side of it.
//! - [`egress`]: the egress channel's open and reply lines (agent to
//!   helper, vsock port 51235) and `egress.probe`.
//! - [`redact`]: secrets (`env`, `oauthToken`, `token`) never reach a log.
//!
//! The crate has no async runtime and no features: the agent in the guest
//! links it as it is.
//!
//! Decoding a request and encoding its response:
//!
//! ```
//! use socket_proto::frame::{encode_frame, read_frame};
//! use socket_proto::host::{HostMethod, HostRequest, RunningResult};
//!
//! // What the client sends on a persistent pipe.
//! let wire = encode_frame(&serde_json::json!({"method": "isRunning", "id": 7})).unwrap();
//!
//! // The server reads one frame and decodes it.
//! let obj = read_frame(&mut wire.as_slice()).unwrap().expect("one frame");
//! let req = HostRequest::from_object(obj).unwrap();
//! assert_eq!(req.method, HostMethod::IsRunning);
//!
//! // The reply echoes the id because the request had one.
//! let reply = req.ok_with(&RunningResult { running: false });
//! let bytes = encode_frame(&reply).unwrap();
//! assert_eq!(&bytes[..4], &(bytes.len() as u32 - 4).to_be_bytes());
//! let back = read_frame(&mut bytes.as_slice()).unwrap().unwrap();
//! assert_eq!(
//!     serde_json::Value::Object(back),
//!     serde_json::json!({"success": true, "result": {"running": false}, "id": 7})
//! );
//!
//! // An unknown method is a value the server answers, not a broken connection.
//! let odd = HostRequest::from_object(
//!     serde_json::from_str(r#"{"method": "frobnicate"}"#).unwrap(),
//! )
//! .unwrap();
//! assert_eq!(odd.method, HostMethod::Unknown("frobnicate".into()));
//! let reply = serde_json::to_value(odd.unknown_method()).unwrap();
//! assert_eq!(reply, serde_json::json!({"success": false, "error": "Unknown method: frobnicate"}));
//!
//! // Bad params are answered too, naming the field.
//! let bad = HostRequest::from_object(
//!     serde_json::from_str(r#"{"method": "kill", "id": 8, "params": {"signal": 9}}"#).unwrap(),
//! )
//! .unwrap_err();
//! let reply = bad.to_response();
//! assert_eq!(reply.id, Some(serde_json::json!(8)));
//! assert_eq!(reply.error.unwrap(), "bad params for kill: missing field `id`");
//! ```

pub mod egress;
pub mod frame;
pub mod guest;
pub mod host;
pub mod manifest;
pub mod params;
pub mod redact;
pub mod sdk;

pub use frame::{read_frame, write_frame, FrameError, JsonObject, MAX_FRAME_LEN};
pub use guest::{GuestError, GuestEvent, GuestFrame, GuestNotification, GuestRequest};
pub use host::{BadRequest, ClientEvent, HostMethod, HostRequest, RequestEnvelope, Response};
pub use redact::Secret;
