//! A bundle's identity: the guest NIC's MAC address (`macAddress`) and the
//! machine's UUID (`machineIdentifier`, given to the guest through SMBIOS).
//! Each is created once, atomically, and never rewritten: the guest keys
//! things on them (its machine-id, DHCP leases), so a silently regenerated
//! identity would look like a different machine. A file that is present but
//! unreadable or malformed is an error, left as it is for a person to look
//! at.

use coworkvm_vmm::MachineUuid;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::fsutil;

pub const MAC_FILE: &str = "macAddress";
pub const MACHINE_ID_FILE: &str = "machineIdentifier";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{file} in {dir} cannot be read: {source}")]
    Unreadable {
        file: &'static str,
        dir: PathBuf,
        source: io::Error,
    },
    #[error("{file} in {dir} is not {what}: {reason}")]
    Malformed {
        file: &'static str,
        dir: PathBuf,
        what: &'static str,
        #[source]
        reason: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot create {file} in {dir}: {source}")]
    Create {
        file: &'static str,
        dir: PathBuf,
        source: io::Error,
    },
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// A random locally administered (bit 1 of the first octet set) unicast
    /// (bit 0 clear) address, which can never collide with a vendor's.
    pub fn random() -> io::Result<Self> {
        let mut b = [0u8; 6];
        fsutil::random_bytes(&mut b)?;
        b[0] = (b[0] & 0xfc) | 0x02;
        Ok(MacAddress(b))
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Text that is not a NIC's MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadMacAddress {
    #[error("{0:?} does not have six ':'-separated octets")]
    NotSixOctets(String),
    #[error("{text:?}: octet {octet:?} is not two hex digits")]
    BadOctet { text: String, octet: String },
    /// A multicast address cannot be a NIC's own.
    #[error("{0:?} is a multicast address")]
    Multicast(String),
}

impl FromStr for MacAddress {
    type Err = BadMacAddress;

    fn from_str(s: &str) -> Result<Self, BadMacAddress> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(BadMacAddress::NotSixOctets(s.to_owned()));
        }
        let mut b = [0u8; 6];
        for (octet, part) in b.iter_mut().zip(&parts) {
            let bad = || BadMacAddress::BadOctet {
                text: s.to_owned(),
                octet: (*part).to_owned(),
            };
            // from_str_radix alone would take a sign ("+a").
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if b[0] & 1 != 0 {
            return Err(BadMacAddress::Multicast(s.to_owned()));
        }
        Ok(MacAddress(b))
    }
}

/// A UUID, held in its text (big-endian, RFC 9562) byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MachineId(pub [u8; 16]);

impl MachineId {
    /// A random version-4 UUID.
    pub fn random() -> io::Result<Self> {
        let mut b = [0u8; 16];
        fsutil::random_bytes(&mut b)?;
        b[6] = (b[6] & 0x0f) | 0x40; // version 4
        b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
        Ok(MachineId(b))
    }

    /// The same UUID as the VMM's SMBIOS type: one parser, one text form,
    /// one byte order for both.
    pub fn uuid(&self) -> MachineUuid {
        MachineUuid(self.0)
    }
}

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.uuid().fmt(f)
    }
}

impl FromStr for MachineId {
    type Err = coworkvm_vmm::SmbiosError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MachineUuid::parse(s).map(|u| MachineId(u.0))
    }
}

/// The identity a bundle gives its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleIdentity {
    pub mac: MacAddress,
    pub machine_id: MachineId,
}

impl BundleIdentity {
    /// Reads the bundle's identity, creating whichever file is missing.
    /// Safe against concurrent callers (threads or processes): all of them
    /// return the same values.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        Ok(BundleIdentity {
            mac: load_or_create_file(dir, MAC_FILE, "a MAC address", MacAddress::random)?,
            machine_id: load_or_create_file(dir, MACHINE_ID_FILE, "a UUID", MachineId::random)?,
        })
    }
}

/// Reads the bundle's MAC address; `None` when it was not created yet.
pub fn read_mac(dir: &Path) -> Result<Option<MacAddress>, IdentityError> {
    read_file(dir, MAC_FILE, "a MAC address")
}

/// Reads the bundle's machine UUID; `None` when it was not created yet.
pub fn read_machine_id(dir: &Path) -> Result<Option<MachineId>, IdentityError> {
    read_file(dir, MACHINE_ID_FILE, "a UUID")
}

