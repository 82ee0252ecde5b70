//! The address filters the program checks before a hash lookup: `VIP_FILTER` over `VIP_ADDRS`
//! and `NAT_FILTER` over the NAT reals' addresses in `REVNAT`. An address's bit is set before
//! its entry appears and cleared after its entry (and every other address with that bit) is
//! gone, so a filter never hides an entry from the program. A stale set bit only costs a packet
//! the hash lookup it would have paid without the filter.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, HashMap, MapData, MapError};
use lb_common::{vip_filter_bit_of, VipAddrValue, VipFilter, VIP_FILTER_WORDS};

/// The filter whose bits are those of `addrs`.
pub(super) fn filter_of<'a>(addrs: impl IntoIterator<Item = &'a [u8; 16]>) -> VipFilter {
    let mut f = [0u64; VIP_FILTER_WORDS];
    for addr in addrs {
        let bit = vip_filter_bit_of(addr) as usize;
        f[bit / 64] |= 1 << (bit % 64);
    }
    f
}

fn with_bit(mut f: VipFilter, addr: &[u8; 16]) -> VipFilter {
    let bit = vip_filter_bit_of(addr) as usize;
    f[bit / 64] |= 1 << (bit % 64);
    f
}

/// Which map a failed write was to.
pub(super) struct Failed {
    pub(super) map: &'static str,
    pub(super) source: MapError,
}

fn failed(map: &'static str) -> impl FnOnce(MapError) -> Failed {
    move |source| Failed { map, source }
}

/// One filter map and what this process last wrote to it.
struct Bits {
    map: Array<MapData, VipFilter>,
    name: &'static str,
    written: VipFilter,
}

impl Bits {
    /// Takes the map and writes `f` (an adopted filter is always rebuilt, never trusted).
    fn new(
        mut map: Array<MapData, VipFilter>,
        name: &'static str,
        f: VipFilter,
    ) -> Result<Self, Failed> {
        map.set(0, f, 0).map_err(failed(name))?;
        Ok(Bits {
            map,
            name,
            written: f,
        })
    }

    fn write(&mut self, f: VipFilter) -> Result<(), Failed> {
        if f != self.written {
            self.map.set(0, f, 0).map_err(failed(self.name))?;
            self.written = f;
        }
        Ok(())
    }

    fn read(&self) -> Result<VipFilter, MapError> {
        self.map.get(&0, 0)
    }
}

pub(super) struct VipAddrs {
    pub(super) map: HashMap<MapData, [u8; 16], VipAddrValue>,
    filter: Bits,
    /// The addresses in `map`, as this process wrote them (read back once when adopting).
    addrs: BTreeSet<[u8; 16]>,
}

impl VipAddrs {
    /// Takes both maps and writes the filter of the addresses `map` already holds (adopted
    /// maps keep theirs).
    pub(super) fn new(
        map: HashMap<MapData, [u8; 16], VipAddrValue>,
        filter: Array<MapData, VipFilter>,
    ) -> Result<Self, Failed> {
        let addrs = map
            .keys()
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(failed(lb_common::MAP_VIP_ADDRS))?;
        let filter = Bits::new(filter, lb_common::MAP_VIP_FILTER, filter_of(&addrs))?;
        Ok(VipAddrs { map, filter, addrs })
    }

    pub(super) fn read_filter(&self) -> Result<VipFilter, MapError> {
        self.filter.read()
    }

    pub(super) fn set(&mut self, addr: &[u8; 16], value: &VipAddrValue) -> Result<(), Failed> {
        self.filter.write(with_bit(self.filter.written, addr))?;
        self.map
            .insert(addr, value, 0)
            .map_err(failed(lb_common::MAP_VIP_ADDRS))?;
        self.addrs.insert(*addr);
        Ok(())
    }

    /// Removes `addr` (absent is fine), then clears the bits no address holds any more.
    pub(super) fn del(&mut self, addr: &[u8; 16]) -> Result<(), Failed> {
        match self.map.remove(addr) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(Failed {
                    map: lb_common::MAP_VIP_ADDRS,
                    source,
                })
            }
        }
        self.addrs.remove(addr);
        self.filter.write(filter_of(&self.addrs))
    }
}

