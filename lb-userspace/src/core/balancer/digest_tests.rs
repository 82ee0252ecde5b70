//! `ring_digest`: equal on nodes that reached the same configuration by different paths
//! (other ids, other orders, a restart), different when the flows would go elsewhere, and
//! exactly the SHA-256 of the live ring written as addresses.

use super::{
    tests::{add_real, balancer, ip, mac, vip, TestBalancer},
    *,
};

fn digest(b: &TestBalancer, spec: VipSpec) -> String {
    b.snapshot()
        .vips
        .iter()
        .find(|v| v.spec == spec)
        .map(|v| v.ring_digest.clone())
        .expect("the VIP")
}

/// Computed here independently of the balancer's code.
fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn add_vip(spec: VipSpec) -> Change {
    Change::AddVip {
        spec,
        flags: VipFlags::default(),
    }
}

#[test]
fn the_same_config_reached_in_another_order_with_other_ids_has_the_same_digest() {
    let (a_vip, other) = (vip("tcp/10.0.0.100:80"), vip("tcp/10.0.0.101:80"));
    let (mut a, _) = balancer();
    a.apply(vec![
        add_vip(a_vip),
        add_real(a_vip, "10.0.0.11", 1, Some(mac(11))),
        add_real(a_vip, "10.0.0.12", 2, Some(mac(12))),
        add_real(a_vip, "10.0.0.13", 1, Some(mac(13))),
    ])
    .expect("a");
    // The other node: another VIP first (other ids), reals added one by one in another
    // order, one removed and added back, a weight changed and changed back.
    let (mut b, _) = balancer();
    b.apply(vec![
        add_vip(other),
        add_real(other, "10.0.0.21", 1, Some(mac(21))),
    ])
    .expect("b");
    b.apply(vec![add_vip(a_vip)]).expect("b");
    for (addr, w, m) in [
        ("10.0.0.13", 1, 13),
        ("10.0.0.11", 5, 11),
        ("10.0.0.12", 2, 12),
    ] {
        b.apply(vec![add_real(a_vip, addr, w, Some(mac(m)))])
            .expect("b");
    }
    b.set_weight(a_vip, ip("10.0.0.11"), 1).expect("b");
    b.apply(vec![Change::DelReal {
        vip: a_vip,
        addr: ip("10.0.0.12").into(),
    }])
    .expect("b");
    b.apply(vec![add_real(a_vip, "10.0.0.12", 2, Some(mac(12)))])
        .expect("b");
    assert_ne!(a.vip_id(&a_vip), b.vip_id(&a_vip));
    assert_ne!(
        a.real_id(&a_vip, ip("10.0.0.12")),
        b.real_id(&a_vip, ip("10.0.0.12"))
    );
    assert_eq!(digest(&a, a_vip), digest(&b, a_vip));
    assert_eq!(digest(&a, a_vip).len(), 64);

    // A change of weight moves flows: another digest; undone, the same again.
    let before = digest(&a, a_vip);
    a.set_weight(a_vip, ip("10.0.0.13"), 3).expect("a");
    assert_ne!(digest(&a, a_vip), before);
    a.set_weight(a_vip, ip("10.0.0.13"), 1).expect("a");
    assert_eq!(digest(&a, a_vip), before);
    // A restart from the saved records keeps it.
    let (mut c, _) = balancer();
    c.restore(&a.snapshot().records(), &[]).expect("restores");
    assert_eq!(digest(&c, a_vip), before);
}

#[test]
fn the_digest_is_the_sha256_of_the_live_ring_written_as_addresses() {
    let spec = vip("tcp/[2001:db8::100]:443");
    let (mut b, _) = balancer();
    b.apply(vec![
        add_vip(spec),
        add_real(spec, "2001:db8::11", 1, Some(mac(11))),
        add_real(spec, "2001:db8::12", 1, Some(mac(12))),
    ])
    .expect("applies");
    let live = b.live_ring(&spec).expect("reads").expect("the VIP");
    let snap = b.snapshot();
    let reals = &snap.vips[0].reals;
    let mut text = String::new();
    for id in &live {
        match reals.iter().find(|r| r.id == *id) {
            Some(r) => text.push_str(&format!("{}\n", r.addr)),
            None => text.push_str("-\n"),
        }
    }
    assert!(text.starts_with("2001:db8::1"), "{}", &text[..40]);
    assert_eq!(digest(&b, spec), sha256_hex(&text));

    // No usable real: every slot empty.
    for addr in ["2001:db8::11", "2001:db8::12"] {
        b.apply(vec![Change::SetMac {
            vip: None,
            addr: ip(addr),
            mac: None,
        }])
        .expect("applies");
    }
    let empty = "-\n".repeat(live.len());
    assert_eq!(digest(&b, spec), sha256_hex(&empty));
}
