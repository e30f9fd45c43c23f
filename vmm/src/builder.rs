//! Assembles a machine from a [`MachineConfig`] and runs it to the end.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use linux_loader::cmdline::Cmdline;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::acpi::{self, VirtioMmioSlot};
use crate::arch::x86_64::smbios::{self, MachineUuid};
use crate::arch::x86_64::{boot, cpu, layout, regs};
use crate::boot_file::BootFile;
use crate::device_manager::{DeviceManager, MachineRequest, VirtioSlot};
use crate::devices::legacy::serial::{
    self as serial, BoundedConsole, ConsoleOut, ConsoleSink, ConsoleTail, SerialPort,
};
use crate::devices::virtio::block::{Block, DiskImage};
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::sandbox::{self, Policy, Sandbox, SandboxError};
use crate::vstate::vcpu::{self, VcpuEvent};
use crate::vstate::vm::Vm;

/// Kernel parameters every coworkvm guest gets; `MachineConfig::cmdline` is appended.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off no_timer_check";
/// How many console lines to show when the guest dies.
const TAIL_LINES: usize = 40;

/// A disk for the guest: an open image (see [`crate::boot_file`]).
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub file: BootFile,
    pub read_only: bool,
}

/// A virtio-vsock device with its hybrid Unix-socket host side.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    pub guest_cid: u64,
    pub uds: PathBuf,
}

/// A virtio-fs device: the connected vhost-user socket of its back-end
/// and the tag the guest mounts.
#[derive(Debug, Clone)]
pub struct FsSpec {
    pub socket: Arc<UnixStream>,
    pub tag: String,
}

