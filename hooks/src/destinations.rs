//! Where webhooks may be delivered. Outside development mode, a destination that resolves to a
//! loopback, private, link-local, unique-local, carrier-grade NAT, multicast or unspecified address
//! (the cloud metadata endpoints among them) is refused unless the operator allows its network
//! (`EVENTBUS_WEBHOOK_ALLOW_NETWORKS`): a service that may register webhooks must not be able to
//! make the bus reach what only the bus can reach.
//!
//! The check sits in the HTTP client's resolver, so the addresses checked are the addresses
//! connected to (no second lookup a DNS server could answer differently); literal IPs in URLs,
//! which never reach a resolver, are checked before each request.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// Development mode: every destination allowed.
    pub open: bool,
    /// Networks allowed although internal.
    pub allow: Vec<IpNet>,
}

/// Internal networks, refused by default.
fn internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                // 100.64.0.0/10: carrier-grade NAT, and Alibaba's metadata at 100.100.100.200.
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                // 192.0.0.0/24: IETF protocol assignments (NAT64 discovery and the like).
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local, AWS metadata fd00:ec2::254 among them
                || (first & 0xffc0) == 0xfe80 // link local
                // 64:ff9b::/96 NAT64 of an internal v4 address.
                || (first == 0x64 && v6.segments()[1] == 0xff9b && {
                    let s = v6.segments();
                    internal(IpAddr::V4(std::net::Ipv4Addr::new(
                        (s[6] >> 8) as u8,
                        s[6] as u8,
                        (s[7] >> 8) as u8,
                        s[7] as u8,
                    )))
                })
        }
    }
}

impl Guard {
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.open || !internal(ip) || self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Checks a URL's host: a literal IP at once; a name by resolving it. `Err` says why not.
    pub async fn check_url(&self, url: &str) -> Result<(), String> {
        let url = reqwest::Url::parse(url).map_err(|err| format!("not a URL: {err}"))?;
        if self.open {
            return Ok(());
        }
        let port = url.port_or_known_default().unwrap_or(443);
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => self.resolve(name, port).await.map(|_| ()),
            None => Err("the URL has no host".into()),
        }
    }

    /// Checks a URL whose host is a literal address (names are checked by [`Resolver`]).
    pub fn check_literal(&self, url: &str) -> Result<(), String> {
        let url = reqwest::Url::parse(url).map_err(|err| format!("not a URL: {err}"))?;
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip)),
            _ => Ok(()),
        }
    }

    fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        if self.allows(ip) {
            Ok(())
        } else {
            Err(format!(
                "{ip} is an internal address; webhooks go to public addresses (or to networks in EVENTBUS_WEBHOOK_ALLOW_NETWORKS)"
            ))
        }
    }

    /// The allowed addresses of `name`; `Err` when it has none.
    async fn resolve(&self, name: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let found: Vec<SocketAddr> = tokio::net::lookup_host((name, port))
            .await
            .map_err(|err| format!("cannot resolve {name}: {err}"))?
            .collect();
        let allowed: Vec<SocketAddr> = found
            .iter()
            .copied()
            .filter(|a| self.allows(a.ip()))
            .collect();
        if allowed.is_empty() {
            return Err(format!(
                "{name} resolves only to internal addresses; webhooks go to public addresses (or to networks in EVENTBUS_WEBHOOK_ALLOW_NETWORKS)"
            ));
        }
        Ok(allowed)
    }
}

/// The HTTP client's resolver: names resolve to their allowed addresses only.
pub struct Resolver(pub Arc<Guard>);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let addrs = guard
                .resolve(name.as_str(), 0)
                .await
                .map_err(|err| -> Box<dyn std::error::Error + Send + Sync> { err.into() })?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        let guard = Guard::default();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "224.0.0.1",
        ] {
            assert!(!guard.allows(ip.parse().unwrap()), "{ip} allowed");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1::1", "64:ff9b::5db8:d822"] {
            assert!(guard.allows(ip.parse().unwrap()), "{ip} refused");
        }
        let allowing = Guard {
            open: false,
            allow: vec!["127.0.0.0/8".parse().unwrap()],
        };
        assert!(allowing.allows("127.0.0.1".parse().unwrap()));
        assert!(!allowing.allows("10.0.0.1".parse().unwrap()));
        assert!(
            Guard {
                open: true,
                allow: vec![]
            }
            .allows("10.0.0.1".parse().unwrap())
        );
    }
}
