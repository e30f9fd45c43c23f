//! The device-worker spawner: the one thread of a sandboxed VMM that
//! starts threads after the guest runs.
//!
//! A virtio device starts its worker when the driver sets DRIVER_OK, which
//! happens inside a vCPU's MMIO exit. A thread inherits its creator's
//! seccomp filters, so a worker started there would be confined to the
//! vCPU's list as well as its own. Instead the vCPU hands the worker's
//! body to this thread, which is started before the vCPUs, with a filter
//! that allows every worker's syscalls plus thread creation; each worker
//! then installs its own, narrower filter before it runs its body.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use super::seccomp::{Filters, SeccompError};

/// A worker's body.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

struct Request {
    name: String,
    job: Job,
    reply: Sender<io::Result<JoinHandle<()>>>,
}

/// Set once the sandbox is on: where `spawn_worker` sends its requests.
static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();

/// Exit status when a worker cannot confine itself (after its spawner
/// could, with the same kernel: not expected to happen).
pub const WORKER_SETUP_STATUS: i32 = 158;

/// Starts the spawner thread; from now on [`spawn_worker`] goes through it.
pub fn start(filters: Filters) -> io::Result<()> {
    let (tx, rx) = mpsc::channel::<Request>();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("worker-spawner".into())
        .spawn(move || serve(filters, rx, ready_tx))?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(io::Error::other(e)),
        Err(_) => return Err(io::Error::other("the worker spawner ended at start")),
    }
    SPAWNER
        .set(Mutex::new(tx))
        .map_err(|_| io::Error::other("the worker spawner was started twice"))
}

fn serve(filters: Filters, requests: Receiver<Request>, ready: Sender<Result<(), SeccompError>>) {
    if let Err(e) = filters.spawner.install() {
        let _ = ready.send(Err(e));
        return;
    }
    let _ = ready.send(Ok(()));
    for req in requests {
        let filter = filters.for_worker(&req.name).clone();
        let job = req.job;
        let spawned = std::thread::Builder::new().name(req.name).spawn(move || {
            if let Err(e) = filter.install() {
                // The device cannot run unconfined, and its vCPU has
                // already been told it started: stop the VMM.
                eprintln!("coworkvm: {e}");
                // SAFETY: _exit ends the process; no state is left to keep.
                unsafe { libc::_exit(WORKER_SETUP_STATUS) };
            }
            job()
        });
        let _ = req.reply.send(spawned);
    }
}

/// Starts a device worker thread called `name`: through the spawner once
/// the sandbox is on, directly otherwise.
pub fn spawn_worker(name: String, job: Job) -> io::Result<JoinHandle<()>> {
    let Some(spawner) = SPAWNER.get() else {
        return std::thread::Builder::new().name(name).spawn(job);
    };
    let (reply, answer) = mpsc::channel();
    let sent = spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(Request { name, job, reply });
    if sent.is_err() {
        return Err(io::Error::other("the worker spawner has ended"));
    }
    answer
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the worker spawner has ended")))
}
