//! The embedded MQTT broker (3.1.1 and 5), written for devices only.
//!
//! It is not a general-purpose broker: every client is a registered device
//! (username = device id, password = its token), and a device may only
//! publish to its own `…/attrs` and `…/cmdack` topics and subscribe to its
//! own `…/cmd` topic. Publishes are ingested, not routed; commands are
//! published by Borough. Packets are decoded with rumqttc's codecs, with a
//! bounded packet size; each connection is its own task, so one client's bad
//! packet closes only that client.
//!
//! QoS 0 and 1 are supported (QoS 2 is refused); a QoS 1 measurement is
//! acknowledged once it is durable. Retained messages and wills are ignored;
//! sessions are not kept across connections (commands are kept by the durable
//! queue instead).

use crate::commands::CommandSink;
use crate::{Devices, Entry, topic};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Limits of the embedded broker.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Largest packet; a larger one closes the connection. Payloads above the
    /// devices layer's payload limit are refused without closing it.
    pub max_packet_bytes: usize,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            max_packet_bytes: 1 << 20,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    V4,
    V5,
}

/// A decoded packet, whichever the protocol version.
enum In {
    Connect {
        login: Option<(String, String)>,
        keep_alive: u16,
    },
    Publish {
        topic: String,
        qos: u8,
        pkid: u16,
        payload: Bytes,
    },
    PubAck,
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        count: usize,
    },
    PingReq,
    Disconnect,
    /// A packet a client may not send, or a feature not supported.
    Refused(&'static str),
}

/// A packet to send.
enum Out {
    ConnAck(Option<ConnRefusal>),
    /// pkid, and the refusal reason (v5 only; v4 acknowledges anyway).
    PubAck(u16, Option<v5::PubAckReason>),
    Publish {
        topic: String,
        pkid: u16,
        payload: Bytes,
    },
    SubAck(u16, Vec<Option<u8>>),
    UnsubAck(u16, usize),
    PingResp,
    /// A v5 disconnect with this reason; v4 just closes.
    Disconnect(v5::DisconnectReasonCode),
}

#[derive(Clone, Copy)]
enum ConnRefusal {
    BadLogin,
}

fn qos_num4(q: rumqttc::QoS) -> u8 {
    q as u8
}

fn decode(proto: Proto, buf: &mut BytesMut, max: usize) -> Result<Option<In>, String> {
    match proto {
        Proto::V4 => match v4::Packet::read(buf, max) {
            Ok(p) => Ok(Some(match p {
                v4::Packet::Connect(c) => In::Connect {
                    login: c.login.map(|l| (l.username, l.password)),
                    keep_alive: c.keep_alive,
                },
                v4::Packet::Publish(p) => In::Publish {
                    topic: p.topic,
                    qos: qos_num4(p.qos),
                    pkid: p.pkid,
                    payload: p.payload,
                },
                v4::Packet::PubAck(_) => In::PubAck,
                v4::Packet::Subscribe(s) => In::Subscribe {
                    pkid: s.pkid,
                    filters: s
                        .filters
                        .into_iter()
                        .map(|f| (f.path, qos_num4(f.qos)))
                        .collect(),
                },
                v4::Packet::Unsubscribe(u) => In::Unsubscribe {
                    pkid: u.pkid,
                    count: u.topics.len(),
                },
                v4::Packet::PingReq => In::PingReq,
                v4::Packet::Disconnect => In::Disconnect,
                _ => In::Refused("a packet a client does not send"),
            })),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        },
        Proto::V5 => match v5::Packet::read(buf, Some(u32::try_from(max).unwrap_or(u32::MAX))) {
            Ok(p) => Ok(Some(match p {
                v5::Packet::Connect(c, _, login) => In::Connect {
                    login: login.map(|l| (l.username, l.password)),
                    keep_alive: c.keep_alive,
                },
                v5::Packet::Publish(p) => {
                    if p.properties
                        .as_ref()
                        .is_some_and(|x| x.topic_alias.is_some())
                    {
                        In::Refused("topic aliases are not supported")
                    } else {
                        match String::from_utf8(p.topic.to_vec()) {
                            Ok(topic) => In::Publish {
                                topic,
                                qos: p.qos as u8,
                                pkid: p.pkid,
                                payload: p.payload,
                            },
                            Err(_) => In::Refused("a topic that is not UTF-8"),
                        }
                    }
                }
                v5::Packet::PubAck(_) => In::PubAck,
                v5::Packet::Subscribe(s) => In::Subscribe {
                    pkid: s.pkid,
                    filters: s
                        .filters
                        .into_iter()
                        .map(|f| (f.path, f.qos as u8))
                        .collect(),
                },
                v5::Packet::Unsubscribe(u) => In::Unsubscribe {
                    pkid: u.pkid,
                    count: u.filters.len(),
                },
                v5::Packet::PingReq(_) => In::PingReq,
                v5::Packet::Disconnect(_) => In::Disconnect,
                _ => In::Refused("a packet a client does not send"),
            })),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        },
    }
}

