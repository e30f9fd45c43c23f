//! Child processes of the rig: output captured while they run, every
//! process in their group killed when they time out or finish (so a stray
//! background job can neither outlive its case nor hold the pipes open).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A running child in its own process group, its stdout and stderr
/// collected by two threads.
pub struct Captured {
    child: Child,
    pub stdout: Arc<Mutex<Vec<u8>>>,
    pub stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    pub started: Instant,
}

fn reader(mut pipe: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    })
}

impl Captured {
    /// Starts `cmd` with stdin from /dev/null, in a new process group.
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(p) = child.stdout.take() {
            readers.push(reader(p, stdout.clone()));
        }
        if let Some(p) = child.stderr.take() {
            readers.push(reader(p, stderr.clone()));
        }
        Ok(Self {
            child,
            stdout,
            stderr,
            readers,
            started: Instant::now(),
        })
    }

    /// The exit code once the child has ended (`Some(None)`: killed by a signal).
    pub fn try_wait(&mut self) -> Result<Option<Option<i32>>> {
        Ok(self.child.try_wait()?.map(|s| s.code()))
    }

    /// Whether stdout holds `needle` yet.
    pub fn stdout_contains(&self, needle: &str) -> bool {
        let out = self.stdout.lock().unwrap();
        out.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    pub fn stdout_len(&self) -> usize {
        self.stdout.lock().unwrap().len()
    }

    /// Kills the child's whole process group, reaps the child, and returns
    /// everything it printed: (stdout, stderr).
    pub fn finish(mut self) -> (String, String) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) with a negative pid signals the process group
        // created for this child; it touches no memory of ours.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let text =
            |b: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
        (text(&self.stdout), text(&self.stderr))
    }
}

/// Runs `cmd` to its end or for at most `timeout`; returns its exit code
/// (None: timed out or killed by a signal) and stdout followed by stderr.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Result<(Option<i32>, String)> {
    let mut c = Captured::spawn(cmd)?;
    let rc = loop {
        if let Some(rc) = c.try_wait()? {
            break rc;
        }
        if c.started.elapsed() > timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut out, err) = c.finish();
    out.push_str(&err);
    Ok((rc, out))
}

/// VM exits of a process's VMs so far, from KVM's debugfs (which the rig's
/// L1 mounts), so coworkvm and QEMU are counted alike. `None` when debugfs
/// has no VM of that process or a count cannot be read.
pub fn kvm_debugfs_exits(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir("/sys/kernel/debug/kvm").ok()?;
    let prefix = format!("{pid}-");
    let mut total = None;
    for entry in dir.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let v: u64 = std::fs::read_to_string(entry.path().join("exits"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            total = Some(total.unwrap_or(0) + v);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_kills_the_process() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo before; sleep 30"]);
        let t = Instant::now();
        let (rc, out) = run_with_timeout(cmd, Duration::from_millis(300)).unwrap();
        assert_eq!(rc, None);
        assert_eq!(out, "before\n");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_background_job_cannot_hold_the_pipes_open() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 60 & echo done; exit 4"]);
        let t = Instant::now();
        let (rc, out) = run_with_timeout(cmd, Duration::from_secs(30)).unwrap();
        assert_eq!(rc, Some(4));
        assert_eq!(out, "done\n");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
}
