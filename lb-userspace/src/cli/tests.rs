use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    os::unix::net::UnixListener,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    thread::JoinHandle,
};

use super::{args::*, client::*, render::*, *};
use crate::api::{
    ApiError, ApplyReply, Counters, ErrorCode, HealthReport, ListReply, RealInfo, RealStatsInfo,
    Request, Response, SaveReply, SorryInfo, StatsReply, VipInfo, VipStatsInfo,
};

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "xlb-cli-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon that answers one request with `answer(request)` and hands back the request
/// line it received.
struct FakeDaemon {
    dir: TempDir,
    socket: PathBuf,
    thread: Option<JoinHandle<String>>,
}

impl FakeDaemon {
    fn start(answer: impl FnOnce(&Request) -> Response + Send + 'static) -> FakeDaemon {
        Self::start_raw(move |line| {
            let request: Request = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("the client sent a bad request {line:?}: {e}"));
            let mut text = serde_json::to_string(&answer(&request)).expect("encodes");
            text.push('\n');
            Some(text)
        })
    }

    /// Answer the request line with the given raw text (`None`: close without answering).
    fn start_raw(answer: impl FnOnce(&str) -> Option<String> + Send + 'static) -> FakeDaemon {
        let dir = TempDir::new();
        let socket = dir.path("xlb.sock");
        let listener = UnixListener::bind(&socket)
            .unwrap_or_else(|e| panic!("binding {}: {e}", socket.display()));
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut line = String::new();
            BufReader::new(&stream)
                .read_line(&mut line)
                .expect("reading the request");
            if let Some(text) = answer(line.trim_end()) {
                (&stream)
                    .write_all(text.as_bytes())
                    .expect("writing the answer");
            }
            line
        });
        FakeDaemon {
            dir,
            socket,
            thread: Some(thread),
        }
    }

    fn socket(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }

    /// The request line the daemon received (with its newline).
    fn received(mut self) -> String {
        let line = self
            .thread
            .take()
            .expect("joined once")
            .join()
            .expect("fake daemon thread");
        drop(self.dir);
        line
    }
}

struct Outcome {
    code: u8,
    stdout: String,
    stderr: String,
}

fn run_cli(args: &[&str], stdin: &str) -> Outcome {
    let mut input = stdin.as_bytes();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut io = Io {
        stdin: &mut input,
        stdout: &mut stdout,
        stderr: &mut stderr,
        stdin_is_tty: false,
    };
    let code = run(std::iter::once("xlb").chain(args.iter().copied()), &mut io);
    Outcome {
        code,
        stdout: String::from_utf8(stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(stderr).expect("utf-8 stderr"),
    }
}

fn parse(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("xlb").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?} does not parse: {e}"))
}

fn op_of(args: &[&str]) -> Result<Option<Op>, CliError> {
    to_op(&parse(args).command, &mut io::empty())
}

fn usage_error(args: &[&str]) -> String {
    match op_of(args) {
        Err(e @ CliError::Usage(_)) => {
            assert_eq!(e.exit_code(), EXIT_USAGE);
            e.to_string()
        }
        other => panic!("{args:?}: expected a usage error, got {other:?}"),
    }
}

fn sample_list() -> ListReply {
    ListReply {
        vips: vec![
            VipInfo {
                mode: "dr".into(),
                ring_digest: String::new(),
                vip: "tcp/10.0.0.100:80".into(),
                id: 0,
                flags: vec!["no-src-port".into()],
                reals: vec![
                    RealInfo {
                        mode: "dr".into(),
                        addr: "10.0.0.11".into(),
                        port: None,
                        id: 1,
                        weight: 3,
                        mac: Some("02:00:00:00:00:11".into()),
                        egress: None,
                        state: "active".into(),
                        effective_weight: 3,
                        health: Some(HealthReport {
                            status: "up".into(),
                            since_secs: 35,
                            last: "ok".into(),
                            successes: 4,
                            failures: 0,
                        }),
                        check: Some(serde_json::json!({"port": 8080})),
                        active_conns: None,
                        inactive_conns: None,
                    },
                    RealInfo {
                        mode: "dr".into(),
                        addr: "10.0.0.12".into(),
                        port: None,
                        id: 2,
                        weight: 0,
                        mac: None,
                        egress: None,
                        state: "unresolved".into(),
                        effective_weight: 0,
                        health: Some(HealthReport {
                            status: "down".into(),
                            since_secs: 12,
                            last: "connect: refused".into(),
                            successes: 0,
                            failures: 5,
                        }),
                        check: None,
                        active_conns: None,
                        inactive_conns: None,
                    },
                ],
                quorum: "ok".into(),
                sorry_active: false,
                quorum_threshold: 1,
                healthy_weight: 3,
                on_quorum_lost: "fail-open".into(),
                down_flows: "keep".into(),
                sorry_server: Some(SorryInfo {
                    addr: "10.0.0.99".into(),
                    id: 3,
                    mac: None,
                }),
                check: Some(serde_json::json!({"type": "http", "path": "/healthz"})),
            },
            VipInfo {
                mode: "dr".into(),
                ring_digest: String::new(),
                vip: "udp/[2001:db8::100]:53".into(),
                id: 1,
                flags: vec![],
                reals: vec![],
                quorum: "lost".into(),
                sorry_active: false,
                quorum_threshold: 1,
                healthy_weight: 0,
                on_quorum_lost: "drop".into(),
                down_flows: "keep".into(),
                sorry_server: None,
                check: None,
            },
        ],
    }
}

