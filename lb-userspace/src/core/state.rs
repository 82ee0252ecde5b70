//! The daemon's persisted state: the desired config plus what a restart needs to be hitless
//! (real and VIP ids, resolved MACs, ids in quarantine). JSON, written atomically (temp
//! file, fsync, rename, fsync of the directory) after every change.

use std::{
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    core::balancer::{QuarantinedId, RestoreReal, RestoreVip, Snapshot},
    model::{format_mac, parse_mac, VipFlags, VipSpec},
};

pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid xlb state file: {reason}")]
    Invalid { path: String, reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    pub version: u32,
    pub iface: String,
    pub vips: Vec<SavedVip>,
    #[serde(default)]
    pub quarantined: Vec<SavedQuarantine>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedVip {
    pub vip: String,
    pub id: u32,
    #[serde(default)]
    pub flags: Vec<String>,
    pub reals: Vec<SavedReal>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedReal {
    pub addr: IpAddr,
    pub id: u32,
    pub weight: u32,
    /// The last MAC resolved: a restarted daemon keeps the real in service at once.
    pub mac: Option<String>,
}

/// A freed real id and the wall-clock second its quarantine ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedQuarantine {
    pub id: u32,
    pub until_unix: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl SavedState {
    pub fn from_snapshot(iface: &str, snap: &Snapshot) -> SavedState {
        let now = unix_now();
        SavedState {
            version: STATE_VERSION,
            iface: iface.to_string(),
            vips: snap
                .vips
                .iter()
                .map(|v| SavedVip {
                    vip: v.spec.to_string(),
                    id: v.id,
                    flags: v.flags.names().iter().map(|s| s.to_string()).collect(),
                    reals: v
                        .reals
                        .iter()
                        .map(|r| SavedReal {
                            addr: r.addr,
                            id: r.id,
                            weight: r.weight,
                            mac: r.mac.as_ref().map(format_mac),
                        })
                        .collect(),
                })
                .collect(),
            quarantined: snap
                .quarantined
                .iter()
                .map(|q| SavedQuarantine {
                    id: q.id,
                    until_unix: now + q.remaining.as_secs() + 1,
                })
                .collect(),
        }
    }

    /// The saved state in the form `Balancer::restore` takes.
    pub fn to_restore(
        &self,
        path: &Path,
    ) -> Result<(Vec<RestoreVip>, Vec<QuarantinedId>), StateError> {
        let invalid = |reason: String| StateError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let mut vips = Vec::new();
        for (i, v) in self.vips.iter().enumerate() {
            let spec: VipSpec = v
                .vip
                .parse()
                .map_err(|e| invalid(format!("vips[{i}].vip: {e}")))?;
            let flags = VipFlags::from_names(v.flags.iter().map(String::as_str))
                .map_err(|e| invalid(format!("vips[{i}].flags: {e}")))?;
            let mut reals = Vec::new();
            for (j, r) in v.reals.iter().enumerate() {
                let mac = match &r.mac {
                    None => None,
                    Some(m) => Some(parse_mac(m).ok_or_else(|| {
                        invalid(format!("vips[{i}].reals[{j}].mac: {m:?} is not a MAC"))
                    })?),
                };
                reals.push(RestoreReal {
                    addr: r.addr,
                    id: r.id,
                    weight: r.weight,
                    mac,
                });
            }
            vips.push(RestoreVip {
                spec,
                id: v.id,
                flags,
                reals,
            });
        }
        let now = unix_now();
        let quarantined = self
            .quarantined
            .iter()
            .filter(|q| q.until_unix > now)
            .map(|q| QuarantinedId {
                id: q.id,
                remaining: Duration::from_secs(q.until_unix - now),
            })
            .collect();
        Ok((vips, quarantined))
    }
}

/// Read a state file; `None` when there is none yet.
pub fn load(path: &Path) -> Result<Option<SavedState>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.display().to_string(),
                source,
            })
        }
    };
    let state: SavedState = serde_json::from_str(&text).map_err(|e| StateError::Invalid {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    if state.version != STATE_VERSION {
        return Err(StateError::Invalid {
            path: path.display().to_string(),
            reason: format!("version {} (this xlb reads {STATE_VERSION})", state.version),
        });
    }
    Ok(Some(state))
}

/// Write atomically: a crash leaves either the old file or the new one, never a mix.
pub fn save(path: &Path, state: &SavedState) -> Result<(), StateError> {
    let io = |p: &Path, source: std::io::Error| StateError::Io {
        path: p.display().to_string(),
        source,
    };
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_string_pretty(state).map_err(|e| StateError::Invalid {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(text.as_bytes()).map_err(|e| io(&tmp, e))?;
        f.write_all(b"\n").map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        // The rename is durable once the directory is.
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_is_atomic_and_loads_back() {
        let dir = std::env::temp_dir().join(format!("xlb-state-test-{}", std::process::id()));
        let path = dir.join("s.json");
        let s = SavedState {
            version: 1,
            iface: "eth0".into(),
            vips: vec![SavedVip {
                vip: "tcp/10.0.0.100:80".into(),
                id: 3,
                flags: vec!["no-src-port".into()],
                reals: vec![SavedReal {
                    addr: "10.0.0.11".parse().expect("ip"),
                    id: 7,
                    weight: 2,
                    mac: Some("02:aa:00:00:00:0b".into()),
                }],
            }],
            quarantined: vec![SavedQuarantine {
                id: 5,
                until_unix: unix_now() + 100,
            }],
        };
        assert_eq!(load(&path).expect("no file is fine"), None);
        save(&path, &s).expect("save");
        assert!(!dir.join("s.json.tmp").exists());
        assert_eq!(load(&path).expect("load"), Some(s.clone()));
        let (vips, q) = s.to_restore(&path).expect("valid");
        assert_eq!(vips[0].reals[0].id, 7);
        assert_eq!(vips[0].id, 3);
        assert!(vips[0].flags.no_src_port);
        assert_eq!(q[0].id, 5);
        std::fs::write(&path, "{\"version\":2,\"iface\":\"x\",\"vips\":[]}").expect("write");
        let err = load(&path).expect_err("version 2 refused").to_string();
        assert!(err.contains("version 2"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
