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
        // With the in-kernel LAPIC that every VM of this loop has, KVM
        // keeps a halted vCPU asleep in the kernel until an interrupt, even
        // with interrupts disabled; it exits with HLT only when the LAPIC is
        // in user space, which this VMM does not emulate.
        VcpuExit::Hlt => Some(VcpuEvent::Fatal(
            "KVM returned a HLT exit, which only a VM without the in-kernel LAPIC gets; \
             this VMM cannot wake a halted vCPU"
                .into(),
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
                if let Some(fatal) = confine(id, || c.filter.install(), &c.start) {
                    let _ = events.send(fatal);
                    return;
                }
            }
            run_loop(id, &mut vcpu, &devices, &events)
        })
}

/// Confines the calling vCPU thread with `install`, then waits at `start`
/// for the other threads. It waits even when `install` failed: the main
/// thread and the other vCPUs wait at the same barrier, and a thread that
/// left without arriving would hold them there for good. `Some` is the
/// fatal event that stops this vCPU before its first KVM_RUN.
fn confine<E: std::fmt::Display>(
    id: u8,
    install: impl FnOnce() -> Result<(), E>,
    start: &Barrier,
) -> Option<VcpuEvent> {
    let installed = install();
    start.wait();
    installed
        .err()
        .map(|e| VcpuEvent::Fatal(format!("vcpu{id}: {e}")))
}

/// What one KVM_RUN's result means for vCPU `id`'s loop; `None` runs the
/// guest again.
fn run_result_event(
    id: u8,
    result: Result<VcpuExit, kvm_ioctls::Error>,
    devices: &DeviceManager,
) -> Option<VcpuEvent> {
    match result {
        Ok(exit) => handle_exit(exit, devices),
        // A signal reached this thread (EINTR), or KVM reports a transient
        // condition to retry (EAGAIN): neither says anything about the guest.
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
        Err(e) => Some(VcpuEvent::Fatal(format!("KVM_RUN on vcpu{id}: {e}"))),
    }
}

