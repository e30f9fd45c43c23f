//! The reachability probe: `networkStatus` and `apiReachability`, the
//! helper's own (guest-sent ones are ignored).
//!
//! Per VM, once its agent is ready, every [`PROBE_PERIOD`], and at once
//! when a session's stream to the probe URL's host could not connect: a
//! one-time nonce is registered ([`ProbeShared`]) and the agent asked to
//! open an egress stream with it (`egress.probe`). The egress server takes
//! the nonce (one use; the host and port must be this probe's), resolves
//! and connects by the same rules as a session's stream, answers the
//! agent, and hands the connection here. The probe then speaks HTTP/1.1
//! (over TLS for `https`, rustls with the system's roots, which honour
//! `SSL_CERT_FILE`) and reads the status line.
//!
//! - `networkStatus`: `CONNECTED` while the agent's leg works (it answered
//!   `egress.probe`, whatever the upstream did); `NOT_CONNECTED` when it
//!   does not, or the agent is gone. Without a probe URL the agent leg is
//!   still run (the server answers `bad-request` to a nonce without a
//!   target, which proves the channel).
//! - `apiReachability`: any HTTP status is `REACHABLE`; no name, no
//!   connection, a refused address, no agent leg are `UNREACHABLE`; a TLS
//!   failure or a garbled or missing status line is
//!   `PROBABLY_UNREACHABLE`. Without a probe URL it stays `UNKNOWN`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket_proto::egress::{EgressProbeParams, EgressRefusal};
use socket_proto::GuestRequest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

use super::policy::{normalise, Host};
use crate::agent::AgentClient;
use crate::events::{
    EventHub, CONNECTED, NOT_CONNECTED, PROBABLY_UNREACHABLE, REACHABLE, UNREACHABLE,
};
use crate::lock;

/// How often the probe runs while the agent is up.
pub const PROBE_PERIOD: Duration = Duration::from_secs(30);
/// The least time between two probes (a session failing many streams to
/// the probe host asks for many re-probes).
pub const MIN_PROBE_GAP: Duration = Duration::from_secs(2);
/// How long the agent may take to answer `egress.probe`.
pub const PROBE_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the server may take to hand over the probe's connection after
/// the agent answered (its resolution and connection bounds, and a margin).
pub const PROBE_STREAM_WAIT: Duration = Duration::from_secs(25);
/// How long the TLS handshake and the status line may take.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes read looking for the status line.
pub const MAX_STATUS_BYTES: usize = 8 * 1024;
/// The longest probe URL taken.
pub const MAX_URL_LEN: usize = 2048;
/// Probe slots waiting at once (one prober registers one at a time).
const MAX_PENDING_PROBES: usize = 8;

/// Why `apiProbeURL` cannot be probed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProbeUrlError {
    #[error("the probe URL is longer than {MAX_URL_LEN} bytes")]
    TooLong,
    #[error("the probe URL is not http:// or https://")]
    Scheme,
    #[error("the probe URL has user information")]
    UserInfo,
    #[error("the probe URL's host is not valid: {0}")]
    Host(String),
    #[error("the probe URL's port is not valid")]
    Port,
    #[error("the probe URL has characters a request line cannot carry")]
    Characters,
}

/// A parsed `apiProbeURL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeUrl {
    pub https: bool,
    /// The host as the URL names it (an IPv6 literal without brackets):
    /// what the agent is asked to open and the TLS server name.
    pub host: String,
    pub port: u16,
    /// Path and query (`/` at least).
    pub path: String,
    /// The normalised host.
    pub normal: Host,
}

impl ProbeUrl {
    /// The `Host` header's value.
    pub fn host_header(&self) -> String {
        let host = match self.normal {
            Host::Ip(std::net::IpAddr::V6(_)) => format!("[{}]", self.host),
            _ => self.host.clone(),
        };
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Parses an `http(s)://host[:port][/path][?query][#fragment]` URL.
pub fn parse_probe_url(url: &str) -> Result<ProbeUrl, ProbeUrlError> {
    if url.len() > MAX_URL_LEN {
        return Err(ProbeUrlError::TooLong);
    }
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ProbeUrlError::Characters);
    }
    let lower = url.to_ascii_lowercase();
    let (https, rest) = if lower.starts_with("https://") {
        (true, &url[8..])
    } else if lower.starts_with("http://") {
        (false, &url[7..])
    } else {
        return Err(ProbeUrlError::Scheme);
    };
    let rest = rest.split('#').next().unwrap_or("");
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.contains('@') {
        return Err(ProbeUrlError::UserInfo);
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| ProbeUrlError::Host(authority.into()))?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or(ProbeUrlError::Port)?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => {
            if https {
                443
            } else {
                80
            }
        }
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|n| *n != 0 && p.bytes().all(|b| b.is_ascii_digit()))
            .ok_or(ProbeUrlError::Port)?,
    };
    let normal = normalise(host).map_err(|e| ProbeUrlError::Host(e.to_string()))?;
    let path = if path.is_empty() {
        "/".to_owned()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    Ok(ProbeUrl {
        https,
        host: host.to_owned(),
        port,
        path,
        normal,
    })
}

