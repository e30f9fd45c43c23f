//! virtio-mmio transport, version 2 ("modern"), virtio 1.2 section 4.2.
//!
//! Register reads and writes come from vCPU threads; queue notifications
//! bypass this code entirely through ioeventfds registered with KVM.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateContext, DeviceWorker, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// Vendor id "CWVM" as the mmio transport reports it.
const VENDOR_ID: u32 = 0x4d56_5743;

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_SHM_SEL: u64 = 0x0ac;
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG_SPACE: u64 = 0x100;

#[cfg(test)]
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;

/// One virtio-mmio slot: the register file in front of a device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    worker: Option<DeviceWorker>,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> std::io::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| {
                Queue::new(max).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e:?}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new()?),
            queues,
            queue_events,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            worker: None,
        })
    }

    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The eventfds to register as ioeventfds on QueueNotify, one per queue
    /// (datamatch = queue index).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    #[cfg(test)]
    pub fn is_activated(&self) -> bool {
        self.worker.is_some()
    }

    /// The Status register as the driver reads it: what the driver wrote,
    /// and DEVICE_NEEDS_RESET once the device (its worker, or this
    /// transport at activation) has failed.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | STATUS_DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// InterruptStatus. A vhost-user back-end writes the irqfd directly
    /// when it used buffers (no VMM hop per completion) and cannot set the
    /// status bits; Linux's vm_interrupt services the rings only when it
    /// reads INT_VRING, so a running device of that kind always reports
    /// it. Unlike Firecracker's "CONFIG or else VRING", the bit is ORed
    /// in: a ring notification that coalesced with a config change (the
    /// device failing) is not lost. A read with no used buffers costs the
    /// driver one scan of its rings.
    fn interrupt_status(&self) -> u32 {
        let status = self.interrupt.status();
        if self.device.backend_signals_irqfd() && self.worker.is_some() {
            status | super::INT_USED_RING
        } else {
            status
        }
    }

    fn device_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue set-up registers may only change before DRIVER_OK.
    fn queue_config_writable(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: non-32-bit register read"
            );
            data.fill(0);
            return;
        }
        let value = match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| q.max_size() as u32),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| q.ready() as u32),
            REG_INTERRUPT_STATUS => self.interrupt_status(),
            REG_STATUS => self.status(),
            REG_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length all-ones means "none".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            _ => {
                tracing::debug!(offset, "virtio-mmio: read of unknown register");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: non-32-bit register write"
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = v,
            REG_DRIVER_FEATURES => {
                if self.status & STATUS_FEATURES_OK != 0 || self.status & STATUS_DRIVER == 0 {
                    return;
                }
                // The driver may only accept what the device offers.
                let offered = self.device_features();
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | (v as u64 & offered)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (((v as u64) << 32) & offered)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_select = v,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if !self.queue_config_writable() {
                    tracing::debug!(offset, "virtio-mmio: queue register written in wrong state");
                    return;
                }
                let Some(q) = self.selected_queue() else {
                    return;
                };
                match offset {
                    REG_QUEUE_NUM => q.set_size(v as u16),
                    REG_QUEUE_READY => q.set_ready(v == 1),
                    REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                    REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                    REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
                    REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
                    REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
                    REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(v)),
                    _ => {}
                }
            }
            REG_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; this path is the fallback.
                if let Some(evt) = self.queue_events.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            REG_SHM_SEL => {}
            _ => tracing::debug!(offset, "virtio-mmio: write of unknown register"),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set (virtio 1.2 section
        // 2.1.2): a driver writing back what it read neither sets nor
        // clears it; only a reset does.
        let mut v = v & !STATUS_DEVICE_NEEDS_RESET;
        // FEATURES_OK only sticks for a modern driver (VERSION_1 accepted).
        if v & STATUS_FEATURES_OK != 0
            && self.status & STATUS_FEATURES_OK == 0
            && self.driver_features & VIRTIO_F_VERSION_1 == 0
        {
            v &= !STATUS_FEATURES_OK;
        }
        let newly_ok = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = v;
        if newly_ok && self.worker.is_none() {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                tracing::warn!(queue = i, "virtio-mmio: driver set up an invalid queue");
                self.set_needs_reset();
                return;
            }
            match Queue::try_from(q.state()) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    tracing::warn!(queue = i, "virtio-mmio: queue state rejected: {e:?}");
                    self.set_needs_reset();
                    return;
                }
            }
        }
        let queue_events = match self
            .queue_events
            .iter()
            .map(|e| e.try_clone())
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-mmio: cloning queue eventfds: {e}");
                self.set_needs_reset();
                return;
            }
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        };
        match self.device.activate(ctx) {
            Ok(w) => self.worker = Some(w),
            Err(e) => {
                tracing::error!(
                    device = self.device.device_type(),
                    "virtio-mmio: activation failed: {e}"
                );
                self.set_needs_reset();
            }
        }
    }

    /// Activation failed: the driver learns it as from a failed worker.
    fn set_needs_reset(&self) {
        if let Err(e) = self.interrupt.set_needs_reset() {
            tracing::error!("virtio-mmio: raising the config interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            drop(w);
            self.device.reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        // After the worker is joined: a failing worker cannot set the flag
        // again behind the reset.
        self.interrupt.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::worker::tests::wait_finished;
    use crate::devices::virtio::worker::{BrokenQueue, DeviceHandler};
    use crate::devices::virtio::{ActivateError, INT_CONFIG_CHANGE};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;

    /// Serves nothing; a notification of queue 1 finds it broken, as a
    /// real device finds a ring the driver corrupted.
    struct DummyHandler;

    impl DeviceHandler for DummyHandler {
        type Error = BrokenQueue;
        fn queue_event(&mut self, queue: usize) -> Result<(), BrokenQueue> {
            if queue == 1 {
                return Err(BrokenQueue {
                    queue,
                    error: virtio_queue::Error::InvalidAvailRingIndex,
                });
            }
            Ok(())
        }
    }

    struct DummyDevice {
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
        config: [u8; 8],
    }

    impl VirtioDevice for DummyDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 32]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data)
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<DeviceWorker, ActivateError> {
            assert_eq!(ctx.queues.len(), 2);
            self.activations.fetch_add(1, Ordering::SeqCst);
            DeviceWorker::start(
                "dummy",
                "dummy".into(),
                ctx.queue_events,
                ctx.interrupt,
                |_| Ok(DummyHandler),
            )
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn transport() -> (MmioTransport, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let a = Arc::new(AtomicUsize::new(0));
        let r = Arc::new(AtomicUsize::new(0));
        let dev = DummyDevice {
            activations: a.clone(),
            resets: r.clone(),
            config: [1, 2, 3, 4, 5, 6, 7, 8],
        };
        (MmioTransport::new(Box::new(dev), mem).unwrap(), a, r)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, idx: u32, base: u64) {
        wr(t, REG_QUEUE_SEL, idx);
        wr(t, REG_QUEUE_NUM, 16);
        wr(t, REG_QUEUE_DESC_LOW, base as u32);
        wr(t, REG_QUEUE_DESC_HIGH, 0);
        wr(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        wr(t, REG_QUEUE_DRIVER_HIGH, 0);
        wr(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        wr(t, REG_QUEUE_DEVICE_HIGH, 0);
        wr(t, REG_QUEUE_READY, 1);
    }

    fn negotiate(t: &mut MmioTransport) {
        wr(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        wr(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, 1);
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, 1 << 3);
        wr(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(rd(&mut t, REG_MAGIC), MMIO_MAGIC);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), 42);
        assert_eq!(rd(&mut t, REG_VENDOR_ID), VENDOR_ID);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1 << 3);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 offered");
        wr(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 32);
        wr(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0, "nonexistent queue");
    }

    #[test]
    fn config_space_reads_any_width() {
        let (mut t, _, _) = transport();
        let mut b = [0u8; 2];
        t.read(CONFIG_SPACE + 1, &mut b);
        assert_eq!(b, [2, 3]);
        let mut b = [0u8; 1];
        t.read(CONFIG_SPACE + 7, &mut b);
        assert_eq!(b, [8]);
    }

    #[test]
    fn narrow_register_access_is_ignored() {
        let (mut t, _, _) = transport();
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(REG_STATUS, &[1]);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn driver_cannot_accept_unoffered_features() {
        let (mut t, _, _) = transport();
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, REG_DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.driver_features, 1 << 3);
    }

    #[test]
    fn features_ok_needs_version_1() {
        let (mut t, _, _) = transport();
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(rd(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn queue_registers_locked_outside_setup_phase() {
        let (mut t, _, _) = transport();
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0, "before FEATURES_OK");
    }

    #[test]
    fn driver_ok_activates_once_and_reset_stops_it() {
        let (mut t, act, resets) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x2_0000);
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        wr(&mut t, REG_STATUS, ok);
        assert!(t.is_activated());
        assert_eq!(act.load(Ordering::SeqCst), 1);
        wr(&mut t, REG_STATUS, ok);
        assert_eq!(act.load(Ordering::SeqCst), 1);
        // Locked after DRIVER_OK.
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_NUM, 4);
        assert_eq!(t.queues[0].size(), 16);

        wr(&mut t, REG_STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn invalid_queue_sets_needs_reset_instead_of_activating() {
        let (mut t, act, _) = transport();
        negotiate(&mut t);
        // Ring beyond guest memory.
        setup_queue(&mut t, 0, 0xfff0_0000);
        wr(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(!t.is_activated());
        assert_eq!(act.load(Ordering::SeqCst), 0);
        assert_ne!(rd(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn a_failed_worker_shows_needs_reset_until_the_driver_resets() {
        let (mut t, act, resets) = transport();
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x2_0000);
        wr(&mut t, REG_STATUS, ok);
        assert!(t.is_activated());
        assert_eq!(rd(&mut t, REG_STATUS), ok);

        // The device finds queue 1 broken: its worker ends and says so.
        wr(&mut t, REG_QUEUE_NOTIFY, 1);
        assert!(wait_finished(t.worker.as_ref().unwrap()));
        assert_eq!(rd(&mut t, REG_STATUS), ok | STATUS_DEVICE_NEEDS_RESET);
        assert_ne!(rd(&mut t, REG_INTERRUPT_STATUS) & INT_CONFIG_CHANGE, 0);
        assert_eq!(t.interrupt().irqfd().read().unwrap(), 1);
        // The driver acknowledging the interrupt or writing the status
        // back does not clear it.
        wr(&mut t, REG_INTERRUPT_ACK, INT_CONFIG_CHANGE);
        wr(&mut t, REG_STATUS, ok | STATUS_DEVICE_NEEDS_RESET);
        assert_eq!(rd(&mut t, REG_STATUS), ok | STATUS_DEVICE_NEEDS_RESET);

        // Reset, then the device can be set up and activated again.
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x2_0000);
        wr(&mut t, REG_STATUS, ok);
        assert_eq!(act.load(Ordering::SeqCst), 2);
        assert_eq!(rd(&mut t, REG_STATUS), ok);
        assert!(!t.worker.as_ref().unwrap().is_finished());
    }

    #[test]
    fn the_driver_cannot_set_needs_reset() {
        let (mut t, _, _) = transport();
        wr(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DEVICE_NEEDS_RESET,
        );
        assert_eq!(rd(&mut t, REG_STATUS), STATUS_ACKNOWLEDGE);
    }

    #[test]
    fn interrupt_ack_clears_status() {
        let (mut t, _, _) = transport();
        t.interrupt().signal_used_queue().unwrap();
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 1);
        wr(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn notify_fallback_kicks_the_queue_event() {
        let (mut t, _, _) = transport();
        wr(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        wr(&mut t, REG_QUEUE_NOTIFY, 99); // ignored, no panic
    }
}
