//! The import on keepalived.conf files written the way keepalived's man page documents them
//! (`testdata/*.conf`; each passes `keepalived --config-test`, which the lab tests check), with
//! the config each must give (`testdata/*.toml`), and on the lines xlb refuses.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use super::*;
use crate::{
    core::config::{parse_config, render_config},
    model::{CheckType, OnQuorumLost},
};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/core/config/keepalived/testdata")
        .join(name)
}

fn import(name: &str) -> KeepalivedImport {
    import_keepalived(&FsLoader, &testdata(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Messages without the directory part of their file names.
fn short(lines: &[String]) -> Vec<String> {
    let dir = format!(
        "{}/",
        testdata("").display().to_string().trim_end_matches('/')
    );
    lines.iter().map(|l| l.replace(&dir, "")).collect()
}

#[test]
fn each_file_gives_its_expected_config() {
    for name in ["dr-tcp", "http-urls", "misc-dynamic", "sorry-quorum"] {
        let got = render_config(&import(&format!("{name}.conf")).state);
        // XLB_BLESS=1 writes what the import gives as the expected config (review the diff).
        if std::env::var_os("XLB_BLESS").is_some() {
            std::fs::write(testdata(&format!("{name}.toml")), &got).expect("writing");
        }
        let want = std::fs::read_to_string(testdata(&format!("{name}.toml")))
            .unwrap_or_else(|e| panic!("{name}.toml: {e}"));
        assert_eq!(got, want, "{name}.conf");
        // What is imported is a config xlb reads back as it is.
        assert_eq!(render_config(&parse_config(&got).expect("parses")), got);
    }
}

#[test]
fn dr_with_tcp_checks_takes_keepalived_s_timing_and_skips_vrrp() {
    let i = import("dr-tcp.conf");
    let v = &i.state.vips[&"tcp/10.0.0.100:80".parse().expect("vip")];
    assert_eq!(v.reals.len(), 2);
    let c = v.check.as_ref().expect("one check for both reals");
    assert_eq!(c.kind, Some(CheckType::Tcp));
    assert_eq!(c.interval, Some(Duration::from_secs(6)));
    assert_eq!(c.timeout, Some(Duration::from_secs(3)));
    // retry 3: down after the 4th failure in a row; one success brings it back.
    assert_eq!((c.rise, c.fall), (Some(1), Some(4)));
    assert_eq!(v.options.down_flows, DownFlows::Move);
    assert_eq!(
        short(&i.notes),
        vec![
            "dr-tcp.conf:3: global_defs skipped: not a virtual server",
            "dr-tcp.conf:10: vrrp_instance VI_1 skipped: keepalived can keep doing VRRP in front \
             of xlb",
        ]
    );
    let w = short(&i.warnings);
    assert!(
        w[0].starts_with("dr-tcp.conf:27: lb_algo wrr: xlb balances by Maglev"),
        "{w:?}"
    );
    assert!(
        w[1].starts_with("dr-tcp.conf:37: delay_before_retry 3: "),
        "{w:?}"
    );
}

#[test]
fn http_get_with_two_urls_checks_the_first_and_names_the_second() {
    let i = import("http-urls.conf");
    let v = &i.state.vips[&"tcp/192.168.10.100:80".parse().expect("vip")];
    // The virtual host differs per real: each real has its own check.
    assert!(v.check.is_none());
    let a = &v.real_checks[&"192.168.10.11".parse().expect("ip")];
    assert_eq!(a.path.as_deref(), Some("/healthz"));
    assert_eq!(a.host.as_deref(), Some("www.example.com"));
    assert_eq!(
        a.expect_status.as_ref().map(|s| s.to_string()),
        Some("200".into())
    );
    let b = &v.real_checks[&"192.168.10.12".parse().expect("ip")];
    assert_eq!(b.host.as_deref(), Some("admin.example.com"));
    assert_eq!(
        b.expect_status.as_ref().map(|s| s.to_string()),
        Some("200,204".into())
    );
    // inhibit_on_failure: a real that fails keeps its flows.
    assert_eq!(v.options.down_flows, DownFlows::Keep);
    let tls = &i.state.vips[&"tcp/192.168.10.100:443".parse().expect("vip")];
    let c = tls.check.as_ref().expect("check");
    assert_eq!(c.kind, Some(CheckType::Https));
    // keepalived's defaults where nothing is said: 5 s connect timeout, retry 1, 2xx.
    assert_eq!(c.timeout, Some(Duration::from_secs(5)));
    assert_eq!(c.fall, Some(2));
    assert_eq!(
        c.expect_status.as_ref().map(|s| s.to_string()),
        Some("200-299".into())
    );
    let w = short(&i.warnings);
    assert!(
        w.iter().any(|l| l.starts_with(
            "http-urls.conf:17: url: xlb checks one url per real: the \
                                        one at "
        ) && l.ends_with("http-urls.conf:13 is checked, this one is not")),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|l| l.starts_with("http-urls.conf:19: digest ")),
        "{w:?}"
    );
}

#[test]
fn misc_check_dynamic_becomes_an_exec_check_and_includes_are_followed() {
    let i = import("misc-dynamic.conf");
    let v = &i.state.vips[&"tcp/10.0.1.100:8080".parse().expect("vip")];
    let c = v.check.as_ref().expect("check");
    assert_eq!(c.kind, Some(CheckType::Exec));
    assert_eq!(
        c.command.as_deref(),
        Some(
            &[
                "/usr/local/bin/check-app".to_string(),
                "--port".into(),
                "8080".into()
            ][..]
        )
    );
    assert_eq!(c.dynamic, Some(true));
    assert_eq!(c.timeout, Some(Duration::from_secs(3)));
    // MISC_CHECK retries 0 times: down at the first failure. `alpha`: reals start down.
    assert_eq!(c.fall, Some(1));
    assert_eq!(c.initial, Some(crate::model::Initial::Down));
    // conf.d/udp.conf, included: a UDP check with a payload and a required reply, and ping.
    let udp = &i.state.vips[&"udp/10.0.1.100:514".parse().expect("vip")];
    let u = &udp.real_checks[&"10.0.1.11".parse().expect("ip")];
    assert_eq!(
        u.send.as_ref().map(|p| p.bytes()),
        Some(vec![0x0a, 0x0b, 0x0c])
    );
    assert_eq!(u.expect.as_ref().map(|p| p.bytes()), Some(vec![0x0d, 0x0e]));
    let p = &udp.real_checks[&"10.0.1.12".parse().expect("ip")];
    assert_eq!(p.kind, Some(CheckType::Ping));
    assert_eq!(p.fall, Some(3));
}

#[test]
fn a_group_with_quorum_and_a_sorry_server_gives_one_vip_per_member() {
    let i = import("sorry-quorum.conf");
    let specs: Vec<String> = i.state.vips.keys().map(|s| s.to_string()).collect();
    assert_eq!(
        specs,
        vec![
            "udp/10.0.2.100:53",
            "udp/10.0.2.101:53",
            "udp/10.0.2.102:53",
            "tcp/10.0.2.200:80"
        ]
    );
    for s in &specs[..3] {
        let v = &i.state.vips[&s.parse().expect("vip")];
        assert_eq!(v.options.quorum, 2);
        assert_eq!(
            v.options.sorry_server,
            Some("10.0.2.99".parse().expect("ip"))
        );
        assert_eq!(v.options.on_quorum_lost, OnQuorumLost::FailOpen);
        assert!(
            v.flags.no_src_port,
            "lb_algo sh hashes by the client's address"
        );
        let c = v.check.as_ref().expect("check");
        assert_eq!(c.name.as_deref(), Some("www.example.com"));
        assert_eq!(c.qtype.map(|q| q.to_string()), Some("A".into()));
        assert_eq!(c.fall, Some(4), "DNS_CHECK retries 3 times by default");
    }
    let w = short(&i.warnings);
    assert!(
        w.iter().any(|l| l.starts_with(
            "sorry-quorum.conf:36: persistence_timeout 300: becomes \
                                             the no-src-port flag"
        )),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|l| l.starts_with("sorry-quorum.conf:38: hysteresis 1: ")),
        "{w:?}"
    );
}

/// Files in memory, for the refusals.
struct Mem(BTreeMap<PathBuf, String>);

impl Loader for Mem {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        self.0
            .get(path)
            .cloned()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }

    fn glob(&self, pattern: &Path) -> std::io::Result<Vec<PathBuf>> {
        Ok(self.0.keys().filter(|k| *k == pattern).cloned().collect())
    }
}

