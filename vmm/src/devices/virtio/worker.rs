//! The one worker loop of every virtio device.
//!
//! Once the driver sets DRIVER_OK, a device serves its queues on a thread
//! of its own. That thread is always this loop: one epoll over the device's
//! stop eventfd, its queues' eventfds (the ioeventfds KVM signals on
//! QueueNotify) and whatever file descriptors the device adds itself
//! (vsock's host sockets, through [`FdRegistry`]); each event goes to the
//! device's [`DeviceHandler`].
//!
//! A worker that cannot go on does not just end, leaving the driver to wait
//! forever for buffers that never come back. When the driver breaks a ring
//! (an available index more than a queue's size ahead, see [`next_chain`];
//! a head index beyond the queue, which `add_used` refuses; a ring outside
//! guest memory), when epoll fails, or when the handler panics, the worker
//! logs one error line naming the device, sets DEVICE_NEEDS_RESET (virtio
//! 1.2 section 2.1) where the transport shows it in the Status register,
//! raises a configuration change interrupt, and ends. The VMM and the other devices go on; the driver's reset (status 0)
//! joins the ended thread and a new DRIVER_OK starts a fresh one.
//!
//! Panic containment depends on the build: it holds where panics unwind
//! (debug and test builds). The release profile builds with
//! `panic = "abort"` (the workspace Cargo.toml), so there a panicking
//! worker ends the VMM, as a panic anywhere in it does, and the helper
//! reports the VMM's exit. That is kept on purpose: a panic is a VMM bug,
//! likely reached from guest input, and unwinding out of it leaves no
//! guarantee about state shared beyond the worker (guest memory the worker
//! was writing, the disk image); the seccomp filters are also written for
//! a process that aborts on panic.

use std::any::Any;
use std::fmt::Display;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, VirtioInterrupt};

/// Epoll tokens from here on belong to the loop (queue `i` is this plus
/// `i`, the stop event is `u64::MAX`); a handler's own tokens lie below.
pub const FIRST_LOOP_TOKEN: u64 = 1 << 63;
const STOP_TOKEN: u64 = u64::MAX;
/// Events taken from epoll per wait.
const EVENT_BATCH: usize = 64;

/// Why a worker stopped serving its device.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError<E> {
    #[error("setting up its event loop: {0}")]
    Setup(io::Error),
    #[error("waiting for events: {0}")]
    Epoll(io::Error),
    #[error("{0}")]
    Device(E),
    #[error("its worker panicked: {0}")]
    Panic(String),
}

/// A queue the driver broke: nothing more can be served from it until the
/// driver resets the device.
#[derive(Debug, thiserror::Error)]
#[error("queue {queue} is broken: {error}")]
pub struct BrokenQueue {
    pub queue: usize,
    pub error: virtio_queue::Error,
}

/// What a device does with the events of its worker's loop. Every method
/// runs on the worker thread; an error stops the device (see the module
/// documentation).
pub trait DeviceHandler {
    type Error: Display;

    /// The driver notified queue `queue` (the eventfd is already drained).
    fn queue_event(&mut self, queue: usize) -> Result<(), Self::Error>;

    /// A file descriptor the handler added with token `token` is ready.
    fn fd_event(&mut self, _token: u64, _events: EventSet) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Runs after every wait, whether or not anything was ready.
    fn after_events(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The longest the loop may wait before calling [`Self::after_events`]
    /// again; None: until something is ready.
    fn wait_limit(&self) -> Option<Duration> {
        None
    }
}

/// The handler's way to add, change and remove its own file descriptors in
/// the worker's epoll. Tokens must lie below [`FIRST_LOOP_TOKEN`].
#[derive(Clone)]
pub struct FdRegistry {
    epoll: Arc<Epoll>,
}

impl FdRegistry {
    fn checked(token: u64) -> io::Result<u64> {
        if token >= FIRST_LOOP_TOKEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("epoll token {token:#x} is reserved for the worker loop"),
            ));
        }
        Ok(token)
    }

    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        let token = Self::checked(token)?;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        let token = Self::checked(token)?;
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// What [`EventLoop::poll_once`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The stop event fired: the device is being reset or the VMM exits.
    Stop,
}

/// The epoll of one device worker.
pub struct EventLoop {
    epoll: Arc<Epoll>,
    stop: EventFd,
    queue_events: Vec<EventFd>,
    events: Vec<EpollEvent>,
}

