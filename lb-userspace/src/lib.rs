//! xlb's userspace: the desired-state model (`balancer`), Maglev, the `Dataplane` seam between
//! them and the kernel maps, and the aya implementation of that seam.

pub mod api;
pub mod balancer;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod ebpf;
pub mod lab;
pub mod maglev;
pub mod neigh;
pub mod packet;
pub mod state;
