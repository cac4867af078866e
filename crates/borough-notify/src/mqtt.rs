//! MQTT endpoints (`mqtt://[user:password@]host[:port]/topic`): one
//! connection per endpoint; a notification counts as delivered when the
//! broker acknowledges it (PUBACK for QoS 1, PUBCOMP for QoS 2, the packet
//! written for QoS 0).

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS};
use std::time::Duration;
use tokio::sync::mpsc;

/// A connection to one broker and topic.
pub struct MqttEndpoint {
    client: AsyncClient,
    acks: mpsc::Receiver<Result<(), String>>,
    topic: String,
    qos: QoS,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MqttEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The parts of an MQTT endpoint URI.
#[derive(Debug, PartialEq)]
pub struct MqttUri {
    pub host: String,
    pub port: u16,
    pub user: Option<(String, String)>,
    pub topic: String,
}

/// Parses `mqtt://[user:password@]host[:port]/topic`.
pub fn parse_uri(uri: &str) -> Result<MqttUri, String> {
    let rest = uri
        .strip_prefix("mqtt://")
        .ok_or_else(|| format!("'{uri}' is not an mqtt:// URI"))?;
    let (authority, topic) = rest
        .split_once('/')
        .ok_or_else(|| format!("'{uri}' names no topic"))?;
    if topic.is_empty() {
        return Err(format!("'{uri}' names no topic"));
    }
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((cred, hp)) => {
            let (u, p) = cred.split_once(':').unwrap_or((cred, ""));
            (Some((u.to_string(), p.to_string())), hp)
        }
        None => (None, authority),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| format!("bad port in '{uri}'"))?),
        None => (hostport, 1883),
    };
    if host.is_empty() {
        return Err(format!("'{uri}' names no host"));
    }
    Ok(MqttUri {
        host: host.to_string(),
        port,
        user,
        topic: topic.to_string(),
    })
}

/// The QoS asked for with `notifierInfo` key `MQTT-QoS` (default 0).
pub fn qos(notifier_info: &[(String, String)]) -> Result<QoS, String> {
    match notifier_info
        .iter()
        .find(|(k, _)| k == "MQTT-QoS")
        .map(|(_, v)| v.as_str())
    {
        None | Some("0") => Ok(QoS::AtMostOnce),
        Some("1") => Ok(QoS::AtLeastOnce),
        Some("2") => Ok(QoS::ExactlyOnce),
        Some(other) => Err(format!("MQTT-QoS must be 0, 1 or 2, not '{other}'")),
    }
}

impl MqttEndpoint {
    pub fn connect(uri: &str, notifier_info: &[(String, String)]) -> Result<Self, String> {
        let parts = parse_uri(uri)?;
        let qos = qos(notifier_info)?;
        let client_id = format!("borough-{:x}", borough_core::validate::now_micros());
        let mut opts = MqttOptions::new(client_id, parts.host, parts.port);
        opts.set_keep_alive(Duration::from_secs(30));
        if let Some((u, p)) = parts.user {
            opts.set_credentials(u, p);
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        let (tx, acks) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            loop {
                let signal = match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                        Some(Ok(()))
                    }
                    Ok(Event::Incoming(Incoming::PubAck(_))) if qos == QoS::AtLeastOnce => {
                        Some(Ok(()))
                    }
                    Ok(Event::Incoming(Incoming::PubComp(_))) if qos == QoS::ExactlyOnce => {
                        Some(Ok(()))
                    }
                    Ok(_) => None,
                    Err(e) => {
                        // The next poll reconnects; pace it.
                        let _ = tx.try_send(Err(format!("MQTT connection: {e}")));
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        None
                    }
                };
                if let Some(s) = signal
                    && tx.send(s).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(Self {
            client,
            acks,
            topic: parts.topic,
            qos,
            task,
        })
    }

    /// Publishes one message and waits for the broker's acknowledgement.
    pub async fn publish(&mut self, payload: Vec<u8>, timeout: Duration) -> Result<(), String> {
        // Forget outcomes of earlier, abandoned publishes.
        while self.acks.try_recv().is_ok() {}
        self.client
            .publish(self.topic.clone(), self.qos, false, payload)
            .await
            .map_err(|e| format!("MQTT publish: {e}"))?;
        match tokio::time::timeout(timeout, self.acks.recv()).await {
            Ok(Some(r)) => r,
            Ok(None) => Err("the MQTT connection task ended".into()),
            Err(_) => Err(format!(
                "no acknowledgement from the broker within {timeout:?}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse_uri("mqtt://127.0.0.1:1883/city/notify").unwrap(),
            MqttUri {
                host: "127.0.0.1".into(),
                port: 1883,
                user: None,
                topic: "city/notify".into()
            }
        );
        assert_eq!(
            parse_uri("mqtt://u:p@broker/t").unwrap(),
            MqttUri {
                host: "broker".into(),
                port: 1883,
                user: Some(("u".into(), "p".into())),
                topic: "t".into()
            }
        );
        assert!(parse_uri("mqtt://broker").is_err());
        assert!(parse_uri("mqtt://broker:x/t").is_err());
        assert!(qos(&[("MQTT-QoS".into(), "1".into())]).is_ok_and(|q| q == QoS::AtLeastOnce));
        assert!(qos(&[("MQTT-QoS".into(), "3".into())]).is_err());
    }
}
