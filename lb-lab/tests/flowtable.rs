//! The connection table's rules through BPF_PROG_TEST_RUN (lb-common's `ct`): a flood of new
//! flows never takes an established flow's way, even across a ring change; a full bucket
//! leaves new flows untracked (and counted); SYN-only flows give their ways up to later ones;
//! a SYN re-picks only its own flow's way; a fingerprint never crosses VIPs. Needs root (see
//! common::bpf_available).

mod common;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use lb_common::{ct, flow_hash64, v4_mapped, FlowKey, IPPROTO_TCP};
use lb_lab::packet::{self, Frame};
use lb_userspace::{
    core::balancer::Balancer,
    dataplane::{
        ebpf::{EbpfDataplane, LoadOptions},
        CounterSource, Limits,
    },
    model::{map_addr, VipFlags, VipSpec},
};

const XDP_TX: u32 = 3;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

macro_rules! require_bpf {
    () => {
        if !common::bpf_available(module_path!()) {
            return;
        }
    };
}

struct Lab {
    bal: Balancer<EbpfDataplane>,
    vip: VipSpec,
}

fn mac_of(ip: IpAddr) -> [u8; 6] {
    let o = map_addr(ip);
    [0x02, 0xaa, o[12], o[13], o[14], o[15]]
}

impl Lab {
    /// One VIP (tcp/10.0.0.100:80) with reals .11-.13, in a table sized for `flows`.
    fn new(flows: u32) -> Lab {
        let opts = LoadOptions {
            limits: Limits {
                max_vips: 2,
                max_reals: 16,
                ring_size: 65537,
            },
            conntrack_size: flows,
            ..LoadOptions::default()
        };
        let dp = EbpfDataplane::load(&opts).unwrap_or_else(|e| panic!("loading: {e:#?}"));
        let mut bal = Balancer::new(dp, Duration::from_millis(300));
        let vip: VipSpec = "tcp/10.0.0.100:80".parse().expect("vip");
        bal.add_vip(vip, VipFlags::default()).expect("vip");
        let mut lab = Lab { bal, vip };
        for i in 11..14 {
            lab.real(i);
        }
        lab
    }

    fn real(&mut self, last: u8) {
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, last));
        self.bal
            .add_real(self.vip, a, 1, Some(mac_of(a)))
            .expect("real");
    }

    /// The MAC the frame was sent to.
    fn send(&mut self, frame: &[u8]) -> [u8; 6] {
        let (action, out) = self
            .bal
            .dataplane_mut()
            .test_run(frame)
            .unwrap_or_else(|e| panic!("test_run: {e:#?}"));
        assert_eq!(action, XDP_TX, "not forwarded");
        out[..6].try_into().expect("a MAC")
    }

    fn stats(&self) -> lb_common::VipStats {
        let id = self.bal.vip_id(&self.vip).expect("id");
        self.bal.dataplane().vip_stats(id).expect("stats")
    }
}

fn client(i: u32) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(0x6400_0000u32 + i / 50_000),
        1024 + (i % 50_000) as u16,
    )
}

fn data(i: u32) -> Vec<u8> {
    let (a, p) = client(i);
    Frame::tcp4(a, p, VIP, 80).with_payload(b"x").build()
}

fn syn(i: u32) -> Vec<u8> {
    let (a, p) = client(i);
    Frame::tcp4(a, p, VIP, 80)
        .with_tcp_flags(packet::TCP_SYN)
        .build()
}

/// Bucket and fingerprint of client `i`'s flow in a table of `buckets`.
fn place(i: u32, buckets: u32) -> (u32, u64) {
    place_to(i, VIP, buckets)
}

