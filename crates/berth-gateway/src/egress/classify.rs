//! The IP classifier: the IANA special-purpose ranges a box may never reach, and IPv6 forms
//! that embed an IPv4 address judged by that address.

use super::*;

/// An IPv4 range that is not globally reachable: (first address, prefix length, name).
const V4_SPECIAL: [(u32, u8, &str); 16] = [
    (0x0000_0000, 8, "\"this network\" 0.0.0.0/8"),
    (0x0a00_0000, 8, "private 10.0.0.0/8"),
    (
        0x6440_0000,
        10,
        "shared address space (CGNAT) 100.64.0.0/10",
    ),
    (0x7f00_0000, 8, "loopback 127.0.0.0/8"),
    (
        0xa9fe_0000,
        16,
        "link-local 169.254.0.0/16 (cloud metadata)",
    ),
    (0xac10_0000, 12, "private 172.16.0.0/12"),
    (0xc000_0000, 24, "IETF protocol assignments 192.0.0.0/24"),
    (0xc000_0200, 24, "documentation 192.0.2.0/24"),
    (
        0xc058_6300,
        24,
        "deprecated 6to4 relay anycast 192.88.99.0/24",
    ),
    (0xc0a8_0000, 16, "private 192.168.0.0/16"),
    (0xc612_0000, 15, "benchmarking 198.18.0.0/15"),
    (0xc633_6400, 24, "documentation 198.51.100.0/24"),
    (0xcb00_7100, 24, "documentation 203.0.113.0/24"),
    (0xe000_0000, 4, "multicast 224.0.0.0/4"),
    (0xffff_ffff, 32, "limited broadcast 255.255.255.255/32"),
    (0xf000_0000, 4, "reserved 240.0.0.0/4"),
];

/// How an IPv6 range relates to IPv4.
#[derive(Clone, Copy)]
enum V6Kind {
    /// Not globally reachable, whatever it holds.
    Refused,
    /// Carries an IPv4 address in its low 32 bits: judged as that address.
    EmbedsLow32,
    /// 6to4: the IPv4 address is bits 16..48.
    Embeds6to4,
}

/// IPv6 ranges judged specially: (first address, prefix length, name, kind), most specific
/// first. Everything outside global unicast 2000::/3 is refused after these.
const V6_SPECIAL: [(u128, u8, &str, V6Kind); 16] = [
    (0, 128, "unspecified ::/128", V6Kind::Refused),
    (1, 128, "loopback ::1/128", V6Kind::Refused),
    (
        0xffff_0000_0000,
        96,
        "IPv4-mapped ::ffff:0:0/96",
        V6Kind::EmbedsLow32,
    ),
    (0, 96, "deprecated IPv4-compatible ::/96", V6Kind::Refused),
    (
        0x0064_ff9b << 96,
        96,
        "NAT64 64:ff9b::/96",
        V6Kind::EmbedsLow32,
    ),
    (
        0x0064_ff9b_0001 << 80,
        48,
        "local-use NAT64 64:ff9b:1::/48",
        V6Kind::Refused,
    ),
    (0x0100 << 112, 64, "discard-only 100::/64", V6Kind::Refused),
    (
        0x0100_0000_0000_0001 << 64,
        64,
        "dummy prefix 100:0:0:1::/64",
        V6Kind::Refused,
    ),
    (0x2001_0000 << 96, 32, "Teredo 2001::/32", V6Kind::Refused),
    (
        0x2001 << 112,
        23,
        "IETF protocol assignments 2001::/23",
        V6Kind::Refused,
    ),
    (
        0x2001_0db8 << 96,
        32,
        "documentation 2001:db8::/32",
        V6Kind::Refused,
    ),
    (0x2002 << 112, 16, "6to4 2002::/16", V6Kind::Embeds6to4),
    (
        0x3fff << 112,
        20,
        "documentation 3fff::/20",
        V6Kind::Refused,
    ),
    (0x5f00 << 112, 16, "SRv6 SIDs 5f00::/16", V6Kind::Refused),
    (0xfc00 << 112, 7, "unique local fc00::/7", V6Kind::Refused),
    (
        0xfec0 << 112,
        10,
        "deprecated site-local fec0::/10",
        V6Kind::Refused,
    ),
];

fn in_prefix(addr: u128, first: u128, len: u8, bits: u8) -> bool {
    let shift = u32::from(bits - len);
    if len == 0 {
        return true;
    }
    (addr >> shift) == (first >> shift)
}

/// Why `ip` is not globally reachable (the range it is in), or `None` when it is. IPv6 forms
/// that embed an IPv4 address (IPv4-mapped, NAT64 64:ff9b::/96, 6to4) are judged by that
/// address; link-local, multicast and everything outside 2000::/3 are refused.
pub fn ip_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let a = u32::from(v4);
            V4_SPECIAL
                .iter()
                .find(|(first, len, _)| in_prefix(u128::from(a), u128::from(*first), *len, 32))
                .map(|(_, _, name)| *name)
        }
        IpAddr::V6(v6) => {
            let a = u128::from(v6);
            for (first, len, name, kind) in V6_SPECIAL {
                if !in_prefix(a, first, len, 128) {
                    continue;
                }
                return match kind {
                    V6Kind::Refused => Some(name),
                    V6Kind::EmbedsLow32 => {
                        ip_class(IpAddr::V4(std::net::Ipv4Addr::from(a as u32))).map(|_| name)
                    }
                    V6Kind::Embeds6to4 => {
                        ip_class(IpAddr::V4(std::net::Ipv4Addr::from((a >> 80) as u32)))
                            .map(|_| name)
                    }
                };
            }
            if (a >> 120) == 0xff {
                return Some("multicast ff00::/8");
            }
            if (a >> 118) == (0xfe80 >> 6) {
                return Some("link-local fe80::/10");
            }
            if (a >> 125) != 1 {
                return Some("outside global unicast 2000::/3");
            }
            None
        }
    }
}

