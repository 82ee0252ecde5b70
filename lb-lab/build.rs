//! Embeds the benchmark wrapper's XDP object built by `cargo xtask build`.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = manifest.join("../target/bpf/xlb-bench.bpf.o");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "the XDP object {} is missing: run `cargo xtask build` first",
            object.display()
        );
    }
    println!("cargo:rustc-env=XLB_BENCH_OBJECT={}", object.display());
}
