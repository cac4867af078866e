//! External broker mode (`--mqtt-broker mqtt[s]://[user:password@]host[:port]`):
//! Borough connects as a client to Mosquitto, EMQX, NATS or any MQTT 3.1.1
//! broker (with the URL's credentials, over TLS for `mqtts://`), subscribes
//! to `{prefix}+/devices/+/attrs` and `{prefix}+/devices/+/cmdack`, and
//! publishes commands to `{prefix}{tenant}/devices/{id}/cmd`. The optional
//! prefix (`--mqtt-topic-prefix city1/`) lets deployments share a broker.
//!
//! Authentication and topic ACLs are then the external broker's job: Borough
//! cannot see who published a message, so it trusts the topic to name both
//! the tenant and the device. The broker must therefore bind a device to its
//! own topics *tenant included*: a device authenticates with its topic base,
//! `{prefix}{tenant}/devices/{id}`, as username, and the ACL allows
//! `pattern write %u/attrs`, `pattern write %u/cmdack`, `pattern read %u/cmd`.
//! (An ACL keyed on the device id alone, `+/devices/%u/attrs`, would let a
//! device of one tenant write into another tenant's device of the same id.)
//! Borough still refuses unknown devices and maps only the device's own keys
//! onto its own entity. Measurements are acknowledged by the client library
//! on receipt.

use crate::commands::CommandSink;
use crate::{Devices, parse_topic, topic};
use bytes::Bytes;
use rumqttc::tokio_rustls::rustls::ClientConfig;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The external broker, from `mqtt[s]://[user:password@]host[:port]`.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Borough's own username and password at the broker.
    pub user: Option<(String, String)>,
}

/// Shows the broker without its password, for logs and errors.
impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        match &self.user {
            Some((u, _)) => write!(f, "{scheme}://{u}@{}:{}", self.host, self.port),
            None => write!(f, "{scheme}://{}:{}", self.host, self.port),
        }
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn decode(part: &str, url: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("'{url}' has credentials that are not UTF-8 once decoded"))
}