/// The host and port a probe slot is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub host: String,
    pub port: u16,
}

/// What the server hands the prober: the connection, or why there is none.
pub type ProbeConnection = Result<TcpStream, (EgressRefusal, String)>;

/// One registered probe.
pub struct ProbeSlot {
    /// `None`: no probe URL; the stream only tests the agent's channel.
    pub target: Option<ProbeTarget>,
    /// Where the connection goes.
    pub conn: oneshot::Sender<ProbeConnection>,
}

/// What the prober and the egress server share for one VM.
pub struct ProbeShared {
    pending: Mutex<HashMap<String, ProbeSlot>>,
    reprobe: Notify,
    probe_host: Option<Host>,
}

impl ProbeShared {
    /// The shared state of a VM whose probe URL names `probe_host`.
    pub fn new(probe_host: Option<Host>) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(HashMap::new()),
            reprobe: Notify::new(),
            probe_host,
        })
    }

    /// Registers a probe for `target` under a fresh nonce.
    pub fn register(
        &self,
        target: Option<ProbeTarget>,
    ) -> std::io::Result<(String, oneshot::Receiver<ProbeConnection>)> {
        let nonce = nonce()?;
        let (tx, rx) = oneshot::channel();
        let mut p = lock(&self.pending);
        if p.len() >= MAX_PENDING_PROBES {
            p.clear();
        }
        p.insert(nonce.clone(), ProbeSlot { target, conn: tx });
        Ok((nonce, rx))
    }

    /// Takes the slot of `nonce`: it can be taken once.
    pub fn take(&self, nonce: &str) -> Option<ProbeSlot> {
        lock(&self.pending).remove(nonce)
    }

    /// Forgets `nonce` (its probe is over).
    pub fn forget(&self, nonce: &str) {
        lock(&self.pending).remove(nonce);
    }

    /// Whether `host` is the probe URL's host.
    pub fn is_probe_host(&self, host: &Host) -> bool {
        self.probe_host.as_ref() == Some(host)
    }

    /// Asks for a probe now (a session's stream to the probe host failed).
    pub fn reprobe_now(&self) {
        self.reprobe.notify_one();
    }

    /// Resolves once a re-probe was asked for.
    pub async fn reprobe_requested(&self) {
        self.reprobe.notified().await
    }
}

/// 128 random bits as hex.
fn nonce() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: getrandom writes at most `len - filled` bytes into the
        // live local array from offset `filled`.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// The agent's leg worked.
    pub channel: bool,
    /// The API's reachability (`None`: no probe URL).
    pub api: Option<&'static str>,
}

/// One VM's prober.
pub struct Prober {
    pub agent: Arc<AgentClient>,
    pub events: Arc<EventHub>,
    pub shared: Arc<ProbeShared>,
    pub url: Option<ProbeUrl>,
}

impl Prober {
    /// Probes until the agent's channel ends (or the task is aborted).
    pub async fn run(self) {
        loop {
            if self.agent.channel_ended() {
                self.events.set_network_status(NOT_CONNECTED);
                return;
            }
            let started = tokio::time::Instant::now();
            let outcome = self.probe_once().await;
            self.publish(outcome);
            tokio::select! {
                _ = tokio::time::sleep(PROBE_PERIOD) => {}
                _ = self.shared.reprobe_requested() => {
                    tokio::time::sleep_until(started + MIN_PROBE_GAP).await;
                }
            }
        }
    }

    fn publish(&self, o: ProbeOutcome) {
        let up = o.channel && self.agent.is_connected();
        if up && self.events.network_status() != CONNECTED {
            tracing::info!("the guest's network channel works: networkStatus CONNECTED");
        } else if !up && self.events.network_status() != NOT_CONNECTED {
            tracing::info!("the guest's network channel failed: networkStatus NOT_CONNECTED");
        }
        self.events
            .set_network_status(if up { CONNECTED } else { NOT_CONNECTED });
        // The channel may have ended between the check above and the set:
        // its own NOT_CONNECTED could then have gone out first and been
        // overwritten. The agent marks itself disconnected before it sets
        // NOT_CONNECTED, so checking again here leaves the last word right.
        if up && !self.agent.is_connected() {
            self.events.set_network_status(NOT_CONNECTED);
        }
        if let Some(api) = o.api {
            if self.events.api_reachability() != api {
                tracing::info!("apiReachability {api}");
            }
            self.events.set_api_reachability(api);
        }
    }