fn counters(packets: u64, bytes: u64, new_flows: u64, pps: f64, bps: f64) -> Counters {
    Counters {
        packets,
        bytes,
        new_flows,
        packets_per_sec: pps,
        bytes_per_sec: bps,
        packets_per_sec_10s: pps,
        bytes_per_sec_10s: bps,
    }
}

fn sample_stats() -> StatsReply {
    StatsReply {
        uptime_secs: 42.0,
        vips: vec![VipStatsInfo {
            vip: "tcp/10.0.0.100:80".into(),
            counters: counters(1500, 900_000, 30, 12_345.0, 1_250_000.0),
            no_real: 7,
            quorum_drops: 0,
            untracked: 0,
            reals: vec![RealStatsInfo {
                addr: "10.0.0.11".into(),
                counters: counters(1493, 899_000, 29, 950.0, 100.0),
            }],
        }],
        global: BTreeMap::from([
            ("drop_fragment".to_string(), 3),
            ("pass_truncated".to_string(), 0),
            ("pass_not_vip".to_string(), 12),
        ]),
        unresolved_reals: 1,
        mac_resolution_failures: 3,
        conntrack: None,
        sync: None,
        announce: None,
    }
}

#[test]
fn clap_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn documented_command_lines_become_their_ops() {
    let vip = "tcp/10.0.0.100:80";
    let cases: Vec<(Vec<&str>, Op)> = vec![
        (
            vec!["vip", "add", vip, "--no-src-port", "--no-conntrack"],
            Op::VipAdd {
                mode: None,
                vip: vip.into(),
                flags: vec!["no-src-port".into(), "no-conntrack".into()],
            },
        ),
        (
            vec!["vip", "add", vip],
            Op::VipAdd {
                mode: None,
                vip: vip.into(),
                flags: vec![],
            },
        ),
        (
            vec!["vip", "add", "udp/[2001:db8::100]:53"],
            Op::VipAdd {
                mode: None,
                vip: "udp/[2001:db8::100]:53".into(),
                flags: vec![],
            },
        ),
        (
            vec!["vip", "add", "tcp/10.0.0.100:0"],
            Op::VipAdd {
                mode: None,
                vip: "tcp/10.0.0.100:0".into(),
                flags: vec![],
            },
        ),
        (vec!["vip", "del", vip], Op::VipDel { vip: vip.into() }),
        (
            vec!["real", "add", vip, "10.0.0.11", "--weight", "3"],
            Op::RealAdd {
                mode: None,
                vip: vip.into(),
                real: "10.0.0.11".into(),
                weight: 3,
            },
        ),
        (
            vec!["real", "add", vip, "10.0.0.11"],
            Op::RealAdd {
                mode: None,
                vip: vip.into(),
                real: "10.0.0.11".into(),
                weight: 1,
            },
        ),
        (
            vec!["real", "add", "udp/[2001:db8::100]:53", "2001:db8::11"],
            Op::RealAdd {
                mode: None,
                vip: "udp/[2001:db8::100]:53".into(),
                real: "2001:db8::11".into(),
                weight: 1,
            },
        ),
        (
            vec!["real", "del", vip, "10.0.0.11"],
            Op::RealDel {
                vip: vip.into(),
                real: "10.0.0.11".into(),
            },
        ),
        (
            vec!["real", "weight", vip, "10.0.0.11", "0"],
            Op::RealWeight {
                vip: vip.into(),
                real: "10.0.0.11".into(),
                weight: 0,
            },
        ),
        (vec!["list"], Op::List {}),
        (vec!["list", "--json"], Op::List {}),
        (vec!["stats"], Op::Stats {}),
        (vec!["stats", "--json"], Op::Stats {}),
        (vec!["save"], Op::Save {}),
        (vec!["down"], Op::Down {}),
        // Spelled canonically on the wire.
        (
            vec!["vip", "del", "TCP/10.0.0.100:80"],
            Op::VipDel { vip: vip.into() },
        ),
    ];
    for (args, expected) in cases {
        match op_of(&args) {
            Ok(Some(op)) => assert_eq!(op, expected, "{args:?}"),
            other => panic!("{args:?}: {other:?}"),
        }
    }
    for args in [
        vec!["daemon", "--iface", "eth0"],
        vec!["import-ipvsadm"],
        vec!["completions", "bash"],
        vec!["man"],
    ] {
        assert!(
            matches!(op_of(&args), Ok(None)),
            "{args:?} should run locally"
        );
    }
}

