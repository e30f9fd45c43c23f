//! The egress channel: how a session's network traffic leaves the VM.
//!
//! The guest has no network device. Inside each session's network
//! namespace the agent listens on `127.0.0.1:`[`HTTP_PROXY_PORT`] (an HTTP
//! proxy: `CONNECT` and absolute-URI requests) and
//! `127.0.0.1:`[`SOCKS_PROXY_PORT`] (SOCKS5, `socks5h`). For each
//! connection it accepts, the agent dials the host on vsock port
//! [`EGRESS_VSOCK_PORT`] from a privileged source port (which no session
//! can bind, and sessions cannot create `AF_VSOCK` sockets at all), writes
//! one [`EgressOpen`] line naming the session and the destination, and
//! reads one [`EgressReply`] line. The helper decides: the session's
//! `allowedDomains`, the host's resolution, the address ranges, the
//! connection. After `{"ok":true}` the stream carries the connection's
//! bytes both ways, unchanged; each side's end of input is passed on as a
//! half-close (`shutdown(SHUT_WR)`).
//!
//! The agent is the only party that can open this channel, so the
//! session name it writes is trusted as the agent's word; everything else
//! in the line (the host and port a session asked for) is the session's
//! and is checked by the helper.
//!
//! Both lines are one JSON object terminated by `\n`, at most
//! [`MAX_OPEN_LINE`] / [`MAX_REPLY_LINE`] bytes with the newline.
//!
//! The reachability probe uses the same channel: the helper asks the agent
//! (`egress.probe`, [`EgressProbeParams`]) to open a stream whose
//! [`EgressOpen::probe`] carries the helper's one-time nonce instead of a
//! session; the helper applies the same resolution and address policy to
//! the probe URL's host and then speaks HTTP(S) to it itself.

use serde::{Deserialize, Serialize};

/// The host vsock port the agent dials for every egress stream (the helper
/// listens on `RUNDIR/vsock.sock_51235`).
pub const EGRESS_VSOCK_PORT: u32 = 51235;
/// The HTTP proxy's port on each session's loopback.
pub const HTTP_PROXY_PORT: u16 = 3128;
/// The SOCKS5 proxy's port on each session's loopback.
pub const SOCKS_PROXY_PORT: u16 = 1080;
/// The capability the agent reports in `agent.info` when it runs the
/// session proxies: the helper sets the proxy variables of a spawn only
/// for such an agent.
pub const EGRESS_CAPABILITY: &str = "egress";
/// The guest method that opens a probe stream ([`EgressProbeParams`]).
pub const METHOD_PROBE: &str = "egress.probe";
/// The longest [`EgressOpen`] line, newline included.
pub const MAX_OPEN_LINE: usize = 4096;
/// The longest [`EgressReply`] line, newline included.
pub const MAX_REPLY_LINE: usize = 1024;
/// The longest host name either side accepts (DNS's limit).
pub const MAX_HOST_LEN: usize = 253;
/// The version written in [`EgressOpen::v`].
pub const EGRESS_VERSION: u32 = 1;
/// The header a refused HTTP proxy request carries, as the vendor's
/// sandbox runtime sends it.
pub const PROXY_ERROR_HEADER: &str = "X-Proxy-Error";

/// How the session asked for the connection (for logs and the SNI check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// An HTTP `CONNECT host:port` tunnel.
    Connect,
    /// An absolute-URI HTTP request (`GET http://host/...`).
    Http,
    /// A SOCKS5 `CONNECT`.
    Socks,
    /// The helper's reachability probe.
    Probe,
}

/// The first line of an egress stream, agent to helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressOpen {
    /// [`EGRESS_VERSION`].
    pub v: u32,
    /// The session whose network namespace the connection came from;
    /// absent for a probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The helper's nonce from `egress.probe`; absent for a session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// The destination as the session named it: a host name or an IP
    /// literal (IPv6 without brackets), not yet normalised.
    pub host: String,
    /// The destination port.
    pub port: u16,
    /// How it was asked for.
    pub via: Via,
}

/// Why the helper refused or failed to open a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EgressRefusal {
    /// The host is not in the session's `allowedDomains`.
    BlockedByAllowlist,
    /// Every address the host resolved to is in a refused range
    /// (loopback, private, link-local, ...).
    BlockedAddress,
    /// The name did not resolve.
    DnsFailure,
    /// The upstream refused the connection.
    ConnectionRefused,
    /// Resolution or connection took too long.
    Timeout,
    /// The upstream could not be reached (no route, network down, ...).
    Unreachable,
    /// The open line was malformed, or the session unknown.
    BadRequest,
    /// Too many streams are open.
    Busy,
}

