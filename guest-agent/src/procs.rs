//! The processes the host spawned: their pipes, their exits, and the one
//! reaper that collects every child (PID 1 inherits orphans too).

use std::collections::HashMap;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::json;
use socket_proto::guest::{encode_output_frame, GuestEvent, GuestFrame};
use socket_proto::host::{Signal, SpawnParams, StreamEncoding};

use crate::conn::Sender;

/// The most output one `stdout`/`stderr` event carries: one read of the
/// process's pipe, whose buffer is made this big too, so a fast writer's
/// output travels in few large frames (each frame costs the guest a vsock
/// packet or more, a queue notification and VM exits). Far below the
/// protocol's 10 MiB frame limit even when every byte needs a 6-byte JSON
/// escape. A read returns what the pipe holds: small output still goes at
/// once.
pub const OUTPUT_CHUNK: usize = 256 * 1024;

/// Grows a pipe's buffer to `size` bytes (best effort: the default 64 KiB
/// stays if the kernel refuses).
fn grow_pipe(fd: &impl std::os::fd::AsRawFd, size: usize) {
    // SAFETY: fcntl(2) F_SETPIPE_SZ on a pipe fd we own; no memory involved.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int);
    }
}

struct Proc {
    id: String,
    /// The session (`spawn`'s `name`).
    session: String,
    /// The process group the agent made (the child called setsid or got
    /// process_group(0)): the direct child and, when not sandboxed, its tree.
    pgid: i32,
    /// Sandboxed: the sandbox's own process group (bwrap `--new-session`),
    /// once bwrap has reported it on its info fd.
    sandbox_pgid: Option<i32>,
    sandboxed: bool,
    /// The last signal `kill` sent: a sandbox that ends with 128+n after
    /// signal n is reported as ended by that signal.
    last_signal: Option<i32>,
    stdin: Option<ChildStdin>,
    exit: Option<(Option<i32>, Option<i32>)>,
    /// stdout and stderr pumps still running; the exit event waits for both.
    open_pipes: u8,
    exit_sent: bool,
    encoding: StreamEncoding,
}

#[derive(Clone, Default)]
pub struct Procs {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    by_pid: HashMap<i32, Proc>,
    pid_of: HashMap<String, i32>,
    sender: Option<Sender>,
}

fn signal_number(s: Option<&Signal>) -> Result<i32, String> {
    Ok(match s {
        None => libc::SIGTERM,
        Some(Signal::Number(n)) => *n,
        Some(Signal::Name(n)) => match n.trim_start_matches("SIG") {
            "TERM" => libc::SIGTERM,
            "KILL" => libc::SIGKILL,
            "INT" => libc::SIGINT,
            "HUP" => libc::SIGHUP,
            "QUIT" => libc::SIGQUIT,
            "USR1" => libc::SIGUSR1,
            "USR2" => libc::SIGUSR2,
            "STOP" => libc::SIGSTOP,
            "CONT" => libc::SIGCONT,
            other => return Err(format!("unknown signal {other}")),
        },
    })
}

fn signal_name(n: i32) -> String {
    match n {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGPIPE => "SIGPIPE".into(),
        other => format!("SIG{other}"),
    }
}

/// (code, signal) to report. bwrap ends with 128+n when the command died
/// of signal n; after a `kill` with n, that is reported as signal n.
pub fn exit_of(
    sandboxed: bool,
    last_signal: Option<i32>,
    code: Option<i32>,
    signal: Option<i32>,
) -> (Option<i32>, Option<i32>) {
    match (sandboxed, last_signal, code) {
        (true, Some(s), Some(c)) if c == 128 + s => (None, Some(s)),
        _ => (code, signal),
    }
}

impl Procs {
    pub fn set_sender(&self, s: Option<Sender>) {
        self.inner.lock().unwrap().sender = s;
    }

    /// Sends `exit` once the process is gone and its output is drained.
    fn maybe_finish(inner: &mut Inner, pid: i32) {
        let Some(p) = inner.by_pid.get_mut(&pid) else {
            return;
        };
        if p.exit_sent || p.open_pipes > 0 {
            return;
        }
        let Some((code, sig)) = p.exit else { return };
        p.exit_sent = true;
        let ev = GuestEvent::Exit {
            id: p.id.clone(),
            code,
            signal: sig.map(|s| json!(signal_name(s))),
            oom_kill_count: Some(0),
        };
        if let Some(s) = &inner.sender {
            s.send(&GuestFrame::event(&ev));
        }
    }