#[test]
fn apply_reads_the_file_or_stdin() {
    let dir = TempDir::new();
    let file = dir.path("xlb.toml");
    std::fs::write(&file, "[[vip]]\n").expect("writing the config");
    let file = file.to_str().expect("utf-8");
    let op = to_op(
        &parse(&["apply", "-f", file, "--dry-run"]).command,
        &mut io::empty(),
    );
    assert!(
        matches!(&op, Ok(Some(Op::Apply { config, dry_run: true })) if config == "[[vip]]\n"),
        "{op:?}"
    );
    let op = to_op(
        &parse(&["apply", "--file", "-"]).command,
        &mut "from stdin".as_bytes(),
    );
    assert!(
        matches!(&op, Ok(Some(Op::Apply { config, dry_run: false })) if config == "from stdin"),
        "{op:?}"
    );
    let missing = dir.path("missing.toml");
    let error = usage_error(&["apply", "-f", missing.to_str().expect("utf-8")]);
    assert!(
        error.starts_with(&format!("cannot read {}: ", missing.display())),
        "{error}"
    );
}

#[test]
fn socket_option_is_accepted_on_every_command() {
    assert_eq!(parse(&["--socket", "/a", "list"]).socket, Path::new("/a"));
    assert_eq!(parse(&["list", "--socket", "/b"]).socket, Path::new("/b"));
    assert_eq!(
        parse(&["vip", "add", "--socket", "/c", "tcp/10.0.0.100:80"]).socket,
        Path::new("/c")
    );
    assert_eq!(
        parse(&[
            "real",
            "weight",
            "tcp/10.0.0.100:80",
            "10.0.0.11",
            "2",
            "--socket",
            "/d"
        ])
        .socket,
        Path::new("/d")
    );
    // The daemon's own --socket is the same option, before or after `daemon`.
    for (args, expected) in [
        (vec!["--socket", "/e", "daemon", "--iface", "eth0"], "/e"),
        (vec!["daemon", "--iface", "eth0", "--socket", "/f"], "/f"),
    ] {
        match parse(&args).command {
            Command::Daemon(cmd) => assert_eq!(cmd.args.socket, Path::new(expected)),
            other => panic!("{args:?}: {other:?}"),
        }
    }
    if std::env::var_os("XLB_SOCKET").is_none() {
        assert_eq!(
            parse(&["list"]).socket,
            Path::new(crate::api::DEFAULT_SOCKET)
        );
    }
}

#[test]
fn daemon_arguments_and_log_level_parse() {
    match parse(&["daemon", "--iface", "eth0", "--log-level", "debug"]).command {
        Command::Daemon(cmd) => {
            assert_eq!(cmd.args.iface, ["eth0"]);
            assert_eq!(cmd.log_level, Some(LogLevel::Debug));
            assert_eq!(
                log::LevelFilter::from(LogLevel::Debug),
                log::LevelFilter::Debug
            );
        }
        other => panic!("{other:?}"),
    }
    match parse(&["daemon", "--iface", "eth0", "--iface", "eth1"]).command {
        Command::Daemon(cmd) => assert_eq!(cmd.args.iface, ["eth0", "eth1"]),
        other => panic!("{other:?}"),
    }
    let out = run_cli(&["daemon", "--iface", "eth0", "--log-level", "loud"], "");
    assert_eq!(out.code, EXIT_USAGE, "{}", out.stderr);
}