/// Parses `mqtt[s]://[user:password@]host[:port]` (port 1883, or 8883 over
/// TLS, when omitted). Credentials may be percent-encoded (`%40` for `@`).
pub fn parse_url(url: &str) -> Result<BrokerUrl, String> {
    let (tls, rest) = match (url.strip_prefix("mqtt://"), url.strip_prefix("mqtts://")) {
        (Some(r), _) => (false, r),
        (_, Some(r)) => (true, r),
        _ => return Err(format!("'{url}' is not an mqtt:// or mqtts:// URL")),
    };
    let rest = rest.trim_end_matches('/');
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((cred, hp)) => {
            let (u, p) = cred.split_once(':').unwrap_or((cred, ""));
            if u.is_empty() {
                return Err(format!("'{url}' names an empty user"));
            }
            (Some((decode(u, url)?, decode(p, url)?)), hp)
        }
        None => (None, rest),
    };
    if hostport.contains('/') {
        return Err(format!(
            "'{url}' has a path: give a topic prefix with --mqtt-topic-prefix"
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = match hostport.rsplit_once(':') {
        // `[::1]` alone: the colons are the address's.
        Some(_) if hostport.ends_with(']') => (hostport, default_port),
        Some((h, p)) => (h, p.parse().map_err(|_| format!("'{url}' has a bad port"))?),
        None => (hostport, default_port),
    };
    if host.is_empty() {
        return Err(format!("'{url}' names no host"));
    }
    Ok(BrokerUrl {
        tls,
        host: host.to_string(),
        port,
        user,
    })
}

/// Checks a topic prefix (`city1` or `city1/`) and gives it with its final `/`
/// (empty: no prefix).
pub fn parse_prefix(prefix: &str) -> Result<String, String> {
    if prefix.is_empty() {
        return Ok(String::new());
    }
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    let valid = !trimmed.is_empty()
        && trimmed.split('/').all(|s| !s.is_empty())
        && !trimmed.contains(['+', '#', '\0']);
    if !valid {
        return Err(format!(
            "the MQTT topic prefix '{prefix}' must be topic levels without wildcards, \
             like 'city1/' (no leading, trailing or double '/')"
        ));
    }
    Ok(format!("{trimmed}/"))
}

/// How to reach the external broker.
#[derive(Clone)]
pub struct ExternalConfig {
    pub url: BrokerUrl,
    /// Put in front of every topic, ending with `/` (see [`parse_prefix`]); may be empty.
    pub topic_prefix: String,
    /// The TLS client settings for `mqtts://` (trusted CAs).
    pub tls: Option<Arc<ClientConfig>>,
}

struct ExternalSink {
    client: AsyncClient,
    prefix: String,
}

impl CommandSink for ExternalSink {
    fn deliver(&self, tenant: &str, device: &str, message: Bytes) -> bool {
        // The external broker holds it for the device (or drops it if the
        // device is away); retries and expiry follow from missing acks.
        self.client
            .try_publish(
                format!("{}{}", self.prefix, topic(tenant, device, "cmd")),
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
    config: ExternalConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let ExternalConfig {
        url,
        topic_prefix: prefix,
        tls,
    } = config;
    let mut id = [0u8; 6];
    let _ = getrandom::fill(&mut id);
    let client_id = format!(
        "borough-{}",
        id.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let mut options = MqttOptions::new(client_id, url.host.clone(), url.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(devices.config.max_payload_bytes + 1024, 1 << 20);
    if let Some((user, password)) = &url.user {
        options.set_credentials(user.clone(), password.clone());
    }
    if url.tls {
        let tls = tls.ok_or_else(|| format!("{url}: no TLS settings for mqtts://"))?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    let broker = url.to_string();
    let (client, mut events) = AsyncClient::new(options, 1024);
    devices.commands.set_sink(Arc::new(ExternalSink {
        client: client.clone(),
        prefix: prefix.clone(),
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
                tracing::info!(broker, "connected to the external MQTT broker");
                for leaf in ["attrs", "cmdack"] {
                    let filter = format!("{prefix}+/devices/+/{leaf}");
                    let _ = client.subscribe(filter, QoS::AtLeastOnce).await;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    tracing::error!(
                        broker,
                        "the external MQTT broker refused Borough's subscription: \
                         its ACL must let Borough's user read {prefix}+/devices/+/attrs and …/cmdack"
                    );
                }
                // Subscribed: commands queued meanwhile can go out.
                for (tenant, device) in devices.commands.devices_with_queued() {
                    devices.deliver_pending(&tenant, &device).await;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some((tenant, device, leaf)) =
                    p.topic.strip_prefix(prefix.as_str()).and_then(parse_topic)
                else {
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
                tracing::warn!(broker, error = %e, "external MQTT broker connection failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_port_and_credentials() {
        let u = parse_url("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("127.0.0.1", 1884, false));
        assert_eq!(u.user, None);
        let u = parse_url("mqtt://broker").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("broker", 1883));
        let u = parse_url("mqtts://borough:s%40cr%3At@broker/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("broker", 8883, true));
        assert_eq!(u.user, Some(("borough".into(), "s@cr:t".into())));
        // The password never shows in logs.
        assert_eq!(u.to_string(), "mqtts://borough@broker:8883");
        let u = parse_url("mqtt://[::1]").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 1883));
        assert_eq!(parse_url("mqtt://[::1]:1885").unwrap().port, 1885);
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("mqtt://").is_err());
        assert!(parse_url("mqtt://:p@broker").is_err());
        assert!(parse_url("mqtt://broker:x").is_err());
        assert!(parse_url("mqtt://broker/city1").is_err());
    }

    #[test]
    fn topic_prefixes_end_with_one_slash() {
        assert_eq!(parse_prefix("").unwrap(), "");
        assert_eq!(parse_prefix("city1").unwrap(), "city1/");
        assert_eq!(parse_prefix("city1/").unwrap(), "city1/");
        assert_eq!(parse_prefix("eu/city1").unwrap(), "eu/city1/");
        for bad in ["/", "/city1", "city1//", "a//b", "city+", "#", "c/#/"] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
        // A prefixed topic maps to the tenant and device behind the prefix.
        let t = format!("city1/{}", topic("a", "d1", "attrs"));
        assert_eq!(
            t.strip_prefix("city1/").and_then(parse_topic),
            Some(("a", "d1", "attrs"))
        );
        assert_eq!("city2/a/devices/d1/attrs".strip_prefix("city1/"), None);
    }
}
