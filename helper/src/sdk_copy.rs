//! `installSdk` by copy, for a host without virtiofsd: the runtime (a few
//! hundred MB) goes through the agent connection, which on a slow machine
//! takes longer than the client's 30 s request timeout.
//!
//! So a copy runs as a task of its own that no request owns. One copy at a
//! time (a second transfer would abort the first one in the guest). The
//! `installSdk` that started it answers with its outcome when it ends
//! within [`SdkCopies::answer_within`]; otherwise it answers success with
//! the copy still running, and a `spawn` of the runtime then waits for the
//! copy (as long again) or fails with what is going on. A retried
//! `installSdk` of the version being copied joins the copy instead of
//! starting another.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{watch, Mutex, OwnedMutexGuard};

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
/// agent, and a copy into an earlier one says nothing about it).
struct Ticket {
    version: String,
    agent: Weak<AgentClient>,
    state: watch::Receiver<CopyState>,
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

    /// See [`SdkCopies::new`].
    pub fn answer_within(&self) -> Duration {
        self.answer_within
    }

    /// Waits for any install under way to end, then holds the right to
    /// install until the guard goes (hand it to [`SdkCopies::start`]).
    pub async fn exclusive(&self) -> OwnedMutexGuard<()> {
        self.install.clone().lock_owned().await
    }

    /// The copy of `version` into `agent`'s guest that is running now.
    pub fn running(
        &self,
        agent: &Arc<AgentClient>,
        version: &str,
    ) -> Option<watch::Receiver<CopyState>> {
        let latest = lock(&self.latest);
        let t = latest.as_ref()?;
        let same_guest = t.agent.upgrade().is_some_and(|a| Arc::ptr_eq(&a, agent));
        (same_guest && t.version == version && *t.state.borrow() == CopyState::Running)
            .then(|| t.state.clone())
    }

    /// The runtime is in place by other means (the shared folder): no copy
    /// stands in a spawn's way.
    pub fn forget(&self) {
        *lock(&self.latest) = None;
    }

    /// Runs `copy` (which must hold `held` until it ends) as its own task
    /// and records it as the latest copy of `version` into `agent`'s guest.
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

    /// The copy's state once it ends, or `Running` after `answer_within`.
    pub async fn wait(&self, mut state: watch::Receiver<CopyState>) -> CopyState {
        let ended = state.wait_for(|s| *s != CopyState::Running);
        match tokio::time::timeout(self.answer_within, ended).await {
            Ok(Ok(s)) => s.clone(),
            // The task cannot end without sending; a dropped sender is a
            // task that panicked.
            Ok(Err(_)) => CopyState::Failed("the copy's task ended without an outcome".into()),
            Err(_) => CopyState::Running,
        }
    }

    /// Whether a spawn of the runtime in `agent`'s guest may go ahead: the
    /// latest copy into it has ended well (waiting for it up to
    /// `answer_within`), or there is none. Otherwise why not.
    pub async fn ready_for_spawn(&self, agent: &Arc<AgentClient>) -> Result<(), String> {
        let (version, state) = {
            let latest = lock(&self.latest);
            match latest.as_ref() {
                Some(t) if t.agent.upgrade().is_some_and(|a| Arc::ptr_eq(&a, agent)) => {
                    (t.version.clone(), t.state.clone())
                }
                _ => return Ok(()),
            }
        };
        match self.wait(state).await {
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
