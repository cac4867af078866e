//! External broker mode (`--mqtt-broker mqtt://host:port`): Borough connects
//! as a client to Mosquitto, EMQX, NATS or any MQTT 3.1.1 broker, subscribes
//! to `+/devices/+/attrs` and `+/devices/+/cmdack`, and publishes commands to
//! `{tenant}/devices/{id}/cmd`.
//!
//! Authentication and topic ACLs are then the external broker's job: Borough
//! cannot see a device's credentials there. It trusts the topic to name the
//! device (configure the broker so that a client may publish only under its
//! own id, e.g. Mosquitto's `pattern write +/devices/%u/attrs`), and still
//! refuses unknown devices and maps only the device's own keys onto its own
//! entity. Measurements are acknowledged by the client library on receipt.

use crate::commands::CommandSink;
use crate::{Devices, parse_topic, topic};
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::Arc;
use std::time::Duration;

/// Parses `mqtt://host:port` (port 1883 when omitted).
pub fn parse_url(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("mqtt://")
        .ok_or_else(|| format!("'{url}' is not an mqtt:// URL"))?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_string(),
            p.parse().map_err(|_| format!("'{url}' has a bad port"))?,
        )),
        None if !rest.is_empty() => Ok((rest.to_string(), 1883)),
        None => Err(format!("'{url}' names no host")),
    }
}

struct ExternalSink {
    client: AsyncClient,
}

impl CommandSink for ExternalSink {
    fn deliver(&self, tenant: &str, device: &str, message: Bytes) -> bool {
        // The external broker holds it for the device (or drops it if the
        // device is away); retries and expiry follow from missing acks.
        self.client
            .try_publish(
                topic(tenant, device, "cmd"),
                QoS::AtLeastOnce,
                false,
                message,
            )
            .is_ok()
    }
}

/// Connects to the broker and ingests until `shutdown` resolves; reconnects
/// after failures.
pub async fn run(
    devices: Arc<Devices>,
    url: &str,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let (host, port) = parse_url(url)?;
    let mut id = [0u8; 6];
    let _ = getrandom::fill(&mut id);
    let client_id = format!(
        "borough-{}",
        id.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(devices.config.max_payload_bytes + 1024, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 1024);
    devices.commands.set_sink(Arc::new(ExternalSink {
        client: client.clone(),
    }));
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => {
                let _ = client.disconnect().await;
                return Ok(());
            }
            e = events.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(url, "connected to the external MQTT broker");
                for f in ["+/devices/+/attrs", "+/devices/+/cmdack"] {
                    let _ = client.subscribe(f, QoS::AtLeastOnce).await;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                // Subscribed: commands queued meanwhile can go out.
                for (tenant, device) in devices.commands.devices_with_queued() {
                    devices.deliver_pending(&tenant, &device).await;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some((tenant, device, leaf)) = parse_topic(&p.topic) else {
                    continue;
                };
                let Some(entry) = devices.get(tenant, device) else {
                    devices.metrics.reject(
                        "mqtt-external",
                        "unknown_device",
                        tenant,
                        device,
                        "no such device",
                    );
                    continue;
                };
                match leaf {
                    "attrs" => {
                        if let Ok(m) = devices.prepare("mqtt-external", &entry, &p.payload) {
                            let _ = devices.submit(&entry.tenant, m, false).await;
                        }
                    }
                    "cmdack" => {
                        devices
                            .command_ack_message("mqtt-external", &entry, &p.payload)
                            .await;
                    }
                    _ => {}
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(url, error = %e, "external MQTT broker connection failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_name_host_and_port() {
        assert_eq!(
            super::parse_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(
            super::parse_url("mqtt://broker").unwrap(),
            ("broker".into(), 1883)
        );
        assert!(super::parse_url("http://x").is_err());
    }
}
