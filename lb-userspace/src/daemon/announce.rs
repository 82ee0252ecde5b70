//! `--announce bird:FILE[:RELOAD_CMD]`: the ready VIP addresses as BIRD static routes, for a
//! BGP speaker to announce. FILE holds one `route A/32 blackhole;` per ready IPv4 address and
//! FILE.6 one `route A/128 blackhole;` per IPv6 one (each `include`d inside a `protocol static`
//! of its family); both are rewritten atomically whenever the set changes, then RELOAD_CMD
//! (`sh -c`, default `birdc configure`) runs. An address is announced while at least one of its
//! VIPs is ready: VIPs sharing an address share its route.
//!
//! The files outlive the daemon on purpose: a hitless restart (SIGTERM, then a new daemon)
//! withdraws nothing, and the new daemon's first rewrite waits until no VIP is `starting`
//! (its first check results), at most `FIRST_WRITE_WAIT`.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, PoisonError},
    time::{Duration, Instant},
};

use super::handlers::Context;
use crate::{api::ReadyReply, model::VipSpec};

pub const DEFAULT_RELOAD: &str = "birdc configure";
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
const EVERY: Duration = Duration::from_secs(1);
/// A reload that failed is tried again this much later (the files are right meanwhile).
const RETRY: Duration = Duration::from_secs(5);
const FIRST_WRITE_WAIT: Duration = Duration::from_secs(30);

/// `--announce` as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bird {
    pub file: PathBuf,
    pub reload: String,
}

/// `bird:FILE[:RELOAD_CMD]`.
pub fn parse(s: &str) -> Result<Bird, String> {
    let Some(rest) = s.strip_prefix("bird:") else {
        return Err(format!(
            "{s:?}: expected bird:FILE[:RELOAD_CMD] (the only speaker written to is BIRD; for \
             ExaBGP run `xlb announce --exabgp` as its process)"
        ));
    };
    let (file, reload) = match rest.split_once(':') {
        Some((f, cmd)) if !cmd.trim().is_empty() => (f, cmd.to_string()),
        Some((f, _)) => (f, DEFAULT_RELOAD.to_string()),
        None => (rest, DEFAULT_RELOAD.to_string()),
    };
    if file.is_empty() {
        return Err(format!("{s:?}: FILE is empty"));
    }
    Ok(Bird {
        file: PathBuf::from(file),
        reload,
    })
}

/// The addresses to announce: those with a ready VIP.
pub fn ready_addrs(reply: &ReadyReply) -> BTreeSet<IpAddr> {
    reply
        .vips
        .iter()
        .filter(|v| v.state == "ready")
        .filter_map(|v| v.vip.parse::<VipSpec>().ok())
        .map(|v| v.addr)
        .collect()
}

/// FILE's and FILE.6's contents for `addrs`.
pub fn render(addrs: &BTreeSet<IpAddr>) -> (String, String) {
    let (mut v4, mut v6) = (String::new(), String::new());
    for a in addrs {
        match a {
            IpAddr::V4(a) => v4.push_str(&format!("route {a}/32 blackhole;\n")),
            IpAddr::V6(a) => v6.push_str(&format!("route {a}/128 blackhole;\n")),
        }
    }
    (v4, v6)
}

pub fn v6_path(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".6");
    PathBuf::from(p)
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Runs RELOAD_CMD: `Err` says how it failed.
async fn reload(cmd: &str) -> Result<(), String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting sh -c {cmd:?}: {e}"))?;
    let group = super::health::probe::KillGroup(child.id());
    let out = match tokio::time::timeout(RELOAD_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("{cmd:?}: {e}")),
        // Dropping the group kills the command and whatever it started.
        Err(_) => return Err(format!("{cmd:?}: no answer in {RELOAD_TIMEOUT:?}, killed")),
    };
    std::mem::forget(group);
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let first = err.lines().next().unwrap_or("").trim();
    Err(format!(
        "{cmd:?}: {}{}{first}",
        out.status,
        if first.is_empty() { "" } else { ": " }
    ))
}

