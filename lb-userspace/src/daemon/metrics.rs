//! `--metrics ADDR:PORT`: Prometheus figures at `/metrics`, in the OpenMetrics text format
//! of `prometheus-client`, served by hyper. The kernel's counters are totals already, so each
//! scrape reads them with the published state and encodes them as constant metrics (the
//! crate's `Collector`, meant for exporters): every VIP and real of the state has its series
//! from the first scrape on.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::UNIX_EPOCH,
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{body::Bytes, Method, Request, Response, StatusCode};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use super::handlers::Context;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// One metric: its name (without `_total`), help, type and a value per label set.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    rows: Vec<(Labels, f64)>,
}

/// Everything one scrape shows, read before encoding.
#[derive(Default)]
struct Scrape {
    families: Vec<Family>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrape({} families)", self.families.len())
    }
}

impl Scrape {
    fn add(&mut self, name: &'static str, help: &'static str, kind: MetricType) -> &mut Family {
        self.families.push(Family {
            name,
            help,
            kind,
            rows: Vec::new(),
        });
        self.families.last_mut().expect("just pushed")
    }
}

impl Family {
    fn row(&mut self, labels: Labels, v: impl Into<f64>) -> &mut Self {
        self.rows.push((labels, v.into()));
        self
    }
}

fn u(v: u64) -> f64 {
    v as f64
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            let mut m = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            if let [(labels, v)] = f.rows.as_slice() {
                if labels.is_empty() {
                    encode_value(f.kind, *v, m)?;
                    continue;
                }
            }
            for (labels, v) in &f.rows {
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                encode_value(f.kind, *v, m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn encode_value(
    kind: MetricType,
    v: f64,
    e: prometheus_client::encoding::MetricEncoder,
) -> Result<(), std::fmt::Error> {
    match kind {
        // Counters are whole numbers of packets, bytes, events.
        MetricType::Counter => ConstCounter::new(v as u64).encode(e),
        _ if v.fract() == 0.0 && v.abs() < 9e15 => ConstGauge::new(v as i64).encode(e),
        _ => ConstGauge::new(v).encode(e),
    }
}

/// The figures as text.
pub fn render(ctx: &Context) -> String {
    let s = read(ctx);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(s));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        log::warn!("metrics: encoding: {e}");
    }
    out
}

fn read(ctx: &Context) -> Scrape {
    let view = ctx.snapshot();
    let dp = &ctx.counters;
    let mut s = Scrape::default();
    let vips = &view.snapshot.vips;
    let vip_stats: Vec<_> = vips
        .iter()
        .map(|v| (v, dp.vip_stats(v.id).unwrap_or_default()))
        .collect();
    let vl = |v: &crate::core::balancer::VipSnapshot| vec![("vip", v.spec.to_string())];
    use MetricType::{Counter, Gauge};
    let f = s.add("xlb_vip_packets", "Packets forwarded for the VIP.", Counter);
    vip_stats.iter().for_each(|(v, st)| {
        f.row(vl(v), u(st.packets));
    });
    let f = s.add(
        "xlb_vip_bytes",
        "Bytes forwarded for the VIP (as received).",
        Counter,
    );
    vip_stats.iter().for_each(|(v, st)| {
        f.row(vl(v), u(st.bytes));
    });
    let f = s.add(
        "xlb_vip_new_flows",
        "New flows the ring placed (not tracked before).",
        Counter,
    );
    vip_stats.iter().for_each(|(v, st)| {
        f.row(vl(v), u(st.new_flows));
    });
    let f = s.add(
        "xlb_vip_no_real_drops",
        "Packets dropped: the ring had no usable real.",
        Counter,
    );
    vip_stats.iter().for_each(|(v, st)| {
        f.row(vl(v), u(st.no_real));
    });
    let f = s.add(
        "xlb_vip_quorum_drops",
        "New flows dropped while the quorum was lost.",
        Counter,
    );
    vip_stats.iter().for_each(|(v, st)| {
        f.row(vl(v), u(st.quorum_drops));
    });
    let f = s.add(
        "xlb_vip_untracked_flows",
        "New flows the connection table had no free way for: forwarded by the ring, untracked.",
        Counter,
    );
    vip_stats.iter().for_each(|(v, st)| {
        f.row(vl(v), u(st.untracked));
    });
    let reals: Vec<_> = vips
        .iter()
        .flat_map(|v| v.reals.iter().chain(&v.sorry).map(move |r| (v, r)))
        .map(|(v, r)| {
            let labels = vec![("vip", v.spec.to_string()), ("real", r.addr.to_string())];
            (labels, r, dp.real_stats(r.id).unwrap_or_default())
        })
        .collect();
    let f = s.add(
        "xlb_real_packets",
        "Packets forwarded to the real.",
        Counter,
    );
    reals.iter().for_each(|(l, _, st)| {
        f.row(l.clone(), u(st.packets));
    });
    let f = s.add("xlb_real_bytes", "Bytes forwarded to the real.", Counter);
    reals.iter().for_each(|(l, _, st)| {
        f.row(l.clone(), u(st.bytes));
    });
    let f = s.add(
        "xlb_real_new_flows",
        "New flows the ring gave the real.",
        Counter,
    );
    reals.iter().for_each(|(l, _, st)| {
        f.row(l.clone(), u(st.new_flows));
    });
    let f = s.add(
        "xlb_real_weight",
        "The real's effective weight (0: no new flows).",
        Gauge,
    );
    reals.iter().for_each(|(l, r, _)| {
        f.row(l.clone(), r.effective_weight);
    });
    let f = s.add("xlb_real_up", "Health: 1 up (or unchecked), 0 down.", Gauge);
    reals.iter().for_each(|(l, r, _)| {
        f.row(l.clone(), if r.down { 0u32 } else { 1 });
    });
    let g = dp.global_stats().unwrap_or_default();
    let f = s.add(
        "xlb_packets",
        "Packets the program passed to the kernel or dropped, by reason (and noted on the way \
         when forwarded).",
        Counter,
    );
    for c in lb_common::GLOBAL_COUNTERS {
        f.row(
            vec![
                ("action", c.counter.action.as_str().to_string()),
                ("reason", c.reason().to_string()),
            ],
            u(g.get(c.counter)),
        );
    }
    s.add(
        "xlb_conntrack_capacity",
        "Flows the connection table holds at most.",
        Gauge,
    )
    .row(vec![], u(ctx.conntrack_capacity));
    if let Some(n) = ctx.figures.entries_estimate() {
        s.add(
            "xlb_conntrack_entries",
            "Tracked flows at the last count (every 10 s).",
            Gauge,
        )
        .row(vec![], u(n));
    }
    s.add(
        "xlb_bpf_syscall_failures",
        "Map syscalls that failed.",
        Counter,
    )
    .row(vec![], u(dp.failed_calls()));
    s.add(
        "xlb_ring_rebuilds",
        "Rings written since the daemon started.",
        Counter,
    )
    .row(vec![], u(view.ring_rebuilds));
    let f = s.add(
        "xlb_config_changes",
        "Change requests, applies and reloads, by result.",
        Counter,
    );
    f.row(
        vec![("result", "applied".into())],
        u(ctx.changes.0.load(Ordering::Relaxed)),
    );
    f.row(
        vec![("result", "refused".into())],
        u(ctx.changes.1.load(Ordering::Relaxed)),
    );
    s.add("xlb_build_info", "The running version (always 1).", Gauge)
        .row(vec![("version", ctx.hello.version.clone())], 1u32);
    let started = ctx
        .started_at
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    s.add(
        "xlb_start_time_seconds",
        "When the daemon started (Unix time).",
        Gauge,
    )
    .row(vec![], started);
    if let Some(sync) = &ctx.sync {
        let st = sync.stats();
        s.add("xlb_sync_flows_sent", "Flows sent to peers.", Counter)
            .row(vec![], u(st.flows_sent));
        s.add(
            "xlb_sync_flows_received",
            "Flows received from peers.",
            Counter,
        )
        .row(vec![], u(st.flows_received));
        let f = s.add(
            "xlb_sync_rejected",
            "Sync messages dropped, by reason.",
            Counter,
        );
        for (why, n) in &st.rejected_by {
            f.row(vec![("reason", why.clone())], u(*n));
        }
    }
    s
}

/// Serve `/metrics` on `addr` until the daemon stops.
pub async fn serve(addr: SocketAddr, ctx: Arc<Context>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics {addr}"))?;
    log::info!("metrics: http://{addr}/metrics");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("metrics: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&ctx, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                // A scraper that stalls is cut off; one scrape is a few hundred ms at most.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
            });
        }
    });
    Ok(())
}