fn encode(proto: Proto, out: Out, buf: &mut BytesMut, max_packet: usize) -> Result<(), String> {
    match proto {
        Proto::V4 => {
            let p = match out {
                Out::ConnAck(r) => v4::Packet::ConnAck(v4::ConnAck::new(
                    match r {
                        None => v4::ConnectReturnCode::Success,
                        Some(ConnRefusal::BadLogin) => v4::ConnectReturnCode::BadUserNamePassword,
                    },
                    false,
                )),
                Out::PubAck(pkid, _) => v4::Packet::PubAck(v4::PubAck::new(pkid)),
                Out::Publish {
                    topic,
                    pkid,
                    payload,
                } => {
                    let mut p = v4::Publish::from_bytes(topic, rumqttc::QoS::AtLeastOnce, payload);
                    p.pkid = pkid;
                    v4::Packet::Publish(p)
                }
                Out::SubAck(pkid, codes) => v4::Packet::SubAck(v4::SubAck::new(
                    pkid,
                    codes
                        .into_iter()
                        .map(|c| match c {
                            Some(0) => v4::SubscribeReasonCode::Success(rumqttc::QoS::AtMostOnce),
                            Some(_) => v4::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
                            None => v4::SubscribeReasonCode::Failure,
                        })
                        .collect(),
                )),
                Out::UnsubAck(pkid, _) => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
                Out::PingResp => v4::Packet::PingResp,
                Out::Disconnect(_) => return Ok(()),
            };
            p.write(buf, max_packet)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Proto::V5 => {
            use rumqttc::v5::mqttbytes::QoS;
            let p = match out {
                Out::ConnAck(r) => v5::Packet::ConnAck(v5::ConnAck {
                    session_present: false,
                    code: match r {
                        None => v5::ConnectReturnCode::Success,
                        Some(ConnRefusal::BadLogin) => v5::ConnectReturnCode::BadUserNamePassword,
                    },
                    properties: r.is_none().then(|| v5::ConnAckProperties {
                        session_expiry_interval: None,
                        receive_max: None,
                        max_qos: Some(1),
                        retain_available: Some(0),
                        max_packet_size: u32::try_from(max_packet).ok(),
                        assigned_client_identifier: None,
                        topic_alias_max: Some(0),
                        reason_string: None,
                        user_properties: Vec::new(),
                        wildcard_subscription_available: Some(0),
                        subscription_identifiers_available: Some(0),
                        shared_subscription_available: Some(0),
                        server_keep_alive: None,
                        response_information: None,
                        server_reference: None,
                        authentication_method: None,
                        authentication_data: None,
                    }),
                }),
                Out::PubAck(pkid, reason) => {
                    let mut a = v5::PubAck::new(pkid, None);
                    if let Some(r) = reason {
                        a.reason = r;
                    }
                    v5::Packet::PubAck(a)
                }
                Out::Publish {
                    topic,
                    pkid,
                    payload,
                } => {
                    let mut p = v5::Publish::new(topic, QoS::AtLeastOnce, payload, None);
                    p.pkid = pkid;
                    v5::Packet::Publish(p)
                }
                Out::SubAck(pkid, codes) => v5::Packet::SubAck(v5::SubAck {
                    pkid,
                    return_codes: codes
                        .into_iter()
                        .map(|c| match c {
                            Some(0) => v5::SubscribeReasonCode::Success(QoS::AtMostOnce),
                            Some(_) => v5::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                            None => v5::SubscribeReasonCode::NotAuthorized,
                        })
                        .collect(),
                    properties: None,
                }),
                Out::UnsubAck(pkid, n) => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid,
                    reasons: vec![v5::UnsubAckReason::Success; n],
                    properties: None,
                }),
                Out::PingResp => v5::Packet::PingResp(v5::PingResp),
                Out::Disconnect(reason_code) => v5::Packet::Disconnect(v5::Disconnect {
                    reason_code,
                    properties: None,
                }),
            };
            p.write(buf, u32::try_from(max_packet).ok())
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

/// Queues an answer to the client. The connection's own loop drains the
/// queue, so it must not wait on it: when the queue is full the answer is
/// handed to a task that waits, instead of being lost.
fn reply(tx: &mpsc::Sender<Out>, out: Out) {
    if let Err(mpsc::error::TrySendError::Full(out)) = tx.try_send(out) {
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(out).await;
        });
    }
}

