use std::time::Duration;

use super::*;
use crate::{
    core::balancer::Balancer,
    dataplane::{fake::FakeDataplane, Limits},
    model::{RealAddr, MAX_WEIGHT},
};

fn vip(s: &str) -> VipSpec {
    s.parse().expect("test VIP parses")
}

fn ip(s: &str) -> RealAddr {
    s.parse().expect("test address parses")
}

const NO_SRC_PORT: VipFlags = VipFlags {
    no_src_port: true,
    no_conntrack: false,
};
const NO_CONNTRACK: VipFlags = VipFlags {
    no_src_port: false,
    no_conntrack: true,
};

fn desired(flags: VipFlags, reals: &[(&str, u32)]) -> DesiredVip {
    DesiredVip {
        flags,
        reals: reals.iter().map(|(a, w)| (ip(a), *w)).collect(),
        ..DesiredVip::default()
    }
}

fn state(vips: Vec<(&str, DesiredVip)>) -> DesiredState {
    DesiredState {
        vips: vips.into_iter().map(|(s, v)| (vip(s), v)).collect(),
    }
}

/// What an ipvsadm import of `-g` rules gives: the same, in direct routing by name.
fn dr(mut s: DesiredState) -> DesiredState {
    for v in s.vips.values_mut() {
        v.mode = Some(Mode::Dr);
    }
    s
}

/// IPv4, IPv6, port-0 VIPs, every flag combination, weights 0..=MAX, a VIP without reals.
fn sample() -> DesiredState {
    state(vec![
        (
            "tcp/10.0.0.100:80",
            desired(NO_SRC_PORT, &[("10.0.0.11", 1), ("10.0.0.12", 2)]),
        ),
        (
            "udp/10.0.0.100:0",
            desired(
                VipFlags {
                    no_src_port: true,
                    no_conntrack: true,
                },
                &[("10.0.0.13", 0), ("10.0.0.14", MAX_WEIGHT)],
            ),
        ),
        (
            "udp/[2001:db8::100]:53",
            desired(NO_CONNTRACK, &[("2001:db8::11", 3), ("2001:db8::12", 1)]),
        ),
        ("tcp/[2001:db8::1]:443", desired(VipFlags::default(), &[])),
    ])
}

