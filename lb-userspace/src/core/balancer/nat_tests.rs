//! NAT mode in the balancer: what it writes (`REALS` with the real's port, the reverse index
//! `REVNAT`), what it refuses (mixed modes, a port without NAT, a reverse key serving two
//! VIPs, another family), and reals of one address on several ports.

use lb_common::{v4_mapped, RevNat, RevNatKey, IPPROTO_TCP, IPPROTO_UDP, REAL_F_ALIVE, REAL_F_NAT};

use super::{
    tests::{balancer, mac, vip, TestBalancer},
    *,
};
use crate::model::RealAddr;

fn real(s: &str) -> RealAddr {
    s.parse().expect("test real parses")
}

fn nat_vip(spec: VipSpec) -> Vec<Change> {
    vec![
        Change::AddVip {
            spec,
            flags: VipFlags::default(),
        },
        Change::SetMode {
            vip: spec,
            real: None,
            mode: Some(Mode::Nat),
        },
    ]
}

fn add(vip: VipSpec, addr: &str, m: u8) -> Change {
    Change::AddReal {
        vip,
        addr: real(addr),
        weight: 1,
        mac: Some(mac(m)),
    }
}

fn key(addr: [u8; 4], port: u16, proto: u8) -> RevNatKey {
    RevNatKey {
        addr: v4_mapped(addr),
        port_be: port.to_be(),
        proto,
        _pad: 0,
    }
}

#[test]
fn a_nat_real_gets_its_port_and_a_reverse_entry_that_leave_with_it() {
    let (mut b, _clock) = balancer();
    let web = vip("tcp/10.0.0.100:80");
    let mut changes = nat_vip(web);
    changes.push(add(web, "10.0.1.11:8080", 11));
    changes.push(add(web, "10.0.1.12", 12));
    b.apply(changes).expect("NAT VIP");
    let id11 = b.real_id(&web, real("10.0.1.11:8080")).expect("id");
    let id12 = b.real_id(&web, real("10.0.1.12")).expect("id");
    let fake = b.dataplane();
    let r = fake.reals[&id11];
    assert_eq!(r.flags, REAL_F_ALIVE | REAL_F_NAT);
    assert_eq!(
        (r.addr, r.mac, u16::from_be(r.port_be)),
        (v4_mapped([10, 0, 1, 11]), mac(11), 8080)
    );
    // Without a port of its own it keeps the VIP's (0 in the map: the packet's own).
    assert_eq!(fake.reals[&id12].port_be, 0);
    let vip_id = b.vip_id(&web).expect("vip id");
    let rv = |real_id| RevNat {
        vip_addr: v4_mapped([10, 0, 0, 100]),
        vip_port_be: 80u16.to_be(),
        _pad: 0,
        real_id,
        vip_id,
    };
    let want = std::collections::HashMap::from([
        (key([10, 0, 1, 11], 8080, IPPROTO_TCP), rv(id11)),
        (key([10, 0, 1, 12], 80, IPPROTO_TCP), rv(id12)),
        (key([10, 0, 1, 11], 0, 0), RevNat::default()),
        (key([10, 0, 1, 12], 0, 0), RevNat::default()),
    ]);
    assert_eq!(fake.revnat, want);

    b.del_real(web, real("10.0.1.11:8080")).expect("del");
    let fake = b.dataplane();
    assert!(!fake
        .revnat
        .contains_key(&key([10, 0, 1, 11], 8080, IPPROTO_TCP)));
    assert!(!fake.revnat.contains_key(&key([10, 0, 1, 11], 0, 0)));
    assert_eq!(fake.revnat.len(), 2);
    // The reverse entry goes after the barrier that retires the real's REALS entry.
    let log = &fake.log;
    let del = log.iter().rposition(|e| e == "REVNAT-").expect("deleted");
    let real_gone = log.iter().rposition(|e| e == &format!("REALS{id11}-"));
    assert!(real_gone.is_none_or(|r| r < del), "{log:?}");
}