fn place_to(i: u32, vip: Ipv4Addr, buckets: u32) -> (u32, u64) {
    let (a, p) = client(i);
    let key = FlowKey {
        src: v4_mapped(a.octets()),
        dst: v4_mapped(vip.octets()),
        src_port_be: p.to_be(),
        dst_port_be: 80u16.to_be(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    ct::place(flow_hash64(&key, 0), buckets)
}

#[test]
fn a_flood_of_new_flows_moves_no_established_flow_even_across_a_ring_change() {
    require_bpf!();
    // 2 048 flows' table: 1 024 buckets, 8 192 ways.
    let mut lab = Lab::new(2048);
    let established: Vec<[u8; 6]> = (0..2048).map(|i| lab.send(&data(i))).collect();
    let before = lab.stats();
    // 60 000 new flows, data then SYNs, with a ring change half-way.
    for i in 0..30_000 {
        lab.send(&data(100_000 + i));
    }
    lab.real(14);
    lab.real(15);
    for i in 30_000..60_000 {
        lab.send(&syn(100_000 + i));
    }
    let flood = lab.stats();
    assert!(
        flood.untracked - before.untracked > 10_000,
        "the flood never filled the table: {} untracked",
        flood.untracked - before.untracked
    );
    let mut moved = 0;
    for (i, mac) in established.iter().enumerate() {
        if lab.send(&data(i as u32)) != *mac {
            moved += 1;
        }
    }
    assert_eq!(moved, 0, "established flows moved");
    assert_eq!(
        lab.stats().new_flows,
        flood.new_flows,
        "an established flow was new again"
    );
}

#[test]
fn a_full_bucket_leaves_new_flows_untracked_and_syn_only_flows_give_their_ways_up() {
    require_bpf!();
    // One bucket: 8 ways.
    let mut lab = Lab::new(2);
    for i in 0..8 {
        lab.send(&syn(i));
    }
    assert_eq!(lab.bal.dataplane().flow_table().count(), 8);
    // Embryonic ways are taken by the next flows: nothing untracked.
    let first: Vec<[u8; 6]> = (8..16).map(|i| lab.send(&data(i))).collect();
    assert_eq!(lab.stats().untracked, 0);
    // Now full of established flows: a new one is forwarded, untracked and counted.
    lab.send(&data(16));
    lab.send(&syn(17));
    assert_eq!(lab.stats().untracked, 2);
    // The established ones never lose their way, whatever the ring does.
    lab.real(14);
    lab.real(15);
    for (i, mac) in (8..16).zip(&first) {
        assert_eq!(lab.send(&data(i)), *mac, "flow {i} moved");
    }
    let mut reals: HashMap<[u8; 6], u32> = HashMap::new();
    first
        .iter()
        .for_each(|m| *reals.entry(*m).or_default() += 1);
    assert!(
        reals.len() > 1,
        "every flow on one real: nothing was tested"
    );
}

#[test]
fn a_syn_repicks_its_own_flows_way_but_not_one_whose_fingerprint_it_shares() {
    require_bpf!();
    let mut lab = Lab::new(2);
    // Two clients whose flows have one fingerprint (in the one bucket there is).
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let (a, b) = (0..1_000_000u32)
        .find_map(|i| {
            let fp = place(i, 1).1;
            seen.insert(fp, i).map(|j| (j, i))
        })
        .expect("a 24-bit fingerprint collision among a million flows");
    let mac_a = lab.send(&data(a));
    // Two more reals: a re-pick would most likely choose another real than before.
    lab.real(14);
    lab.real(15);
    // b's SYN finds a's way: a live flow of another tuple, which it shares, not takes.
    assert_eq!(lab.send(&syn(b)), mac_a, "the SYN did not share the way");
    assert_eq!(lab.send(&data(b)), mac_a);
    assert_eq!(lab.send(&data(a)), mac_a, "a's flow moved");
    assert_eq!(lab.bal.dataplane().flow_table().count(), 1);
    // a's real drains: a's tracked flow stays, a's own SYN (a reused port) re-picks from
    // the ring, which no longer has it, and the new choice is kept.
    let real_a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, mac_a[5]));
    lab.bal.set_weight(lab.vip, real_a, 0).expect("drain");
    assert_eq!(lab.send(&data(a)), mac_a, "a draining real lost its flow");
    let again = lab.send(&syn(a));
    assert_ne!(again, mac_a, "a reused port went to a draining real");
    assert_eq!(lab.send(&data(a)), again, "the re-picked real was not kept");
    assert_eq!(lab.bal.dataplane().flow_table().count(), 1);
}

