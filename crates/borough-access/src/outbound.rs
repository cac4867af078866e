//! Which addresses Borough may connect to on a client's behalf.
//!
//! Clients name addresses that the server then connects to: remote
//! `@context` documents and notification endpoints. Left open, that lets any
//! client make the server probe its own network (SSRF): services on loopback,
//! private ranges, the cloud metadata service at 169.254.169.254. An
//! [`OutboundPolicy`] refuses every address that is not public unless the
//! operator allows it (`--allow-outbound`). It judges the addresses actually
//! connected to, after DNS, so a name that resolves, or later re-resolves, to
//! an internal address is refused as well.
//!
//! Allowlist entries: a CIDR (`10.1.0.0/16`, `::1/128`; a bare address is a
//! single host), a host name (exact, case-insensitive: everything it resolves
//! to is allowed), `loopback` (127.0.0.0/8, ::1) or `private` (RFC 1918 and
//! fc00::/7). `0.0.0.0/0, ::/0` allows everything.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// How long resolving one name may take; DNS is not always quick to fail.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The kinds of non-public address, as an operator would name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    Loopback,
    /// RFC 1918, fc00::/7 (and the deprecated site-local fec0::/10).
    Private,
    /// 169.254/16 (where cloud metadata services live), fe80::/10.
    LinkLocal,
    /// 0.0.0.0/8 and `::`: on Linux, a connection to them reaches the host itself.
    Unspecified,
    /// 100.64.0.0/10, the carrier-grade NAT space.
    Shared,
    Multicast,
    Broadcast,
    Documentation,
    Benchmarking,
    /// Anything else not globally routable.
    Reserved,
}

impl Range {
    fn describe(self) -> &'static str {
        match self {
            Self::Loopback => "the loopback range",
            Self::Private => "a private range",
            Self::LinkLocal => "the link-local range",
            Self::Unspecified => "the unspecified (this-host) range",
            Self::Shared => "the shared address space (carrier-grade NAT)",
            Self::Multicast => "a multicast range",
            Self::Broadcast => "the broadcast address",
            Self::Documentation => "a documentation range",
            Self::Benchmarking => "the benchmarking range",
            Self::Reserved => "a reserved range",
        }
    }
}

/// An address range: a network address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Whether `a` and `b` agree on their first `prefix` of `bits` bits.
fn same_prefix(a: u128, b: u128, prefix: u8, bits: u8) -> bool {
    // A shift by the full width (prefix 0) matches everything.
    (a ^ b).checked_shr(u32::from(bits - prefix)).unwrap_or(0) == 0
}

impl Cidr {
    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Self {
        Self {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    const fn v6(addr: Ipv6Addr, prefix: u8) -> Self {
        Self {
            addr: IpAddr::V6(addr),
            prefix,
        }
    }

    /// The range of exactly one address.
    fn host(ip: IpAddr) -> Self {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        Self { addr: ip, prefix }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                same_prefix(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `addr/prefix`, or a bare address for that one host. Host bits must be
    /// zero: `10.1.2.3/16` is more likely a typo than a wish for 10.1.0.0/16.
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an IP address"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= bits => n,
                _ => return Err(format!("the prefix length must be 0 to {bits}, not '{p}'")),
            },
        };
        let value = match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        // Prefix 0 of IPv6 leaves all 128 bits to the host.
        let host_mask = 1u128
            .checked_shl(u32::from(bits - prefix))
            .map_or(u128::MAX, |m| m - 1);
        if value & host_mask != 0 {
            let net = value & !host_mask;
            let net = match addr {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(net as u32)),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(net)),
            };
            return Err(format!(
                "{s} has host bits set; the network is {net}/{prefix}"
            ));
        }
        Ok(Self { addr, prefix })
    }
}

