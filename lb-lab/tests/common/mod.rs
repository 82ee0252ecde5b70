//! Shared by the kernel and namespace tests: the root gate, and running a command.

/// Whether this process may load BPF programs and make namespaces (it is root). Without root
/// a kernel test is skipped with a printed reason on a developer's machine, but fails under
/// `CI=true`: CI runs as root on a BPF-capable kernel, so a skip there would hide a broken
/// test.
pub fn bpf_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
    if ci {
        panic!("{test}: needs root to load BPF programs, and CI=true forbids skipping");
    }
    eprintln!("{test}: SKIPPED: needs root to load BPF programs");
    false
}

/// Run a command; its stdout, or a panic with its stderr.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module runs commands"
)]
pub fn sh(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file or a directory tree removed when the test ends, also when it fails.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module makes temporary files"
)]
pub struct Removed(pub std::path::PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0).or_else(|_| std::fs::remove_file(&self.0));
    }
}

/// The bits set in an address filter (`VIP_FILTER`, `NAT_FILTER`).
#[allow(dead_code)]
pub fn filter_bits(f: &lb_common::VipFilter) -> std::collections::BTreeSet<u32> {
    (0..f.len() as u32 * 64)
        .filter(|b| f[*b as usize / 64] & (1 << (b % 64)) != 0)
        .collect()
}
