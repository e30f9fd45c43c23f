//! The addresses an egress stream may connect to.
//!
//! A host that passed the allowlist still must not reach the host's own
//! services or its networks: every address it resolves to is checked
//! against the refused ranges below, and only an address outside them (or
//! inside an `--egress-allow` CIDR the user gave) is ever connected to.
//! IPv6 forms that carry an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`,
//! IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4
//! `2002:aabb:ccdd::`) are judged as that IPv4 address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a CIDR does not parse.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("{0:?} is not an IP address")]
    Address(String),
    #[error("{0:?}: the prefix length must be a number up to {1}")]
    Prefix(String, u8),
    #[error("{0:?}: bits are set past the prefix length")]
    HostBits(String),
}

/// An address block, `ADDRESS/PREFIX` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The block of `net` with `prefix` bits (must be canonical).
    pub const fn new_v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Self {
        Cidr {
            net: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    const fn new_v6(segments: [u16; 8], prefix: u8) -> Self {
        let [a, b, c, d, e, f, g, h] = segments;
        Cidr {
            net: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    /// Whether `ip` lies in this block (an IPv4 block never holds an IPv6
    /// address, nor the reverse).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask32(self.prefix);
                u32::from(ip) & mask == u32::from(net) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask128(self.prefix);
                u128::from(ip) & mask == u128::from(net) & mask
            }
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix.min(128)))
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = addr
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(addr);
        let net: IpAddr = addr.parse().map_err(|_| CidrError::Address(s.to_owned()))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => return Err(CidrError::Prefix(s.to_owned(), max)),
            },
        };
        let canonical = match net {
            IpAddr::V4(v) => u32::from(v) & !mask32(prefix) == 0,
            IpAddr::V6(v) => u128::from(v) & !mask128(prefix) == 0,
        };
        if !canonical {
            return Err(CidrError::HostBits(s.to_owned()));
        }
        Ok(Cidr { net, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// The refused ranges, with their names for the log.
const REFUSED: &[(Cidr, &str)] = &[
    (Cidr::new_v4(0, 0, 0, 0, 8), "this network (0.0.0.0/8)"),
    (Cidr::new_v4(127, 0, 0, 0, 8), "loopback (127.0.0.0/8)"),
    (Cidr::new_v4(10, 0, 0, 0, 8), "private (10.0.0.0/8)"),
    (Cidr::new_v4(172, 16, 0, 0, 12), "private (172.16.0.0/12)"),
    (Cidr::new_v4(192, 168, 0, 0, 16), "private (192.168.0.0/16)"),
    (
        Cidr::new_v4(169, 254, 0, 0, 16),
        "link-local (169.254.0.0/16)",
    ),
    (
        Cidr::new_v4(100, 64, 0, 0, 10),
        "carrier-grade NAT (100.64.0.0/10)",
    ),
    (Cidr::new_v4(224, 0, 0, 0, 4), "multicast (224.0.0.0/4)"),
    (Cidr::new_v4(240, 0, 0, 0, 4), "reserved (240.0.0.0/4)"),
    (
        Cidr::new_v4(255, 255, 255, 255, 32),
        "broadcast (255.255.255.255)",
    ),
    (Cidr::new_v6([0; 8], 128), "unspecified (::)"),
    (
        Cidr::new_v6([0, 0, 0, 0, 0, 0, 0, 1], 128),
        "loopback (::1)",
    ),
    (
        Cidr::new_v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        "link-local (fe80::/10)",
    ),
    (
        Cidr::new_v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        "unique local (fc00::/7)",
    ),
    (
        Cidr::new_v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
        "multicast (ff00::/8)",
    ),
];

/// The IPv4 address an IPv6 address carries (mapped, compatible, NAT64
/// well-known prefix, 6to4), if any. `::` and `::1` carry none.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..6] == [0; 6] && u32::from(tail) > 1 {
        return Some(tail);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    // 6to4 (2002:AABB:CCDD::/48, RFC 3056): a host with a 6to4 route
    // sends it, encapsulated, to AA.BB.CC.DD.
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// The refused range `ip` lies in, if any (judging an IPv6 address that
/// carries an IPv4 address as that address too).
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    let direct = REFUSED
        .iter()
        .find(|(c, _)| c.contains(ip))
        .map(|(_, n)| *n);
    direct.or_else(|| match ip {
        IpAddr::V6(v6) => embedded_v4(v6).and_then(|v4| refused_range(IpAddr::V4(v4))),
        IpAddr::V4(_) => None,
    })
}

/// The address rule: the refused ranges, less the user's `--egress-allow`
/// blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// `--egress-allow` blocks: addresses in them are allowed even in a
    /// refused range.
    pub allow: Vec<Cidr>,
}

