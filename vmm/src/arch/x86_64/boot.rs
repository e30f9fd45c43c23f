//! Loading a bzImage and an initramfs, and the Linux boot parameters
//! (zero page, e820 map, command line) that go with them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {0}: {1}")]
    Open(String, std::io::Error),
    #[error("loading the kernel image {0}: {1}")]
    Kernel(String, linux_loader::loader::Error),
    #[error("{0} is not a 64-bit bzImage this loader can boot")]
    NotBzImage(String),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("initramfs {path} ({size} bytes) does not fit below {limit:#x}")]
    InitrdTooLarge { path: String, size: u64, limit: u64 },
    #[error("reading the initramfs {0}: {1}")]
    Initrd(String, std::io::Error),
    #[error("writing boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("too many e820 entries")]
    E820Full,
}

type Result<T> = std::result::Result<T, BootError>;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `startup_64` sits 0x200 bytes into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
const XLF_KERNEL_64: u16 = 1 << 0;

/// Where the kernel wants to start and what the zero page must say about it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    pub kernel_end: u64,
    pub setup_header: linux_loader::loader::bootparam::setup_header,
}

/// The zero page as a plain-old-data object vm-memory can write.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct BootParamsPod(boot_params);
// SAFETY: boot_params is a packed C struct of integers and arrays of
// integers: every byte pattern is a valid value and it holds no pointers.
unsafe impl ByteValued for BootParamsPod {}

/// Loads the bzImage in `file` at 1 MiB; `path` names it in errors.
pub fn load_kernel_file(mem: &GuestMemoryMmap, path: &Path, file: &File) -> Result<LoadedKernel> {
    let name = path.display().to_string();
    let mut file = file;
    let loaded = BzImage::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(|e| BootError::Kernel(name.clone(), e))?;
    let hdr = loaded
        .setup_header
        .ok_or_else(|| BootError::NotBzImage(name.clone()))?;
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::NotBzImage(name));
    }
    Ok(LoadedKernel {
        entry: loaded.kernel_load.unchecked_add(STARTUP_64_OFFSET),
        kernel_end: loaded.kernel_end,
        setup_header: hdr,
    })
}

/// Highest guest address (exclusive) of RAM below the 32-bit MMIO gap.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    let last = mem.last_addr().raw_value() + 1;
    last.min(layout::MMIO_GAP_START)
}

/// Copies the initramfs in `file` to the top of low RAM (page-aligned),
/// below the kernel's `initrd_addr_max`; `path` names it in errors.
/// Returns (address, size).
pub fn load_initrd_file(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &File,
    initrd_addr_max: u32,
    kernel_end: u64,
) -> Result<(GuestAddress, u64)> {
    let name = path.display().to_string();
    let mut file = file;
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|e| BootError::Initrd(name.clone(), e))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| BootError::Initrd(name.clone(), e))?;
    let limit = low_ram_end(mem).min(initrd_addr_max as u64 + 1);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitrdTooLarge {
            path: name.clone(),
            size,
            limit,
        })?;
    let mut buf = Vec::with_capacity(size as usize);
    file.read_to_end(&mut buf)
        .map_err(|e| BootError::Initrd(name, e))?;
    mem.write_slice(&buf, GuestAddress(addr))?;
    Ok((GuestAddress(addr), size))
}

