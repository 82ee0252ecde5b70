//! `xlb announce --exabgp`: run as an ExaBGP `process`, it asks the daemon for readiness every
//! interval and prints `announce route A/32 next-hop self` for an address that became ready
//! (`/128` for IPv6) and `withdraw route ...` for one that stopped being (as `--announce bird`,
//! an address is ready while one of its VIPs is). A daemon that does not answer has nothing
//! ready. It stops when ExaBGP closes the pipe.

use std::{collections::BTreeSet, net::IpAddr, path::Path, time::Duration};

use super::{client::client_call, CliError, Io};
use crate::{
    api::{Op, Reply},
    daemon::announce::ready_addrs,
};

fn route(a: &IpAddr) -> String {
    match a {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// The lines that take ExaBGP from announcing `was` to announcing `now`.
pub fn lines(was: &BTreeSet<IpAddr>, now: &BTreeSet<IpAddr>) -> Vec<String> {
    let gone = was
        .difference(now)
        .map(|a| format!("withdraw route {} next-hop self", route(a)));
    let new = now
        .difference(was)
        .map(|a| format!("announce route {} next-hop self", route(a)));
    gone.chain(new).collect()
}

fn ready_now(socket: &Path) -> BTreeSet<IpAddr> {
    match client_call(socket, Op::Ready { vip: None }) {
        Ok(Some(Reply::Ready(r))) => ready_addrs(&r),
        _ => BTreeSet::new(),
    }
}

pub fn run(socket: &Path, interval: Duration, io: &mut Io<'_>) -> Result<(), CliError> {
    // ExaBGP answers every command on our standard input (`done`): read and drop it, so that
    // its pipe never fills, and stop when ExaBGP closes it.
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = closed.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let mut was = BTreeSet::new();
    loop {
        if closed.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let now = ready_now(socket);
        for line in lines(&was, &now) {
            // ExaBGP gone (a closed pipe): nothing is left to tell.
            if writeln!(io.stdout, "{line}").is_err() {
                return Ok(());
            }
        }
        if io.stdout.flush().is_err() {
            return Ok(());
        }
        was = now;
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_become_withdraw_then_announce_lines() {
        let set =
            |a: &[&str]| -> BTreeSet<IpAddr> { a.iter().map(|s| s.parse().expect("ip")).collect() };
        assert_eq!(
            lines(&set(&[]), &set(&["10.0.0.100", "2001:db8::1"])),
            vec![
                "announce route 10.0.0.100/32 next-hop self",
                "announce route 2001:db8::1/128 next-hop self"
            ]
        );
        assert_eq!(
            lines(
                &set(&["10.0.0.100", "10.0.0.101"]),
                &set(&["10.0.0.101", "10.0.0.102"])
            ),
            vec![
                "withdraw route 10.0.0.100/32 next-hop self",
                "announce route 10.0.0.102/32 next-hop self"
            ]
        );
        assert!(lines(&set(&["10.0.0.1"]), &set(&["10.0.0.1"])).is_empty());
    }
}
