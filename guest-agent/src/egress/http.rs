//! The HTTP proxy's request head: `CONNECT host:port` (a tunnel) or an
//! absolute-URI request `METHOD http://host[:port]/path` (forwarded in
//! origin form). Everything else is refused.

use socket_proto::egress::{EgressRefusal, PROXY_ERROR_HEADER};

use super::target::{self, TargetError};

/// The most bytes of a request head (request line, headers, the empty
/// line): a longer one is refused.
pub const MAX_HEAD: usize = 16 * 1024;

/// Why a request head is refused (all `400 Bad Request`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("a line of the request head ends without CR LF")]
    BareLf,
    #[error("the request line is not `METHOD TARGET HTTP/1.x`")]
    RequestLine,
    #[error("not HTTP/1.0 or HTTP/1.1")]
    Version,
    #[error("the method is not a token")]
    Method,
    #[error("CONNECT's target is not host:port: {0}")]
    ConnectTarget(TargetError),
    #[error("https:// requests go through CONNECT")]
    Https,
    #[error("the target is not an absolute http:// URI (this is a proxy)")]
    NotAbsolute,
    #[error("the URI's host: {0}")]
    UriHost(TargetError),
    #[error("the URI carries user information")]
    UserInfo,
    #[error("the URI has a byte a request target cannot have")]
    UriCharacter,
    #[error("a header line is not `name: value`")]
    Header,
    #[error("a header continues on the next line (obsolete line folding)")]
    Folded,
}

/// What the session asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `CONNECT host:port`: after the open, `200` and the raw stream.
    Tunnel { host: String, port: u16 },
    /// An absolute-URI request: `head` goes to the origin first.
    Forward {
        host: String,
        port: u16,
        head: Vec<u8>,
    },
}

/// Where the head ends in `buf` (its length, the empty line included),
/// once it has: the first empty line, a line ending in LF or CR LF.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b == b'\n' {
            let line = &buf[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A header value's bytes: visible ASCII, space, tab, and obs-text.
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (b' '..0x7f).contains(&b) || b >= 0x80
}

/// Headers the proxy does not pass on: its own, and the connection's
/// (the forwarded request gets `Connection: close`). `Host` is replaced
/// by the URI's authority.
const DROPPED_HEADERS: &[&str] = &[
    "proxy-connection",
    "proxy-authorization",
    "connection",
    "keep-alive",
    "host",
];

/// Parses a whole head (as [`head_end`] delimits it).
pub fn parse(head: &[u8]) -> Result<Request, HeadError> {
    let mut lines = Vec::new();
    let mut rest = head;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        let Some(line) = rest[..i].strip_suffix(b"\r") else {
            return Err(HeadError::BareLf);
        };
        lines.push(line);
        rest = &rest[i + 1..];
    }
    // The last line is the empty one.
    if lines.pop() != Some(b"".as_slice()) || !rest.is_empty() {
        return Err(HeadError::RequestLine);
    }
    let (request_line, header_lines) = lines.split_first().ok_or(HeadError::RequestLine)?;
    let request_line = std::str::from_utf8(request_line).map_err(|_| HeadError::RequestLine)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::RequestLine);
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HeadError::Version);
    }
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(HeadError::Method);
    }
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    for line in header_lines {
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            return Err(HeadError::Folded);
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(HeadError::Header)?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().copied().all(is_tchar) {
            return Err(HeadError::Header);
        }
        if !value.iter().copied().all(is_value_byte) {
            return Err(HeadError::Header);
        }
        // tchar is ASCII.
        let name = std::str::from_utf8(name).map_err(|_| HeadError::Header)?;
        headers.push((name, value.trim_ascii()));
    }
    if method == "CONNECT" {
        let (host, port) = target::parse_authority(uri, None).map_err(HeadError::ConnectTarget)?;
        return Ok(Request::Tunnel { host, port });
    }
    let (authority, origin_form) = split_http_uri(uri)?;
    let (host, port) = target::parse_authority(authority, Some(80)).map_err(HeadError::UriHost)?;
    let mut out = Vec::with_capacity(head.len() + 64);
    out.extend_from_slice(format!("{method} {origin_form} {version}\r\n").as_bytes());
    out.extend_from_slice(format!("Host: {authority}\r\n").as_bytes());
    for (name, value) in headers {
        if DROPPED_HEADERS.iter().any(|d| d.eq_ignore_ascii_case(name)) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Request::Forward {
        host,
        port,
        head: out,
    })
}

