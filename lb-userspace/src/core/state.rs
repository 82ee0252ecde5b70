//! The daemon's persisted state: the desired config plus what a restart needs to be hitless
//! (real and VIP ids, resolved MACs, ids in quarantine). JSON, written atomically (temp
//! file, fsync, rename, fsync of the directory) after every change.
//!
//! Quarantine ends are kept in the boot's monotonic time, with the boot's id: what they
//! protect is the age of tracked flows, which the kernel counts in jiffies, so neither a wall
//! clock step nor a suspend may end them early. After a reboot the pinned maps (and every
//! tracked flow) are gone, so a quarantine of another boot is dropped.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::core::balancer::{QuarantinedId, Snapshot, VipRecord};

/// The format written. Version 1 (quarantine ends in wall-clock seconds) is still read.
pub const STATE_VERSION: u32 = 2;

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
    pub vips: Vec<VipRecord>,
    #[serde(default)]
    pub quarantined: Vec<SavedQuarantine>,
    /// The boot the quarantine ends are of (`/proc/sys/kernel/random/boot_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The quarantine the ends were computed with, in milliseconds: a daemon restarted with
    /// longer idle timeouts lengthens them to its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine_ms: Option<u64>,
}

/// A freed real id and when its quarantine ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedQuarantine {
    pub id: u32,
    /// CLOCK_MONOTONIC of boot `boot_id`, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_monotonic_ms: Option<u64>,
    /// Version 1 files: the wall-clock second it ends (read, never written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_unix: Option<u64>,
}

/// The clocks a state file's times are read and written with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootClock {
    pub boot_id: String,
    /// CLOCK_MONOTONIC now.
    pub monotonic: Duration,
    /// The wall clock now (only to read version 1 files).
    pub unix: Duration,
}

impl BootClock {
    pub fn now() -> BootClock {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into a timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        BootClock {
            boot_id,
            monotonic: Duration::new(
                ts.tv_sec.max(0) as u64,
                ts.tv_nsec.clamp(0, 999_999_999) as u32,
            ),
            unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }
}

impl SavedState {
    pub fn from_snapshot(
        iface: &str,
        snap: &Snapshot,
        quarantine: Duration,
        clock: &BootClock,
    ) -> SavedState {
        let now_ms = clock.monotonic.as_millis() as u64;
        SavedState {
            version: STATE_VERSION,
            iface: iface.to_string(),
            vips: snap.records(),
            quarantined: snap
                .quarantined
                .iter()
                .map(|q| SavedQuarantine {
                    id: q.id,
                    // Rounded up: a quarantine never ends early.
                    until_monotonic_ms: Some(now_ms + q.remaining.as_millis() as u64 + 1),
                    until_unix: None,
                })
                .collect(),
            boot_id: (!clock.boot_id.is_empty()).then(|| clock.boot_id.clone()),
            quarantine_ms: Some(quarantine.as_millis() as u64),
        }
    }

