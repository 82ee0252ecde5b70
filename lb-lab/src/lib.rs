//! xlb's test and demo tooling, kept out of the `xlb` binary an operator installs: the network
//! lab of namespaces (`lab`, used by `cargo xtask demo` and the namespace tests), the packet
//! builder the packet tests use (`packet`), and the benchmark wrapper (`bench`). The kernel
//! and namespace tests live in this crate's `tests/`.

pub mod bench;
pub mod lab;
pub mod packet;