/// `http://authority/path?query#fragment` -> (`authority`, `/path?query`).
fn split_http_uri(uri: &str) -> Result<(&str, String), HeadError> {
    if !uri.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HeadError::UriCharacter);
    }
    let scheme_end = uri.find("://").ok_or(HeadError::NotAbsolute)?;
    let scheme = &uri[..scheme_end];
    if scheme.eq_ignore_ascii_case("https") {
        return Err(HeadError::Https);
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(HeadError::NotAbsolute);
    }
    let rest = &uri[scheme_end + 3..];
    let rest = rest.split('#').next().unwrap_or(rest);
    let path_start = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(path_start);
    if authority.contains('@') {
        return Err(HeadError::UserInfo);
    }
    let origin_form = match path.as_bytes().first() {
        None => "/".to_owned(),
        Some(b'?') => format!("/{path}"),
        Some(_) => path.to_owned(),
    };
    Ok((authority, origin_form))
}

/// The session's answer when its tunnel is open.
pub const CONNECTED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// The session's answer to a refused request: the refusal's status, its
/// name in `X-Proxy-Error`, no body, and the connection closes.
pub fn refusal(why: EgressRefusal) -> Vec<u8> {
    let (code, reason) = why.http_status();
    format!(
        "HTTP/1.1 {code} {reason}\r\n{PROXY_ERROR_HEADER}: {}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n",
        why.as_str()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Result<Request, HeadError> {
        let b = s.as_bytes();
        assert_eq!(head_end(b), Some(b.len()), "{s:?} is not one head");
        parse(b)
    }

    #[test]
    fn connect_targets() {
        assert_eq!(
            req("CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n").unwrap(),
            Request::Tunnel {
                host: "api.test".into(),
                port: 443
            }
        );
        assert_eq!(
            req("CONNECT [2001:db8::1]:443 HTTP/1.0\r\n\r\n").unwrap(),
            Request::Tunnel {
                host: "2001:db8::1".into(),
                port: 443
            }
        );
        for (bad, want) in [
            (
                "CONNECT api.test HTTP/1.1\r\n\r\n",
                HeadError::ConnectTarget(TargetError::BadPort),
            ),
            (
                "CONNECT api.test:0 HTTP/1.1\r\n\r\n",
                HeadError::ConnectTarget(TargetError::BadPort),
            ),
            (
                "CONNECT api.test:99999 HTTP/1.1\r\n\r\n",
                HeadError::ConnectTarget(TargetError::BadPort),
            ),
            (
                "CONNECT ::1:443 HTTP/1.1\r\n\r\n",
                HeadError::ConnectTarget(TargetError::HostCharacter),
            ),
            (
                "CONNECT [::1:443 HTTP/1.1\r\n\r\n",
                HeadError::ConnectTarget(TargetError::BadIpv6),
            ),
            (
                "CONNECT http://api.test:443/ HTTP/1.1\r\n\r\n",
                HeadError::ConnectTarget(TargetError::HostCharacter),
            ),
            (
                "CONNECT 127.1:443 HTTP/1.1\r\n\r\n",
                HeadError::ConnectTarget(TargetError::NumericHost),
            ),
            (
                "CONNECT  api.test:443 HTTP/1.1\r\n\r\n",
                HeadError::RequestLine,
            ),
            ("CONNECT api.test:443 HTTP/2\r\n\r\n", HeadError::Version),
            ("CONNECT api.test:443\r\n\r\n", HeadError::RequestLine),
        ] {
            assert_eq!(req(bad), Err(want), "{bad:?}");
        }
    }

    #[test]
    fn absolute_uris_are_rewritten_to_origin_form() {
        let r = req("POST http://Api.Test:8080/v1/x?y=1#frag HTTP/1.1\r\n\
             Host: evil.test\r\n\
             Proxy-Connection: keep-alive\r\n\
             Proxy-Authorization: Basic c2VjcmV0\r\n\
             connection: keep-alive, x-hop\r\n\
             Keep-Alive: 300\r\n\
             Content-Length: 3\r\n\
             X-Odd:\tvalue with  spaces \r\n\
             \r\n")
        .unwrap();
        let Request::Forward { host, port, head } = r else {
            panic!("{r:?}")
        };
        assert_eq!((host.as_str(), port), ("Api.Test", 8080));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "POST /v1/x?y=1 HTTP/1.1\r\n\
             Host: Api.Test:8080\r\n\
             Content-Length: 3\r\n\
             X-Odd: value with  spaces\r\n\
             Connection: close\r\n\r\n"
        );
        for (uri, path, authority, port) in [
            ("http://a.test", "/", "a.test", 80),
            ("http://a.test?q", "/?q", "a.test", 80),
            ("HTTP://a.test:/", "/", "a.test:", 80),
            ("http://[::1]:81/p", "/p", "[::1]:81", 81),
        ] {
            let Request::Forward { port: p, head, .. } =
                req(&format!("GET {uri} HTTP/1.0\r\n\r\n")).unwrap()
            else {
                panic!()
            };
            assert_eq!(p, port, "{uri}");
            assert_eq!(
                String::from_utf8(head).unwrap(),
                format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
            );
        }
    }

    #[test]
    fn hostile_heads_are_refused() {
        for (bad, want) in [
            ("GET https://a.test/ HTTP/1.1\r\n\r\n", HeadError::Https),
            (
                "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
                HeadError::NotAbsolute,
            ),
            ("GET ftp://a.test/ HTTP/1.1\r\n\r\n", HeadError::NotAbsolute),
            ("OPTIONS * HTTP/1.1\r\n\r\n", HeadError::NotAbsolute),
            (
                "GET http://u:p@a.test/ HTTP/1.1\r\n\r\n",
                HeadError::UserInfo,
            ),
            (
                "GET http://a.test:0/ HTTP/1.1\r\n\r\n",
                HeadError::UriHost(TargetError::BadPort),
            ),
            (
                "GET http:///x HTTP/1.1\r\n\r\n",
                HeadError::UriHost(TargetError::EmptyHost),
            ),
            (
                "GET http://a.test/\x01 HTTP/1.1\r\n\r\n",
                HeadError::UriCharacter,
            ),
            ("G(T http://a.test/ HTTP/1.1\r\n\r\n", HeadError::Method),
            (
                "GET http://a.test/ HTTP/1.1\r\nNo-Colon\r\n\r\n",
                HeadError::Header,
            ),
            (
                "GET http://a.test/ HTTP/1.1\r\n: empty\r\n\r\n",
                HeadError::Header,
            ),
            (
                "GET http://a.test/ HTTP/1.1\r\nBad Name: x\r\n\r\n",
                HeadError::Header,
            ),
            (
                "GET http://a.test/ HTTP/1.1\r\nX: a\x00b\r\n\r\n",
                HeadError::Header,
            ),
            (
                "GET http://a.test/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
                HeadError::Header,
            ),
            (
                "GET http://a.test/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
                HeadError::Folded,
            ),
            (
                "GET http://a.test/ HTTP/1.1\nHost: a\n\n",
                HeadError::BareLf,
            ),
            (
                "GET http://a.test/ HTTP/1.1\r\nHost: a\n\r\n",
                HeadError::BareLf,
            ),
            ("\r\n", HeadError::RequestLine),
            ("\x16\x03\x01\x02\x00\r\n\r\n", HeadError::RequestLine),
            ("\u{fffd} http://a/ HTTP/1.1\r\n\r\n", HeadError::Method),
        ] {
            assert_eq!(req(bad), Err(want), "{bad:?}");
        }
        // Not UTF-8 in the request line.
        assert_eq!(
            parse(b"GET http://a.test/\xff HTTP/1.1\r\n\r\n"),
            Err(HeadError::RequestLine)
        );
        // obs-text in a value is passed on as it is.
        assert!(parse(b"GET http://a.test/ HTTP/1.1\r\nX: \xe9\r\n\r\n").is_ok());
    }

    #[test]
    fn the_head_ends_at_the_first_empty_line() {
        assert_eq!(head_end(b"GET x HTTP/1.1\r\nA: b\r\n"), None);
        assert_eq!(head_end(b"GET x HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(24));
        assert_eq!(head_end(b"GET x HTTP/1.1\n\nbody"), Some(16));
        assert_eq!(head_end(b"\r\n"), Some(2));
        assert_eq!(head_end(b""), None);
        assert_eq!(head_end(b"\r\r\n"), None);
    }

    #[test]
    fn refusals_carry_the_reason() {
        let r = String::from_utf8(refusal(EgressRefusal::BlockedByAllowlist)).unwrap();
        assert_eq!(
            r,
            "HTTP/1.1 403 Forbidden\r\nX-Proxy-Error: blocked-by-allowlist\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let r = String::from_utf8(refusal(EgressRefusal::Busy)).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
    }
}
