//! The host side of Firecracker-style hybrid vsock: a process on the host
//! connects to the VM's Unix socket and writes `CONNECT <port>\n`; the VMM
//! answers `OK <host port>\n` once the guest accepted, or closes the socket.

/// Longest `CONNECT` line accepted, newline included.
pub const MAX_LINE: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("CONNECT line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("expected \"CONNECT <port>\", got {0:?}")]
    Malformed(String),
}

/// Accumulates bytes until a full `CONNECT` line is there.
#[derive(Debug, Default)]
pub struct ConnectParser {
    buf: Vec<u8>,
}

impl ConnectParser {
    /// Feeds bytes; `Ok(Some((port, rest)))` once the line is complete,
    /// `rest` being whatever followed it (the stream's first data).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<(u32, Vec<u8>)>, HandshakeError> {
        self.buf.extend_from_slice(bytes);
        let Some(nl) = self.buf.iter().position(|&b| b == b'\n') else {
            if self.buf.len() >= MAX_LINE {
                return Err(HandshakeError::TooLong);
            }
            return Ok(None);
        };
        if nl + 1 > MAX_LINE {
            return Err(HandshakeError::TooLong);
        }
        let line = String::from_utf8_lossy(&self.buf[..nl]).into_owned();
        let port = line
            .trim_end_matches('\r')
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim().parse::<u32>().ok())
            .ok_or_else(|| HandshakeError::Malformed(line.clone()))?;
        let rest = self.buf[nl + 1..].to_vec();
        self.buf.clear();
        Ok(Some((port, rest)))
    }
}

pub fn ok_line(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_and_split_lines() {
        let mut p = ConnectParser::default();
        assert_eq!(
            p.feed(b"CONNECT 51234\nhello").unwrap(),
            Some((51234, b"hello".to_vec()))
        );
        let mut p = ConnectParser::default();
        assert_eq!(p.feed(b"CONN").unwrap(), None);
        assert_eq!(p.feed(b"ECT 5").unwrap(), None);
        assert_eq!(p.feed(b"2\r\n").unwrap(), Some((52, vec![])));
        assert_eq!(ok_line(1 << 30), "OK 1073741824\n");
    }

    #[test]
    fn garbage_and_long_lines_are_refused() {
        let mut p = ConnectParser::default();
        assert!(matches!(
            p.feed(b"HELLO 1\n"),
            Err(HandshakeError::Malformed(_))
        ));
        let mut p = ConnectParser::default();
        assert!(matches!(
            p.feed(b"CONNECT -1\n"),
            Err(HandshakeError::Malformed(_))
        ));
        let mut p = ConnectParser::default();
        assert!(matches!(
            p.feed(b"CONNECT 99999999999\n"),
            Err(HandshakeError::Malformed(_))
        ));
        let mut p = ConnectParser::default();
        assert_eq!(p.feed(&[b'A'; 31]).unwrap(), None);
        assert_eq!(p.feed(b"A"), Err(HandshakeError::TooLong));
        let mut p = ConnectParser::default();
        let mut long = b"CONNECT ".to_vec();
        long.extend_from_slice(&[b'1'; 40]);
        long.push(b'\n');
        assert_eq!(p.feed(&long), Err(HandshakeError::TooLong));
    }
}