fn read_file<T: FromStr<Err: std::error::Error + Send + Sync + 'static>>(
    dir: &Path,
    file: &'static str,
    what: &'static str,
) -> Result<Option<T>, IdentityError> {
    // One short line; bounded, and never through a link or a FIFO.
    let text = match super::fsutil::read_bounded(&dir.join(file), 4096).and_then(|b| {
        String::from_utf8(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(IdentityError::Unreadable {
                file,
                dir: dir.to_owned(),
                source,
            })
        }
    };
    // The files are written as one line; a hand-edited one may lack the
    // newline or have extra blanks around it, which is harmless.
    text.trim()
        .parse()
        .map(Some)
        .map_err(|reason: T::Err| IdentityError::Malformed {
            file,
            dir: dir.to_owned(),
            what,
            reason: reason.into(),
        })
}

fn load_or_create_file<
    T: FromStr<Err: std::error::Error + Send + Sync + 'static> + fmt::Display,
>(
    dir: &Path,
    file: &'static str,
    what: &'static str,
    generate: fn() -> io::Result<T>,
) -> Result<T, IdentityError> {
    if let Some(value) = read_file(dir, file, what)? {
        return Ok(value);
    }
    let create_err = |source| IdentityError::Create {
        file,
        dir: dir.to_owned(),
        source,
    };
    let value = generate().map_err(create_err)?;
    let temp = fsutil::TempFileGuard::new(dir.join(fsutil::unique_temp_name(file)));
    {
        let mut f = fsutil::create_exclusive(temp.path(), 0o644).map_err(create_err)?;
        io::Write::write_all(&mut f, format!("{value}\n").as_bytes()).map_err(create_err)?;
        f.sync_all().map_err(create_err)?;
    }
    match fsutil::rename_noreplace(temp.path(), &dir.join(file)) {
        Ok(()) => {
            temp.keep();
            fsutil::fsync_dir(dir).map_err(create_err)?;
            Ok(value)
        }
        // Another creator won the race: its value is the identity. The
        // guard removes our temporary file.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            drop(temp);
            read_file(dir, file, what)?.ok_or_else(|| {
                create_err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "it existed a moment ago and is gone",
                ))
            })
        }
        Err(e) => Err(create_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How Linux prints an SMBIOS UUID (`dmi_save_uuid`, `%pUl`): the first
    /// three fields little-endian.
    fn linux_product_uuid(b: [u8; 16]) -> String {
        format!(
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}",
            b[3],
            b[2],
            b[1],
            b[0],
            b[5],
            b[4],
            b[7],
            b[6],
            b[8],
            b[9],
            socket_proto::manifest::hex(&b[10..16])
        )
    }

    #[test]
    fn smbios_bytes_round_trip_through_linux_decoding() {
        let id: MachineId = "00112233-4455-6677-8899-aabbccddeeff".parse().unwrap();
        assert_eq!(
            id.uuid().smbios_bytes(),
            [
                0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
        assert_eq!(
            linux_product_uuid(id.uuid().smbios_bytes()),
            "00112233-4455-6677-8899-aabbccddeeff"
        );
        for _ in 0..100 {
            let id = MachineId::random().unwrap();
            assert_eq!(linux_product_uuid(id.uuid().smbios_bytes()), id.to_string());
        }
    }

    #[test]
    fn random_uuid_is_version_4_and_parses_back() {
        for _ in 0..100 {
            let id = MachineId::random().unwrap();
            let text = id.to_string();
            assert_eq!(text.len(), 36);
            assert_eq!(&text[14..15], "4", "{text}");
            assert!(matches!(&text[19..20], "8" | "9" | "a" | "b"), "{text}");
            assert_eq!(text.parse::<MachineId>().unwrap(), id);
        }
    }

    #[test]
    fn random_mac_is_local_unicast_and_parses_back() {
        for _ in 0..100 {
            let mac = MacAddress::random().unwrap();
            assert_eq!(mac.0[0] & 0b11, 0b10, "{mac}");
            assert_eq!(mac.to_string().parse::<MacAddress>().unwrap(), mac);
        }
    }

    #[test]
    fn malformed_text_is_refused() {
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb:cc:dd:ee:fg",
            "aab:b:cc:dd:ee:ff",
            "+a:bb:cc:dd:ee:ff",
            "01:00:5e:00:00:01", // multicast
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad:?} accepted");
        }
        for bad in [
            "",
            "00112233-4455-6677-8899-aabbccddeef",
            "00112233445566778899aabbccddeeff",
            "0011223g-4455-6677-8899-aabbccddeeff",
            "+0112233-4455-6677-8899-aabbccddeeff",
            "00112233-4455-6677-8899-aabbccddeeff-",
        ] {
            assert!(bad.parse::<MachineId>().is_err(), "{bad:?} accepted");
        }
    }
}