fn parse_err(text: &str) -> String {
    match parse_config(text) {
        Ok(state) => panic!("accepted {text:?} as {state:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
}

// ---- config file ----

#[test]
fn render_then_parse_round_trips() {
    let s = sample();
    let text = render_config(&s);
    assert!(text.starts_with("# xlb configuration"), "{text}");
    assert!(text.contains("addr = \"[2001:db8::100]:53\""), "{text}");
    assert!(text.contains("addr = \"10.0.0.100:0\""), "{text}");
    assert_eq!(parse_config(&text).expect("rendered config parses"), s);
    // Stable: the same state renders to the same text, in VipSpec order.
    assert_eq!(render_config(&parse_config(&text).expect("parses")), text);
    // VipSpec order: address, then port, then protocol.
    let order: Vec<usize> = [
        "10.0.0.100:0",
        "10.0.0.100:80",
        "[2001:db8::1]:443",
        "[2001:db8::100]:53",
    ]
    .iter()
    .map(|a| text.find(&format!("\"{a}\"")).expect("rendered"))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    // The empty state too.
    let empty = render_config(&DesiredState::default());
    assert_eq!(
        parse_config(&empty).expect("parses"),
        DesiredState::default()
    );
}

#[test]
fn design_example_parses_to_the_expected_state() {
    let text = r#"version = 1
[[vip]]
addr = "10.0.0.100:80"        # "[2001:db8::1]:443"; port 0 = every port
proto = "tcp"
flags = ["no-src-port"]        # "no-conntrack", ...
reals = [ { addr = "10.0.0.11", weight = 1 }, { addr = "10.0.0.12", weight = 2 } ]
"#;
    let expected = state(vec![(
        "tcp/10.0.0.100:80",
        desired(NO_SRC_PORT, &[("10.0.0.11", 1), ("10.0.0.12", 2)]),
    )]);
    assert_eq!(parse_config(text).expect("parses"), expected);
}

#[test]
fn optional_fields_default_and_other_toml_forms_are_accepted() {
    let text = r#"
version = 1
vip = [ { addr = "[2001:db8::1]:443", proto = "UDP" } ]

[[vip]]
addr = "10.0.0.100:0"
proto = "tcp"

[[vip.reals]]
addr = "10.0.0.11"

[[vip.reals]]
addr = "10.0.0.12"
weight = 0
"#;
    // `vip = [...]` and `[[vip]]` cannot be mixed in TOML: parse the two halves apart.
    let (inline, tables) = text.split_at(text.find("\n[[vip]]").expect("split"));
    assert_eq!(
        parse_config(inline).expect("parses"),
        state(vec![("udp/[2001:db8::1]:443", DesiredVip::default())])
    );
    assert_eq!(
        parse_config(&format!("version = 1\n{tables}")).expect("parses"),
        state(vec![(
            "tcp/10.0.0.100:0",
            desired(VipFlags::default(), &[("10.0.0.11", 1), ("10.0.0.12", 0)])
        )])
    );
    assert_eq!(
        parse_config("version = 1\n").expect("parses"),
        DesiredState::default()
    );
}

#[test]
fn every_validation_error_names_line_and_field() {
    let cases: &[(&str, &[&str])] = &[
        (
            // The example of the module documentation, verbatim.
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\n[[vip]]\n\
             addr = \"10.0.0.300:80\"\nproto = \"tcp\"\n",
            &["line 7: vip[1].addr: invalid VIP \"10.0.0.300:80\": bad IPv4 address"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
             reals = [{ addr = \"10.0.0.11\", weight = 70000 }]\n",
            &[
                "line 5: ",
                "vip[0].reals[0].weight",
                "70000",
                "out of range",
            ],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n[[vip]]\n\
             addr = \"10.0.0.2:80\"\nproto = \"tcp\"\nreals = [\n  { addr = \"10.0.0.11\" },\n\
             \x20 { addr = \"10.0.0.12\", weight = -1 },\n]\n",
            &["line 10: ", "vip[1].reals[1].weight", "-1"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n[[vip]]\n\
             addr = \"10.0.0.1:80\"\nproto = \"udp\"\n[[vip]]\naddr = \"10.0.0.1:80\"\n\
             proto = \"tcp\"\n",
            &[
                "line 9: ",
                "vip[2].addr",
                "duplicate VIP tcp/10.0.0.1:80",
                "vip[0]",
            ],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\nreals = [\n\
             { addr = \"10.0.0.11\" },\n{ addr = \"10.0.0.11\", weight = 2 },\n]\n",
            &[
                "line 7: ",
                "vip[0].reals[1].addr",
                "duplicate real 10.0.0.11",
            ],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\nmode = \"dr\"\n\
             reals = [{ addr = \"2001:db8::11\" }]\n",
            &["line 6: ", "vip[0].reals[0].addr", "IPv6", "IPv4"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\nmode = \"tunnel\"\n\
             reals = [{ addr = \"2001:db8::11\", mode = \"dr\" }]\n",
            &["line 6: ", "vip[0].reals[0].addr", "IPv6", "IPv4"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\nmode = \"fullnat\"\n",
            &[
                "line 5: ",
                "vip[0].mode",
                "unknown mode \"fullnat\" (expected dr | tunnel | nat)",
            ],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"[2001:db8::1]:443\"\nproto = \"tcp\"\n\
             reals = [{ addr = \"10.0.0.11\", mode = \"dr\" }]\n",
            &["line 5: ", "vip[0].reals[0].addr", "IPv4"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
             reals = [{ addr = \"10.0.0.11:8080\", mode = \"dr\" }]\n",
            &["line 5: ", "vip[0].reals[0].addr", "only NAT mode can map"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:0\"\nproto = \"tcp\"\nmode = \"nat\"\n\
             reals = [{ addr = \"10.0.0.11\", port = 8080 }]\n",
            &["line 6: ", "vip[0].reals[0].addr", "serves every port"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\nmode = \"nat\"\n\
             reals = [{ addr = \"10.0.0.11:8080\", port = 8081 }]\n",
            &["line 6: ", "vip[0].reals[0].port", "already names a port"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\nmode = \"nat\"\n\
             reals = [{ addr = \"10.0.0.11\", port = 0 }]\n",
            &["line 6: ", "vip[0].reals[0].port", "out of range"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\nmode = \"nat\"\n\
             reals = [{ addr = \"2001:db8::11\" }]\n",
            &["line 6: ", "vip[0].reals[0].addr", "one address family"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
             reals = [{ addr = \"10.0.0\" }]\n",
            &[
                "line 5: ",
                "vip[0].reals[0].addr",
                "invalid real address \"10.0.0\"",
            ],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
             reals = [{ addr = \"127.0.0.1\" }]\n",
            &["line 5: ", "vip[0].reals[0].addr", "loopback"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"0.0.0.0:80\"\nproto = \"tcp\"\n",
            &["line 3: ", "vip[0].addr", "unspecified"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"2001:db8::1:80\"\nproto = \"tcp\"\n",
            &["line 3: ", "vip[0].addr", "needs brackets"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"tcp/10.0.0.1:80\"\nproto = \"tcp\"\n",
            &["line 3: ", "vip[0].addr", "goes in `proto`"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
             flags = [\"no-src-port\", \"sticky\"]\n",
            &[
                "line 5: ",
                "vip[0].flags[1]",
                "unknown flag \"sticky\"",
                "no-conntrack",
            ],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"sctp\"\n",
            &["line 4: ", "vip[0].proto", "unknown protocol \"sctp\""],
        ),
        (
            "version = 1\n\n[[vip]]\nproto = \"tcp\"\n",
            &["line 3: ", "vip[0].addr", "missing"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\n",
            &["line 2: ", "vip[0].proto", "missing", "tcp or udp"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
             reals = [{ weight = 1 }]\n",
            &["line 5: ", "vip[0].reals[0].addr", "missing"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
             reals = [{ addr = \"10.0.0.11\", weight = \"2\" }]\n",
            &[
                "line 5: ",
                "vip[0].reals[0].weight",
                "expected an integer, found a string",
            ],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
             reals = [\"10.0.0.11\"]\n",
            &[
                "line 5: ",
                "vip[0].reals[0]",
                "expected a table",
                "found a string",
            ],
        ),
        (
            "version = 1\n[[vip]]\naddr = 1979-05-27T07:32:00Z\nproto = \"tcp\"\n",
            &["line 3: ", "vip[0].addr", "found a date-time"],
        ),
        (
            "version = 1\n[vip]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n",
            &[
                "line 2: ",
                "vip: expected an array of tables",
                "found a table",
            ],
        ),
    ];
    for (text, parts) in cases {
        let message = parse_err(text);
        assert_contains(&message, parts);
    }
    // The structured form carries the same.
    let e = parse_config(cases[1].0).unwrap_err();
    assert_eq!(e.line(), 5);
    assert_eq!(e.field(), Some("vip[0].reals[0].weight"));
}

#[test]
fn unknown_keys_are_refused_by_name() {
    let cases: &[(&str, &[&str])] = &[
        (
            "version = 1\nvips = []\n",
            &["line 2: vips: unknown key (expected version or vip)"],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\nscheduler = \"rr\"\n",
            &[
                "line 5: vip[0].scheduler: unknown key",
                "addr, proto, flags, mode, quorum, sorry_server, on_quorum_lost, down_flows, reals or check",
            ],
        ),
        (
            "version = 1\n[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
             reals = [{ addr = \"10.0.0.11\", wieght = 2 }]\n",
            &["line 5: vip[0].reals[0].wieght: unknown key (expected addr, port, weight, mode or check)"],
        ),
        (
            "version = 1\n\"odd key\" = 1\n",
            &["line 2: \"odd key\": unknown key"],
        ),
    ];
    for (text, parts) in cases {
        assert_contains(&parse_err(text), parts);
    }
}

#[test]
fn version_is_required_and_must_be_1() {
    assert_contains(
        &parse_err("[[vip]]\naddr = \"10.0.0.1:80\"\nproto = \"tcp\"\n"),
        &["line 1: version: missing", "version = 1"],
    );
    assert_contains(&parse_err(""), &["version: missing"]);
    assert_contains(
        &parse_err("# a later file\n\nversion = 2\n[[vip]]\nhealth = \"tcp\"\n"),
        &["line 3: version: unsupported version 2", "reads version 1"],
    );
    assert_contains(
        &parse_err("version = \"1\"\n"),
        &["line 1: version: expected an integer, found a string"],
    );
    assert_contains(&parse_err("version = 0\n"), &["unsupported version 0"]);
}

#[test]
fn toml_syntax_errors_name_the_line() {
    let e =
        parse_config("version = 1\n[[vip]]\naddr = \"10.0.0.1:80\nproto = \"tcp\"\n").unwrap_err();
    assert!(matches!(e, ConfigError::Syntax { line: 3, .. }), "{e}");
    assert!(e.to_string().starts_with("line 3: "), "{e}");
    let e = parse_config("version = 1\nversion = 1\n").unwrap_err();
    assert_contains(&e.to_string(), &["line 2: ", "duplicate key"]);
    assert!(!e.to_string().contains('\n'), "{e}");
}

// ---- diff and describe ----

#[test]
fn diff_from_empty_adds_each_vip_then_its_reals() {
    let want = state(vec![
        (
            "tcp/10.0.0.100:80",
            desired(NO_SRC_PORT, &[("10.0.0.12", 2), ("10.0.0.11", 1)]),
        ),
        (
            "udp/[2001:db8::100]:53",
            desired(NO_CONNTRACK, &[("2001:db8::11", 1)]),
        ),
    ]);
    let web = vip("tcp/10.0.0.100:80");
    let dns = vip("udp/[2001:db8::100]:53");
    assert_eq!(
        diff(&DesiredState::default(), &want),
        vec![
            Change::AddVip {
                spec: web,
                flags: NO_SRC_PORT
            },
            Change::AddReal {
                vip: web,
                addr: ip("10.0.0.11"),
                weight: 1,
                mac: None
            },
            Change::AddReal {
                vip: web,
                addr: ip("10.0.0.12"),
                weight: 2,
                mac: None
            },
            Change::AddVip {
                spec: dns,
                flags: NO_CONNTRACK
            },
            Change::AddReal {
                vip: dns,
                addr: ip("2001:db8::11"),
                weight: 1,
                mac: None
            },
        ]
    );
}

#[test]
fn diff_to_empty_removes_every_vip() {
    let changes = diff(&sample(), &DesiredState::default());
    let expected: Vec<Change> = sample()
        .vips
        .keys()
        .map(|spec| Change::DelVip { spec: *spec })
        .collect();
    assert_eq!(changes, expected);
    assert_eq!(changes.len(), 4);
}

#[test]
fn diff_weight_change_is_set_weight() {
    let have = state(vec![(
        "tcp/10.0.0.100:80",
        desired(NO_SRC_PORT, &[("10.0.0.11", 1), ("10.0.0.12", 2)]),
    )]);
    let want = state(vec![(
        "tcp/10.0.0.100:80",
        desired(NO_SRC_PORT, &[("10.0.0.11", 0), ("10.0.0.12", 2)]),
    )]);
    assert_eq!(
        diff(&have, &want),
        vec![Change::SetWeight {
            vip: vip("tcp/10.0.0.100:80"),
            addr: ip("10.0.0.11"),
            weight: 0
        }]
    );
}

#[test]
fn diff_flag_change_is_set_flags() {
    let have = state(vec![(
        "tcp/10.0.0.100:80",
        desired(NO_SRC_PORT, &[("10.0.0.11", 1)]),
    )]);
    let want = state(vec![(
        "tcp/10.0.0.100:80",
        desired(NO_CONNTRACK, &[("10.0.0.11", 1)]),
    )]);
    assert_eq!(
        diff(&have, &want),
        vec![Change::SetFlags {
            vip: vip("tcp/10.0.0.100:80"),
            flags: NO_CONNTRACK
        }]
    );
}

#[test]
fn diff_replaces_a_real_within_a_vip() {
    let have = state(vec![(
        "tcp/10.0.0.100:80",
        desired(VipFlags::default(), &[("10.0.0.11", 1), ("10.0.0.12", 1)]),
    )]);
    let want = state(vec![(
        "tcp/10.0.0.100:80",
        desired(VipFlags::default(), &[("10.0.0.10", 3), ("10.0.0.12", 1)]),
    )]);
    let spec = vip("tcp/10.0.0.100:80");
    assert_eq!(
        diff(&have, &want),
        vec![
            Change::DelReal {
                vip: spec,
                addr: ip("10.0.0.11")
            },
            Change::AddReal {
                vip: spec,
                addr: ip("10.0.0.10"),
                weight: 3,
                mac: None
            },
        ]
    );
}

#[test]
fn diff_of_equal_states_is_empty() {
    assert_eq!(diff(&sample(), &sample()), vec![]);
    assert_eq!(
        diff(&DesiredState::default(), &DesiredState::default()),
        vec![]
    );
}

#[test]
fn applied_diffs_reach_the_desired_state_on_a_balancer() {
    let mut b = Balancer::new(
        FakeDataplane::new(Limits::default()),
        Duration::from_secs(900),
    );
    let mut other = sample();
    other.vips.remove(&vip("udp/10.0.0.100:0"));
    if let Some(web) = other.vips.get_mut(&vip("tcp/10.0.0.100:80")) {
        web.flags = NO_CONNTRACK;
        web.reals.remove(&ip("10.0.0.11"));
        web.reals.insert(ip("10.0.0.12"), 5);
        web.reals.insert(ip("10.0.0.15"), 1);
    }
    other.vips.insert(
        vip("udp/10.0.0.200:53"),
        desired(VipFlags::default(), &[("10.0.0.21", 1)]),
    );
    for want in [sample(), other, sample(), DesiredState::default()] {
        let have = DesiredState::from_snapshot(&b.snapshot());
        let changes = diff(&have, &want);
        b.apply(changes.clone())
            .unwrap_or_else(|e| panic!("diff refused: {e}\n{changes:#?}"));
        let snapshot = b.snapshot();
        assert_eq!(DesiredState::from_snapshot(&snapshot), want);
        // Reals from a diff have no MAC yet: configured, but not in the ring.
        assert!(snapshot
            .vips
            .iter()
            .flat_map(|v| &v.reals)
            .all(|r| r.mac.is_none() && !r.in_ring));
        assert_eq!(diff(&DesiredState::from_snapshot(&snapshot), &want), vec![]);
    }
}

#[test]
fn describe_prints_one_line_per_change() {
    let spec = vip("tcp/10.0.0.100:80");
    let v6 = vip("udp/[2001:db8::100]:53");
    let cases = [
        (
            Change::AddVip {
                spec,
                flags: NO_SRC_PORT,
            },
            "+ vip tcp/10.0.0.100:80 [no-src-port]",
        ),
        (
            Change::AddVip {
                spec: v6,
                flags: VipFlags::default(),
            },
            "+ vip udp/[2001:db8::100]:53",
        ),
        (Change::DelVip { spec }, "- vip tcp/10.0.0.100:80"),
        (
            Change::SetFlags {
                vip: spec,
                flags: NO_CONNTRACK,
            },
            "~ vip tcp/10.0.0.100:80 flags -> [no-conntrack]",
        ),
        (
            Change::AddReal {
                vip: spec,
                addr: ip("10.0.0.11"),
                weight: 1,
                mac: None,
            },
            "+ real tcp/10.0.0.100:80 10.0.0.11 weight 1",
        ),
        (
            Change::DelReal {
                vip: v6,
                addr: ip("2001:db8::11"),
            },
            "- real udp/[2001:db8::100]:53 2001:db8::11",
        ),
        (
            Change::SetWeight {
                vip: spec,
                addr: ip("10.0.0.11"),
                weight: 2,
            },
            "~ real tcp/10.0.0.100:80 10.0.0.11 weight -> 2",
        ),
        (
            Change::SetMac {
                vip: None,
                addr: ip("10.0.0.11").ip,
                mac: Some([0x02, 0, 0, 0, 0, 0x0b]),
            },
            "~ real * 10.0.0.11 mac 02:00:00:00:00:0b",
        ),
    ];
    for (change, line) in cases {
        assert_eq!(describe(&change), line);
    }
    // With the state the changes apply to, modifications show the old value.
    let have = state(vec![(
        "tcp/10.0.0.100:80",
        desired(VipFlags::default(), &[("10.0.0.11", 1)]),
    )]);
    let want = state(vec![(
        "tcp/10.0.0.100:80",
        desired(NO_CONNTRACK, &[("10.0.0.11", 2), ("10.0.0.12", 1)]),
    )]);
    let lines: Vec<String> = diff(&have, &want)
        .iter()
        .map(|c| describe_from(&have, c))
        .collect();
    assert_eq!(
        lines,
        vec![
            "~ vip tcp/10.0.0.100:80 flags [] -> [no-conntrack]",
            "~ real tcp/10.0.0.100:80 10.0.0.11 weight 1 -> 2",
            "+ real tcp/10.0.0.100:80 10.0.0.12 weight 1",
        ]
    );
}

// ---- ipvsadm ----

/// As `ipvsadm -S -n` prints it (ipvsadm 1.31), plus a comment and a blank line.
const DUMP: &str = "\
# ipvsadm-save -n on lb1
-A -t 10.0.0.100:80 -s wlc
-a -t 10.0.0.100:80 -r 10.0.0.11:80 -g -w 1
-a -t 10.0.0.100:80 -r 10.0.0.12:80 -g -w 3
-a -t 10.0.0.100:80 -r 10.0.0.13:80 -g -w 0

-A -t 10.0.0.100:443 -s sh -p 300
-a -t 10.0.0.100:443 -r 10.0.0.11:443 -g -w 1 -x 100 -y 10
-A -u 10.0.0.53:53 -s rr
-a -u 10.0.0.53:53 -r 10.0.0.21:53 -g -w 1
-a -u 10.0.0.53:53 -r 10.0.0.22:53 -g -w 1
-A -u [2001:db8::100]:53 -s rr -p 300 -M 64
-a -u [2001:db8::100]:53 -r [2001:db8::11]:53 -g -w 2
-A -t 10.0.0.101:0 -s wlc
-a -t 10.0.0.101:0 -r 10.0.0.31:0 -g -w 1
";

fn import_err(text: &str) -> String {
    match import_ipvsadm(text) {
        Ok(report) => panic!("accepted {text:?} as {report:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn ipvsadm_dump_imports_with_warnings() {
    let report = import_ipvsadm(DUMP).expect("imports");
    let expected = dr(state(vec![
        (
            "tcp/10.0.0.100:80",
            desired(
                VipFlags::default(),
                &[("10.0.0.11", 1), ("10.0.0.12", 3), ("10.0.0.13", 0)],
            ),
        ),
        (
            "tcp/10.0.0.100:443",
            desired(NO_SRC_PORT, &[("10.0.0.11", 1)]),
        ),
        (
            "udp/10.0.0.53:53",
            desired(VipFlags::default(), &[("10.0.0.21", 1), ("10.0.0.22", 1)]),
        ),
        (
            "udp/[2001:db8::100]:53",
            desired(NO_SRC_PORT, &[("2001:db8::11", 2)]),
        ),
        (
            "tcp/10.0.0.101:0",
            desired(VipFlags::default(), &[("10.0.0.31", 1)]),
        ),
    ]));
    assert_eq!(report.state, expected);
    let scheduler: Vec<&String> = report
        .warnings
        .iter()
        .filter(|w| w.contains("scheduler ignored"))
        .collect();
    assert_eq!(scheduler.len(), 1, "{:#?}", report.warnings);
    assert_contains(scheduler[0], &["line 2: ", "wlc, sh, rr", "Maglev"]);
    assert_eq!(report.warnings[0], *scheduler[0]);
    let persistence: Vec<&String> = report
        .warnings
        .iter()
        .filter(|w| w.contains("persistence (-p 300) imported as flag no-src-port"))
        .collect();
    assert_eq!(persistence.len(), 2, "{:#?}", report.warnings);
    assert!(persistence[0].starts_with("line 7: tcp/10.0.0.100:443"));
    assert!(report
        .warnings
        .iter()
        .any(|w| w.starts_with("line 8: ") && w.contains("thresholds (-x 100)")));
    assert!(report
        .warnings
        .iter()
        .any(|w| w.starts_with("line 12: ") && w.contains("netmask (-M 64)")));
    assert_eq!(report.warnings.len(), 5, "{:#?}", report.warnings);
    // The imported state is a config like any other.
    assert_eq!(
        parse_config(&render_config(&report.state)).expect("parses"),
        expected
    );
}

#[test]
fn ipvsadm_long_options_are_read() {
    let text = "--add-service --tcp-service 10.0.0.100:80 --scheduler wlc --persistent\n\
                --add-server --tcp-service 10.0.0.100:80 --real-server 10.0.0.11:80 \
                --gatewaying --weight 4\n\
                --add-server --tcp-service=10.0.0.100:80 --real-server=10.0.0.12 --weight=0\n";
    let report = import_ipvsadm(text).expect("imports");
    assert_eq!(
        report.state,
        dr(state(vec![(
            "tcp/10.0.0.100:80",
            desired(NO_SRC_PORT, &[("10.0.0.11", 4), ("10.0.0.12", 0)]),
        )]))
    );
}

#[test]
fn ipvsadm_tunnel_servers_import_in_tunnel_mode() {
    let text = "-A -t 10.0.0.100:80 -s rr\n\
                -a -t 10.0.0.100:80 -r 192.0.2.11:80 -i -w 1\n\
                -a -t 10.0.0.100:80 -r 192.0.2.12:80 --ipip -w 2\n\
                -a -t 10.0.0.100:80 -r 10.0.0.13:80 -g -w 1\n\
                -A -t 10.0.0.101:80 -s rr\n\
                -a -t 10.0.0.101:80 -r 10.0.0.14:80 -g -w 1\n";
    let report = import_ipvsadm(text).expect("imports");
    let a = &report.state.vips[&vip("tcp/10.0.0.100:80")];
    assert_eq!(a.mode, Some(Mode::Tunnel));
    assert_eq!(a.real_modes, BTreeMap::from([(ip("10.0.0.13"), Mode::Dr)]));
    assert_eq!(
        report.state.vips[&vip("tcp/10.0.0.101:80")].mode,
        Some(Mode::Dr)
    );
    let text = render_config(&report.state);
    assert!(text.contains("mode = \"tunnel\""), "{text}");
    assert_eq!(parse_config(&text).expect("round trip"), report.state);
    // --tun-type is the daemon's --encap, not a server's.
    let e = import_ipvsadm(
        "-A -t 10.0.0.100:80\n-a -t 10.0.0.100:80 -r 192.0.2.11 -i --tun-type gue\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--tun-type") && e.contains("--encap"), "{e}");
}

#[test]
fn nat_reals_with_ports_round_trip_through_the_file_and_import_from_ipvsadm() {
    let text = "version = 1\n[[vip]]\naddr = \"10.0.0.100:80\"\nproto = \"tcp\"\nmode = \"nat\"\n\
                reals = [{ addr = \"10.0.1.11\", port = 8080, weight = 2 }, \
                { addr = \"10.0.1.11:8081\" }, { addr = \"10.0.1.12\" }]\n\
                [[vip]]\naddr = \"[2001:db8::100]:443\"\nproto = \"tcp\"\nmode = \"nat\"\n\
                reals = [{ addr = \"2001:db8::11\", port = 8443 }]\n";
    let state = parse_config(text).expect("parses");
    let web = &state.vips[&vip("tcp/10.0.0.100:80")];
    assert_eq!(
        web.reals,
        BTreeMap::from([
            (ip("10.0.1.11:8080"), 2),
            (ip("10.0.1.11:8081"), 1),
            (ip("10.0.1.12"), 1)
        ])
    );
    let rendered = render_config(&state);
    assert!(
        rendered.contains("{ addr = \"10.0.1.11\", port = 8081, weight = 1 }"),
        "{rendered}"
    );
    assert!(
        rendered.contains("{ addr = \"2001:db8::11\", port = 8443, weight = 1 }"),
        "{rendered}"
    );
    assert_eq!(parse_config(&rendered).expect("round trip"), state);

    let report = import_ipvsadm(
        "-A -t 10.0.0.100:80 -s wrr\n-a -t 10.0.0.100:80 -r 10.0.1.11:8080 -m -w 2\n\
         -a -t 10.0.0.100:80 -r 10.0.1.12:80 -m -w 1\n",
    )
    .expect("imports");
    let web = &report.state.vips[&vip("tcp/10.0.0.100:80")];
    assert_eq!(web.mode, Some(Mode::Nat));
    assert!(web.real_modes.is_empty(), "{:?}", web.real_modes);
    assert_eq!(
        web.reals,
        BTreeMap::from([(ip("10.0.1.11:8080"), 2), (ip("10.0.1.12"), 1)])
    );
}

#[test]
fn ipvsadm_unsupported_lines_are_errors_naming_line_and_token() {
    // Each case: the dump with one line appended (line 16), and what the error says.
    let cases: &[(&str, &[&str])] = &[
        (
            "-a -t 10.0.0.100:80 -r 10.0.0.14:80 -m -w 1",
            &["line 16: ", "NAT reals cannot share a VIP"],
        ),
        (
            "-a -t 10.0.0.100:80 -r [2001:db8::14]:80 -g -w 1",
            &["line 16: ", "different address families"],
        ),
        ("-A -f 1 -s rr", &["line 16: -f 1: firewall-mark"]),
        (
            "-a -t 10.0.0.100:80 -r 10.0.0.14:8080 -g -w 1",
            &["line 16: -r 10.0.0.14:8080: real port 8080 differs from the service port 80"],
        ),
        (
            "-a -t 10.0.0.102:80 -r 10.0.0.14:80 -g -w 1",
            &["line 16: -t 10.0.0.102:80: service tcp/10.0.0.102:80 was not added"],
        ),
        (
            "-a -t 10.0.0.100:80 -r 10.0.0.14:80 -g -w 1 --frobnicate",
            &["line 16: --frobnicate: unrecognised option"],
        ),
        (
            "-a -t 10.0.0.100:80 -r 10.0.0.14:80 -g -w 1 banana",
            &["line 16: banana: unexpected token"],
        ),
        (
            "-A -t 10.0.0.100:80 -s wlc",
            &["line 16: -t 10.0.0.100:80: service tcp/10.0.0.100:80 was already added on line 2"],
        ),
        (
            "-a -t 10.0.0.100:80 -r 10.0.0.11:80 -g -w 1",
            &["line 16: -r 10.0.0.11:80: real 10.0.0.11 is already a server"],
        ),
        (
            "-a -t 10.0.0.100:80 -r 10.0.0.14:80 -g -w 70000",
            &["line 16: -w 70000: expected a weight from 0 to 65535"],
        ),
        (
            "-a -u [2001:db8::100]:53 -r 10.0.0.14:53 -g -w 1",
            &["line 16: -r 10.0.0.14:53: ", "IPv4", "IPv6"],
        ),
        (
            "-A -t www.example.com:http -s wlc",
            &[
                "line 16: -t www.example.com:http: invalid VIP",
                "ipvsadm -S -n",
            ],
        ),
        (
            "-D -t 10.0.0.100:80",
            &["line 16: -D: not a rule of a saved table"],
        ),
        (
            "-a -t 10.0.0.100:80 -r 10.0.0.14:80 -w",
            &["line 16: -w: missing its value"],
        ),
        ("-A -s rr", &["line 16: -A: no service"]),
        (
            "-a -t 10.0.0.100:80 -g -w 1",
            &["line 16: -a: no real server"],
        ),
    ];
    for (line, parts) in cases {
        let text = format!("{DUMP}{line}\n");
        assert_eq!(text.lines().count(), 16);
        assert_contains(&import_err(&text), parts);
    }
    let e =
        import_ipvsadm("-A -t 10.0.0.100:80 -s wlc\n-a -f 1 -r 10.0.0.11:0 -g -w 1\n").unwrap_err();
    assert!(
        matches!(&e, ConfigError::Ipvsadm { line: 2, token, .. } if token == "-f 1"),
        "{e}"
    );
}

#[test]
fn modes_parse_render_diff_and_reach_the_balancer() {
    let text = "version = 1\n[[vip]]\naddr = \"10.0.0.100:80\"\nproto = \"tcp\"\n\
                mode = \"tunnel\"\nreals = [ { addr = \"2001:db8:9::11\" }, \
                { addr = \"10.0.0.12\", mode = \"dr\" } ]\n";
    let want = parse_config(text).expect("parses");
    let v = &want.vips[&vip("tcp/10.0.0.100:80")];
    assert_eq!(v.mode, Some(Mode::Tunnel));
    assert_eq!(v.real_modes, BTreeMap::from([(ip("10.0.0.12"), Mode::Dr)]));
    let rendered = render_config(&want);
    assert!(rendered.contains("mode = \"tunnel\"\n"), "{rendered}");
    assert!(
        rendered.contains("{ addr = \"10.0.0.12\", weight = 1, mode = \"dr\" }"),
        "{rendered}"
    );
    assert_eq!(parse_config(&rendered).expect("round trip"), want);

    // Applied to a balancer, then saved: the same config comes back.
    let mut bal = Balancer::new(FakeDataplane::new(Limits::default()), Duration::ZERO);
    let changes = diff(&DesiredState::default(), &want);
    bal.apply(changes).expect("apply");
    let snap = bal.snapshot();
    assert_eq!(snap.vips[0].effective_mode, Mode::Tunnel);
    let modes: Vec<(RealAddr, Mode)> = snap.vips[0]
        .reals
        .iter()
        .map(|r| (r.addr, r.effective_mode))
        .collect();
    assert_eq!(
        modes,
        vec![
            (ip("10.0.0.12"), Mode::Dr),
            (ip("2001:db8:9::11"), Mode::Tunnel)
        ]
    );
    assert_eq!(DesiredState::from_snapshot(&snap), want);

    // Back to the daemon's mode (direct routing): the IPv6 real cannot follow, and the whole
    // change is refused.
    let mut back = want.clone();
    back.vips.get_mut(&vip("tcp/10.0.0.100:80")).unwrap().mode = None;
    let changes = diff(&want, &back);
    assert_eq!(
        changes
            .iter()
            .map(|c| describe_from(&want, c))
            .collect::<Vec<_>>(),
        vec!["~ vip tcp/10.0.0.100:80 mode tunnel -> default"]
    );
    let e = bal.apply(changes).unwrap_err().to_string();
    assert!(e.contains("different address families"), "{e}");
    assert_eq!(bal.snapshot(), snap);
}

#[test]
fn a_real_whose_mode_changes_forgets_its_mac_until_it_is_resolved_again() {
    let mut bal = Balancer::new(FakeDataplane::new(Limits::default()), Duration::ZERO);
    let spec = vip("tcp/10.0.0.100:80");
    let gw = [2, 0, 0, 0, 0, 0x99];
    let mut want = DesiredState::default();
    let mut v = desired(VipFlags::default(), &[("10.0.0.11", 1)]);
    v.mode = Some(Mode::Tunnel);
    want.vips.insert(spec, v);
    bal.apply(diff(&DesiredState::default(), &want))
        .expect("apply");
    bal.apply(vec![Change::SetMac {
        vip: None,
        addr: ip("10.0.0.11").ip,
        mac: Some(gw),
    }])
    .expect("next hop");
    assert_eq!(bal.snapshot().vips[0].reals[0].mac, Some(gw));
    // To direct routing: the gateway's MAC is no longer where its frames may go.
    let mut dr = want.clone();
    dr.vips.get_mut(&spec).unwrap().mode = Some(Mode::Dr);
    bal.apply(diff(&want, &dr)).expect("apply");
    let r = &bal.snapshot().vips[0].reals[0];
    assert_eq!(
        (r.mac, r.effective_mode, r.in_ring),
        (None, Mode::Dr, false)
    );
}

#[test]
fn a_tunnel_real_refuses_checks_through_the_vip() {
    let text = "version = 1\n[[vip]]\naddr = \"10.0.0.100:80\"\nproto = \"tcp\"\n\
                mode = \"tunnel\"\nreals = [ { addr = \"10.0.0.11\" } ]\n\
                [vip.check]\ntype = \"tcp\"\ntarget = \"vip\"\n";
    let want = parse_config(text).expect("parses");
    let mut bal = Balancer::new(FakeDataplane::new(Limits::default()), Duration::ZERO);
    let e = bal
        .apply(diff(&DesiredState::default(), &want))
        .unwrap_err()
        .to_string();
    assert!(e.contains("target") && e.contains("tunnel"), "{e}");
    assert!(bal.snapshot().vips.is_empty(), "nothing applied");
    // The same in direct routing is fine.
    let dr = text.replace("mode = \"tunnel\"", "mode = \"dr\"");
    bal.apply(diff(
        &DesiredState::default(),
        &parse_config(&dr).expect("parses"),
    ))
    .expect("direct routing");
}

/// The example that ships in the package parses and validates.
#[test]
fn the_shipped_example_config_is_valid() {
    let text = include_str!("../../../../dist/xlb.example.toml");
    let desired = super::parse_config(text).expect("dist/xlb.example.toml parses");
    assert_eq!(desired.vips.len(), 2);
}
