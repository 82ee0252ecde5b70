//! Config file, diff and describe of the health parts: options, checks, reals' own checks.

use std::time::Duration;

use super::*;
use crate::model::{CheckType, DownFlows, OnQuorumLost, RealAddr, Target};

fn vip(s: &str) -> VipSpec {
    s.parse().expect("test VIP parses")
}

fn ip(s: &str) -> RealAddr {
    s.parse().expect("test address parses")
}

/// The issue's example, with the values of every key written out.
const FULL: &str = r#"version = 1
[[vip]]
addr = "10.0.0.100:80"
proto = "tcp"
quorum = 1
sorry_server = "10.0.0.99"
on_quorum_lost = "fail-open"
down_flows = "keep"
reals = [ { addr = "10.0.0.11" },
          { addr = "10.0.0.12", weight = 2, check = { port = 8080 } } ]
[vip.check]
type = "http"
port = 80
target = "real"
interval = "2s"
timeout = "1s"
rise = 2
fall = 3
initial = "up"
path = "/healthz"
host = "www.example.com"
expect_status = "200-399"

[[vip]]
addr = "10.0.0.100:53"
proto = "udp"
quorum = 3
on_quorum_lost = "drop"
down_flows = "move"
reals = [ { addr = "10.0.0.21", check = { type = "udp", send = "hex:0a0b", expect = "ok" } },
          { addr = "10.0.0.22", check = { type = "none" } } ]
[vip.check]
type = "dns"
name = "example.com"
qtype = "AAAA"
interval = "500ms"

[[vip]]
addr = "10.0.0.100:0"
proto = "tcp"
reals = [ { addr = "10.0.0.31" } ]
[vip.check]
type = "exec"
command = ["/usr/local/bin/check-app", "--port", "8080"]
dynamic = true
target = "real"
"#;

#[test]
fn the_documented_example_parses_with_every_key() {
    let state = parse_config(FULL).expect("parses");
    let web = &state.vips[&vip("tcp/10.0.0.100:80")];
    assert_eq!(web.options.sorry_server, Some(ip("10.0.0.99").ip));
    assert_eq!(web.options.on_quorum_lost, OnQuorumLost::FailOpen);
    let check = web.check.as_ref().expect("a check");
    assert_eq!(check.kind, Some(CheckType::Http));
    assert_eq!(check.path.as_deref(), Some("/healthz"));
    assert_eq!(check.target, Some(Target::Real));
    assert_eq!(web.real_checks[&ip("10.0.0.12")].port, Some(8080));
    assert_eq!(web.reals[&ip("10.0.0.12")], 2);
    let dns = &state.vips[&vip("udp/10.0.0.100:53")];
    assert_eq!(dns.options.quorum, 3);
    assert_eq!(dns.options.down_flows, DownFlows::Move);
    assert_eq!(dns.options.on_quorum_lost, OnQuorumLost::Drop);
    assert_eq!(
        dns.check.as_ref().and_then(|c| c.interval),
        Some(Duration::from_millis(500))
    );
    assert_eq!(dns.real_checks[&ip("10.0.0.21")].kind, Some(CheckType::Udp));
    let exec = &state.vips[&vip("tcp/10.0.0.100:0")];
    assert_eq!(exec.check.as_ref().and_then(|c| c.dynamic), Some(true));
}

#[test]
fn save_writes_it_all_back() {
    let state = parse_config(FULL).expect("parses");
    let text = render_config(&state);
    assert_eq!(parse_config(&text).expect("rendered text parses"), state);
    assert!(text.contains("sorry_server = \"10.0.0.99\""), "{text}");
    assert!(text.contains("[vip.check]\ntype = \"http\""), "{text}");
    assert!(
        text.contains("{ addr = \"10.0.0.12\", weight = 2, check = { port = 8080 } }"),
        "{text}"
    );
    // Defaults are not written out.
    assert!(!text.contains("down_flows = \"keep\""), "{text}");
}