#[test]
fn the_timeouts_have_their_issue_names_and_the_ha_flags_parse() {
    let args = [
        "daemon",
        "--iface",
        "eth0",
        "--tcp-timeout",
        "5s",
        "--udp-timeout",
        "7s",
        "--hash-seed",
        "9",
        "--sync-listen",
        "10.0.0.3",
        "--sync-peer",
        "[2001:db8::4]:9000",
        "--sync-key-file",
        "/etc/xlb/sync.key",
        "--announce",
        "bird:/run/v.conf",
        "--metrics",
        "127.0.0.1:9100",
        "--ro-socket",
        "/run/xlb/ro.sock",
    ];
    match parse(&args).command {
        Command::Daemon(cmd) => {
            let a = cmd.args;
            assert_eq!(a.tcp_idle, std::time::Duration::from_secs(5));
            assert_eq!(a.udp_idle, std::time::Duration::from_secs(7));
            assert_eq!(a.hash_seed, 9);
            assert_eq!(a.sync_listen, Some("10.0.0.3:8848".parse().expect("addr")));
            assert_eq!(
                a.sync_peer,
                vec!["[2001:db8::4]:9000".parse().expect("addr")]
            );
            assert_eq!(
                a.announce.map(|b| b.reload),
                Some("birdc configure".to_string())
            );
            assert!(a.metrics.is_some() && a.ro_socket.is_some());
        }
        other => panic!("{other:?}"),
    }
    let out = run_cli(
        &["daemon", "--iface", "eth0", "--announce", "exabgp:/x"],
        "",
    );
    assert_eq!(out.code, EXIT_USAGE, "{}", out.stderr);
    assert!(out.stderr.contains("--announce"), "{}", out.stderr);
}

#[test]
fn invalid_vip_is_refused_locally() {
    assert_eq!(
        usage_error(&["vip", "add", "tcp/10.0.0.300:80"]),
        r#"invalid VIP "tcp/10.0.0.300:80": bad IPv4 address"#
    );
    assert_eq!(
        usage_error(&["real", "add", "sctp/10.0.0.1:80", "10.0.0.11"]),
        r#"invalid VIP "sctp/10.0.0.1:80": unknown protocol "sctp" (expected tcp or udp)"#
    );
    // Through `run`: exit 2 and the message, and the (missing) socket is never tried.
    let out = run_cli(
        &[
            "--socket",
            "/nonexistent/xlb.sock",
            "vip",
            "del",
            "tcp/10.0.0.300:80",
        ],
        "",
    );
    assert_eq!(out.code, EXIT_USAGE);
    assert_eq!(
        out.stderr,
        "xlb: invalid VIP \"tcp/10.0.0.300:80\": bad IPv4 address\n"
    );
    assert_eq!(out.stdout, "");
}

#[test]
fn invalid_real_is_refused_locally() {
    assert_eq!(
        usage_error(&["real", "add", "tcp/10.0.0.100:80", "10.0.0.x"]),
        r#"invalid real address "10.0.0.x": expected an IPv4 or IPv6 address"#
    );
    // A real of the other family is the daemon's to judge: tunnel mode carries either.
    assert!(op_of(&["real", "add", "tcp/10.0.0.100:80", "2001:db8::11"]).is_ok());
    let out = run_cli(
        &[
            "--socket",
            "/nonexistent/xlb.sock",
            "real",
            "weight",
            "tcp/10.0.0.100:80",
            "x",
            "1",
        ],
        "",
    );
    assert_eq!(out.code, EXIT_USAGE);
    assert_eq!(
        out.stderr,
        "xlb: invalid real address \"x\": expected an IPv4 or IPv6 address\n"
    );
}

#[test]
fn weight_above_the_maximum_is_refused_locally() {
    let vip = "tcp/10.0.0.100:80";
    assert_eq!(
        usage_error(&["real", "add", vip, "10.0.0.11", "--weight", "65536"]),
        "invalid weight 65536: above the maximum 65535"
    );
    assert_eq!(
        usage_error(&["real", "weight", vip, "10.0.0.11", "70000"]),
        "invalid weight 70000: above the maximum 65535"
    );
    assert!(matches!(
        op_of(&["real", "weight", vip, "10.0.0.11", "65535"]),
        Ok(Some(Op::RealWeight { weight: 65535, .. }))
    ));
    // Not a number at all: clap's usage error, exit 2.
    let out = run_cli(&["real", "weight", vip, "10.0.0.11", "heavy"], "");
    assert_eq!(out.code, EXIT_USAGE);
    assert!(out.stderr.contains("heavy"), "{}", out.stderr);
}

#[test]
fn real_add_sends_the_documented_request_line() {
    let daemon = FakeDaemon::start(|req| Response::ok(req.id, None));
    let out = run_cli(
        &[
            "--socket",
            daemon.socket(),
            "real",
            "add",
            "tcp/10.0.0.100:80",
            "10.0.0.11",
            "--weight",
            "3",
        ],
        "",
    );
    let line = daemon.received();
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    assert_eq!(
        line,
        format!(
            "{{\"v\":1,\"id\":{},\"op\":\"real_add\",\"vip\":\"tcp/10.0.0.100:80\",\
             \"real\":\"10.0.0.11\",\"weight\":3}}\n",
            std::process::id()
        )
    );
}

