//! Tearing labs down: what a lab made is recorded as it is made, so that a panic, a signal
//! or a later `xlb-lab cleanup` can remove it all.

use super::*;

/// What must be undone, shared with [`emergency_cleanup`] (a signal thread or a panic hook
/// may run it while the lab's owner is blocked elsewhere).
#[derive(Default)]
pub(super) struct Shared {
    pub(super) state: Mutex<SharedState>,
}

#[derive(Default)]
pub(super) struct SharedState {
    /// Set once cleanup started: nothing new is created after it.
    pub(super) closed: bool,
    pub(super) namespaces: Vec<String>,
    /// Processes started by the lab (each leads its own process group).
    pub(super) pids: Vec<u32>,
    /// The bpffs the daemon pins into.
    pub(super) bpffs: Option<PathBuf>,
    pub(super) dir: Option<PathBuf>,
}

pub(super) static LIVE: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());
pub(super) static PANIC_HOOK: Once = Once::new();

impl Shared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn register_pid(&self, pid: u32) {
        self.lock().pids.push(pid);
    }

    pub(super) fn unregister_pid(&self, pid: u32) {
        self.lock().pids.retain(|p| *p != pid);
    }

    /// Kill what is left, delete the namespaces, unmount and remove the directory. Returns
    /// the errors met (it goes on after each).
    pub(super) fn clean(&self) -> Vec<String> {
        let st = self.lock();
        self.clean_locked(st)
    }

    /// [`Shared::clean`], giving up if the lock stays held (a panic hook must not wait for
    /// the thread that panicked while holding it).
    fn clean_within(&self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.state.try_lock() {
                Ok(st) => return self.clean_locked(st),
                Err(std::sync::TryLockError::Poisoned(e)) => {
                    return self.clean_locked(e.into_inner())
                }
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    return vec!["the lab is locked: left as it is (see xlb-lab cleanup)".into()]
                }
            }
        }
    }

    fn clean_locked(&self, mut st: std::sync::MutexGuard<'_, SharedState>) -> Vec<String> {
        st.closed = true;
        let mut errors = Vec::new();
        for pid in std::mem::take(&mut st.pids) {
            kill_ours(pid);
        }
        for ns in std::mem::take(&mut st.namespaces).iter().rev() {
            if let Err(e) = del_netns(ns) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Some(mnt) = st.bpffs.take() {
            if let Err(e) = umount(&mnt) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Some(dir) = st.dir.take() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    errors.push(format!("removing {}: {e}", dir.display()));
                }
            }
        }
        errors
    }
}

/// Tear down every lab of this process now, without waiting for their owners: for a signal
/// handler thread (then exit) and for the panic hook when panics abort.
pub fn emergency_cleanup() -> Vec<String> {
    let labs: Vec<Arc<Shared>> = LIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    labs.iter()
        .flat_map(|s| s.clean_within(Duration::from_secs(5)))
        .collect()
}

pub(super) fn install_panic_hook() {
    // With panic = "unwind" (tests), Drop tears the lab down; with "abort" (release
    // binaries) nothing is dropped, so the hook does it.
    if cfg!(panic = "abort") {
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                for e in emergency_cleanup() {
                    eprintln!("lab cleanup: {e}");
                }
            }));
        });
    }
}

impl Lab {
    // ---- teardown ---------------------------------------------------------------------

    /// Kill every process the lab started, detach the pass program, delete every
    /// namespace, unmount the bpffs, remove the directory; then check that no namespace
    /// with the lab's prefix is left. Idempotent.
    pub fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut owned: Vec<Child> = self.children.drain(..).map(|(_, c)| c).collect();
        owned.extend(self.daemon.take());
        for c in &mut owned {
            if let Ok(None) = c.try_wait() {
                // SAFETY: an unreaped child leads its own process group: kill the group.
                unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
                let _ = c.kill();
            }
        }
        for mut c in owned {
            let _ = c.wait();
        }
        self.pass.clear();
        let mut errors = self.shared.clean();
        match list_netns() {
            Ok(left) => {
                let left: Vec<String> = left
                    .into_iter()
                    .filter(|n| n.starts_with(&self.prefix))
                    .collect();
                if !left.is_empty() {
                    errors.push(format!("namespaces left: {}", left.join(" ")));
                }
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("tearing down lab {}: {}", self.id, errors.join("; "))
        }
    }
}

/// Kill a process the lab started (and its process group), if it is still our child: a pid
/// already reaped by its owner may name another process by now.
pub(super) fn kill_ours(pid: u32) {
    let ours = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // pid (comm) state ppid ...: comm may hold spaces and parentheses.
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(1)?.parse::<u32>().ok()
        })
        == Some(std::process::id());
    if ours {
        // SAFETY: kill has no memory-safety preconditions; the target is our child and the
        // process group it leads.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

pub(super) fn del_netns(ns: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "del", ns])
        .output()
        .context("running ip netns del")?;
    if !out.status.success() && Path::new("/run/netns").join(ns).exists() {
        bail!(
            "ip netns del {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Every named network namespace (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let out = run_output(Command::new("ip").args(["netns", "list"]), None)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

pub(super) fn is_mounted(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    text.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(want.as_ref()))
}

pub(super) fn umount(path: &Path) -> Result<()> {
    if !is_mounted(path) {
        return Ok(());
    }
    let target = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        bail!(
            "umount {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The pid a lab name (`xlb-<pid>-<rand>...`) was made by.
pub(super) fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(LAB_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Remove what labs of dead runs left behind: namespaces whose name starts with `prefix`
/// (e.g. [`LAB_PREFIX`]) and whose creating process no longer runs, with the processes still
/// inside them, and their directories under the temp dir (bpffs unmounted). Labs of live
/// processes are left alone, whatever the prefix. Returns what was removed.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>> {
    let dead = |name: &str| match owner_pid(name) {
        Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    };
    let mut removed = Vec::new();
    for ns in list_netns()? {
        if !ns.starts_with(prefix) || !dead(&ns) {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        del_netns(&ns)?;
        removed.push(format!("namespace {ns}"));
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(prefix) || !dead(&name) || !e.path().is_dir() {
                continue;
            }
            umount(&e.path().join("bpffs"))?;
            std::fs::remove_dir_all(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed.push(format!("directory {}", e.path().display()));
        }
    }
    Ok(removed)
}
