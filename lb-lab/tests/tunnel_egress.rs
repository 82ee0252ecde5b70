//! Packet tests of tunnel reals whose route leaves by another interface than the balancer's:
//! the frame is redirected (`XDP_REDIRECT` through `TX_PORTS`) from that interface's MAC,
//! without the ingress VLAN tag, within that interface's MTU; a real naming an interface the
//! maps do not hold is dropped and counted, never sent out.
//!
//! BPF_PROG_TEST_RUN reports the redirect without sending anything; the devmap entry must
//! still name a real device, so the interface here is the test namespace's loopback.

mod common;

#[path = "common/tunnel_lab.rs"]
#[allow(dead_code)]
mod tunnel_lab;

use std::net::Ipv4Addr;

use lb_common::{counter, ENCAP_GUE, ENCAP_IPIP};
use lb_lab::packet::{self, Frame};
use lb_userspace::{
    core::balancer::Change,
    dataplane::{CounterSource, Dataplane},
    model::{Egress, Mode},
};
use tunnel_lab::*;

macro_rules! require_bpf {
    () => {
        if !common::bpf_available(module_path!()) {
            return;
        }
    };
}

const XDP_REDIRECT: u32 = 4;
/// The loopback's index: always 1.
const LO: u32 = 1;
const EGRESS_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x02];
/// The next hop on the other interface.
const GW2_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 0x02];

fn egress(mtu: u16) -> Egress {
    Egress {
        ifindex: LO,
        mac: EGRESS_MAC,
        mtu,
    }
}

/// A VIP with one tunnel real, reached out of the loopback through GW2.
fn lab(encap: u8, real: &str, mtu: u16) -> (Lab, lb_userspace::model::VipSpec) {
    let mut lab = Lab::new(conf(encap));
    let vip = lab.vip("tcp/10.50.0.100:80");
    lab.real(vip, real, Mode::Tunnel, Some(GW2_MAC));
    lab.bal
        .apply(vec![Change::SetEgress {
            vip: None,
            addr: ip(real),
            egress: Some(egress(mtu)),
        }])
        .expect("egress");
    (lab, vip)
}

/// `frame` must be redirected as `plain`'s packet encapsulated to `real`, from the egress
/// interface's MAC to GW2 and untagged whatever came in.
fn expect_redirect(lab: &mut Lab, name: &str, frame: &[u8], plain: &[u8], real: &str, encap: u8) {
    let (action, out) = lab.run(frame);
    assert_eq!(action, XDP_REDIRECT, "{name}");
    let mut want = encapsulated(plain, ip(real), &conf(encap), GW2_MAC);
    packet::set_src_mac(&mut want, EGRESS_MAC);
    assert!(out == want, "{name}:\n{}", packet::hex_diff(&want, &out));
}

#[test]
fn a_real_behind_another_interface_is_redirected_there_from_its_mac() {
    require_bpf!();
    for (encap, real) in [
        (ENCAP_IPIP, "10.9.0.11"),
        (ENCAP_GUE, "10.9.0.11"),
        (ENCAP_IPIP, "2001:db8:9::11"),
        (ENCAP_GUE, "2001:db8:9::11"),
    ] {
        let (mut lab, vip) = lab(encap, real, 1500);
        let id = lab.bal.real_id(&vip, ip(real)).expect("id");
        let frame = Frame::tcp4(c4(1), 45000, Ipv4Addr::new(10, 50, 0, 100), 80)
            .with_payload(&[3; 40])
            .build();
        // New, then tracked: the same redirect.
        for round in ["new", "tracked"] {
            let name = format!("{real} encap {encap} {round}");
            expect_redirect(&mut lab, &name, &frame, &frame, real, encap);
        }
        let stats = lab.bal.dataplane().real_stats(id).expect("stats");
        assert_eq!(stats.packets, 2, "{real}: counted as forwarded");

        // The ingress VLAN tag stays behind.
        let tagged = Frame::tcp4(c4(1), 45000, Ipv4Addr::new(10, 50, 0, 100), 80)
            .with_payload(&[3; 40])
            .with_vlan(0x0064)
            .build();
        let name = format!("{real} encap {encap} tagged");
        expect_redirect(&mut lab, &name, &tagged, &frame, real, encap);
    }
}

#[test]
fn the_egress_interfaces_mtu_bounds_what_is_encapsulated() {
    require_bpf!();
    let vip4 = Ipv4Addr::new(10, 50, 0, 100);
    // conf's MTU is 1500; the other interface's 120: 100 inner bytes fit, 120 do not.
    let (mut lab, _) = lab(ENCAP_IPIP, "10.9.0.11", 120);
    let fits = Frame::tcp4(c4(1), 46000, vip4, 80)
        .with_payload(&[1; 60])
        .build();
    expect_redirect(
        &mut lab,
        "exactly eth1's MTU",
        &fits,
        &fits,
        "10.9.0.11",
        ENCAP_IPIP,
    );
    let big = Frame::tcp4(c4(1), 46001, vip4, 80)
        .with_ipv4_frag(0, 0)
        .with_payload(&[1; 80])
        .build();
    expect_drop(
        &mut lab,
        "no DF, over eth1's MTU",
        &big,
        counter::DROP_TOO_BIG,
    );
}

#[test]
fn a_real_naming_an_interface_the_maps_lack_is_dropped_and_counted() {
    require_bpf!();
    let (mut lab, vip) = lab(ENCAP_IPIP, "10.9.0.11", 1500);
    let id = lab.bal.real_id(&vip, ip("10.9.0.11")).expect("id");
    // A foreign writer (or a bug) points the entry at an interface never set up.
    let mut real = lab.bal.dataplane().real(id).expect("real");
    real.egress = 999;
    lab.bal.dataplane_mut().set_real(id, &real).expect("write");
    let frame = Frame::tcp4(c4(1), 47000, Ipv4Addr::new(10, 50, 0, 100), 80).build();
    expect_drop(&mut lab, "unknown egress", &frame, counter::DROP_TX_PORT);
}
