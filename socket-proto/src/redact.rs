//! Keeping credentials out of logs.
//!
//! Three keys carry secrets: `env` (a spawned process's environment),
//! `oauthToken` and `token`. Typed messages hold their values in [`Secret`],
//! whose `Debug` prints `<redacted>` and whose decoding errors never quote
//! the value. Raw JSON goes through [`redact_value`] (or [`redacted_json`],
//! or the [`Redacted`] wrapper) before it reaches a log line.
//!
//! The message types whose fields are raw JSON
//! ([`RequestEnvelope`](crate::host::RequestEnvelope),
//! [`Response`](crate::host::Response),
//! [`ClientEvent`](crate::host::ClientEvent),
//! [`GuestFrame`](crate::guest::GuestFrame)) implement `Debug` through
//! [`Redacted`], so `{:?}` on any message is safe to log.
//!
//! ```
//! use socket_proto::redact::{redacted_json, Redacted, Secret};
//!
//! let token = Secret::new("sk-123".to_string());
//! assert_eq!(format!("{token:?}"), "<redacted>");
//!
//! let raw = serde_json::json!({"method": "spawn", "params": {"command": "ls", "env": {"KEY": "v"}}});
//! assert_eq!(
//!     redacted_json(&raw),
//!     r#"{"method":"spawn","params":{"command":"ls","env":"<redacted>"}}"#
//! );
//! assert_eq!(Redacted(&raw).to_string(), redacted_json(&raw));
//! ```

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// JSON keys whose values are never logged, at any depth.
pub const SECRET_KEYS: &[&str] = &["env", "oauthToken", "token"];

/// What a secret value is printed as.
pub const REDACTED: &str = "<redacted>";

/// Whether `key` is one of [`SECRET_KEYS`].
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.contains(&key)
}

/// A value that serializes as itself but never shows in `Debug` output.
///
/// Decoding errors don't quote the value either: a malformed secret is
/// reported as "invalid value (secret, not shown)".
#[derive(Clone, PartialEq, Eq, Default, Serialize)]
#[serde(transparent)]
pub struct Secret<T>(pub T);

impl<T> Secret<T> {
    /// Wraps a secret.
    pub fn new(v: T) -> Self {
        Self(v)
    }

    /// The secret itself, for the one place that must use it.
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// Unwraps the secret.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> From<T> for Secret<T> {
    fn from(v: T) -> Self {
        Self(v)
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // serde's own messages quote the offending value ("invalid type:
        // string \"sk-...\""); replace them.
        T::deserialize(d)
            .map(Secret)
            .map_err(|_| serde::de::Error::custom("invalid value (secret, not shown)"))
    }
}

/// A copy of `v` with the value of every secret key, at any depth, replaced
/// by `"<redacted>"`.
pub fn redact_value(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    if is_secret_key(k) {
                        (k.clone(), Value::String(REDACTED.into()))
                    } else {
                        (k.clone(), redact_value(v))
                    }
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(redact_value).collect()),
        other => other.clone(),
    }
}

/// [`redact_value`] rendered as compact, single-line JSON, for a log line.
pub fn redacted_json(v: &Value) -> String {
    redact_value(v).to_string()
}

/// Displays (and debug-prints) any serializable message as single-line JSON
/// with its secrets replaced: `log!("got {}", Redacted(&frame))`.
pub struct Redacted<'a, T: ?Sized>(pub &'a T);

impl<T: Serialize + ?Sized> fmt::Display for Redacted<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_value(self.0) {
            Ok(v) => f.write_str(&redacted_json(&v)),
            Err(_) => f.write_str("<unserializable>"),
        }
    }
}

impl<T: Serialize + ?Sized> fmt::Debug for Redacted<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `impl Debug for $t` as `$t <redacted JSON>`, for message types holding
/// raw JSON that might carry a secret.
macro_rules! redacted_debug {
    ($t:ty) => {
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    concat!(stringify!($t), " {}"),
                    $crate::redact::Redacted(self)
                )
            }
        }
    };
}
pub(crate) use redacted_debug;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-live-123".to_string());
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(serde_json::to_value(&s).unwrap(), json!("sk-live-123"));
        let v = json!({"method": "spawn", "params": {"env": {"API_KEY": "abc"}, "oauthToken": "t0k",
            "nested": [{"token": "x"}], "command": "ls"}});
        let r = redacted_json(&v);
        assert!(
            !r.contains("abc") && !r.contains("t0k") && !r.contains("\"x\""),
            "{r}"
        );
        assert!(r.contains("ls"));
        assert_eq!(Redacted(&v).to_string(), r);
        assert_eq!(format!("{:?}", Redacted(&v)), r);
    }

    #[test]
    fn secret_decode_errors_do_not_quote_the_value() {
        let e = serde_json::from_value::<Secret<u32>>(json!("sk-live-123")).unwrap_err();
        assert!(!e.to_string().contains("sk-live"), "{e}");
        let ok: Secret<String> = serde_json::from_value(json!("abc")).unwrap();
        assert_eq!(ok.expose(), "abc");
    }
}
