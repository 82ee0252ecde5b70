use std::collections::HashMap;

use lb_common::{
    v4_mapped, Real, VipAddrValue, VipKey, VipMeta, IPPROTO_TCP, REAL_F_ALIVE, VIP_ADDR_PORT0_TCP,
    VIP_ADDR_PORT0_UDP, VIP_F_ALL, VIP_F_NO_SRC_PORT,
};

use super::*;
use crate::{
    core::{
        clock::ManualClock,
        maglev::{self, MaglevReal},
    },
    dataplane::{fake::FakeDataplane, CounterSource},
    model::{map_addr, Proto, MAX_WEIGHT},
};

pub(super) const M: u32 = 1009; // prime, ≥ 100 × the reals of any test VIP
const QUARANTINE: Duration = Duration::from_secs(900);

pub(super) fn limits() -> Limits {
    Limits {
        max_vips: 8,
        max_reals: 32,
        ring_size: M,
    }
}

pub(super) fn vip(s: &str) -> VipSpec {
    s.parse().expect("test VIP parses")
}

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address parses")
}

pub(super) fn mac(n: u8) -> Mac {
    [0x02, 0, 0, 0, 0, n]
}

pub(super) type TestBalancer<D = FakeDataplane> = Balancer<D, ManualClock>;

pub(super) fn balancer_with(limits: Limits) -> (TestBalancer, ManualClock) {
    let clock = ManualClock::new();
    let fake = FakeDataplane::new(limits).with_clock(clock.clone());
    let b = Balancer::with_clock(fake, QUARANTINE, clock.clone());
    (b, clock)
}

pub(super) fn balancer() -> (TestBalancer, ManualClock) {
    balancer_with(limits())
}

pub(super) fn add_real(vip: VipSpec, addr: &str, weight: u32, m: Option<Mac>) -> Change {
    Change::AddReal {
        vip,
        addr: ip(addr).into(),
        weight,
        mac: m,
    }
}

/// A VIP with reals .11 (w1), .12 (w2), .13 (w1), all with MACs.
pub(super) fn three_reals(spec: VipSpec) -> Vec<Change> {
    vec![
        Change::AddVip {
            spec,
            flags: VipFlags::default(),
        },
        add_real(spec, "10.0.0.11", 1, Some(mac(11))),
        add_real(spec, "10.0.0.12", 2, Some(mac(12))),
        add_real(spec, "10.0.0.13", 1, Some(mac(13))),
    ]
}

pub(super) fn v4(a: &str) -> [u8; 16] {
    map_addr(ip(a))
}

/// The maps as the kernel sees them: zeroed array entries are the same as absent ones,
/// only the live ring half counts.
#[derive(Debug, PartialEq)]
pub(super) struct Visible {
    pub(super) vips: HashMap<VipKey, u32>,
    pub(super) vip_addrs: HashMap<[u8; 16], VipAddrValue>,
    pub(super) vip_meta: BTreeMap<u32, VipMeta>,
    pub(super) reals: BTreeMap<u32, Real>,
    pub(super) live_rings: BTreeMap<u32, Vec<u32>>,
}

pub(super) fn visible(fake: &FakeDataplane) -> Visible {
    let vip_meta: BTreeMap<u32, VipMeta> = fake
        .vip_meta
        .iter()
        .filter(|(_, m)| **m != VipMeta::default())
        .map(|(id, m)| (*id, *m))
        .collect();
    Visible {
        vips: fake.vips.clone(),
        vip_addrs: fake.vip_addrs.clone(),
        live_rings: vip_meta
            .keys()
            .map(|id| (*id, fake.live_ring(*id)))
            .collect(),
        vip_meta,
        reals: fake
            .reals
            .iter()
            .filter(|(_, r)| **r != Real::default())
            .map(|(id, r)| (*id, *r))
            .collect(),
    }
}

pub(super) fn expected_ring(reals: &[(&str, u32, u32)]) -> Vec<u32> {
    let reals: Vec<MaglevReal> = reals
        .iter()
        .map(|(addr, weight, id)| MaglevReal {
            addr: v4(addr),
            port: 0,
            weight: *weight,
            id: *id,
        })
        .collect();
    maglev::build_ring(&reals, M).expect("test ring builds")
}

pub(super) fn validation(err: BalancerError) -> (Option<usize>, ValidationError) {
    match err {
        BalancerError::Invalid { change, source } => (change, source),
        other => panic!("expected a validation error, got {other}"),
    }
}

fn probe_balancer() -> TestBalancer {
    balancer().0
}

fn pos(log: &[String], event: &str) -> usize {
    log.iter()
        .position(|e| e == event)
        .unwrap_or_else(|| panic!("{event} not in {log:?}"))
}

// ---- parsing ----

