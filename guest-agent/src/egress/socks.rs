//! The SOCKS5 handshake (RFC 1928): no authentication, `CONNECT` only,
//! to an IPv4 address, a domain name (`socks5h`) or an IPv6 address.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::stream::{BoundedReadError, DeadlineReader};
use super::target::{self, TargetError};

const VERSION: u8 = 0x05;
const NO_AUTH: u8 = 0x00;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 0x01;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

/// Reply codes of the agent's own (not the helper's) refusals.
pub const GENERAL_FAILURE: u8 = 0x01;
pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;

/// The method selection that accepts "no authentication".
pub const METHOD_SELECTED: [u8; 2] = [VERSION, NO_AUTH];
/// The method selection that accepts none of the client's.
pub const NO_METHOD: [u8; 2] = [VERSION, NO_ACCEPTABLE_METHOD];

/// Why a handshake failed; [`HandshakeError::reply`] says what the client
/// is told before the connection closes.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("reading the handshake: {0}")]
    Read(#[from] BoundedReadError),
    #[error("version {0:#04x}, not SOCKS5")]
    Version(u8),
    #[error("the client offers no authentication method")]
    NoMethods,
    #[error("the client does not offer \"no authentication\"")]
    NoAcceptableMethod,
    #[error("command {0:#04x} is not CONNECT")]
    Command(u8),
    #[error("address type {0:#04x}")]
    AddressType(u8),
    #[error("the domain name is empty")]
    EmptyDomain,
    #[error("the domain name is not UTF-8")]
    DomainEncoding,
    #[error("the destination: {0}")]
    Target(TargetError),
}

/// What the client is sent when the handshake fails at this point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReply {
    /// Nothing (not SOCKS5, or it went away).
    Nothing,
    /// `05 FF`: none of its methods.
    NoMethod,
    /// A request reply with this code.
    Code(u8),
}

impl HandshakeError {
    pub fn reply(&self) -> FailureReply {
        match self {
            Self::Read(_) | Self::Version(_) => FailureReply::Nothing,
            Self::NoMethods | Self::NoAcceptableMethod => FailureReply::NoMethod,
            Self::Command(_) => FailureReply::Code(COMMAND_NOT_SUPPORTED),
            Self::AddressType(_) => FailureReply::Code(ADDRESS_TYPE_NOT_SUPPORTED),
            Self::EmptyDomain | Self::DomainEncoding | Self::Target(_) => {
                FailureReply::Code(GENERAL_FAILURE)
            }
        }
    }
}

/// The greeting: `05 NMETHODS METHODS...`; it must offer `00`.
pub fn read_greeting(r: &mut DeadlineReader<'_>) -> Result<(), HandshakeError> {
    let version = r.byte()?;
    if version != VERSION {
        return Err(HandshakeError::Version(version));
    }
    let n = r.byte()?;
    if n == 0 {
        return Err(HandshakeError::NoMethods);
    }
    let methods = r.take(n as usize)?;
    if !methods.contains(&NO_AUTH) {
        return Err(HandshakeError::NoAcceptableMethod);
    }
    Ok(())
}

/// The request: `05 CMD RSV ATYP DST.ADDR DST.PORT`; returns the host
/// (a checked name, or an address's text) and the port.
pub fn read_request(r: &mut DeadlineReader<'_>) -> Result<(String, u16), HandshakeError> {
    let head = r.take(4)?;
    let (version, command, address_type) = (head[0], head[1], head[3]);
    if version != VERSION {
        return Err(HandshakeError::Version(version));
    }
    if command != CMD_CONNECT {
        return Err(HandshakeError::Command(command));
    }
    let host = match address_type {
        ATYP_IPV4 => {
            let a: [u8; 4] = r.take(4)?.try_into().unwrap_or_default();
            Ipv4Addr::from(a).to_string()
        }
        ATYP_IPV6 => {
            let a: [u8; 16] = r.take(16)?.try_into().unwrap_or_default();
            Ipv6Addr::from(a).to_string()
        }
        ATYP_DOMAIN => {
            let len = r.byte()?;
            if len == 0 {
                return Err(HandshakeError::EmptyDomain);
            }
            let name = r.take(len as usize)?;
            let name = String::from_utf8(name).map_err(|_| HandshakeError::DomainEncoding)?;
            target::check_host(&name).map_err(HandshakeError::Target)?
        }
        other => return Err(HandshakeError::AddressType(other)),
    };
    let p = r.take(2)?;
    let port = u16::from_be_bytes([p[0], p[1]]);
    if port == 0 {
        return Err(HandshakeError::Target(TargetError::BadPort));
    }
    Ok((host, port))
}

