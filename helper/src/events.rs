//! The event hub: every event the helper pushes to the client goes through
//! here, to every subscriber.
//!
//! Events are encoded once ([`EventFrame`]: the whole frame, length prefix
//! included) and queued, shared, for every subscriber. The hub also keeps
//! the current `networkStatus` and `apiReachability`, which a new
//! subscriber gets first: events sent before it subscribed are lost to it.
//!
//! Each subscriber's queue is bounded in bytes (the hub's budget,
//! [`EVENT_BUDGET_BYTES`] by default): the bytes of the events queued for
//! it and not yet written to its socket. One event over the budget drops
//! that subscriber (its queue is freed at once and its connection closed,
//! with a log line; the client resubscribes within seconds and is told the
//! current state again). Publishing never waits for a subscriber, so a slow
//! one never stalls the others or the guest's output.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use socket_proto::frame::encode_frame;
use socket_proto::{ClientEvent, JsonObject};
use tokio::sync::Notify;

/// One event, encoded as a whole frame.
pub type EventFrame = Arc<Vec<u8>>;

/// How many bytes of events one subscriber may have queued and unwritten
/// before it is dropped: 64 MiB (six 10 MiB frames at least). Several
/// subscribers share the frames, so the helper holds at most about this
/// much for all of them together, plus what each socket buffers.
pub const EVENT_BUDGET_BYTES: usize = 64 << 20;

/// `networkStatus` while no guest is connected.
pub const NOT_CONNECTED: &str = "NOT_CONNECTED";
/// `networkStatus` once the guest agent is ready (unless it reports otherwise).
pub const CONNECTED: &str = "CONNECTED";
/// `apiReachability` until the helper's probe has an answer (and for good
/// when there is no probe URL).
pub const UNKNOWN: &str = "UNKNOWN";
/// `apiReachability`: the probe URL answered with an HTTP status.
pub const REACHABLE: &str = "REACHABLE";
/// `apiReachability`: a connection, but no sensible answer (TLS failed, a
/// garbled or missing status line).
pub const PROBABLY_UNREACHABLE: &str = "PROBABLY_UNREACHABLE";
/// `apiReachability`: no connection (no name, refused, timed out, blocked).
pub const UNREACHABLE: &str = "UNREACHABLE";

#[derive(Debug)]
struct State {
    network: String,
    api: String,
    subscribers: Vec<Arc<Queue>>,
}

#[derive(Debug, Default)]
struct QueueState {
    frames: VecDeque<EventFrame>,
    /// Bytes queued plus bytes taken but not yet released (being written).
    bytes: usize,
    /// Set when the subscriber went over its budget: no more events.
    overflowed: bool,
    /// Set when the subscription was dropped: the hub forgets it.
    closed: bool,
}

#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    ready: Notify,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        crate::lock(&self.state)
    }
}

/// What [`Subscription::next`] gives.
#[derive(Debug)]
pub enum Next {
    /// The next event.
    Event(EventFrame),
    /// The subscriber fell more than its budget behind and was dropped.
    Overflowed {
        /// The budget it went over.
        budget: usize,
    },
}

/// One subscriber's end of the hub. Take events with [`Subscription::next`]
/// and hand back each event's bytes with [`Subscription::written`] once it
/// is on the socket. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    queue: Arc<Queue>,
    budget: usize,
}

impl Subscription {
    /// Waits for the next event (or the news that this subscriber was
    /// dropped).
    pub async fn next(&self) -> Next {
        loop {
            // Registered before the check: a publish in between still wakes us.
            let notified = self.queue.ready.notified();
            {
                let mut st = self.queue.lock();
                if st.overflowed {
                    return Next::Overflowed {
                        budget: self.budget,
                    };
                }
                if let Some(f) = st.frames.pop_front() {
                    return Next::Event(f);
                }
            }
            notified.await;
        }
    }

    /// Resolves (with the budget) once this subscriber has been dropped
    /// for going over its budget.
    pub async fn dropped(&self) -> usize {
        loop {
            let notified = self.queue.ready.notified();
            if self.queue.lock().overflowed {
                return self.budget;
            }
            notified.await;
        }
    }

    /// An event of `len` bytes taken with [`next`](Self::next) has been
    /// written: its bytes leave the budget.
    pub fn written(&self, len: usize) {
        let mut st = self.queue.lock();
        st.bytes = st.bytes.saturating_sub(len);
    }

    /// Bytes queued or being written for this subscriber.
    pub fn queued_bytes(&self) -> usize {
        self.queue.lock().bytes
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut st = self.queue.lock();
        st.closed = true;
        st.frames.clear();
    }
}

/// The broadcast point for client events.
pub struct EventHub {
    state: Mutex<State>,
    budget: usize,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}

impl EventHub {
    /// A hub whose state is `NOT_CONNECTED` / `UNKNOWN`, with the default
    /// per-subscriber budget [`EVENT_BUDGET_BYTES`].
    pub fn new() -> Self {
        Self::with_budget(EVENT_BUDGET_BYTES)
    }

