//! The control API: JSON lines over a Unix socket (default `/run/xlb/xlb.sock`).
//!
//! One request per line, one response per line, answered in order:
//! ```text
//! {"v":1,"id":1,"op":"real_add","vip":"tcp/10.0.0.100:80","real":"10.0.0.11","weight":1}
//! {"v":1,"id":1,"ok":true}
//! {"v":1,"id":2,"ok":false,"error":{"code":"invalid_argument","field":"real","message":"..."}}
//! ```
//! `v` is the protocol version (1; a request may omit it). Unknown fields in a request are
//! refused, so a typo never silently does nothing. This module is the contract: the CLI and
//! the daemon both use these types; the README documents them.

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";
/// A request line longer than this is refused (and the connection closed).
pub const MAX_LINE: usize = 1 << 20;

// No deny_unknown_fields here: serde's flatten passes the op's fields through, and `Op`
// refuses the unknown ones itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    #[serde(default = "default_version")]
    pub v: u32,
    #[serde(default)]
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

fn default_version() -> u32 {
    PROTOCOL_VERSION
}

fn default_weight() -> u32 {
    1
}

/// Every operation (field-less ones are written `Op::List {}` so that extra fields are
/// refused for them too). VIPs are written `proto/addr:port` (`tcp/10.0.0.100:80`,
/// `udp/[2001:db8::100]:53`, port 0 = every port); reals are bare addresses, `ADDR:PORT`
/// (`[ADDR]:PORT`) for a NAT real with a port of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Liveness and versions: result `Hello`.
    Hello {},
    VipAdd {
        vip: String,
        /// `no-src-port`, `no-conntrack`.
        #[serde(default)]
        flags: Vec<String>,
        /// `dr` or `tunnel`: the mode of its reals that name none (absent: the daemon's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<String>,
    },
    VipDel {
        vip: String,
    },
    RealAdd {
        vip: String,
        real: String,
        #[serde(default = "default_weight")]
        weight: u32,
        /// `dr` or `tunnel` (absent: the VIP's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<String>,
    },
    RealDel {
        vip: String,
        real: String,
    },
    /// Weight 0 drains: no new flows, tracked flows continue.
    RealWeight {
        vip: String,
        real: String,
        weight: u32,
    },
    /// Set the check of a VIP (`real` absent; `check` needs its `type`) or a real's own check
    /// fields, merged over the VIP's. `check` holds the keys of `[vip.check]`
    /// (`{"type": "http", "path": "/healthz"}`) and replaces what was there.
    CheckSet {
        vip: String,
        #[serde(default)]
        real: Option<String>,
        check: serde_json::Value,
    },
    /// Remove a VIP's check (its reals' own fields stay) or a real's own fields.
    CheckDel {
        vip: String,
        #[serde(default)]
        real: Option<String>,
    },
    /// Change a VIP's health options; only the fields given change. `sorry_server`: an
    /// address, or `none` to remove it.
    VipSet {
        vip: String,
        #[serde(default)]
        quorum: Option<u32>,
        #[serde(default)]
        sorry_server: Option<String>,
        /// `fail-open` or `drop`.
        #[serde(default)]
        on_quorum_lost: Option<String>,
        /// `keep` or `move`.
        #[serde(default)]
        down_flows: Option<String>,
        /// `dr`, `tunnel`, or `default` (the daemon's `--mode`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<String>,
    },
    /// The tracked flows (of a VIP, of a real). Result `Conns`.
    Conns {
        #[serde(default)]
        vip: Option<String>,
        #[serde(default)]
        real: Option<String>,
        /// Only the count (no flow list).
        #[serde(default)]
        count: bool,
    },
    /// Which real a client's flow goes to now, and why. Result `Whereis`.
    Whereis {
        vip: String,
        client: String,
    },
    /// Forwarding decisions as they happen (of one VIP, or of all): at most `max` of them,
    /// waiting at most `wait_ms` for the first. Result `Trace`; clients ask again for more.
    Trace {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vip: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_ms: Option<u64>,
    },
    /// How many tracked flows a real has (not closing, not idle). Result `RealFlows`.
    RealFlows {
        vip: String,
        real: String,
    },
    /// Whether the node should receive traffic for `vip` (every VIP when absent). Result
    /// `Ready`.
    Ready {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vip: Option<String>,
    },
    /// Maintenance on: every VIP `draining` (not ready) while forwarding goes on.
    Maintenance {
        on: bool,
    },
    /// Result `List`.
    List {},
    /// Result `Stats`.
    Stats {},
    /// Make the running state equal to a whole config file (TOML text). Result `Apply`.
    Apply {
        config: String,
        #[serde(default)]
        dry_run: bool,
    },
    /// The running config as a config file. Result `Save`.
    Save {},
    /// Stop the daemon and remove the program, pins and socket (forwarding stops).
    Down {},
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub id: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<ApiError>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub result: Option<Reply>,
}

