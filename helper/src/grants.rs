//! Which host folders each session holds, and when they go.
//!
//! A grant is made for a session (a spawn's `additionalMounts`, a
//! `mountPath`) and lives while the session has a process: when the last
//! process of a session exits, or its spawn fails, every grant it held is
//! released, and the share keeper unbinds a folder once no session holds
//! it ([`ShareBackend::release`]). `installSdk`'s grant belongs to the VM,
//! not to a session, and lives until the VM ends (the share ends with it).
//!
//! The backend (the share keeper, [`crate::share`]) does the binding;
//! this module only keeps the books, so it is tested with a fake backend.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use crate::lock;
use crate::mounts::{MountPlan, PlannedMount};

/// Binds and unbinds grants in the share.
pub trait ShareBackend: Send + Sync {
    /// Binds `m` into the share (a second grant of the same folder only
    /// counts); returns the share-relative path the guest finds it at,
    /// under `/mnt/.virtiofs-root/shared/`.
    fn grant(&self, m: &PlannedMount) -> Result<String, String>;
    /// Drops one grant made by [`Self::grant`] for `m`.
    fn release(&self, m: &PlannedMount);
}

/// A grant a session holds.
#[derive(Debug, Clone)]
struct Held {
    name: String,
    mount: PlannedMount,
    share_path: String,
}

#[derive(Debug, Default)]
struct Session {
    processes: HashSet<String>,
    held: Vec<Held>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    session_of: HashMap<String, String>,
}

/// The grants of one VM's sessions.
pub struct SessionShares {
    backend: Arc<dyn ShareBackend>,
    state: Mutex<State>,
}

/// What a spawn's mounts came to.
#[derive(Debug, Default)]
pub struct SpawnGrants {
    /// The guest's `additionalMounts`: `{name: {"path": share-relative,
    /// "mode": m}}`, parents before children.
    pub forward: Map<String, Value>,
    /// Mount names that could not be granted.
    pub failed: Vec<String>,
}

impl SessionShares {
    pub fn new(backend: Arc<dyn ShareBackend>) -> Self {
        Self {
            backend,
            state: Mutex::new(State::default()),
        }
    }

    /// Registers process `id` of `session` and grants the spawn's planned
    /// mounts to the session. A name the session already holds for the
    /// same folder and mode is not granted twice; the same name for another
    /// folder fails.
    pub fn grant_for_spawn(&self, session: &str, id: &str, plan: &MountPlan) -> SpawnGrants {
        let mut out = SpawnGrants {
            failed: plan.failed_names(),
            ..Default::default()
        };
        let mut st = lock(&self.state);
        st.session_of.insert(id.to_owned(), session.to_owned());
        let s = st.sessions.entry(session.to_owned()).or_default();
        s.processes.insert(id.to_owned());
        for m in &plan.mounts {
            if let Some(h) = s.held.iter().find(|h| h.name == m.name) {
                if h.mount.host_path == m.host_path && h.mount.mode == m.mode {
                    out.forward.insert(m.name.clone(), forward_entry(h));
                } else {
                    tracing::warn!(
                        "spawn {id}: mount {:?} is already another folder in session {session:?}",
                        m.name
                    );
                    out.failed.push(m.name.clone());
                }
                continue;
            }
            match self.backend.grant(m) {
                Ok(share_path) => {
                    let h = Held {
                        name: m.name.clone(),
                        mount: m.clone(),
                        share_path,
                    };
                    out.forward.insert(m.name.clone(), forward_entry(&h));
                    s.held.push(h);
                }
                Err(e) => {
                    tracing::warn!(
                        "spawn {id}: mount {:?} ({}) failed: {e}",
                        m.name,
                        m.host_path.display()
                    );
                    out.failed.push(m.name.clone());
                }
            }
        }
        out
    }

    /// The session process `id` belongs to, while it runs.
    pub fn session_of(&self, id: &str) -> Option<String> {
        lock(&self.state).session_of.get(id).cloned()
    }

    /// The mounts `session` holds (for `mountPath`'s duplicate check).
    pub fn mounted(&self, session: &str) -> Vec<PlannedMount> {
        lock(&self.state)
            .sessions
            .get(session)
            .map(|s| s.held.iter().map(|h| h.mount.clone()).collect())
            .unwrap_or_default()
    }

    /// Grants one more mount (`mountPath`) to a session that runs.
    pub fn grant_to_session(&self, session: &str, m: &PlannedMount) -> Result<String, String> {
        let mut st = lock(&self.state);
        let Some(s) = st.sessions.get_mut(session) else {
            return Err(format!("session {session:?} has no running process"));
        };
        let share_path = self.backend.grant(m)?;
        s.held.push(Held {
            name: m.name.clone(),
            mount: m.clone(),
            share_path: share_path.clone(),
        });
        Ok(share_path)
    }