/// Special-purpose IPv4 ranges (RFC 6890 and its updates). The broadcast
/// address comes before 240/4, which holds it.
const V4_RANGES: &[(Cidr, Range)] = &[
    (Cidr::v4(0, 0, 0, 0, 8), Range::Unspecified),
    (Cidr::v4(10, 0, 0, 0, 8), Range::Private),
    (Cidr::v4(100, 64, 0, 0, 10), Range::Shared),
    (Cidr::v4(127, 0, 0, 0, 8), Range::Loopback),
    (Cidr::v4(169, 254, 0, 0, 16), Range::LinkLocal),
    (Cidr::v4(172, 16, 0, 0, 12), Range::Private),
    (Cidr::v4(192, 0, 0, 0, 24), Range::Reserved),
    (Cidr::v4(192, 0, 2, 0, 24), Range::Documentation),
    (Cidr::v4(192, 88, 99, 0, 24), Range::Reserved),
    (Cidr::v4(192, 168, 0, 0, 16), Range::Private),
    (Cidr::v4(198, 18, 0, 0, 15), Range::Benchmarking),
    (Cidr::v4(198, 51, 100, 0, 24), Range::Documentation),
    (Cidr::v4(203, 0, 113, 0, 24), Range::Documentation),
    (Cidr::v4(224, 0, 0, 0, 4), Range::Multicast),
    (Cidr::v4(255, 255, 255, 255, 32), Range::Broadcast),
    (Cidr::v4(240, 0, 0, 0, 4), Range::Reserved),
];

const fn v6(a: u16, b: u16, c: u16) -> Ipv6Addr {
    Ipv6Addr::new(a, b, c, 0, 0, 0, 0, 0)
}

/// Special-purpose IPv6 ranges. Whatever lies outside 2000::/3 (global
/// unicast) and is not listed here is reserved too.
const V6_RANGES: &[(Cidr, Range)] = &[
    (Cidr::v6(Ipv6Addr::UNSPECIFIED, 128), Range::Unspecified),
    (Cidr::v6(Ipv6Addr::LOCALHOST, 128), Range::Loopback),
    (Cidr::v6(v6(0x64, 0xff9b, 1), 48), Range::Private),
    (Cidr::v6(v6(0x2001, 0, 0), 32), Range::Reserved),
    (Cidr::v6(v6(0x2001, 2, 0), 48), Range::Benchmarking),
    (Cidr::v6(v6(0x2001, 0x10, 0), 28), Range::Reserved),
    (Cidr::v6(v6(0x2001, 0x20, 0), 28), Range::Reserved),
    (Cidr::v6(v6(0x2001, 0xdb8, 0), 32), Range::Documentation),
    (Cidr::v6(v6(0x3fff, 0, 0), 20), Range::Documentation),
    (Cidr::v6(v6(0xfc00, 0, 0), 7), Range::Private),
    (Cidr::v6(v6(0xfe80, 0, 0), 10), Range::LinkLocal),
    (Cidr::v6(v6(0xfec0, 0, 0), 10), Range::Private),
    (Cidr::v6(v6(0xff00, 0, 0), 8), Range::Multicast),
];

const GLOBAL_UNICAST: Cidr = Cidr::v6(v6(0x2000, 0, 0), 3);
const NAT64: Cidr = Cidr::v6(v6(0x64, 0xff9b, 0), 96);
const SIX_TO_FOUR: Cidr = Cidr::v6(v6(0x2002, 0, 0), 16);

/// The IPv4 address an IPv6 address carries to a gateway that forwards to it
/// (NAT64, 6to4): such an address reaches what the IPv4 address reaches.
fn tunnelled_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let v = u128::from(ip);
    if NAT64.contains(IpAddr::V6(ip)) {
        Some(Ipv4Addr::from(v as u32))
    } else if SIX_TO_FOUR.contains(IpAddr::V6(ip)) {
        Some(Ipv4Addr::from((v >> 80) as u32))
    } else {
        None
    }
}

/// The non-public range `ip` is in, and that range; `None` for a public address.
fn classify(ip: IpAddr) -> Option<(Range, Cidr)> {
    let v6 = match ip.to_canonical() {
        // IPv4-mapped addresses (::ffff:a.b.c.d) are the IPv4 address.
        IpAddr::V4(v4) => {
            return V4_RANGES
                .iter()
                .find(|(net, _)| net.contains(IpAddr::V4(v4)))
                .map(|(net, range)| (*range, *net));
        }
        IpAddr::V6(v6) => v6,
    };
    if let Some(v4) = tunnelled_v4(v6) {
        return classify(IpAddr::V4(v4)).map(|(range, _)| (range, Cidr::host(ip)));
    }
    if let Some((net, range)) = V6_RANGES.iter().find(|(net, _)| net.contains(ip)) {
        return Some((*range, *net));
    }
    (!GLOBAL_UNICAST.contains(ip)).then(|| (Range::Reserved, Cidr::host(ip)))
}

