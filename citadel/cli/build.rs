//! Lays out the `citadel` binary's code with the functions a node runs first.
//!
//! An idle `citadel up` keeps resident every 64 KB window of its code that start-up, joining
//! and idling touched (the kernel maps file pages around each fault), and those functions lie
//! spread over the whole `.text`. `hot-symbols.txt` lists them (`./bench.sh hot-symbols`
//! regenerates it from a callgrind run of `citadel up`); the linker puts them first, so the
//! rest of the code is never mapped. The names carry hashes of one build: this toolchain, this
//! `Cargo.lock`, and `citadel-cli` built on its own (`cargo build --release -p citadel-cli`;
//! built together with other packages, cargo unifies the dependencies' features and the hashes
//! change). Names the build does not define are skipped: a stale list costs memory, never
//! correctness.
//!
//! Only for release builds on x86_64 Linux, where rustc links with its own lld (the only
//! linker here that takes `--symbol-ordering-file`). A build that picks its own linker
//! (`-C linker=…`, `-C linker-flavor=…`, `-C link-self-contained=…`) or sets
//! `CITADEL_NO_SYMBOL_ORDER` links without it.

fn main() {
    println!("cargo:rerun-if-changed=hot-symbols.txt");
    println!("cargo:rerun-if-env-changed=CITADEL_NO_SYMBOL_ORDER");
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let own_linker = env("CARGO_ENCODED_RUSTFLAGS").split('\x1f').any(|f| f.contains("link"))
        || std::env::var_os("RUSTC_LINKER").is_some();
    if env("TARGET") != "x86_64-unknown-linux-gnu"
        || env("PROFILE") != "release"
        || own_linker
        || std::env::var_os("CITADEL_NO_SYMBOL_ORDER").is_some()
    {
        return;
    }
    let list = std::path::Path::new(&env("CARGO_MANIFEST_DIR")).join("hot-symbols.txt");
    if list.is_file() {
        println!("cargo:rustc-link-arg-bin=citadel=-Wl,--symbol-ordering-file={}", list.display());
        println!("cargo:rustc-link-arg-bin=citadel=-Wl,--no-warn-symbol-ordering");
    }
}
