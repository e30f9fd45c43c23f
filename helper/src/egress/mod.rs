//! The host side of the sessions' network: the egress proxy.
//!
//! The guest has no network device. Each session's processes reach the
//! network through the agent's proxies in the session's network namespace
//! (`127.0.0.1:3128` HTTP, `127.0.0.1:1080` SOCKS5), which open an egress
//! stream to this side over vsock port 51235 (`socket_proto::egress`).
//! Here every stream is decided: the session's `allowedDomains`, the
//! host's resolution, the address ranges, the connection.
//!
//! | module | what it does |
//! |---|---|
//! | [`policy`] | host normalisation and the allowlist matcher; [`EgressPolicies`], each session's latest list |
//! | [`addr`] | the refused address ranges and `--egress-allow` CIDRs |
//! | [`sni`] | the server name of a TLS ClientHello (bounded; fuzzed by `helper/fuzz`) |
//! | [`config`] | `--egress-resolve`, `--egress-allow` and the config file |
//! | [`server`] | the listener on `RUNDIR/vsock.sock_51235` and each stream |
//! | [`probe`] | `networkStatus` / `apiReachability` from the helper's own probe |

pub mod addr;
pub mod config;
pub mod policy;
pub mod probe;
pub mod server;
pub mod sni;

use std::collections::BTreeMap;

use socket_proto::egress::{HTTP_PROXY_PORT, SOCKS_PROXY_PORT};
use socket_proto::redact::Secret;

pub use config::EgressConfig;
pub use policy::EgressPolicies;
pub use server::EgressServer;

/// The variable that carries the session's OAuth token.
pub const OAUTH_TOKEN_VAR: &str = "CLAUDE_CODE_OAUTH_TOKEN";

/// The proxy variables of a spawn in a session with the egress proxy.
pub fn proxy_vars() -> Vec<(&'static str, String)> {
    let http = format!("http://127.0.0.1:{HTTP_PROXY_PORT}");
    let socks = format!("socks5h://127.0.0.1:{SOCKS_PROXY_PORT}");
    let no_proxy = "localhost,127.0.0.1,::1".to_owned();
    vec![
        ("HTTPS_PROXY", http.clone()),
        ("HTTP_PROXY", http.clone()),
        ("https_proxy", http.clone()),
        ("http_proxy", http),
        ("ALL_PROXY", socks.clone()),
        ("all_proxy", socks),
        ("NO_PROXY", no_proxy.clone()),
        ("no_proxy", no_proxy),
    ]
}

/// The client's `env` without its empty values. The client sends some
/// variables empty (`ANTHROPIC_API_KEY=""`, `CLAUDE_CODE_DISABLE_CRON=""`);
/// an empty `ANTHROPIC_API_KEY` makes the runtime use it instead of the
/// OAuth token, so the Go peer deletes every empty variable before it
/// spawns (patrickjaja/claude-cowork-service `native/backend.go` "Remove
/// empty env vars that might confuse auth", `COWORK_RPC_PROTOCOL.md`
/// Discovery #8). Stripped here too, before the proxy variables and the
/// token are added, so that an empty one of those is filled in.
pub fn without_empty_values(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A spawn's environment: the client's `env` less its empty values
/// ([`without_empty_values`]); for an agent with the egress proxy, plus
/// each proxy variable and [`OAUTH_TOKEN_VAR`] (`token`: the spawn's
/// `oauthToken`, else the last approved one) that it does not set itself.
pub fn spawn_env(
    env: Option<&Secret<BTreeMap<String, String>>>,
    egress: bool,
    token: Option<&Secret<String>>,
) -> Option<Secret<BTreeMap<String, String>>> {
    let env = env.map(|e| without_empty_values(e.expose()));
    if !egress {
        return env.map(Secret::new);
    }
    let mut vars = env.unwrap_or_default();
    for (k, v) in proxy_vars() {
        vars.entry(k.to_owned()).or_insert(v);
    }
    if let Some(t) = token {
        vars.entry(OAUTH_TOKEN_VAR.to_owned())
            .or_insert_with(|| t.expose().clone());
    }
    Some(Secret::new(vars))
}

#[cfg(test)]
mod tests;