/// Why Borough will not connect somewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboundError {
    /// The address is in a range the policy refuses.
    Refused {
        /// The name or address the client gave.
        host: String,
        ip: IpAddr,
        range: Range,
        /// An allowlist entry that would allow it.
        hint: String,
    },
    /// The name does not resolve (now).
    Unresolved { host: String, reason: String },
    /// The URL has no usable scheme or host.
    BadUrl { url: String, reason: String },
    /// An allowlist entry is none of the accepted forms.
    BadEntry { entry: String, reason: String },
}

impl OutboundError {
    /// Whether the policy refused the address (not a DNS or syntax failure).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }

    /// The refusal somewhere in an error's chain of causes, as reqwest
    /// reports a refusal by the resolver or the redirect policy.
    pub fn find<'a>(mut err: &'a (dyn std::error::Error + 'static)) -> Option<&'a OutboundError> {
        loop {
            if let Some(found) = err.downcast_ref::<OutboundError>() {
                return Some(found);
            }
            err = err.source()?;
        }
    }
}

impl fmt::Display for OutboundError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused {
                host,
                ip,
                range,
                hint,
            } => {
                if bare_host(host).parse::<IpAddr>().is_ok() {
                    write!(f, "{ip}")?;
                } else {
                    write!(f, "{host} ({ip})")?;
                }
                write!(
                    f,
                    " is in {}; the operator can allow it with --allow-outbound {hint}",
                    range.describe()
                )
            }
            Self::Unresolved { host, reason } => write!(f, "cannot resolve {host}: {reason}"),
            Self::BadUrl { url, reason } => write!(f, "'{url}' cannot be used: {reason}"),
            Self::BadEntry { entry, reason } => {
                write!(f, "outbound allowlist entry '{entry}': {reason}")
            }
        }
    }
}

impl std::error::Error for OutboundError {}

/// A host as written in a URL, without IPv6 brackets or a final dot.
fn bare_host(host: &str) -> &str {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.strip_suffix('.').unwrap_or(host)
}

/// Whether `s` is a DNS host name. A name whose last label is all digits
/// would be read as an IPv4 address by URL parsers, so it is not one.
fn is_host_name(s: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    s.len() <= 253
        && s.split('.').all(label_ok)
        && !s
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

#[derive(Debug, Default)]
struct Allowlist {
    loopback: bool,
    private: bool,
    nets: Vec<Cidr>,
    /// Lower case, without a final dot.
    hosts: Vec<String>,
}

/// The addresses Borough may connect to for clients. The default allows
/// public addresses only. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct OutboundPolicy {
    allow: Arc<Allowlist>,
}

impl FromStr for OutboundPolicy {
    type Err = OutboundError;

    /// A comma-separated allowlist; empty allows public addresses only.
    fn from_str(list: &str) -> Result<Self, OutboundError> {
        Self::from_entries(list.split(','))
    }
}

impl OutboundPolicy {
    /// Public addresses and loopback: for a server and its clients on one machine.
    pub fn loopback() -> Self {
        Self {
            allow: Arc::new(Allowlist {
                loopback: true,
                ..Allowlist::default()
            }),
        }
    }