fn answer<B>(ctx: &Context, req: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String, kind: &str| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, kind)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "xlb serves /metrics only\n".into(),
            "text/plain",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /metrics\n".into(),
            "text/plain",
        );
    }
    reply(StatusCode::OK, render(ctx), CONTENT_TYPE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::balancer::Change;

    #[test]
    fn every_vip_and_real_has_its_series_named_as_documented() {
        let ctx = super::super::server::tests::context();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let vip = "tcp/10.0.0.100:80".parse().expect("vip");
        rt.block_on(ctx.writer.apply(vec![
            Change::AddVip {
                spec: vip,
                flags: Default::default(),
            },
            Change::AddReal {
                vip,
                addr: "10.0.0.11".parse().expect("ip"),
                weight: 3,
                mac: Some([2, 0, 0, 0, 0, 11]),
            },
        ]))
        .expect("apply");
        // The view is published before the writer answers.
        ctx.count_change(true);
        ctx.count_change(false);
        let text = render(&ctx);
        for line in [
            "# TYPE xlb_vip_packets counter",
            "xlb_vip_packets_total{vip=\"tcp/10.0.0.100:80\"} 0",
            "xlb_vip_new_flows_total{vip=\"tcp/10.0.0.100:80\"} 0",
            "xlb_vip_no_real_drops_total{vip=\"tcp/10.0.0.100:80\"} 0",
            "xlb_real_packets_total{vip=\"tcp/10.0.0.100:80\",real=\"10.0.0.11\"} 0",
            "xlb_real_weight{vip=\"tcp/10.0.0.100:80\",real=\"10.0.0.11\"} 3",
            "xlb_real_up{vip=\"tcp/10.0.0.100:80\",real=\"10.0.0.11\"} 1",
            "xlb_packets_total{action=\"drop\",reason=\"fragment\"} 0",
            "xlb_packets_total{action=\"pass\",reason=\"truncated\"} 0",
            "xlb_ring_rebuilds_total 1",
            "xlb_config_changes_total{result=\"applied\"} 1",
            "xlb_config_changes_total{result=\"refused\"} 1",
            "xlb_build_info{version=\"test\"} 1",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(line)),
                "{line:?} missing:\n{text}"
            );
        }
    }
}

#[cfg(test)]
mod dashboard {
    /// The Grafana dashboard that ships in `dist/grafana/` only queries metrics xlb has.
    #[test]
    fn the_dashboard_queries_only_metrics_that_exist() {
        let text = include_str!("../../../dist/grafana/xlb.json");
        let dash: serde_json::Value = serde_json::from_str(text).expect("JSON");
        let ctx = super::super::server::tests::context();
        let names: Vec<String> = super::render(&ctx)
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| {
                let (name, kind) = l.split_once(' ')?;
                Some(if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_string()
                })
            })
            .collect();
        let panels = dash["panels"].as_array().expect("panels");
        assert!(panels.len() >= 10);
        for p in panels {
            for t in p["targets"].as_array().expect("targets") {
                let expr = t["expr"].as_str().expect("expr");
                let used: Vec<&str> = expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("xlb_"))
                    .collect();
                assert!(!used.is_empty(), "{expr}");
                for m in used {
                    // Series that appear with VIPs or a first count are named in the source.
                    assert!(
                        names.iter().any(|n| n == m) || m == "xlb_conntrack_entries",
                        "{m} in {expr:?} is not an xlb metric"
                    );
                }
            }
        }
    }
}