#[test]
fn lb_kind_tun_and_a_real_s_own_lvs_method_give_modes() {
    let text = "virtual_server 10.0.0.100 80 {\nlb_kind TUN\nprotocol TCP\n\
                real_server 2001:db8::11 80 {\n}\n\
                real_server 10.0.0.12 80 {\nlvs_method DR\n}\n}\n";
    let mem = Mem(BTreeMap::from([(
        PathBuf::from("/t.conf"),
        text.to_string(),
    )]));
    let i = import_keepalived(&mem, Path::new("/t.conf")).expect("imports");
    let v = &i.state.vips[&"tcp/10.0.0.100:80".parse().unwrap()];
    assert_eq!(v.mode, Some(Mode::Tunnel));
    assert_eq!(
        v.real_modes,
        BTreeMap::from([("10.0.0.12".parse().unwrap(), Mode::Dr)])
    );
}

#[test]
fn lb_kind_nat_keeps_a_real_s_own_port_and_checks_it_there() {
    // Without lb_kind keepalived uses NAT too.
    for kind in ["lb_kind NAT\n", ""] {
        let text = format!(
            "virtual_server 10.0.0.100 80 {{\n{kind}protocol TCP\n\
             real_server 10.0.1.11 8080 {{\nweight 2\nTCP_CHECK {{\nconnect_port 8080\n}}\n}}\n\
             real_server 10.0.1.12 80 {{\n}}\n}}\n"
        );
        let mem = Mem(BTreeMap::from([(PathBuf::from("/t.conf"), text)]));
        let i = import_keepalived(&mem, Path::new("/t.conf")).expect("imports");
        let v = &i.state.vips[&"tcp/10.0.0.100:80".parse().unwrap()];
        assert_eq!(v.mode, Some(Mode::Nat), "{kind:?}");
        let r11: crate::model::RealAddr = "10.0.1.11:8080".parse().unwrap();
        let r12: crate::model::RealAddr = "10.0.1.12".parse().unwrap();
        assert_eq!(v.reals, BTreeMap::from([(r11, 2), (r12, 1)]));
        // connect_port is the real's own port: the check's default there, not written.
        let check = v
            .check
            .as_ref()
            .or(v.real_checks.get(&r11))
            .expect("a check");
        assert_eq!(check.port, None, "{check:?}");
    }
}