    /// A policy from allowlist entries (blank ones are skipped).
    pub fn from_entries<S: AsRef<str>>(
        entries: impl IntoIterator<Item = S>,
    ) -> Result<Self, OutboundError> {
        let mut allow = Allowlist::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            let bad = |reason: String| OutboundError::BadEntry {
                entry: entry.to_string(),
                reason,
            };
            if entry.is_empty() {
                continue;
            }
            if entry.eq_ignore_ascii_case("loopback") {
                allow.loopback = true;
            } else if entry.eq_ignore_ascii_case("private") {
                allow.private = true;
            } else if entry.contains('/') || entry.parse::<IpAddr>().is_ok() {
                allow.nets.push(entry.parse().map_err(bad)?);
            } else {
                let name = bare_host(entry).to_ascii_lowercase();
                if !is_host_name(&name) {
                    return Err(bad(
                        "not a CIDR (10.1.0.0/16), a host name, 'loopback' or 'private'".into(),
                    ));
                }
                allow.hosts.push(name);
            }
        }
        Ok(Self {
            allow: Arc::new(allow),
        })
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = bare_host(host);
        self.allow
            .hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
    }

    /// Whether Borough may connect to `ip`, which `host` (the name or
    /// address the client gave) stands for.
    pub fn check_ip(&self, ip: IpAddr, host: &str) -> Result<(), OutboundError> {
        if self.allows_host(host) {
            return Ok(());
        }
        let canonical = ip.to_canonical();
        if self
            .allow
            .nets
            .iter()
            .any(|n| n.contains(ip) || n.contains(canonical))
        {
            return Ok(());
        }
        let Some((range, net)) = classify(ip) else {
            return Ok(());
        };
        match range {
            Range::Loopback if self.allow.loopback => return Ok(()),
            Range::Private if self.allow.private => return Ok(()),
            _ => {}
        }
        // The narrowest entry that would do: a whole range only where that
        // is the usual wish.
        let name = bare_host(host);
        let hint = match range {
            Range::Loopback => "loopback".to_string(),
            _ if name.parse::<IpAddr>().is_err() => name.to_ascii_lowercase(),
            Range::Private => net.to_string(),
            _ => Cidr::host(canonical).to_string(),
        };
        Err(OutboundError::Refused {
            host: host.to_string(),
            ip,
            range,
            hint,
        })
    }

    /// The allowed ones of the addresses `host` resolved to; the first
    /// refusal if there are none.
    fn keep_allowed(
        &self,
        host: &str,
        addrs: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<Vec<SocketAddr>, OutboundError> {
        let mut allowed = Vec::new();
        let mut refused = None;
        for addr in addrs {
            match self.check_ip(addr.ip(), host) {
                Ok(()) => allowed.push(addr),
                Err(e) => {
                    tracing::debug!(%host, %addr, "outbound address refused");
                    refused.get_or_insert(e);
                }
            }
        }
        if allowed.is_empty() {
            return Err(refused.unwrap_or_else(|| OutboundError::Unresolved {
                host: host.to_string(),
                reason: "no address".into(),
            }));
        }
        Ok(allowed)
    }

    /// Resolves `host` (a name or an address) and returns the addresses
    /// Borough may connect to: a client other than reqwest must connect to
    /// these and no others, or DNS could answer differently the second time.
    pub async fn resolve_checked(
        &self,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, OutboundError> {
        let name = bare_host(host);
        if let Ok(ip) = name.parse::<IpAddr>() {
            self.check_ip(ip, host)?;
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let unresolved = |reason: String| OutboundError::Unresolved {
            host: host.to_string(),
            reason,
        };
        let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port)))
            .await
            .map_err(|_| unresolved(format!("no answer within {RESOLVE_TIMEOUT:?}")))?
            .map_err(|e| unresolved(e.to_string()))?;
        self.keep_allowed(host, found)
    }

    /// Checks a URL whose host is an address (reqwest connects to those
    /// without asking the resolver); names are left to the resolver.
    pub fn check_url_literal(&self, url: &str) -> Result<(), OutboundError> {
        self.check_parsed_literal(&parse_url(url)?)
    }

    fn check_parsed_literal(&self, url: &reqwest::Url) -> Result<(), OutboundError> {
        let Some(host) = url.host_str() else {
            return Err(OutboundError::BadUrl {
                url: url.to_string(),
                reason: "no host".into(),
            });
        };
        // http(s) hosts come normalized (`0x7f.1` reads 127.0.0.1); mqtt://
        // ones as written, and those the system resolver reads later.
        match bare_host(host).parse::<IpAddr>() {
            Ok(ip) => self.check_ip(ip, host),
            Err(_) => Ok(()),
        }
    }

    /// Checks an `http`, `https`, `mqtt` or `mqtts` URL: its address, or
    /// what its name resolves to now (some address must be allowed).
    pub async fn check_url(&self, url: &str) -> Result<(), OutboundError> {
        let parsed = parse_url(url)?;
        let default_port = match parsed.scheme() {
            "http" => 80,
            "https" => 443,
            "mqtt" => 1883,
            "mqtts" => 8883,
            other => {
                return Err(OutboundError::BadUrl {
                    url: url.to_string(),
                    reason: format!("the scheme '{other}' is not supported"),
                });
            }
        };
        self.check_parsed_literal(&parsed)?;
        let host = parsed.host_str().unwrap_or_default();
        if bare_host(host).parse::<IpAddr>().is_ok() || self.allows_host(host) {
            return Ok(());
        }
        self.resolve_checked(host, parsed.port().unwrap_or(default_port))
            .await
            .map(|_| ())
    }

    /// A reqwest resolver that drops the addresses this policy refuses.
    pub fn resolver(&self) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver {
            policy: self.clone(),
        })
    }

    /// Follows up to `max` redirects, refusing those to a refused address
    /// (a name in a redirect goes through the resolver like any other).
    pub fn redirect_policy(&self, max: usize) -> reqwest::redirect::Policy {
        let policy = self.clone();
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max {
                return attempt.error(format!("more than {max} redirects"));
            }
            match policy.check_parsed_literal(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e),
            }
        })
    }

    /// Applies the policy to a reqwest client: its resolver, its redirects,
    /// and no proxy (a proxy would connect to addresses the policy never
    /// sees). Requests to address literals still need
    /// [`check_url_literal`](Self::check_url_literal) before they are sent.
    pub fn guard(
        &self,
        builder: reqwest::ClientBuilder,
        max_redirects: usize,
    ) -> reqwest::ClientBuilder {
        builder
            .no_proxy()
            .dns_resolver(self.resolver())
            .redirect(self.redirect_policy(max_redirects))
    }
}

