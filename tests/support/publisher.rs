//! `QosPublisher`: a steady, reliable MQTT QoS 1 publisher (rumqttc) for long-running
//! tests. It uses a persistent session (clean_session = false), so rumqttc retransmits
//! whatever the broker had not acknowledged after a reconnect, and counts PUBACKs so a
//! test knows the broker took every message.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Message `n` (from 0): its topic and payload.
pub type MessageFn = dyn Fn(u64) -> (String, Vec<u8>) + Send + Sync;

pub struct QosPublisher {
    published: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    publishing: tokio::task::JoinHandle<()>,
    polling: tokio::task::JoinHandle<()>,
}

impl QosPublisher {
    /// Publishes `message(0)`, `message(1)`, … at `per_second` to the broker on
    /// 127.0.0.1:`port` as client `client_id`, on `rt`, until [`QosPublisher::finish`].
    pub fn start(
        rt: &tokio::runtime::Runtime,
        port: u16,
        client_id: &str,
        per_second: u64,
        message: Box<MessageFn>,
    ) -> QosPublisher {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let published = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let polling = {
            let (acked, errors) = (acked.clone(), errors.clone());
            rt.spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            errors.fetch_add(1, Ordering::SeqCst);
                            eprintln!("publisher: connection error {e}; reconnecting");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        };
        let publishing = {
            let (published, stop, paused) = (published.clone(), stop.clone(), paused.clone());
            rt.spawn(async move {
                let mut tick =
                    tokio::time::interval(Duration::from_micros(1_000_000 / per_second.max(1)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    if paused.load(Ordering::SeqCst) {
                        continue;
                    }
                    let (topic, payload) = message(n);
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await
                        .expect("the publisher's request channel is open");
                    n += 1;
                    published.store(n, Ordering::SeqCst);
                }
            })
        };
        QosPublisher {
            published,
            acked,
            errors,
            stop,
            paused,
            publishing,
            polling,
        }
    }

    /// Stops sending new messages until [`QosPublisher::resume`] (unacknowledged ones
    /// are still retransmitted).
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Messages handed to the client so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::SeqCst)
    }

    /// PUBACKs from the broker so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Stops publishing and waits until the broker acknowledged every message; returns
    /// how many were published (messages `0..n`).
    pub fn finish(self, rt: &tokio::runtime::Runtime) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        rt.block_on(self.publishing).expect("publisher task");
        let published = self.published.load(Ordering::SeqCst);
        let acked = || self.acked.load(Ordering::SeqCst);
        let ok = super::wait_until(Duration::from_secs(60), || acked() >= published);
        assert!(
            ok,
            "the broker acknowledged {} of {published} messages",
            acked()
        );
        self.polling.abort();
        if self.errors.load(Ordering::SeqCst) == 0 {
            assert_eq!(acked(), published, "one PUBACK per message");
        }
        published
    }
}
