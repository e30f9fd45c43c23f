//! Decoding a method's params (or a result) into its typed struct, with an
//! error that names the offending field.
//!
//! serde names a missing field (``missing field `data` ``) but not the field
//! whose value has the wrong type (``invalid type: integer `3`, expected a
//! string``). [`decode_params`] finds that field, and never quotes the value
//! of a secret field (see [`crate::redact`]).

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::redact::is_secret_key;

/// Params that do not fit their method's type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamsError {
    /// The top-level field at fault, when one is: missing, or of the wrong
    /// type or value.
    pub field: Option<String>,
    /// A readable message; it names `field` when there is one.
    pub message: String,
}

fn missing_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_owned())
}

/// Decodes `params` as a `T`. `null` counts as `{}` (no params).
///
/// Unknown fields are ignored (none of this crate's types deny them).
pub fn decode_params<T: DeserializeOwned>(params: Value) -> Result<T, ParamsError> {
    let params = match params {
        Value::Null => Value::Object(Map::new()),
        p => p,
    };
    let obj = match &params {
        Value::Object(m) => Some(m.clone()),
        _ => None,
    };
    let err = match serde_json::from_value::<T>(params) {
        Ok(t) => return Ok(t),
        Err(e) => e.to_string(),
    };
    if let Some(field) = missing_field(&err) {
        return Err(ParamsError {
            field: Some(field),
            message: err,
        });
    }
    // A type error on a present field. serde visits an object's entries in
    // order and checks for missing fields only at the end, so the culprit is
    // the first entry whose prefix of the object fails with anything other
    // than "missing field".
    if let Some(obj) = obj {
        let mut prefix = Map::new();
        for (key, value) in obj {
            prefix.insert(key.clone(), value);
            let fails_here = match serde_json::from_value::<T>(Value::Object(prefix.clone())) {
                Ok(_) => false,
                Err(e) => missing_field(&e.to_string()).is_none(),
            };
            if fails_here {
                let message = if is_secret_key(&key) {
                    format!("invalid value for field `{key}` (secret, not shown)")
                } else {
                    format!("invalid value for field `{key}`: {err}")
                };
                return Err(ParamsError {
                    field: Some(key),
                    message,
                });
            }
        }
    }
    Err(ParamsError {
        field: None,
        message: err,
    })
}

/// Field decoders for the tolerance the client's peers show (the Go peer
/// decodes into plain structs: a missing field or an explicit `null` is the
/// zero value, a negative number fits its `int`s). Used through
/// `#[serde(default, deserialize_with = "...")]` on the host protocol's
/// params.
pub mod lenient {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{self, Deserialize, Deserializer, Visitor};

    use crate::redact::Secret;

    /// An explicit `null` counts as the field's default, like a missing
    /// field (pair it with `#[serde(default)]`).
    pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + Default,
    {
        Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
    }

    /// A spawn's `env`: string values; a `null` value drops its key (the Go
    /// peer's `map[string]string` decodes it as `""`, which it then strips).
    /// Any other value is an error that never quotes it ([`Secret`]).
    #[allow(clippy::type_complexity)]
    pub fn env_map<'de, D>(d: D) -> Result<Option<Secret<BTreeMap<String, String>>>, D::Error>
    where
        D: Deserializer<'de>,
    {
        let raw = Option::<Secret<BTreeMap<String, Option<String>>>>::deserialize(d)?;
        Ok(raw.map(|env| {
            Secret::new(
                env.into_inner()
                    .into_iter()
                    .filter_map(|(k, v)| v.map(|v| (k, v)))
                    .collect(),
            )
        }))
    }

    /// A threshold whose `0` means "no threshold" (`pruneSessionCaches`'
    /// `onlyIfFreeBytesBelow`: "`0` means prune unconditionally", the Go
    /// peer's `COWORK_RPC_PROTOCOL.md`; its native backend checks `> 0`):
    /// `0` and negatives count as absent.
    pub fn non_positive_as_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        negative_as_none::<D, u64>(d)?
            .filter(|v| *v > 0)
            .map(T::try_from)
            .transpose()
            .map_err(|_| de::Error::custom("out of range"))
    }

    /// A size, count or threshold: a negative integer counts as the field
    /// being absent (the receiver's default), as does `null`; a value too
    /// large for `T` or not an integer is an error.
    pub fn negative_as_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: TryFrom<u64>> Visitor<'de> for V<T> {
            type Value = Option<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                T::try_from(v)
                    .map(Some)
                    .map_err(|_| E::custom(format!("{v} is out of range")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Ok(None),
                }
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
                d.deserialize_any(self)
            }
        }
        d.deserialize_option(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct P {
        process_name: String,
        count: Option<u32>,
        token: Option<String>,
    }

    #[test]
    fn names_the_field() {
        let e = decode_params::<P>(json!({})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("processName"));
        assert!(e.message.contains("`processName`"), "{e}");

        let e = decode_params::<P>(json!({"processName": "a", "count": "x"})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("count"));
        assert!(e.message.contains("`count`"), "{e}");

        // A wrong type beats a missing field, as in serde itself.
        let e = decode_params::<P>(json!({"count": -1})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("count"), "{e}");

        let e = decode_params::<P>(json!({"processName": "a", "token": ["sk-1"]})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("token"));
        assert!(!e.message.contains("sk-1"), "{e}");

        let e = decode_params::<P>(json!([1])).unwrap_err();
        assert_eq!(e.field, None);

        let ok: P = decode_params(json!({"processName": "a", "extra": {"x": 1}})).unwrap();
        assert_eq!(ok.process_name, "a");
    }
}