impl EventLoop {
    pub fn new(stop: EventFd, queue_events: Vec<EventFd>) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (i, evt) in queue_events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, FIRST_LOOP_TOKEN + i as u64),
            )?;
        }
        Ok(Self {
            epoll: Arc::new(epoll),
            stop,
            queue_events,
            events: vec![EpollEvent::default(); EVENT_BATCH],
        })
    }

    pub fn registry(&self) -> FdRegistry {
        FdRegistry {
            epoll: self.epoll.clone(),
        }
    }

    /// Waits at most `timeout` (None: as long as it takes; the handler's
    /// [`DeviceHandler::wait_limit`] shortens it) and hands what is ready
    /// to `handler`.
    pub fn poll_once<H: DeviceHandler>(
        &mut self,
        handler: &mut H,
        timeout: Option<Duration>,
    ) -> Result<Flow, WorkerError<H::Error>> {
        let wait = match (timeout, handler.wait_limit()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Round up: a 0 ms wait for a limit under a millisecond would spin.
        let ms = wait.map_or(-1, |w| {
            w.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32
        });
        let n = match self.epoll.wait(ms, &mut self.events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(WorkerError::Epoll(e)),
        };
        let ready = &self.events[..n];
        if ready.iter().any(|ev| ev.data() == STOP_TOKEN) {
            let _ = self.stop.read();
            return Ok(Flow::Stop);
        }
        for ev in ready {
            let token = ev.data();
            if token >= FIRST_LOOP_TOKEN {
                let queue = (token - FIRST_LOOP_TOKEN) as usize;
                if let Some(evt) = self.queue_events.get(queue) {
                    // Non-blocking: EAGAIN when a spurious wake-up finds
                    // the counter already drained.
                    let _ = evt.read();
                    handler.queue_event(queue).map_err(WorkerError::Device)?;
                }
            } else {
                handler
                    .fd_event(token, ev.event_set())
                    .map_err(WorkerError::Device)?;
            }
        }
        handler.after_events().map_err(WorkerError::Device)?;
        Ok(Flow::Continue)
    }

    /// Serves `handler` until the stop event or an error.
    pub fn run<H: DeviceHandler>(&mut self, handler: &mut H) -> Result<(), WorkerError<H::Error>> {
        while self.poll_once(handler, None)? == Flow::Continue {}
        Ok(())
    }
}

/// Pops the next available chain of `queue`. Unlike
/// `QueueT::pop_descriptor_chain`, which logs an available index more than
/// the queue's size ahead and answers None (so the device would ignore the
/// queue, and every later notification, for good), this returns it as the
/// error it is.
pub fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

/// Interrupts the driver for the buffers just used, unless it said it does
/// not need one (`needs_notification`: VIRTIO_F_EVENT_IDX's used_event).
pub fn notify_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
) -> Result<(), virtio_queue::Error> {
    if queue.needs_notification(mem)? {
        if let Err(e) = interrupt.signal_used_queue() {
            // The irqfd is a non-blocking eventfd: this needs a counter
            // near 2^64, which KVM's reads never let happen.
            tracing::warn!("raising a used-buffer interrupt: {e}");
        }
    }
    Ok(())
}

/// A device's running worker thread; dropping it stops the thread.
pub struct DeviceWorker {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl DeviceWorker {
    /// Starts the worker of the device called `device` (for the log) on a
    /// thread called `thread_name` (the sandbox picks the thread's seccomp
    /// filter by it). The handler is made on that thread, by
    /// `make_handler`, once the loop's epoll exists, so it can add its own
    /// file descriptors. If the worker fails, `interrupt` carries the
    /// report to the driver.
    pub fn start<H, F>(
        thread_name: &str,
        device: String,
        queue_events: Vec<EventFd>,
        interrupt: Arc<VirtioInterrupt>,
        make_handler: F,
    ) -> Result<Self, ActivateError>
    where
        H: DeviceHandler,
        F: FnOnce(FdRegistry) -> io::Result<H> + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let worker_stop = stop.try_clone().map_err(ActivateError::Worker)?;
        let body = move || {
            if let Err(e) = run_contained(worker_stop, queue_events, make_handler) {
                report_failure(&device, &interrupt, &e);
            }
        };
        // Through the sandbox's spawner when the VMM is sandboxed, so the
        // worker gets its own seccomp filter rather than its vCPU's.
        let handle = crate::sandbox::spawner::spawn_worker(thread_name.to_owned(), Box::new(body))
            .map_err(ActivateError::Worker)?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Whether the thread has ended (stopped or failed).
    #[cfg(test)]
    pub(crate) fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }
}

