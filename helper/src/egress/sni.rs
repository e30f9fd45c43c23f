//! The server name (SNI) of a TLS ClientHello.
//!
//! Used on streams to `host:443` (CONNECT or SOCKS5): the session's first TLS record is
//! read, and a ClientHello that names another server than the one the
//! allowlist let through is refused (a shared front end would otherwise
//! route the session to a host it was never allowed).
//!
//! The parser takes one whole TLS record (its 5-byte header and body) as
//! the session sent it. Every length is checked against what is left
//! before it is used; nothing is allocated but the name. It depends on
//! nothing but `std` and `thiserror`, so that the fuzz target
//! (`helper/fuzz`) can compile it on its own.

/// The longest TLS record body (2^14 plaintext bytes, RFC 8446 5.1); the
/// first record of a stream is read with this bound.
pub const MAX_RECORD_BODY: usize = 16 * 1024;
/// A TLS record header: type, version, length.
pub const RECORD_HEADER: usize = 5;
/// The record type of a handshake message.
pub const HANDSHAKE: u8 = 0x16;

/// Why a record is not a ClientHello the helper can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("not a TLS handshake record")]
    NotHandshake,
    #[error("TLS record longer than {MAX_RECORD_BODY} bytes")]
    RecordTooLong,
    #[error("the ClientHello ends early: {0}")]
    Truncated(&'static str),
    #[error("not a ClientHello")]
    NotClientHello,
    #[error("the ClientHello is malformed: {0}")]
    Malformed(&'static str),
}

/// A cursor over bytes whose every read is bounded.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if self.rest.len() < n {
            return Err(SniError::Truncated(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self, what: &'static str) -> Result<usize, SniError> {
        let b = self.take(3, what)?;
        Ok((usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }

    /// A vector with a `width`-byte length prefix, as its own reader.
    fn vec(&mut self, width: u8, what: &'static str) -> Result<Reader<'a>, SniError> {
        let len = match width {
            1 => usize::from(self.u8(what)?),
            _ => usize::from(self.u16(what)?),
        };
        Ok(Reader {
            rest: self.take(len, what)?,
        })
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// The body length a record header announces, checked against
/// [`MAX_RECORD_BODY`].
pub fn record_body_len(header: &[u8; RECORD_HEADER]) -> Result<usize, SniError> {
    if header[0] != HANDSHAKE {
        return Err(SniError::NotHandshake);
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len > MAX_RECORD_BODY {
        return Err(SniError::RecordTooLong);
    }
    Ok(len)
}

/// The host name a ClientHello record asks for: `Ok(Some(name))`,
/// `Ok(None)` when it names none, `Err` when the record is not a whole,
/// well-formed ClientHello (including one that names two host names: RFC
/// 6066 3 allows one per type, and two leave the server's choice open).
pub fn client_hello_sni(record: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader { rest: record };
    let header: [u8; RECORD_HEADER] = r
        .take(RECORD_HEADER, "record header")?
        .try_into()
        .map_err(|_| SniError::Truncated("record header"))?;
    let body_len = record_body_len(&header)?;
    if header[1] != 3 {
        return Err(SniError::Malformed("record version"));
    }
    let body = r.take(body_len, "record body")?;
    if !r.is_empty() {
        return Err(SniError::Malformed("bytes after the record"));
    }
    let mut r = Reader { rest: body };
    if r.u8("handshake type")? != 1 {
        return Err(SniError::NotClientHello);
    }
    let hello_len = r.u24("handshake length")?;
    // The whole ClientHello must be in this record: a name split across
    // records is not read.
    let mut hello = Reader {
        rest: r.take(hello_len, "ClientHello")?,
    };
    if !r.is_empty() {
        return Err(SniError::Malformed("a second handshake message"));
    }
    hello.take(2, "client version")?;
    hello.take(32, "random")?;
    let session_id = hello.vec(1, "session id")?;
    if session_id.rest.len() > 32 {
        return Err(SniError::Malformed("session id over 32 bytes"));
    }
    let suites = hello.vec(2, "cipher suites")?;
    if suites.rest.is_empty() || suites.rest.len() % 2 != 0 {
        return Err(SniError::Malformed("cipher suites"));
    }
    if hello.vec(1, "compression methods")?.is_empty() {
        return Err(SniError::Malformed("no compression method"));
    }
    if hello.is_empty() {
        // No extensions at all (TLS 1.0 style): no name.
        return Ok(None);
    }
    let mut exts = hello.vec(2, "extensions")?;
    if !hello.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }
    let mut name: Option<String> = None;
    let mut seen_sni = false;
    while !exts.is_empty() {
        let kind = exts.u16("extension type")?;
        let mut data = exts.vec(2, "extension data")?;
        if kind != 0 {
            continue;
        }
        if seen_sni {
            return Err(SniError::Malformed("two server_name extensions"));
        }
        seen_sni = true;
        let mut list = data.vec(2, "server name list")?;
        if !data.is_empty() {
            return Err(SniError::Malformed("bytes after the server name list"));
        }
        if list.is_empty() {
            return Err(SniError::Malformed("empty server name list"));
        }
        while !list.is_empty() {
            let name_type = list.u8("server name type")?;
            let value = list.vec(2, "server name")?;
            if name_type != 0 {
                // Other name types (none is defined) are not host names.
                continue;
            }
            if name.is_some() {
                return Err(SniError::Malformed("two host names"));
            }
            let bytes = value.rest;
            if bytes.is_empty() || bytes.len() > 255 {
                return Err(SniError::Malformed("host name length"));
            }
            if !bytes.iter().all(|b| b.is_ascii_graphic()) {
                return Err(SniError::Malformed("host name characters"));
            }
            // All ASCII graphic: valid UTF-8.
            name = Some(String::from_utf8_lossy(bytes).into_owned());
        }
    }
    Ok(name)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn vec16(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    /// A ClientHello record with these extensions (raw, each with its
    /// type and length).
    pub(crate) fn hello_with_extensions(exts: Option<&[u8]>) -> Vec<u8> {
        let mut hello = vec![3, 3];
        hello.extend_from_slice(&[7; 32]);
        hello.push(0); // session id
        hello.extend(vec16(&[0x13, 0x01, 0x00, 0xff])); // suites
        hello.extend_from_slice(&[1, 0]); // compression: null
        if let Some(e) = exts {
            hello.extend(vec16(e));
        }
        let mut hs = vec![1];
        hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend(hello);
        let mut rec = vec![HANDSHAKE, 3, 1];
        rec.extend(vec16(&hs));
        rec
    }

    pub(crate) fn sni_ext(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (t, n) in names {
            list.push(*t);
            list.extend(vec16(n));
        }
        let mut e = vec![0, 0];
        e.extend(vec16(&vec16(&list)));
        e
    }

    /// A ClientHello record naming `host`, with other extensions around.
    pub(crate) fn hello(host: &str) -> Vec<u8> {
        let mut exts = vec![0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]; // versions
        exts.extend(sni_ext(&[(0, host.as_bytes())]));
        exts.extend([0x00, 0x10, 0x00, 0x05, 0x00, 0x03, 0x02, b'h', b'2']); // alpn
        hello_with_extensions(Some(&exts))
    }

    #[test]
    fn reads_the_name() {
        assert_eq!(
            client_hello_sni(&hello("api.example.com")),
            Ok(Some("api.example.com".into()))
        );
    }

    #[test]
    fn no_sni_is_none() {
        assert_eq!(client_hello_sni(&hello_with_extensions(None)), Ok(None));
        let alpn = [0x00, 0x10, 0x00, 0x05, 0x00, 0x03, 0x02, b'h', b'2'];
        assert_eq!(
            client_hello_sni(&hello_with_extensions(Some(&alpn))),
            Ok(None)
        );
        assert_eq!(
            client_hello_sni(&hello_with_extensions(Some(&[]))),
            Ok(None)
        );
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let full = hello("api.example.com");
        for cut in 0..full.len() {
            let r = client_hello_sni(&full[..cut]);
            assert!(r.is_err(), "cut at {cut}: {r:?}");
        }
        // And every truncation with the record length fixed up to match,
        // so the inner lengths overflow instead.
        for cut in RECORD_HEADER..full.len() {
            let mut rec = full[..cut].to_vec();
            let body = (cut - RECORD_HEADER) as u16;
            rec[3..5].copy_from_slice(&body.to_be_bytes());
            assert!(client_hello_sni(&rec).is_err(), "refit cut at {cut}");
        }
    }

    #[test]
    fn overflowing_lengths_are_errors() {
        let full = hello("api.example.com");
        // Every single byte set to 0xff, then 0x00: any answer but a panic;
        // a changed length byte must not read past the record.
        for i in 0..full.len() {
            for v in [0x00, 0xff, 0x80] {
                let mut rec = full.clone();
                rec[i] = v;
                let _ = client_hello_sni(&rec);
            }
        }
        let mut big = full.clone();
        big[3..5].copy_from_slice(&(MAX_RECORD_BODY as u16 + 1).to_be_bytes());
        assert_eq!(client_hello_sni(&big), Err(SniError::RecordTooLong));
        // A handshake length past the record.
        let mut long = full.clone();
        long[6..9].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            client_hello_sni(&long),
            Err(SniError::Truncated(_))
        ));
        // Bytes after the record.
        let mut extra = full.clone();
        extra.push(0);
        assert!(client_hello_sni(&extra).is_err());
        // Not a handshake, not a ClientHello.
        let mut app = full.clone();
        app[0] = 0x17;
        assert_eq!(client_hello_sni(&app), Err(SniError::NotHandshake));
        let mut server = full;
        server[5] = 2;
        assert_eq!(client_hello_sni(&server), Err(SniError::NotClientHello));
    }

    #[test]
    fn two_names_or_two_extensions_are_refused() {
        let two = sni_ext(&[(0, b"a.example"), (0, b"b.example")]);
        assert!(matches!(
            client_hello_sni(&hello_with_extensions(Some(&two))),
            Err(SniError::Malformed(_))
        ));
        let mut twice = sni_ext(&[(0, b"a.example")]);
        twice.extend(sni_ext(&[(0, b"a.example")]));
        assert!(matches!(
            client_hello_sni(&hello_with_extensions(Some(&twice))),
            Err(SniError::Malformed(_))
        ));
        // Another name type beside the host name is skipped.
        let other = sni_ext(&[(1, b"whatever"), (0, b"a.example")]);
        assert_eq!(
            client_hello_sni(&hello_with_extensions(Some(&other))),
            Ok(Some("a.example".into()))
        );
        let empty = sni_ext(&[]);
        assert!(client_hello_sni(&hello_with_extensions(Some(&empty))).is_err());
        let nul = sni_ext(&[(0, b"a\0.example")]);
        assert!(client_hello_sni(&hello_with_extensions(Some(&nul))).is_err());
        let blank = sni_ext(&[(0, b"")]);
        assert!(client_hello_sni(&hello_with_extensions(Some(&blank))).is_err());
    }
}
