//! xlb's userspace, in parts that depend on each other one way only:
//!
//! - `model`: VIPs, flags, weights, addresses, MACs (pure types and parsing);
//! - `core`: the `Balancer` (desired state, validation, ids, map writes), Maglev, the config
//!   file and its diff, the ipvsadm import, the persisted state;
//! - `dataplane`: the `Dataplane` trait the balancer writes through, its aya implementation
//!   (`dataplane::ebpf`) and the kernel's neighbour table (`dataplane::neigh`);
//! - `daemon`: `xlb daemon` (start-up and adoption, the control socket, request handlers,
//!   MAC refresh), over `core` and `dataplane`;
//! - `api`: the control socket's protocol, shared by the daemon and the CLI;
//! - `cli`: the `xlb` command line.
//!
//! The namespace lab, the packet builder and the benchmark are not here: they live in the
//! `lb-lab` crate, so that the `xlb` binary carries none of them.

pub mod api;
pub mod cli;
pub mod core;
pub mod daemon;
pub mod dataplane;
pub mod model;
