//! Health in the balancer: checked reals going down and up, quorum, fail-open, drop, sorry
//! server, `down_flows`, dynamic weights, and their survival across a restart.

use lb_common::{REAL_F_ALIVE, VIP_F_QUORUM_DROP};
use serde_json::json;

use super::{
    tests::{
        add_real, balancer, expected_ring, ip, mac, three_reals, validation, vip, visible,
        TestBalancer,
    },
    *,
};
use crate::model::{CheckFields, DownFlows, OnQuorumLost};

fn check(v: serde_json::Value) -> CheckFields {
    CheckFields::from_json(&v).expect("test check")
}

fn set_check(spec: VipSpec, v: serde_json::Value) -> Change {
    Change::SetCheck {
        vip: spec,
        real: None,
        check: Some(Box::new(check(v))),
    }
}

fn health(spec: VipSpec, addr: &str, down: bool) -> Change {
    Change::SetHealth {
        vip: spec,
        addr: ip(addr).into(),
        down,
        weight: None,
    }
}

fn options(b: &TestBalancer, spec: VipSpec) -> VipOptions {
    b.snapshot()
        .vips
        .iter()
        .find(|v| v.spec == spec)
        .map(|v| v.options)
        .expect("the VIP")
}

fn set_options(spec: VipSpec, f: impl FnOnce(&mut VipOptions), b: &TestBalancer) -> Change {
    let mut o = options(b, spec);
    f(&mut o);
    Change::SetOptions {
        vip: spec,
        options: o,
    }
}

/// Three reals (.11 w1 id 1, .12 w2 id 2, .13 w1 id 3) with a tcp check.
fn checked() -> (TestBalancer, VipSpec) {
    let (mut b, _) = balancer();
    let spec = vip("tcp/10.0.0.100:80");
    let mut changes = three_reals(spec);
    changes.push(set_check(spec, json!({"type": "tcp"})));
    b.apply(changes).expect("applies");
    (b, spec)
}

fn live(b: &TestBalancer, spec: &VipSpec) -> Vec<u32> {
    b.live_ring(spec).expect("reads").expect("the VIP")
}

#[test]
fn a_real_that_goes_down_leaves_the_ring_and_keeps_its_flows_by_default() {
    let (mut b, spec) = checked();
    b.dataplane_mut().ring_writes = 0;
    b.apply(vec![health(spec, "10.0.0.12", true)])
        .expect("down");
    assert_eq!(
        live(&b, &spec),
        expected_ring(&[("10.0.0.11", 1, 1), ("10.0.0.13", 1, 3)])
    );
    assert_eq!(b.dataplane().ring_writes, 1);
    // down_flows = "keep": its REALS entry stays alive, tracked flows continue.
    assert_eq!(b.dataplane().reals[&2].flags, REAL_F_ALIVE);
    let real = &b.snapshot().vips[0].reals[1];
    assert!(real.down && !real.in_ring && real.serving);
    assert_eq!(real.effective_weight, 0);

    b.apply(vec![health(spec, "10.0.0.12", false)]).expect("up");
    assert_eq!(
        live(&b, &spec),
        expected_ring(&[
            ("10.0.0.11", 1, 1),
            ("10.0.0.12", 2, 2),
            ("10.0.0.13", 1, 3)
        ])
    );
}

#[test]
fn several_transitions_in_one_batch_rebuild_the_ring_once() {
    let (mut b, spec) = checked();
    b.dataplane_mut().ring_writes = 0;
    b.apply(vec![
        health(spec, "10.0.0.11", true),
        health(spec, "10.0.0.12", true),
    ])
    .expect("down");
    assert_eq!(b.dataplane().ring_writes, 1);
    assert_eq!(live(&b, &spec), expected_ring(&[("10.0.0.13", 1, 3)]));
}

#[test]
fn down_flows_move_clears_the_entry_after_a_barrier_and_back_up_keeps_the_counters() {
    let (mut b, spec) = checked();
    let c = set_options(spec, |o| o.down_flows = DownFlows::Move, &b);
    b.apply(vec![c]).expect("options");
    b.dataplane_mut()
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
    b.apply(vec![health(spec, "10.0.0.12", true)])
        .expect("down");
    let barrier = !b.dataplane().quiesced.is_empty();
    let log = b.dataplane_mut().take_log();
    // Out of service, its MAC kept (for probes through it).
    let entry = b.dataplane().reals[&2];
    assert_eq!(entry.flags, 0, "{log:?}");
    assert_eq!(entry.mac, mac(12));
    let flip = log
        .iter()
        .position(|e| e.starts_with("META"))
        .expect("flip");
    let clear = log.iter().position(|e| e == "REALS2-").expect("clear");
    assert!(flip < clear, "{log:?}");
    assert!(barrier, "the entry is cleared behind a barrier");

    b.apply(vec![health(spec, "10.0.0.12", false)]).expect("up");
    assert_eq!(b.dataplane().reals[&2].flags, REAL_F_ALIVE);
    // The same real again, not a new one: its counters go on.
    let stats = b.dataplane().counters.0.lock().expect("counters").reals[&2];
    assert_eq!(stats.packets, 7);
}

