//! `share_keeper share-keeper --control-fd N ...`: the share keeper without
//! the whole `coworkvm` binary, for helper/tests/share.rs (cargo builds
//! examples with the tests). Same arguments as `coworkvm share-keeper`.

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut args = std::env::args_os().skip(1);
    if args.next().is_none_or(|a| a != "share-keeper") {
        eprintln!("usage: share_keeper share-keeper --control-fd N --listen-fd M --staging DIR --virtiofsd PATH");
        std::process::exit(2);
    }
    let parsed = match coworkvm_helper::share::KeeperArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("share_keeper: {e}");
            std::process::exit(2);
        }
    };
    std::process::exit(coworkvm_helper::share::keeper_main(&parsed));
}