impl EgressRefusal {
    /// The reason's wire name (`X-Proxy-Error`'s value for an allowlist
    /// refusal is `blocked-by-allowlist`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BlockedByAllowlist => "blocked-by-allowlist",
            Self::BlockedAddress => "blocked-address",
            Self::DnsFailure => "dns-failure",
            Self::ConnectionRefused => "connection-refused",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::BadRequest => "bad-request",
            Self::Busy => "busy",
        }
    }

    /// The status line an HTTP proxy answers a refused request with.
    pub fn http_status(self) -> (u16, &'static str) {
        match self {
            Self::BlockedByAllowlist | Self::BlockedAddress => (403, "Forbidden"),
            Self::DnsFailure | Self::ConnectionRefused | Self::Unreachable => (502, "Bad Gateway"),
            Self::Timeout => (504, "Gateway Timeout"),
            Self::BadRequest => (400, "Bad Request"),
            Self::Busy => (503, "Service Unavailable"),
        }
    }

    /// The SOCKS5 reply code (RFC 1928 section 6).
    pub fn socks_reply(self) -> u8 {
        match self {
            // "connection not allowed by ruleset"
            Self::BlockedByAllowlist | Self::BlockedAddress => 0x02,
            // "host unreachable"
            Self::DnsFailure | Self::Unreachable => 0x04,
            // "connection refused"
            Self::ConnectionRefused => 0x05,
            // "TTL expired"
            Self::Timeout => 0x06,
            // "general SOCKS server failure"
            Self::BadRequest | Self::Busy => 0x01,
        }
    }
}

/// The helper's answer to an [`EgressOpen`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<EgressRefusal>,
    /// A human-readable detail (no secrets; bounded by [`MAX_REPLY_LINE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl EgressReply {
    /// The stream is open.
    pub fn open() -> Self {
        EgressReply {
            ok: true,
            error: None,
            message: None,
        }
    }

    /// The stream is refused for `why`.
    pub fn refused(why: EgressRefusal, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        // Leave room for the JSON around it.
        let limit = MAX_REPLY_LINE / 2;
        if message.len() > limit {
            let mut cut = limit;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        EgressReply {
            ok: false,
            error: Some(why),
            message: Some(message),
        }
    }
}

/// `egress.probe {nonce, host, port}`: the agent opens one egress stream
/// with `probe: nonce`, reads the helper's reply, closes the stream, and
/// answers `{"ok": bool, "error"?: refusal}` with the reply's verdict (an
/// error frame only when it could not reach the helper at all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressProbeParams {
    pub nonce: String,
    pub host: String,
    pub port: u16,
}

/// Errors of [`decode_line`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LineError {
    #[error("egress line longer than {0} bytes")]
    TooLong(usize),
    #[error("egress line does not end with a newline")]
    Unterminated,
    #[error("egress line is not valid: {0}")]
    Invalid(String),
}

/// `value` as one line: its JSON and `\n`.
pub fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(value).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Decodes one line (with its `\n`) of at most `max` bytes.
pub fn decode_line<T: serde::de::DeserializeOwned>(
    line: &[u8],
    max: usize,
) -> Result<T, LineError> {
    if line.len() > max {
        return Err(LineError::TooLong(max));
    }
    let Some(body) = line.strip_suffix(b"\n") else {
        return Err(LineError::Unterminated);
    };
    serde_json::from_slice(body).map_err(|e| LineError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_round_trips_and_rejects_unknown_fields() {
        let o = EgressOpen {
            v: EGRESS_VERSION,
            session: Some("s1".into()),
            probe: None,
            host: "api.test".into(),
            port: 443,
            via: Via::Connect,
        };
        let line = encode_line(&o);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"v\":1,\"session\":\"s1\",\"host\":\"api.test\",\"port\":443,\"via\":\"connect\"}\n"
        );
        assert_eq!(decode_line::<EgressOpen>(&line, MAX_OPEN_LINE).unwrap(), o);
        let odd = b"{\"v\":1,\"host\":\"a\",\"port\":1,\"via\":\"http\",\"x\":1}\n";
        assert!(matches!(
            decode_line::<EgressOpen>(odd, MAX_OPEN_LINE),
            Err(LineError::Invalid(_))
        ));
        let port = b"{\"v\":1,\"host\":\"a\",\"port\":70000,\"via\":\"http\"}\n";
        assert!(decode_line::<EgressOpen>(port, MAX_OPEN_LINE).is_err());
    }

    #[test]
    fn lines_are_bounded_and_terminated() {
        let long = vec![b' '; MAX_OPEN_LINE + 1];
        assert_eq!(
            decode_line::<EgressOpen>(&long, MAX_OPEN_LINE),
            Err(LineError::TooLong(MAX_OPEN_LINE))
        );
        assert_eq!(
            decode_line::<EgressReply>(b"{\"ok\":true}", MAX_REPLY_LINE),
            Err(LineError::Unterminated)
        );
    }

    #[test]
    fn refusals_have_their_wire_names_and_codes() {
        let r = EgressReply::refused(EgressRefusal::BlockedByAllowlist, "x".repeat(5000));
        let line = encode_line(&r);
        assert!(line.len() <= MAX_REPLY_LINE);
        assert!(std::str::from_utf8(&line)
            .unwrap()
            .contains("\"error\":\"blocked-by-allowlist\""));
        assert_eq!(EgressRefusal::BlockedByAllowlist.socks_reply(), 0x02);
        assert_eq!(EgressRefusal::BlockedByAllowlist.http_status().0, 403);
        let ok = decode_line::<EgressReply>(&encode_line(&EgressReply::open()), MAX_REPLY_LINE);
        assert_eq!(ok.unwrap(), EgressReply::open());
    }
}