fn run_loop(id: u8, vcpu: &mut VcpuFd, devices: &DeviceManager, events: &Sender<VcpuEvent>) {
    loop {
        if let Some(ev) = run_result_event(id, vcpu.run(), devices) {
            let _ = events.send(ev);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, Write};
    use std::sync::mpsc;
    use std::sync::Mutex;
    use std::time::Duration;

    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::arch::x86_64::layout;
    use crate::device_manager::VirtioSlot;
    use crate::devices::legacy::acpi_pm;
    use crate::devices::legacy::serial::{ConsoleSink, ConsoleTail, SerialPort};
    use crate::devices::virtio::mmio::{self, MmioTransport};
    use crate::devices::virtio::{
        read_config_bytes, ActivateContext, ActivateError, DeviceWorker, VirtioDevice,
    };

    const COM1: u16 = layout::SERIAL_PORT_BASE;
    /// 8250 registers (DLAB clear): transmit holding, line status.
    const UART_THR: u16 = 0;
    const UART_LSR: u16 = 5;
    const UART_LSR_THR_EMPTY: u8 = 0x20;
    const PM_S5: u8 = (acpi_pm::S5_SLEEP_TYPE << 2) | (1 << 5);

    /// What the guest's console wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Console(Arc<Mutex<Vec<u8>>>);

    impl Write for Console {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Console {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    /// The (offset, bytes) of each config write a slot's device received.
    type ConfigWrites = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    /// A virtio device that records the config writes routed to it and
    /// answers config reads with its own bytes, so a test sees which slot
    /// an access reached.
    struct SlotProbe {
        device_type: u32,
        config: [u8; 4],
        config_writes: ConfigWrites,
    }

    impl VirtioDevice for SlotProbe {
        fn device_type(&self) -> u32 {
            self.device_type
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8]
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&self.config, offset, data)
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.config_writes
                .lock()
                .unwrap()
                .push((offset, data.to_vec()));
        }
        fn activate(&mut self, _: ActivateContext) -> Result<DeviceWorker, ActivateError> {
            // No test here drives a slot to DRIVER_OK.
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            })
        }
    }

    struct Machine {
        devices: DeviceManager,
        console: Console,
        /// Config writes each virtio slot received, by slot index.
        config_writes: Vec<ConfigWrites>,
    }

    /// A device manager as the builder makes it, with `slots` virtio-mmio
    /// slots; slot `i` is device type `100 + i` with config bytes `[i; 4]`.
    fn machine(slots: u8) -> Machine {
        let console = Console::default();
        let tail = Arc::new(Mutex::new(ConsoleTail::new(4)));
        let sink = ConsoleSink::new(Box::new(console.clone()), tail);
        let serial = SerialPort::new(EventFd::new(0).unwrap(), sink);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let mut virtio = Vec::new();
        let mut config_writes = Vec::new();
        for i in 0..slots {
            let writes = Arc::new(Mutex::new(Vec::new()));
            let device = SlotProbe {
                device_type: 100 + u32::from(i),
                config: [i; 4],
                config_writes: writes.clone(),
            };
            virtio.push(VirtioSlot {
                transport: Mutex::new(MmioTransport::new(Box::new(device), mem.clone()).unwrap()),
            });
            config_writes.push(writes);
        }
        Machine {
            devices: DeviceManager::new(serial, virtio, vec![]),
            console,
            config_writes,
        }
    }

    fn slot_base(i: u8) -> u64 {
        layout::VIRTIO_MMIO_BASE + u64::from(i) * layout::VIRTIO_MMIO_SIZE
    }

    fn io_in(m: &Machine, port: u16, len: usize) -> (Vec<u8>, Option<VcpuEvent>) {
        // Start from a pattern no handler writes, so "left untouched" shows.
        let mut data = vec![0x5a; len];
        let ev = handle_exit(VcpuExit::IoIn(port, &mut data), &m.devices);
        (data, ev)
    }

    fn mmio_read(m: &Machine, addr: u64, len: usize) -> (Vec<u8>, Option<VcpuEvent>) {
        let mut data = vec![0x5a; len];
        let ev = handle_exit(VcpuExit::MmioRead(addr, &mut data), &m.devices);
        (data, ev)
    }

    fn fatal(ev: Option<VcpuEvent>) -> String {
        match ev {
            Some(VcpuEvent::Fatal(why)) => why,
            other => panic!("expected a fatal event, got {other:?}"),
        }
    }

    #[test]
    fn serial_port_writes_reach_the_console_and_the_vcpu_goes_on() {
        let m = machine(0);
        for b in b"login:\n" {
            let out = handle_exit(VcpuExit::IoOut(COM1 + UART_THR, &[*b]), &m.devices);
            assert_eq!(out, None);
        }
        assert_eq!(m.console.bytes(), b"login:\n");
        let (lsr, ev) = io_in(&m, COM1 + UART_LSR, 1);
        assert_eq!(ev, None);
        assert_ne!(lsr[0] & UART_LSR_THR_EMPTY, 0, "transmitter empty: {lsr:?}");
    }

    #[test]
    fn ports_just_outside_com1_are_not_the_uart() {
        let m = machine(0);
        for port in [COM1 - 1, COM1 + 8] {
            assert_eq!(handle_exit(VcpuExit::IoOut(port, b"x"), &m.devices), None);
            assert_eq!(io_in(&m, port, 1), (vec![0xff], None), "port {port:#x}");
        }
        assert!(m.console.bytes().is_empty(), "{:?}", m.console.bytes());
    }

    #[test]
    fn unmapped_port_reads_float_high_at_every_width() {
        let m = machine(0);
        // COM2, the POST port, a PCI config port: no device behind any.
        for port in [0x2f8, 0x80, 0xcf8, 0xffff] {
            for len in [1, 2, 4] {
                assert_eq!(
                    io_in(&m, port, len),
                    (vec![0xff; len], None),
                    "port {port:#x} width {len}"
                );
            }
            assert_eq!(
                handle_exit(VcpuExit::IoOut(port, &[0xfe, 0, 0, 0]), &m.devices),
                None,
                "a write to port {port:#x} asks nothing of the machine"
            );
        }
    }

    #[test]
    fn i8042_status_reads_empty_and_its_reset_command_resets() {
        let m = machine(0);
        assert_eq!(io_in(&m, 0x64, 1), (vec![0], None));
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x64, &[0xfe]), &m.devices),
            Some(VcpuEvent::Request(MachineRequest::Reset))
        );
        // Other controller commands (here: write output port) are not resets.
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x64, &[0xd1]), &m.devices),
            None
        );
        // The reset command at the data port is not a reset either.
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x60, &[0xfe]), &m.devices),
            None
        );
    }

    #[test]
    fn acpi_sleep_control_s5_powers_off_and_reset_register_resets() {
        let m = machine(0);
        let pm = layout::PM_IO_BASE;
        assert_eq!(
            handle_exit(
                VcpuExit::IoOut(pm + acpi_pm::SLEEP_CONTROL, &[PM_S5]),
                &m.devices
            ),
            Some(VcpuEvent::Request(MachineRequest::PowerOff))
        );
        assert_eq!(
            handle_exit(
                VcpuExit::IoOut(pm + acpi_pm::RESET, &[acpi_pm::RESET_VALUE]),
                &m.devices
            ),
            Some(VcpuEvent::Request(MachineRequest::Reset))
        );
        // S5 without SLP_EN, S3 with it, and a wrong reset value: nothing.
        for (off, v) in [
            (acpi_pm::SLEEP_CONTROL, acpi_pm::S5_SLEEP_TYPE << 2),
            (acpi_pm::SLEEP_CONTROL, (3 << 2) | (1 << 5)),
            (acpi_pm::RESET, 2),
        ] {
            assert_eq!(
                handle_exit(VcpuExit::IoOut(pm + off, &[v]), &m.devices),
                None,
                "offset {off} value {v:#x}"
            );
        }
        // The block's registers read as zero (WAK_STS clear), not all-ones.
        assert_eq!(io_in(&m, pm + acpi_pm::SLEEP_STATUS, 1), (vec![0], None));
    }

    #[test]
    fn the_power_off_value_outside_the_pm_block_does_nothing() {
        let m = machine(0);
        let pm = layout::PM_IO_BASE;
        for port in [pm - 1, pm + 8] {
            assert_eq!(
                handle_exit(VcpuExit::IoOut(port, &[PM_S5]), &m.devices),
                None,
                "port {port:#x}"
            );
            assert_eq!(
                handle_exit(VcpuExit::IoOut(port, &[acpi_pm::RESET_VALUE]), &m.devices),
                None,
                "port {port:#x}"
            );
        }
    }

    #[test]
    fn mmio_reads_reach_the_slot_the_address_names() {
        let m = machine(3);
        for i in 0..3u8 {
            let (magic, ev) = mmio_read(&m, slot_base(i) + mmio::REG_MAGIC, 4);
            assert_eq!(ev, None);
            assert_eq!(magic, b"virt", "slot {i}");
            let (id, _) = mmio_read(&m, slot_base(i) + mmio::REG_DEVICE_ID, 4);
            assert_eq!(id, (100 + u32::from(i)).to_le_bytes(), "slot {i}");
            // The offset inside the slot reaches the device too.
            let (cfg, _) = mmio_read(&m, slot_base(i) + mmio::CONFIG_SPACE + 2, 2);
            assert_eq!(cfg, [i, i], "slot {i}");
        }
    }

    #[test]
    fn mmio_writes_reach_only_the_slot_the_address_names() {
        let m = machine(3);
        let ev = handle_exit(
            VcpuExit::MmioWrite(slot_base(1) + mmio::CONFIG_SPACE + 3, &[7, 8]),
            &m.devices,
        );
        assert_eq!(ev, None);
        assert_eq!(*m.config_writes[1].lock().unwrap(), vec![(3, vec![7, 8])]);
        assert!(m.config_writes[0].lock().unwrap().is_empty());
        assert!(m.config_writes[2].lock().unwrap().is_empty());
        // A register write lands in that slot's transport and no other.
        handle_exit(
            VcpuExit::MmioWrite(slot_base(2) + mmio::REG_STATUS, &1u32.to_le_bytes()),
            &m.devices,
        );
        let status = |i| mmio_read(&m, slot_base(i) + mmio::REG_STATUS, 4).0;
        assert_eq!(status(2), 1u32.to_le_bytes());
        assert_eq!(status(0), 0u32.to_le_bytes());
        assert_eq!(status(1), 0u32.to_le_bytes());
    }

    #[test]
    fn unmapped_mmio_reads_all_ones_and_writes_go_nowhere() {
        let m = machine(2);
        let unmapped = [
            // The first slot past the last device, and the end of its window.
            slot_base(2),
            slot_base(3) - 1,
            // Below the virtio window, and the top of the 32-bit gap.
            layout::VIRTIO_MMIO_BASE - 4,
            layout::MMIO_GAP_END - 4,
            // Far above everything (wrapping arithmetic must not find a slot).
            u64::MAX - 3,
        ];
        for addr in unmapped {
            for len in [1, 4, 8] {
                assert_eq!(
                    mmio_read(&m, addr, len),
                    (vec![0xff; len], None),
                    "{addr:#x} width {len}"
                );
            }
            assert_eq!(
                handle_exit(VcpuExit::MmioWrite(addr, &[1, 2, 3, 4]), &m.devices),
                None
            );
        }
        for writes in &m.config_writes {
            assert!(writes.lock().unwrap().is_empty());
        }
        // The devices that exist are untouched by all of it.
        assert_eq!(mmio_read(&m, slot_base(1) + mmio::REG_MAGIC, 4).0, b"virt");
    }

    #[test]
    fn hlt_is_fatal_and_says_why() {
        let m = machine(0);
        let why = fatal(handle_exit(VcpuExit::Hlt, &m.devices));
        assert!(why.contains("HLT") && why.contains("LAPIC"), "{why}");
    }

    #[test]
    fn a_triple_fault_resets_the_machine() {
        let m = machine(0);
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &m.devices),
            Some(VcpuEvent::Request(MachineRequest::Reset))
        );
    }

    #[test]
    fn system_events_map_to_power_off_reset_and_fatal() {
        let m = machine(0);
        let data = [0u64; 2];
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(1, &data), &m.devices),
            Some(VcpuEvent::Request(MachineRequest::PowerOff))
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(2, &[]), &m.devices),
            Some(VcpuEvent::Request(MachineRequest::Reset))
        );
        let crash = fatal(handle_exit(VcpuExit::SystemEvent(3, &data), &m.devices));
        assert!(crash.contains("crash"), "{crash}");
        // WAKEUP, SUSPEND, SEV_TERM and beyond: not something this VMM asks for.
        for kind in [4, 5, 6, 0, u32::MAX] {
            let why = fatal(handle_exit(VcpuExit::SystemEvent(kind, &data), &m.devices));
            assert!(why.contains(&kind.to_string()), "{why}");
        }
    }

    #[test]
    fn internal_error_points_at_coworkvm_doctor() {
        let m = machine(0);
        let why = fatal(handle_exit(VcpuExit::InternalError, &m.devices));
        assert!(why.contains("`coworkvm doctor`"), "{why}");
        assert!(why.contains("KVM internal error"), "{why}");
    }

    #[test]
    fn failed_entry_names_the_hardware_reason_and_cpu() {
        let m = machine(0);
        // VMX "VM-entry failure due to invalid guest state".
        let why = fatal(handle_exit(VcpuExit::FailEntry(0x8000_0021, 3), &m.devices));
        assert!(why.contains("0x80000021"), "{why}");
        assert!(why.contains("cpu 3"), "{why}");
    }

    #[test]
    fn exits_this_vmm_never_asks_for_are_fatal_and_named() {
        let m = machine(0);
        for (exit, name) in [
            (VcpuExit::Unknown, "Unknown"),
            (VcpuExit::Exception, "Exception"),
            (VcpuExit::IrqWindowOpen, "IrqWindowOpen"),
            (VcpuExit::IoapicEoi(33), "IoapicEoi(33)"),
        ] {
            let why = fatal(handle_exit(exit, &m.devices));
            assert!(why.contains(name), "{why}");
        }
    }

    #[test]
    fn kvm_run_interrupted_or_asked_again_runs_the_guest_again() {
        let m = machine(0);
        for errno in [libc::EINTR, libc::EAGAIN] {
            let result = Err(kvm_ioctls::Error::new(errno));
            assert_eq!(run_result_event(0, result, &m.devices), None, "{errno}");
        }
    }

    #[test]
    fn kvm_run_failing_otherwise_is_fatal_and_names_the_vcpu() {
        let m = machine(0);
        for errno in [libc::EFAULT, libc::EINVAL, libc::ENOEXEC] {
            let result = Err(kvm_ioctls::Error::new(errno));
            let why = fatal(run_result_event(5, result, &m.devices));
            assert!(why.contains("KVM_RUN on vcpu5"), "{why}");
            let text = io::Error::from_raw_os_error(errno).to_string();
            let text = text.split(" (os error").next().unwrap();
            assert!(why.contains(text), "{why} lacks {text}");
        }
    }

    #[test]
    fn kvm_run_exits_go_through_the_exit_handler() {
        let m = machine(0);
        assert_eq!(
            run_result_event(0, Ok(VcpuExit::Shutdown), &m.devices),
            Some(VcpuEvent::Request(MachineRequest::Reset))
        );
        assert_eq!(
            run_result_event(0, Ok(VcpuExit::IoOut(COM1 + UART_THR, b"k")), &m.devices),
            None
        );
        assert_eq!(m.console.bytes(), b"k");
    }

    /// Runs `confine` on a thread of its own while this thread plays the
    /// VMM's main thread at the barrier; fails rather than hangs if the
    /// vCPU thread never arrives.
    fn confine_beside_main<E: std::fmt::Display + Send + 'static>(
        install: impl FnOnce() -> Result<(), E> + Send + 'static,
    ) -> Option<VcpuEvent> {
        let start = Arc::new(Barrier::new(2));
        let vcpu_start = start.clone();
        let vcpu = std::thread::spawn(move || confine(2, install, &vcpu_start));
        let (passed_tx, passed_rx) = mpsc::channel();
        std::thread::spawn(move || {
            start.wait();
            let _ = passed_tx.send(());
        });
        passed_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the main thread was left waiting at the start barrier");
        vcpu.join().unwrap()
    }

    #[test]
    fn a_vcpu_that_cannot_confine_itself_still_releases_the_others_and_is_fatal() {
        let why = fatal(confine_beside_main(|| Err("seccomp: EINVAL")));
        assert_eq!(why, "vcpu2: seccomp: EINVAL");
    }

    #[test]
    fn a_confined_vcpu_runs_and_was_confined_before_the_start() {
        let installed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = installed.clone();
        let start = Arc::new(Barrier::new(2));
        let vcpu_start = start.clone();
        let vcpu = std::thread::spawn(move || {
            confine(
                0,
                || {
                    // Slow enough that a thread that waited first would let
                    // the main thread through before this is done.
                    std::thread::sleep(Duration::from_millis(100));
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok::<(), String>(())
                },
                &vcpu_start,
            )
        });
        start.wait();
        assert!(
            installed.load(std::sync::atomic::Ordering::SeqCst),
            "the guest could start before this vCPU was confined"
        );
        assert_eq!(vcpu.join().unwrap(), None);
        assert_eq!(confine_beside_main(|| Ok::<(), String>(())), None);
    }
}
