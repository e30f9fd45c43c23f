//! The destination a session names: a host and a port, checked before
//! anything is sent to the host. The helper normalises and judges the
//! host; the agent only refuses what cannot be a host at all, and the
//! numeric forms that would name an address without looking like one.

use std::net::{Ipv4Addr, Ipv6Addr};

use socket_proto::egress::MAX_HOST_LEN;

/// Why a host or a port is not one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("empty host")]
    EmptyHost,
    #[error("host longer than {MAX_HOST_LEN} bytes")]
    HostTooLong,
    #[error("host has a character a host name cannot have")]
    HostCharacter,
    #[error(
        "host is a number, not a dotted-quad IPv4 address (a resolver would read it as an \
         address)"
    )]
    NumericHost,
    #[error("bracketed host is not an IPv6 address")]
    BadIpv6,
    #[error("port is not a number from 1 to 65535")]
    BadPort,
}

/// A host as a session named it (a DNS name, possibly with non-ASCII
/// labels for the helper's IDNA, or an IPv4 literal), checked: what is
/// passed on. IPv4 literals are passed on in their one canonical form.
///
/// Refused: empty, over [`MAX_HOST_LEN`], ASCII other than letters,
/// digits, `-`, `.` and `_` (so no `:`, `/`, `@`, `%`, space or control),
/// and a name whose last label is a number (`127.1`, `0x7f000001`,
/// `1.2.3.010`) unless it is a plain dotted quad: `getaddrinfo` would
/// read those as addresses, and they are not IP literals to an allowlist.
pub fn check_host(host: &str) -> Result<String, TargetError> {
    if host.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    if host.len() > MAX_HOST_LEN {
        return Err(TargetError::HostTooLong);
    }
    let allowed = |c: char| !c.is_ascii() || c.is_ascii_alphanumeric() || "-._".contains(c);
    if !host.chars().all(allowed) {
        return Err(TargetError::HostCharacter);
    }
    let bare = host.strip_suffix('.').unwrap_or(host);
    let last = bare.rsplit('.').next().unwrap_or(bare);
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|h| h.chars().all(|c| c.is_ascii_hexdigit()));
    let numeric = !last.is_empty() && (last.chars().all(|c| c.is_ascii_digit()) || hex);
    if numeric {
        // std's parser takes only four decimal parts without leading zeros.
        return bare
            .parse::<Ipv4Addr>()
            .map(|a| a.to_string())
            .map_err(|_| TargetError::NumericHost);
    }
    Ok(host.to_owned())
}

/// `[v6]` (as in a URL or an authority): the address's text, unbracketed.
pub fn check_bracketed_ipv6(host: &str) -> Result<String, TargetError> {
    let inner = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .ok_or(TargetError::BadIpv6)?;
    inner
        .parse::<Ipv6Addr>()
        .map(|a| a.to_string())
        .map_err(|_| TargetError::BadIpv6)
}

/// A port in decimal: 1 to 5 digits, 1 to 65535.
pub fn parse_port(s: &str) -> Result<u16, TargetError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::BadPort);
    }
    match s.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(TargetError::BadPort),
    }
}

/// `host:port` or `[v6]:port` (an authority without user info): the
/// checked host and the port; `default` when there is no `:port` (or an
/// empty one), an error when `default` is `None`.
pub fn parse_authority(a: &str, default: Option<u16>) -> Result<(String, u16), TargetError> {
    let (host, port) = if a.starts_with('[') {
        match a.find(']') {
            Some(i) => {
                let (h, rest) = a.split_at(i + 1);
                let port = match rest.strip_prefix(':') {
                    Some(p) => Some(p),
                    None if rest.is_empty() => None,
                    None => return Err(TargetError::BadIpv6),
                };
                (check_bracketed_ipv6(h)?, port)
            }
            None => return Err(TargetError::BadIpv6),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (check_host(h)?, Some(p)),
            None => (check_host(a)?, None),
        }
    };
    let port = match (port, default) {
        (Some(p), _) if !p.is_empty() => parse_port(p)?,
        (_, Some(d)) => d,
        (_, None) => return Err(TargetError::BadPort),
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_names_or_plain_literals() {
        for ok in [
            "api.test",
            "API.Test.",
            "a-b_c.example",
            "bücher.example",
            "1.2.3.4",
            "x1.y2",
            "1.2.3.example",
        ] {
            assert!(check_host(ok).is_ok(), "{ok}");
        }
        assert_eq!(check_host("1.2.3.4.").unwrap(), "1.2.3.4");
        for (bad, e) in [
            ("", TargetError::EmptyHost),
            ("a b", TargetError::HostCharacter),
            ("a:b", TargetError::HostCharacter),
            ("a/b", TargetError::HostCharacter),
            ("user@host", TargetError::HostCharacter),
            ("a\r\nb", TargetError::HostCharacter),
            ("a%2fb", TargetError::HostCharacter),
            ("a\0", TargetError::HostCharacter),
            ("[::1]", TargetError::HostCharacter),
            ("127.1", TargetError::NumericHost),
            ("2130706433", TargetError::NumericHost),
            ("0x7f000001", TargetError::NumericHost),
            ("0X7f.0.0.1", TargetError::NumericHost),
            ("127.0.0.010", TargetError::NumericHost),
            ("1.2.3.4.5", TargetError::NumericHost),
        ] {
            assert_eq!(check_host(bad), Err(e), "{bad:?}");
        }
        assert_eq!(
            check_host(&"a".repeat(MAX_HOST_LEN + 1)),
            Err(TargetError::HostTooLong)
        );
        assert!(check_host(&"a".repeat(MAX_HOST_LEN)).is_ok());
    }

    #[test]
    fn authorities_ports_and_ipv6_brackets() {
        assert_eq!(
            parse_authority("api.test:443", None).unwrap(),
            ("api.test".into(), 443)
        );
        assert_eq!(
            parse_authority("[2001:DB8::1]:8443", None).unwrap(),
            ("2001:db8::1".into(), 8443)
        );
        assert_eq!(
            parse_authority("[::1]", Some(80)).unwrap(),
            ("::1".into(), 80)
        );
        assert_eq!(
            parse_authority("a.test:", Some(80)).unwrap(),
            ("a.test".into(), 80)
        );
        assert_eq!(
            parse_authority("a.test", Some(80)).unwrap(),
            ("a.test".into(), 80)
        );
        for bad in [
            "api.test",
            "api.test:",
            "api.test:0",
            "api.test:65536",
            "api.test:123456",
            "api.test:-1",
            "api.test:+80",
            "api.test: 80",
            "api.test:8o",
            "::1:443",
            "[::1]443",
            "[::1",
            "[zz::1]:443",
            "[::1%eth0]:443",
            "[1.2.3.4]:443",
            ":443",
            "a:b:443",
        ] {
            assert!(parse_authority(bad, None).is_err(), "{bad:?}");
        }
        assert_eq!(parse_port("65535"), Ok(65535));
        assert_eq!(parse_port("00080"), Ok(80));
    }
}
