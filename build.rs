//! Link settings of the `outpost` executable (issue 15; docs/benchmarks.md, "Footprint:
//! binary size" and "Footprint: memory"). Only the executable is affected: the library,
//! the tests and the benchmarks link as before.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && target_env == "gnu" {
        // Relative relocations packed as RELR: the position-independent executable keeps
        // its ASLR, and `.rela.dyn` shrinks from about 460 KiB (read by the dynamic loader
        // at every start, so resident) to a few KiB. Needs glibc 2.36 at run time (Debian
        // 12 and Raspberry Pi OS bookworm; the package's Depends says so) and binutils
        // 2.38 or lld 15 at link time.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    // The release executable without symbols (what `strip = "symbols"` would do, but
    // without changing the crates' symbol names: see the release profile in Cargo.toml).
    // scripts/link-order keeps them (OUTPOST_KEEP_SYMBOLS=1) to read which functions run.
    println!("cargo:rerun-if-env-changed=OUTPOST_KEEP_SYMBOLS");
    if env::var("PROFILE").is_ok_and(|p| p == "release")
        && env::var("OUTPOST_KEEP_SYMBOLS").map_or(true, |v| v != "1")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,--strip-all");
    }
    link_order();
}

/// The functions an agent runs at start and while idle first in `.text`
/// (`link/outpost.order`, written by `scripts/link-order`): the kernel maps 64 KiB around
/// every fault of the executable, so the same code spread over the whole `.text` costs
/// several MiB more resident memory. Only where the linker is rustup's lld (the default
/// for x86_64 Linux since Rust 1.90), only for release builds, and not with
/// `OUTPOST_LINK_ORDER=off`. Names the file has that a build lacks are skipped silently:
/// a stale file costs memory, never correctness.
fn link_order() {
    println!("cargo:rerun-if-changed=link/outpost.order");
    println!("cargo:rerun-if-env-changed=OUTPOST_LINK_ORDER");
    let order = Path::new(env!("CARGO_MANIFEST_DIR")).join("link/outpost.order");
    let target = env::var("TARGET").unwrap_or_default();
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if env::var("OUTPOST_LINK_ORDER").is_ok_and(|v| v == "off")
        || env::var("PROFILE").is_ok_and(|p| p != "release")
        || target != "x86_64-unknown-linux-gnu"
        || flags.contains("linker")
        || !order.is_file()
        || !rustup_lld(&target)
    {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={},--no-warn-symbol-ordering",
        order.display()
    );
}

/// Whether rustc links with its own lld: rustup's toolchains ship it beside the standard
/// library (`lib/rustlib/<target>/bin/gcc-ld/ld.lld`); Debian's rustc links with the
/// system's linker, which has no symbol ordering.
fn rustup_lld(target: &str) -> bool {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib")
        .join(target)
        .join("bin/gcc-ld/ld.lld")
        .is_file()
}