#[test]
fn refused_request_exits_1_with_the_message_and_field() {
    let daemon = FakeDaemon::start(|req| {
        Response::err(
            req.id,
            ApiError {
                code: ErrorCode::NotFound,
                field: Some("real".into()),
                message: "real 10.0.0.11 is not in VIP tcp/10.0.0.100:80".into(),
            },
        )
    });
    let out = run_cli(
        &[
            "real",
            "del",
            "--socket",
            daemon.socket(),
            "tcp/10.0.0.100:80",
            "10.0.0.11",
        ],
        "",
    );
    assert!(daemon.received().contains(r#""op":"real_del""#));
    assert_eq!(out.code, EXIT_FAILED);
    assert_eq!(
        out.stderr,
        "xlb: real 10.0.0.11 is not in VIP tcp/10.0.0.100:80 (field: real)\n"
    );

    // Without a field, and through client_call directly.
    let daemon = FakeDaemon::start(|req| {
        Response::err(
            req.id,
            ApiError {
                code: ErrorCode::Internal,
                field: None,
                message: "the maps could not be written".into(),
            },
        )
    });
    let error = client_call(&daemon.socket.clone(), Op::Down {}).expect_err("the daemon refused");
    drop(daemon.received());
    assert_eq!(error.to_string(), "the maps could not be written");
    assert_eq!(error.exit_code(), EXIT_FAILED);
}

#[test]
fn a_live_change_that_was_not_persisted_exits_4() {
    let daemon = FakeDaemon::start(|req| {
        Response::err(
            req.id,
            ApiError {
                code: ErrorCode::NotPersisted,
                field: None,
                message: "the change is live, but the state file could not be written (disk \
                          full): a restart would not know it"
                    .into(),
            },
        )
    });
    let out = run_cli(
        &[
            "vip",
            "add",
            "--socket",
            daemon.socket(),
            "tcp/10.0.0.100:80",
        ],
        "",
    );
    drop(daemon.received());
    assert_eq!(out.code, EXIT_NOT_PERSISTED);
    assert_eq!(EXIT_NOT_PERSISTED, 4);
    assert!(out.stderr.contains("the change is live"), "{}", out.stderr);
    // The help says what 4 means, so scripts can tell it from a refusal.
    let help = run_cli(&["--help"], "");
    assert!(
        help.stdout.contains("4  the change is live"),
        "{}",
        help.stdout
    );
}

#[test]
fn missing_socket_cannot_reach_the_daemon() {
    let dir = TempDir::new();
    let socket = dir.path("xlb.sock");
    let out = run_cli(&["--socket", socket.to_str().expect("utf-8"), "list"], "");
    assert_eq!(out.code, EXIT_UNREACHABLE);
    assert!(
        out.stderr.starts_with(&format!(
            "xlb: cannot reach the daemon at {}: ",
            socket.display()
        )),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.ends_with(" (is `xlb daemon` running?)\n"),
        "{}",
        out.stderr
    );
    assert!(matches!(
        client_call(&socket, Op::List {}),
        Err(ClientError::Connect { .. })
    ));
}

#[test]
fn daemon_without_a_proper_answer_is_exit_3() {
    let daemon = FakeDaemon::start_raw(|_| None);
    let out = run_cli(&["--socket", daemon.socket(), "save"], "");
    drop(daemon.received());
    assert_eq!(out.code, EXIT_UNREACHABLE);
    assert!(
        out.stderr
            .contains("closed the connection without answering"),
        "{}",
        out.stderr
    );

    let daemon = FakeDaemon::start_raw(|_| Some("not json\n".into()));
    let out = run_cli(&["--socket", daemon.socket(), "save"], "");
    drop(daemon.received());
    assert_eq!(out.code, EXIT_UNREACHABLE);
    assert!(out.stderr.contains("unexpected answer"), "{}", out.stderr);

    // A result of the wrong kind.
    let daemon = FakeDaemon::start(|req| {
        Response::ok(req.id, Some(Reply::List(ListReply { vips: vec![] })))
    });
    let out = run_cli(&["--socket", daemon.socket(), "stats"], "");
    drop(daemon.received());
    assert_eq!(out.code, EXIT_UNREACHABLE);
    assert!(
        out.stderr
            .contains(r#"expected a "stats" result, got a "list" result"#),
        "{}",
        out.stderr
    );
}

#[test]
fn list_table_shows_vips_reals_macs_and_states() {
    let text = render_list(&sample_list());
    for expected in [
        "tcp/10.0.0.100:80  id 0  mode dr  flags no-src-port  quorum ok\n",
        "  check type http path /healthz\n",
        "  sorry server 10.0.0.99  unresolved  standby\n",
        "udp/[2001:db8::100]:53  id 1  mode dr  flags none  quorum LOST (healthy weight 0 < 1): dropping \
         new flows\n",
        "  (no reals)\n",
        "REAL",
        "WEIGHT",
        "EFFECTIVE",
        "MAC",
        "STATE",
        "HEALTH",
        "own check port 8080\n",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in:\n{text}");
    }
    let line = |addr: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(addr))
            .unwrap_or_else(|| panic!("no line for {addr} in:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line("10.0.0.11"),
        [
            "10.0.0.11",
            "3",
            "3",
            "02:00:00:00:00:11",
            "active",
            "dr",
            "up",
            "35s",
            "(ok)"
        ]
    );
    assert_eq!(
        line("10.0.0.12"),
        [
            "10.0.0.12",
            "0",
            "0",
            "-",
            "unresolved",
            "dr",
            "down",
            "12s",
            "(connect:",
            "refused)"
        ]
    );
    assert_eq!(render_list(&ListReply { vips: vec![] }), "no VIPs\n");
}

#[test]
fn stats_table_shows_counters_rates_and_global_reasons() {
    let text = render_stats(&sample_stats());
    let vip_line: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("tcp/10.0.0.100:80"))
        .unwrap_or_else(|| panic!("no VIP line in:\n{text}"))
        .split_whitespace()
        .collect();
    // packets, bytes, new flows, pps, bit/s (bytes × 8), no real.
    assert_eq!(
        vip_line,
        [
            "tcp/10.0.0.100:80",
            "1500",
            "900000",
            "30",
            "12.35k",
            "10.00M",
            "7"
        ]
    );
    let real_line: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("  10.0.0.11"))
        .unwrap_or_else(|| panic!("no real line in:\n{text}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        real_line,
        ["10.0.0.11", "1493", "899000", "29", "950", "800"]
    );
    for expected in [
        "PACKETS",
        "BYTES",
        "NEW FLOWS",
        "PPS",
        "BIT/S",
        "global: drop_fragment 3, pass_not_vip 12\n",
        "unresolved reals: 1 now",
        "3 resolution failures since start",
        "uptime 42s",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in:\n{text}");
    }
    assert!(
        !text.contains("pass_truncated"),
        "zero counter shown:\n{text}"
    );
}

#[test]
fn json_output_is_the_result_with_a_version() {
    let daemon = FakeDaemon::start(|req| {
        assert_eq!(req.op, Op::List {});
        Response::ok(req.id, Some(Reply::List(sample_list())))
    });
    let out = run_cli(&["--socket", daemon.socket(), "list", "--json"], "");
    drop(daemon.received());
    assert_eq!(out.code, 0, "{}", out.stderr);
    let value: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    assert_eq!(value["v"], 1);
    assert_eq!(value["kind"], "list");
    assert_eq!(value["vips"][0]["vip"], "tcp/10.0.0.100:80");
    assert_eq!(value["vips"][0]["reals"][1]["mac"], serde_json::Value::Null);

    let daemon = FakeDaemon::start(|req| {
        assert_eq!(req.op, Op::Stats {});
        Response::ok(req.id, Some(Reply::Stats(sample_stats())))
    });
    let out = run_cli(&["--socket", daemon.socket(), "stats", "--json"], "");
    drop(daemon.received());
    assert_eq!(out.code, 0, "{}", out.stderr);
    let value: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    assert_eq!(value["v"], 1);
    assert_eq!(value["kind"], "stats");
    assert_eq!(value["vips"][0]["packets"], 1500);
    assert_eq!(value["global"]["drop_fragment"], 3);
}

#[test]
fn apply_prints_the_changes_and_says_when_nothing_was_applied() {
    let dir = TempDir::new();
    let file = dir.path("xlb.toml");
    std::fs::write(&file, "# config\n").expect("writing the config");
    let daemon = FakeDaemon::start(|req| {
        assert_eq!(
            req.op,
            Op::Apply {
                config: "# config\n".into(),
                dry_run: true
            }
        );
        Response::ok(
            req.id,
            Some(Reply::Apply(ApplyReply {
                changes: vec![
                    "+ vip tcp/10.0.0.100:80".into(),
                    "~ real tcp/10.0.0.100:80 10.0.0.11 weight 1 -> 2".into(),
                ],
                applied: false,
            })),
        )
    });
    let file = file.to_str().expect("utf-8");
    let out = run_cli(
        &[
            "--socket",
            daemon.socket(),
            "apply",
            "-f",
            file,
            "--dry-run",
        ],
        "",
    );
    drop(daemon.received());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "+ vip tcp/10.0.0.100:80\n~ real tcp/10.0.0.100:80 10.0.0.11 weight 1 -> 2\n\
         dry run: nothing was applied\n"
    );
    assert_eq!(
        render_apply(&ApplyReply {
            changes: vec![],
            applied: true
        }),
        "no changes\n"
    );
}

#[test]
fn save_prints_the_config_verbatim_and_down_sends_down() {
    let config = "# xlb config\n[[vip]]\nvip = \"tcp/10.0.0.100:80\"\n";
    let daemon = FakeDaemon::start(move |req| {
        assert_eq!(req.op, Op::Save {});
        Response::ok(
            req.id,
            Some(Reply::Save(SaveReply {
                config: config.into(),
            })),
        )
    });
    let out = run_cli(&["--socket", daemon.socket(), "save"], "");
    drop(daemon.received());
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, config),
        "{}",
        out.stderr
    );

    let daemon = FakeDaemon::start(|req| Response::ok(req.id, None));
    let out = run_cli(&["--socket", daemon.socket(), "down"], "");
    assert!(daemon.received().contains(r#""op":"down""#));
    assert_eq!(out.code, 0, "{}", out.stderr);
}

const IPVSADM_RULES: &str = "\
-A -t 10.0.0.100:80 -s wlc
-a -t 10.0.0.100:80 -r 10.0.0.11:80 -g -w 3
-a -t 10.0.0.100:80 -r 10.0.0.12:80 -g -w 1
";

#[test]
fn import_ipvsadm_prints_the_converted_config() {
    // --print: no daemon contacted (the socket does not exist).
    let out = run_cli(
        &[
            "--socket",
            "/nonexistent/xlb.sock",
            "import-ipvsadm",
            "--print",
        ],
        IPVSADM_RULES,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let state = crate::core::config::parse_config(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    let expected = crate::core::config::import_ipvsadm(IPVSADM_RULES).expect("imports");
    assert_eq!(state, expected.state);
    assert!(out.stdout.contains("10.0.0.12"), "{}", out.stdout);
    // The scheduler is ignored, with a warning on stderr.
    assert!(!expected.warnings.is_empty());
    for warning in &expected.warnings {
        assert!(
            out.stderr.contains(&format!("xlb: warning: {warning}\n")),
            "{}",
            out.stderr
        );
    }

    let out = run_cli(&["import-ipvsadm", "--print"], "-A -f 1 -s wlc\n");
    assert_eq!(out.code, EXIT_USAGE);
    assert!(
        out.stderr
            .starts_with("xlb: invalid ipvsadm rules on standard input: line 1: "),
        "{}",
        out.stderr
    );
    assert_eq!(out.stdout, "");
}

#[test]
fn import_ipvsadm_applies_the_converted_config() {
    let rendered = crate::core::config::render_config(
        &crate::core::config::import_ipvsadm(IPVSADM_RULES)
            .expect("imports")
            .state,
    );
    let daemon = FakeDaemon::start(move |req| {
        assert_eq!(
            req.op,
            Op::Apply {
                config: rendered,
                dry_run: true
            }
        );
        Response::ok(
            req.id,
            Some(Reply::Apply(ApplyReply {
                changes: vec!["+ vip tcp/10.0.0.100:80".into()],
                applied: false,
            })),
        )
    });
    let out = run_cli(
        &["--socket", daemon.socket(), "import-ipvsadm", "--dry-run"],
        IPVSADM_RULES,
    );
    drop(daemon.received());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "+ vip tcp/10.0.0.100:80\ndry run: nothing was applied\n"
    );
    // --print and --dry-run exclude each other.
    let out = run_cli(&["import-ipvsadm", "--print", "--dry-run"], "");
    assert_eq!(out.code, EXIT_USAGE);
}

#[test]
fn completions_are_generated_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run_cli(&["completions", shell], "");
        assert_eq!(out.code, 0, "{shell}: {}", out.stderr);
        assert!(
            out.stdout.contains("import-ipvsadm"),
            "{shell}: no subcommands in the script"
        );
    }
}

