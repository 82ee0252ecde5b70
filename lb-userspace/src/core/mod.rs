//! The control logic, pure and testable without a kernel: the `Balancer` (desired state,
//! validation as a whole, id allocation and quarantine, ordered map writes through the
//! `Dataplane` trait), Maglev, the config file (read, render, diff, ipvsadm import) and the
//! daemon's persisted state. Nothing here talks to aya or the network.

pub mod balancer;
pub mod clock;
pub mod config;
pub mod maglev;
pub mod state;
