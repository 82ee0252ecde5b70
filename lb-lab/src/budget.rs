//! xlb's own absolute budgets, in ns per packet, for `xlb-bench --check`: what the project's
//! machine kind (2 vCPUs, kernel 6.18, a quiet host) must show. The README's Performance
//! section lists them with the figures of the latest run; plain `bench` and CI only report.

/// (case, mode, budget in ns/packet, median).
pub const BUDGETS: [(&str, &str, f64); 15] = [
    ("tcp4_established", "dr", 35.0),
    ("tcp4_conntrack_bypass", "dr", 30.0),
    ("udp4_established", "dr", 35.0),
    ("tcp6_established", "dr", 35.0),
    ("non_vip", "dr", 12.0),
    ("tcp4_new_flow", "dr", 160.0),
    ("tcp4_established", "tunnel", 50.0),
    ("tcp4_conntrack_bypass", "tunnel", 45.0),
    ("udp4_established", "tunnel", 52.0),
    ("tcp6_established", "tunnel", 50.0),
    ("tcp4_new_flow", "tunnel", 200.0),
    ("tcp4_established_1k_flows", "dr", 40.0),
    ("tcp4_established_64k_flows", "dr", 80.0),
    ("tcp4_established_1m_flows", "dr", 150.0),
    ("tcp4_flood_into_1m_flows", "dr", 150.0),
];

/// What the wrapper alone costs per iteration on a quiet machine of this kind: a run whose
/// wrapper costs much more ran on a busy host, and its figures miss budgets for that reason.
pub const QUIET_WRAPPER_NS: f64 = 13.0;

/// The 1 M-flow figure may be at most this many times the 1 K-flow one (one cache miss more).
pub const SCALE_RATIO: f64 = 1.8;

/// One budget's verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub what: String,
    pub budget: f64,
    pub got: f64,
}

impl Verdict {
    pub fn held(&self) -> bool {
        self.got <= self.budget
    }
}

/// The verdicts for the measured medians (`(case, mode, ns)`); budgets of cases not run are
/// left out.
pub fn check(medians: &[(&str, &str, f64)]) -> Vec<Verdict> {
    let get = |case: &str, mode: &str| {
        medians
            .iter()
            .find(|(c, m, _)| *c == case && *m == mode)
            .map(|m| m.2)
    };
    let mut out: Vec<Verdict> = BUDGETS
        .iter()
        .filter_map(|(case, mode, budget)| {
            get(case, mode).map(|got| Verdict {
                what: format!("{case} ({mode})"),
                budget: *budget,
                got,
            })
        })
        .collect();
    if let (Some(k), Some(m)) = (
        get("tcp4_established_1k_flows", "dr"),
        get("tcp4_established_1m_flows", "dr"),
    ) {
        out.push(Verdict {
            what: format!("1 M flows within {SCALE_RATIO}x of 1 K flows"),
            budget: SCALE_RATIO * k,
            got: m,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_hold_or_not_and_unrun_cases_are_left_out() {
        let v = check(&[
            ("tcp4_established", "dr", 30.0),
            ("non_vip", "dr", 21.0),
            ("tcp4_established_1k_flows", "dr", 40.0),
            ("tcp4_established_1m_flows", "dr", 80.0),
        ]);
        let held: Vec<(&str, bool)> = v.iter().map(|v| (v.what.as_str(), v.held())).collect();
        assert_eq!(
            held,
            vec![
                ("tcp4_established (dr)", true),
                ("non_vip (dr)", false),
                ("tcp4_established_1k_flows (dr)", true),
                ("tcp4_established_1m_flows (dr)", true),
                ("1 M flows within 1.8x of 1 K flows", false),
            ]
        );
    }
}