fn parse_url(url: &str) -> Result<reqwest::Url, OutboundError> {
    reqwest::Url::parse(url).map_err(|e| OutboundError::BadUrl {
        url: url.to_string(),
        reason: e.to_string(),
    })
}

/// Resolves with the system resolver and keeps only the addresses the
/// policy allows, so that what reqwest connects to is what was checked.
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    policy: OutboundPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            // reqwest sets the port itself.
            let addrs = policy.resolve_checked(&host, 0).await?;
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(list: &str) -> OutboundPolicy {
        list.parse().unwrap()
    }

    fn refused_range(p: &OutboundPolicy, addr: &str) -> Option<Range> {
        match p.check_ip(ip(addr), addr) {
            Ok(()) => None,
            Err(OutboundError::Refused { range, .. }) => Some(range),
            Err(e) => panic!("{addr}: {e}"),
        }
    }

    #[test]
    fn every_special_range_is_refused_by_default() {
        let p = OutboundPolicy::default();
        let cases = [
            ("0.0.0.0", Range::Unspecified),
            ("0.1.2.3", Range::Unspecified),
            ("10.0.0.5", Range::Private),
            ("10.255.255.255", Range::Private),
            ("100.64.0.1", Range::Shared),
            ("100.127.255.254", Range::Shared),
            ("127.0.0.1", Range::Loopback),
            ("127.8.9.10", Range::Loopback),
            ("169.254.169.254", Range::LinkLocal),
            ("172.16.0.1", Range::Private),
            ("172.31.255.255", Range::Private),
            ("192.0.0.170", Range::Reserved),
            ("192.0.2.1", Range::Documentation),
            ("192.88.99.1", Range::Reserved),
            ("192.168.1.1", Range::Private),
            ("198.18.0.1", Range::Benchmarking),
            ("198.19.255.255", Range::Benchmarking),
            ("198.51.100.7", Range::Documentation),
            ("203.0.113.9", Range::Documentation),
            ("224.0.0.1", Range::Multicast),
            ("239.255.255.250", Range::Multicast),
            ("240.0.0.1", Range::Reserved),
            ("255.255.255.255", Range::Broadcast),
            ("::", Range::Unspecified),
            ("::1", Range::Loopback),
            ("fc00::1", Range::Private),
            ("fd12:3456::1", Range::Private),
            ("fec0::1", Range::Private),
            ("fe80::1", Range::LinkLocal),
            ("febf::1", Range::LinkLocal),
            ("ff02::1", Range::Multicast),
            ("2001:db8::1", Range::Documentation),
            ("3fff::1", Range::Documentation),
            ("2001:2::1", Range::Benchmarking),
            ("2001::1", Range::Reserved),
            ("64:ff9b:1::1", Range::Private),
            ("100::1", Range::Reserved),
            ("::2", Range::Reserved),
            ("::127.0.0.1", Range::Reserved),
            ("::ffff:0:7f00:1", Range::Reserved),
            ("4000::1", Range::Reserved),
        ];
        for (addr, range) in cases {
            assert_eq!(refused_range(&p, addr), Some(range), "{addr}");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        let p = OutboundPolicy::default();
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "2a00:1450::1",
        ] {
            assert_eq!(refused_range(&p, addr), None, "{addr}");
        }
    }

    #[test]
    fn addresses_that_carry_ipv4_are_judged_by_it() {
        let p = OutboundPolicy::default();
        // IPv4-mapped.
        assert_eq!(refused_range(&p, "::ffff:127.0.0.1"), Some(Range::Loopback));
        assert_eq!(
            refused_range(&p, "::ffff:169.254.169.254"),
            Some(Range::LinkLocal)
        );
        assert_eq!(refused_range(&p, "::ffff:10.0.0.5"), Some(Range::Private));
        assert_eq!(refused_range(&p, "::ffff:8.8.8.8"), None);
        // NAT64 and 6to4 forward to the address they carry.
        assert_eq!(refused_range(&p, "64:ff9b::a00:5"), Some(Range::Private));
        assert_eq!(
            refused_range(&p, "64:ff9b::a9fe:a9fe"),
            Some(Range::LinkLocal)
        );
        assert_eq!(refused_range(&p, "64:ff9b::808:808"), None);
        assert_eq!(refused_range(&p, "2002:7f00:1::1"), Some(Range::Loopback));
        assert_eq!(refused_range(&p, "2002:808:808::1"), None);
        // Allowing the IPv4 address allows its mapped form, and `loopback` covers it.
        assert_eq!(
            refused_range(&policy("10.0.0.0/8"), "::ffff:10.0.0.5"),
            None
        );
        assert_eq!(refused_range(&policy("loopback"), "::ffff:127.0.0.1"), None);
    }

    #[test]
    fn the_words_allow_their_ranges_only() {
        let lo = policy("loopback");
        for addr in ["127.0.0.1", "127.1.2.3", "::1"] {
            assert_eq!(refused_range(&lo, addr), None, "{addr}");
        }
        assert_eq!(refused_range(&lo, "10.0.0.1"), Some(Range::Private));
        assert_eq!(refused_range(&lo, "0.0.0.0"), Some(Range::Unspecified));

        let private = policy(" Private ");
        for addr in ["10.0.0.1", "172.20.0.1", "192.168.0.1", "fd00::1"] {
            assert_eq!(refused_range(&private, addr), None, "{addr}");
        }
        assert_eq!(
            refused_range(&private, "169.254.169.254"),
            Some(Range::LinkLocal)
        );
        assert_eq!(refused_range(&private, "100.64.0.1"), Some(Range::Shared));
        assert_eq!(refused_range(&private, "127.0.0.1"), Some(Range::Loopback));
        assert_eq!(refused_range(&OutboundPolicy::loopback(), "::1"), None);
    }

    #[test]
    fn cidr_entries_allow_exactly_their_range() {
        let p = policy("10.1.0.0/16, 127.0.0.1/32,::1/128 ,fd00:1::/32,169.254.169.254");
        for addr in [
            "10.1.0.0",
            "10.1.255.255",
            "127.0.0.1",
            "::1",
            "fd00:1::5",
            "169.254.169.254",
        ] {
            assert_eq!(refused_range(&p, addr), None, "{addr}");
        }
        for addr in [
            "10.0.255.255",
            "10.2.0.0",
            "127.0.0.2",
            "fd00:2::1",
            "169.254.0.1",
        ] {
            assert!(refused_range(&p, addr).is_some(), "{addr}");
        }
        let all = policy("0.0.0.0/0,::/0");
        for addr in ["127.0.0.1", "169.254.169.254", "::1", "fe80::1"] {
            assert_eq!(refused_range(&all, addr), None, "{addr}");
        }
        assert_eq!(
            "192.168.4.0/22".parse::<Cidr>().unwrap().to_string(),
            "192.168.4.0/22"
        );
    }

    #[test]
    fn bad_entries_are_refused_with_the_reason() {
        for (entry, reason) in [
            ("10.0.0.0/33", "prefix length must be 0 to 32"),
            ("::/129", "prefix length must be 0 to 128"),
            ("10.0.0.0/", "prefix length"),
            ("10.0.0.0/x", "prefix length"),
            ("10.0.0.0/-1", "prefix length"),
            ("10.0.0/8", "not an IP address"),
            ("/8", "not an IP address"),
            ("10.1.2.3/16", "the network is 10.1.0.0/16"),
            ("fd00::1/8", "the network is fd00::/8"),
            ("bad host!", "not a CIDR"),
            ("-x.example", "not a CIDR"),
            ("a..example", "not a CIDR"),
            ("1.2.3", "not a CIDR"),
            ("http://x.example", "not an IP address"),
        ] {
            let err = entry.parse::<OutboundPolicy>().unwrap_err();
            assert!(
                matches!(&err, OutboundError::BadEntry { entry: e, .. } if e == entry),
                "{entry}: {err:?}"
            );
            assert!(err.to_string().contains(reason), "{entry}: {err}");
        }
        assert!("".parse::<OutboundPolicy>().is_ok());
        assert!(" , ".parse::<OutboundPolicy>().is_ok());
    }

    #[test]
    fn host_entries_match_the_exact_name_in_any_case() {
        let p = policy("Broker.City.Example.,relay_1.example");
        for host in [
            "broker.city.example",
            "BROKER.city.example",
            "broker.city.example.",
            "relay_1.example",
        ] {
            assert!(p.check_ip(ip("10.0.0.5"), host).is_ok(), "{host}");
        }
        for host in ["sub.broker.city.example", "city.example", "10.0.0.5"] {
            assert!(p.check_ip(ip("10.0.0.5"), host).is_err(), "{host}");
        }
    }

    #[test]
    fn refusals_say_how_to_allow_them() {
        let p = OutboundPolicy::default();
        let msg = |addr: &str, host: &str| p.check_ip(ip(addr), host).unwrap_err().to_string();
        assert_eq!(
            format!("notification endpoint {}", msg("10.0.0.5", "10.0.0.5")),
            "notification endpoint 10.0.0.5 is in a private range; \
             the operator can allow it with --allow-outbound 10.0.0.0/8"
        );
        assert_eq!(
            msg("127.0.0.1", "localhost"),
            "localhost (127.0.0.1) is in the loopback range; \
             the operator can allow it with --allow-outbound loopback"
        );
        assert!(msg("169.254.169.254", "169.254.169.254").ends_with(
            "link-local range; the operator can allow it with --allow-outbound 169.254.169.254/32"
        ));
        assert!(msg("fd00::1", "[fd00::1]").ends_with("--allow-outbound fc00::/7"));
        assert!(msg("::ffff:100.64.0.1", "[::ffff:100.64.0.1]").ends_with("100.64.0.1/32"));
        assert!(msg("10.9.9.9", "Db.Internal").ends_with("--allow-outbound db.internal"));
        // Each hint, given back as an entry, allows what was refused.
        for (addr, host) in [
            ("10.0.0.5", "10.0.0.5"),
            ("169.254.169.254", "169.254.169.254"),
            ("::ffff:100.64.0.1", "[::ffff:100.64.0.1]"),
            ("64:ff9b::a00:5", "[64:ff9b::a00:5]"),
            ("10.9.9.9", "db.internal"),
            ("::1", "[::1]"),
        ] {
            let Err(OutboundError::Refused { hint, .. }) = p.check_ip(ip(addr), host) else {
                panic!("{addr} must be refused");
            };
            assert!(policy(&hint).check_ip(ip(addr), host).is_ok(), "{hint}");
        }
    }

    #[test]
    fn url_literals_are_checked_as_reqwest_reads_them() {
        let p = OutboundPolicy::default();
        for url in [
            "http://127.0.0.1:8080/x",
            // WHATWG URL parsing reads these as 127.0.0.1, and so does reqwest.
            "http://2130706433/",
            "http://0x7f.1/",
            "http://127.1/",
            "https://[::1]/ctx.jsonld",
            "http://[::ffff:169.254.169.254]/latest/meta-data",
            "http://169.254.169.254/",
            "http://10.0.0.1/x",
            "mqtt://10.0.0.5/topic",
            "mqtts://user:pw@[fe80::1]:8883/t",
        ] {
            let err = p.check_url_literal(url).unwrap_err();
            assert!(err.is_refusal(), "{url}: {err}");
        }
        for url in [
            "http://8.8.8.8/",
            "https://example.org/x",
            "mqtt://broker/t",
        ] {
            assert!(p.check_url_literal(url).is_ok(), "{url}");
        }
        assert!(matches!(
            p.check_url_literal("not a url"),
            Err(OutboundError::BadUrl { .. })
        ));
    }

    #[tokio::test]
    async fn urls_are_checked_after_resolving_their_names() {
        let p = OutboundPolicy::default();
        let err = p.check_url("http://localhost:9/notify").await.unwrap_err();
        assert!(err.is_refusal(), "{err}");
        assert!(err.to_string().contains("localhost ("), "{err}");
        assert!(
            p.check_url("mqtt://localhost/t")
                .await
                .unwrap_err()
                .is_refusal()
        );
        assert!(
            p.check_url("http://10.0.0.1/x")
                .await
                .unwrap_err()
                .is_refusal()
        );
        assert!(matches!(
            p.check_url("ftp://8.8.8.8/x").await,
            Err(OutboundError::BadUrl { .. })
        ));
        // An unresolvable name is not a refusal: delivery checks it again.
        let err = p.check_url("http://nothing.invalid/").await.unwrap_err();
        assert!(matches!(err, OutboundError::Unresolved { .. }), "{err:?}");
        assert!(p.check_url("http://8.8.8.8/x").await.is_ok());
        let lo = OutboundPolicy::loopback();
        assert!(lo.check_url("http://localhost:9/notify").await.is_ok());
        assert!(lo.check_url("mqtts://[::1]/t").await.is_ok());
        // An allowed name is not resolved at all.
        assert!(
            policy("nothing.invalid")
                .check_url("http://nothing.invalid/")
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn resolve_checked_returns_only_allowed_addresses() {
        let p = OutboundPolicy::default();
        assert!(
            p.resolve_checked("localhost", 1883)
                .await
                .unwrap_err()
                .is_refusal()
        );
        assert!(
            p.resolve_checked("[::1]", 1883)
                .await
                .unwrap_err()
                .is_refusal()
        );
        assert_eq!(
            p.resolve_checked("8.8.8.8", 1883).await.unwrap(),
            vec![SocketAddr::new(ip("8.8.8.8"), 1883)]
        );
        let got = OutboundPolicy::loopback()
            .resolve_checked("localhost", 1883)
            .await
            .unwrap();
        assert!(!got.is_empty());
        assert!(got.iter().all(|a| a.ip().is_loopback() && a.port() == 1883));
    }

    #[test]
    fn refused_addresses_are_dropped_from_an_answer() {
        let p = policy("127.0.0.1/32");
        let answer = [
            SocketAddr::new(ip("::1"), 80),
            SocketAddr::new(ip("127.0.0.1"), 80),
            SocketAddr::new(ip("169.254.169.254"), 80),
            SocketAddr::new(ip("93.184.215.14"), 80),
        ];
        assert_eq!(
            p.keep_allowed("rebind.example", answer).unwrap(),
            vec![answer[1], answer[3]]
        );
        // Nothing left: the first refusal says why.
        let err = p
            .keep_allowed("rebind.example", [answer[0], answer[2]])
            .unwrap_err();
        assert!(
            matches!(err, OutboundError::Refused { ip, .. } if ip == answer[0].ip()),
            "{err:?}"
        );
        assert!(matches!(
            p.keep_allowed("empty.example", []),
            Err(OutboundError::Unresolved { .. })
        ));
    }

    /// A one-shot HTTP server on loopback answering 200, or a redirect to `to`.
    async fn http_server(redirect_to: Option<String>) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let head = match &redirect_to {
                    Some(to) => format!("HTTP/1.1 302 Found\r\nlocation: {to}\r\n"),
                    None => "HTTP/1.1 200 OK\r\n".to_string(),
                };
                let _ = s
                    .write_all(
                        format!("{head}content-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
                    )
                    .await;
            }
        });
        port
    }

    fn client(p: &OutboundPolicy) -> reqwest::Client {
        p.guard(reqwest::Client::builder(), 3).build().unwrap()
    }

    #[tokio::test]
    async fn guarded_clients_refuse_names_and_redirects_to_refused_addresses() {
        let port = http_server(None).await;
        let url = format!("http://localhost:{port}/");
        let err = client(&OutboundPolicy::default())
            .get(&url)
            .send()
            .await
            .unwrap_err();
        let refusal = OutboundError::find(&err).expect("the resolver's refusal");
        assert!(refusal.is_refusal(), "{refusal}");
        let ok = client(&OutboundPolicy::loopback()).get(&url).send().await;
        assert_eq!(ok.unwrap().status(), 200);

        // A public-looking start that redirects to an address literal.
        let target = format!("http://127.0.0.1:{port}/");
        let hop = http_server(Some(target)).await;
        let only_hop = policy("localhost");
        let err = client(&only_hop)
            .get(format!("http://localhost:{hop}/"))
            .send()
            .await
            .unwrap_err();
        assert!(
            OutboundError::find(&err).is_some_and(|r| r.is_refusal()),
            "{err:?}"
        );
    }
}
