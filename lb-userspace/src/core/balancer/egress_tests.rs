//! Tunnel reals reached out of another interface: the `EGRESS`/`TX_PORTS` entry goes in before
//! any `REALS` entry names it and out only after none does, a mode change forgets it, a
//! restart keeps it.

use lb_common::{REAL_F_ALIVE, REAL_F_TUNNEL};

use super::{
    tests::{add_real, balancer, ip, mac, vip, TestBalancer},
    *,
};
use crate::model::Egress;

const ETH1: Egress = Egress {
    ifindex: 7,
    mac: [0x02, 0, 0, 0, 7, 7],
    mtu: 1500,
};

fn egress(addr: &str, e: Option<Egress>) -> Change {
    Change::SetEgress {
        vip: None,
        addr: ip(addr),
        egress: e,
    }
}

/// A tunnel VIP with .11 and .12, both on the balancer's interface.
fn tunnel_vip() -> (TestBalancer, VipSpec) {
    let (b, _) = balancer();
    let mut b = b.with_default_mode(Mode::Tunnel);
    let spec = vip("tcp/10.0.0.100:80");
    b.apply(vec![
        Change::AddVip {
            spec,
            flags: VipFlags::default(),
        },
        add_real(spec, "10.9.0.11", 1, Some(mac(11))),
        add_real(spec, "10.9.0.12", 1, Some(mac(12))),
    ])
    .expect("applies");
    b.dataplane_mut().take_log();
    (b, spec)
}

fn position(b: &TestBalancer, event: &str) -> usize {
    let log = &b.dataplane().log;
    log.iter()
        .position(|e| e == event)
        .unwrap_or_else(|| panic!("{event} not in {log:?}"))
}

#[test]
fn the_interface_is_written_before_a_real_names_it_and_removed_after_none_does() {
    let (mut b, _) = tunnel_vip();
    b.apply(vec![egress("10.9.0.11", Some(ETH1))])
        .expect("applies");
    assert!(position(&b, "EGRESS7+") < position(&b, "REALS1+"));
    assert_eq!(b.dataplane().egress[&7].mac, ETH1.mac);
    let r = b.dataplane().reals[&1];
    assert_eq!((r.egress, r.flags), (7, REAL_F_ALIVE | REAL_F_TUNNEL));
    assert_eq!(b.dataplane().reals[&2].egress, 0);
    // A second real on the same interface writes nothing more to EGRESS.
    b.dataplane_mut().take_log();
    b.apply(vec![egress("10.9.0.12", Some(ETH1))])
        .expect("applies");
    assert!(!b.dataplane().log.iter().any(|e| e.starts_with("EGRESS")));

    // One leaves: the interface stays for the other.
    b.apply(vec![egress("10.9.0.11", None)]).expect("applies");
    assert!(b.dataplane().egress.contains_key(&7));
    // The last one unresolved: its entry stops naming the interface, then it goes.
    b.dataplane_mut().take_log();
    b.apply(vec![Change::SetMac {
        vip: None,
        addr: ip("10.9.0.12"),
        mac: None,
    }])
    .expect("applies");
    assert!(position(&b, "REALS2+") < position(&b, "EGRESS7-"));
    assert!(b.dataplane().egress.is_empty());
    assert_eq!(b.dataplane().reals[&2].egress, 0);
}

#[test]
fn direct_routing_ignores_an_egress_and_a_mode_change_forgets_it() {
    let (mut b, spec) = tunnel_vip();
    b.apply(vec![egress("10.9.0.11", Some(ETH1))])
        .expect("applies");
    b.apply(vec![Change::SetMode {
        vip: spec,
        real: Some(ip("10.9.0.11").into()),
        mode: Some(Mode::Dr),
    }])
    .expect("applies");
    let real = &b.snapshot().vips[0].reals[0];
    assert_eq!((real.mac, real.egress), (None, None));
    assert!(b.dataplane().egress.is_empty());
    // A direct-routing real given an egress anyway is sent out of the balancer's interface.
    b.apply(vec![
        Change::SetMac {
            vip: None,
            addr: ip("10.9.0.11"),
            mac: Some(mac(11)),
        },
        egress("10.9.0.11", Some(ETH1)),
    ])
    .expect("applies");
    assert_eq!(b.dataplane().reals[&1].egress, 0);
    assert!(b.dataplane().egress.is_empty());
}

#[test]
fn a_bad_egress_is_refused_naming_the_field_and_changes_nothing() {
    let (mut b, _) = tunnel_vip();
    for bad in [
        Egress { ifindex: 0, ..ETH1 },
        Egress {
            mac: [0x01, 0, 0, 0, 0, 1],
            ..ETH1
        },
    ] {
        let err = b
            .apply(vec![egress("10.9.0.11", Some(bad))])
            .expect_err("refused");
        assert!(err.to_string().contains("egress"), "{err}");
        assert!(b.dataplane().log.is_empty());
    }
    let err = b
        .apply(vec![egress("10.9.0.99", Some(ETH1))])
        .expect_err("refused");
    assert!(err.to_string().contains("10.9.0.99"), "{err}");
}

#[test]
fn a_restart_keeps_the_egress_of_its_reals() {
    let (mut b, _) = tunnel_vip();
    b.apply(vec![egress("10.9.0.12", Some(ETH1))])
        .expect("applies");
    let records = b.snapshot().records();
    assert_eq!(records[0].reals[1].egress, Some(ETH1));
    let text = serde_json::to_string(&records).expect("serializes");
    let back: Vec<VipRecord> = serde_json::from_str(&text).expect("parses");
    let (fresh, _) = balancer();
    let mut again = fresh.with_default_mode(Mode::Tunnel);
    again.restore(&back, &[]).expect("restores");
    assert_eq!(again.dataplane().reals[&2], b.dataplane().reals[&2]);
    assert_eq!(again.dataplane().egress, b.dataplane().egress);
}
