//! A newc ("070701") cpio writer: the format the kernel unpacks initramfs from.
//!
//! Entries are written in the order given; [`Archive`] sorts them so that
//! the same inputs give the same bytes.

use std::collections::BTreeMap;
use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

pub const MODE_DIR: u32 = 0o040000;
pub const MODE_FILE: u32 = 0o100000;
pub const MODE_SYMLINK: u32 = 0o120000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("path {0:?} is not a relative path without '..'")]
    BadPath(String),
    #[error("{0:?} is added twice with different contents")]
    Conflict(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// An in-memory set of entries keyed by path, written sorted.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

fn normalize(path: &str) -> Result<String, CpioError> {
    let p = path.trim_start_matches('/').trim_end_matches('/');
    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(CpioError::BadPath(path.to_owned()));
    }
    Ok(p.to_owned())
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `path` and creates its parent directories (mode 0755).
    pub fn add(&mut self, path: &str, entry: Entry) -> Result<(), CpioError> {
        let p = normalize(path)?;
        let mut parent = String::new();
        let comps: Vec<&str> = p.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            self.entries
                .entry(parent.clone())
                .or_insert(Entry::Dir { mode: 0o755 });
        }
        match self.entries.get(&p) {
            Some(existing) if *existing != entry && !matches!(existing, Entry::Dir { .. }) => {
                Err(CpioError::Conflict(p))
            }
            _ => {
                self.entries.insert(p, entry);
                Ok(())
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the archive with every mtime set to `mtime` and owner root.
    pub fn write<W: Write>(&self, out: &mut W, mtime: u32) -> Result<(), CpioError> {
        let mut w = CountingWriter {
            inner: out,
            written: 0,
        };
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data): (u32, &[u8]) = match entry {
                Entry::Dir { mode } => (MODE_DIR | (mode & 0o7777), &[]),
                Entry::File { mode, data } => (MODE_FILE | (mode & 0o7777), data),
                Entry::Symlink { target } => (MODE_SYMLINK | 0o777, target.as_bytes()),
            };
            let nlink = if matches!(entry, Entry::Dir { .. }) {
                2
            } else {
                1
            };
            write_header(&mut w, ino as u32 + 1, mode, nlink, mtime, data.len(), path)?;
            w.write_all(data)?;
            w.pad4()?;
        }
        write_header(&mut w, 0, 0, 1, 0, 0, TRAILER)?;
        // Pad to 512 bytes as cpio(1) does; the kernel does not care.
        let rem = (w.written % 512) as usize;
        if rem != 0 {
            w.write_all(&vec![0u8; 512 - rem])?;
        }
        Ok(())
    }
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    written: u64,
}

impl<W: Write> CountingWriter<'_, W> {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.write_all(&[0u8; 4][..4 - rem])?;
        }
        Ok(())
    }
}

fn write_header<W: Write>(
    w: &mut CountingWriter<'_, W>,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    filesize: usize,
    name: &str,
) -> io::Result<()> {
    let namesize = name.len() + 1;
    let header = format!(
        "{MAGIC}{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{filesize:08x}\
         {devmajor:08x}{devminor:08x}{rdevmajor:08x}{rdevminor:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        devmajor = 0,
        devminor = 0,
        rdevmajor = 0,
        rdevminor = 0,
        check = 0,
    );
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    w.pad4()
}

/// Why [`parse`] could not read an archive.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("truncated header at {0}")]
    TruncatedHeader(usize),
    #[error("non-ASCII header at {0}")]
    NonAsciiHeader(usize),
    #[error("bad magic at {0}")]
    BadMagic(usize),
    #[error("header at {offset}: field {field} is not hex: {source}")]
    BadField {
        offset: usize,
        field: usize,
        source: std::num::ParseIntError,
    },
    #[error("truncated name at {0}")]
    TruncatedName(usize),
    #[error("truncated data of {0}")]
    TruncatedData(String),
}

