//! The seam between the desired state and the kernel: everything the `Balancer` writes or reads
//! goes through `Dataplane`. `ebpf::EbpfDataplane` is the real one; `FakeDataplane` keeps the
//! maps in memory so the control logic is tested without root.

use std::collections::HashMap;

use lb_common::{GlobalStats, Real, RealStats, VipAddrValue, VipKey, VipMeta, VipStats};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{op} on map {map} failed: {source}")]
    Map {
        op: &'static str,
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {index} is out of range (limit {limit})")]
    OutOfRange {
        what: &'static str,
        index: u32,
        limit: u32,
    },
    #[error("ring of {got} slots given, the dataplane's ring size is {want}")]
    RingSize { got: usize, want: u32 },
}

/// Sizes fixed when the program was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_vips: u32,
    pub max_reals: u32,
    pub ring_size: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_vips: lb_common::DEFAULT_MAX_VIPS,
            max_reals: lb_common::DEFAULT_MAX_REALS,
            ring_size: lb_common::DEFAULT_RING_SIZE,
        }
    }
}

impl Limits {
    /// A vip_id the maps hold.
    pub fn check_vip(&self, vip_id: u32) -> Result<(), DataplaneError> {
        check_index("vip id", vip_id, self.max_vips)
    }

    /// A real_id the maps hold.
    pub fn check_real(&self, real_id: u32) -> Result<(), DataplaneError> {
        check_index("real id", real_id, self.max_reals)
    }

    /// A ring half to write: a valid vip_id and exactly `ring_size` slots.
    pub fn check_ring(&self, vip_id: u32, ring: &[u32]) -> Result<(), DataplaneError> {
        self.check_vip(vip_id)?;
        if ring.len() != self.ring_size as usize {
            return Err(DataplaneError::RingSize {
                got: ring.len(),
                want: self.ring_size,
            });
        }
        Ok(())
    }
}

fn check_index(what: &'static str, index: u32, limit: u32) -> Result<(), DataplaneError> {
    if index >= limit {
        return Err(DataplaneError::OutOfRange { what, index, limit });
    }
    Ok(())
}

pub trait Dataplane {
    fn limits(&self) -> Limits;

    fn set_vip(&mut self, key: &VipKey, vip_id: u32) -> Result<(), DataplaneError>;
    fn del_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError>;
    /// Every VIP key present in the map (for adoption and for checks).
    fn vips(&self) -> Result<Vec<(VipKey, u32)>, DataplaneError>;

    fn set_vip_addr(&mut self, addr: &[u8; 16], value: &VipAddrValue)
        -> Result<(), DataplaneError>;
    fn del_vip_addr(&mut self, addr: &[u8; 16]) -> Result<(), DataplaneError>;

    fn set_vip_meta(&mut self, vip_id: u32, meta: &VipMeta) -> Result<(), DataplaneError>;
    fn vip_meta(&self, vip_id: u32) -> Result<VipMeta, DataplaneError>;

    fn set_real(&mut self, real_id: u32, real: &Real) -> Result<(), DataplaneError>;
    fn real(&self, real_id: u32) -> Result<Real, DataplaneError>;

    /// Write a whole ring half (`ring.len()` must equal `limits().ring_size`).
    fn write_ring(
        &mut self,
        vip_id: u32,
        generation: u32,
        ring: &[u32],
    ) -> Result<(), DataplaneError>;
    fn read_ring(&self, vip_id: u32, generation: u32) -> Result<Vec<u32>, DataplaneError>;

    /// Counters summed over CPUs.
    fn vip_stats(&self, vip_id: u32) -> Result<VipStats, DataplaneError>;
    fn real_stats(&self, real_id: u32) -> Result<RealStats, DataplaneError>;
    fn global_stats(&self) -> Result<GlobalStats, DataplaneError>;
}

/// In-memory maps with the kernel's semantics (arrays zero-filled, hashes sparse), for tests.
/// `fail_after` makes the n-th following write fail, to test that a failed apply leaves the
/// previous state in force.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub limits: Limits,
    pub vips: HashMap<VipKey, u32>,
    pub vip_addrs: HashMap<[u8; 16], VipAddrValue>,
    pub vip_meta: HashMap<u32, VipMeta>,
    pub reals: HashMap<u32, Real>,
    pub rings: HashMap<(u32, u32), Vec<u32>>,
    /// Number of map writes done so far (ring halves count as one).
    pub writes: u64,
    pub ring_writes: u64,
    pub fail_after: Option<u64>,
}

