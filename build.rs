//! Link-time settings for the `latssiam-bridge` binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        // Packed relative relocations (DT_RELR; glibc 2.36, binutils 2.38):
        // the relocation table every start reads shrinks from about 1 MB to
        // a few KB, which is that much less resident in every process
        // (measured beside Dovecot, docs/PERFORMANCE.md).
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