/// Reads a newc archive back (used by tests and by `coworkvm-rootfs list`).
pub fn parse(mut data: &[u8]) -> Result<Vec<(String, u32, Vec<u8>)>, ParseError> {
    let mut out = Vec::new();
    let mut offset = 0usize;
    loop {
        if data.len() < 110 {
            return Err(ParseError::TruncatedHeader(offset));
        }
        let h =
            std::str::from_utf8(&data[..110]).map_err(|_| ParseError::NonAsciiHeader(offset))?;
        if &h[..6] != MAGIC {
            return Err(ParseError::BadMagic(offset));
        }
        let field = |i: usize| {
            u32::from_str_radix(&h[6 + i * 8..14 + i * 8], 16).map_err(|source| {
                ParseError::BadField {
                    offset,
                    field: i,
                    source,
                }
            })
        };
        let mode = field(1)?;
        let filesize = field(6)? as usize;
        let namesize = field(11)? as usize;
        let name_end = 110 + namesize;
        if namesize == 0 || data.len() < name_end {
            return Err(ParseError::TruncatedName(offset));
        }
        let name = String::from_utf8_lossy(&data[110..name_end - 1]).into_owned();
        let data_start = (name_end + 3) & !3;
        let data_end = data_start + filesize;
        if data.len() < data_end {
            return Err(ParseError::TruncatedData(name));
        }
        if name == TRAILER {
            return Ok(out);
        }
        out.push((name, mode, data[data_start..data_end].to_vec()));
        let next = (data_end + 3) & !3;
        offset += next;
        data = &data[next.min(data.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Archive {
        let mut a = Archive::new();
        a.add(
            "bin/busybox",
            Entry::File {
                mode: 0o755,
                data: b"ELF...".to_vec(),
            },
        )
        .unwrap();
        a.add(
            "bin/sh",
            Entry::Symlink {
                target: "busybox".into(),
            },
        )
        .unwrap();
        a.add(
            "/init",
            Entry::File {
                mode: 0o755,
                data: b"#!/bin/sh\n".to_vec(),
            },
        )
        .unwrap();
        a
    }

    #[test]
    fn round_trip_with_parents_and_alignment() {
        let mut out = Vec::new();
        sample().write(&mut out, 0).unwrap();
        assert_eq!(out.len() % 512, 0);
        let entries = parse(&out).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/busybox", "bin/sh", "init"]);
        assert_eq!(entries[0].1, MODE_DIR | 0o755);
        assert_eq!(entries[1].2, b"ELF...");
        assert_eq!(entries[2].1 & 0o170000, MODE_SYMLINK);
        assert_eq!(entries[2].2, b"busybox");
        assert_eq!(entries[3].1, MODE_FILE | 0o755);
    }

    #[test]
    fn output_is_deterministic_whatever_the_insertion_order() {
        let mut a = Vec::new();
        sample().write(&mut a, 1234).unwrap();
        let mut other = Archive::new();
        other
            .add(
                "init",
                Entry::File {
                    mode: 0o755,
                    data: b"#!/bin/sh\n".to_vec(),
                },
            )
            .unwrap();
        other
            .add(
                "bin/sh",
                Entry::Symlink {
                    target: "busybox".into(),
                },
            )
            .unwrap();
        other
            .add(
                "bin/busybox",
                Entry::File {
                    mode: 0o755,
                    data: b"ELF...".to_vec(),
                },
            )
            .unwrap();
        let mut b = Vec::new();
        other.write(&mut b, 1234).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_paths_and_conflicts_are_refused() {
        let mut a = Archive::new();
        assert!(matches!(
            a.add("../x", Entry::Dir { mode: 0o755 }),
            Err(CpioError::BadPath(_))
        ));
        assert!(matches!(
            a.add("a//b", Entry::Dir { mode: 0o755 }),
            Err(CpioError::BadPath(_))
        ));
        assert!(matches!(
            a.add("/", Entry::Dir { mode: 0o755 }),
            Err(CpioError::BadPath(_))
        ));
        a.add(
            "f",
            Entry::File {
                mode: 0o644,
                data: vec![1],
            },
        )
        .unwrap();
        assert!(matches!(
            a.add(
                "f",
                Entry::File {
                    mode: 0o644,
                    data: vec![2]
                }
            ),
            Err(CpioError::Conflict(_))
        ));
        // The same content twice is fine.
        a.add(
            "f",
            Entry::File {
                mode: 0o644,
                data: vec![1],
            },
        )
        .unwrap();
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(parse(b"070701zz").is_err());
        assert!(parse(&[b'x'; 200]).is_err());
    }

    #[test]
    fn newc_header_bytes_are_exact() {
        let mut a = Archive::new();
        a.add(
            "ab",
            Entry::File {
                mode: 0o644,
                data: b"hello".to_vec(),
            },
        )
        .unwrap();
        let mut out = Vec::new();
        a.write(&mut out, 0x5f5e100).unwrap();
        let expected_header = "070701\
            00000001\
            000081a4\
            00000000\
            00000000\
            00000001\
            05f5e100\
            00000005\
            00000000000000000000000000000000\
            00000003\
            00000000";
        assert_eq!(&out[..110], expected_header.as_bytes());
        // name "ab\0" (110 + 3 = 113) padded to 116, then the data.
        assert_eq!(&out[110..116], b"ab\0\0\0\0");
        assert_eq!(&out[116..121], b"hello");
        assert_eq!(&out[121..124], b"\0\0\0", "data padded to 4");
        let trailer = &out[124..];
        assert!(trailer.starts_with(b"070701"));
        assert_eq!(&trailer[110..121], b"TRAILER!!!\0");
        assert!(out[124 + 121..].iter().all(|&b| b == 0));
    }
}