#[test]
fn every_real_down_fails_open_with_weights_and_logs_nothing_into_the_maps_it_should_not() {
    let (mut b, spec) = checked();
    let c = set_options(spec, |o| o.down_flows = DownFlows::Move, &b);
    b.apply(vec![c]).expect("options");
    b.apply(vec![
        health(spec, "10.0.0.11", true),
        health(spec, "10.0.0.12", true),
        health(spec, "10.0.0.13", true),
    ])
    .expect("all down");
    let v = &b.snapshot().vips[0];
    assert!(v.quorum_lost && v.fail_open && !v.dropping && !v.sorry_active);
    // Every real back in the ring with its weight, and serving (even with "move").
    assert_eq!(
        live(&b, &spec),
        expected_ring(&[
            ("10.0.0.11", 1, 1),
            ("10.0.0.12", 2, 2),
            ("10.0.0.13", 1, 3)
        ])
    );
    for id in 1..=3 {
        assert_eq!(b.dataplane().reals[&id].flags, REAL_F_ALIVE);
    }
    assert!(v.reals.iter().all(|r| r.down && r.in_ring));
    // One comes back: quorum 1 is met by it alone, the others leave.
    b.apply(vec![health(spec, "10.0.0.13", false)])
        .expect("one up");
    assert_eq!(live(&b, &spec), expected_ring(&[("10.0.0.13", 1, 3)]));
    assert!(!b.snapshot().vips[0].quorum_lost);
    assert_eq!(
        b.dataplane().reals[&1].flags,
        0,
        "down and moving its flows"
    );
}

#[test]
fn quorum_drop_empties_the_ring_and_marks_the_vip() {
    let (mut b, spec) = checked();
    let c = set_options(
        spec,
        |o| {
            o.quorum = 3;
            o.on_quorum_lost = OnQuorumLost::Drop;
        },
        &b,
    );
    b.apply(vec![c]).expect("options");
    assert!(!b.snapshot().vips[0].quorum_lost, "weight 4 >= 3");
    b.apply(vec![health(spec, "10.0.0.12", true)])
        .expect("down");
    let v = &b.snapshot().vips[0];
    assert_eq!(v.healthy_weight, 2);
    assert!(v.quorum_lost && v.dropping);
    assert!(live(&b, &spec).iter().all(|id| *id == 0));
    let meta = b.dataplane().vip_meta[&v.id];
    assert_eq!(meta.flags & VIP_F_QUORUM_DROP, VIP_F_QUORUM_DROP);
    // Tracked flows of the reals still up go on.
    assert_eq!(b.dataplane().reals[&1].flags, REAL_F_ALIVE);
    b.apply(vec![health(spec, "10.0.0.12", false)]).expect("up");
    let meta = b.dataplane().vip_meta[&b.snapshot().vips[0].id];
    assert_eq!(meta.flags & VIP_F_QUORUM_DROP, 0);
}

#[test]
fn a_sorry_server_takes_new_flows_while_the_quorum_is_lost() {
    let (mut b, spec) = checked();
    let c = set_options(spec, |o| o.sorry_server = Some(ip("10.0.0.99")), &b);
    b.apply(vec![
        c,
        Change::SetMac {
            vip: Some(spec),
            addr: ip("10.0.0.99"),
            mac: Some(mac(99)),
        },
    ])
    .expect("sorry server");
    let snap = b.snapshot();
    let sorry = snap.vips[0].sorry.as_ref().expect("listed apart");
    assert_eq!(snap.vips[0].reals.len(), 3);
    let sorry_id = sorry.id;
    assert!(!sorry.in_ring && sorry.serving);
    assert_eq!(b.dataplane().reals[&sorry_id].flags, REAL_F_ALIVE);

    b.apply(vec![
        health(spec, "10.0.0.11", true),
        health(spec, "10.0.0.12", true),
        health(spec, "10.0.0.13", true),
    ])
    .expect("all down");
    assert!(b.snapshot().vips[0].sorry_active);
    assert!(live(&b, &spec).iter().all(|id| *id == sorry_id));

    b.apply(vec![health(spec, "10.0.0.11", false)])
        .expect("one up");
    assert!(!b.snapshot().vips[0].sorry_active);
    assert_eq!(live(&b, &spec), expected_ring(&[("10.0.0.11", 1, 1)]));
    // Its own tracked flows go on.
    assert_eq!(b.dataplane().reals[&sorry_id].flags, REAL_F_ALIVE);

    // The sorry server is no real: it is not added, removed or checked as one.
    for change in [
        add_real(spec, "10.0.0.99", 1, None),
        Change::DelReal {
            vip: spec,
            addr: ip("10.0.0.99").into(),
        },
        health(spec, "10.0.0.99", true),
    ] {
        let (_, e) = validation(b.apply(vec![change]).unwrap_err());
        assert!(matches!(e, ValidationError::IsSorryServer { .. }), "{e}");
    }
    // Removing it frees its id.
    let c = set_options(spec, |o| o.sorry_server = None, &b);
    b.apply(vec![c]).expect("removed");
    assert!(b.snapshot().vips[0].sorry.is_none());
    assert!(
        !visible(b.dataplane()).reals.contains_key(&sorry_id),
        "a removed id is zeroed"
    );
}

