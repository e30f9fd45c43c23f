//! `installSdk` by copy, for a host without virtiofsd: the runtime (a few
//! hundred MB) goes through the agent connection, which on a slow machine
//! takes longer than the client's 30 s request timeout.
//!
//! So a copy runs as a task of its own that no request owns, one install
//! at a time (a second transfer would abort the first one in the guest).
//! Every `installSdk` answers within [`SdkCopies::answer_within`]: with the
//! copy's outcome when it ends in time, with success when the copy it
//! started (or joined: a retry of the version being copied) runs on, and
//! with an error when another install holds the guest that long. A copy
//! that is still running, or that failed after its request answered
//! success, stands in the way of a `spawn` of the runtime, which waits for
//! it (as long again) or is refused with what is going on.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{watch, Mutex, OwnedMutexGuard};
use tokio::time::Instant;

use crate::agent::AgentClient;
use crate::lock;

/// How long an `installSdk` or a runtime `spawn` waits for a copy in
/// production: well inside the client's 30 s request timeout.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// Where a copy stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyState {
    Running,
    Done,
    /// The error, as the `installSdk` answer would have carried it.
    Failed(String),
}

/// The latest copy: which version, into which guest (a new VM has a new
/// agent), and where it stands.
struct Ticket {
    version: String,
    agent: Weak<AgentClient>,
    state: watch::Receiver<CopyState>,
}

impl Ticket {
    fn targets(&self, agent: &Arc<AgentClient>) -> bool {
        self.agent.upgrade().is_some_and(|a| Arc::ptr_eq(&a, agent))
    }

    /// Running, and its task still there to say how it ends (a task that
    /// panicked drops its sender).
    fn running(&self) -> bool {
        *self.state.borrow() == CopyState::Running && self.state.has_changed().is_ok()
    }
}

/// What an `installSdk` gets to do, from [`SdkCopies::begin`].
pub enum Begin {
    /// Install: the right to, until the guard goes.
    Install(OwnedMutexGuard<()>),
    /// The same version is being copied into this guest: its state.
    Join(watch::Receiver<CopyState>),
    /// Another install held the guest for the whole wait.
    Busy,
}

/// The helper's copies: at most one running.
pub struct SdkCopies {
    /// Held while an install is under way (the copy's task owns it then).
    install: Arc<Mutex<()>>,
    latest: std::sync::Mutex<Option<Ticket>>,
    answer_within: Duration,
}

impl SdkCopies {
    /// Requests and spawns wait up to `answer_within` for a copy.
    pub fn new(answer_within: Duration) -> Self {
        Self {
            install: Arc::new(Mutex::new(())),
            latest: std::sync::Mutex::new(None),
            answer_within,
        }
    }

    /// The end of a wait that starts now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.answer_within
    }

    /// The copy of `version` into `agent`'s guest running now.
    fn running(
        &self,
        agent: &Arc<AgentClient>,
        version: &str,
    ) -> Option<watch::Receiver<CopyState>> {
        let latest = lock(&self.latest);
        let t = latest.as_ref()?;
        (t.targets(agent) && t.version == version && t.running()).then(|| t.state.clone())
    }

    /// An `installSdk` of `version` into `agent`'s guest, by `deadline`:
    /// joins the copy of that version under way, or gets the right to
    /// install once no other install holds it.
    pub async fn begin(&self, agent: &Arc<AgentClient>, version: &str, deadline: Instant) -> Begin {
        if let Some(state) = self.running(agent, version) {
            return Begin::Join(state);
        }
        match tokio::time::timeout_at(deadline, self.install.clone().lock_owned()).await {
            Ok(held) => Begin::Install(held),
            // The install that held it may be this version's copy, started
            // while this one waited.
            Err(_) => self
                .running(agent, version)
                .map_or(Begin::Busy, Begin::Join),
        }
    }

    /// Whether the latest copy put `version` into `agent`'s guest (and its
    /// request answered before it ended).
    pub fn copied(&self, agent: &Arc<AgentClient>, version: &str) -> bool {
        lock(&self.latest).as_ref().is_some_and(|t| {
            t.targets(agent) && t.version == version && *t.state.borrow() == CopyState::Done
        })
    }

    /// The runtime is in place by other means (the shared folder), or its
    /// copy's outcome reached the client: no copy stands in a spawn's way.
    pub fn forget(&self) {
        *lock(&self.latest) = None;
    }

    /// Runs `copy` as its own task (it holds `held` until it ends) and
    /// records it as the latest copy of `version` into `agent`'s guest.
    pub fn start<F>(
        &self,
        agent: &Arc<AgentClient>,
        version: &str,
        held: OwnedMutexGuard<()>,
        copy: F,
    ) -> watch::Receiver<CopyState>
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let (tx, rx) = watch::channel(CopyState::Running);
        *lock(&self.latest) = Some(Ticket {
            version: version.to_owned(),
            agent: Arc::downgrade(agent),
            state: rx.clone(),
        });
        tokio::spawn(async move {
            let state = match copy.await {
                Ok(()) => CopyState::Done,
                Err(e) => CopyState::Failed(e),
            };
            // The guard goes only once the outcome is visible, so that the
            // next install sees this one ended.
            let _ = tx.send(state);
            drop(held);
        });
        rx
    }

    /// The copy's state once it ends, or `Running` at `deadline`.
    pub async fn wait(
        &self,
        mut state: watch::Receiver<CopyState>,
        deadline: Instant,
    ) -> CopyState {
        let ended = state.wait_for(|s| *s != CopyState::Running);
        match tokio::time::timeout_at(deadline, ended).await {
            Ok(Ok(s)) => s.clone(),
            Ok(Err(_)) => CopyState::Failed("the copy's task ended without an outcome".into()),
            Err(_) => CopyState::Running,
        }
    }

    /// An `installSdk` answered `state` (from the copy `of`): an outcome
    /// the client was told needs no spawn to repeat it.
    pub fn answered(&self, of: &watch::Receiver<CopyState>, state: &CopyState) {
        if *state == CopyState::Running {
            return;
        }
        let mut latest = lock(&self.latest);
        if latest.as_ref().is_some_and(|t| t.state.same_channel(of)) {
            *latest = None;
        }
    }

    /// Whether a spawn of the runtime in `agent`'s guest may go ahead: no
    /// copy stands in its way, or the one that does ends well within the
    /// wait. Otherwise why not.
    pub async fn ready_for_spawn(&self, agent: &Arc<AgentClient>) -> Result<(), String> {
        let (version, state, same_guest) = {
            let latest = lock(&self.latest);
            let Some(t) = latest.as_ref() else {
                return Ok(());
            };
            (t.version.clone(), t.state.clone(), t.targets(agent))
        };
        if !same_guest {
            // A copy into an earlier VM, answered as under way: what the
            // guest has now is not what the client was told.
            return match &*state.borrow() {
                CopyState::Done => Ok(()),
                _ => Err(format!(
                    "the agent runtime {version} was still being copied when the VM stopped; \
                     installSdk again"
                )),
            };
        }
        match self.wait(state, self.deadline()).await {
            CopyState::Done => Ok(()),
            CopyState::Failed(e) => Err(format!(
                "the agent runtime {version} could not be copied into the guest ({e}); \
                 installSdk again"
            )),
            CopyState::Running => Err(format!(
                "the agent runtime {version} is still being copied into the guest (installSdk \
                 without shared folders); spawn it again when the copy is done"
            )),
        }
    }
}