/// The e820 map for the RAM in `mem`: usable RAM below the EBDA, the
/// firmware area reserved (ACPI and SMBIOS tables live there), then RAM
/// from 1 MiB, split around the MMIO gap.
pub fn e820_entries(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let mut entries = vec![
        boot_e820_entry {
            addr: 0,
            size: layout::EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: layout::EBDA_START,
            size: layout::HIGH_RAM_START - layout::EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for region in mem.iter() {
        use vm_memory::GuestMemoryRegion;
        let start = region.start_addr().raw_value().max(layout::HIGH_RAM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            entries.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    entries
}

pub struct BootConfig<'a> {
    pub kernel: &'a LoadedKernel,
    pub cmdline: &'a Cmdline,
    pub initrd: Option<(GuestAddress, u64)>,
    pub rsdp: Option<GuestAddress>,
}

/// Writes the command line and the zero page.
pub fn write_boot_params(mem: &GuestMemoryMmap, cfg: &BootConfig) -> Result<()> {
    let cmdline = cfg
        .cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline = cmdline.as_bytes_with_nul();
    if cmdline.len() > layout::CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(format!(
            "{} bytes, at most {} allowed",
            cmdline.len(),
            layout::CMDLINE_MAX_SIZE
        )));
    }
    mem.write_slice(cmdline, GuestAddress(layout::CMDLINE_START))?;

    let mut params = boot_params {
        hdr: cfg.kernel.setup_header,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = (cmdline.len() - 1) as u32;
    if let Some((addr, size)) = cfg.initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(rsdp) = cfg.rsdp {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }
    let entries = e820_entries(mem);
    if entries.len() > params.e820_table.len() {
        return Err(BootError::E820Full);
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(entries.iter()) {
        *slot = *entry;
    }
    params.e820_entries = entries.len() as u8;
    mem.write_obj(BootParamsPod(params), GuestAddress(layout::ZERO_PAGE_START))?;
    Ok(())
}

/// Guest RAM layout for `mem_bytes` of memory: below the MMIO gap, the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_bytes.min(layout::MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if mem_bytes > low {
        ranges.push((
            GuestAddress(layout::MMIO_GAP_END),
            (mem_bytes - low) as usize,
        ));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_ranges(size)).unwrap()
    }

    #[test]
    fn ram_ranges_skip_the_mmio_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), layout::MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(layout::MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn e820_covers_ram_and_reserves_firmware_area() {
        let m = mem(256 << 20);
        let e = e820_entries(&m);
        assert_eq!(e.len(), 3);
        let (a, s, t) = (e[0].addr, e[0].size, e[0].r#type);
        assert_eq!((a, s, t), (0, layout::EBDA_START, E820_RAM));
        let (a, t) = (e[1].addr, e[1].r#type);
        assert_eq!((a, t), (layout::EBDA_START, E820_RESERVED));
        let (a, s, t) = (e[2].addr, e[2].size, e[2].r#type);
        assert_eq!(
            (a, s, t),
            (
                layout::HIGH_RAM_START,
                (256 << 20) - layout::HIGH_RAM_START,
                E820_RAM
            )
        );
        // No entry overlaps the next.
        for w in e.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn e820_above_4g() {
        let m = mem(5 << 30);
        let e = e820_entries(&m);
        let last = e.last().unwrap();
        let (a, s) = (last.addr, last.size);
        assert_eq!(a, layout::MMIO_GAP_END);
        assert_eq!(s, (5u64 << 30) - layout::MMIO_GAP_START);
        for entry in &e {
            let (a, s) = (entry.addr, entry.size);
            assert!(a + s <= layout::MMIO_GAP_START || a >= layout::MMIO_GAP_END);
        }
    }

    #[test]
    fn zero_page_fields() {
        let m = mem(64 << 20);
        let kernel = LoadedKernel {
            entry: GuestAddress(0x100200),
            kernel_end: 0x200000,
            setup_header: Default::default(),
        };
        let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).unwrap();
        cmdline.insert_str("console=ttyS0").unwrap();
        let cfg = BootConfig {
            kernel: &kernel,
            cmdline: &cmdline,
            initrd: Some((GuestAddress(0x300_0000), 1234)),
            rsdp: Some(GuestAddress(layout::ACPI_START)),
        };
        write_boot_params(&m, &cfg).unwrap();
        let p: BootParamsPod = m.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        let p = p.0;
        let (magic, flag, ptr, rd, rds, rsdp, n) = (
            p.hdr.header,
            p.hdr.boot_flag,
            p.hdr.cmd_line_ptr,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
            p.acpi_rsdp_addr,
            p.e820_entries,
        );
        assert_eq!(magic, KERNEL_HDR_MAGIC);
        assert_eq!(flag, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!(ptr as u64, layout::CMDLINE_START);
        assert_eq!((rd, rds), (0x300_0000, 1234));
        assert_eq!(rsdp, layout::ACPI_START);
        assert_eq!(n, 3);
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    fn load_initrd(
        m: &GuestMemoryMmap,
        path: &Path,
        initrd_addr_max: u32,
        kernel_end: u64,
    ) -> Result<(GuestAddress, u64)> {
        let file = File::open(path).unwrap();
        load_initrd_file(m, path, &file, initrd_addr_max, kernel_end)
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram_page_aligned() {
        let m = mem(64 << 20);
        let dir = std::env::temp_dir().join(format!("coworkvm-initrd-{}", std::process::id()));
        std::fs::write(&dir, vec![7u8; 5000]).unwrap();
        let (addr, size) = load_initrd(&m, &dir, 0x7fff_ffff, 0x20_0000).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr.raw_value() & 0xfff, 0);
        assert!(addr.raw_value() + size <= 64 << 20);
        assert!(addr.raw_value() + size > (64 << 20) - 0x2000);
        let b: u8 = m.read_obj(addr).unwrap();
        assert_eq!(b, 7);
    }

    #[test]
    fn initrd_that_does_not_fit_is_an_error() {
        let m = mem(4 << 20);
        let path = std::env::temp_dir().join(format!("coworkvm-big-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 3 << 20]).unwrap();
        let r = load_initrd(&m, &path, 0x7fff_ffff, 0x20_0000);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(r, Err(BootError::InitrdTooLarge { .. })));
    }
}