#[test]
fn an_unresolved_sorry_server_falls_back_to_on_quorum_lost() {
    let (mut b, spec) = checked();
    let c = set_options(spec, |o| o.sorry_server = Some(ip("10.0.0.99")), &b);
    b.apply(vec![c]).expect("sorry server without a MAC");
    b.apply(vec![
        health(spec, "10.0.0.11", true),
        health(spec, "10.0.0.12", true),
        health(spec, "10.0.0.13", true),
    ])
    .expect("all down");
    let v = &b.snapshot().vips[0];
    assert!(v.quorum_lost && !v.sorry_active && v.fail_open);
}

#[test]
fn a_new_real_starts_as_its_check_says_and_a_restart_keeps_every_status() {
    let (mut b, spec) = checked();
    b.apply(vec![
        set_check(spec, json!({"type": "tcp", "initial": "down"})),
        add_real(spec, "10.0.0.14", 1, Some(mac(14))),
    ])
    .expect("applies");
    let snap = b.snapshot();
    let new = snap.vips[0]
        .reals
        .iter()
        .find(|r| r.addr == ip("10.0.0.14").into());
    assert!(new.is_some_and(|r| r.down && !r.in_ring));
    // The existing reals kept their status through the change of check.
    assert!(snap.vips[0].reals.iter().take(3).all(|r| !r.down));
    b.apply(vec![health(spec, "10.0.0.12", true)])
        .expect("down");

    // A restart: the saved status, not `initial`, for every real.
    let records = b.snapshot().records();
    let (mut fresh, _) = balancer();
    fresh.restore(&records, &[]).expect("restores");
    let after = fresh.snapshot();
    let down: Vec<RealAddr> = after.vips[0]
        .reals
        .iter()
        .filter(|r| r.down)
        .map(|r| r.addr)
        .collect();
    assert_eq!(down, vec![ip("10.0.0.12").into(), ip("10.0.0.14").into()]);
    assert_eq!(after.vips[0].check, b.snapshot().vips[0].check);
}

#[test]
fn a_check_removed_brings_its_reals_back_and_unchecked_reals_take_no_health() {
    let (mut b, spec) = checked();
    b.apply(vec![health(spec, "10.0.0.12", true)])
        .expect("down");
    b.apply(vec![Change::SetCheck {
        vip: spec,
        real: None,
        check: None,
    }])
    .expect("check removed");
    assert!(b.snapshot().vips[0]
        .reals
        .iter()
        .all(|r| !r.down && r.in_ring));
    let (_, e) = validation(b.apply(vec![health(spec, "10.0.0.12", true)]).unwrap_err());
    assert!(matches!(e, ValidationError::NotChecked { .. }), "{e}");
    // A real of its own `type = "none"` is not checked either.
    b.apply(vec![
        set_check(spec, json!({"type": "tcp"})),
        Change::SetCheck {
            vip: spec,
            real: Some(ip("10.0.0.11").into()),
            check: Some(Box::new(check(json!({"type": "none"})))),
        },
    ])
    .expect("applies");
    let snap = b.snapshot();
    assert!(snap.vips[0].reals[0].effective_check.is_none());
    assert!(snap.vips[0].reals[1].effective_check.is_some());
}

#[test]
fn a_check_that_does_not_resolve_for_a_real_is_refused_naming_it() {
    let (mut b, spec) = checked();
    let e = b
        .apply(vec![Change::SetCheck {
            vip: spec,
            real: Some(ip("10.0.0.11").into()),
            check: Some(Box::new(check(json!({"path": "/x"})))),
        }])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "rejected: check of real 10.0.0.11 of VIP tcp/10.0.0.100:80: path: does not apply to a \
         tcp check"
    );
    assert_eq!(e.validation().map(ValidationError::field), Some("check"));
}

#[test]
fn a_dynamic_weight_replaces_the_configured_one_until_the_check_is_no_longer_dynamic() {
    let (mut b, spec) = checked();
    b.apply(vec![set_check(
        spec,
        json!({"type": "exec", "command": ["/bin/true"], "dynamic": true}),
    )])
    .expect("exec");
    b.apply(vec![Change::SetHealth {
        vip: spec,
        addr: ip("10.0.0.11").into(),
        down: false,
        weight: Some(5),
    }])
    .expect("weight");
    assert_eq!(
        live(&b, &spec),
        expected_ring(&[
            ("10.0.0.11", 5, 1),
            ("10.0.0.12", 2, 2),
            ("10.0.0.13", 1, 3)
        ])
    );
    let snap = b.snapshot();
    assert_eq!(
        snap.vips[0].reals[0].weight, 1,
        "the configured weight stays"
    );
    assert_eq!(snap.vips[0].reals[0].effective_weight, 5);
    b.apply(vec![set_check(spec, json!({"type": "tcp"}))])
        .expect("tcp");
    assert_eq!(b.snapshot().vips[0].reals[0].dyn_weight, None);
}
