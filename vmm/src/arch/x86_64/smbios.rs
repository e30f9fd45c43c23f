//! SMBIOS 3.0 tables: how the guest learns the VM's persistent identity.
//!
//! Linux (without EFI) scans `0xf0000..0x100000` on 16-byte boundaries for
//! the `_SM3_` entry point, then exposes type 1's UUID as
//! `/sys/class/dmi/id/product_uuid`. That file is what software in the guest
//! reads as "this machine", as it does on the Mac's VM, so it carries the
//! bundle's `machineIdentifier`.
//!
//! Tables written: type 0 (BIOS information, flagged "virtual machine"),
//! type 1 (system information with the UUID), type 127 (end of table).

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout;

const ENTRY_POINT_LEN: usize = 0x18;
/// Room for the entry point and tables: the SMBIOS window ends at 1 MiB.
const SMBIOS_END: u64 = 0x10_0000;
const MANUFACTURER: &str = "coworkvm";
const PRODUCT: &str = "coworkvm VM";
/// Characteristics extension byte 2, bit 4: "SMBIOS table describes a VM".
const BIOS_EXT2_VIRTUAL_MACHINE: u8 = 1 << 4;
/// BIOS characteristics bit 3: "BIOS characteristics not supported".
const BIOS_CHARACTERISTICS_NOT_SUPPORTED: u64 = 1 << 3;
/// System wake-up type: power switch.
const WAKEUP_POWER_SWITCH: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum SmbiosError {
    #[error("SMBIOS tables ({0} bytes) do not fit below 1 MiB")]
    TooLarge(usize),
    #[error("cannot write SMBIOS tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
    #[error("not a UUID: {0:?} (expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")]
    BadUuid(String),
}

/// A UUID's 16 bytes in RFC 4122 order (as its text form reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineUuid(pub [u8; 16]);

impl MachineUuid {
    /// Parses the 8-4-4-4-12 hex form (either case).
    pub fn parse(s: &str) -> Result<Self, SmbiosError> {
        let bad = || SmbiosError::BadUuid(s.to_owned());
        let groups: Vec<&str> = s.trim().split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        // from_str_radix alone would take a '+' sign.
        if lens != [8, 4, 4, 4, 12]
            || !groups
                .iter()
                .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(bad());
        }
        let hex: String = groups.concat();
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(MachineUuid(out))
    }

    /// The byte order of SMBIOS 2.6+ (and of Linux's `%pUl`): the first
    /// three fields little-endian, the rest as in the text.
    pub fn smbios_bytes(&self) -> [u8; 16] {
        let mut b = self.0;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        b
    }
}

/// In a launch configuration: the text form.
impl serde::Serialize for MachineUuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MachineUuid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        MachineUuid::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for MachineUuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// One structure: formatted area, then its strings, each NUL-terminated,
/// then a final NUL (two NULs when there are no strings).
fn structure(formatted: &[u8], strings: &[&str]) -> Vec<u8> {
    let mut v = formatted.to_vec();
    if strings.is_empty() {
        v.extend_from_slice(&[0, 0]);
    } else {
        for s in strings {
            v.extend_from_slice(s.as_bytes());
            v.push(0);
        }
        v.push(0);
    }
    v
}

fn header(kind: u8, len: u8, handle: u16) -> Vec<u8> {
    let mut h = vec![kind, len];
    h.extend_from_slice(&handle.to_le_bytes());
    h
}

fn bios_information() -> Vec<u8> {
    let mut t = header(0, 0x18, 0);
    t.push(1); // vendor: string 1
    t.push(2); // BIOS version: string 2
    t.extend_from_slice(&0xe800u16.to_le_bytes()); // start segment (nominal)
    t.push(3); // release date: string 3
    t.push(0); // ROM size: 64 KiB
    t.extend_from_slice(&BIOS_CHARACTERISTICS_NOT_SUPPORTED.to_le_bytes());
    t.push(0); // extension byte 1
    t.push(BIOS_EXT2_VIRTUAL_MACHINE);
    t.extend_from_slice(&[0, 0, 0xff, 0xff]); // release major/minor, EC n/a
    structure(&t, &[MANUFACTURER, env!("CARGO_PKG_VERSION"), "01/01/2026"])
}

fn system_information(uuid: Option<MachineUuid>) -> Vec<u8> {
    let mut t = header(1, 0x1b, 1);
    t.push(1); // manufacturer
    t.push(2); // product name
    t.push(0); // version: none
    t.push(0); // serial number: none
               // All zeros means "not present", which Linux shows as such.
    t.extend_from_slice(&uuid.map(|u| u.smbios_bytes()).unwrap_or([0; 16]));
    t.push(WAKEUP_POWER_SWITCH);
    t.push(0); // SKU
    t.push(0); // family
    structure(&t, &[MANUFACTURER, PRODUCT])
}