fn refused(body: &str) -> String {
    let text = format!("virtual_server 10.0.0.100 80 {{\n{body}\n}}\n");
    let mem = Mem(BTreeMap::from([(PathBuf::from("/k.conf"), text)]));
    import_keepalived(&mem, Path::new("/k.conf"))
        .map(|i| format!("accepted: {:?}", i.state))
        .unwrap_or_else(|e| e.to_string())
}

#[test]
fn what_xlb_cannot_express_is_refused_naming_the_line() {
    let rs = "real_server 10.0.0.11 80 {\n";
    let cases: &[(&str, &str)] = &[
        (
            "lb_kind FULLNAT",
            "/k.conf:2: lb_kind FULLNAT: FULLNAT is not a forwarding method",
        ),
        (
            "lb_kind NAT\nreal_server 10.0.0.11 8080 {\n}\nreal_server 10.0.0.12 80 {\nlvs_method DR\n}",
            "NAT reals cannot share a VIP",
        ),
        (
            "lb_kind TUN\nsorry_server 10.0.0.99 80\nsorry_server_lvs_method DR",
            "/k.conf:4: sorry_server_lvs_method DR: xlb's sorry server is forwarded to in its \
             VIP's mode",
        ),
        (
            "lb_kind DR\nreal_server 2001:db8::11 80 {\n}",
            "different address families",
        ),
        (
            "lb_kind DR\nprotocol SCTP",
            "/k.conf:3: protocol SCTP: protocol SCTP is not supported",
        ),
        (
            &format!("lb_kind DR\n{rs}SMTP_CHECK {{\n}}\n}}"),
            "/k.conf:4: SMTP_CHECK: this checker is not supported",
        ),
        (
            &format!("lb_kind DR\n{rs}TCP_CHECK {{\n}}\nPING_CHECK {{\n}}\n}}"),
            "/k.conf:6: PING_CHECK: a second checker for real 10.0.0.11",
        ),
        (
            "lb_kind DR\nreal_server 10.0.0.11 8080 {\n}",
            "port 8080 differs from the VIP's 80",
        ),
        (
            "lb_kind DR\nsorry_server 10.0.0.11 80\nreal_server 10.0.0.11 80 {\n}",
            "/k.conf:3: sorry_server 10.0.0.11 80: the sorry server is one of the reals",
        ),
        (
            &format!("lb_kind DR\n{rs}TCP_CHECK {{\nconnect_ip 10.0.0.99\n}}\n}}"),
            "/k.conf:5: connect_ip 10.0.0.99: xlb checks the real's own address",
        ),
        (
            "lb_kind DR\ndelay_loop soon",
            "/k.conf:3: delay_loop soon: expected seconds",
        ),
    ];
    for (body, want) in cases {
        let got = refused(body);
        assert!(got.contains(want), "{body}\n=> {got}\n(wanted {want:?})");
    }
    let fw = Mem(BTreeMap::from([(
        PathBuf::from("/f.conf"),
        "virtual_server fwmark 1 {\nlb_kind DR\n}\n".to_string(),
    )]));
    let e = import_keepalived(&fw, Path::new("/f.conf")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/f.conf:1: virtual_server fwmark 1: fwmark services"),
        "{e}"
    );
}