    /// Grants a folder to the VM as a whole (`installSdk`): never
    /// released, it ends with the VM's share.
    pub fn grant_to_vm(&self, m: &PlannedMount) -> Result<String, String> {
        self.backend.grant(m)
    }

    /// Process `id` exited, or its spawn failed: the last process of a
    /// session takes the session's grants with it.
    pub fn process_ended(&self, id: &str) {
        let released = {
            let mut st = lock(&self.state);
            let Some(session) = st.session_of.remove(id) else {
                return;
            };
            let Some(s) = st.sessions.get_mut(&session) else {
                return;
            };
            s.processes.remove(id);
            if !s.processes.is_empty() {
                return;
            }
            let s = st.sessions.remove(&session).unwrap_or_default();
            tracing::info!(
                "session {session:?} has no process left: releasing its {} folder(s)",
                s.held.len()
            );
            s.held
        };
        // Children before parents: the reverse of the order they were made.
        for h in released.iter().rev() {
            self.backend.release(&h.mount);
        }
    }
}

fn forward_entry(h: &Held) -> Value {
    json!({"path": h.share_path, "mode": h.mount.mode.as_str()})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use crate::mounts::{FailedMount, MountError, MountMode};

    #[derive(Default)]
    struct Fake {
        log: Mutex<Vec<String>>,
        refuse: Option<PathBuf>,
    }

    impl ShareBackend for Fake {
        fn grant(&self, m: &PlannedMount) -> Result<String, String> {
            if self.refuse.as_deref() == Some(m.host_path.as_path()) {
                return Err("refused".into());
            }
            lock(&self.log).push(format!("grant {}", m.host_path.display()));
            Ok(m.staging_relative().to_string_lossy().into_owned())
        }
        fn release(&self, m: &PlannedMount) {
            lock(&self.log).push(format!("release {}", m.host_path.display()));
        }
    }

    fn planned(name: &str, path: &str, mode: MountMode) -> PlannedMount {
        PlannedMount {
            name: name.into(),
            host_path: path.into(),
            mode,
            hidden: vec![],
            absent_denied: vec![],
            inode: (0, 0),
        }
    }

    fn plan(mounts: Vec<PlannedMount>) -> MountPlan {
        MountPlan {
            mounts,
            failed: vec![FailedMount {
                name: "bad".into(),
                reason: MountError::PathMissing,
            }],
        }
    }

    #[test]
    fn a_session_holds_its_grants_until_its_last_process_ends() {
        let fake = Arc::new(Fake {
            refuse: Some("/h/refused".into()),
            ..Default::default()
        });
        let shares = SessionShares::new(fake.clone());
        let p = plan(vec![
            planned("out", "/h/out", MountMode::ReadWrite),
            planned("lib", "/h/lib", MountMode::ReadOnly),
            planned("x", "/h/refused", MountMode::ReadWrite),
        ]);
        let g = shares.grant_for_spawn("s1", "p1", &p);
        assert_eq!(g.failed, ["bad", "x"]);
        assert_eq!(
            Value::Object(g.forward.clone()),
            json!({"out": {"path": "h/out", "mode": "rw"}, "lib": {"path": "h/lib", "mode": "ro"}})
        );
        // A second process of the session with the same mounts grants
        // nothing new; another folder under a held name fails.
        let p2 = plan(vec![
            planned("out", "/h/out", MountMode::ReadWrite),
            planned("lib", "/h/other", MountMode::ReadOnly),
        ]);
        let g2 = shares.grant_for_spawn("s1", "p2", &p2);
        assert_eq!(g2.failed, ["bad", "lib"]);
        assert_eq!(shares.session_of("p2").as_deref(), Some("s1"));
        assert_eq!(shares.mounted("s1").len(), 2);
        shares
            .grant_to_session("s1", &planned("late", "/h/late", MountMode::ReadOnly))
            .unwrap();
        assert!(shares
            .grant_to_session("nobody", &planned("late", "/h/late", MountMode::ReadOnly))
            .is_err());
        shares.process_ended("p1");
        assert!(!lock(&fake.log).iter().any(|l| l.starts_with("release")));
        shares.process_ended("p2");
        shares.process_ended("p2");
        let log = lock(&fake.log).clone();
        assert_eq!(
            log,
            [
                "grant /h/out",
                "grant /h/lib",
                "grant /h/late",
                "release /h/late",
                "release /h/lib",
                "release /h/out"
            ]
        );
        assert!(shares.session_of("p1").is_none());
        assert!(shares.mounted("s1").is_empty());
    }
}