#[test]
fn add_vip_with_three_reals_writes_expected_maps() {
    let (mut b, _) = balancer();
    let spec = vip("tcp/10.0.0.100:80");
    let report = b.apply(three_reals(spec)).expect("valid");
    assert_eq!(
        report.vips,
        vec![VipReport {
            vip: spec,
            vip_id: 0,
            ring: RingUpdate::Rewritten { generation: 0 },
            spread_warning: None,
        }]
    );
    let fake = b.dataplane();
    let key = VipKey {
        addr: v4_mapped([10, 0, 0, 100]),
        port_be: 80u16.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    assert_eq!(fake.vips, HashMap::from([(key, 0)]));
    assert_eq!(
        fake.vip_meta.get(&0),
        Some(&VipMeta {
            flags: 0,
            generation: 0,
            in_use: 1,
            _reserved: 0
        })
    );
    assert_eq!(
        fake.vip_addrs,
        HashMap::from([(
            key.addr,
            VipAddrValue {
                vip_count: 1,
                port0: 0
            }
        )])
    );
    let real = |addr: &str, m: u8| Real {
        addr: v4(addr),
        mac: mac(m),
        flags: REAL_F_ALIVE,
        egress: 0,
        vip_id: 0,
        port_be: 0,
        _pad: [0; 6],
    };
    assert_eq!(
        fake.reals,
        HashMap::from([
            (1, real("10.0.0.11", 11)),
            (2, real("10.0.0.12", 12)),
            (3, real("10.0.0.13", 13)),
        ])
    );
    let want = expected_ring(&[
        ("10.0.0.11", 1, 1),
        ("10.0.0.12", 2, 2),
        ("10.0.0.13", 1, 3),
    ]);
    assert_eq!(fake.rings.get(&(0, 0)), Some(&want));
    assert_eq!(fake.rings.get(&(0, 1)), None);
    assert_eq!(fake.ring_writes, 1);
    // Every real has slots, the heavier one about twice as many.
    let count = |id| want.iter().filter(|s| **s == id).count();
    assert!(count(2) > count(1) * 3 / 2 && count(2) > count(3) * 3 / 2);
    assert_eq!(b.live_ring(&spec).expect("read"), Some(want));
    assert_eq!(b.vip_id(&spec), Some(0));
    assert_eq!(b.real_id(&spec, ip("10.0.0.12")), Some(2));
    // The family is part of the match: a v4-mapped IPv6 address is not the IPv4 real.
    assert_eq!(b.real_id(&spec, ip("::ffff:10.0.0.12")), None);
}

#[test]
fn writes_follow_the_safe_order() {
    let mut b = probe_balancer();
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(three_reals(spec)).expect("valid");
    let log = b.dataplane_mut().take_log();
    // Counters of the new ids are zeroed before anything can count into them.
    assert_eq!(
        log,
        [
            "STATS-VIP0",
            "STATS-REAL1",
            "STATS-REAL2",
            "STATS-REAL3",
            "REALS1+",
            "REALS2+",
            "REALS3+",
            "RING0:g0",
            "META0:g0",
            "ADDRS+",
            "VIPS+0"
        ]
    );

    // Removing a real: the ring without it goes live, and its entry is cleared only a grace
    // period later (a packet that read the old half may still follow it).
    b.del_real(spec, ip("10.0.0.12")).expect("valid");
    let log = b.dataplane_mut().take_timed_log();
    let names: Vec<&str> = log.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["RING0:g1", "META0:g1", "QUIESCE", "REALS2-"]);
    let flip = log[1].1;
    assert!(log[3].1 >= flip + DEFAULT_GRACE, "{log:?}");

    // Adding a real at once: half 0 went idle with that flip, and the barrier after it has
    // passed, so it is rewritten without another wait; the new real's counters are zeroed and
    // its entry written first.
    b.add_real(spec, ip("10.0.0.14"), 1, Some(mac(14)))
        .expect("valid");
    let log = b.dataplane_mut().take_timed_log();
    let names: Vec<&str> = log.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["STATS-REAL4", "REALS4+", "RING0:g0", "META0:g0"]);
    assert!(log[2].1 >= flip + DEFAULT_GRACE, "{log:?}");
    // Reweighting right after: half 1 went idle with that flip (no barrier since), so it is
    // rewritten a grace period after it, behind the kernel's own grace period.
    let flip = log[3].1;
    b.set_weight(spec, ip("10.0.0.14"), 3).expect("valid");
    let log = b.dataplane_mut().take_timed_log();
    let names: Vec<&str> = log.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["QUIESCE", "RING0:g1", "META0:g1"]);
    assert!(log[0].1 >= flip + DEFAULT_GRACE, "{log:?}");

    // Removing the VIP: VIPS first, then VIP_ADDRS; VIP_META and REALS a grace period later.
    b.del_vip(spec).expect("valid");
    let log = b.dataplane_mut().take_timed_log();
    let names: Vec<&str> = log.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names,
        ["VIPS-", "ADDRS-", "QUIESCE", "META0-", "REALS1-", "REALS3-", "REALS4-"]
    );
    assert!(log[3].1 >= log[0].1 + DEFAULT_GRACE, "{log:?}");
    assert!(visible(b.dataplane()).vip_meta.is_empty());
    assert!(visible(b.dataplane()).reals.is_empty());
}

#[test]
fn five_changes_on_one_vip_rewrite_its_ring_once() {
    let (mut b, _) = balancer();
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(vec![
        Change::AddVip {
            spec,
            flags: VipFlags::default(),
        },
        add_real(spec, "10.0.0.11", 1, Some(mac(11))),
        add_real(spec, "10.0.0.12", 1, Some(mac(12))),
    ])
    .expect("valid");
    let before = b.dataplane().ring_writes;
    let report = b
        .apply(vec![
            add_real(spec, "10.0.0.13", 1, Some(mac(13))),
            add_real(spec, "10.0.0.14", 1, None),
            Change::SetWeight {
                vip: spec,
                addr: ip("10.0.0.11").into(),
                weight: 3,
            },
            Change::DelReal {
                vip: spec,
                addr: ip("10.0.0.12").into(),
            },
            Change::SetMac {
                vip: Some(spec),
                addr: ip("10.0.0.14"),
                mac: Some(mac(14)),
            },
        ])
        .expect("valid");
    assert_eq!(b.dataplane().ring_writes - before, 1);
    assert_eq!(report.vips.len(), 1);
    assert_eq!(report.vips[0].ring, RingUpdate::Rewritten { generation: 1 });
    let want = expected_ring(&[
        ("10.0.0.11", 3, 1),
        ("10.0.0.13", 1, 3),
        ("10.0.0.14", 1, 4),
    ]);
    assert_eq!(b.live_ring(&spec).expect("read"), Some(want));
}

#[test]
fn removing_a_real_flips_generation_and_clears_it() {
    let (mut b, _) = balancer();
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(three_reals(spec)).expect("valid");
    let old = b.dataplane().live_ring(0);
    let report = b.del_real(spec, ip("10.0.0.12")).expect("valid");
    assert_eq!(report.vips[0].ring, RingUpdate::Rewritten { generation: 1 });
    let fake = b.dataplane();
    assert_eq!(fake.vip_meta[&0].generation, 1);
    // The old half is untouched: readers still on it see a whole ring.
    assert_eq!(fake.rings[&(0, 0)], old);
    let new = fake.live_ring(0);
    assert!(!new.contains(&2));
    assert_eq!(
        new,
        expected_ring(&[("10.0.0.11", 1, 1), ("10.0.0.13", 1, 3)])
    );
    // Maglev keeps most slots of the remaining reals where they were.
    let kept_before = old.iter().filter(|id| **id != 2).count();
    let kept_now = old
        .iter()
        .zip(&new)
        .filter(|(o, n)| **o != 2 && o == n)
        .count();
    assert!(
        kept_now * 10 >= kept_before * 9,
        "{kept_now} of {kept_before} slots kept"
    );
    assert_eq!(fake.reals.get(&2).map(|r| r.flags), Some(0));
    assert_eq!(fake.reals[&1].flags, REAL_F_ALIVE);
    assert_eq!(b.real_id(&spec, ip("10.0.0.12")), None);
    assert_eq!(b.snapshot().vips[0].generation, 1);
}

#[test]
fn weight_zero_drains() {
    let (mut b, _) = balancer();
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(three_reals(spec)).expect("valid");
    b.set_weight(spec, ip("10.0.0.12"), 0).expect("valid");
    let fake = b.dataplane();
    assert!(!fake.live_ring(0).contains(&2));
    assert_eq!(fake.reals[&2].flags, REAL_F_ALIVE);
    let real = &b.snapshot().vips[0].reals[1];
    assert_eq!((real.id, real.weight, real.in_ring), (2, 0, false));
    // All weights 0: an empty ring, reals still alive.
    b.apply(vec![
        Change::SetWeight {
            vip: spec,
            addr: ip("10.0.0.11").into(),
            weight: 0,
        },
        Change::SetWeight {
            vip: spec,
            addr: ip("10.0.0.13").into(),
            weight: 0,
        },
    ])
    .expect("valid");
    assert!(b.dataplane().live_ring(0).iter().all(|id| *id == 0));
    assert_eq!(b.dataplane().reals[&1].flags, REAL_F_ALIVE);
}