/// A request reply: `05 REP 00 01 0.0.0.0:0` (the bound address is not
/// the client's business).
pub fn reply(code: u8) -> [u8; 10] {
    [VERSION, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::stream::Socket;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    /// Runs `f` on a reader over `bytes`, then end of input.
    fn over<T>(
        bytes: &[u8],
        f: impl FnOnce(&mut DeadlineReader<'_>) -> Result<T, HandshakeError>,
    ) -> Result<T, HandshakeError> {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(bytes).unwrap();
        drop(b);
        let s = Socket::from(a);
        let mut r = DeadlineReader::new(&s, Duration::from_secs(5));
        f(&mut r)
    }

    fn request(bytes: &[u8]) -> Result<(String, u16), HandshakeError> {
        over(bytes, read_request)
    }

    #[test]
    fn greetings() {
        assert!(over(&[5, 1, 0], read_greeting).is_ok());
        assert!(over(&[5, 3, 2, 1, 0], read_greeting).is_ok());
        let e = over(&[5, 1, 2], read_greeting).unwrap_err();
        assert_eq!(e.reply(), FailureReply::NoMethod, "{e}");
        let e = over(&[5, 0], read_greeting).unwrap_err();
        assert_eq!(e.reply(), FailureReply::NoMethod, "{e}");
        let e = over(&[4, 1, 0], read_greeting).unwrap_err();
        assert!(matches!(e, HandshakeError::Version(4)), "{e}");
        assert_eq!(e.reply(), FailureReply::Nothing);
        // Truncated: fewer methods than announced.
        for short in [&[][..], &[5], &[5, 3, 0]] {
            let e = over(short, read_greeting).unwrap_err();
            assert!(
                matches!(e, HandshakeError::Read(BoundedReadError::Closed)),
                "{short:?}: {e}"
            );
        }
    }

    #[test]
    fn requests() {
        assert_eq!(
            request(&[5, 1, 0, 1, 10, 0, 0, 1, 1, 187]).unwrap(),
            ("10.0.0.1".into(), 443)
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 80]);
        assert_eq!(request(&v6).unwrap(), ("2001:db8::1".into(), 80));
        let mut d = vec![5, 1, 0, 3, 8];
        d.extend_from_slice(b"api.test");
        d.extend_from_slice(&[1, 187]);
        assert_eq!(request(&d).unwrap(), ("api.test".into(), 443));
    }

    #[test]
    fn hostile_requests() {
        let code = |bytes: &[u8]| request(bytes).unwrap_err().reply();
        // BIND and UDP ASSOCIATE.
        assert_eq!(
            code(&[5, 2, 0, 1, 1, 2, 3, 4, 0, 80]),
            FailureReply::Code(0x07)
        );
        assert_eq!(
            code(&[5, 3, 0, 1, 1, 2, 3, 4, 0, 80]),
            FailureReply::Code(0x07)
        );
        // Unknown address types.
        for atyp in [0u8, 2, 5, 0xff] {
            assert_eq!(
                code(&[5, 1, 0, atyp, 1, 2, 3, 4, 0, 80]),
                FailureReply::Code(0x08)
            );
        }
        // A zero-length domain, a domain with a NUL, a colon, a bracketed
        // literal, invalid UTF-8, a numeric name.
        assert_eq!(code(&[5, 1, 0, 3, 0, 0, 80]), FailureReply::Code(0x01));
        for name in [
            &b"a\0b"[..],
            b"a:b",
            b"[::1]",
            b"\xff\xfe",
            b"0x7f000001",
            b"a b",
        ] {
            let mut d = vec![5, 1, 0, 3, name.len() as u8];
            d.extend_from_slice(name);
            d.extend_from_slice(&[0, 80]);
            assert_eq!(code(&d), FailureReply::Code(0x01), "{name:?}");
        }
        // Port zero.
        assert_eq!(
            code(&[5, 1, 0, 1, 1, 2, 3, 4, 0, 0]),
            FailureReply::Code(0x01)
        );
        // Truncated anywhere: the client is gone, nothing to answer.
        let full = [5u8, 1, 0, 3, 4, b'a', b'.', b'b', b'c', 0, 80];
        for n in 0..full.len() {
            let e = request(&full[..n]).unwrap_err();
            assert!(
                matches!(e, HandshakeError::Read(BoundedReadError::Closed)),
                "{n}: {e}"
            );
        }
        assert!(request(&full).is_ok());
        // The wrong version in the request.
        assert_eq!(
            code(&[4, 1, 0, 1, 1, 2, 3, 4, 0, 80]),
            FailureReply::Nothing
        );
    }

    #[test]
    fn a_stalled_handshake_is_cut_off_at_the_deadline() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[5, 1]).unwrap();
        let s = Socket::from(a);
        let started = Instant::now();
        let mut r = DeadlineReader::new(&s, Duration::from_millis(200));
        let e = read_greeting(&mut r).unwrap_err();
        assert!(
            matches!(e, HandshakeError::Read(BoundedReadError::TimedOut(_))),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn replies() {
        assert_eq!(reply(0), [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(reply(0x02)[1], 0x02);
    }
}