    /// The unsandboxed command of a spawn (no session disk or no bwrap):
    /// as root, in `/` unless `cwd` says otherwise, in its own process
    /// group, with the agent's environment plus the spawn's `env`.
    pub fn direct_command(p: &SpawnParams, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(&p.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(cwd) = &p.cwd {
            cmd.current_dir(cwd);
        }
        if let Some(env) = &p.env {
            cmd.envs(env.expose());
        }
        cmd
    }

    pub fn is_in_use(&self, id: &str) -> bool {
        self.inner.lock().unwrap().pid_of.contains_key(id)
    }

    /// Sessions with a process that has not exited.
    pub fn running_sessions(&self) -> HashSet<String> {
        let inner = self.inner.lock().unwrap();
        inner
            .by_pid
            .values()
            .filter(|p| p.exit.is_none())
            .map(|p| p.session.clone())
            .collect()
    }

    /// Starts `cmd` (stdio piped; a new process group or session made by
    /// the command itself) as process `id` of `session`. `info`: the read
    /// end of a sandbox's bwrap `--info-fd` pipe.
    pub fn spawn(
        &self,
        id: &str,
        session: &str,
        mut cmd: Command,
        encoding: StreamEncoding,
        info: Option<OwnedFd>,
        label: &str,
    ) -> Result<(), String> {
        if self.is_in_use(id) {
            return Err(format!("process id {id} is already in use"));
        }
        let sandboxed = info.is_some();
        // Hold the lock across spawn so the reaper cannot see the pid first.
        let mut inner = self.inner.lock().unwrap();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {label}: {e}"))?;
        // The write end of the info pipe (if any) lives in `cmd`'s caller
        // and is closed there; the child holds its own copy.
        let pid = child.id() as i32;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        for fd in stdout.iter() {
            grow_pipe(fd, OUTPUT_CHUNK);
        }
        for fd in stderr.iter() {
            grow_pipe(fd, OUTPUT_CHUNK);
        }
        inner.pid_of.insert(id.to_owned(), pid);
        inner.by_pid.insert(
            pid,
            Proc {
                id: id.to_owned(),
                session: session.to_owned(),
                pgid: pid,
                sandbox_pgid: None,
                sandboxed,
                last_signal: None,
                stdin: child.stdin.take(),
                exit: None,
                open_pipes: 2,
                exit_sent: false,
                encoding,
            },
        );
        drop(inner);
        if let Some(info) = info {
            let procs = self.clone();
            std::thread::spawn(move || {
                if let Some(child_pid) = crate::sandbox::read_child_pid(info) {
                    let mut inner = procs.inner.lock().unwrap();
                    if let Some(p) = inner.by_pid.get_mut(&pid) {
                        p.sandbox_pgid = Some(child_pid);
                    }
                }
            });
        }
        // The reaper waits for it; Child is not waited on here.
        std::mem::forget(child);
        for (pipe, is_err) in [
            (stdout.map(|s| Box::new(s) as Box<dyn Read + Send>), false),
            (stderr.map(|s| Box::new(s) as Box<dyn Read + Send>), true),
        ] {
            let procs = self.clone();
            let id = id.to_owned();
            std::thread::spawn(move || procs.pump(pid, id, pipe, is_err, encoding));
        }
        Ok(())
    }

    fn pump(
        &self,
        pid: i32,
        id: String,
        mut pipe: Option<Box<dyn Read + Send>>,
        is_err: bool,
        encoding: StreamEncoding,
    ) {
        if let (Some(pipe), StreamEncoding::Base64) = (pipe.as_mut(), encoding) {
            let mut buf = vec![0u8; OUTPUT_CHUNK];
            loop {
                let n = match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let data = base64::engine::general_purpose::STANDARD.encode(&buf[..n]);
                self.output(&id, &data, is_err);
            }
        } else if let Some(mut pipe) = pipe {
            // buf[..have]: bytes read and not sent yet; between reads only
            // the start of a UTF-8 character split by the read (<= 3 bytes).
            let mut buf = vec![0u8; OUTPUT_CHUNK];
            let mut have = 0;
            loop {
                let n = match pipe.read(&mut buf[have..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                have += n;
                // Send whole UTF-8 characters; keep a split one for the next
                // read. Valid text (the usual case) is sent without a copy.
                let sent = match std::str::from_utf8(&buf[..have]) {
                    Ok(text) => {
                        self.output(&id, text, is_err);
                        have
                    }
                    Err(e) => {
                        let end = if e.error_len().is_none() {
                            e.valid_up_to()
                        } else {
                            have
                        };
                        self.output(&id, &String::from_utf8_lossy(&buf[..end]), is_err);
                        end
                    }
                };
                buf.copy_within(sent..have, 0);
                have -= sent;
            }
            if have > 0 {
                self.output(&id, &String::from_utf8_lossy(&buf[..have]), is_err);
            }
        }
        let mut inner = self.inner.lock().unwrap();
        if let Some(p) = inner.by_pid.get_mut(&pid) {
            p.open_pipes = p.open_pipes.saturating_sub(1);
        }
        Self::maybe_finish(&mut inner, pid);
    }

    /// Sends one `stdout`/`stderr` event, encoded straight from `data`.
    fn output(&self, id: &str, data: &str, is_err: bool) {
        if data.is_empty() {
            return;
        }
        let sender = self.inner.lock().unwrap().sender.clone();
        if let Some(s) = sender {
            match encode_output_frame(is_err, id, data) {
                Ok(wire) => s.send_encoded(&wire),
                Err(e) => eprintln!("coworkvm-agent: encoding output of {id}: {e}"),
            }
        }
    }

    /// Writes to a process's stdin. Blocks while its pipe is full, which
    /// stops the connection's reader: that is the back-pressure.
    pub fn stdin(&self, id: &str, data: &str, eof: bool) {
        let (pipe, encoding) = {
            let mut inner = self.inner.lock().unwrap();
            let Some(pid) = inner.pid_of.get(id).copied() else {
                return;
            };
            let Some(p) = inner.by_pid.get_mut(&pid) else {
                return;
            };
            (p.stdin.take(), p.encoding)
        };
        let Some(mut pipe) = pipe else { return };
        let bytes = match encoding {
            StreamEncoding::Utf8 => std::borrow::Cow::Borrowed(data.as_bytes()),
            StreamEncoding::Base64 => {
                match base64::engine::general_purpose::STANDARD.decode(data) {
                    Ok(b) => std::borrow::Cow::Owned(b),
                    Err(e) => {
                        // Dropping bytes silently would corrupt the stream:
                        // end it instead, so the process sees EOF.
                        eprintln!("coworkvm-agent: stdin of {id} is not base64 ({e}); closing it");
                        return;
                    }
                }
            }
        };
        let ok = pipe.write_all(&bytes).is_ok();
        if ok && !eof {
            let mut inner = self.inner.lock().unwrap();
            if let Some(pid) = inner.pid_of.get(id).copied() {
                if let Some(p) = inner.by_pid.get_mut(&pid) {
                    p.stdin = Some(pipe);
                }
            }
        }
    }

    pub fn kill(&self, id: &str, signal: Option<&Signal>) -> Result<(), String> {
        let sig = signal_number(signal)?;
        let mut inner = self.inner.lock().unwrap();
        let pid = *inner.pid_of.get(id).ok_or(format!("no process {id}"))?;
        let p = inner
            .by_pid
            .get_mut(&pid)
            .ok_or(format!("no process {id}"))?;
        if p.exit.is_some() {
            return Ok(());
        }
        p.last_signal = Some(sig);
        // A sandbox: its own group (the command and everything below it,
        // not the outer bwrap, so a handled signal is just that).
        if let Some(g) = p.sandbox_pgid {
            // SAFETY: kill(2) on a process group; no memory involved.
            if unsafe { libc::kill(-g, sig) } == 0 {
                return Ok(());
            }
            // ESRCH: the sandbox's group is gone or not made yet; the
            // outer group below still reaches it.
        }
        // SAFETY: kill(2) on the process group we created; no memory involved.
        if unsafe { libc::kill(-p.pgid, sig) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(())
    }

    pub fn running(&self, id: &str) -> Option<(bool, Option<i32>)> {
        let inner = self.inner.lock().unwrap();
        let pid = inner.pid_of.get(id)?;
        let p = inner.by_pid.get(pid)?;
        Some(match p.exit {
            None => (true, None),
            Some((code, _)) => (false, code),
        })
    }

    /// Reaps every child for good; records the exits of ours.
    pub fn reap_forever(&self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid(2) writes only to `status`, a live local.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid < 0 {
                // No children right now: wait for the next one.
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            let es = std::process::ExitStatus::from_raw(status);
            let mut inner = self.inner.lock().unwrap();
            if let Some(p) = inner.by_pid.get_mut(&pid) {
                p.exit = Some(exit_of(p.sandboxed, p.last_signal, es.code(), es.signal()));
                Self::maybe_finish(&mut inner, pid);
                // A background grandchild may hold the pipes open for ever:
                // give the output a moment to drain, then report the exit.
                let procs = self.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    let mut inner = procs.inner.lock().unwrap();
                    if let Some(p) = inner.by_pid.get_mut(&pid) {
                        p.open_pipes = 0;
                    }
                    Self::maybe_finish(&mut inner, pid);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_exit_after_kill_is_the_signal() {
        // bwrap's 128+n after our SIGTERM: the signal.
        assert_eq!(exit_of(true, Some(15), Some(143), None), (None, Some(15)));
        // Without a kill, or another signal, or unsandboxed: as it is.
        assert_eq!(exit_of(true, None, Some(143), None), (Some(143), None));
        assert_eq!(exit_of(true, Some(9), Some(143), None), (Some(143), None));
        assert_eq!(exit_of(false, Some(15), Some(143), None), (Some(143), None));
        assert_eq!(exit_of(true, Some(9), None, Some(9)), (None, Some(9)));
        assert_eq!(exit_of(true, Some(15), Some(0), None), (Some(0), None));
    }
}