#[test]
fn real_without_mac_stays_out_of_ring_and_reals() {
    let mut b = probe_balancer();
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(vec![
        Change::AddVip {
            spec,
            flags: VipFlags::default(),
        },
        add_real(spec, "10.0.0.11", 1, Some(mac(11))),
        add_real(spec, "10.0.0.12", 1, None),
    ])
    .expect("valid");
    assert_eq!(b.real_id(&spec, ip("10.0.0.12")), Some(2));
    assert!(!b.dataplane().reals.contains_key(&2));
    assert!(!b.dataplane().live_ring(0).contains(&2));
    b.dataplane_mut().take_log();

    b.set_mac(None, ip("10.0.0.12"), Some(mac(12)))
        .expect("valid");
    assert_eq!(
        b.dataplane_mut().take_log(),
        ["REALS2+", "RING0:g1", "META0:g1"]
    );
    assert_eq!(b.dataplane().reals[&2].mac, mac(12));
    assert!(b.dataplane().live_ring(0).contains(&2));

    // Losing the MAC: out of the ring first, then the entry is cleared.
    b.set_mac(Some(spec), ip("10.0.0.12"), None).expect("valid");
    assert_eq!(
        b.dataplane_mut().take_log(),
        ["RING0:g0", "META0:g0", "REALS2-"]
    );
    assert_eq!(b.real_id(&spec, ip("10.0.0.12")), Some(2));
}

#[test]
fn set_mac_without_vip_reaches_every_vip_with_that_real() {
    let (mut b, _) = balancer();
    let web = vip("tcp/10.0.0.100:80");
    let dns = vip("udp/10.0.0.100:53");
    b.apply(vec![
        Change::AddVip {
            spec: web,
            flags: VipFlags::default(),
        },
        Change::AddVip {
            spec: dns,
            flags: VipFlags::default(),
        },
        add_real(web, "10.0.0.11", 1, None),
        add_real(dns, "10.0.0.11", 1, None),
    ])
    .expect("valid");
    b.set_mac(None, ip("10.0.0.11"), Some(mac(11)))
        .expect("valid");
    for spec in [web, dns] {
        let id = b.real_id(&spec, ip("10.0.0.11")).expect("real");
        assert_eq!(b.dataplane().reals[&id].mac, mac(11));
    }
    let err = b.set_mac(None, ip("10.0.0.99"), Some(mac(1))).unwrap_err();
    assert!(matches!(
        validation(err).1,
        ValidationError::UnknownReal { vip: None, .. }
    ));
}

#[test]
fn freed_real_id_is_quarantined_then_reused() {
    let (mut b, clock) = balancer();
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(three_reals(spec)).expect("valid");
    b.del_real(spec, ip("10.0.0.12")).expect("valid");
    assert_eq!(
        b.snapshot().quarantined,
        vec![QuarantinedId {
            id: 2,
            remaining: QUARANTINE
        }]
    );
    b.add_real(spec, ip("10.0.0.14"), 1, Some(mac(14)))
        .expect("valid");
    assert_eq!(b.real_id(&spec, ip("10.0.0.14")), Some(4));
    clock.advance(QUARANTINE - Duration::from_secs(1));
    b.add_real(spec, ip("10.0.0.15"), 1, Some(mac(15)))
        .expect("valid");
    assert_eq!(b.real_id(&spec, ip("10.0.0.15")), Some(5));
    clock.advance(Duration::from_secs(1));
    b.add_real(spec, ip("10.0.0.16"), 1, Some(mac(16)))
        .expect("valid");
    assert_eq!(b.real_id(&spec, ip("10.0.0.16")), Some(2));
    assert!(b.snapshot().quarantined.is_empty());
    // Re-adding a removed address is a new real: new id, the old one quarantined.
    b.apply(vec![
        Change::DelReal {
            vip: spec,
            addr: ip("10.0.0.11").into(),
        },
        add_real(spec, "10.0.0.11", 1, Some(mac(11))),
    ])
    .expect("valid");
    assert_eq!(b.real_id(&spec, ip("10.0.0.11")), Some(6));
    assert_eq!(b.snapshot().quarantined[0].id, 1);
}

#[test]
fn vip_ids_are_lowest_free_and_reused_by_the_next_batch() {
    let (mut b, _) = balancer();
    let a = vip("tcp/10.0.0.100:80");
    let c = vip("tcp/10.0.0.102:80");
    b.apply(vec![
        Change::AddVip {
            spec: c,
            flags: VipFlags::default(),
        },
        Change::AddVip {
            spec: a,
            flags: VipFlags::default(),
        },
    ])
    .expect("valid");
    // Ids follow VipSpec order, not the order of the changes.
    assert_eq!((b.vip_id(&a), b.vip_id(&c)), (Some(0), Some(1)));
    // Deleting and re-adding in one batch: a new id, VIPS switched in one write.
    b.apply(vec![
        Change::DelVip { spec: a },
        Change::AddVip {
            spec: a,
            flags: VipFlags::default(),
        },
    ])
    .expect("valid");
    assert_eq!(b.vip_id(&a), Some(2));
    assert_eq!(b.dataplane().vips[&a.key()], 2);
    assert_eq!(b.dataplane().vip_meta[&0], VipMeta::default());
    // Id 0 is free again for the next batch.
    let d = vip("udp/10.0.0.103:53");
    b.add_vip(d, VipFlags::default()).expect("valid");
    assert_eq!(b.vip_id(&d), Some(0));
    assert_eq!(b.dataplane().vip_meta[&0].in_use, 1);
}

// ---- whole-batch validation and failures ----

#[test]
fn rejected_apply_changes_nothing() {
    let (mut b, _) = balancer();
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(three_reals(spec)).expect("valid");
    let state = b.snapshot();
    let maps = visible(b.dataplane());
    let (writes, ring_writes) = (b.dataplane().writes, b.dataplane().ring_writes);
    let other = vip("tcp/10.0.0.101:80");
    let err = b
        .apply(vec![
            add_real(spec, "10.0.0.14", 1, Some(mac(14))),
            Change::SetWeight {
                vip: spec,
                addr: ip("10.0.0.11").into(),
                weight: 5,
            },
            Change::AddVip {
                spec: other,
                flags: VipFlags::default(),
            },
            add_real(vip("tcp/10.0.0.102:80"), "10.0.0.21", 1, None),
        ])
        .unwrap_err();
    let message = err.to_string();
    let (change, source) = validation(err);
    assert_eq!(change, Some(3));
    assert!(matches!(source, ValidationError::UnknownVip { .. }));
    assert_eq!(source.field(), "vip");
    assert!(message.contains("changes[3]"), "{message}");
    assert_eq!(b.snapshot(), state);
    assert_eq!(visible(b.dataplane()), maps);
    assert_eq!(b.dataplane().writes, writes);
    assert_eq!(b.dataplane().ring_writes, ring_writes);
}

