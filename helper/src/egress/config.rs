//! The user's egress settings: `coworkvm serve --egress-resolve HOST=IP`
//! and `--egress-allow CIDR`, and the same in the config file
//! (`$XDG_CONFIG_HOME/coworkvm/config.toml`, else
//! `~/.config/coworkvm/config.toml`, or `--config PATH`):
//!
//! ```toml
//! [egress]
//! resolve = ["api.example.com=192.0.2.10", "git.example.com:22=192.0.2.11"]
//! allow = ["192.0.2.0/24"]
//! ```
//!
//! Command-line values come first: for the same host they win. Any value
//! that does not parse is an error at start, naming it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::addr::{AddressPolicy, Cidr, CidrError};
use super::policy::{normalise, Host, HostError};

/// The config file's name under the config directory.
pub const CONFIG_FILE: &str = "coworkvm/config.toml";
/// The largest config file read.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Why the settings are not usable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("egress resolve {0:?}: expected HOST=IP or HOST:PORT=IP")]
    ResolveForm(String),
    #[error("egress resolve {0:?}: {1}")]
    ResolveHost(String, HostError),
    #[error("egress resolve {0:?}: {1:?} is not an IP address")]
    ResolveAddress(String, String),
    #[error("egress resolve {0:?}: {1:?} is not a port")]
    ResolvePort(String, String),
    #[error("egress allow: {0}")]
    Allow(#[from] CidrError),
    #[error("the config file {}: {err}", .path.display())]
    Read { path: PathBuf, err: std::io::Error },
    #[error("the config file {} is larger than {MAX_CONFIG_FILE} bytes", .0.display())]
    TooLarge(PathBuf),
    #[error("the config file {}: {err}", .path.display())]
    Parse { path: PathBuf, err: String },
    #[error("the config file {}: {err}", .path.display())]
    Value {
        path: PathBuf,
        err: Box<ConfigError>,
    },
}

/// One `--egress-resolve`: `host` (normalised; any port, or `port`) is
/// connected at `ip` instead of its DNS answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveOverride {
    pub host: String,
    pub port: Option<u16>,
    pub ip: IpAddr,
}

impl std::fmt::Display for ResolveOverride {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}={}", self.host, self.ip),
            None => write!(f, "{}={}", self.host, self.ip),
        }
    }
}

/// Parses `HOST=IP` or `HOST:PORT=IP` (IPv6 with or without brackets).
pub fn parse_resolve(s: &str) -> Result<ResolveOverride, ConfigError> {
    let form = || ConfigError::ResolveForm(s.to_owned());
    let (left, ip) = s.split_once('=').ok_or_else(form)?;
    let ip_text = ip.trim();
    let ip_bare = ip_text
        .strip_prefix('[')
        .and_then(|i| i.strip_suffix(']'))
        .unwrap_or(ip_text);
    let ip: IpAddr = ip_bare
        .parse()
        .map_err(|_| ConfigError::ResolveAddress(s.to_owned(), ip_text.to_owned()))?;
    let left = left.trim();
    let (host, port) = match left.rsplit_once(':') {
        Some((h, p)) => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|n| *n != 0 && !p.starts_with('+'))
                .ok_or_else(|| ConfigError::ResolvePort(s.to_owned(), p.to_owned()))?;
            (h, Some(port))
        }
        None => (left, None),
    };
    if host.is_empty() {
        return Err(form());
    }
    let host = match normalise(host) {
        Ok(Host::Name(n)) => n,
        // An address needs no resolving.
        Ok(Host::Ip(_)) => return Err(form()),
        Err(e) => return Err(ConfigError::ResolveHost(s.to_owned(), e)),
    };
    Ok(ResolveOverride { host, port, ip })
}

/// The egress settings in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressConfig {
    pub resolve: Vec<ResolveOverride>,
    pub addresses: AddressPolicy,
    /// The config file read, if any.
    pub file: Option<PathBuf>,
}

impl EgressConfig {
    /// The override for `host` (normalised) at `port`: one naming the port
    /// first, then one for any port; the first given wins.
    pub fn resolve_override(&self, host: &str, port: u16) -> Option<IpAddr> {
        let pick = |want: Option<u16>| {
            self.resolve
                .iter()
                .find(|r| r.host == host && r.port == want)
                .map(|r| r.ip)
        };
        pick(Some(port)).or_else(|| pick(None))
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        let resolve: Vec<String> = self.resolve.iter().map(|r| r.to_string()).collect();
        let allow: Vec<String> = self.addresses.allow.iter().map(|c| c.to_string()).collect();
        format!(
            "config file {}; resolve overrides [{}]; allowed address blocks [{}]",
            self.file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(none)".into()),
            resolve.join(", "),
            allow.join(", ")
        )
    }
}

/// The default config file: `$XDG_CONFIG_HOME/coworkvm/config.toml`, else
/// `$HOME/.config/coworkvm/config.toml`.
pub fn default_config_path() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .filter(|d| d.is_absolute());
    let base = xdg.or_else(|| {
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".config"))
    })?;
    Some(base.join(CONFIG_FILE))
}

#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(default)]
    egress: Option<FileEgress>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEgress {
    #[serde(default)]
    resolve: Vec<String>,
    #[serde(default)]
    allow: Vec<String>,
}

