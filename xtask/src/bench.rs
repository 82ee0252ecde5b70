//! `cargo xtask bench --baseline REV`: the bench of another revision and this tree's, run
//! alternately in one invocation on one machine, so that a change is judged against the same
//! noise. REV is checked out into a worktree at `target/baseline` (kept, so that the next
//! comparison builds incrementally) and built there with its own `cargo xtask build`.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{bail, Context, Result};

use super::{clean_cmd, root, run};

/// Rounds of (baseline, current): each binary runs this often, alternating, and a case's
/// figure is the lowest of its runs' medians (the least disturbed by the rest of the machine).
const ROUNDS: usize = 2;

/// Build REV's bench in the worktree and return its binary.
fn build_baseline(rev: &str) -> Result<std::path::PathBuf> {
    let dir = root().join("target/baseline");
    if dir.join(".git").exists() {
        run(Command::new("git")
            .arg("-C")
            .arg(&dir)
            .args(["checkout", "--quiet", "--detach", "--force", rev]))?;
    } else {
        run(Command::new("git")
            .arg("-C")
            .arg(root())
            .args(["worktree", "add", "--force", "--detach"])
            .arg(&dir)
            .arg(rev))?;
    }
    // The toolchain pieces of this tree serve the baseline's build too.
    let target = dir.join("target");
    std::fs::create_dir_all(&target)?;
    for shared in ["tools", "llvm-prefix"] {
        let link = target.join(shared);
        if !link.exists() {
            std::os::unix::fs::symlink(root().join("target").join(shared), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    eprintln!("xtask: building the baseline {rev} in {}", dir.display());
    run(clean_cmd("cargo")
        .current_dir(&dir)
        .args(["xtask", "build"]))?;
    Ok(target.join("release/xlb-bench"))
}

/// One JSON line of xlb-bench: (case, mode) → ns/packet median.
fn parse(line: &str) -> Option<((String, String), f64)> {
    let field = |name: &str| -> Option<&str> {
        let at = line.find(&format!("\"{name}\":"))? + name.len() + 3;
        let rest = &line[at..];
        let rest = rest.strip_prefix('"').unwrap_or(rest);
        let end = rest.find(['"', ',', '}'])?;
        Some(&rest[..end])
    };
    let ns = field("ns_per_pkt_median")?.parse().ok()?;
    let mode = field("mode").unwrap_or("-").to_string();
    Some(((field("case")?.to_string(), mode), ns))
}

fn measure(bin: &Path, extra: &[String]) -> Result<Vec<((String, String), f64)>> {
    let out = clean_cmd(bin.to_str().context("non-UTF-8 path")?)
        .args(extra)
        .arg("--json")
        .output()
        .with_context(|| format!("starting {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(parse)
        .collect())
}

pub fn compare(rev: &str, extra: &[String]) -> Result<()> {
    let before_bin = build_baseline(rev)?;
    let after_bin = root().join("target/release/xlb-bench");
    let extra: Vec<String> = extra.iter().filter(|a| *a != "--json").cloned().collect();
    // (case, mode) → (lowest median before, lowest after); in the order the bench prints.
    let mut order = Vec::new();
    let mut figures: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    for round in 0..ROUNDS {
        eprintln!(
            "xtask: round {} of {ROUNDS}: {rev}, then this tree",
            round + 1
        );
        for (i, bin) in [&before_bin, &after_bin].into_iter().enumerate() {
            for (key, ns) in measure(bin, &extra)? {
                if !figures.contains_key(&key) {
                    order.push(key.clone());
                }
                let f = figures.entry(key).or_insert((f64::NAN, f64::NAN));
                let slot = if i == 0 { &mut f.0 } else { &mut f.1 };
                *slot = if slot.is_nan() { ns } else { slot.min(ns) };
            }
        }
    }
    println!(
        "xlb-bench, {rev} (before) and this tree (after), alternating, {ROUNDS} rounds, the \
         lowest median of each; ns/packet"
    );
    println!(
        "{:<28} {:>6} {:>9} {:>9} {:>12}",
        "case", "mode", "before", "after", "after/before"
    );
    let show = |v: f64| {
        if v.is_nan() {
            "-".to_string()
        } else {
            format!("{v:.1}")
        }
    };
    for key in &order {
        let (b, a) = figures[key];
        let ratio = if b.is_nan() || a.is_nan() || b == 0.0 {
            "-".to_string()
        } else {
            format!("{:.2}", a / b)
        };
        println!(
            "{:<28} {:>6} {:>9} {:>9} {:>12}",
            key.0,
            key.1,
            show(b),
            show(a),
            ratio
        );
    }
    println!(
        "reproduce: cargo xtask bench --baseline {rev}{}",
        extra.iter().map(|a| format!(" {a}")).collect::<String>()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bench_line_parses_and_others_do_not() {
        let line = r#"{"case":"tcp4_established","mode":"dr","ns_per_pkt_median":31.0,"ns_per_pkt_min":30.0}"#;
        assert_eq!(
            parse(line),
            Some((("tcp4_established".into(), "dr".into()), 31.0))
        );
        let flood = r#"{"case":"tcp4_flood_into_1m_flows","flows":10,"ns_per_pkt_median":250.5}"#;
        assert_eq!(
            parse(flood),
            Some((("tcp4_flood_into_1m_flows".into(), "-".into()), 250.5))
        );
        assert_eq!(
            parse(r#"{"case":"conntrack_walk_1m_flows","ms_median":7.0}"#),
            None
        );
    }
}