impl Response {
    pub fn ok(id: u64, result: Option<Reply>) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            id,
            ok: true,
            error: None,
            result,
        }
    }

    pub fn err(id: u64, error: ApiError) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            id,
            ok: false,
            error: Some(error),
            result: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is well-formed but an argument is wrong (`field` names it).
    InvalidArgument,
    /// The line is not a request (bad JSON, unknown op or field, wrong type).
    BadRequest,
    NotFound,
    AlreadyExists,
    /// A limit is reached (VIPs, reals, ids in quarantine).
    ResourceExhausted,
    /// The request is valid but means nothing for this target as it is (the tracked flows of
    /// a VIP that tracks none).
    FailedPrecondition,
    UnsupportedVersion,
    /// The maps could not be written; the previous state is in force (or being repaired).
    Internal,
    /// The change is live, but the state file could not be written: a restart would not know
    /// it (fix the disk, then make any change or `xlb apply` the config to write it again).
    NotPersisted,
    /// A change sent to the read-only socket (`--ro-socket`).
    PermissionDenied,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Results, tagged by their kind so a client can check it got what it asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Hello(Hello),
    List(ListReply),
    Stats(StatsReply),
    Apply(ApplyReply),
    Save(SaveReply),
    RealFlows(RealFlowsReply),
    Conns(ConnsReply),
    Whereis(WhereisReply),
    Ready(ReadyReply),
    Trace(TraceReply),
}

/// A `trace` answer: the decisions seen since the request came.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceReply {
    pub events: Vec<TraceLine>,
    /// Decisions not shown: the kernel's ring buffer or this client's queue was full.
    pub lost: u64,
}

/// One forwarding decision (`xlb trace --json` prints one per line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceLine {
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    /// `tcp` or `udp`.
    pub proto: String,
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
    /// As `xlb list` prints it.
    pub vip: String,
    /// The real's address; `null` when none was chosen.
    pub real: Option<String>,
    /// `tracked`, `ring` or `stale_repick`.
    pub how: String,
    /// What the program did: `tx`, `redirect`, `pass`, `drop` or `aborted`.
    pub action: String,
    /// A global counter's name without its action prefix (as `xlb_packets_total`'s
    /// `reason`) when something besides the forwarding happened: `no_real`, `next_hop`,
    /// `ct_insert_fail`, ...; `null` otherwise.
    pub reason: Option<String>,
    /// The ring slot read (`null` for a tracked flow).
    pub slot: Option<u32>,
}

