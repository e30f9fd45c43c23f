//! Keeping credentials out of logs.
//!
//! `env` (a spawned process's environment), `oauthToken` and `token` carry
//! secrets. Typed messages hold them in [`Secret`], whose `Debug` prints
//! `<redacted>`; raw JSON goes through [`redact_value`] before it is logged.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// JSON keys whose values are never logged.
pub const SECRET_KEYS: &[&str] = &["env", "oauthToken", "token"];
pub const REDACTED: &str = "<redacted>";

/// A value that serializes as itself but never shows in `Debug` output.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret<T>(pub T);

impl<T> Secret<T> {
    pub fn new(v: T) -> Self {
        Self(v)
    }

    /// The secret itself, for the one place that must use it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

/// A copy of `v` with the value of every secret key, at any depth, replaced.
pub fn redact_value(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    if SECRET_KEYS.contains(&k.as_str()) {
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

/// `redact_value` rendered as compact JSON, for a log line.
pub fn redacted_json(v: &Value) -> String {
    redact_value(v).to_string()
}

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
    }
}