/// Keeps FILE and FILE.6 in step with readiness until the daemon stops.
pub async fn run(ctx: Arc<Context>, bird: Bird) {
    let Some(figures) = ctx.announce.as_ref() else {
        return;
    };
    let started = Instant::now();
    let mut written: Option<(String, String)> = None;
    let mut retry_at: Option<Instant> = None;
    let mut view = ctx.view.clone();
    loop {
        let reply = match ctx.ready(None).await {
            Ok(r) => r,
            Err(e) => {
                log::warn!("announce: reading readiness: {e}");
                ReadyReply {
                    ready: false,
                    vips: Vec::new(),
                    reason: Some(e.message),
                }
            }
        };
        let starting = reply.vips.iter().any(|v| v.state == "starting");
        if written.is_some() || !starting || started.elapsed() >= FIRST_WRITE_WAIT {
            let addrs = ready_addrs(&reply);
            let files = render(&addrs);
            if written.as_ref() != Some(&files) {
                let v6 = v6_path(&bird.file);
                let done = write_atomic(&bird.file, &files.0)
                    .map_err(|e| format!("writing {}: {e}", bird.file.display()))
                    .and_then(|()| {
                        write_atomic(&v6, &files.1)
                            .map_err(|e| format!("writing {}: {e}", v6.display()))
                    });
                let mut f = figures.lock().unwrap_or_else(PoisonError::into_inner);
                match done {
                    Ok(()) => {
                        let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                        log::info!(
                            "announce: {} now lists {}",
                            bird.file.display(),
                            if list.is_empty() {
                                "no address".to_string()
                            } else {
                                list.join(", ")
                            }
                        );
                        f.announced = list;
                        f.writes += 1;
                        written = Some(files);
                        retry_at = Some(Instant::now());
                    }
                    Err(e) => {
                        log::error!("announce: {e}");
                        f.write_failures += 1;
                        f.last_error = Some(e);
                    }
                }
            }
        }
        if retry_at.is_some_and(|t| Instant::now() >= t) {
            let result = reload(&bird.reload).await;
            let mut f = figures.lock().unwrap_or_else(PoisonError::into_inner);
            f.reloads += 1;
            match result {
                Ok(()) => retry_at = None,
                Err(e) => {
                    // Readiness stands: the files are right, the speaker is told again later.
                    log::error!("announce: reload failed: {e}; trying again in {RETRY:?}");
                    f.reload_failures += 1;
                    f.last_error = Some(e);
                    retry_at = Some(Instant::now() + RETRY);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            changed = view.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::VipReady;

    #[test]
    fn the_argument_names_file_and_command() {
        assert_eq!(
            parse("bird:/run/xlb/vips.conf"),
            Ok(Bird {
                file: "/run/xlb/vips.conf".into(),
                reload: DEFAULT_RELOAD.into()
            })
        );
        assert_eq!(
            parse("bird:/tmp/v.conf:birdc -s /run/b.ctl configure").map(|b| b.reload),
            Ok("birdc -s /run/b.ctl configure".into())
        );
        assert!(parse("exabgp:/x").is_err());
        assert!(parse("bird:").is_err());
    }

    #[test]
    fn an_address_with_one_ready_vip_is_announced_in_its_family_file() {
        let vip = |vip: &str, state: &str| VipReady {
            vip: vip.into(),
            state: state.into(),
            reason: String::new(),
        };
        let reply = ReadyReply {
            ready: false,
            vips: vec![
                vip("tcp/10.0.0.100:80", "ready"),
                vip("tcp/10.0.0.100:443", "down"),
                vip("udp/10.0.0.101:53", "draining"),
                vip("tcp/[2001:db8::1]:80", "ready"),
                vip("tcp/10.0.0.9:80", "ready"),
            ],
            reason: None,
        };
        let (v4, v6) = render(&ready_addrs(&reply));
        assert_eq!(
            v4,
            "route 10.0.0.9/32 blackhole;\nroute 10.0.0.100/32 blackhole;\n"
        );
        assert_eq!(v6, "route 2001:db8::1/128 blackhole;\n");
        assert_eq!(render(&BTreeSet::new()), (String::new(), String::new()));
        assert_eq!(
            v6_path(Path::new("/run/x.conf")),
            PathBuf::from("/run/x.conf.6")
        );
    }
}
