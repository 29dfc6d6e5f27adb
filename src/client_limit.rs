//! Per-client concurrency limits (nginx `limit_conn`): how many connections one client
//! address may hold open, and how many of its requests may be in flight at once. Off by
//! default, since offices, NAT gateways and load generators share one address.
//!
//! A client is its address, IPv6 grouped by /64 (one household or server network), as
//! for rate limiting. Addresses in `rate_limit.allow` are never limited. Connections
//! count the peer (a trusted proxy's connections are not limited: they carry many
//! clients); requests count the client address resolved through trusted forwarding.
//!
//! Each place is a count in a map that lives only while the client holds places, so
//! memory follows the clients connected now, not every client ever seen.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::IpNet;

/// The bits of an IPv6 address that name one client.
const IPV6_CLIENT_PREFIX: u8 = 64;

/// Counts of places held per client, under one limit.
#[derive(Debug)]
pub struct ClientLimit {
    max: usize,
    exempt: Vec<IpNet>,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// The client already holds every place its limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("per-client limit reached")]
pub struct LimitReached;

/// One place held by a client; given back when dropped.
#[derive(Debug)]
pub struct ClientPlace {
    limit: Arc<ClientLimit>,
    key: IpAddr,
}

impl ClientLimit {
    /// A limit of `max` places per client; `None` when `max` is 0 (off).
    pub fn new(max: usize, exempt: &[IpNet]) -> Option<Arc<ClientLimit>> {
        (max > 0).then(|| {
            Arc::new(ClientLimit {
                max,
                exempt: exempt.to_vec(),
                held: Mutex::new(HashMap::new()),
            })
        })
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Takes a place for `client` (IPv4-mapped addresses already made IPv4); `Ok(None)`
    /// when it is exempt.
    pub fn take(self: &Arc<Self>, client: IpAddr) -> Result<Option<ClientPlace>, LimitReached> {
        if self.exempt.iter().any(|net| net.contains(&client)) {
            return Ok(None);
        }
        let key = client_key(client);
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(key).or_insert(0);
        if *count >= self.max {
            return Err(LimitReached);
        }
        *count += 1;
        Ok(Some(ClientPlace {
            limit: self.clone(),
            key,
        }))
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for ClientPlace {
    fn drop(&mut self) {
        let mut held = self
            .limit
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let mask = u128::MAX << (128 - u32::from(IPV6_CLIENT_PREFIX));
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_client_gets_max_places_and_others_are_counted_apart() {
        let limit = ClientLimit::new(2, &[]).unwrap();
        let first = limit.take(ip("192.0.2.1")).unwrap();
        let second = limit.take(ip("192.0.2.1")).unwrap();
        assert!(limit.take(ip("192.0.2.1")).is_err());
        assert!(limit.take(ip("192.0.2.2")).unwrap().is_some());
        drop(first);
        assert!(limit.take(ip("192.0.2.1")).unwrap().is_some());
        drop(second);
    }

    #[test]
    fn ipv6_clients_are_grouped_by_64() {
        let limit = ClientLimit::new(1, &[]).unwrap();
        let _held = limit.take(ip("2001:db8:1:2::1")).unwrap();
        assert!(limit.take(ip("2001:db8:1:2:ffff::9")).is_err());
        assert!(limit.take(ip("2001:db8:1:3::1")).unwrap().is_some());
    }

    #[test]
    fn allow_listed_clients_are_never_limited_and_memory_follows_holders() {
        let limit = ClientLimit::new(1, &["10.0.0.0/8".parse().unwrap()]).unwrap();
        let places: Vec<_> = (0..5)
            .map(|_| limit.take(ip("10.1.2.3")).unwrap())
            .collect();
        assert!(places.iter().all(Option::is_none));
        let held = limit.take(ip("192.0.2.1")).unwrap();
        assert_eq!(limit.clients(), 1);
        drop(held);
        assert_eq!(limit.clients(), 0);
        assert!(ClientLimit::new(0, &[]).is_none());
    }
}
