//! Compiles the kernel program (bpf/*.bpf.c) with clang and generates the
//! libbpf-rs skeletons. Nothing compiled is ever committed.
use std::env;
use std::path::PathBuf;
use std::process::Command;

use libbpf_cargo::SkeletonBuilder;

fn multiarch_include() -> Option<String> {
    // Debian keeps <asm/types.h> under the multiarch directory.
    let out = Command::new("gcc").arg("-print-multiarch").output().ok()?;
    let triple = String::from_utf8(out.stdout).ok()?.trim().to_string();
    if triple.is_empty() {
        return None;
    }
    Some(format!("-I/usr/include/{triple}"))
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let mut args = vec![
        "-Wall".to_string(),
        "-mcpu=v3".to_string(),
        "-Ibpf".to_string(),
    ];
    if let Some(inc) = multiarch_include() {
        args.push(inc);
    }
    let clang = env::var("BPF_CLANG").unwrap_or_else(|_| "clang".to_string());

    let src = "bpf/flows.bpf.c";
    if let Err(e) = SkeletonBuilder::new()
        .source(src)
        .clang(&clang)
        .clang_args(args.iter().map(String::as_str))
        .build_and_generate(out.join("flows.skel.rs"))
    {
        panic!(
            "building {src} failed: {e:#}\n\
             (clang, libbpf-dev and linux-libc-dev are needed: run scripts/setup.sh)"
        );
    }
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=bpf/flows.h");
    println!("cargo:rerun-if-changed=bpf/names.bpf.h");
    println!("cargo:rerun-if-changed=bpf/procs.bpf.h");

    // The map page embeds its graph library, installed from the npm
    // registry by scripts/setup.sh (npm ci in web/), never committed.
    let cyto = "web/node_modules/cytoscape/dist/cytoscape.min.js";
    if !std::path::Path::new(cyto).exists() {
        panic!("{cyto} is missing: run scripts/setup.sh (it runs `npm ci` in web/)");
    }
    println!("cargo:rerun-if-changed={cyto}");
    println!("cargo:rerun-if-env-changed=BPF_CLANG");

    // `flowmap --version`, /metrics (flowmap_build_info) and the image
    // labels name the commit built; FLOWMAP_GIT_COMMIT overrides it (a
    // source tarball has no .git).
    println!("cargo:rustc-env=FLOWMAP_GIT_COMMIT={}", git_commit());
    println!("cargo:rerun-if-env-changed=FLOWMAP_GIT_COMMIT");
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// The short commit of HEAD, "unknown" outside git. The build script runs
/// again when HEAD moves: HEAD itself (a checkout) and the branch it names
/// (a commit), in a worktree too.
fn git_commit() -> String {
    if let Ok(c) = env::var("FLOWMAP_GIT_COMMIT") {
        return c;
    }
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for r in watch {
        if let Some(path) = git(&["rev-parse", "--git-path", &r]) {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    commit
}
