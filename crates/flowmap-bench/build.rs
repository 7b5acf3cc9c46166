//! Compiles the benchmark's reference BPF programs (bpf/*.bpf.c) with
//! clang and generates their skeletons. Nothing compiled is committed.
use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let clang = env::var("BPF_CLANG").unwrap_or_else(|_| "clang".to_string());
    let mut args = vec!["-Wall".to_string(), "-mcpu=v3".to_string()];
    // Debian keeps <asm/types.h> under the multiarch directory.
    if let Ok(o) = std::process::Command::new("gcc")
        .arg("-print-multiarch")
        .output()
    {
        let triple = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if !triple.is_empty() {
            args.push(format!("-I/usr/include/{triple}"));
        }
    }
    for name in ["floor", "min_counter", "trace_floor"] {
        let src = format!("bpf/{name}.bpf.c");
        if let Err(e) = SkeletonBuilder::new()
            .source(&src)
            .clang(&clang)
            .clang_args(args.iter().map(String::as_str))
            .build_and_generate(out.join(format!("{name}.skel.rs")))
        {
            panic!("building {src} failed: {e:#} (run scripts/setup.sh for clang and libbpf-dev)");
        }
        println!("cargo:rerun-if-changed={src}");
    }
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
}