/// The settings from the command line (`resolve`, `allow`) and the config
/// file: `explicit` (`--config PATH`, which must exist), else the default
/// location (absent is fine).
pub fn load(
    resolve: &[String],
    allow: &[String],
    explicit: Option<&Path>,
) -> Result<EgressConfig, ConfigError> {
    let mut cfg = EgressConfig::default();
    for r in resolve {
        cfg.resolve.push(parse_resolve(r)?);
    }
    for a in allow {
        cfg.addresses.allow.push(a.parse::<Cidr>()?);
    }
    let (path, must_exist) = match explicit {
        Some(p) => (Some(p.to_owned()), true),
        None => (default_config_path(), false),
    };
    let Some(path) = path else {
        return Ok(cfg);
    };
    let text = match read_bounded(&path) {
        Ok(t) => t,
        Err(ConfigError::Read { err, .. })
            if !must_exist && err.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(cfg)
        }
        Err(e) => return Err(e),
    };
    let file: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.clone(),
        err: e.to_string(),
    })?;
    let in_file = |e: ConfigError| ConfigError::Value {
        path: path.clone(),
        err: Box::new(e),
    };
    if let Some(eg) = file.egress {
        for r in &eg.resolve {
            cfg.resolve.push(parse_resolve(r).map_err(in_file)?);
        }
        for a in &eg.allow {
            cfg.addresses
                .allow
                .push(a.parse::<Cidr>().map_err(|e| in_file(e.into()))?);
        }
    }
    cfg.file = Some(path);
    Ok(cfg)
}

fn read_bounded(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let read = |err| ConfigError::Read {
        path: path.to_owned(),
        err,
    };
    let f = std::fs::File::open(path).map_err(read)?;
    let mut text = String::new();
    f.take(MAX_CONFIG_FILE + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_CONFIG_FILE {
        return Err(ConfigError::TooLarge(path.to_owned()));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_overrides_parse_in_both_forms() {
        let r = parse_resolve("API.Example.com.=192.0.2.1").unwrap();
        assert_eq!(
            r,
            ResolveOverride {
                host: "api.example.com".into(),
                port: None,
                ip: "192.0.2.1".parse().unwrap()
            }
        );
        let r = parse_resolve("api.example.com:8443=[2001:db8::1]").unwrap();
        assert_eq!(r.port, Some(8443));
        assert_eq!(r.ip, "2001:db8::1".parse::<IpAddr>().unwrap());
        for bad in [
            "api.example.com",
            "=1.2.3.4",
            "api.example.com=",
            "api.example.com=nope",
            "api.example.com:x=1.2.3.4",
            "api.example.com:0=1.2.3.4",
            "api.example.com:70000=1.2.3.4",
            "a..b=1.2.3.4",
            "192.0.2.1=192.0.2.2",
        ] {
            assert!(parse_resolve(bad).is_err(), "{bad}");
        }
        let cfg = EgressConfig {
            resolve: vec![
                parse_resolve("h.example=192.0.2.1").unwrap(),
                parse_resolve("h.example:443=192.0.2.2").unwrap(),
                parse_resolve("h.example=192.0.2.3").unwrap(),
            ],
            ..Default::default()
        };
        assert_eq!(
            cfg.resolve_override("h.example", 443),
            Some("192.0.2.2".parse().unwrap())
        );
        assert_eq!(
            cfg.resolve_override("h.example", 80),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(cfg.resolve_override("other.example", 80), None);
    }

    #[test]
    fn the_config_file_adds_to_the_command_line_and_errors_name_it() {
        let dir = std::env::temp_dir().join(format!("coworkvm-egress-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.toml");
        std::fs::write(
            &file,
            "[other]\nx = 1\n[egress]\nresolve = [\"f.example=192.0.2.9\"]\nallow = [\"10.0.0.0/8\"]\n",
        )
        .unwrap();
        let cfg = load(
            &["c.example=192.0.2.8".into()],
            &["127.0.0.1/32".into()],
            Some(&file),
        )
        .unwrap();
        assert_eq!(cfg.resolve.len(), 2);
        assert_eq!(cfg.resolve[0].host, "c.example");
        assert_eq!(cfg.addresses.allow.len(), 2);
        assert!(cfg.addresses.check("10.1.1.1".parse().unwrap()).is_ok());
        assert!(cfg.describe().contains("127.0.0.1/32"));

        std::fs::write(&file, "[egress]\nallow = [\"10.0.0.1/8\"]\n").unwrap();
        let e = load(&[], &[], Some(&file)).unwrap_err().to_string();
        assert!(e.contains("config.toml") && e.contains("10.0.0.1/8"), "{e}");
        std::fs::write(&file, "[egress]\nalow = []\n").unwrap();
        let e = load(&[], &[], Some(&file)).unwrap_err().to_string();
        assert!(e.contains("alow"), "{e}");
        std::fs::write(&file, "[egress\n").unwrap();
        assert!(load(&[], &[], Some(&file)).is_err());
        // --config must exist; the default location need not.
        let missing = dir.join("missing.toml");
        assert!(matches!(
            load(&[], &[], Some(&missing)),
            Err(ConfigError::Read { .. })
        ));
        assert!(matches!(
            load(&["bad".into()], &[], None),
            Err(ConfigError::ResolveForm(_))
        ));
        assert!(matches!(
            load(&[], &["10.0.0.0/40".into()], None),
            Err(ConfigError::Allow(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