/// The structure table and its 64-bit entry point, as bytes, for a table
/// placed at `table_addr`.
pub fn build(uuid: Option<MachineUuid>, table_addr: u64) -> (Vec<u8>, Vec<u8>) {
    let mut table = bios_information();
    table.extend(system_information(uuid));
    table.extend(structure(&header(127, 4, 2), &[]));

    let mut ep = Vec::with_capacity(ENTRY_POINT_LEN);
    ep.extend_from_slice(b"_SM3_");
    ep.push(0); // checksum, fixed below
    ep.push(ENTRY_POINT_LEN as u8);
    ep.extend_from_slice(&[3, 0, 0]); // SMBIOS 3.0.0
    ep.push(1); // entry point revision
    ep.push(0); // reserved
    ep.extend_from_slice(&(table.len() as u32).to_le_bytes());
    ep.extend_from_slice(&table_addr.to_le_bytes());
    let sum = ep.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    ep[5] = 0u8.wrapping_sub(sum);
    (ep, table)
}

/// Writes the entry point at `SMBIOS_START` and the table right after it.
pub fn setup_smbios<M: GuestMemory>(mem: &M, uuid: Option<MachineUuid>) -> Result<(), SmbiosError> {
    let ep_addr = layout::SMBIOS_START;
    let table_addr = ep_addr + 0x20;
    let (ep, table) = build(uuid, table_addr);
    if table_addr + table.len() as u64 > SMBIOS_END {
        return Err(SmbiosError::TooLarge(table.len()));
    }
    mem.write_slice(&ep, GuestAddress(ep_addr))?;
    mem.write_slice(&table, GuestAddress(table_addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0";

    #[test]
    fn uuid_text_round_trips() {
        let u = MachineUuid::parse(TEXT).unwrap();
        assert_eq!(u.to_string(), TEXT);
        assert_eq!(MachineUuid::parse(&TEXT.to_uppercase()).unwrap(), u);
    }

    #[test]
    fn bad_uuids_are_refused() {
        for s in [
            "",
            "0f1e2d3c4b5a49688776a5b4c3d2e1f0",
            "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f",
            "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1fg",
            "0f1e2d3c-4b5a-4968-87-76a5b4c3d2e1f0",
            "+f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0",
        ] {
            assert!(MachineUuid::parse(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn smbios_byte_order_is_mixed_endian() {
        let b = MachineUuid::parse(TEXT).unwrap().smbios_bytes();
        assert_eq!(&b[..8], &[0x3c, 0x2d, 0x1e, 0x0f, 0x5a, 0x4b, 0x68, 0x49]);
        assert_eq!(&b[8..], &[0x87, 0x76, 0xa5, 0xb4, 0xc3, 0xd2, 0xe1, 0xf0]);
    }

    /// Walks the table the way Linux's dmi_scan does, returning (type,
    /// formatted area, strings) for each structure.
    fn walk(table: &[u8]) -> Vec<(u8, Vec<u8>, Vec<String>)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < table.len() {
            let (kind, len) = (table[i], table[i + 1] as usize);
            let formatted = table[i..i + len].to_vec();
            let mut j = i + len;
            let mut strings = Vec::new();
            loop {
                let end = j + table[j..].iter().position(|&b| b == 0).unwrap();
                if end == j {
                    break;
                }
                strings.push(String::from_utf8(table[j..end].to_vec()).unwrap());
                j = end + 1;
            }
            // Double NUL: after strings one more NUL; without strings two.
            i = if strings.is_empty() { j + 2 } else { j + 1 };
            out.push((kind, formatted, strings));
            if kind == 127 {
                break;
            }
        }
        assert_eq!(i, table.len(), "trailing bytes after type 127");
        out
    }

    #[test]
    fn entry_point_checksums_and_points_at_the_table() {
        let (ep, table) = build(None, 0xf0020);
        assert_eq!(ep.len(), ENTRY_POINT_LEN);
        assert_eq!(&ep[..5], b"_SM3_");
        assert_eq!(ep.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(
            u32::from_le_bytes(ep[12..16].try_into().unwrap()) as usize,
            table.len()
        );
        assert_eq!(u64::from_le_bytes(ep[16..24].try_into().unwrap()), 0xf0020);
    }

    #[test]
    fn system_information_carries_the_uuid() {
        let u = MachineUuid::parse(TEXT).unwrap();
        let (_, table) = build(Some(u), 0xf0020);
        let s = walk(&table);
        let kinds: Vec<u8> = s.iter().map(|x| x.0).collect();
        assert_eq!(kinds, [0, 1, 127]);
        let (_, t1, strings) = &s[1];
        assert_eq!(t1.len(), 0x1b);
        assert_eq!(&t1[8..24], &u.smbios_bytes());
        assert_eq!(strings, &[MANUFACTURER, PRODUCT]);
        assert_eq!(
            s[0].1[0x13] & BIOS_EXT2_VIRTUAL_MACHINE,
            BIOS_EXT2_VIRTUAL_MACHINE
        );
    }

    #[test]
    fn tables_land_in_guest_memory() {
        use vm_memory::GuestMemoryMmap;
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let u = MachineUuid::parse(TEXT).unwrap();
        setup_smbios(&mem, Some(u)).unwrap();
        let mut anchor = [0u8; 5];
        mem.read_slice(&mut anchor, GuestAddress(layout::SMBIOS_START))
            .unwrap();
        assert_eq!(&anchor, b"_SM3_");
        let (_, table) = build(Some(u), layout::SMBIOS_START + 0x20);
        let mut got = vec![0u8; table.len()];
        mem.read_slice(&mut got, GuestAddress(layout::SMBIOS_START + 0x20))
            .unwrap();
        assert_eq!(got, table);
    }
}
