//! The event hub: every event the helper pushes to the client goes through
//! here, to every subscriber.
//!
//! Events are encoded once ([`EventFrame`]: the whole frame, length prefix
//! included) and fanned out over a `tokio::sync::broadcast` channel. The hub
//! also keeps the current `networkStatus` and `apiReachability`, which a new
//! subscriber gets first: events sent before it subscribed are lost to it.
//!
//! A subscriber that falls more than [`EVENT_BACKLOG`] events behind cannot
//! get every event any more; the server closes its connection (the client
//! resubscribes within seconds and is told the current state again).

use std::sync::{Arc, Mutex};

use serde_json::Value;
use socket_proto::frame::encode_frame;
use socket_proto::{ClientEvent, JsonObject};
use tokio::sync::broadcast;

/// One event, encoded as a whole frame.
pub type EventFrame = Arc<Vec<u8>>;

/// How many events a subscriber may fall behind before it is dropped.
pub const EVENT_BACKLOG: usize = 16 * 1024;

/// `networkStatus` while no guest is connected.
pub const NOT_CONNECTED: &str = "NOT_CONNECTED";
/// `networkStatus` once the guest agent is ready (unless it reports otherwise).
pub const CONNECTED: &str = "CONNECTED";
/// `apiReachability` until the guest reports one.
pub const UNKNOWN: &str = "UNKNOWN";

#[derive(Debug)]
struct State {
    network: String,
    api: String,
}

/// The broadcast point for client events.
pub struct EventHub {
    state: Mutex<State>,
    tx: broadcast::Sender<EventFrame>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}

impl EventHub {
    /// A hub whose state is `NOT_CONNECTED` / `UNKNOWN`.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(EVENT_BACKLOG);
        Self {
            state: Mutex::new(State {
                network: NOT_CONNECTED.into(),
                api: UNKNOWN.into(),
            }),
            tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends an event (a flat `{type, ...}` object) to every subscriber,
    /// and remembers it when it is a `networkStatus` or `apiReachability`.
    pub fn publish(&self, event: JsonObject) {
        let frame = match encode_frame(&event) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                tracing::warn!("dropping an event that cannot be sent: {e}");
                return;
            }
        };
        let kind = event.get("type").and_then(Value::as_str);
        let status = event.get("status").and_then(Value::as_str);
        // Under the lock, so that a concurrent subscribe sees either the old
        // state and this event, or the new state and not this event.
        let mut st = self.lock();
        match (kind, status) {
            (Some("networkStatus"), Some(s)) => st.network = s.to_owned(),
            (Some("apiReachability"), Some(s)) => st.api = s.to_owned(),
            _ => {}
        }
        // No receivers is fine: nobody listens yet.
        let _ = self.tx.send(frame);
    }

    /// [`publish`](Self::publish) for a typed event.
    pub fn publish_event(&self, event: &ClientEvent) {
        match serde_json::to_value(event) {
            Ok(Value::Object(m)) => self.publish(m),
            _ => tracing::warn!("dropping an event that cannot be encoded"),
        }
    }

    /// Publishes `networkStatus` unless it already is `status`.
    pub fn set_network_status(&self, status: &str) {
        if self.network_status() != status {
            self.publish_event(&ClientEvent::NetworkStatus {
                status: status.into(),
            });
        }
    }

    /// The current `networkStatus`.
    pub fn network_status(&self) -> String {
        self.lock().network.clone()
    }

    /// A new subscription: the current-state events to send first, then
    /// the receiver of every later event.
    pub fn subscribe(&self) -> (Vec<EventFrame>, broadcast::Receiver<EventFrame>) {
        let st = self.lock();
        let rx = self.tx.subscribe();
        let snapshot = [
            ClientEvent::NetworkStatus {
                status: st.network.clone(),
            },
            ClientEvent::ApiReachability {
                status: st.api.clone(),
            },
        ]
        .iter()
        .filter_map(|e| encode_frame(e).ok().map(Arc::new))
        .collect();
        (snapshot, rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket_proto::frame::read_frame;

    fn decode(f: &EventFrame) -> JsonObject {
        read_frame(&mut f.as_slice()).unwrap().unwrap()
    }

    #[test]
    fn a_new_subscriber_gets_the_current_state_first() {
        let hub = EventHub::new();
        let (snap, _rx) = hub.subscribe();
        assert_eq!(decode(&snap[0])["status"], NOT_CONNECTED);
        assert_eq!(decode(&snap[1])["type"], "apiReachability");
        assert_eq!(decode(&snap[1])["status"], UNKNOWN);

        hub.publish_event(&ClientEvent::ApiReachability {
            status: "REACHABLE".into(),
        });
        hub.set_network_status(CONNECTED);
        let (snap, mut rx) = hub.subscribe();
        assert_eq!(decode(&snap[0])["status"], CONNECTED);
        assert_eq!(decode(&snap[1])["status"], "REACHABLE");

        hub.publish_event(&ClientEvent::Stdout {
            id: "p".into(),
            data: "x".into(),
        });
        // Setting the same status again sends nothing.
        hub.set_network_status(CONNECTED);
        assert_eq!(decode(&rx.try_recv().unwrap())["type"], "stdout");
        assert!(rx.try_recv().is_err());
    }
}
