//! `coworkvm-agent`: the guest's `/init`. It mounts the pseudo filesystems,
//! loads the initramfs's kernel modules, reaps every zombie, and serves the
//! guest protocol to the helper over vsock: spawning, streaming, feeding
//! and killing processes.

mod conn;
mod init;
mod procs;

fn main() {
    let pid1 = std::process::id() == 1;
    if pid1 {
        init::mount_pseudo_filesystems();
        init::load_modules();
        std::env::set_var("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin");
    }
    let procs = procs::Procs::default();
    let reaper = procs.clone();
    std::thread::spawn(move || reaper.reap_forever());
    conn::serve(procs);
}