impl Drop for DeviceWorker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The worker's body: the loop, with a panic anywhere in it (the handler's
/// construction, its events, its drop) turned into an error.
fn run_contained<H, F>(
    stop: EventFd,
    queue_events: Vec<EventFd>,
    make_handler: F,
) -> Result<(), WorkerError<H::Error>>
where
    H: DeviceHandler,
    F: FnOnce(FdRegistry) -> io::Result<H>,
{
    // AssertUnwindSafe: after a panic nothing the closure owns is used
    // again (the loop and the handler are dropped during the unwind), and
    // what outlives it is the VirtioInterrupt, whose atomics hold no
    // invariant a panic could break.
    let body = AssertUnwindSafe(move || {
        let mut event_loop = EventLoop::new(stop, queue_events).map_err(WorkerError::Setup)?;
        let mut handler = make_handler(event_loop.registry()).map_err(WorkerError::Setup)?;
        event_loop.run(&mut handler)
    });
    match catch_unwind(body) {
        Ok(result) => result,
        Err(payload) => Err(WorkerError::Panic(panic_message(payload.as_ref()))),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// Tells the driver, and the log once, that `device` stopped.
fn report_failure(device: &str, interrupt: &VirtioInterrupt, error: &dyn Display) {
    match interrupt.set_needs_reset() {
        Ok(()) => tracing::error!("{device}: stopped, needs a reset by the driver: {error}"),
        Err(e) => tracing::error!(
            "{device}: stopped, needs a reset by the driver: {error} \
             (raising the config interrupt failed: {e})"
        ),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::INT_CONFIG_CHANGE;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Instant;

    /// Waits (a few seconds at most) for `worker`'s thread to end.
    pub(crate) fn wait_finished(worker: &DeviceWorker) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !worker.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Asserts that `worker`'s thread ends. If it does not, the worker is
    /// leaked rather than dropped: dropping it would join a thread that may
    /// never look at its stop event, and the test would hang instead of
    /// failing.
    pub(crate) fn assert_ends(worker: DeviceWorker) {
        if !wait_finished(&worker) {
            std::mem::forget(worker);
            panic!("the device's worker is still running");
        }
    }

    /// Asserts what a failed device shows the driver.
    pub(crate) fn assert_reported(interrupt: &VirtioInterrupt) {
        assert!(interrupt.needs_reset(), "DEVICE_NEEDS_RESET is set");
        assert_ne!(
            interrupt.status() & INT_CONFIG_CHANGE,
            0,
            "a configuration change interrupt is pending"
        );
        assert!(interrupt.irqfd().read().is_ok(), "the irqfd fired");
    }

    fn queue_events(n: usize) -> (Vec<EventFd>, Vec<EventFd>) {
        let evts: Vec<EventFd> = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        (evts, kicks)
    }

    /// Counts queue events; panics on queue 1.
    struct Counting {
        served: Arc<AtomicUsize>,
    }

    impl DeviceHandler for Counting {
        type Error = BrokenQueue;
        fn queue_event(&mut self, queue: usize) -> Result<(), BrokenQueue> {
            if queue == 1 {
                panic!("test handler told to panic");
            }
            self.served.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn counting_worker(
        name: &str,
    ) -> (
        DeviceWorker,
        Vec<EventFd>,
        Arc<VirtioInterrupt>,
        Arc<AtomicUsize>,
    ) {
        let (evts, kicks) = queue_events(2);
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let served = Arc::new(AtomicUsize::new(0));
        let s = served.clone();
        let w = DeviceWorker::start(name, name.into(), evts, interrupt.clone(), move |_| {
            Ok(Counting { served: s })
        })
        .unwrap();
        (w, kicks, interrupt, served)
    }

    fn wait_for(served: &AtomicUsize, n: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while served.load(Ordering::SeqCst) < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    #[test]
    fn a_panicking_handler_is_contained_reported_and_others_go_on() {
        let (victim, victim_kicks, victim_irq, _) = counting_worker("test-panics");
        let (other, other_kicks, other_irq, other_served) = counting_worker("test-survives");
        victim_kicks[0].write(1).unwrap();
        other_kicks[0].write(1).unwrap();
        assert!(wait_for(&other_served, 1));

        victim_kicks[1].write(1).unwrap();
        assert_ends(victim);
        assert_reported(&victim_irq);

        // The other device is untouched and still serves.
        other_kicks[0].write(1).unwrap();
        assert!(wait_for(&other_served, 2));
        assert!(!other.is_finished());
        assert!(!other_irq.needs_reset());
        assert_eq!(other_irq.status(), 0);
        drop(other);
    }

    #[test]
    fn a_handler_that_cannot_be_made_is_reported() {
        let (evts, _kicks) = queue_events(1);
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let w = DeviceWorker::start(
            "test-setup",
            "test-setup".into(),
            evts,
            interrupt.clone(),
            |_| -> io::Result<Counting> { Err(io::Error::other("no socket")) },
        )
        .unwrap();
        assert_ends(w);
        assert_reported(&interrupt);
    }

    #[test]
    fn stopping_is_not_a_failure() {
        let (tx, rx) = mpsc::channel();
        struct Dropped(mpsc::Sender<()>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        struct Idle(#[allow(dead_code)] Dropped);
        impl DeviceHandler for Idle {
            type Error = BrokenQueue;
            fn queue_event(&mut self, _: usize) -> Result<(), BrokenQueue> {
                Ok(())
            }
        }
        let (evts, _kicks) = queue_events(1);
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let w = DeviceWorker::start("test-stop", "test-stop".into(), evts, interrupt.clone(), {
            move |_| Ok(Idle(Dropped(tx)))
        })
        .unwrap();
        drop(w);
        rx.try_recv()
            .expect("the handler was dropped before join returned");
        assert!(!interrupt.needs_reset());
        assert_eq!(interrupt.status(), 0);
    }

    #[test]
    fn handler_tokens_cannot_take_the_loops() {
        let (evts, _kicks) = queue_events(1);
        let el = EventLoop::new(EventFd::new(EFD_NONBLOCK).unwrap(), evts).unwrap();
        let fds = el.registry();
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        let err = fds
            .add(e.as_raw_fd(), FIRST_LOOP_TOKEN, EventSet::IN)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        fds.add(e.as_raw_fd(), 7, EventSet::IN).unwrap();
        assert!(fds.modify(e.as_raw_fd(), u64::MAX, EventSet::IN).is_err());
        fds.remove(e.as_raw_fd()).unwrap();
    }

    /// Records fd events and the wait limit's wake-ups.
    struct Recorder {
        fd_events: Vec<u64>,
        after: usize,
        limit: Option<Duration>,
    }

    impl DeviceHandler for Recorder {
        type Error = BrokenQueue;
        fn queue_event(&mut self, _: usize) -> Result<(), BrokenQueue> {
            Ok(())
        }
        fn fd_event(&mut self, token: u64, _: EventSet) -> Result<(), BrokenQueue> {
            self.fd_events.push(token);
            Ok(())
        }
        fn after_events(&mut self) -> Result<(), BrokenQueue> {
            self.after += 1;
            Ok(())
        }
        fn wait_limit(&self) -> Option<Duration> {
            self.limit
        }
    }

    #[test]
    fn handler_fds_and_wait_limit_reach_the_handler() {
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut el = EventLoop::new(stop.try_clone().unwrap(), Vec::new()).unwrap();
        let extra = EventFd::new(EFD_NONBLOCK).unwrap();
        el.registry()
            .add(extra.as_raw_fd(), 42, EventSet::IN)
            .unwrap();
        let mut h = Recorder {
            fd_events: Vec::new(),
            after: 0,
            limit: Some(Duration::from_millis(1)),
        };
        // Nothing ready: the wait limit ends the wait and after_events runs.
        assert_eq!(el.poll_once(&mut h, None).unwrap(), Flow::Continue);
        assert_eq!((h.fd_events.len(), h.after), (0, 1));
        extra.write(1).unwrap();
        assert_eq!(el.poll_once(&mut h, None).unwrap(), Flow::Continue);
        assert_eq!(h.fd_events, [42]);
        stop.write(1).unwrap();
        assert_eq!(el.poll_once(&mut h, None).unwrap(), Flow::Stop);
    }
}