#[test]
fn check_errors_name_the_line_and_the_field() {
    let head = "version = 1\n[[vip]]\naddr = \"10.0.0.100:80\"\nproto = \"tcp\"\n";
    let cases: &[(&str, &[&str])] = &[
        (
            "[vip.check]\ntype = \"http\"\ninterval = \"2\"\n",
            &["line 7: vip[0].check.interval: invalid duration \"2\""],
        ),
        (
            "[vip.check]\nport = 80\n",
            &["line 5: vip[0].check.type: missing"],
        ),
        (
            "[vip.check]\ntype = \"tcp\"\npath = \"/x\"\n",
            &["line 7: vip[0].check.path: does not apply to a tcp check"],
        ),
        (
            "[vip.check]\ntype = \"http\"\nintervall = \"2s\"\n",
            &["line 7: vip[0].check.intervall: unknown key"],
        ),
        (
            "[vip.check]\ntype = \"exec\"\ncommand = [\"/bin/true\"]\ndynamic = \"yes\"\n",
            &["line 8: vip[0].check.dynamic: expected a boolean, found a string"],
        ),
        (
            "reals = [ { addr = \"10.0.0.11\", check = { port = 8080 } } ]\n",
            &[
                "line 5: vip[0].reals[0].check.type: missing",
                "the VIP has no check",
            ],
        ),
        (
            "reals = [ { addr = \"10.0.0.11\", check = { path = \"/x\" } } ]\n\
             [vip.check]\ntype = \"tcp\"\n",
            &["line 5: vip[0].reals[0].check.path: does not apply to a tcp check"],
        ),
        (
            "quorum = -1\n",
            &["line 5: vip[0].quorum: -1 is out of range"],
        ),
        (
            "on_quorum_lost = \"open\"\n",
            &["line 5: vip[0].on_quorum_lost: unknown value \"open\" (expected fail-open | drop)"],
        ),
        (
            "mode = \"dr\"\nsorry_server = \"2001:db8::99\"\n",
            &["line 6: vip[0].sorry_server: real 2001:db8::99 is IPv6"],
        ),
        (
            "sorry_server = \"10.0.0.11\"\nreals = [ { addr = \"10.0.0.11\" } ]\n",
            &["line 6: vip[0].reals[0].addr: 10.0.0.11 is also the VIP's sorry_server"],
        ),
    ];
    for (tail, words) in cases {
        let text = format!("{head}{tail}");
        let e = parse_config(&text).unwrap_err().to_string();
        for w in *words {
            assert!(e.contains(w), "{text}\n=> {e}\n(lacks {w:?})");
        }
    }
    // A port-0 VIP's check names its port.
    let e = parse_config(
        "version = 1\n[[vip]]\naddr = \"10.0.0.100:0\"\nproto = \"tcp\"\n[vip.check]\n\
         type = \"tcp\"\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("vip[0].check.port: missing"), "{e}");
}

#[test]
fn diff_and_describe_checks_and_options() {
    let base = parse_config(FULL).expect("parses");
    let mut next = base.clone();
    let web = next
        .vips
        .get_mut(&vip("tcp/10.0.0.100:80"))
        .expect("the web VIP");
    if let Some(c) = web.check.as_mut() {
        c.interval = Some(Duration::from_secs(5));
    }
    web.options.quorum = 2;
    web.real_checks.insert(
        ip("10.0.0.11"),
        CheckFields::from_json(&serde_json::json!({"port": 8081})).expect("check"),
    );
    next.vips
        .get_mut(&vip("udp/10.0.0.100:53"))
        .expect("the dns VIP")
        .check = None;
    let changes = diff(&base, &next);
    let lines: Vec<String> = changes.iter().map(|c| describe_from(&base, c)).collect();
    assert_eq!(
        lines,
        vec![
            "- check udp/10.0.0.100:53",
            "~ vip tcp/10.0.0.100:80 quorum 1 -> 2",
            "~ check tcp/10.0.0.100:80 interval 2s -> 5s",
            "+ check tcp/10.0.0.100:80 real 10.0.0.11 port 8081",
        ]
    );
    assert!(diff(&base, &base).is_empty());
    let from_empty = diff(&DesiredState::default(), &base);
    let lines: Vec<String> = from_empty
        .iter()
        .map(|c| describe_from(&DesiredState::default(), c))
        .collect();
    assert!(
        lines.contains(&"~ vip tcp/10.0.0.100:80 sorry_server none -> 10.0.0.99".to_string()),
        "{lines:?}"
    );
    assert!(
        lines.contains(
            &"+ check tcp/10.0.0.100:80 type http port 80 target real interval 2s timeout 1s \
              rise 2 fall 3 initial up path /healthz host www.example.com expect_status 200-399"
                .to_string()
        ),
        "{lines:?}"
    );
}