/// Addresses a box may never reach through the proxy.
pub fn forbidden_ip(ip: IpAddr) -> bool {
    ip_class(ip).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(ip: &str) -> Option<&'static str> {
        ip_class(ip.parse().expect("ip"))
    }

    #[test]
    fn every_special_ipv4_range_is_refused_at_both_ends() {
        for (first, len, name) in V4_SPECIAL {
            let last = first | (u32::MAX >> len.min(31)) & if len == 32 { 0 } else { u32::MAX };
            for a in [first, last] {
                let ip = std::net::Ipv4Addr::from(a);
                assert!(ip_class(IpAddr::V4(ip)).is_some(), "{ip} ({name})");
            }
            // Just below the range is another range or public; just above, likewise: the
            // table's names say which one matched.
            assert_eq!(
                ip_class(IpAddr::V4(std::net::Ipv4Addr::from(first))),
                Some(name)
            );
        }
        for (ip, want) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private 10."),
            ("172.16.0.1", "private 172.16"),
            ("172.31.255.255", "private 172.16"),
            ("192.168.1.1", "private 192.168"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "CGNAT"),
            ("100.127.255.255", "CGNAT"),
            ("0.0.0.0", "this network"),
            ("192.0.0.8", "IETF"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.1", "documentation"),
            ("203.0.113.1", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("192.88.99.1", "6to4 relay"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.255", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "broadcast"),
        ] {
            let got = class(ip).unwrap_or("public");
            assert!(got.contains(want), "{ip}: {got}");
        }
        for good in [
            "1.1.1.1",
            "8.8.8.8",
            "160.79.104.10",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "11.0.0.0",
            "126.255.255.255",
            "128.0.0.0",
        ] {
            assert_eq!(class(good), None, "{good}");
        }
    }

    #[test]
    fn every_special_ipv6_range_is_refused_at_both_ends() {
        for (first, len, name, _) in V6_SPECIAL {
            let last = if len == 128 {
                first
            } else {
                first | (u128::MAX >> len)
            };
            for a in [first, last] {
                let ip = std::net::Ipv6Addr::from(a);
                // The ends of an embedding range carry 0.0.0.0 and 255.255.255.255: refused.
                assert!(ip_class(IpAddr::V6(ip)).is_some(), "{ip} ({name})");
            }
        }
    }

    #[test]
    fn ipv6_ranges_and_the_ipv4_they_embed() {
        for (ip, want) in [
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::a00:1", "IPv4-compatible"),
            ("::8.8.8.8", "IPv4-compatible"),
            ("64:ff9b:1::1", "local-use NAT64"),
            ("64:ff9b:1:ffff::808:808", "local-use NAT64"),
            ("100::1", "discard-only"),
            ("100:0:0:1::1", "dummy prefix"),
            ("2001::1", "Teredo"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("2001:2::1", "IETF protocol"),
            ("2001:1ff::1", "IETF protocol"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation"),
            ("3fff:fff::1", "documentation"),
            ("5f00::1", "SRv6"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("feff::1", "site-local"),
            ("ff02::1", "multicast"),
            ("4000::1", "outside global unicast"),
            ("1000::1", "outside global unicast"),
            // IPv4-mapped, NAT64 and 6to4 are judged by the IPv4 address they carry.
            ("::ffff:127.0.0.1", "IPv4-mapped"),
            ("::ffff:10.0.0.1", "IPv4-mapped"),
            ("::ffff:169.254.169.254", "IPv4-mapped"),
            ("64:ff9b::127.0.0.1", "NAT64"),
            ("64:ff9b::a9fe:a9fe", "NAT64"),
            ("64:ff9b::192.168.0.1", "NAT64"),
            ("2002:7f00:1::1", "6to4"),
            ("2002:a00:1::", "6to4"),
            ("2002:c0a8:101::1", "6to4"),
            ("2002:a9fe:a9fe::1", "6to4"),
        ] {
            let got = class(ip).unwrap_or("public");
            assert!(got.contains(want), "{ip}: {got}");
        }
        for good in [
            "2606:4700::1111",
            "2a00:1450:4001::200e",
            "2001:200::1",
            "2620:4f:8000::1",
            "3ffe::1",
            "3fff:1000::1",
            // Embedding a public IPv4 address.
            "::ffff:8.8.8.8",
            "::ffff:160.79.104.10",
            "64:ff9b::8.8.8.8",
            "64:ff9b::a04f:680a",
            "2002:808:808::1",
        ] {
            assert_eq!(class(good), None, "{good}");
        }
    }
}
