//! `xlb top`: a live view of the VIPs and their reals (rates, state, health, weight) and of
//! the connection table, refreshed every second; `q` quits, the arrow keys move the selection,
//! `s` cycles the sort column. Fits an 80×24 terminal (over ssh too): ratatui on crossterm.

use std::{
    io::Write,
    path::Path,
    time::{Duration, Instant},
};

use crossterm::{
    event::{self, Event, KeyCode, KeyEventKind},
    execute,
    terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
};
use ratatui::{
    backend::{Backend, CrosstermBackend},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Paragraph, Row, Table, TableState},
    Frame, Terminal,
};

use super::{client::client_call, CliError};
use crate::api::{ListReply, Op, Reply, StatsReply};

/// The columns `s` sorts by, in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    Name,
    Packets,
    Bytes,
    NewFlows,
}

impl Sort {
    fn next(self) -> Sort {
        match self {
            Sort::Name => Sort::Packets,
            Sort::Packets => Sort::Bytes,
            Sort::Bytes => Sort::NewFlows,
            Sort::NewFlows => Sort::Name,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Sort::Name => "name",
            Sort::Packets => "pkt/s",
            Sort::Bytes => "bit/s",
            Sort::NewFlows => "new flows",
        }
    }
}

/// One line of the table: a VIP, or one of its reals (indented).
#[derive(Clone, Debug, PartialEq)]
pub struct Line4 {
    pub name: String,
    pub is_real: bool,
    pub state: String,
    pub weight: String,
    pub pps: f64,
    pub bps: f64,
    pub new_flows: u64,
}

/// What one refresh shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    pub header: String,
    pub lines: Vec<Line4>,
    pub error: Option<String>,
}

fn key(sort: Sort, l: &Line4) -> (i64, String) {
    let n = match sort {
        Sort::Name => 0,
        Sort::Packets => -(l.pps as i64),
        Sort::Bytes => -(l.bps as i64),
        Sort::NewFlows => -(l.new_flows as i64),
    };
    (n, l.name.clone())
}

/// The model of a `list` and a `stats` answer, VIPs and within each its reals in `sort`
/// order.
pub fn model(list: &ListReply, stats: &StatsReply, sort: Sort) -> Model {
    let mut groups: Vec<(Line4, Vec<Line4>)> = Vec::new();
    for v in &list.vips {
        let s = stats.vips.iter().find(|s| s.vip == v.vip);
        let vip = Line4 {
            name: v.vip.clone(),
            is_real: false,
            state: if v.quorum == "ok" {
                v.mode.clone()
            } else {
                format!("quorum {}", v.quorum)
            },
            weight: v.healthy_weight.to_string(),
            pps: s.map_or(0.0, |s| s.counters.packets_per_sec),
            bps: s.map_or(0.0, |s| s.counters.bytes_per_sec * 8.0),
            new_flows: s.map_or(0, |s| s.counters.new_flows),
        };
        let mut reals: Vec<Line4> = v
            .reals
            .iter()
            .map(|r| {
                let rs = s.and_then(|s| s.reals.iter().find(|x| x.addr == r.addr));
                let health = r.health.as_ref().map_or("", |h| h.status.as_str());
                Line4 {
                    name: r.addr.clone(),
                    is_real: true,
                    state: if health.is_empty() || health == "unchecked" {
                        r.state.clone()
                    } else {
                        format!("{} ({health})", r.state)
                    },
                    weight: if r.effective_weight == r.weight {
                        r.weight.to_string()
                    } else {
                        format!("{}/{}", r.effective_weight, r.weight)
                    },
                    pps: rs.map_or(0.0, |x| x.counters.packets_per_sec),
                    bps: rs.map_or(0.0, |x| x.counters.bytes_per_sec * 8.0),
                    new_flows: rs.map_or(0, |x| x.counters.new_flows),
                }
            })
            .collect();
        reals.sort_by_key(|l| key(sort, l));
        groups.push((vip, reals));
    }
    groups.sort_by_key(|(v, _)| key(sort, v));
    let ct = stats.conntrack.as_ref();
    let header = format!(
        "xlb: {} VIPs, sorted by {}\nconntrack {} of {} entries, {} insert failures, {} stale \
         re-picks",
        list.vips.len(),
        sort.title(),
        ct.and_then(|c| c.entries_estimate)
            .map_or_else(|| "?".into(), |n| n.to_string()),
        ct.map_or(0, |c| c.capacity),
        ct.map_or(0, |c| c.insert_failures),
        ct.map_or(0, |c| c.stale_repicks)
    );
    Model {
        header,
        lines: groups
            .into_iter()
            .flat_map(|(v, rs)| std::iter::once(v).chain(rs))
            .collect(),
        error: None,
    }
}

