//! The one flow hash, shared by the XDP program and userspace.
//!
//! Kernel and daemon must agree bit for bit (the daemon predicts which real a flow gets, and
//! two nodes with the same config must pick the same real), so this is a plain function of
//! the packet's bytes and an optional cluster-wide seed (0 by default): no per-boot secret.
//! It is a multiply-xorshift over five 64-bit words with a murmur3 finaliser: a handful of
//! instructions in BPF, no helper call, no data-dependent loop.

use crate::FlowKey;

const K0: u64 = 0x9E37_79B9_7F4A_7C15;
const K1: u64 = 0xBF58_476D_1CE4_E5B9;
const K2: u64 = 0x94D0_49BB_1331_11EB;

#[cfg(test)]
pub(crate) const fn fmix(h: u64) -> u64 {
    fmix64(h)
}

#[inline(always)]
const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    h
}

#[inline(always)]
const fn absorb(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(K1);
    h ^ (h >> 31)
}

/// Hash of a flow. `key` is the flow as the kernel builds it (for a VIP with
/// `VIP_F_NO_SRC_PORT`, the caller zeroes `src_port_be` first). The high half of
/// `flow_hash64`.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    (flow_hash64(key, seed) >> 32) as u32
}

/// The whole 64-bit flow hash: its high half is `flow_hash` (the ring's), its low half places
/// the flow in the connection table (`ct::place`).
#[inline(always)]
pub fn flow_hash64(key: &FlowKey, seed: u32) -> u64 {
    let w = key.words();
    let mut h = K0 ^ (seed as u64).wrapping_mul(K2);
    h = absorb(h, w[0]);
    h = absorb(h, w[1]);
    h = absorb(h, w[2]);
    h = absorb(h, w[3]);
    h = absorb(h, w[4]);
    fmix64(h)
}

/// Hash of an address alone, with a seed: Maglev's per-real offset and skip.
#[inline(always)]
pub const fn hash_addr(addr: &[u8; 16], seed: u32) -> u32 {
    let lo = u64::from_le_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]);
    let hi = u64::from_le_bytes([
        addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
    ]);
    let mut h = K0 ^ (seed as u64).wrapping_mul(K2);
    h = absorb(h, lo);
    h = absorb(h, hi);
    (fmix64(h) >> 32) as u32
}

/// Map a 32-bit hash onto `[0, m)` without a division (Lemire's multiply-shift): the slot of
/// the Maglev ring a new flow takes.
#[inline(always)]
pub const fn ring_slot(hash: u32, m: u32) -> u32 {
    ((hash as u64 * m as u64) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{v4_mapped, IPPROTO_TCP, IPPROTO_UDP};

    fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> FlowKey {
        FlowKey {
            src: v4_mapped(src),
            dst: v4_mapped(dst),
            src_port_be: sport.to_be(),
            dst_port_be: dport.to_be(),
            proto,
            _pad: [0; 3],
        }
    }

    /// Frozen: the kernel, every daemon and every node of a cluster must compute these. A
    /// change here is a change of `LAYOUT_VERSION` and of every deployed ring.
    #[test]
    fn flow_hash_vectors() {
        let cases = [
            (
                key([10, 0, 0, 1], 40000, [10, 0, 0, 100], 80, IPPROTO_TCP),
                0,
                0xf8d3_2ad7u32,
            ),
            (
                key([10, 0, 0, 1], 40001, [10, 0, 0, 100], 80, IPPROTO_TCP),
                0,
                0xef07_2242,
            ),
            (
                key([10, 0, 0, 1], 40000, [10, 0, 0, 100], 80, IPPROTO_UDP),
                0,
                0x5e7a_36f0,
            ),
            (
                key([10, 0, 0, 1], 40000, [10, 0, 0, 100], 80, IPPROTO_TCP),
                7,
                0xf14e_1613,
            ),
            (FlowKey::default(), 0, 0x3bab_2048),
        ];
        for (k, seed, want) in cases {
            let got = flow_hash(&k, seed);
            assert_eq!(
                got, want,
                "flow_hash({k:?}, {seed}) = {got:#010x}, frozen {want:#010x}"
            );
        }
    }

    #[test]
    fn hash_addr_vectors() {
        let a = v4_mapped([10, 0, 0, 11]);
        assert_eq!(hash_addr(&a, 0), 0x0af5_8c66, "{:#010x}", hash_addr(&a, 0));
        assert_eq!(hash_addr(&a, 1), 0x8993_8255, "{:#010x}", hash_addr(&a, 1));
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = key([10, 0, 0, 1], 40000, [10, 0, 0, 100], 80, IPPROTO_TCP);
        let h = flow_hash(&base, 0);
        let mut variants = [base; 5];
        variants[0].src[15] ^= 1;
        variants[1].dst[15] ^= 1;
        variants[2].src_port_be ^= 1;
        variants[3].dst_port_be ^= 1;
        variants[4].proto = IPPROTO_UDP;
        for v in variants {
            assert_ne!(flow_hash(&v, 0), h, "{v:?}");
        }
        assert_ne!(flow_hash(&base, 1), h, "the seed must change the hash");
    }

    #[test]
    fn ring_slot_in_range_and_spread() {
        let m = 65537;
        assert_eq!(ring_slot(0, m), 0);
        assert_eq!(ring_slot(u32::MAX, m), m - 1);
        let mut buckets = [0u32; 16];
        for port in 0..16000u16 {
            let k = key([192, 0, 2, 1], port, [10, 0, 0, 100], 80, IPPROTO_TCP);
            buckets[(ring_slot(flow_hash(&k, 0), 16)) as usize] += 1;
        }
        for b in buckets {
            assert!(
                (900..=1100).contains(&b),
                "uneven spread over 16 buckets: {buckets:?}"
            );
        }
    }
}