#[test]
fn reals_of_one_address_on_two_ports_are_two_reals() {
    let (mut b, _clock) = balancer();
    let web = vip("tcp/10.0.0.100:80");
    let mut changes = nat_vip(web);
    changes.push(add(web, "10.0.1.11:8080", 11));
    changes.push(add(web, "10.0.1.11:8081", 11));
    b.apply(changes).expect("two ports");
    let a = b.real_id(&web, real("10.0.1.11:8080")).expect("id");
    let c = b.real_id(&web, real("10.0.1.11:8081")).expect("id");
    assert_ne!(a, c);
    let ring = b.live_ring(&web).expect("read").expect("ring");
    let share = |id| ring.iter().filter(|s| **s == id).count();
    assert!(
        share(a) > 400 && share(c) > 400,
        "{} / {}",
        share(a),
        share(c)
    );
    // One neighbour: its MAC set by address reaches both.
    b.set_mac(Some(web), "10.0.1.11".parse().expect("ip"), Some(mac(99)))
        .expect("mac");
    let fake = b.dataplane();
    assert_eq!((fake.reals[&a].mac, fake.reals[&c].mac), (mac(99), mac(99)));
}

#[test]
fn what_nat_cannot_do_is_refused_with_the_reason_and_changes_nothing() {
    let (mut b, _clock) = balancer();
    let web = vip("tcp/10.0.0.100:80");
    let mut changes = nat_vip(web);
    changes.push(add(web, "10.0.1.11:8080", 11));
    b.apply(changes).expect("NAT VIP");
    let other = vip("tcp/10.0.0.101:80");
    b.apply(vec![Change::AddVip {
        spec: other,
        flags: VipFlags::default(),
    }])
    .expect("DR VIP");
    let before = b.snapshot();
    let writes = b.dataplane().writes;
    let refused = |b: &mut TestBalancer, changes: Vec<Change>| {
        let e = b.apply(changes).expect_err("refused");
        assert!(e.validation().is_some(), "{e}");
        e.to_string()
    };
    let cases: Vec<(Vec<Change>, &str)> = vec![
        (
            vec![
                add(web, "10.0.1.12", 12),
                Change::SetMode {
                    vip: web,
                    real: Some(real("10.0.1.12")),
                    mode: Some(Mode::Dr),
                },
            ],
            "NAT reals cannot share a VIP with reals of another mode",
        ),
        (
            vec![add(other, "10.0.1.13:8080", 13)],
            "only a NAT real has a port",
        ),
        (
            {
                let mut c = nat_vip(vip("tcp/10.0.0.102:80"));
                c.push(add(vip("tcp/10.0.0.102:80"), "10.0.1.11:8080", 11));
                c
            },
            "already serves VIP tcp/10.0.0.100:80 in NAT mode",
        ),
        (
            {
                let mut c = nat_vip(vip("tcp/10.0.0.103:0"));
                c.push(add(vip("tcp/10.0.0.103:0"), "10.0.1.14:8080", 14));
                c
            },
            "serves every port",
        ),
        (
            vec![add(web, "2001:db8::11", 15)],
            "within one address family",
        ),
    ];
    for (changes, want) in cases {
        let e = refused(&mut b, changes);
        assert!(e.contains(want), "{e}\nlacks {want:?}");
    }
    assert_eq!(b.snapshot(), before);
    assert_eq!(b.dataplane().writes, writes, "nothing written");
    // The same address and port over UDP is another service: allowed.
    let dns = vip("udp/10.0.0.100:8080");
    let mut changes = nat_vip(dns);
    changes.push(add(dns, "10.0.1.11", 11));
    b.apply(changes).expect("UDP on the same port");
    assert!(b
        .dataplane()
        .revnat
        .contains_key(&key([10, 0, 1, 11], 8080, IPPROTO_UDP)));
}

#[test]
fn a_nat_real_with_a_port_is_checked_on_that_port() {
    let (mut b, _clock) = balancer();
    let web = vip("tcp/10.0.0.100:80");
    let mut changes = nat_vip(web);
    changes.push(add(web, "10.0.1.11:8080", 11));
    changes.push(add(web, "10.0.1.12", 12));
    changes.push(Change::SetCheck {
        vip: web,
        real: None,
        check: Some(Box::new(
            crate::model::CheckFields::from_json(&serde_json::json!({"type": "tcp"}))
                .expect("check"),
        )),
    });
    b.apply(changes).expect("checked NAT VIP");
    let snap = b.snapshot();
    let port_of = |addr: &str| {
        snap.vips[0]
            .reals
            .iter()
            .find(|r| r.addr == real(addr))
            .and_then(|r| r.effective_check.as_ref())
            .map(|c| c.port)
    };
    assert_eq!(port_of("10.0.1.11:8080"), Some(8080));
    assert_eq!(port_of("10.0.1.12"), Some(80));
}
