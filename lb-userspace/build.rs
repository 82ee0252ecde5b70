//! Embeds the XDP objects built by `cargo xtask build` (lb-ebpf cannot be a normal dependency:
//! it builds for another target with nightly and bpf-linker).

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    for (env, name) in [
        ("XLB_BPF_OBJECT", "xlb"),
        ("XLB_AUX_OBJECT", "xlb-aux"),
        ("XLB_DECAP_OBJECT", "xlb-decap"),
    ] {
        let object = manifest.join(format!("../target/bpf/{name}.bpf.o"));
        println!("cargo:rerun-if-changed={}", object.display());
        if !object.exists() {
            panic!(
                "the XDP object {} is missing: run `cargo xtask build` first (it builds lb-ebpf \
                 for bpfel-unknown-none and then xlb)",
                object.display()
            );
        }
        println!("cargo:rustc-env={env}={}", object.display());
    }
}
