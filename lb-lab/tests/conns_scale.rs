//! `xlb conns` on a full connection table: 2^20 tracked flows (the default capacity), counted
//! and listed through the daemon, with the time each takes. Needs root.

mod common;

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use harness::*;
use lb_common::{ConnValue, CtKey};
use lb_lab::lab::{self, LabConfig};

/// The kernel's jiffies now (what the connection table stamps entries with).
fn jiffies() -> u64 {
    std::fs::read_to_string("/proc/timer_list")
        .expect("/proc/timer_list")
        .lines()
        .find_map(|l| l.strip_prefix("jiffies: "))
        .and_then(|j| j.trim().parse().ok())
        .expect("a jiffies line")
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[test]
fn conns_counts_and_lists_a_full_table_quickly() {
    let cfg = LabConfig {
        reals: 3,
        vips: vec![IpAddr::V4(lab::VIP4)],
        serve: false,
        ..LabConfig::default()
    };
    let Some(e) = E2e::start_with("conns_scale", cfg, &[]) else {
        return;
    };
    e.add_vip(TCP4, false);
    let list = e.list();
    let vip_id = list.vips[0].id;
    let reals: Vec<u32> = list.vips[0].reals.iter().map(|r| r.id).collect();
    // The table keeps one LRU list per CPU, each with its share: fill each from its CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let total: u32 = 1 << 20;
    let per_cpu = total / cpus as u32;
    let pin = e.lab.pin_root().join(&e.lab.lb.iface).join("CONNTRACK");
    let now = jiffies() + 100;
    let start = Instant::now();
    std::thread::scope(|s| {
        for cpu in 0..cpus {
            let (pin, reals) = (pin.clone(), reals.clone());
            s.spawn(move || {
                pin_to(cpu);
                let data = aya::maps::MapData::from_pin(&pin).expect("CONNTRACK pin");
                let mut map: aya::maps::HashMap<_, CtKey, ConnValue> =
                    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))
                        .expect("a hash map");
                for i in 0..per_cpu {
                    let n = cpu as u32 * per_cpu + i;
                    let mut src = [0u8; 16];
                    src[10] = 0xff;
                    src[11] = 0xff;
                    src[12] = 100;
                    src[13..16].copy_from_slice(&n.to_be_bytes()[1..]);
                    let key = CtKey {
                        src,
                        ports: u32::from((1024 + (n >> 24) as u16).to_be())
                            | u32::from(80u16.to_be()) << 16,
                        vip_id,
                    };
                    let v = ConnValue {
                        real_id: reals[n as usize % reals.len()],
                        flags: 0,
                        last_seen: now,
                    };
                    map.insert(key, v, 0).expect("insert");
                }
            });
        }
    });
    e.step(&format!("{total} flows written in {:?}", start.elapsed()));

    let t = Instant::now();
    let counted: u64 = e
        .xlb_ok(&["conns", "--count"])
        .trim()
        .parse()
        .expect("a count");
    let count_time = t.elapsed();
    assert!(
        counted >= u64::from(total) * 95 / 100,
        "only {counted} of {total} flows counted"
    );
    let t = Instant::now();
    let out = e
        .lab
        .xlb_checked(&["conns", "--json"])
        .expect("conns --json");
    let list_time = t.elapsed();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["flows"].as_array().map(Vec::len), Some(counted as usize));
    let per_real: u64 = v["per_real"]
        .as_array()
        .expect("per_real")
        .iter()
        .map(|p| p["flows"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(per_real, counted);
    e.step(&format!(
        "xlb conns --count: {counted} flows in {count_time:?}; --json: {} MB in {list_time:?} (the daemon's walk {} ms)",
        out.stdout.len() / 1_000_000,
        v["scan_ms"]
    ));
    assert!(count_time < Duration::from_secs(2), "{count_time:?}");
    // The listing's budget is the 2 s on an idle machine; CI's shared cores get 5.
    assert!(list_time < Duration::from_secs(5), "{list_time:?}");
}
