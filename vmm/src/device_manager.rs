//! Routes port I/O and MMIO exits of the vCPUs to the devices.

use std::sync::{Arc, Mutex};

use crate::arch::x86_64::layout;
use crate::devices::legacy::acpi_pm::{AcpiPmDevice, PowerEvent};
use crate::devices::legacy::serial::SerialPort;
use crate::devices::virtio::block::DiskImage;
use crate::devices::virtio::mmio::MmioTransport;

/// i8042 command/status port: writing 0xfe pulses the CPU reset line.
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET_CMD: u8 = 0xfe;
const PM_PORTS: u16 = 8;
const SERIAL_PORTS: u16 = 8;

/// What a device access asks of the machine as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineRequest {
    PowerOff,
    Reset,
}

impl From<PowerEvent> for MachineRequest {
    fn from(e: PowerEvent) -> Self {
        match e {
            PowerEvent::PowerOff => MachineRequest::PowerOff,
            PowerEvent::Reset => MachineRequest::Reset,
        }
    }
}

pub struct VirtioSlot {
    pub transport: Mutex<MmioTransport>,
}

pub struct DeviceManager {
    serial: Mutex<SerialPort>,
    pm: Mutex<AcpiPmDevice>,
    virtio: Vec<VirtioSlot>,
    disks: Vec<Arc<DiskImage>>,
}

impl DeviceManager {
    pub fn new(serial: SerialPort, virtio: Vec<VirtioSlot>, disks: Vec<Arc<DiskImage>>) -> Self {
        Self {
            serial: Mutex::new(serial),
            pm: Mutex::new(AcpiPmDevice),
            virtio,
            disks,
        }
    }

    fn slot_for(&self, addr: u64) -> Option<(&VirtioSlot, u64)> {
        let offset = addr.checked_sub(layout::VIRTIO_MMIO_BASE)?;
        let index = (offset / layout::VIRTIO_MMIO_SIZE) as usize;
        let slot = self.virtio.get(index)?;
        Some((slot, offset % layout::VIRTIO_MMIO_SIZE))
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if let Some(off) = in_range(port, layout::SERIAL_PORT_BASE, SERIAL_PORTS) {
            lock(&self.serial).read(off, data);
        } else if let Some(off) = in_range(port, layout::PM_IO_BASE, PM_PORTS) {
            lock(&self.pm).read(off, data);
        } else if port == I8042_COMMAND_PORT {
            // "Input buffer empty": Linux's keyboard-controller reset
            // (reboot=k, which panics use) polls this up to 65536 times, one
            // VM exit each, before every reset pulse; all-ones would make it
            // wait the whole loop.
            data.fill(0);
        } else {
            // Nothing there: the bus floats high, as on real hardware.
            data.fill(0xff);
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<MachineRequest> {
        if let Some(off) = in_range(port, layout::SERIAL_PORT_BASE, SERIAL_PORTS) {
            lock(&self.serial).write(off, data);
        } else if let Some(off) = in_range(port, layout::PM_IO_BASE, PM_PORTS) {
            return lock(&self.pm).write(off, data).map(MachineRequest::from);
        } else if port == I8042_COMMAND_PORT && data.first() == Some(&I8042_RESET_CMD) {
            return Some(MachineRequest::Reset);
        }
        None
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.slot_for(addr) {
            Some((slot, off)) => lock(&slot.transport).read(off, data),
            // Nothing there: all-ones, as a PC's bus answers a read no
            // device claims (and as the port reads above do), so a guest
            // driver's "device gone" check (`readl() == ~0`) sees no device.
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((slot, off)) = self.slot_for(addr) {
            lock(&slot.transport).write(off, data);
        }
    }

    /// Makes every disk's writes durable and the console complete; called
    /// before the VMM exits, whatever the reason.
    pub fn flush(&self) {
        for d in &self.disks {
            if let Err(e) = d.flush() {
                tracing::error!("flushing {}: {e}", d.path().display());
            }
        }
        lock(&self.serial).flush();
    }
}

fn in_range(port: u16, base: u16, len: u16) -> Option<u16> {
    port.checked_sub(base).filter(|off| *off < len)
}

/// A poisoned lock means a vCPU thread panicked mid-access; the device state
/// is still the best there is, so keep going rather than cascading panics.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::serial::{ConsoleSink, ConsoleTail};
    use vmm_sys_util::eventfd::EventFd;

    fn manager() -> DeviceManager {
        let tail = Arc::new(Mutex::new(ConsoleTail::new(4)));
        let sink = ConsoleSink::new(Box::new(std::io::sink()), tail);
        DeviceManager::new(
            SerialPort::new(EventFd::new(0).unwrap(), sink),
            vec![],
            vec![],
        )
    }

    #[test]
    fn reset_and_power_off_requests() {
        let m = manager();
        assert_eq!(m.pio_write(0x64, &[0xfe]), Some(MachineRequest::Reset));
        assert_eq!(m.pio_write(0x64, &[0xd1]), None);
        assert_eq!(
            m.pio_write(layout::PM_IO_BASE, &[(5 << 2) | (1 << 5)]),
            Some(MachineRequest::PowerOff)
        );
        assert_eq!(
            m.pio_write(layout::PM_IO_BASE + 4, &[1]),
            Some(MachineRequest::Reset)
        );
    }

    #[test]
    fn i8042_status_reads_ready_and_empty_ports_float_high() {
        let m = manager();
        let mut b = [0xaa];
        m.pio_read(0x64, &mut b);
        assert_eq!(b, [0], "reset path must not spin on the input-buffer bit");
        let mut b = [0u8; 2];
        m.pio_read(0x2f8, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        let mut b = [0xaau8; 4];
        m.mmio_read(0xd000_0000, &mut b);
        assert_eq!(b, [0xff; 4], "no device in that slot");
    }
}
