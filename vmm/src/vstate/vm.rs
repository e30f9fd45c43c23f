//! The KVM VM: guest memory slots, in-kernel irqchip and PIT, irqfds and ioeventfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{
    Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::mmio::REG_QUEUE_NOTIFY;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and are you in the kvm group?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("KVM lacks a capability coworkvm needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM_{0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error("allocating {0} MiB of guest memory: {1}")]
    Memory(u64, String),
}

type Result<T> = std::result::Result<T, VmError>;

const TSS_ADDRESS: usize = 0xfffb_d000;

pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    /// Held so that guest memory stays mapped as long as KVM's memory
    /// slots point into it.
    _mem: GuestMemoryMmap,
}

impl Vm {
    /// Opens KVM and creates a VM backed by `mem`. With `irqchip`, the
    /// in-kernel PIC/IOAPIC/LAPIC and PIT are created too.
    pub fn new(mem: GuestMemoryMmap, irqchip: bool) -> Result<Self> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        use kvm_ioctls::Cap;
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Ioctl("CREATE_VM", e))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(|e| VmError::Ioctl("SET_TSS_ADDR", e))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| VmError::Memory(region.len() >> 20, e.to_string()))?
                as u64;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which this
            // Vm keeps (and so keeps mapped) for as long as the VM exists; the
            // ranges of distinct regions do not overlap.
            unsafe { fd.set_user_memory_region(r) }
                .map_err(|e| VmError::Ioctl("SET_USER_MEMORY_REGION", e))?;
        }
        if irqchip {
            fd.create_irq_chip()
                .map_err(|e| VmError::Ioctl("CREATE_IRQCHIP", e))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit)
                .map_err(|e| VmError::Ioctl("CREATE_PIT2", e))?;
        }
        Ok(Self { kvm, fd, _mem: mem })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Ioctl("IRQFD", e))
    }

    /// Queue `i`'s notifications at `base` go straight to `events[i]`.
    pub fn register_queue_notify(&self, base: u64, events: &[EventFd]) -> Result<()> {
        for (i, evt) in events.iter().enumerate() {
            self.fd
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    i as u32,
                )
                .map_err(|e| VmError::Ioctl("IOEVENTFD", e))?;
        }
        Ok(())
    }
}