/// `xlb ready --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyReply {
    pub ready: bool,
    pub vips: Vec<VipReady>,
    /// Why nothing is ready when no VIP is listed (none configured, or the one asked for
    /// is unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipReady {
    pub vip: String,
    /// `starting`, `ready`, `draining` or `down`.
    pub state: String,
    /// Empty when ready.
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnsReply {
    /// Empty with `count`.
    pub flows: Vec<ConnInfo>,
    /// Flows per real, not closing (as `real flows` counts them).
    pub per_real: Vec<PerRealFlows>,
    /// The flows that match, closing ones included.
    pub count: u64,
    /// Entries of the connection table read, and how long the walk took.
    pub scanned: u64,
    pub scan_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnInfo {
    pub vip: String,
    /// `ADDR:PORT` (`[ADDR]:PORT` for IPv6).
    pub client: String,
    pub real: String,
    /// The client sent a FIN or RST: it idles out in 10 s.
    pub closing: bool,
    /// Since its last refresh (the kernel refreshes an entry at most once a second).
    pub idle_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerRealFlows {
    pub vip: String,
    pub real: String,
    pub flows: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhereisReply {
    /// The real's address; `null` when the ring has no real for the flow.
    pub real: Option<String>,
    /// `tracked` (the connection table's entry) or `ring`.
    pub reason: String,
    /// The ring slot the flow hashes to (`null` for a tracked flow).
    pub slot: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RealFlowsReply {
    pub vip: String,
    pub real: String,
    /// Tracked flows naming the real that are not closing and younger than the idle timeout.
    pub flows: u64,
    /// Entries of the connection table read, and how long the walk took.
    #[serde(default)]
    pub scanned: u64,
    #[serde(default)]
    pub scan_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: String,
    pub protocol: u32,
    pub layout: u32,
    /// The first `--iface` (its pin directory and state file are named after it).
    pub iface: String,
    /// `native` or `generic` (of the first interface).
    pub xdp_mode: String,
    /// Every interface the balancer is attached to, the first one first (absent from daemons
    /// before two-arm NAT: `iface` alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ifaces: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListReply {
    pub vips: Vec<VipInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipInfo {
    pub vip: String,
    pub id: u32,
    pub flags: Vec<String>,
    /// The mode its reals take unless they name their own: `dr` or `tunnel`.
    #[serde(default = "mode_dr")]
    pub mode: String,
    /// Hex SHA-256 of the live ring written as its slots' real addresses (one line each, `-`
    /// for an empty slot): equal on two nodes exactly when they send every new flow alike.
    #[serde(default)]
    pub ring_digest: String,
    pub reals: Vec<RealInfo>,
    /// `ok`, or `lost`: the healthy reals' summed effective weight is below `quorum_threshold`.
    #[serde(default = "quorum_ok")]
    pub quorum: String,
    /// The sorry server takes the new flows.
    #[serde(default)]
    pub sorry_active: bool,
    /// The VIP's `quorum` setting, and the weight it is compared with.
    #[serde(default)]
    pub quorum_threshold: u32,
    #[serde(default)]
    pub healthy_weight: u64,
    /// `fail-open` or `drop`.
    #[serde(default)]
    pub on_quorum_lost: String,
    /// `keep` or `move`.
    #[serde(default)]
    pub down_flows: String,
    #[serde(default)]
    pub sorry_server: Option<SorryInfo>,
    /// The VIP's check, as `[vip.check]` writes it; null without one.
    #[serde(default)]
    pub check: Option<serde_json::Value>,
}

fn quorum_ok() -> String {
    "ok".to_string()
}

fn mode_dr() -> String {
    "dr".to_string()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SorryInfo {
    pub addr: String,
    pub id: u32,
    pub mac: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RealInfo {
    /// As commands name the real: its address, `ADDR:PORT` (`[ADDR]:PORT`) for a NAT real
    /// with a port of its own.
    pub addr: String,
    /// A NAT real's own port; absent when it keeps the VIP's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub id: u32,
    pub weight: u32,
    /// `aa:bb:cc:dd:ee:ff` (its own in direct routing, its next hop's in tunnel mode), or
    /// null while unresolved.
    pub mac: Option<String>,
    /// How it is forwarded to: `dr`, `tunnel` or `nat`.
    #[serde(default = "mode_dr")]
    pub mode: String,
    /// The interface a tunnel real's frames leave by when it is not the balancer's own
    /// (they are redirected there); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<String>,
    /// `active` (takes new flows), `draining` (effective weight 0), `unresolved` (no MAC yet:
    /// no new flows), `down` (out of the ring because its check fails).
    pub state: String,
    /// The weight its ring slots are counted with now (0 when out of the ring).
    #[serde(default)]
    pub effective_weight: u32,
    #[serde(default)]
    pub health: Option<HealthReport>,
    /// The real's own check fields (merged over the VIP's check); null without.
    #[serde(default)]
    pub check: Option<serde_json::Value>,
    /// NAT reals (the balancer sees both directions): TCP connections from the handshake
    /// until a FIN or RST from either side, as `ipvsadm -L` counts ActiveConn; absent for other
    /// modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_conns: Option<u64>,
    /// NAT reals: the other tracked flows (a SYN not yet answered, closing connections until
    /// they idle out, UDP flows), as InActConn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactive_conns: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// `up`, `down` or `unchecked` (no check configured).
    pub status: String,
    /// Since the status last changed (or this daemon started checking the real).
    pub since_secs: u64,
    /// The last result: `ok`, `connect: refused`, `timeout`, `status 503`, ... (`pending`
    /// before the first; empty when unchecked).
    pub last: String,
    /// The current streak.
    pub successes: u32,
    pub failures: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    /// Seconds since the daemon started counting (rates are over the last interval).
    pub uptime_secs: f64,
    pub vips: Vec<VipStatsInfo>,
    /// `STATS_GLOBAL`, by counter name (`pass_truncated`, `drop_fragment`, ...).
    pub global: std::collections::BTreeMap<String, u64>,
    /// Reals without a MAC now (they take no new flows until it is known).
    pub unresolved_reals: u64,
    /// Times a real was found without a MAC it needed (added unresolved, or its neighbour
    /// entry failed) since the daemon started.
    #[serde(default)]
    pub mac_resolution_failures: u64,
    /// The connection table.
    #[serde(default)]
    pub conntrack: Option<ConntrackStats>,
    /// Flow sync's figures; `null` without `--sync-listen`.
    #[serde(default)]
    pub sync: Option<Box<SyncStats>>,
    /// `--announce`'s figures; `null` without it.
    #[serde(default)]
    pub announce: Option<Box<AnnounceStats>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnnounceStats {
    /// FILE of `--announce bird:FILE` (IPv6 routes are in FILE.6).
    pub file: String,
    /// The addresses the files list now.
    pub announced: Vec<String>,
    pub writes: u64,
    pub write_failures: u64,
    /// RELOAD_CMD runs, and those that failed (exit status, or the 10 s timeout).
    pub reloads: u64,
    pub reload_failures: u64,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConntrackStats {
    /// Entries the table holds at most (`--conntrack-size`).
    pub capacity: u64,
    /// Entries at the last count (the daemon counts every 10 s; `xlb conns --count` counts
    /// now); `null` before the first.
    pub entries_estimate: Option<u64>,
    /// New flows the table had no room for (forwarded by the ring, untracked).
    pub insert_failures: u64,
    /// Tracked flows whose real was gone or whose entry had idled out: re-picked by the ring.
    pub stale_repicks: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncStats {
    pub peers: Vec<SyncPeerInfo>,
    /// Flows sent (a flow sent to two peers counts twice).
    pub flows_sent: u64,
    /// Flows in authenticated messages from peers.
    pub flows_received: u64,
    /// Messages dropped: `rejected_by` says why (`auth`, `replay`, `stale`, `size`,
    /// `malformed`, `unknown_peer`, `rate`).
    pub rejected: u64,
    #[serde(default)]
    pub rejected_by: std::collections::BTreeMap<String, u64>,
    /// What became of the flows received: new entries, refreshed ones (the same real),
    /// kept own (this node tracks the flow to another real), unknown (no such VIP or real).
    #[serde(default)]
    pub flows_inserted: u64,
    #[serde(default)]
    pub flows_refreshed: u64,
    #[serde(default)]
    pub flows_kept_own: u64,
    #[serde(default)]
    pub flows_unknown: u64,
    #[serde(default)]
    pub messages_sent: u64,
    #[serde(default)]
    pub send_errors: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncPeerInfo {
    /// As `--sync-peer` names it.
    pub addr: String,
    /// Since its last authenticated message; `null` before the first.
    pub last_seen_secs: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Per second, over the last second (the daemon samples every second).
    pub packets_per_sec: f64,
    pub bytes_per_sec: f64,
    /// Per second, over the last 10 seconds.
    #[serde(default)]
    pub packets_per_sec_10s: f64,
    #[serde(default)]
    pub bytes_per_sec_10s: f64,
}

impl Counters {
    pub fn new(
        packets: u64,
        bytes: u64,
        new_flows: u64,
        r: &crate::daemon::figures::Rates,
    ) -> Counters {
        Counters {
            packets,
            bytes,
            new_flows,
            packets_per_sec: r.packets_per_sec,
            bytes_per_sec: r.bytes_per_sec,
            packets_per_sec_10s: r.packets_per_sec_10s,
            bytes_per_sec_10s: r.bytes_per_sec_10s,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStatsInfo {
    pub vip: String,
    #[serde(flatten)]
    pub counters: Counters,
    pub no_real: u64,
    /// New flows dropped while the quorum was lost (`on_quorum_lost = "drop"`).
    #[serde(default)]
    pub quorum_drops: u64,
    /// New flows the connection table had no room for: forwarded by the ring, untracked.
    #[serde(default)]
    pub untracked: u64,
    pub reals: Vec<RealStatsInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RealStatsInfo {
    pub addr: String,
    #[serde(flatten)]
    pub counters: Counters,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReply {
    /// One line per change, as `xlb apply` prints them (`+ vip ...`, `- real ...`,
    /// `~ real ... weight 1 -> 2`).
    pub changes: Vec<String>,
    /// False for a dry run.
    pub applied: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveReply {
    pub config: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_example_parses() {
        let r: Request = serde_json::from_str(
            r#"{"id":1,"op":"real_add","vip":"tcp/10.0.0.100:80","real":"10.0.0.11","weight":1}"#,
        )
        .expect("parses");
        assert_eq!(r.v, 1);
        assert_eq!(
            r.op,
            Op::RealAdd {
                vip: "tcp/10.0.0.100:80".into(),
                real: "10.0.0.11".into(),
                weight: 1,
                mode: None,
            }
        );
    }

    #[test]
    fn unknown_fields_and_ops_are_refused() {
        for line in [
            r#"{"id":1,"op":"real_add","vip":"tcp/10.0.0.100:80","real":"10.0.0.11","wieght":1}"#,
            r#"{"id":1,"op":"real_launch"}"#,
            r#"{"id":1,"op":"list","extra":true}"#,
        ] {
            assert!(
                serde_json::from_str::<Request>(line).is_err(),
                "accepted {line}"
            );
        }
    }

    #[test]
    fn responses_serialise_as_documented() {
        let ok = serde_json::to_string(&Response::ok(1, None)).expect("json");
        assert_eq!(ok, r#"{"v":1,"id":1,"ok":true}"#);
        let err = serde_json::to_string(&Response::err(
            2,
            ApiError {
                code: ErrorCode::InvalidArgument,
                field: Some("real".into()),
                message: "bad".into(),
            },
        ))
        .expect("json");
        assert_eq!(
            err,
            r#"{"v":1,"id":2,"ok":false,"error":{"code":"invalid_argument","field":"real","message":"bad"}}"#
        );
    }
}
