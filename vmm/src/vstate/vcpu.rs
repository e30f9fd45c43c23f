//! vCPU threads: each runs KVM_RUN in a loop and hands I/O exits to the devices.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::device_manager::{DeviceManager, MachineRequest};
use crate::sandbox::seccomp::ThreadFilter;

/// Why a vCPU stopped running; sent to the VMM's main thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    Request(MachineRequest),
    /// The guest or KVM did something the VM cannot continue from.
    Fatal(String),
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Handles one exit; `Some` ends this vCPU's loop.
pub fn handle_exit(exit: VcpuExit, devices: &DeviceManager) -> Option<VcpuEvent> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            devices.pio_read(port, data);
            None
        }
        VcpuExit::IoOut(port, data) => devices.pio_write(port, data).map(VcpuEvent::Request),
        VcpuExit::MmioRead(addr, data) => {
            devices.mmio_read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            devices.mmio_write(addr, data);
            None
        }
        // With the in-kernel LAPIC, HLT is handled by KVM; seeing it here
        // means interrupts are off for good.
        VcpuExit::Hlt => Some(VcpuEvent::Fatal(
            "vCPU halted with interrupts disabled".into(),
        )),
        // A triple fault: how a PC resets when nothing else worked.
        VcpuExit::Shutdown => Some(VcpuEvent::Request(MachineRequest::Reset)),
        VcpuExit::SystemEvent(kind, _) => Some(match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => VcpuEvent::Request(MachineRequest::PowerOff),
            KVM_SYSTEM_EVENT_RESET => VcpuEvent::Request(MachineRequest::Reset),
            KVM_SYSTEM_EVENT_CRASH => VcpuEvent::Fatal("guest crash reported by KVM".into()),
            other => VcpuEvent::Fatal(format!("unknown KVM system event {other}")),
        }),
        VcpuExit::InternalError => Some(VcpuEvent::Fatal(
            // Seen where KVM emulates guest kernel code instead of running
            // it (nested virtualization without hardware help): say where
            // to look rather than leave a bare KVM term.
            "KVM internal error (instruction emulation failed); `coworkvm doctor` checks \
             whether this host's KVM can run a Linux guest at all"
                .into(),
        )),
        VcpuExit::FailEntry(reason, cpu) => Some(VcpuEvent::Fatal(format!(
            "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
        ))),
        other => Some(VcpuEvent::Fatal(format!("unexpected vCPU exit {other:?}"))),
    }
}

/// How a vCPU thread of a sandboxed VMM starts: it installs `filter`, then
/// waits at `start` until every other thread is confined too (the main
/// thread confines itself last), so no guest instruction runs while any
/// VMM thread is still unconfined.
#[derive(Clone)]
pub struct VcpuConfinement {
    pub filter: ThreadFilter,
    pub start: Arc<Barrier>,
}

/// Starts vCPU `id`'s thread. The thread ends after reporting one event.
/// With a `confinement`, the thread confines itself before its first
/// KVM_RUN; if it cannot, it reports that as fatal and never runs the guest.
pub fn spawn(
    id: u8,
    mut vcpu: VcpuFd,
    devices: Arc<DeviceManager>,
    events: Sender<VcpuEvent>,
    confinement: Option<VcpuConfinement>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            if let Some(c) = confinement {
                let installed = c.filter.install();
                c.start.wait();
                if let Err(e) = installed {
                    let _ = events.send(VcpuEvent::Fatal(format!("vcpu{id}: {e}")));
                    return;
                }
            }
            run_loop(id, &mut vcpu, &devices, &events)
        })
}

fn run_loop(id: u8, vcpu: &mut VcpuFd, devices: &DeviceManager, events: &Sender<VcpuEvent>) {
    loop {
        let event = match vcpu.run() {
            Ok(exit) => handle_exit(exit, devices),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VcpuEvent::Fatal(format!("KVM_RUN on vcpu{id}: {e}"))),
        };
        if let Some(ev) = event {
            let _ = events.send(ev);
            return;
        }
    }
}
