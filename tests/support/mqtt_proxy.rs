//! `MqttProxy`: a TCP proxy between one MQTT client (the agent) and a broker that
//! parses both directions (MQTT 3.1.1, plain TCP) and records exactly which messages
//! the client acknowledged.
//!
//! Broker → client: every QoS 1/2 PUBLISH is remembered under its packet id (topic and
//! payload) before it is forwarded. Client → broker: a PUBACK (QoS 1) or PUBREC (QoS 2)
//! for a remembered packet id moves that message to the acknowledged list. The
//! acknowledgement is recorded when the proxy reads it from the client's socket, i.e.
//! after the client sent it, whether or not the broker ever receives it. Packet ids
//! belong to the client's session, so the map is shared by all its connections (a
//! broker redelivers an unacknowledged message with the same packet id after a
//! reconnect).

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::util::HOST;

/// A message the client acknowledged, as the broker delivered it.
#[derive(Debug, Clone)]
pub struct AckedMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    /// When the proxy read the acknowledgement.
    pub acked_at: Instant,
}

#[derive(Default)]
struct State {
    /// Packet id → (topic, payload) of a delivered QoS ≥ 1 message not yet acknowledged.
    in_flight: Mutex<HashMap<u16, (String, Vec<u8>)>>,
    acked: Mutex<Vec<AckedMessage>>,
    delivered: AtomicU64,
    subacks: AtomicU64,
    connections: AtomicU64,
    /// Acknowledgements for packet ids the proxy never saw delivered (a harness error).
    unknown_acks: AtomicU64,
    open: Mutex<Vec<TcpStream>>,
}

pub struct MqttProxy {
    port: u16,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl MqttProxy {
    /// Listens on a free 127.0.0.1 port and forwards every connection to
    /// `127.0.0.1:broker_port`.
    pub fn start(broker_port: u16) -> MqttProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind MqttProxy");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let state = Arc::new(State::default());
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("mqtt-proxy-{port}"))
                .spawn(move || accept_loop(listener, broker_port, state, stop))
                .expect("spawn the proxy thread")
        };
        MqttProxy {
            port,
            state,
            stop,
            accept: Some(accept),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        HOST
    }

    /// Every acknowledged message so far, in acknowledgement order.
    pub fn acked(&self) -> Vec<AckedMessage> {
        self.state.acked.lock().unwrap().clone()
    }

    /// How many acknowledgements so far (cheap).
    pub fn acked_count(&self) -> usize {
        self.state.acked.lock().unwrap().len()
    }

    /// QoS ≥ 1 PUBLISH packets forwarded to the client (redeliveries included).
    pub fn delivered(&self) -> u64 {
        self.state.delivered.load(Ordering::SeqCst)
    }

    /// SUBACKs forwarded to the client: once one arrived, the subscription exists.
    pub fn subacks(&self) -> u64 {
        self.state.subacks.load(Ordering::SeqCst)
    }

    /// Client connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Acknowledgements whose packet id was never delivered through the proxy (should
    /// be 0: anything else means the proxy lost track).
    pub fn unknown_acks(&self) -> u64 {
        self.state.unknown_acks.load(Ordering::SeqCst)
    }
}

impl Drop for MqttProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.state.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, broker_port: u16, state: Arc<State>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                let Ok(broker) = TcpStream::connect((Ipv4Addr::LOCALHOST, broker_port)) else {
                    // Broker down: the client sees its connection closed and retries.
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = broker.set_nodelay(true);
                state.connections.fetch_add(1, Ordering::SeqCst);
                {
                    let mut open = state.open.lock().unwrap();
                    open.retain(|s| s.peer_addr().is_ok());
                    open.extend(client.try_clone().ok());
                    open.extend(broker.try_clone().ok());
                }
                spawn_pump(&client, &broker, Direction::ToClient, &state);
                spawn_pump(&broker, &client, Direction::ToBroker, &state);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Broker → client: PUBLISH, SUBACK.
    ToClient,
    /// Client → broker: PUBACK, PUBREC.
    ToBroker,
}

/// Reads whole packets from the side opposite to `to` and forwards them to `to`; both
/// sockets are shut down when either direction ends.
fn spawn_pump(to: &TcpStream, other: &TcpStream, direction: Direction, state: &Arc<State>) {
    let (Ok(mut to), Ok(from)) = (to.try_clone(), other.try_clone()) else {
        return;
    };
    let state = state.clone();
    std::thread::spawn(move || {
        let mut reader = BufReader::with_capacity(64 * 1024, from.try_clone().expect("clone"));
        while let Ok(packet) = read_packet(&mut reader) {
            observe(&packet, direction, &state);
            if to.write_all(&packet).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// One whole MQTT control packet: fixed header (type/flags byte, remaining length as a
/// variable-length integer) and body.
fn read_packet(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut packet = vec![0u8; 1];
    r.read_exact(&mut packet)?;
    let mut length = 0usize;
    for i in 0..4 {
        let mut b = [0u8];
        r.read_exact(&mut b)?;
        packet.push(b[0]);
        length |= usize::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            let start = packet.len();
            packet.resize(start + length, 0);
            r.read_exact(&mut packet[start..])?;
            return Ok(packet);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "malformed remaining length",
    ))
}

fn observe(packet: &[u8], direction: Direction, state: &State) {
    let kind = packet[0] >> 4;
    let header = 1 + packet[1..].iter().take_while(|b| **b & 0x80 != 0).count() + 1;
    let body = &packet[header..];
    let u16_at = |i: usize| body.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    match (direction, kind) {
        // PUBLISH: topic (length-prefixed), packet id if QoS > 0, payload.
        (Direction::ToClient, 3) => {
            let qos = (packet[0] >> 1) & 3;
            let Some(topic_len) = u16_at(0).map(usize::from) else {
                return;
            };
            if qos == 0 || body.len() < 2 + topic_len + 2 {
                return;
            }
            let topic = String::from_utf8_lossy(&body[2..2 + topic_len]).into_owned();
            let id = u16_at(2 + topic_len).unwrap_or(0);
            let payload = body[2 + topic_len + 2..].to_vec();
            state.delivered.fetch_add(1, Ordering::SeqCst);
            state.in_flight.lock().unwrap().insert(id, (topic, payload));
        }
        // SUBACK.
        (Direction::ToClient, 9) => {
            state.subacks.fetch_add(1, Ordering::SeqCst);
        }
        // PUBACK (QoS 1) or PUBREC (QoS 2): the client took the message.
        (Direction::ToBroker, 4 | 5) => {
            let Some(id) = u16_at(0) else { return };
            let message = state.in_flight.lock().unwrap().remove(&id);
            match message {
                Some((topic, payload)) => state.acked.lock().unwrap().push(AckedMessage {
                    topic,
                    payload,
                    acked_at: Instant::now(),
                }),
                None => {
                    state.unknown_acks.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        _ => {}
    }
}
