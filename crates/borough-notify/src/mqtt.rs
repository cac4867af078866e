//! MQTT endpoints (`mqtt://` or, over TLS, `mqtts://[user:password@]host[:port]/topic`):
//! one connection per endpoint; a notification counts as delivered when the
//! broker acknowledges it (PUBACK for QoS 1, PUBCOMP for QoS 2, the packet
//! written for QoS 0).

use borough_access::outbound::OutboundPolicy;
use rumqttc::{
    AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS, TlsConfiguration, Transport,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The TLS client configuration of `mqtts://` endpoints: the Mozilla root
/// certificates, plus the operator's own CAs (`--mqtt-ca-file`).
pub fn tls_config(extra_ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(pem) = extra_ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("the MQTT CA file is not PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("the MQTT CA file holds an unusable certificate: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err("the MQTT CA file holds no certificate".into());
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

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
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub user: Option<(String, String)>,
    pub topic: String,
}

/// Parses `mqtt[s]://[user:password@]host[:port]/topic`.
pub fn parse_uri(uri: &str) -> Result<MqttUri, String> {
    let (tls, rest) = match (uri.strip_prefix("mqtt://"), uri.strip_prefix("mqtts://")) {
        (Some(r), _) => (false, r),
        (_, Some(r)) => (true, r),
        _ => return Err(format!("'{uri}' is not an mqtt:// or mqtts:// URI")),
    };
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
        None => (hostport, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(format!("'{uri}' names no host"));
    }
    Ok(MqttUri {
        tls,
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
    /// Connects to the broker if `outbound` allows its address.
    ///
    /// Over plain MQTT, and over TLS to an address literal, rumqttc is given
    /// the checked address itself, so it connects there and nowhere else
    /// (reconnections included). Over TLS to a name, rumqttc must be given
    /// the name, its TLS server name for SNI and the certificate check, and
    /// it resolves the name again itself: the name is checked just before
    /// each connection, which leaves a short window in which a DNS answer
    /// that changes (rebinding) could send the connection elsewhere.
    pub async fn connect(
        uri: &str,
        notifier_info: &[(String, String)],
        tls: &Arc<rustls::ClientConfig>,
        outbound: &OutboundPolicy,
    ) -> Result<Self, String> {
        let parts = parse_uri(uri)?;
        let qos = qos(notifier_info)?;
        let refused = |e| format!("notification endpoint {e}");
        let addrs = outbound
            .resolve_checked(&parts.host, parts.port)
            .await
            .map_err(refused)?;
        let literal = parts
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok();
        let (broker, recheck) = match addrs.first() {
            Some(addr) if !parts.tls || literal => {
                let ip = match addr.ip() {
                    IpAddr::V4(ip) => ip.to_string(),
                    IpAddr::V6(ip) => format!("[{ip}]"),
                };
                (ip, None)
            }
            _ => (
                parts.host.clone(),
                Some((outbound.clone(), parts.host, parts.port)),
            ),
        };
        let client_id = format!("borough-{:x}", borough_core::validate::now_micros());
        let mut opts = MqttOptions::new(client_id, broker, parts.port);
        opts.set_keep_alive(Duration::from_secs(30));
        if let Some((u, p)) = parts.user {
            opts.set_credentials(u, p);
        }
        if parts.tls {
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
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
                        // rumqttc will resolve the name again: check it first.
                        if let Some((policy, host, port)) = &recheck
                            && let Err(e) = policy.resolve_checked(host, *port).await
                        {
                            let _ = tx.try_send(Err(refused(e)));
                            return;
                        }
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
                tls: false,
                host: "127.0.0.1".into(),
                port: 1883,
                user: None,
                topic: "city/notify".into()
            }
        );
        assert_eq!(
            parse_uri("mqtt://u:p@broker/t").unwrap(),
            MqttUri {
                tls: false,
                host: "broker".into(),
                port: 1883,
                user: Some(("u".into(), "p".into())),
                topic: "t".into()
            }
        );
        assert_eq!(parse_uri("mqtts://broker/t").unwrap().port, 8883);
        assert!(parse_uri("mqtts://broker/t").unwrap().tls);
        assert!(tls_config(Some(b"not pem")).is_err());
        assert!(tls_config(None).is_ok());
        assert!(parse_uri("mqtt://broker").is_err());
        assert!(parse_uri("mqtt://broker:x/t").is_err());
        assert!(qos(&[("MQTT-QoS".into(), "1".into())]).is_ok_and(|q| q == QoS::AtLeastOnce));
        assert!(qos(&[("MQTT-QoS".into(), "3".into())]).is_err());
    }

    #[tokio::test]
    async fn brokers_at_refused_addresses_are_not_connected() {
        let tls = tls_config(None).unwrap();
        let public_only = OutboundPolicy::default();
        for uri in [
            "mqtt://127.0.0.1:1883/t",
            "mqtt://localhost/t",
            "mqtts://169.254.169.254/t",
            "mqtt://[::1]:1883/t",
            "mqtts://10.0.0.5/t",
        ] {
            let Err(e) = MqttEndpoint::connect(uri, &[], &tls, &public_only).await else {
                panic!("{uri} must be refused");
            };
            assert!(e.starts_with("notification endpoint "), "{uri}: {e}");
            assert!(e.contains("--allow-outbound"), "{uri}: {e}");
        }
        // Allowed: the connection is made in the background, not here.
        let loopback = OutboundPolicy::loopback();
        assert!(
            MqttEndpoint::connect("mqtt://localhost:1/t", &[], &tls, &loopback)
                .await
                .is_ok()
        );
    }
}