#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub kernel: BootFile,
    pub initrd: Option<BootFile>,
    pub disks: Vec<DiskSpec>,
    pub cpus: u8,
    pub mem_mib: u64,
    pub cmdline: String,
    pub console: Option<PathBuf>,
    pub vsock: Option<VsockSpec>,
    /// SMBIOS type 1 UUID: the guest's `/sys/class/dmi/id/product_uuid`.
    pub machine_uuid: Option<MachineUuid>,
    /// A virtio-fs device, if any.
    pub fs: Option<FsSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("guest memory: {0}")]
    GuestMemory(String),
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Smbios(#[from] smbios::SmbiosError),
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    #[error("virtio-fs: {0}")]
    Fs(#[from] crate::devices::virtio::fs::FsError),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("console {0}: {1}")]
    Console(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("KVM_{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("cannot sandbox the VMM: {0}")]
    Sandbox(#[from] SandboxError),
}

/// How the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    PowerOff,
    /// `panic` is the guest kernel's panic line, if it printed one.
    Reset {
        panic: Option<String>,
    },
    Fatal(String),
}

impl GuestExit {
    /// The VMM's exit code: 0 for a clean power-off.
    pub fn code(&self) -> i32 {
        match self {
            GuestExit::PowerOff => 0,
            GuestExit::Reset { .. } => 1,
            GuestExit::Fatal(_) => 3,
        }
    }
}

pub struct RunOutcome {
    pub exit: GuestExit,
    pub console_tail: Vec<String>,
}

/// Boots the machine and blocks until the guest powers off or dies. With
/// `sandboxed`, the process confines itself ([`crate::sandbox`]) once
/// every file is open and before the first vCPU runs: the process must
/// then be single-threaded when this is called.
pub fn run_with(cfg: &MachineConfig, sandboxed: bool) -> Result<RunOutcome, BuildError> {
    crate::config::check_limits(
        u64::from(cfg.cpus),
        cfg.mem_mib,
        cfg.disks.len(),
        cfg.vsock.is_some(),
        cfg.fs.is_some(),
    )?;

    // A vhost-user back-end maps guest RAM itself: it must be a shared
    // file mapping. Otherwise anonymous private RAM, whose page faults
    // are cheaper (Firecracker makes the same choice).
    let ranges = boot::ram_ranges(cfg.mem_mib << 20);
    let mem = if cfg.fs.is_some() {
        shared_guest_memory(&ranges)
    } else {
        GuestMemoryMmap::from_ranges(&ranges).map_err(|e| BuildError::GuestMemory(e.to_string()))
    }?;
    let vm = Vm::new(mem.clone(), true)?;

    let kernel = boot::load_kernel_file(&mem, cfg.kernel.name(), cfg.kernel.file())?;
    let initrd = match &cfg.initrd {
        Some(f) => Some(boot::load_initrd_file(
            &mem,
            f.name(),
            f.file(),
            kernel.setup_header.initrd_addr_max,
            kernel.kernel_end,
        )?),
        None => None,
    };

    // Console.
    let tail = Arc::new(Mutex::new(ConsoleTail::new(TAIL_LINES)));
    let out = match &cfg.console {
        Some(p) => ConsoleOut::File(
            serial::open_console(p).map_err(|e| BuildError::Console(p.clone(), e))?,
        ),
        None => ConsoleOut::Stream(Box::new(std::io::stdout())),
    };
    let out = Box::new(BoundedConsole::new(out, serial::CONSOLE_BOUND));
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| BuildError::Io("eventfd", e))?;
    vm.register_irqfd(&serial_irq, layout::IRQ_SERIAL)?;
    let serial = SerialPort::new(serial_irq, ConsoleSink::new(out, tail.clone()));

    // virtio devices: disks in the order given (vda, vdb, ...), then the rng.
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut disks = Vec::new();
    for d in &cfg.disks {
        let file = d
            .file
            .try_clone_file()
            .map_err(|e| BuildError::Io("duplicating a disk descriptor", e))?;
        let block = Block::new(DiskImage::from_file(d.file.name(), file, d.read_only)?);
        disks.extend(block.disk());
        devices.push(Box::new(block));
    }
    devices.push(Box::new(
        Rng::new().map_err(|e| BuildError::Io("/dev/urandom", e))?,
    ));
    // Sandboxed, the vsock device names its sockets relative to their
    // directory, which becomes the VMM's root.
    let vsock_uds = match &cfg.vsock {
        Some(v) if sandboxed => Some(
            sandbox::enter_vsock_dir(&v.uds)
                .map_err(|e| BuildError::Io("entering the vsock directory", e))?,
        ),
        Some(v) => Some(v.uds.clone()),
        None => None,
    };
    if let (Some(v), Some(uds)) = (&cfg.vsock, &vsock_uds) {
        devices.push(Box::new(Vsock::new(v.guest_cid, uds)?));
    }
    // The vhost-user handshake happens here, before the sandbox.
    if let Some(f) = &cfg.fs {
        let socket = f
            .socket
            .try_clone()
            .map_err(|e| BuildError::Io("duplicating the virtio-fs socket", e))?;
        devices.push(Box::new(Fs::new(socket, &f.tag)?));
    }

    let mut slots = Vec::new();
    let mut acpi_slots = Vec::new();
    for (i, dev) in devices.into_iter().enumerate() {
        let base = layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE;
        let gsi = layout::IRQ_VIRTIO_BASE + i as u32;
        let transport =
            MmioTransport::new(dev, mem.clone()).map_err(|e| BuildError::Io("virtio-mmio", e))?;
        vm.register_irqfd(transport.interrupt().irqfd(), gsi)?;
        vm.register_queue_notify(base, transport.queue_events())?;
        acpi_slots.push(VirtioMmioSlot {
            base,
            size: layout::VIRTIO_MMIO_SIZE,
            gsi,
        });
        slots.push(VirtioSlot {
            transport: Mutex::new(transport),
        });
    }
    let rsdp = acpi::create_acpi_tables(&mem, cfg.cpus, &acpi_slots)?;
    smbios::setup_smbios(&mem, cfg.machine_uuid)?;

    let mut cmdline =
        Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| BuildError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(BASE_CMDLINE)
        .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    if !cfg.cmdline.trim().is_empty() {
        cmdline
            .insert_str(cfg.cmdline.trim())
            .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    }
    boot::write_boot_params(
        &mem,
        &boot::BootConfig {
            kernel: &kernel,
            cmdline: &cmdline,
            initrd,
            rsdp: Some(rsdp),
        },
    )?;
    regs::write_boot_structures(&mem)?;

    let supported = vm
        .kvm()
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| BuildError::Kvm("GET_SUPPORTED_CPUID", e))?;
    let mut vcpus = Vec::new();
    for id in 0..cfg.cpus {
        let fd = vm
            .fd()
            .create_vcpu(id as u64)
            .map_err(|e| BuildError::Kvm("CREATE_VCPU", e))?;
        cpu::setup_cpuid(&fd, &supported, id, cfg.cpus)?;
        cpu::setup_msrs(&fd)?;
        regs::setup_long_mode(&fd, kernel.entry, layout::ZERO_PAGE_START)?;
        cpu::setup_lapic(&fd)?;
        vcpus.push(fd);
    }

    // Everything is open: confine the process before the guest runs. The
    // largest file the VMM writes is a disk image or the console log.
    let sandbox: Option<Sandbox> = if sandboxed {
        let largest_disk = disks
            .iter()
            .map(|d| d.sectors() * crate::devices::virtio::block::SECTOR_SIZE)
            .max()
            .unwrap_or(0);
        let max_file_size = largest_disk.max(serial::CONSOLE_BOUND + serial::CONSOLE_MARKER_MAX);
        let policy = Policy::new(vsock_uds.as_deref(), max_file_size);
        let sandbox = sandbox::enter(&policy)?;
        tracing::debug!("VMM sandbox in force: {:?}", sandbox.applied);
        Some(sandbox)
    } else {
        None
    };
    let devices = Arc::new(DeviceManager::new(serial, slots, disks));
    let (tx, rx) = mpsc::channel();
    // The vCPUs and this thread meet at `start` once all are confined.
    let confinement = sandbox.as_ref().map(|s| vcpu::VcpuConfinement {
        filter: s.filters.vcpu.clone(),
        start: Arc::new(std::sync::Barrier::new(vcpus.len() + 1)),
    });
    for (id, fd) in vcpus.into_iter().enumerate() {
        vcpu::spawn(
            id as u8,
            fd,
            devices.clone(),
            tx.clone(),
            confinement.clone(),
        )
        .map_err(|e| BuildError::Io("starting a vCPU thread", e))?;
    }
    drop(tx);
    // The main thread confines itself last: it started the threads above.
    if let (Some(s), Some(c)) = (&sandbox, &confinement) {
        s.filters.main.install().map_err(SandboxError::from)?;
        c.start.wait();
    }
    tracing::debug!(cpus = cfg.cpus, mem_mib = cfg.mem_mib, "guest started");

    let event = rx
        .recv()
        .unwrap_or_else(|_| VcpuEvent::Fatal("all vCPU threads ended".into()));
    devices.flush();
    let (console_tail, panic_line) = tail
        .lock()
        .map(|t| (t.lines(), t.panic_line().map(str::to_owned)))
        .unwrap_or_default();
    let exit = match event {
        VcpuEvent::Request(MachineRequest::PowerOff) => GuestExit::PowerOff,
        VcpuEvent::Request(MachineRequest::Reset) => GuestExit::Reset { panic: panic_line },
        VcpuEvent::Fatal(why) => GuestExit::Fatal(why),
    };
    Ok(RunOutcome { exit, console_tail })
}

/// Guest RAM as one memfd mapped shared, each range at its own offset,
/// for a vhost-user back-end to map through the descriptor. Sealed
/// against resizing: the back-end gets the descriptor, and a file it could
/// shrink would make the VMM's next access to the lost pages a SIGBUS.
pub(crate) fn shared_guest_memory(
    ranges: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap, BuildError> {
    let memory_error = |what: &str, e: io::Error| BuildError::GuestMemory(format!("{what}: {e}"));
    let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    // SAFETY: memfd_create reads one NUL-terminated name that outlives the
    // call; it returns a new descriptor or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"coworkvm-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(memory_error("memfd_create", io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(total)
        .map_err(|e| memory_error("sizing the guest RAM memfd", e))?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) on the descriptor `file` owns; no memory.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(memory_error(
            "sealing the guest RAM memfd",
            io::Error::last_os_error(),
        ));
    }
    let file = Arc::new(file);
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        regions.push((addr, len, Some(FileOffset::from_arc(file.clone(), offset))));
        offset += len as u64;
    }
    GuestMemoryMmap::from_ranges_with_files(&regions)
        .map_err(|e| BuildError::GuestMemory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn shared_guest_memory_is_one_sealed_memfd_at_consecutive_offsets() {
        let ranges = [
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x1_0000_0000), 0x20_0000),
        ];
        let mem = shared_guest_memory(&ranges).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2);
        let (a, b) = (
            regions[0].file_offset().unwrap(),
            regions[1].file_offset().unwrap(),
        );
        assert_eq!((a.start(), b.start()), (0, 0x10_0000));
        let file = a.file();
        assert_eq!(file.as_raw_fd(), b.file().as_raw_fd(), "one memfd");
        assert_eq!(file.metadata().unwrap().len(), 0x30_0000);
        // SAFETY: fcntl(F_GET_SEALS) on a descriptor the region owns.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want);
        assert!(
            file.set_len(0x1000).is_err(),
            "a sealed memfd cannot shrink"
        );
        // Shared: what the guest writes is in the file, where a back-end
        // that maps it sees it.
        mem.write_obj(0xabcd_u32, GuestAddress(0x1_0000_0010))
            .unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, 0x10_0010).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xabcd);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(GuestExit::PowerOff.code(), 0);
        assert_ne!(GuestExit::Reset { panic: None }.code(), 0);
        assert_ne!(GuestExit::Fatal("x".into()).code(), 0);
    }
}
