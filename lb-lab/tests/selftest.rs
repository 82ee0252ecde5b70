//! The readiness self-test through BPF_PROG_TEST_RUN: its packet (a group source MAC) is
//! decided like any other, in both modes, but leaves no tracked flow and no count; a
//! `REALS` entry that disagrees with the ring's prediction fails it, naming both.

mod common;

#[path = "common/tunnel_lab.rs"]
#[allow(dead_code)]
mod tunnel_lab;

use lb_common::{Real, ENCAP_IPIP};
use lb_userspace::{
    core::balancer::selftest,
    dataplane::{CounterSource, Dataplane},
    model::Mode,
};
use tunnel_lab::*;

macro_rules! require_bpf {
    () => {
        if !common::bpf_available(module_path!()) {
            return;
        }
    };
}

#[test]
fn the_self_test_passes_in_both_modes_and_leaves_no_flow_and_no_count() {
    require_bpf!();
    let mut lab = Lab::new(conf(ENCAP_IPIP));
    let dr = lab.vip("tcp/10.50.0.100:80");
    let tun = lab.vip("udp/[2001:db8:50::100]:53");
    for (i, r) in ["10.50.0.11", "10.50.0.12", "10.50.0.13"]
        .iter()
        .enumerate()
    {
        lab.real(dr, r, Mode::Dr, Some([2, 0, 0, 0, 0, 0x11 + i as u8]));
    }
    for r in ["2001:db8:9::11", "10.9.0.12"] {
        lab.real(tun, r, Mode::Tunnel, Some(GW_MAC));
    }
    for round in 0..3 {
        for vip in [dr, tun] {
            lab.bal
                .self_test(&vip)
                .unwrap_or_else(|e| panic!("round {round}, {vip}: {e}"));
        }
    }
    let dp = lab.bal.dataplane();
    assert_eq!(dp.conntrack_count().expect("count"), 0, "no flow tracked");
    for vip in [dr, tun] {
        let id = lab.bal.vip_id(&vip).expect("id");
        let s = dp.vip_stats(id).expect("stats");
        assert_eq!((s.packets, s.new_flows), (0, 0), "{vip}: counted");
    }
    // The same frame from a host's MAC is an ordinary packet: tracked and counted.
    let mut frame = selftest::frame(&dr);
    frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0x77]);
    let (action, _) = lab.run(&frame);
    assert_eq!(action, XDP_TX);
    assert_eq!(lab.bal.dataplane().conntrack_count().expect("count"), 1);
}

#[test]
fn a_reals_entry_that_disagrees_with_the_ring_fails_the_self_test() {
    require_bpf!();
    let mut lab = Lab::new(conf(ENCAP_IPIP));
    let dr = lab.vip("tcp/10.50.0.100:80");
    lab.real(dr, "10.50.0.11", Mode::Dr, Some([2, 0, 0, 0, 0, 0x11]));
    lab.bal.self_test(&dr).expect("passes");
    // Somebody else writes the real's entry with another MAC.
    let id = lab.bal.real_id(&dr, ip("10.50.0.11")).expect("id");
    let real: Real = lab.bal.dataplane().real(id).expect("entry");
    let wrong = Real {
        mac: [2, 0, 0, 0, 0, 0x99],
        ..real
    };
    lab.bal.dataplane_mut().set_real(id, &wrong).expect("write");
    let err = lab.bal.self_test(&dr).expect_err("fails");
    assert!(
        err.contains("02:00:00:00:00:99") && err.contains("10.50.0.11"),
        "{err}"
    );
    // An entry that is not alive: the packet is dropped.
    let dead = Real { flags: 0, ..real };
    lab.bal.dataplane_mut().set_real(id, &dead).expect("write");
    let err = lab.bal.self_test(&dr).expect_err("fails");
    assert!(err.contains("action 1"), "{err}");
}