#[test]
fn a_fingerprint_shared_with_a_flow_of_another_vip_never_sends_there() {
    require_bpf!();
    let mut lab = Lab::new(2);
    let other_vip = Ipv4Addr::new(10, 0, 0, 101);
    let other: VipSpec = "tcp/10.0.0.101:80".parse().expect("vip");
    lab.bal.add_vip(other, VipFlags::default()).expect("vip");
    let r = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 21));
    lab.bal
        .add_real(other, r, 1, Some(mac_of(r)))
        .expect("real");
    // A client of the other VIP and one of ours whose flows have one fingerprint.
    let mut theirs: HashMap<u64, u32> = HashMap::new();
    for i in 0..1_000_000u32 {
        theirs.insert(place_to(i, other_vip, 1).1, i);
    }
    let (t, o) = (0..2_000_000u32)
        .find_map(|i| theirs.get(&place(i, 1).1).map(|t| (*t, i)))
        .expect("a fingerprint shared across the VIPs");
    let (a, p) = client(t);
    let to_other = Frame::tcp4(a, p, other_vip, 80).with_payload(b"x").build();
    assert_eq!(lab.send(&to_other), mac_of(r));
    // Ours finds that way first: its real is the other VIP's, so it is not ours.
    let ours = lab.send(&data(o));
    assert_ne!(ours, mac_of(r), "a packet went to a real of another VIP");
    assert_eq!(
        lab.send(&data(o)),
        ours,
        "our flow was not tracked in a way of its own"
    );
    assert_eq!(lab.send(&to_other), mac_of(r), "the other VIP's flow moved");
    assert_eq!(lab.bal.dataplane().flow_table().count(), 2);
}

/// The clients whose tuples a walk finds, each checked against its way as `xlb conns` does.
fn walked_clients(lab: &Lab) -> std::collections::BTreeSet<(Ipv4Addr, u16)> {
    let table = lab.bal.dataplane().flow_table();
    let mut seen = std::collections::BTreeSet::new();
    table.walk_flows(&mut |f| {
        let key = FlowKey {
            src: f.tuple.src,
            dst: v4_mapped(VIP.octets()),
            src_port_be: f.client_port().to_be(),
            dst_port_be: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        if table.holds(f, &key) {
            let o = f.tuple.src;
            seen.insert((Ipv4Addr::new(o[12], o[13], o[14], o[15]), f.client_port()));
        }
    });
    seen
}

#[test]
fn new_flows_tuples_reach_walks_through_the_kernels_log() {
    require_bpf!();
    let mut lab = Lab::new(4096);
    let n = 3000;
    for i in 0..n {
        lab.send(&data(i));
    }
    // The kernel logged each new flow's tuple; a drain files them (the dataplane's thread
    // does the same every millisecond), and a walk lists every flow with its client.
    let drained = lab.bal.dataplane().drain_ct_log();
    let seen = walked_clients(&lab);
    let want: std::collections::BTreeSet<(Ipv4Addr, u16)> = (0..n).map(client).collect();
    assert_eq!(
        seen.len(),
        want.len(),
        "walks see {} of {n} flows (this drain: {drained:?})",
        seen.len()
    );
    assert_eq!(seen, want);
    assert_eq!(lab.bal.dataplane().ct_log_lost(), 0);
    // A SYN on a logged flow's tuple (port reuse) takes the ring again: the kernel read the
    // tuple the log brought. Its new way's tuple is logged too.
    let before = lab.stats().new_flows;
    lab.send(&syn(7));
    assert_eq!(lab.stats().new_flows, before + 1, "the SYN did not re-pick");
    lab.bal.dataplane().drain_ct_log();
    assert!(walked_clients(&lab).contains(&client(7)));
}