    /// One probe: the agent's leg, then (with a URL) the HTTP exchange.
    pub async fn probe_once(&self) -> ProbeOutcome {
        let target = self.url.as_ref().map(|u| ProbeTarget {
            host: u.host.clone(),
            port: u.port,
        });
        let api_on_failure = self.url.as_ref().map(|_| UNREACHABLE);
        let (nonce, rx) = match self.shared.register(target.clone()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("probe: no random nonce: {e}");
                return ProbeOutcome {
                    channel: false,
                    api: api_on_failure,
                };
            }
        };
        let params = EgressProbeParams {
            nonce: nonce.clone(),
            host: target.as_ref().map(|t| t.host.clone()).unwrap_or_default(),
            port: target.as_ref().map(|t| t.port).unwrap_or(0),
        };
        let answer = self
            .agent
            .request(&GuestRequest::EgressProbe(params), PROBE_REQUEST_TIMEOUT)
            .await;
        if let Err(e) = answer {
            self.shared.forget(&nonce);
            tracing::debug!("probe: the agent's leg failed: {e}");
            return ProbeOutcome {
                channel: false,
                api: api_on_failure,
            };
        }
        let Some(url) = &self.url else {
            self.shared.forget(&nonce);
            return ProbeOutcome {
                channel: true,
                api: None,
            };
        };
        let conn = tokio::time::timeout(PROBE_STREAM_WAIT, rx).await;
        self.shared.forget(&nonce);
        let api = match conn {
            Ok(Ok(Ok(tcp))) => match exchange(tcp, url).await {
                Ok(code) => {
                    tracing::debug!("probe: {} answered {code}", url.host);
                    REACHABLE
                }
                Err(e) => {
                    tracing::debug!("probe: {e}");
                    PROBABLY_UNREACHABLE
                }
            },
            Ok(Ok(Err((why, msg)))) => {
                tracing::debug!("probe: {} ({msg})", why.as_str());
                UNREACHABLE
            }
            // The agent answered but no stream reached the server.
            Ok(Err(_)) | Err(_) => UNREACHABLE,
        };
        ProbeOutcome {
            channel: true,
            api: Some(api),
        }
    }
}

/// Why the HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("no status line within {STATUS_TIMEOUT:?}")]
    Timeout,
    #[error("the answer is not an HTTP status line")]
    Garbled,
    #[error("the connection ended before the status line")]
    Closed,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The HTTP exchange over the probe's connection (TLS for https).
pub async fn exchange(tcp: TcpStream, url: &ProbeUrl) -> Result<u16, ExchangeError> {
    tokio::time::timeout(STATUS_TIMEOUT, async {
        if url.https {
            let cfg = tls_config().await.map_err(ExchangeError::Tls)?;
            let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| ExchangeError::Tls(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| ExchangeError::Tls(e.to_string()))?;
            status_line(tls, &url.host_header(), &url.path).await
        } else {
            status_line(tcp, &url.host_header(), &url.path).await
        }
    })
    .await
    .unwrap_or(Err(ExchangeError::Timeout))
}

/// The client TLS configuration: ring, the system's roots (once).
async fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: tokio::sync::OnceCell<Result<Arc<rustls::ClientConfig>, String>> =
        tokio::sync::OnceCell::const_new();
    CONFIG
        .get_or_init(|| async {
            tokio::task::spawn_blocking(build_tls_config)
                .await
                .unwrap_or_else(|e| Err(format!("loading the root certificates: {e}")))
        })
        .await
        .clone()
}

fn build_tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if !found.errors.is_empty() || ignored > 0 {
        tracing::debug!(
            "probe: {ignored} root certificates unusable, {} errors loading them",
            found.errors.len()
        );
    }
    if added == 0 {
        return Err("no usable root certificates on this system".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Sends `GET path` and reads the status line's code (at most
/// [`MAX_STATUS_BYTES`]).
pub async fn status_line<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    host_header: &str,
    path: &str,
) -> Result<u16, ExchangeError> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: coworkvm-probe\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    s.flush().await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        let room = (MAX_STATUS_BYTES - buf.len()).min(chunk.len());
        if room == 0 {
            return Err(ExchangeError::Garbled);
        }
        let n = s.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(if buf.is_empty() {
                ExchangeError::Closed
            } else {
                ExchangeError::Garbled
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            return parse_status(&buf[..end]).ok_or(ExchangeError::Garbled);
        }
    }
}

/// `HTTP/1.x NNN ...` -> NNN.
fn parse_status(line: &[u8]) -> Option<u16> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (&minor, rest) = rest.split_first()?;
    if !minor.is_ascii_digit() {
        return None;
    }
    let rest = rest.strip_prefix(b" ")?;
    let code = rest.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|&b| b != b' ') {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}