#[test]
fn validation_errors_name_field_and_reason() {
    let (mut b, _) = balancer();
    let v4vip = vip("tcp/10.0.0.100:80");
    let v6vip = vip("tcp/[2001:db8::100]:443");
    b.apply(vec![
        Change::AddVip {
            spec: v4vip,
            flags: VipFlags::default(),
        },
        Change::AddVip {
            spec: v6vip,
            flags: VipFlags::default(),
        },
        add_real(v4vip, "10.0.0.11", 1, Some(mac(11))),
        add_real(v6vip, "2001:db8::11", 1, Some(mac(11))),
    ])
    .expect("valid");
    assert!(b
        .live_ring(&v6vip)
        .expect("read")
        .expect("vip")
        .contains(&2));

    let reject =
        |b: &mut TestBalancer, change: Change| validation(b.apply(vec![change]).unwrap_err()).1;
    let e = reject(&mut b, add_real(v6vip, "10.0.0.12", 1, None));
    assert!(matches!(e, ValidationError::FamilyMismatch { .. }), "{e}");
    assert_eq!(e.field(), "real");
    let e = reject(&mut b, add_real(v4vip, "2001:db8::12", 1, None));
    assert!(matches!(e, ValidationError::FamilyMismatch { .. }), "{e}");
    // A v4-mapped real or VIP would share a map key with the IPv4 one: refused as such.
    let e = reject(&mut b, add_real(v6vip, "::ffff:10.0.0.12", 1, None));
    assert!(
        matches!(e, ValidationError::InvalidAddress { field: "real", .. }),
        "{e}"
    );
    assert!(e.to_string().contains("IPv4-mapped"), "{e}");
    let mapped = VipSpec::new(Proto::Tcp, ip("::ffff:10.0.0.100"), 80);
    let e = reject(
        &mut b,
        Change::AddVip {
            spec: mapped,
            flags: VipFlags::default(),
        },
    );
    assert!(
        matches!(e, ValidationError::InvalidAddress { field: "vip", .. }),
        "{e}"
    );
    let e = reject(
        &mut b,
        Change::AddVip {
            spec: v4vip,
            flags: VipFlags::default(),
        },
    );
    assert!(matches!(e, ValidationError::DuplicateVip { .. }), "{e}");
    let e = reject(&mut b, add_real(v4vip, "10.0.0.11", 1, None));
    assert!(matches!(e, ValidationError::DuplicateReal { .. }), "{e}");
    let e = reject(&mut b, add_real(v4vip, "10.0.0.12", MAX_WEIGHT + 1, None));
    assert!(matches!(e, ValidationError::WeightTooLarge { .. }), "{e}");
    assert_eq!(e.field(), "weight");
    let e = reject(
        &mut b,
        Change::SetWeight {
            vip: v4vip,
            addr: ip("10.0.0.11").into(),
            weight: u32::MAX,
        },
    );
    assert!(matches!(e, ValidationError::WeightTooLarge { .. }), "{e}");
    assert!(b.set_weight(v4vip, ip("10.0.0.11"), MAX_WEIGHT).is_ok());
    let e = reject(&mut b, add_real(v4vip, "10.0.0.12", 1, Some([0xff; 6])));
    assert!(matches!(e, ValidationError::InvalidMac { .. }), "{e}");
    assert_eq!(e.field(), "mac");
    let e = reject(&mut b, add_real(v4vip, "10.0.0.12", 1, Some([0; 6])));
    assert!(matches!(e, ValidationError::InvalidMac { .. }), "{e}");
    let e = reject(&mut b, add_real(v4vip, "0.0.0.0", 1, None));
    assert!(
        matches!(e, ValidationError::InvalidAddress { field: "real", .. }),
        "{e}"
    );
    let e = reject(
        &mut b,
        Change::AddVip {
            spec: vip("udp/224.0.0.1:53"),
            flags: VipFlags::default(),
        },
    );
    assert!(
        matches!(e, ValidationError::InvalidAddress { field: "vip", .. }),
        "{e}"
    );
    let e = reject(
        &mut b,
        Change::DelReal {
            vip: v4vip,
            addr: ip("10.0.0.99").into(),
        },
    );
    assert!(matches!(e, ValidationError::UnknownReal { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "real 10.0.0.99 is not in VIP tcp/10.0.0.100:80"
    );
    let e = reject(
        &mut b,
        Change::SetFlags {
            vip: vip("tcp/10.0.0.1:1"),
            flags: VipFlags::default(),
        },
    );
    assert!(matches!(e, ValidationError::UnknownVip { .. }), "{e}");
}

#[test]
fn limits_are_enforced() {
    let (mut b, _) = balancer_with(Limits {
        max_vips: 2,
        max_reals: 4, // ids 1..=3
        ring_size: M,
    });
    let specs = [
        vip("tcp/10.0.0.100:80"),
        vip("tcp/10.0.0.101:80"),
        vip("tcp/10.0.0.102:80"),
    ];
    let add = |spec| Change::AddVip {
        spec,
        flags: VipFlags::default(),
    };
    let (change, e) = validation(
        b.apply(specs.iter().map(|s| add(*s)).collect())
            .unwrap_err(),
    );
    assert_eq!(change, None);
    assert!(
        matches!(e, ValidationError::TooManyVips { limit: 2, .. }),
        "{e}"
    );
    assert!(b.snapshot().vips.is_empty());
    assert!(b.dataplane().vips.is_empty());

    b.apply(vec![add(specs[0]), add(specs[1])]).expect("valid");
    let reals: Vec<Change> = ["10.0.0.11", "10.0.0.12", "10.0.0.13", "10.0.0.14"]
        .iter()
        .map(|a| add_real(specs[0], a, 1, Some(mac(1))))
        .collect();
    let (_, e) = validation(b.apply(reals.clone()).unwrap_err());
    assert!(
        matches!(e, ValidationError::TooManyReals { limit: 3, .. }),
        "{e}"
    );
    assert!(b.dataplane().reals.is_empty());
    b.apply(reals[..3].to_vec()).expect("valid");
    // A freed id in quarantine is not free.
    b.del_real(specs[0], ip("10.0.0.11")).expect("valid");
    let (_, e) = validation(b.apply(vec![reals[3].clone()]).unwrap_err());
    assert!(
        matches!(e, ValidationError::TooManyReals { quarantined: 1, .. }),
        "{e}"
    );
}

#[test]
fn ring_larger_than_slots_is_rejected_with_maglev_reason() {
    let (mut b, _) = balancer_with(Limits {
        max_vips: 2,
        max_reals: 32,
        ring_size: 3,
    });
    let spec = vip("tcp/10.0.0.100:80");
    let mut changes = vec![Change::AddVip {
        spec,
        flags: VipFlags::default(),
    }];
    for n in 11..15u8 {
        changes.push(add_real(spec, &format!("10.0.0.{n}"), 1, Some(mac(n))));
    }
    let (_, e) = validation(b.apply(changes.clone()).unwrap_err());
    assert!(matches!(e, ValidationError::Ring { .. }), "{e}");
    assert!(b.dataplane().vips.is_empty());
    // Fewer reals than slots: accepted, with Maglev's spread warning.
    changes.truncate(3);
    let report = b.apply(changes).expect("valid");
    assert!(report.vips[0].spread_warning.is_some());
}

#[test]
fn failed_write_rolls_back_at_every_point() {
    let spec = vip("tcp/10.0.0.100:80");
    let other = vip("udp/10.0.0.100:0");
    let setup = || {
        let mut b = probe_balancer();
        b.apply(three_reals(spec)).expect("valid");
        b
    };
    let batch = || {
        vec![
            Change::DelReal {
                vip: spec,
                addr: ip("10.0.0.12").into(),
            },
            add_real(spec, "10.0.0.14", 1, Some(mac(14))),
            Change::SetFlags {
                vip: spec,
                flags: VipFlags {
                    no_src_port: true,
                    no_conntrack: false,
                },
            },
            Change::AddVip {
                spec: other,
                flags: VipFlags::default(),
            },
            add_real(other, "10.0.0.21", 1, Some(mac(21))),
        ]
    };
    let mut b = setup();
    b.dataplane_mut().take_log();
    let writes = b.apply(batch()).expect("valid").map_writes;
    assert_eq!(b.dataplane_mut().take_log().len(), writes);
    let applied = b.snapshot();
    assert!(writes >= 8);

    for fail_at in 0..writes {
        let mut b = setup();
        let state = b.snapshot();
        let maps = visible(b.dataplane());
        b.dataplane_mut().take_log();
        b.dataplane_mut().fail_at = Some(fail_at);
        let err = b.apply(batch()).unwrap_err();
        match &err {
            BalancerError::Write {
                rollback: Rollback::Restored { writes },
                ..
            } => assert!(*writes <= fail_at),
            other => panic!("write {fail_at}: {other}"),
        }
        assert_eq!(b.snapshot().vips, state.vips, "write {fail_at}");
        assert_eq!(visible(b.dataplane()), maps, "write {fail_at}");
        assert!(!b.needs_repair());
        // A real made alive for a moment may be named by a tracked flow: its id is kept from
        // the next real.
        let alive_for_a_moment: Vec<u32> = b.dataplane().log[..fail_at]
            .iter()
            .filter_map(|e| e.strip_prefix("REALS")?.strip_suffix('+')?.parse().ok())
            .collect();
        let quarantined: Vec<u32> = b.snapshot().quarantined.iter().map(|q| q.id).collect();
        assert_eq!(quarantined, alive_for_a_moment, "write {fail_at}");
        // The same batch succeeds afterwards and gives the same configuration.
        b.apply(batch()).expect("valid");
        let config = crate::core::config::DesiredState::from_snapshot;
        assert_eq!(config(&b.snapshot()), config(&applied), "write {fail_at}");
    }
}

#[test]
fn failed_write_with_failed_rollback_is_repaired() {
    let (mut b, _) = balancer();
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(three_reals(spec)).expect("valid");
    let state = b.snapshot();
    let maps = visible(b.dataplane());
    // The fake keeps failing once it starts: the rollback fails too. Four writes succeed
    // (the new real's counters, its entry, the ring, the flip); clearing .12 fails.
    b.dataplane_mut().fail_after = Some(4);
    let err = b
        .apply(vec![
            Change::DelReal {
                vip: spec,
                addr: ip("10.0.0.12").into(),
            },
            add_real(spec, "10.0.0.14", 1, Some(mac(14))),
        ])
        .unwrap_err();
    assert!(
        matches!(
            err,
            BalancerError::Write {
                rollback: Rollback::Incomplete { pending: 2, .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("repair"), "{err}");
    assert_eq!(b.snapshot().vips, state.vips);
    assert!(b.needs_repair());
    assert_ne!(visible(b.dataplane()), maps);
    // Still failing: apply refuses to go further.
    assert!(matches!(
        b.add_vip(vip("tcp/10.0.0.101:80"), VipFlags::default()),
        Err(BalancerError::Repair { pending: 2, .. })
    ));
    b.dataplane_mut().fail_after = None;
    assert_eq!(b.repair().expect("repaired"), 2);
    assert_eq!(visible(b.dataplane()), maps);
    assert_eq!(b.snapshot().vips, state.vips);
}

// ---- restart ----

#[test]
fn second_balancer_over_same_maps_rewrites_no_ring() {
    let clock = ManualClock::new();
    let web = vip("tcp/10.0.0.100:80");
    let dns = vip("udp/[2001:db8::100]:53");
    let mut config = three_reals(web);
    config.extend([
        Change::AddVip {
            spec: dns,
            flags: VipFlags {
                no_src_port: false,
                no_conntrack: true,
            },
        },
        add_real(dns, "2001:db8::11", 1, Some(mac(11))),
        add_real(dns, "2001:db8::12", 1, Some(mac(12))),
    ]);
    let mut first = Balancer::with_clock(FakeDataplane::new(limits()), QUARANTINE, clock.clone());
    first.apply(config.clone()).expect("valid");
    // Move dns's live ring to generation 1, so adoption must read the right half. (The
    // removed real has the highest id: a fresh Balancer numbers the rest the same way.)
    first.del_real(dns, ip("2001:db8::12")).expect("valid");
    let state = first.snapshot();
    let fake = first.into_dataplane();
    let maps = visible(&fake);
    let ring_writes = fake.ring_writes;

    // The same final configuration, changes in another order.
    let (vips, reals): (Vec<Change>, Vec<Change>) = config
        .into_iter()
        .filter(
            |c| !matches!(c, Change::AddReal { addr, .. } if *addr == ip("2001:db8::12").into()),
        )
        .partition(|c| matches!(c, Change::AddVip { .. }));
    let replay: Vec<Change> = vips
        .into_iter()
        .rev()
        .chain(reals.into_iter().rev())
        .collect();
    let mut second = Balancer::with_clock(fake, QUARANTINE, clock);
    let report = second.apply(replay).expect("valid");
    assert_eq!(second.dataplane().ring_writes, ring_writes);
    assert!(report
        .vips
        .iter()
        .all(|v| matches!(v.ring, RingUpdate::AlreadyLive { .. })));
    assert_eq!(report.vips.len(), 2);
    assert_eq!(visible(second.dataplane()), maps);
    let mut adopted = second.snapshot();
    adopted.quarantined = state.quarantined.clone();
    assert_eq!(adopted, state);
    assert_eq!(second.snapshot().vips[1].generation, 1);
}

/// After removals the ids have holes a fresh numbering would not reproduce; `restore`
/// gives every real its id back (tracked flows name it), rewrites no live ring, and keeps
/// the quarantine of freed ids.
#[test]
fn restore_keeps_ids_with_holes_and_rewrites_no_ring() {
    let clock = ManualClock::new();
    let web = vip("tcp/10.0.0.100:80");
    let mut first = Balancer::with_clock(FakeDataplane::new(limits()), QUARANTINE, clock.clone());
    first.apply(three_reals(web)).expect("valid");
    first.del_real(web, ip("10.0.0.11")).expect("valid");
    first
        .add_real(web, ip("10.0.0.14"), 2, Some(mac(14)))
        .expect("valid");
    let state = first.snapshot();
    let ids: Vec<u32> = state.vips[0].reals.iter().map(|r| r.id).collect();
    assert_ne!(
        ids,
        vec![1, 2, 3],
        "the scenario must leave a hole: {ids:?}"
    );
    let saved = state.records();
    let fake = first.into_dataplane();
    let maps = visible(&fake);
    let ring_writes = fake.ring_writes;

    let mut second = Balancer::with_clock(fake, QUARANTINE, clock.clone());
    let report = second
        .restore(&saved, &state.quarantined)
        .expect("restores");
    assert_eq!(
        second.dataplane().ring_writes,
        ring_writes,
        "a ring was rewritten"
    );
    assert!(report
        .vips
        .iter()
        .all(|v| matches!(v.ring, RingUpdate::AlreadyLive { .. })));
    assert_eq!(visible(second.dataplane()), maps);
    assert_eq!(second.snapshot(), state);
    // The freed id stays quarantined: a new real does not get it.
    let freed = state.quarantined[0].id;
    second
        .add_real(web, ip("10.0.0.15"), 1, Some(mac(15)))
        .expect("valid");
    assert_ne!(second.real_id(&web, ip("10.0.0.15")), Some(freed));

    // Duplicate ids are refused as a whole.
    let mut dup = saved.clone();
    dup[0].reals[1].id = dup[0].reals[0].id;
    let mut third = Balancer::with_clock(FakeDataplane::new(limits()), QUARANTINE, clock);
    assert!(third.restore(&dup, &[]).is_err());
    assert!(third.snapshot().vips.is_empty());
}

/// A write failing during `restore` must not undo anything: the adopted maps hold the
/// live config, and an undo computed from the empty pre-replay state would delete it.
#[test]
fn failed_restore_leaves_adopted_maps_forwarding() {
    let clock = ManualClock::new();
    let web = vip("tcp/10.0.0.100:80");
    let mut first = Balancer::with_clock(FakeDataplane::new(limits()), QUARANTINE, clock.clone());
    first.apply(three_reals(web)).expect("valid");
    let state = first.snapshot();
    let saved = state.records();
    let mut probe = first.into_dataplane();
    let before = visible(&probe);
    probe.take_log();
    // The third write of the replay fails once; undo writes, if any, would succeed.
    probe.fail_at = Some(2);
    let mut second = Balancer::with_clock(probe, QUARANTINE, clock);
    assert!(
        second.restore(&saved, &[]).is_err(),
        "the third write fails"
    );
    let probe = second.into_dataplane();
    assert_eq!(
        visible(&probe),
        before,
        "the live maps were changed by a failed replay"
    );
}

// ---- flags and VIP_ADDRS ----

#[test]
fn flags_reach_vip_meta() {
    let (mut b, _) = balancer();
    let spec = vip("tcp/10.0.0.100:80");
    let flags = VipFlags {
        no_src_port: true,
        no_conntrack: false,
    };
    b.add_vip(spec, flags).expect("valid");
    assert_eq!(b.dataplane().vip_meta[&0].flags, VIP_F_NO_SRC_PORT);
    let rings = b.dataplane().ring_writes;
    let report = b
        .set_flags(
            spec,
            VipFlags {
                no_src_port: true,
                no_conntrack: true,
            },
        )
        .expect("valid");
    assert_eq!(b.dataplane().vip_meta[&0].flags, VIP_F_ALL);
    assert_eq!(b.dataplane().vip_meta[&0].in_use, 1);
    assert!(report.vips.is_empty());
    assert_eq!(report.map_writes, 1);
    assert_eq!(b.dataplane().ring_writes, rings);
    assert_eq!(b.snapshot().vips[0].flags.bits(), VIP_F_ALL);
}

#[test]
fn port0_vip_sets_vip_addrs_bit() {
    let (mut b, _) = balancer();
    let addr = v4("10.0.0.100");
    let value = |b: &TestBalancer| b.dataplane().vip_addrs.get(&addr).copied();
    let all_udp = vip("udp/10.0.0.100:0");
    let web = vip("tcp/10.0.0.100:80");
    let all_tcp = vip("tcp/10.0.0.100:0");
    b.add_vip(all_udp, VipFlags::default()).expect("valid");
    assert_eq!(
        value(&b),
        Some(VipAddrValue {
            vip_count: 1,
            port0: VIP_ADDR_PORT0_UDP
        })
    );
    assert_eq!(b.dataplane().vips[&all_udp.key()], 0);
    assert_eq!(all_udp.key().port_be, 0);
    b.add_vip(web, VipFlags::default()).expect("valid");
    assert_eq!(
        value(&b),
        Some(VipAddrValue {
            vip_count: 2,
            port0: VIP_ADDR_PORT0_UDP
        })
    );
    b.add_vip(all_tcp, VipFlags::default()).expect("valid");
    assert_eq!(
        value(&b),
        Some(VipAddrValue {
            vip_count: 3,
            port0: VIP_ADDR_PORT0_UDP | VIP_ADDR_PORT0_TCP
        })
    );
    b.del_vip(all_udp).expect("valid");
    assert_eq!(
        value(&b),
        Some(VipAddrValue {
            vip_count: 2,
            port0: VIP_ADDR_PORT0_TCP
        })
    );
    b.apply(vec![
        Change::DelVip { spec: web },
        Change::DelVip { spec: all_tcp },
    ])
    .expect("valid");
    assert_eq!(value(&b), None);
    assert!(b.dataplane().vips.is_empty());
}

#[test]
fn snapshot_lists_the_desired_state() {
    let (mut b, _) = balancer();
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(three_reals(spec)).expect("valid");
    b.add_real(spec, ip("10.0.0.14"), 0, None).expect("valid");
    let snap = b.snapshot();
    assert_eq!(snap.vips.len(), 1);
    let v = &snap.vips[0];
    assert_eq!(
        (v.spec, v.id, v.flags, v.generation),
        (spec, 0, VipFlags::default(), 0)
    );
    let reals: Vec<(IpAddr, u32, u32, Option<Mac>, bool)> = v
        .reals
        .iter()
        .map(|r| (r.addr.ip, r.id, r.weight, r.mac, r.in_ring))
        .collect();
    assert_eq!(
        reals,
        vec![
            (ip("10.0.0.11"), 1, 1, Some(mac(11)), true),
            (ip("10.0.0.12"), 2, 2, Some(mac(12)), true),
            (ip("10.0.0.13"), 3, 1, Some(mac(13)), true),
            (ip("10.0.0.14"), 4, 0, None, false),
        ]
    );
}

// ---- grace periods, id reuse at capacity, counters ----

#[test]
fn a_plan_says_when_it_may_be_written_and_a_stale_plan_is_refused() {
    let (mut b, clock) = balancer();
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(three_reals(spec)).expect("valid");
    clock.advance(Duration::from_secs(1));
    // A flip without a barrier after it (nothing was cleared).
    b.add_real(spec, ip("10.0.0.14"), 1, Some(mac(14)))
        .expect("valid");
    let flipped = clock.now();
    // The next ring of this VIP goes into the half that just went idle.
    let plan = b
        .plan(vec![add_real(spec, "10.0.0.15", 1, Some(mac(15)))])
        .expect("valid");
    assert_eq!(plan.not_before(), Some(flipped + DEFAULT_GRACE));
    // Another commit in between makes the plan stale: refused, nothing written.
    b.set_flags(
        spec,
        VipFlags {
            no_src_port: true,
            no_conntrack: false,
        },
    )
    .expect("valid");
    b.dataplane_mut().take_log();
    assert!(matches!(b.commit(plan), Err(BalancerError::StalePlan)));
    assert!(b.dataplane_mut().take_log().is_empty());
    // Once the grace period has passed on the clock, a plan needs no wait, but the kernel's
    // own grace period still comes first (nothing has quiesced since the flip).
    clock.advance(DEFAULT_GRACE);
    let plan = b
        .plan(vec![add_real(spec, "10.0.0.15", 1, Some(mac(15)))])
        .expect("valid");
    assert_eq!(plan.not_before(), None);
    b.commit(plan).expect("commits");
    let log = b.dataplane_mut().take_timed_log();
    assert_eq!(log[0].0, "QUIESCE", "{log:?}");
    // Long after, with a quiesce since: neither.
    clock.advance(Duration::from_secs(1));
    b.dataplane_mut().take_log();
    b.add_real(spec, ip("10.0.0.16"), 1, Some(mac(16)))
        .expect("valid");
    clock.advance(Duration::from_secs(1));
    b.barrier();
    b.dataplane_mut().take_log();
    let plan = b
        .plan(vec![add_real(spec, "10.0.0.17", 1, Some(mac(17)))])
        .expect("valid");
    assert_eq!(plan.not_before(), None);
    b.commit(plan).expect("commits");
    assert!(
        b.dataplane().quiesced.is_empty(),
        "a covered half quiesced again"
    );
}

#[test]
fn at_capacity_a_vip_replaced_by_another_reuses_its_id_after_a_barrier() {
    let (mut b, clock) = balancer_with(Limits {
        max_vips: 2,
        ..limits()
    });
    let a = vip("tcp/10.0.0.100:80");
    let other = vip("tcp/10.0.0.101:80");
    let c = vip("udp/10.0.0.102:53");
    b.apply(three_reals(a)).expect("valid");
    b.add_vip(other, VipFlags::default()).expect("valid");
    clock.advance(Duration::from_secs(1));
    b.dataplane_mut().take_log();
    // Counts left by A under id 0 must not be C's.
    b.dataplane()
        .counters
        .0
        .lock()
        .expect("counters")
        .vips
        .insert(
            0,
            lb_common::VipStats {
                packets: 99,
                ..Default::default()
            },
        );
    let report = b
        .apply(vec![
            Change::DelVip { spec: a },
            Change::AddVip {
                spec: c,
                flags: VipFlags::default(),
            },
            add_real(c, "10.0.0.21", 1, Some(mac(21))),
        ])
        .expect("the map is full, but A's id is free once A is gone");
    assert_eq!(b.vip_id(&c), Some(0));
    assert_eq!(report.vips.len(), 1);
    let log = b.dataplane_mut().take_timed_log();
    let names: Vec<&str> = log.iter().map(|(e, _)| e.as_str()).collect();
    // A's key goes, then (a grace period later) A's reals; only then does id 0 get C's
    // counters, entries, ring and meta, and C's key last.
    assert_eq!(
        names,
        [
            "VIPS-",
            "QUIESCE",
            "REALS1-",
            "REALS2-",
            "REALS3-",
            "STATS-VIP0",
            "STATS-REAL4",
            "REALS4+",
            "RING0:g1",
            "META0:g1",
            "ADDRS-",
            "ADDRS+",
            "VIPS+0"
        ]
    );
    assert!(log[2].1 >= log[0].1 + DEFAULT_GRACE, "{log:?}");
    assert_eq!(b.dataplane().vip_stats(0).expect("stats").packets, 0);
    let maps = visible(b.dataplane());
    assert_eq!(maps.vips.len(), 2);
    assert_eq!(maps.vips.get(&c.key()), Some(&0));
    assert!(!maps.vips.contains_key(&a.key()));
    assert!(maps.reals.keys().all(|id| *id == 4), "{:?}", maps.reals);
    assert_eq!(maps.vip_addrs.len(), 2);
}

#[test]
fn at_capacity_a_real_replaced_by_another_is_refused_naming_the_limit_and_the_quarantine() {
    let (mut b, _) = balancer_with(Limits {
        max_reals: 4,
        ..limits()
    });
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(three_reals(spec)).expect("valid");
    let before = visible(b.dataplane());
    let err = b
        .apply(vec![
            Change::DelReal {
                vip: spec,
                addr: ip("10.0.0.13").into(),
            },
            add_real(spec, "10.0.0.14", 1, Some(mac(14))),
        ])
        .unwrap_err();
    let message = err.to_string();
    for part in [
        "no free real id for real 10.0.0.14",
        "at most 3 reals (--max-reals)",
        "1 freed ids are still in quarantine",
        "not reused for 900s",
    ] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
    assert_eq!(
        visible(b.dataplane()),
        before,
        "a refused apply wrote something"
    );
}

#[test]
fn counters_of_a_reused_real_id_are_zeroed_before_it_goes_live() {
    let (mut b, clock) = balancer();
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(three_reals(spec)).expect("valid");
    b.del_real(spec, ip("10.0.0.12")).expect("valid");
    clock.advance(QUARANTINE);
    b.dataplane()
        .counters
        .0
        .lock()
        .expect("counters")
        .reals
        .insert(
            2,
            lb_common::RealStats {
                packets: 7,
                ..Default::default()
            },
        );
    b.dataplane_mut().take_log();
    b.add_real(spec, ip("10.0.0.15"), 1, Some(mac(15)))
        .expect("valid");
    assert_eq!(b.real_id(&spec, ip("10.0.0.15")), Some(2));
    assert_eq!(b.dataplane().real_stats(2).expect("stats").packets, 0);
    let log = b.dataplane_mut().take_log();
    assert!(pos(&log, "STATS-REAL2") < pos(&log, "REALS2+"), "{log:?}");
}

// ---- adoption ----

/// A first daemon's maps: web (3 reals) and dns (2 reals), a real removed from web.
fn previous_daemon() -> (FakeDataplane, Snapshot, Snapshot, ManualClock) {
    let clock = ManualClock::new();
    let web = vip("tcp/10.0.0.100:80");
    let dns = vip("udp/[2001:db8::100]:53");
    let fake = FakeDataplane::new(limits()).with_clock(clock.clone());
    let mut first = Balancer::with_clock(fake, QUARANTINE, clock.clone());
    first.apply(three_reals(web)).expect("valid");
    let older = first.snapshot();
    first
        .apply(vec![
            Change::AddVip {
                spec: dns,
                flags: VipFlags::default(),
            },
            add_real(dns, "2001:db8::11", 1, Some(mac(11))),
            add_real(dns, "2001:db8::12", 1, Some(mac(12))),
            add_real(web, "10.0.0.14", 1, Some(mac(14))),
        ])
        .expect("valid");
    let current = first.snapshot();
    (first.into_dataplane(), older, current, clock)
}

#[test]
fn adopting_with_the_current_state_changes_nothing() {
    let (mut fake, _, current, clock) = previous_daemon();
    fake.take_log();
    let maps = visible(&fake);
    let ring_writes = fake.ring_writes;
    let mut b = Balancer::with_clock(fake, QUARANTINE, clock);
    let report = b.adopt(&current.records(), &[]).expect("adopts");
    assert_eq!(report.stale_vips, 0);
    assert!(report.stale_reals.is_empty());
    assert_eq!((report.stale_meta, report.stale_addrs), (0, 0));
    assert_eq!(b.dataplane().ring_writes, ring_writes);
    assert_eq!(visible(b.dataplane()), maps);
    assert!(
        !b.dataplane().log.iter().any(|e| e.starts_with("STATS")),
        "adopted counters were zeroed: {:?}",
        b.dataplane().log
    );
    assert_eq!(b.snapshot().vips, current.vips);
}

#[test]
fn adopting_without_a_state_file_clears_every_map_and_quarantines_the_real_ids() {
    let (mut fake, _, current, clock) = previous_daemon();
    // A fragment-policy entry whose VIP was lost long ago.
    fake.vip_addrs.insert(
        v4("10.9.9.9"),
        VipAddrValue {
            vip_count: 1,
            port0: 0,
        },
    );
    let mut b = Balancer::with_clock(fake, QUARANTINE, clock);
    let report = b.adopt(&[], &[]).expect("adopts");
    assert_eq!(report.stale_vips, 2);
    assert_eq!(report.stale_reals, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(report.stale_meta, 2);
    assert_eq!(report.stale_addrs, 3);
    let maps = visible(b.dataplane());
    assert!(maps.vips.is_empty(), "{:?}", maps.vips);
    assert!(maps.vip_addrs.is_empty(), "{:?}", maps.vip_addrs);
    assert!(maps.vip_meta.is_empty(), "{:?}", maps.vip_meta);
    assert!(maps.reals.is_empty(), "{:?}", maps.reals);
    // The same config applied again gets new real ids: tracked flows may name the old ones.
    let web = vip("tcp/10.0.0.100:80");
    b.apply(three_reals(web)).expect("valid");
    let ids: Vec<u32> = b.snapshot().vips[0].reals.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![7, 8, 9]);
    assert_eq!(b.snapshot().quarantined.len(), 6);
    drop(current);
}

#[test]
fn adopting_an_older_state_file_clears_what_came_after_it() {
    let (fake, older, current, clock) = previous_daemon();
    let web = vip("tcp/10.0.0.100:80");
    let dns = vip("udp/[2001:db8::100]:53");
    let dns_id = current.vips.iter().find(|v| v.spec == dns).expect("dns").id;
    let mut b = Balancer::with_clock(fake, QUARANTINE, clock);
    let report = b.adopt(&older.records(), &[]).expect("adopts");
    // dns and the real added to web later are gone from every map.
    assert_eq!(report.stale_vips, 1);
    assert_eq!(report.stale_reals, vec![4, 5, 6]);
    assert_eq!(report.stale_meta, 1);
    assert_eq!(report.stale_addrs, 1);
    let maps = visible(b.dataplane());
    assert_eq!(maps.vips.len(), 1);
    assert_eq!(maps.vips.get(&web.key()), Some(&0));
    assert!(!maps.vip_meta.contains_key(&dns_id));
    assert_eq!(
        maps.reals.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(maps.vip_addrs.len(), 1);
    // web's live ring is the older one again (without .14), the state the older one.
    assert_eq!(b.snapshot().vips, older.vips);
    assert_eq!(
        maps.live_rings[&0],
        expected_ring(&[
            ("10.0.0.11", 1, 1),
            ("10.0.0.12", 2, 2),
            ("10.0.0.13", 1, 3)
        ])
    );
    let q: Vec<u32> = b.snapshot().quarantined.iter().map(|q| q.id).collect();
    assert_eq!(q, vec![4, 5, 6]);
}

#[test]
fn adoption_quarantines_ids_tracked_flows_name_that_no_entry_holds() {
    let (fake, older, _, clock) = previous_daemon();
    // A real added and removed after the older state was written: its entry is zero, but a
    // tracked flow still names its id.
    let key = crate::core::balancer::sync::packet_key(
        &vip("tcp/10.0.0.100:80"),
        ip("192.0.2.1"),
        4660,
        80,
    );
    fake.conntrack.insert(&key, 9);
    let mut b = Balancer::with_clock(fake, QUARANTINE, clock);
    let report = b.adopt(&older.records(), &[]).expect("adopts");
    assert_eq!(report.stale_named, vec![9]);
    assert!(b.snapshot().quarantined.iter().any(|q| q.id == 9));
    // New reals skip it.
    let web = vip("tcp/10.0.0.100:80");
    for n in 20..27 {
        b.add_real(web, ip(&format!("10.0.0.{n}")), 1, Some(mac(n)))
            .expect("valid");
    }
    let ids: Vec<u32> = b.snapshot().vips[0].reals.iter().map(|r| r.id).collect();
    assert!(!ids.contains(&9), "{ids:?}");
}

#[test]
fn adoption_makes_room_in_a_full_vip_addrs_before_the_replay() {
    let (mut fake, older, _, clock) = previous_daemon();
    // Every slot of VIP_ADDRS taken by addresses no saved VIP has.
    fake.vip_addrs.clear();
    for n in 0..limits().max_vips as u8 {
        fake.vip_addrs.insert(
            v4(&format!("10.9.9.{n}")),
            VipAddrValue {
                vip_count: 1,
                port0: 0,
            },
        );
    }
    let mut b = Balancer::with_clock(fake, QUARANTINE, clock);
    let report = b
        .adopt(&older.records(), &[])
        .expect("adopts into a full map");
    assert_eq!(report.stale_addrs, limits().max_vips as usize);
    let maps = visible(b.dataplane());
    assert_eq!(
        maps.vip_addrs.keys().collect::<Vec<_>>(),
        vec![&v4("10.0.0.100")]
    );
}