/// The protocol level of a CONNECT at the start of `buf`: `Ok(None)` until
/// enough bytes have arrived.
fn protocol_of(buf: &[u8]) -> Result<Option<Proto>, &'static str> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err("the first packet is not CONNECT");
    }
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err("a malformed length");
        }
    }
    let Some(head) = buf.get(i..i + 7) else {
        return Ok(None);
    };
    if head[..6] != [0, 4, b'M', b'Q', b'T', b'T'] {
        return Err("only MQTT 3.1.1 and 5 are supported");
    }
    match head[6] {
        4 => Ok(Some(Proto::V4)),
        5 => Ok(Some(Proto::V5)),
        _ => Err("only MQTT 3.1.1 and 5 are supported"),
    }
}

struct Session {
    id: u64,
    tx: mpsc::Sender<Out>,
    /// Whether the device subscribed to its command topic.
    listening: bool,
}

/// The broker's shared state: one session per connected device.
pub struct Broker {
    devices: Arc<Devices>,
    config: BrokerConfig,
    sessions: Mutex<HashMap<(String, String), Session>>,
    next_id: AtomicU64,
    next_pkid: AtomicU64,
}

impl CommandSink for Broker {
    fn deliver(&self, tenant: &str, device: &str, message: Bytes) -> bool {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = sessions.get(&(tenant.to_string(), device.to_string())) else {
            return false;
        };
        if !s.listening {
            return false;
        }
        // pkids 1..=65535.
        let pkid = (self.next_pkid.fetch_add(1, Ordering::Relaxed) % 65_535 + 1) as u16;
        s.tx.try_send(Out::Publish {
            topic: topic(tenant, device, "cmd"),
            pkid,
            payload: message,
        })
        .is_ok()
    }
}

impl Broker {
    pub fn new(devices: Arc<Devices>, config: BrokerConfig) -> Arc<Self> {
        let b = Arc::new(Self {
            devices,
            config,
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            next_pkid: AtomicU64::new(0),
        });
        b.devices.commands.set_sink(b.clone());
        b
    }