/// `NAT_FILTER`: the bits of the addresses of `REVNAT`'s entries, several entries (ports,
/// protocols, the address's own) to an address. `REVNAT` itself is written by the caller, between
/// `add` and `remove`.
pub(super) struct NatFilter {
    filter: Bits,
    /// How many `REVNAT` entries each address has.
    entries: BTreeMap<[u8; 16], u32>,
}

impl NatFilter {
    /// Takes the map and writes the filter of `addrs`, the addresses of the entries `REVNAT`
    /// already holds (once per entry).
    pub(super) fn new(
        filter: Array<MapData, VipFilter>,
        addrs: impl IntoIterator<Item = [u8; 16]>,
    ) -> Result<Self, Failed> {
        let mut entries = BTreeMap::new();
        for a in addrs {
            *entries.entry(a).or_insert(0) += 1;
        }
        let filter = Bits::new(filter, lb_common::MAP_NAT_FILTER, filter_of(entries.keys()))?;
        Ok(NatFilter { filter, entries })
    }

    pub(super) fn read(&self) -> Result<VipFilter, MapError> {
        self.filter.read()
    }

    /// How many `REVNAT` entries there are.
    pub(super) fn entries(&self) -> u32 {
        self.entries.values().sum()
    }

    /// Before a new `REVNAT` entry for `addr` is written: sets its bit.
    pub(super) fn add(&mut self, addr: &[u8; 16]) -> Result<(), Failed> {
        self.filter.write(with_bit(self.filter.written, addr))?;
        *self.entries.entry(*addr).or_insert(0) += 1;
        Ok(())
    }

    /// After a `REVNAT` entry for `addr` is gone (or its write failed): clears the bits no
    /// address holds any more.
    pub(super) fn remove(&mut self, addr: &[u8; 16]) -> Result<(), Failed> {
        if let Some(n) = self.entries.get_mut(addr) {
            *n -= 1;
            if *n == 0 {
                self.entries.remove(addr);
            }
        }
        self.filter.write(filter_of(self.entries.keys()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut addr = [0u8; 16];
        addr[10] = 0xFF;
        addr[11] = 0xFF;
        addr[12..].copy_from_slice(&a);
        addr
    }

    #[test]
    fn the_filter_holds_the_bit_of_every_address_and_few_others() {
        let addrs: Vec<[u8; 16]> = (0..512u32)
            .map(|i| v4([10, 0, (i >> 8) as u8, i as u8]))
            .collect();
        let f = filter_of(&addrs);
        for a in &addrs {
            let bit = vip_filter_bit_of(a) as usize;
            assert_ne!(f[bit / 64] & (1 << (bit % 64)), 0, "{a:?}");
        }
        // Consecutive addresses (a typical VIP range) spread over the bits: 512 of them set
        // nearly 512 bits, and addresses outside the range mostly find theirs clear.
        let set: u32 = f.iter().map(|w| w.count_ones()).sum();
        assert!(set > 500, "{set} bits for 512 addresses");
        let others = (0..10_000u32)
            .map(|i| v4([192, 168, (i >> 8) as u8, i as u8]))
            .filter(|a| {
                let bit = vip_filter_bit_of(a) as usize;
                f[bit / 64] & (1 << (bit % 64)) != 0
            })
            .count();
        assert!(others < 400, "{others} of 10 000 other addresses pass");
    }

    #[test]
    fn ipv6_addresses_differing_in_any_word_spread() {
        let mut bits = BTreeSet::new();
        for i in 0..64u8 {
            let mut a = [0u8; 16];
            a[0] = 0xfd;
            a[7] = i;
            bits.insert(vip_filter_bit_of(&a));
            a[7] = 0;
            a[15] = i;
            bits.insert(vip_filter_bit_of(&a));
        }
        assert!(
            bits.len() > 120,
            "{} distinct bits of 127 addresses",
            bits.len()
        );
    }
}