impl FakeDataplane {
    pub fn new(limits: Limits) -> Self {
        FakeDataplane {
            limits,
            ..Default::default()
        }
    }

    fn write(&mut self, map: &'static str) -> Result<(), DataplaneError> {
        if let Some(n) = self.fail_after {
            if n == 0 {
                return Err(DataplaneError::Map {
                    op: "update",
                    map,
                    source: std::io::Error::from_raw_os_error(libc::ENOMEM),
                });
            }
            self.fail_after = Some(n - 1);
        }
        self.writes += 1;
        Ok(())
    }

    /// The live ring of a VIP, as the kernel would read it.
    pub fn live_ring(&self, vip_id: u32) -> Vec<u32> {
        let generation = self.vip_meta.get(&vip_id).map_or(0, |m| m.generation);
        self.read_ring(vip_id, generation)
            .unwrap_or_else(|_| vec![0; self.limits.ring_size as usize])
    }
}

impl Dataplane for FakeDataplane {
    fn limits(&self) -> Limits {
        self.limits
    }

    fn set_vip(&mut self, key: &VipKey, vip_id: u32) -> Result<(), DataplaneError> {
        self.limits.check_vip(vip_id)?;
        self.write(lb_common::MAP_VIPS)?;
        self.vips.insert(*key, vip_id);
        Ok(())
    }

    fn del_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        self.write(lb_common::MAP_VIPS)?;
        self.vips.remove(key);
        Ok(())
    }

    fn vips(&self) -> Result<Vec<(VipKey, u32)>, DataplaneError> {
        Ok(self.vips.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn set_vip_addr(
        &mut self,
        addr: &[u8; 16],
        value: &VipAddrValue,
    ) -> Result<(), DataplaneError> {
        self.write(lb_common::MAP_VIP_ADDRS)?;
        self.vip_addrs.insert(*addr, *value);
        Ok(())
    }

    fn del_vip_addr(&mut self, addr: &[u8; 16]) -> Result<(), DataplaneError> {
        self.write(lb_common::MAP_VIP_ADDRS)?;
        self.vip_addrs.remove(addr);
        Ok(())
    }

    fn set_vip_meta(&mut self, vip_id: u32, meta: &VipMeta) -> Result<(), DataplaneError> {
        self.limits.check_vip(vip_id)?;
        self.write(lb_common::MAP_VIP_META)?;
        self.vip_meta.insert(vip_id, *meta);
        Ok(())
    }

    fn vip_meta(&self, vip_id: u32) -> Result<VipMeta, DataplaneError> {
        self.limits.check_vip(vip_id)?;
        Ok(self.vip_meta.get(&vip_id).copied().unwrap_or_default())
    }

    fn set_real(&mut self, real_id: u32, real: &Real) -> Result<(), DataplaneError> {
        self.limits.check_real(real_id)?;
        self.write(lb_common::MAP_REALS)?;
        self.reals.insert(real_id, *real);
        Ok(())
    }

    fn real(&self, real_id: u32) -> Result<Real, DataplaneError> {
        self.limits.check_real(real_id)?;
        Ok(self.reals.get(&real_id).copied().unwrap_or_default())
    }

    fn write_ring(
        &mut self,
        vip_id: u32,
        generation: u32,
        ring: &[u32],
    ) -> Result<(), DataplaneError> {
        self.limits.check_ring(vip_id, ring)?;
        self.write(lb_common::MAP_RING)?;
        self.ring_writes += 1;
        self.rings.insert((vip_id, generation & 1), ring.to_vec());
        Ok(())
    }

    fn read_ring(&self, vip_id: u32, generation: u32) -> Result<Vec<u32>, DataplaneError> {
        self.limits.check_vip(vip_id)?;
        Ok(self
            .rings
            .get(&(vip_id, generation & 1))
            .cloned()
            .unwrap_or_else(|| vec![0; self.limits.ring_size as usize]))
    }

    fn vip_stats(&self, vip_id: u32) -> Result<VipStats, DataplaneError> {
        self.limits.check_vip(vip_id)?;
        Ok(VipStats::default())
    }

    fn real_stats(&self, real_id: u32) -> Result<RealStats, DataplaneError> {
        self.limits.check_real(real_id)?;
        Ok(RealStats::default())
    }

    fn global_stats(&self) -> Result<GlobalStats, DataplaneError> {
        Ok(GlobalStats::default())
    }
}