    /// The quarantines still running under a quarantine of `quarantine` (this daemon's), as
    /// `Balancer::restore` takes them.
    pub fn quarantine_left(&self, clock: &BootClock, quarantine: Duration) -> Vec<QuarantinedId> {
        // Another boot is dropped only when both ids say so: an unreadable id keeps them.
        let other_boot = match (&self.boot_id, clock.boot_id.as_str()) {
            (Some(saved), now) => !now.is_empty() && saved != now,
            (None, _) => false,
        };
        // A longer quarantine now than when saved lengthens what is left by the difference.
        let longer = self
            .quarantine_ms
            .map(|saved| quarantine.saturating_sub(Duration::from_millis(saved)))
            .unwrap_or_default();
        self.quarantined
            .iter()
            .filter_map(|q| {
                let remaining = match (q.until_monotonic_ms, q.until_unix) {
                    // Another boot: its tracked flows are gone with its maps.
                    (Some(_), _) if other_boot => return None,
                    (Some(ms), _) => {
                        (Duration::from_millis(ms) + longer).checked_sub(clock.monotonic)?
                    }
                    // Version 1: the wall clock is all there is.
                    (None, Some(secs)) => Duration::from_secs(secs).checked_sub(clock.unix)?,
                    (None, None) => return None,
                };
                (!remaining.is_zero()).then_some(QuarantinedId {
                    id: q.id,
                    remaining,
                })
            })
            .collect()
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
    if !(1..=STATE_VERSION).contains(&state.version) {
        return Err(StateError::Invalid {
            path: path.display().to_string(),
            reason: format!(
                "version {} (this xlb reads versions 1 to {STATE_VERSION})",
                state.version
            ),
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
    use crate::{core::balancer::RealRecord, model::CheckFields};

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("xlb-state-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("mkdir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const Q: Duration = Duration::from_secs(960);

    fn clock(boot: &str, mono_secs: u64) -> BootClock {
        BootClock {
            boot_id: boot.to_string(),
            monotonic: Duration::from_secs(mono_secs),
            unix: Duration::from_secs(1_700_000_000),
        }
    }

    fn real(id: u32, addr: &str, down: bool) -> crate::core::balancer::RealSnapshot {
        crate::core::balancer::RealSnapshot {
            mode: None,
            effective_mode: crate::model::Mode::Dr,
            addr: addr.parse().expect("ip"),
            id,
            weight: 2,
            mac: Some([2, 0xaa, 0, 0, 0, 0x0b]),
            egress: None,
            in_ring: !down,
            serving: true,
            effective_weight: 2,
            check: None,
            effective_check: None,
            down,
            dyn_weight: None,
        }
    }

    fn sample(quarantined: Vec<QuarantinedId>, at: &BootClock) -> SavedState {
        let snap = Snapshot {
            vips: vec![crate::core::balancer::VipSnapshot {
                mode: None,
                effective_mode: crate::model::Mode::Dr,
                spec: "tcp/10.0.0.100:80".parse().expect("vip"),
                id: 3,
                flags: crate::model::VipFlags {
                    no_src_port: true,
                    no_conntrack: false,
                },
                generation: 1,
                ring_digest: String::new(),
                options: crate::model::VipOptions {
                    quorum: 2,
                    sorry_server: Some("10.0.0.99".parse().expect("ip")),
                    ..Default::default()
                },
                check: Some(
                    CheckFields::from_json(&serde_json::json!({"type": "tcp", "interval": "5s"}))
                        .expect("check"),
                ),
                reals: vec![real(7, "10.0.0.11", true)],
                sorry: Some(real(8, "10.0.0.99", false)),
                healthy_weight: 0,
                quorum_lost: true,
                sorry_active: true,
                fail_open: false,
                dropping: false,
            }],
            quarantined,
        };
        SavedState::from_snapshot("eth0", &snap, Q, at)
    }

    #[test]
    fn saves_and_loads_back_with_ids_flags_and_macs() {
        let dir = TempDir::new("round");
        let path = dir.0.join("s.json");
        assert_eq!(load(&path).expect("no file is fine"), None);
        let s = sample(vec![], &clock("b1", 100));
        save(&path, &s).expect("save");
        let back = load(&path).expect("load").expect("present");
        assert_eq!(back, s);
        assert_eq!(
            back.vips[0].reals[0],
            RealRecord {
                mode: None,
                addr: "10.0.0.11".parse().expect("ip"),
                id: 7,
                weight: 2,
                mac: Some([2, 0xaa, 0, 0, 0, 0x0b]),
                egress: None,
                check: None,
                down: true,
                dyn_weight: None,
            }
        );
        assert_eq!(back.vips[0].sorry.as_ref().map(|s| s.id), Some(8));
        assert_eq!(back.vips[0].options.quorum, 2);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains(r#""vip": "tcp/10.0.0.100:80""#), "{text}");
        assert!(text.contains(r#""mac": "02:aa:00:00:00:0b""#), "{text}");
        assert!(
            text.contains(
                r#""flags": [
        "no-src-port"
      ]"#
            ),
            "{text}"
        );
    }

    #[test]
    fn a_failed_save_leaves_the_previous_file_whole() {
        let dir = TempDir::new("atomic");
        let path = dir.0.join("s.json");
        let old = sample(vec![], &clock("b1", 100));
        save(&path, &old).expect("first save");
        let before = std::fs::read(&path).expect("read");
        // The temporary file cannot be made: the save fails before touching the file.
        std::fs::create_dir(dir.0.join("s.json.tmp")).expect("block the temp path");
        let mut new = old.clone();
        new.vips.clear();
        assert!(save(&path, &new).is_err(), "the save must fail");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            before,
            "the old file changed"
        );
        assert_eq!(load(&path).expect("load"), Some(old));
        // Once it can, the new state replaces the old one entirely.
        std::fs::remove_dir(dir.0.join("s.json.tmp")).expect("unblock");
        save(&path, &new).expect("second save");
        assert_eq!(load(&path).expect("load"), Some(new));
        assert!(!dir.0.join("s.json.tmp").exists());
    }

    #[test]
    fn quarantine_is_kept_in_boot_time_and_dropped_after_a_reboot() {
        let at = clock("b1", 1_000);
        let s = sample(
            vec![QuarantinedId {
                id: 5,
                remaining: Duration::from_secs(600),
            }],
            &at,
        );
        assert_eq!(s.boot_id.as_deref(), Some("b1"));
        // 100 s later in the same boot, whatever the wall clock did meanwhile.
        let mut later = clock("b1", 1_100);
        later.unix = Duration::from_secs(1);
        let left = s.quarantine_left(&later, Q);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, 5);
        let secs = left[0].remaining.as_secs_f64();
        assert!((499.0..=501.0).contains(&secs), "{secs}");
        // Past its end: gone.
        assert!(s.quarantine_left(&clock("b1", 1_601), Q).is_empty());
        // Another boot: gone too (the maps and their tracked flows did not survive it).
        assert!(s.quarantine_left(&clock("b2", 1_100), Q).is_empty());
        // An unknown boot id (unreadable) keeps them: it may be the same boot.
        assert_eq!(s.quarantine_left(&clock("", 1_100), Q).len(), 1);
        let mut unknown = s.clone();
        unknown.boot_id = None;
        assert_eq!(unknown.quarantine_left(&later, Q).len(), 1);
        // A daemon restarted with a quarantine 1000 s longer keeps the ids 1000 s longer.
        let longer = s.quarantine_left(&later, Q + Duration::from_secs(1000));
        let secs = longer[0].remaining.as_secs_f64();
        assert!((1499.0..=1501.0).contains(&secs), "{secs}");
    }

    #[test]
    fn version_1_files_are_read_and_later_versions_refused() {
        let dir = TempDir::new("versions");
        let path = dir.0.join("s.json");
        std::fs::write(
            &path,
            r#"{"version":1,"iface":"eth0","vips":[{"vip":"tcp/10.0.0.100:80","id":0,
                "flags":[],"reals":[{"addr":"10.0.0.11","id":1,"weight":1,"mac":null}]}],
                "quarantined":[{"id":2,"until_unix":1700000100}]}"#,
        )
        .expect("write");
        let s = load(&path).expect("v1 loads").expect("present");
        assert_eq!(s.vips[0].reals[0].mac, None);
        let left = s.quarantine_left(&clock("b1", 5), Q);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].remaining, Duration::from_secs(100));
        std::fs::write(&path, r#"{"version":3,"iface":"x","vips":[]}"#).expect("write");
        let err = load(&path).expect_err("version 3 refused").to_string();
        assert!(err.contains("version 3"), "{err}");
        std::fs::write(
            &path,
            r#"{"version":2,"iface":"x","vips":[{"vip":"tcp/1.2.3.4","id":0,"reals":[]}]}"#,
        )
        .expect("write");
        let err = load(&path).expect_err("bad VIP refused").to_string();
        assert!(
            err.contains("tcp/1.2.3.4") && err.contains("missing port"),
            "{err}"
        );
    }
}