/// Numbers as top shows them: 1.2k, 3.4M.
fn si(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

/// Draw `m` with `selected` highlighted.
pub fn draw(f: &mut Frame, m: &Model, state: &mut TableState) {
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let head_text = match &m.error {
        Some(e) => format!("{}\n{e}", m.header),
        None => m.header.clone(),
    };
    f.render_widget(Paragraph::new(head_text), head);
    let rows = m.lines.iter().map(|l| {
        let name = if l.is_real {
            format!("  {}", l.name)
        } else {
            l.name.clone()
        };
        let style = if l.is_real {
            Style::default()
        } else {
            Style::default().add_modifier(Modifier::BOLD)
        };
        Row::new(vec![
            name,
            l.state.clone(),
            l.weight.clone(),
            si(l.pps),
            si(l.bps),
            l.new_flows.to_string(),
        ])
        .style(style)
    });
    let table = Table::new(
        rows,
        [
            Constraint::Min(24),
            Constraint::Length(18),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(9),
        ],
    )
    .header(
        Row::new(vec![
            "VIP / REAL",
            "STATE",
            "WEIGHT",
            "PKT/S",
            "BIT/S",
            "NEW FLOWS",
        ])
        .style(Style::default().add_modifier(Modifier::REVERSED)),
    )
    .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
    .block(Block::default().borders(Borders::TOP));
    f.render_stateful_widget(table, body, state);
    f.render_widget(
        Paragraph::new(Line::from("q quit  ↑/↓ select  s sort")),
        foot,
    );
}

fn fetch(socket: &Path, sort: Sort) -> Model {
    let list = client_call(socket, Op::List {});
    let stats = client_call(socket, Op::Stats {});
    match (list, stats) {
        (Ok(Some(Reply::List(l))), Ok(Some(Reply::Stats(s)))) => model(&l, &s, sort),
        (Err(e), _) | (_, Err(e)) => Model {
            header: "xlb: no answer from the daemon".into(),
            error: Some(e.to_string()),
            ..Model::default()
        },
        _ => Model {
            header: "xlb: unexpected answer from the daemon".into(),
            ..Model::default()
        },
    }
}

/// Run until `q` (or Esc, or Ctrl-C).
pub fn run(socket: &Path, interval: Duration) -> Result<(), CliError> {
    let fail = |what: &str, e: std::io::Error| {
        CliError::Failed(anyhow::anyhow!("{what}: {e} (xlb top needs a terminal)"))
    };
    terminal::enable_raw_mode().map_err(|e| fail("raw mode", e))?;
    let mut out = std::io::stdout();
    if let Err(e) = execute!(out, EnterAlternateScreen) {
        let _ = terminal::disable_raw_mode();
        return Err(fail("alternate screen", e));
    }
    let result = (|| {
        let mut term = Terminal::new(CrosstermBackend::new(std::io::stdout()))
            .map_err(|e| fail("terminal", e))?;
        run_loop(&mut term, socket, interval).map_err(|e| fail("drawing", e))
    })();
    let _ = execute!(out, LeaveAlternateScreen);
    let _ = terminal::disable_raw_mode();
    let _ = out.flush();
    result
}

fn run_loop<B: Backend>(
    term: &mut Terminal<B>,
    socket: &Path,
    interval: Duration,
) -> std::io::Result<()> {
    let mut sort = Sort::Name;
    let mut state = TableState::default().with_selected(Some(0));
    let mut m = fetch(socket, sort);
    let mut next = Instant::now() + interval;
    loop {
        term.draw(|f| draw(f, &m, &mut state))?;
        let wait = next.saturating_duration_since(Instant::now());
        if event::poll(wait)? {
            if let Event::Key(k) = event::read()? {
                if k.kind != KeyEventKind::Press {
                    continue;
                }
                let ctrl_c = k.code == KeyCode::Char('c')
                    && k.modifiers.contains(event::KeyModifiers::CONTROL);
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    _ if ctrl_c => return Ok(()),
                    KeyCode::Down => state.select_next(),
                    KeyCode::Up => state.select_previous(),
                    KeyCode::Char('s') => {
                        sort = sort.next();
                        m = fetch(socket, sort);
                    }
                    _ => {}
                }
            }
            continue;
        }
        m = fetch(socket, sort);
        if state.selected().is_some_and(|s| s >= m.lines.len()) {
            state.select(Some(m.lines.len().saturating_sub(1)));
        }
        next = Instant::now() + interval;
    }
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;

    use super::*;

    fn sample() -> (ListReply, StatsReply) {
        let real = |addr: &str, state: &str, w: u32| {
            serde_json::json!({"addr": addr, "id": 1, "weight": w, "effective_weight": w,
                "mac": null, "state": state, "health": null, "check": null})
        };
        let list: ListReply = serde_json::from_value(serde_json::json!({"vips": [
            {"vip": "tcp/10.0.0.100:80", "id": 0, "flags": [], "healthy_weight": 3,
             "reals": [real("10.0.0.11", "active", 1), real("10.0.0.12", "active", 2)]},
            {"vip": "udp/10.0.0.100:53", "id": 1, "flags": [], "healthy_weight": 1,
             "reals": [real("10.0.0.13", "draining", 0)]}
        ]}))
        .expect("list");
        let c = |pps: f64, flows: u64| {
            serde_json::json!({"packets": 1, "bytes": 1, "new_flows": flows,
                "packets_per_sec": pps, "bytes_per_sec": pps * 100.0})
        };
        let with = |mut v: serde_json::Value, extra: serde_json::Value| {
            if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            v
        };
        let stats: StatsReply = serde_json::from_value(serde_json::json!({
            "uptime_secs": 10.0, "global": {}, "unresolved_reals": 0,
            "conntrack": {"capacity": 1048576, "entries_estimate": 42, "insert_failures": 0,
                          "stale_repicks": 3},
            "vips": [
                with(c(1500.0, 30), serde_json::json!({"vip": "tcp/10.0.0.100:80", "no_real": 0,
                    "reals": [with(c(500.0, 10), serde_json::json!({"addr": "10.0.0.11"})),
                              with(c(1000.0, 20), serde_json::json!({"addr": "10.0.0.12"}))]})),
                with(c(20.0, 2), serde_json::json!({"vip": "udp/10.0.0.100:53", "no_real": 0,
                    "reals": [with(c(20.0, 2), serde_json::json!({"addr": "10.0.0.13"}))]}))
            ]
        }))
        .expect("stats");
        (list, stats)
    }

    fn screen(m: &Model) -> String {
        let mut term = Terminal::new(TestBackend::new(80, 24)).expect("terminal");
        let mut state = TableState::default().with_selected(Some(1));
        term.draw(|f| draw(f, m, &mut state)).expect("draw");
        let buf = term.backend().buffer().clone();
        (0..24)
            .map(|y| {
                (0..80)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn an_80_by_24_screen_shows_vips_reals_rates_and_the_table() {
        let (list, stats) = sample();
        let m = model(&list, &stats, Sort::Name);
        let s = screen(&m);
        for want in [
            "conntrack 42 of 1048576 entries, 0 insert failures, 3 stale re-picks",
            "VIP / REAL",
            "tcp/10.0.0.100:80",
            "  10.0.0.12",
            "draining",
            "1.5k",
            "q quit",
        ] {
            assert!(s.contains(want), "{want:?} missing:\n{s}");
        }
        assert!(s.lines().all(|l| l.chars().count() <= 80));
    }

    #[test]
    fn s_sorts_vips_and_their_reals_by_the_column() {
        let (list, stats) = sample();
        let names = |sort| -> Vec<String> {
            model(&list, &stats, sort)
                .lines
                .into_iter()
                .map(|l| l.name)
                .collect()
        };
        assert_eq!(
            names(Sort::Name),
            [
                "tcp/10.0.0.100:80",
                "10.0.0.11",
                "10.0.0.12",
                "udp/10.0.0.100:53",
                "10.0.0.13"
            ]
        );
        assert_eq!(
            names(Sort::Packets),
            [
                "tcp/10.0.0.100:80",
                "10.0.0.12",
                "10.0.0.11",
                "udp/10.0.0.100:53",
                "10.0.0.13"
            ]
        );
        assert_eq!(Sort::Name.next().next().next().next(), Sort::Name);
    }
}