    /// A hub whose subscribers may each have `budget` bytes queued.
    pub fn with_budget(budget: usize) -> Self {
        Self {
            state: Mutex::new(State {
                network: NOT_CONNECTED.into(),
                api: UNKNOWN.into(),
                subscribers: Vec::new(),
            }),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    /// Sends an event (a flat `{type, ...}` object) to every subscriber,
    /// and remembers it when it is a `networkStatus` or `apiReachability`.
    /// A subscriber that this event would put over its budget is dropped.
    pub fn publish(&self, event: JsonObject) {
        self.publish_unless(event, |_| false);
    }

    /// [`publish`](Self::publish), unless `same(state)` holds: the check and
    /// the send happen under one lock, so two racing setters of a status
    /// cannot leave the remembered state and the last event sent apart.
    fn publish_unless(&self, event: JsonObject, same: impl FnOnce(&State) -> bool) {
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
        if same(&st) {
            return;
        }
        match (kind, status) {
            (Some("networkStatus"), Some(s)) => st.network = s.to_owned(),
            (Some("apiReachability"), Some(s)) => st.api = s.to_owned(),
            _ => {}
        }
        let budget = self.budget;
        st.subscribers.retain(|q| {
            let mut qs = q.lock();
            if qs.closed {
                return false;
            }
            if qs.bytes + frame.len() > budget {
                tracing::warn!(
                    "an event subscriber fell {} bytes behind (budget {budget}); dropping it so \
                     that it resubscribes",
                    qs.bytes + frame.len()
                );
                qs.overflowed = true;
                qs.frames.clear();
                qs.bytes = 0;
                drop(qs);
                q.ready.notify_one();
                return false;
            }
            qs.bytes += frame.len();
            qs.frames.push_back(frame.clone());
            drop(qs);
            q.ready.notify_one();
            true
        });
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
        self.publish_status(
            &ClientEvent::NetworkStatus {
                status: status.into(),
            },
            |st| st.network == status,
        );
    }

    /// The current `networkStatus`.
    pub fn network_status(&self) -> String {
        self.lock().network.clone()
    }

    /// Publishes `apiReachability` unless it already is `status`.
    pub fn set_api_reachability(&self, status: &str) {
        self.publish_status(
            &ClientEvent::ApiReachability {
                status: status.into(),
            },
            |st| st.api == status,
        );
    }

    fn publish_status(&self, event: &ClientEvent, same: impl FnOnce(&State) -> bool) {
        match serde_json::to_value(event) {
            Ok(Value::Object(m)) => self.publish_unless(m, same),
            _ => tracing::warn!("dropping an event that cannot be encoded"),
        }
    }

    /// The current `apiReachability`.
    pub fn api_reachability(&self) -> String {
        self.lock().api.clone()
    }

    /// The number of live subscribers.
    pub fn subscribers(&self) -> usize {
        let mut st = self.lock();
        st.subscribers.retain(|q| !q.lock().closed);
        st.subscribers.len()
    }

    /// A new subscription: the current-state events come first, then every
    /// later event.
    pub fn subscribe(&self) -> Subscription {
        let mut st = self.lock();
        let queue = Arc::new(Queue::default());
        {
            let mut qs = queue.lock();
            for e in [
                ClientEvent::NetworkStatus {
                    status: st.network.clone(),
                },
                ClientEvent::ApiReachability {
                    status: st.api.clone(),
                },
            ] {
                if let Ok(f) = encode_frame(&e) {
                    qs.bytes += f.len();
                    qs.frames.push_back(Arc::new(f));
                }
            }
        }
        st.subscribers.push(queue.clone());
        Subscription {
            queue,
            budget: self.budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket_proto::frame::read_frame;

    fn decode(f: &EventFrame) -> JsonObject {
        read_frame(&mut f.as_slice()).unwrap().unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn take(sub: &Subscription) -> Option<EventFrame> {
        let mut st = sub.queue.lock();
        let f = st.frames.pop_front()?;
        st.bytes -= f.len();
        Some(f)
    }

    #[test]
    fn a_new_subscriber_gets_the_current_state_first() {
        let hub = EventHub::new();
        let sub = hub.subscribe();
        assert_eq!(decode(&take(&sub).unwrap())["status"], NOT_CONNECTED);
        let api = decode(&take(&sub).unwrap());
        assert_eq!(api["type"], "apiReachability");
        assert_eq!(api["status"], UNKNOWN);

        hub.publish_event(&ClientEvent::ApiReachability {
            status: "REACHABLE".into(),
        });
        hub.set_network_status(CONNECTED);
        let sub = hub.subscribe();
        assert_eq!(decode(&take(&sub).unwrap())["status"], CONNECTED);
        assert_eq!(decode(&take(&sub).unwrap())["status"], "REACHABLE");

        hub.publish_event(&ClientEvent::Stdout {
            id: "p".into(),
            data: "x".into(),
        });
        // Setting the same status again sends nothing.
        hub.set_network_status(CONNECTED);
        assert_eq!(decode(&take(&sub).unwrap())["type"], "stdout");
        assert!(take(&sub).is_none());
    }

    #[test]
    fn a_subscriber_over_its_byte_budget_is_dropped_and_others_keep_theirs() {
        rt().block_on(async {
            let hub = EventHub::with_budget(1 << 20);
            let idle = hub.subscribe();
            let busy = hub.subscribe();
            let chunk = "x".repeat(100 * 1024);
            for _ in 0..30 {
                hub.publish_event(&ClientEvent::Stdout {
                    id: "p".into(),
                    data: chunk.clone(),
                });
                // The busy one writes everything it is given.
                while let Some(f) = take(&busy) {
                    assert!(f.len() < 1 << 20);
                }
            }
            assert!(matches!(
                idle.next().await,
                Next::Overflowed { budget } if budget == 1 << 20
            ));
            assert_eq!(idle.queued_bytes(), 0, "its queue is freed at once");
            assert_eq!(hub.subscribers(), 1);
            hub.publish_event(&ClientEvent::Stdout {
                id: "p".into(),
                data: "last".into(),
            });
            match busy.next().await {
                Next::Event(f) => {
                    assert_eq!(decode(&f)["data"], "last");
                    busy.written(f.len());
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(busy.queued_bytes(), 0);
            drop(busy);
            assert_eq!(hub.subscribers(), 0);
        });
    }
}