#[test]
fn man_pages_are_generated() {
    let out = run_cli(&["man"], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.starts_with(".ie"),
        "not roff: {}",
        &out.stdout[..40]
    );
    assert!(out.stdout.contains("import\\-ipvsadm"), "{}", out.stdout);

    let dir = TempDir::new();
    let pages = dir.path("man1");
    let out = run_cli(&["man", "--out-dir", pages.to_str().expect("utf-8")], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    for page in [
        "xlb.1",
        "xlb-vip.1",
        "xlb-vip-add.1",
        "xlb-real-weight.1",
        "xlb-daemon.1",
    ] {
        let len = std::fs::metadata(pages.join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"))
            .len();
        assert!(len > 0, "{page} is empty");
    }
}

#[test]
fn help_and_version_exit_0_on_stdout() {
    let out = run_cli(&["--help"], "");
    assert_eq!(out.code, 0);
    assert!(out.stdout.contains("Exit status:"), "{}", out.stdout);
    let out = run_cli(&["--version"], "");
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout, format!("xlb {}\n", env!("CARGO_PKG_VERSION")));
    let out = run_cli(&["vip"], "");
    assert_eq!(out.code, EXIT_USAGE);
}

#[test]
fn check_set_sends_the_check_object_and_names_a_bad_flag() {
    let op = op_of(&[
        "check",
        "set",
        "tcp/10.0.0.100:80",
        "--type",
        "http",
        "--path",
        "/healthz",
        "--interval",
        "5s",
        "--expect-status",
        "200,204",
    ])
    .expect("valid")
    .expect("an op");
    assert_eq!(
        op,
        Op::CheckSet {
            vip: "tcp/10.0.0.100:80".into(),
            real: None,
            check: serde_json::json!({
                "type": "http", "path": "/healthz", "interval": "5s", "expect_status": "200,204"
            }),
        }
    );
    let op = op_of(&[
        "check",
        "set",
        "tcp/10.0.0.100:80",
        "--real",
        "10.0.0.11",
        "--port",
        "8080",
    ])
    .expect("a real's own fields need no type")
    .expect("an op");
    assert!(matches!(op, Op::CheckSet { real: Some(ref r), .. } if r == "10.0.0.11"));
    let op = op_of(&[
        "check",
        "set",
        "tcp/10.0.0.100:80",
        "--type",
        "exec",
        "--command",
        "/usr/local/bin/check-app --port '80 80'",
        "--dynamic",
    ])
    .expect("valid")
    .expect("an op");
    let Op::CheckSet { check, .. } = op else {
        panic!("check_set")
    };
    assert_eq!(
        check["command"],
        serde_json::json!(["/usr/local/bin/check-app", "--port", "80 80"])
    );
    assert_eq!(check["dynamic"], true);
    for (args, words) in [
        (
            &["check", "set", "tcp/10.0.0.100:80", "--path", "/x"][..],
            "--type: missing",
        ),
        (
            &[
                "check",
                "set",
                "tcp/10.0.0.100:80",
                "--type",
                "tcp",
                "--interval",
                "2",
            ],
            "--interval: invalid duration",
        ),
        (
            &[
                "check",
                "set",
                "tcp/10.0.0.100:80",
                "--type",
                "tcp",
                "--path",
                "/x",
            ],
            "--path: does not apply to a tcp check",
        ),
        (
            &[
                "check",
                "set",
                "tcp/10.0.0.100:80",
                "--type",
                "http",
                "--expect-status",
                "2xx",
            ],
            "--expect-status: invalid status",
        ),
        (
            &["check", "set", "tcp/10.0.0.100:0", "--type", "tcp"],
            "--port: missing",
        ),
        (
            &[
                "check",
                "set",
                "tcp/10.0.0.100:80",
                "--type",
                "exec",
                "--command",
                "'unclosed",
            ],
            "--command",
        ),
        (
            &[
                "vip",
                "set",
                "tcp/10.0.0.100:80",
                "--on-quorum-lost",
                "open",
            ],
            "--on-quorum-lost: unknown value \"open\" (expected fail-open | drop)",
        ),
        (
            &[
                "vip",
                "set",
                "tcp/10.0.0.100:80",
                "--sorry-server",
                "2001:db8::1:2:3:4:5:6:7",
            ],
            "--sorry-server",
        ),
        (&["vip", "set", "tcp/10.0.0.100:80"], "nothing to set"),
        (
            &["vip", "set", "tcp/10.0.0.100:80", "--mode", "fullnat"],
            "--mode: unknown mode \"fullnat\"",
        ),
    ] {
        let e = usage_error(args);
        assert!(e.contains(words), "{args:?}: {e}");
    }
    match op_of(&["vip", "set", "tcp/10.0.0.100:80", "--mode", "tunnel"]) {
        Ok(Some(Op::VipSet { mode, quorum, .. })) => {
            assert_eq!((mode.as_deref(), quorum), (Some("tunnel"), None));
        }
        other => panic!("{other:?}"),
    }
    // `--timeout` only with `--wait`.
    assert!(Cli::try_parse_from([
        "xlb",
        "real",
        "drain",
        "tcp/10.0.0.100:80",
        "10.0.0.11",
        "--timeout",
        "5s"
    ])
    .is_err());
    assert_eq!(
        op_of(&["real", "drain", "tcp/10.0.0.100:80", "10.0.0.11", "--wait"])
            .expect("valid")
            .expect("an op"),
        Op::RealWeight {
            vip: "tcp/10.0.0.100:80".into(),
            real: "10.0.0.11".into(),
            weight: 0
        }
    );
}