impl AddressPolicy {
    /// `Ok` when a stream may connect to `ip`; `Err` names the refused range.
    pub fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        let Some(range) = refused_range(ip) else {
            return Ok(());
        };
        if self.allows(ip) {
            Ok(())
        } else {
            Err(range)
        }
    }

    /// [`AddressPolicy::check`], and `ip` (or the IPv4 address it
    /// carries) is none of `own`, the host's own interface addresses: a
    /// public address of the host reaches the host's services as loopback
    /// does.
    pub fn check_not_own(&self, ip: IpAddr, own: &[IpAddr]) -> Result<(), &'static str> {
        self.check(ip)?;
        let v4 = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let is_own = own.contains(&ip) || v4.is_some_and(|v4| own.contains(&v4));
        if is_own && !self.allows(ip) {
            return Err("the host's own address");
        }
        Ok(())
    }

    /// Whether an `--egress-allow` block holds `ip` (or the IPv4 address
    /// it carries).
    fn allows(&self, ip: IpAddr) -> bool {
        let v4 = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.allow
            .iter()
            .any(|c| c.contains(ip) || v4.is_some_and(|v4| c.contains(v4)))
    }
}

/// The addresses of the host's own interfaces (getifaddrs(3)).
pub fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes the head of a list it allocates to `head`
    // (a live local); the list is freed below, once.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut node = head;
    while !node.is_null() {
        // SAFETY: `node` is a node of the list getifaddrs returned, which
        // is not freed until after this loop.
        let ifa = unsafe { &*node };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a non-null ifa_addr points to a sockaddr at least as
            // long as its family's; sa_family is its first field.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET ifa_addr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 ifa_addr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        node = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once; nothing
    // borrowed from the list outlives this.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        AddressPolicy::default().check(s.parse().unwrap()).is_err()
    }

    #[test]
    fn every_refused_range_is_refused_at_its_edges() {
        for ip in [
            "0.0.0.0",
            "0.255.255.255",
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.0.1",
            "192.168.255.255",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "239.255.255.255",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "fc00::1",
            "fdff::1",
            "ff02::1",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
        for ip in [
            "1.1.1.1",
            "9.255.255.255",
            "11.0.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "223.255.255.255",
            "2001:db8::1",
            "2606:4700::1111",
            "fec0::1",
        ] {
            assert!(!refused(ip), "{ip} should pass");
        }
    }

    #[test]
    fn v6_forms_of_refused_v4_are_refused() {
        for ip in [
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::192.168.1.1",
            "2002:7f00:1::1",
            "2002:c0a8:101::",
            "2002:a9fe:a9fe:1::1",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
        assert!(!refused("::ffff:1.1.1.1"));
        assert!(!refused("::1.1.1.1"));
        assert!(!refused("64:ff9b::1.1.1.1"));
        assert!(!refused("2002:101:101::1"));
    }

    #[test]
    fn allow_blocks_open_refused_ranges() {
        let p = AddressPolicy {
            allow: vec!["127.0.0.1/32".parse().unwrap(), "fd00::/8".parse().unwrap()],
        };
        assert!(p.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("::ffff:127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("127.0.0.2".parse().unwrap()).is_err());
        assert!(p.check("fd12::1".parse().unwrap()).is_ok());
        assert!(p.check("fc00::1".parse().unwrap()).is_err());
        assert!(p.check("10.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn the_hosts_addresses_are_listed() {
        let own = host_addresses().unwrap();
        assert!(own.contains(&IpAddr::from([127, 0, 0, 1])), "{own:?}");
        let p = AddressPolicy::default();
        let public: IpAddr = "203.0.113.5".parse().unwrap();
        assert!(p.check_not_own(public, &[]).is_ok());
        assert!(p.check_not_own(public, &[public]).is_err());
        let mapped: IpAddr = "::ffff:203.0.113.5".parse().unwrap();
        assert!(p.check_not_own(mapped, &[public]).is_err());
    }

    #[test]
    fn cidrs_parse_strictly() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "192.0.2.7".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix, 0);
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "::/129",
            "example.com/8",
            "",
            "10.0.0.0/8/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