    /// Accepts connections until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((sock, _)) => {
                        let _ = sock.set_nodelay(true);
                        let broker = self.clone();
                        tokio::spawn(async move { broker.connection(sock).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    fn refuse(&self, reason: &'static str, tenant: &str, device: &str, detail: &str) {
        self.devices
            .metrics
            .reject("mqtt", reason, tenant, device, detail);
    }

    async fn connection(self: Arc<Self>, mut sock: TcpStream) {
        let max = self.config.max_packet_bytes;
        let mut buf = BytesMut::with_capacity(4096);
        let mut out = BytesMut::with_capacity(256);
        // CONNECT, within the connect timeout.
        let first = tokio::time::timeout(self.config.connect_timeout, async {
            loop {
                match protocol_of(&buf) {
                    Ok(Some(p)) => match decode(p, &mut buf, max) {
                        Ok(Some(packet)) => return Ok((p, packet)),
                        Ok(None) => {}
                        Err(e) => return Err(e),
                    },
                    Ok(None) => {}
                    Err(e) => return Err(e.to_string()),
                }
                match sock.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return Err("closed before CONNECT".to_string()),
                    Ok(_) => {}
                }
            }
        })
        .await;
        let (proto, packet) = match first {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return self.refuse("protocol", "", "", &e),
            Err(_) => return self.refuse("protocol", "", "", "no CONNECT in time"),
        };
        let In::Connect { login, keep_alive } = packet else {
            return self.refuse("protocol", "", "", "the first packet is not CONNECT");
        };
        let entry = login.and_then(|(u, p)| self.devices.authenticate(&u, &p).map(|e| (u, e)));
        let Some((_, entry)) = entry else {
            self.refuse("auth", "", "", "unknown device or wrong token");
            let _ = encode(
                proto,
                Out::ConnAck(Some(ConnRefusal::BadLogin)),
                &mut out,
                max,
            );
            let _ = sock.write_all(&out).await;
            return;
        };
        if encode(proto, Out::ConnAck(None), &mut out, max).is_err()
            || sock.write_all(&out).await.is_err()
        {
            return;
        }
        out.clear();

        let (tx, rx) = mpsc::channel(256);
        let session_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let key = (entry.tenant.clone(), entry.device.id.clone());
        let previous = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key.clone(),
                Session {
                    id: session_id,
                    tx: tx.clone(),
                    listening: false,
                },
            );
        if let Some(old) = previous {
            // A device connects once: the newer connection takes over.
            let _ = old
                .tx
                .try_send(Out::Disconnect(v5::DisconnectReasonCode::SessionTakenOver));
        }
        self.devices.metrics.connections.inc();
        let reason = self
            .run_session(proto, &mut sock, buf, &entry, keep_alive, tx, rx)
            .await;
        self.devices.metrics.connections.dec();
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            if sessions.get(&key).is_some_and(|s| s.id == session_id) {
                sessions.remove(&key);
            }
        }
        if let Some((label, detail)) = reason {
            self.refuse(label, &entry.tenant, &entry.device.id, &detail);
        }
    }

    /// Serves a connected device; returns why it was closed, if by Borough.
    #[allow(clippy::too_many_arguments)]
    async fn run_session(
        &self,
        proto: Proto,
        sock: &mut TcpStream,
        mut buf: BytesMut,
        entry: &Arc<Entry>,
        keep_alive: u16,
        tx: mpsc::Sender<Out>,
        mut rx: mpsc::Receiver<Out>,
    ) -> Option<(&'static str, String)> {
        let max = self.config.max_packet_bytes;
        let attrs_topic = topic(&entry.tenant, &entry.device.id, "attrs");
        let ack_topic = topic(&entry.tenant, &entry.device.id, "cmdack");
        let cmd_topic = topic(&entry.tenant, &entry.device.id, "cmd");
        // The client must send something within 1.5 keep-alive periods.
        let idle = if keep_alive == 0 {
            Duration::from_secs(24 * 3600)
        } else {
            Duration::from_millis(u64::from(keep_alive) * 1500)
        };
        let mut out = BytesMut::with_capacity(256);
        let mut deadline = tokio::time::Instant::now() + idle;
        loop {
            // Every complete packet in the buffer first.
            loop {
                let packet = match decode(proto, &mut buf, max) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = self
                            .close(proto, sock, v5::DisconnectReasonCode::MalformedPacket)
                            .await;
                        return Some(("protocol", e));
                    }
                };
                deadline = tokio::time::Instant::now() + idle;
                match packet {
                    In::Publish {
                        topic,
                        qos,
                        pkid,
                        payload,
                    } => {
                        if qos > 1 {
                            let _ = self
                                .close(proto, sock, v5::DisconnectReasonCode::QoSNotSupported)
                                .await;
                            return Some(("protocol", "QoS 2 is not supported".into()));
                        }
                        if topic == attrs_topic {
                            self.measurement(entry, qos, pkid, payload, &tx).await;
                        } else if topic == ack_topic {
                            self.devices
                                .command_ack_message("mqtt", entry, &payload)
                                .await;
                            if qos == 1 {
                                reply(&tx, Out::PubAck(pkid, None));
                            }
                        } else {
                            let _ = self
                                .close(proto, sock, v5::DisconnectReasonCode::NotAuthorized)
                                .await;
                            return Some((
                                "acl",
                                format!(
                                    "publish to '{topic}', which is not the device's own topic"
                                ),
                            ));
                        }
                    }
                    In::Subscribe { pkid, filters } => {
                        let mut codes = Vec::with_capacity(filters.len());
                        let mut listening = false;
                        for (f, q) in &filters {
                            if *f == cmd_topic {
                                codes.push(Some((*q).min(1)));
                                listening = true;
                            } else {
                                self.refuse(
                                    "acl",
                                    &entry.tenant,
                                    &entry.device.id,
                                    &format!("subscribe to '{f}', which is not the device's command topic"),
                                );
                                codes.push(None);
                            }
                        }
                        reply(&tx, Out::SubAck(pkid, codes));
                        if listening {
                            self.set_listening(entry);
                        }
                    }
                    In::Unsubscribe { pkid, count } => {
                        reply(&tx, Out::UnsubAck(pkid, count));
                    }
                    In::PubAck => {}
                    In::PingReq => {
                        reply(&tx, Out::PingResp);
                    }
                    In::Disconnect => return None,
                    In::Connect { .. } => {
                        let _ = self
                            .close(proto, sock, v5::DisconnectReasonCode::ProtocolError)
                            .await;
                        return Some(("protocol", "a second CONNECT".into()));
                    }
                    In::Refused(what) => {
                        let _ = self
                            .close(proto, sock, v5::DisconnectReasonCode::ProtocolError)
                            .await;
                        return Some(("protocol", what.into()));
                    }
                }
            }
            tokio::select! {
                read = sock.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                },
                Some(o) = rx.recv() => {
                    let closing = matches!(o, Out::Disconnect(_));
                    out.clear();
                    if encode(proto, o, &mut out, max).is_err() {
                        continue;
                    }
                    // Send everything else that is ready in the same write.
                    while let Ok(more) = rx.try_recv() {
                        if matches!(more, Out::Disconnect(_)) {
                            let _ = encode(proto, more, &mut out, max);
                            let _ = sock.write_all(&out).await;
                            return Some(("taken_over", "the device connected again".into()));
                        }
                        let _ = encode(proto, more, &mut out, max);
                    }
                    if sock.write_all(&out).await.is_err() {
                        return None;
                    }
                    if closing {
                        return Some(("taken_over", "the device connected again".into()));
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let _ = self.close(proto, sock, v5::DisconnectReasonCode::KeepAliveTimeout).await;
                    return Some(("keepalive", "no packet within 1.5 keep-alive periods".into()));
                }
            }
        }
    }

    fn set_listening(&self, entry: &Arc<Entry>) {
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = sessions.get_mut(&(entry.tenant.clone(), entry.device.id.clone())) {
                s.listening = true;
            }
        }
        // Commands queued while the device was away go out now.
        let devices = self.devices.clone();
        let (tenant, id) = (entry.tenant.clone(), entry.device.id.clone());
        tokio::spawn(async move { devices.deliver_pending(&tenant, &id).await });
    }

    async fn measurement(
        &self,
        entry: &Arc<Entry>,
        qos: u8,
        pkid: u16,
        payload: Bytes,
        tx: &mpsc::Sender<Out>,
    ) {
        let refusal = |e: &crate::IngestError| match e {
            crate::IngestError::RateLimited => v5::PubAckReason::QuotaExceeded,
            crate::IngestError::Tenant(_) => v5::PubAckReason::NotAuthorized,
            crate::IngestError::Store(_) => v5::PubAckReason::UnspecifiedError,
            _ => v5::PubAckReason::PayloadFormatInvalid,
        };
        let mapped = match self.devices.prepare("mqtt", entry, &payload) {
            Ok(m) => m,
            Err(e) => {
                if qos == 1 {
                    reply(tx, Out::PubAck(pkid, Some(refusal(&e))));
                }
                return;
            }
        };
        match self.devices.submit(&entry.tenant, mapped, qos == 1).await {
            Ok(Some(answer)) => {
                // Acknowledge once durable, without holding up this connection.
                let tx = tx.clone();
                tokio::spawn(async move {
                    let reason = match answer.await {
                        Ok(Ok(())) => None,
                        _ => Some(v5::PubAckReason::UnspecifiedError),
                    };
                    let _ = tx.send(Out::PubAck(pkid, reason)).await;
                });
            }
            Ok(None) => {}
            Err(e) => {
                if qos == 1 {
                    reply(tx, Out::PubAck(pkid, Some(refusal(&e))));
                }
            }
        }
    }

    async fn close(
        &self,
        proto: Proto,
        sock: &mut TcpStream,
        reason: v5::DisconnectReasonCode,
    ) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        if encode(
            proto,
            Out::Disconnect(reason),
            &mut out,
            self.config.max_packet_bytes,
        )
        .is_ok()
        {
            sock.write_all(&out).await?;
        }
        sock.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_is_read_from_connect() {
        let mut b = BytesMut::new();
        v4::Packet::Connect(v4::Connect::new("c"))
            .write(&mut b, 1024)
            .unwrap();
        assert_eq!(protocol_of(&b), Ok(Some(Proto::V4)));
        assert_eq!(protocol_of(&b[..3]), Ok(None));
        assert!(protocol_of(&[0x30, 0]).is_err());
    }
}
