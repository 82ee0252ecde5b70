//! Running commands in namespaces, and small helpers of the lab.

use super::*;

/// `<pid>-<4 hex digits>`, unused by any namespace now.
pub(super) fn new_run_id() -> Result<String> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    for _ in 0..64 {
        let mut b = [0u8; 2];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .context("reading /dev/urandom")?;
        let n = u16::from_le_bytes(b) ^ (COUNTER.fetch_add(1, Ordering::Relaxed) as u16);
        let id = format!("{pid}-{n:04x}");
        let taken = Path::new("/run/netns")
            .join(format!("{LAB_PREFIX}{id}-sw"))
            .exists()
            || std::env::temp_dir()
                .join(format!("{LAB_PREFIX}{id}"))
                .exists();
        if !taken {
            return Ok(id);
        }
    }
    bail!("no free lab id")
}

pub(super) fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(program).is_file())
}

/// Quote for display where needed.
pub(super) fn shell_line(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        if a.is_empty()
            || a.chars()
                .any(|c| !(c.is_ascii_alphanumeric() || "-_./:=,@%+[]".contains(c)))
        {
            s.push('\'');
            s.push_str(&a.replace('\'', r"'\''"));
            s.push('\'');
        } else {
            s.push_str(a);
        }
    }
    s
}

pub(super) fn exec_line(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    shell_line("ip", &full)
}

/// `ip netns exec <ns> <args>`, in a process group of its own (a terminal's Ctrl-C reaches
/// the lab's owner, which tears down in order, not every process at once).
pub(super) fn netns_cmd(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args).process_group(0);
    cmd
}

/// Run to completion with output captured, registering the process for cleanup meanwhile.
pub(super) fn run_raw(cmd: &mut Command, shared: Option<&Shared>) -> Result<Output> {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {shown}"))?;
    let pid = child.id();
    if let Some(s) = shared {
        s.register_pid(pid);
    }
    let out = child.wait_with_output();
    if let Some(s) = shared {
        s.unregister_pid(pid);
    }
    out.with_context(|| format!("waiting for {shown}"))
}

/// [`run_raw`], failing with the stderr unless the command succeeds.
pub(super) fn run_output(cmd: &mut Command, shared: Option<&Shared>) -> Result<Output> {
    let out = run_raw(cmd, shared)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            command_line(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

pub(super) fn command_line(cmd: &Command) -> String {
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    shell_line(&cmd.get_program().to_string_lossy(), &args)
}

/// Run `f` on a thread that entered the network namespace `ns` (the namespace is per
/// thread: the caller's is untouched).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = Path::new("/run/netns").join(ns);
    std::thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: setns on a valid namespace fd, for this thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns({}): {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        f()
    })
    .join()
    .map_err(|_| anyhow!("the thread in namespace {ns} panicked"))?
}

/// Load `xlb_pass` from the map-less helper object and attach it natively to `iface` in `ns`.
pub(super) fn load_pass(ns: &str, iface: &str) -> Result<Ebpf> {
    let iface = iface.to_string();
    let ns_name = ns.to_string();
    in_netns(ns, move || {
        let mut ebpf = load_aux().context("loading the XDP object for the pass program")?;
        let prog: &mut Xdp = ebpf
            .program_mut(lb_common::PROG_PASS)
            .with_context(|| format!("program {} missing", lb_common::PROG_PASS))?
            .try_into()
            .context("xlb_pass is not an XDP program")?;
        prog.load().context("loading xlb_pass")?;
        prog.attach(&iface, XdpMode::Driver)
            .with_context(|| format!("attaching xlb_pass to {iface} in {ns_name}"))?;
        Ok(ebpf)
    })
}

/// Parse `request`'s output: a name per line, or `FAIL <reason>`.
pub fn parse_replies(out: &str) -> Vec<Reply> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match l.strip_prefix("FAIL") {
            Some(reason) => Err(reason.trim().to_string()),
            None => Ok(l.trim().to_string()),
        })
        .collect()
}
