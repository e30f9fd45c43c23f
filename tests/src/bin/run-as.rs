//! `run-as UID COMMAND [ARGS...]`: runs COMMAND as UID (and gid UID) with
//! no supplementary groups. The rig's L1 runs cases as root; the shared
//! folder test runs the helper as an ordinary user, as a desktop session
//! does.

use std::os::unix::process::CommandExt;

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let (uid, cmd, args) = match argv.as_slice() {
        [_, uid, cmd, args @ ..] => (uid.parse::<u32>().expect("UID"), cmd, args),
        _ => {
            eprintln!("usage: run-as UID COMMAND [ARGS...]");
            std::process::exit(2)
        }
    };
    // SAFETY: setgroups with an empty list, then setgid and setuid: plain
    // system calls on values; each result is checked.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(uid) != 0
            || libc::setuid(uid) != 0
        {
            eprintln!("run-as: {}", std::io::Error::last_os_error());
            std::process::exit(126);
        }
    }
    let e = std::process::Command::new(cmd).args(args).exec();
    eprintln!("run-as: {cmd}: {e}");
    std::process::exit(127);
}
