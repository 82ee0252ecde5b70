//! Ethernet addresses: the one formatter, parser and host-address check.

/// An Ethernet address.
pub type Mac = [u8; 6];

/// `02:aa:00:00:00:0b`.
pub fn format_mac(m: &Mac) -> String {
    let [a, b, c, d, e, f] = m;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Six colon-separated pairs of hex digits, as `format_mac` writes them.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Why a MAC cannot be a real's (frames sent to it would be lost or flood the segment), if so.
/// Neighbour entries of unconfigured links (NOARP, broadcast) look like that too.
pub fn mac_problem(mac: &Mac) -> Option<&'static str> {
    if *mac == [0; 6] {
        Some("all zeros")
    } else if mac[0] & 1 != 0 {
        Some("a group (multicast or broadcast) address, not a host's")
    } else {
        None
    }
}

/// Whether `mac` can be a host's: not all zeros, not a group address.
pub fn is_host_mac(mac: &Mac) -> bool {
    mac_problem(mac).is_none()
}

/// `Option<Mac>` as `"02:aa:00:00:00:0b"` or `null` (serde's `with`).
pub mod mac_serde {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use super::{format_mac, parse_mac, Mac};

    pub fn serialize<S: Serializer>(mac: &Option<Mac>, s: S) -> Result<S::Ok, S::Error> {
        match mac {
            Some(m) => s.serialize_some(&format_mac(m)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Mac>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => parse_mac(&text)
                .map(Some)
                .ok_or_else(|| D::Error::custom(format!("{text:?} is not a MAC address"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_errors_and_host_check() {
        let m = [0x02, 0xaa, 0, 0x10, 0xff, 0x0b];
        assert_eq!(format_mac(&m), "02:aa:00:10:ff:0b");
        assert_eq!(parse_mac("02:aa:00:10:ff:0b"), Some(m));
        assert_eq!(parse_mac("02:AA:00:10:FF:0B"), Some(m));
        for bad in [
            "02:aa:00:10:ff",
            "02:aa:00:10:ff:0b:01",
            "zz:aa:00:10:ff:0b",
            "2:aa:0:1:f:b",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert!(is_host_mac(&m));
        assert_eq!(mac_problem(&[0; 6]), Some("all zeros"));
        assert!(!is_host_mac(&[0xff; 6]));
        assert!(!is_host_mac(&[0x01, 0, 0x5e, 0, 0, 1]));
    }
}
