//! Alert latency: from an MQTT publish of a reading that crosses a threshold (through a
//! private mosquitto and the generic MQTT source of the real pipeline) to the webhook
//! request arriving at a local receiver — under a background load of 1,000 readings/s
//! from 50 other devices, published the same way.
//!
//!     cargo bench --bench alert_latency
//!     SAMPLES=400 RATE=1000 cargo bench --bench alert_latency
//!
//! Baselines in the same run: an MQTT publish until its reading is committed (broker,
//! source, `synchronous=FULL`) and one webhook POST alone (reqwest → receiver), which
//! are the two unavoidable steps; the ratio says what the engine, the event write and
//! the outbox add on top.

#[path = "../tests/support/mod.rs"]
mod support;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use outpost::run::pipeline::Pipeline;
use outpost::store::StoreOptions;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A minimal HTTP/1.1 receiver that reports when each request (with its `kind`) arrived.
async fn receiver(arrivals: mpsc::UnboundedSender<(Instant, String)>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let arrivals = arrivals.clone();
                    async move {
                        let at = Instant::now();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let kind = serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v["kind"].as_str().map(str::to_string))
                            .unwrap_or_default();
                        let _ = arrivals.send((at, kind));
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            bytes::Bytes::new(),
                        )))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return; // built, not run, by `cargo test --benches`
    }
    let samples: usize = std::env::var("SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let rate: u64 = std::env::var("RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let port = receiver(arrivals_tx).await;
    let broker = support::Mosquitto::builder().max_queued_messages(0).start();
    let mqtt_port = broker.port();
    let config_path = dir.path().join("outpost.toml");
    std::fs::write(
        &config_path,
        format!(
            "[storage]\npath = \"{}\"\n\n[[alerts]]\nname = \"probe-warm\"\nkind = \"threshold\"\ndevices = [\"probe\"]\n\
             metric = \"temperature\"\nabove = 8.0\nnotifiers = [\"hook\"]\n\n[[notifiers]]\nname = \"hook\"\ntype = \"webhook\"\n\
             url = \"http://127.0.0.1:{port}/alert\"\nsecret = \"bench\"\n\n[[sources]]\ntype = \"mqtt\"\nname = \"local\"\n\
             topics = [\"sensors/+/json\"]\ndevice_segment = 1\n[sources.broker]\nhost = \"127.0.0.1\"\nport = {mqtt_port}\ntls = false\n",
            dir.path().join("outpost.db").display()
        ),
    )
    .unwrap();
    let config = outpost::config::Config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let token = CancellationToken::new();
    let mut pipeline = Pipeline::start(&config, StoreOptions::default(), token.clone()).unwrap();
    let store = pipeline.store.clone();
    let tasks = outpost::run::alerting::spawn_tasks(
        &config,
        &store,
        pipeline.certs.clone(),
        token.clone(),
        outpost::alerts::Clock::system(),
    )
    .unwrap();
    for t in [tasks.engine, tasks.outbox].into_iter().flatten() {
        pipeline.spawn_consumer(t);
    }
    // Commits of the baseline device, as they happen.
    let (committed_tx, mut committed) = mpsc::unbounded_channel();
    let mut stream = store
        .committed_readings(*store.committed_watch().borrow())
        .unwrap();
    pipeline.spawn_consumer(async move {
        while let Some(rows) = stream.next_batch(1000).await {
            for row in rows {
                if row.reading.device == "baseline" {
                    let _ = committed_tx.send(Instant::now());
                }
            }
        }
    });
    drop(store);

    let mut options = rumqttc::MqttOptions::new("alert-bench", "127.0.0.1", mqtt_port);
    options.set_keep_alive(Duration::from_secs(30));
    let (mqtt, mut eventloop) = rumqttc::AsyncClient::new(options, 10_000);
    let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let publish = |client: rumqttc::AsyncClient, device: String, value: f64| async move {
        let payload = format!("{{\"temperature\": {value}}}");
        let _ = client
            .publish(
                format!("sensors/{device}/json"),
                rumqttc::QoS::AtMostOnce,
                false,
                payload,
            )
            .await;
    };
    // Let the source subscribe.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Background load: `rate` readings/s from 50 devices, every 10 ms.
    let load_client = mqtt.clone();
    let load_token = token.clone();
    let per_tick = (rate / 100).max(1);
    let background = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_millis(10));
        let mut n = 0u64;
        while !load_token.is_cancelled() {
            ticker.tick().await;
            for _ in 0..per_tick {
                n += 1;
                publish(load_client.clone(), format!("bg-{}", n % 50), 4.0).await;
            }
        }
        n
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Baseline 1: an MQTT publish until its reading is committed (under the same load).
    let mut commit = Vec::new();
    for i in 0..samples {
        let start = Instant::now();
        publish(mqtt.clone(), "baseline".into(), i as f64).await;
        let at = tokio::time::timeout(Duration::from_secs(10), committed.recv())
            .await
            .expect("the baseline reading was committed within 10 s")
            .unwrap();
        commit.push(at.duration_since(start));
    }
    // Baseline 2: one webhook POST alone (same receiver, same client settings).
    let client = reqwest::Client::builder().use_rustls_tls().build().unwrap();
    let mut post = Vec::new();
    for _ in 0..samples {
        let start = Instant::now();
        client
            .post(format!("http://127.0.0.1:{port}/raw"))
            .header("content-type", "application/json")
            .body(r#"{"kind":"raw"}"#)
            .send()
            .await
            .unwrap();
        post.push(start.elapsed());
        while arrivals.try_recv().is_ok() {}
    }

    // The alert path: alternately cross the threshold upwards (firing) and back (resolved).
    let mut latency = Vec::new();
    for i in 0..samples {
        let (value, kind) = if i % 2 == 0 {
            (12.0, "firing")
        } else {
            (2.0, "resolved")
        };
        let start = Instant::now();
        publish(mqtt.clone(), "probe".into(), value).await;
        loop {
            let (at, got) = tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
                .await
                .expect("the webhook arrived within 10 s")
                .unwrap();
            if got == kind {
                latency.push(at.duration_since(start));
                break;
            }
        }
    }

    token.cancel();
    let sent = background.await.unwrap_or(0);
    poller.abort();
    pipeline.wait().await;

    for v in [&mut commit, &mut post, &mut latency] {
        v.sort();
    }
    let base_p50 = percentile(&commit, 0.5) + percentile(&post, 0.5);
    let base_p99 = percentile(&commit, 0.99) + percentile(&post, 0.99);
    println!("alert latency, {samples} samples, background {rate} readings/s ({sent} sent)");
    println!("| path | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    for (name, v) in [
        ("MQTT publish -> committed (baseline)", &commit),
        ("webhook POST alone (baseline)", &post),
        ("reading -> webhook (alert)", &latency),
    ] {
        println!(
            "| {name} | {} | {} | {} |",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            ms(*v.last().unwrap_or(&Duration::ZERO))
        );
    }
    println!(
        "ratio alert / (commit + POST): p50 {:.2}x, p99 {:.2}x; target p99 < 100 ms: {}",
        percentile(&latency, 0.5).as_secs_f64() / base_p50.as_secs_f64().max(1e-9),
        percentile(&latency, 0.99).as_secs_f64() / base_p99.as_secs_f64().max(1e-9),
        if percentile(&latency, 0.99) < Duration::from_millis(100) {
            "met"
        } else {
            "MISSED"
        }
    );
}
