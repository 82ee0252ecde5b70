//! The daemon in the lab: started in the lb namespace with the lab's socket, state file and
//! bpffs, and spoken to over its socket or through the `xlb` binary.

use super::*;

impl Lab {
    // ---- the daemon -------------------------------------------------------------------

    /// The control socket the daemon serves.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("xlb.sock")
    }

    /// The daemon's state file.
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Set `key=value` in the environment of the daemons started from now on.
    pub fn set_daemon_env(&mut self, key: &str, value: &str) {
        self.daemon_env.push((key.to_string(), value.to_string()));
    }

    /// The second balancer's daemon (`lb2`): its socket, state file, pin root and log are
    /// those of the first with `lb2-` in front of the file name.
    pub fn lb2_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("lb2-{name}"))
    }

    /// Run `xlb daemon` on `lb2` ([`Lab::lb2_path`] for its files) and wait until it answers.
    /// The lab owns it as `daemon lb2` (see [`Lab::stop_child`]).
    pub fn start_daemon_lb2(&mut self, xlb: &Path, extra: &[&str]) -> Result<()> {
        let lb2 = self.lb2.clone().context("the lab has no second balancer")?;
        self.mount_bpffs()?;
        let pins = self.bpffs().join("xlb-lb2");
        std::fs::create_dir_all(&pins)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.lb2_path("daemon.log"))?;
        let mut args: Vec<String> = vec![
            xlb.display().to_string(),
            "daemon".into(),
            "--iface".into(),
            lb2.iface.clone(),
            "--socket".into(),
            self.lb2_path("xlb.sock").display().to_string(),
            "--state".into(),
            self.lb2_path("state.json").display().to_string(),
            "--pin-root".into(),
            pins.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = self.spawn_with(&lb2.ns, &args, |c| {
            c.stdout(Stdio::null()).stderr(log).env("RUST_LOG", "info");
        })?;
        self.own("daemon lb2", child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.xlb_lb2(&["list"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the daemon on lb2 did not answer within 20 s; its log:\n{}",
                    std::fs::read_to_string(self.lb2_path("daemon.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `xlb` binary against the daemon of `lb2`.
    pub fn xlb_lb2(&self, args: &[&str]) -> Result<Output> {
        let bin = self
            .xlb_bin
            .clone()
            .context("start the first daemon first: it names the xlb binary")?;
        let mut cmd = Command::new(&bin);
        cmd.args(args).env("XLB_SOCKET", self.lb2_path("xlb.sock"));
        run_raw(&mut cmd, Some(&self.shared))
    }

    /// The daemon's stderr.
    pub fn daemon_log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// The bpffs the daemon pins into: mounted by the lab in this mount namespace (so it
    /// outlives daemon restarts: `ip netns exec` gives each process a private /sys, hence a
    /// private /sys/fs/bpf) and unmounted at teardown, which frees every pin.
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    /// `--pin-root` given to the daemon.
    pub fn pin_root(&self) -> PathBuf {
        self.bpffs().join("xlb")
    }

    /// The command line `start_daemon` runs (for display), without `ip netns exec`.
    pub fn daemon_args(&self, xlb: &Path, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            xlb.display().to_string(),
            "daemon".into(),
            "--iface".into(),
            self.lb.iface.clone(),
            "--socket".into(),
            self.socket().display().to_string(),
            "--state".into(),
            self.state_file().display().to_string(),
            "--pin-root".into(),
            self.pin_root().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Run `xlb daemon` on the lb's interface inside the `lb` namespace (stderr appended to
    /// [`Lab::daemon_log`]) and wait until its socket answers `hello`. The lab owns the
    /// process: see [`Lab::stop_daemon`].
    pub fn start_daemon(&mut self, xlb: &Path, extra: &[&str]) -> Result<api::Hello> {
        if let Some(d) = self.daemon.as_mut() {
            if d.try_wait()?.is_none() {
                bail!("the daemon already runs (pid {})", d.id());
            }
        }
        self.mount_bpffs()?;
        std::fs::create_dir_all(self.pin_root())?;
        self.xlb_bin = Some(xlb.to_path_buf());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.daemon_log())
            .with_context(|| format!("opening {}", self.daemon_log().display()))?;
        let args = self.daemon_args(xlb, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let lb = self.lb.ns.clone();
        let env = self.daemon_env.clone();
        let child = self.spawn_with(&lb, &args, |c| {
            c.stdout(Stdio::null()).stderr(log).env("RUST_LOG", "info");
            c.envs(env);
        })?;
        self.daemon = Some(child);
        self.wait_hello(Duration::from_secs(20))
    }

    fn wait_hello(&mut self, timeout: Duration) -> Result<api::Hello> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .daemon
                .as_mut()
                .and_then(|d| d.try_wait().ok().flatten())
            {
                bail!(
                    "the daemon exited ({status}) before answering; its log ({}):\n{}",
                    self.daemon_log().display(),
                    self.daemon_log_tail(20)
                );
            }
            match self.hello() {
                Ok(h) => return Ok(h),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "the daemon did not answer within {timeout:?}; its log:\n{}",
                        self.daemon_log_tail(20)
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The last `lines` lines of the daemon's log.
    pub fn daemon_log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.daemon_log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The daemon process, while the lab owns one.
    pub fn daemon(&mut self) -> Option<&mut Child> {
        self.daemon.as_mut()
    }

    /// Send `signal` (e.g. `libc::SIGTERM`, `libc::SIGKILL`) to the daemon and wait for it
    /// to exit.
    pub fn stop_daemon(&mut self, signal: i32) -> Result<ExitStatus> {
        let mut d = self.daemon.take().context("no daemon runs")?;
        if d.try_wait()?.is_none() {
            // SAFETY: the pid is our unreaped child.
            unsafe { libc::kill(d.id() as i32, signal) };
        }
        let status = d.wait()?;
        self.shared.unregister_pid(d.id());
        Ok(status)
    }

    /// One request over the control socket (no CLI involved).
    pub fn api(&self, op: api::Op) -> Result<api::Response> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let req = api::Request {
            v: api::PROTOCOL_VERSION,
            id,
            op,
        };
        let mut line = serde_json::to_string(&req)?;
        line.push('\n');
        let mut stream = UnixStream::connect(self.socket())
            .with_context(|| format!("connecting to {}", self.socket().display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(line.as_bytes())?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer)?;
        if answer.is_empty() {
            bail!("the daemon closed the socket without answering");
        }
        let resp: api::Response = serde_json::from_str(answer.trim_end())
            .with_context(|| format!("bad answer {answer:?}"))?;
        if resp.id != id {
            bail!("answer to request {} received for request {id}", resp.id);
        }
        Ok(resp)
    }

    /// `hello` over the socket.
    pub fn hello(&self) -> Result<api::Hello> {
        let resp = self.api(api::Op::Hello {})?;
        match (resp.ok, resp.result, resp.error) {
            (true, Some(api::Reply::Hello(h)), _) => Ok(h),
            (false, _, Some(e)) => bail!("hello refused: {e}"),
            (_, other, _) => bail!("unexpected answer to hello: {other:?}"),
        }
    }

    /// Run the `xlb` command line (the binary given to `start_daemon`) against the lab's
    /// daemon (`XLB_SOCKET` set), from this namespace; whatever its exit status.
    pub fn xlb(&self, args: &[&str]) -> Result<Output> {
        let bin = self
            .xlb_bin
            .clone()
            .context("start the daemon first: it names the xlb binary")?;
        let mut cmd = Command::new(&bin);
        cmd.args(args).env("XLB_SOCKET", self.socket());
        run_raw(&mut cmd, Some(&self.shared))
    }

    /// [`Lab::xlb`], failing with its stderr unless it succeeds.
    pub fn xlb_checked(&self, args: &[&str]) -> Result<Output> {
        let out = self.xlb(args)?;
        if !out.status.success() {
            bail!(
                "`xlb {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// [`Lab::xlb_checked`]'s stdout.
    pub fn xlb_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.xlb_checked(args)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn mount_bpffs(&self) -> Result<()> {
        let mnt = self.bpffs();
        let mut st = self.shared.lock();
        if st.closed {
            bail!("the lab is being torn down");
        }
        if st.bpffs.is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(&mnt)?;
        self.show(&format!("mount -t bpf bpf {}", mnt.display()));
        let target = CString::new(mnt.as_os_str().as_encoded_bytes())?;
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "mount -t bpf bpf {}: {}",
                mnt.display(),
                std::io::Error::last_os_error()
            );
        }
        st.bpffs = Some(mnt);
        Ok(())
    }
}
