//! The counters sampled once a second in the background, so that `stats` (and `/metrics`)
//! report rates over fixed windows, the last 1 s and the last 10 s, whoever asks and however
//! often; and the connection table counted every `COUNT_EVERY` for its `entries_estimate`.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use crate::{
    dataplane::{CounterSource, FlowSource},
    model::VipSpec,
};

/// A VIP's counters (`None`) or one of its reals'.
pub type Key = (VipSpec, Option<crate::model::RealAddr>);

const EVERY: Duration = Duration::from_secs(1);
/// Samples kept: enough for the 10 s window.
const KEPT: usize = 11;
const COUNT_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    pub packets_per_sec: f64,
    pub bytes_per_sec: f64,
    pub packets_per_sec_10s: f64,
    pub bytes_per_sec_10s: f64,
}

/// (when, packets and bytes by key).
type Sample = (Instant, HashMap<Key, (u64, u64)>);

#[derive(Default)]
pub struct Figures {
    samples: Mutex<VecDeque<Sample>>,
    /// The last count of the connection table's entries, and when it was taken.
    entries: Mutex<Option<(u64, Instant)>>,
}

fn rate(new: &Sample, old: &Sample, key: &Key) -> Option<(f64, f64)> {
    let (p1, b1) = new.1.get(key)?;
    let (p0, b0) = old.1.get(key)?;
    let dt = new.0.duration_since(old.0).as_secs_f64();
    if dt <= 0.0 {
        return None;
    }
    Some((
        p1.saturating_sub(*p0) as f64 / dt,
        b1.saturating_sub(*b0) as f64 / dt,
    ))
}

impl Figures {
    /// Take a sample (the daemon does once a second).
    pub fn push(&self, at: Instant, counts: HashMap<Key, (u64, u64)>) {
        let mut s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        s.push_back((at, counts));
        while s.len() > KEPT {
            s.pop_front();
        }
    }

    /// The rates of `key` over the last second and the last ten (0 until there are samples
    /// enough: a window's figure starts with the samples there are).
    pub fn rates(&self, key: &Key) -> Rates {
        let s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let n = s.len();
        if n < 2 {
            return Rates::default();
        }
        let last = &s[n - 1];
        let (pps, bps) = rate(last, &s[n - 2], key).unwrap_or_default();
        // The oldest sample of the window that has the key (a VIP added 3 s ago: over 3 s).
        let (pps10, bps10) = s
            .iter()
            .take(n - 1)
            .find(|old| old.1.contains_key(key))
            .and_then(|old| rate(last, old, key))
            .unwrap_or_default();
        Rates {
            packets_per_sec: pps,
            bytes_per_sec: bps,
            packets_per_sec_10s: pps10,
            bytes_per_sec_10s: bps10,
        }
    }

    pub fn entries_estimate(&self) -> Option<u64> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|(n, _)| n)
    }
}

/// What the sampler reads each second: every VIP and real of the published state.
pub type Keys = Box<dyn Fn() -> Vec<(Key, Target)> + Send + Sync>;

/// Where a key's counters are.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    Vip(u32),
    Real(u32),
}

/// Sample until the daemon stops.
pub async fn run(
    figures: Arc<Figures>,
    keys: Keys,
    counters: Arc<dyn CounterSource + Send + Sync>,
    flows: Arc<dyn FlowSource + Send + Sync>,
) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counted: Option<Instant> = None;
    loop {
        tick.tick().await;
        let mut counts = HashMap::new();
        for (key, target) in keys() {
            let read = match target {
                Target::Vip(id) => counters.vip_stats(id).map(|s| (s.packets, s.bytes)),
                Target::Real(id) => counters.real_stats(id).map(|s| (s.packets, s.bytes)),
            };
            if let Ok(pb) = read {
                counts.insert(key, pb);
            }
        }
        figures.push(Instant::now(), counts);
        if counted.is_none_or(|t| t.elapsed() >= COUNT_EVERY) {
            counted = Some(Instant::now());
            let (flows, figures) = (flows.clone(), figures.clone());
            let n = tokio::task::spawn_blocking(move || {
                let mut live = 0u64;
                flows.walk(&mut |_| live += 1).map(|_| live)
            })
            .await;
            if let Ok(Ok(n)) = n {
                *figures
                    .entries
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some((n, Instant::now()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_over_the_last_second_and_the_last_ten() {
        let f = Figures::default();
        let key: Key = ("tcp/10.0.0.100:80".parse().expect("vip"), None);
        let t0 = Instant::now();
        assert_eq!(f.rates(&key), Rates::default());
        // 100 packets a second for 10 s, then 1000 in the last second.
        for i in 0..=10u64 {
            let packets = if i < 10 { i * 100 } else { 900 + 1000 };
            f.push(
                t0 + Duration::from_secs(i),
                HashMap::from([(key, (packets, packets * 10))]),
            );
        }
        let r = f.rates(&key);
        assert_eq!(r.packets_per_sec, 1000.0);
        assert_eq!(r.bytes_per_sec, 10_000.0);
        assert_eq!(r.packets_per_sec_10s, 190.0);
        // Asking again (another client) changes nothing.
        assert_eq!(f.rates(&key), r);
        // Samples beyond the window are dropped.
        f.push(
            t0 + Duration::from_secs(11),
            HashMap::from([(key, (1900, 19000))]),
        );
        assert_eq!(f.rates(&key).packets_per_sec, 0.0);
        assert_eq!(f.rates(&key).packets_per_sec_10s, 180.0);
    }
}
