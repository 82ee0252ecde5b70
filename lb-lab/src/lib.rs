//! xlb's test and demo tooling, kept out of the `xlb` binary an operator installs: the network
//! lab of namespaces (`lab`, used by `cargo xtask demo` and the namespace tests), the packet
//! builder the packet tests use (`packet`), the benchmark wrapper (`bench`), the benchmark's
//! budgets (`budget`), its control-path rows (`control`) and live-frames rows (`live`). The kernel and namespace tests
//! live in this crate's `tests/`.

pub mod bench;
pub mod budget;
pub mod control;
pub mod lab;
pub mod live;
pub mod packet;
