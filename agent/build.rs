//! Embeds the service guest's program (`guest/ferry-guest.bin`, committed by the guest's build)
//! when it exists; otherwise an empty image, and creating a `service` VM without `program` then
//! fails with a clear message. Adding the image later: touch the workspace `Cargo.toml` (watched
//! while the image is missing) or `cargo clean -p ferry-agent`.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let image = manifest.join("../guest/ferry-guest.bin");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("guest_image.rs");
    let code = if image.is_file() {
        println!("cargo:rerun-if-changed={}", image.display());
        format!(
            "/// The service guest program embedded at build time.\npub const IMAGE: &[u8] = include_bytes!({:?});\n",
            image.canonicalize().unwrap_or(image.clone())
        )
    } else {
        println!(
            "cargo:rerun-if-changed={}",
            manifest.join("../Cargo.toml").display()
        );
        "/// This build has no embedded service guest program.\npub const IMAGE: &[u8] = &[];\n"
            .to_string()
    };
    println!("cargo:rerun-if-changed=build.rs");
    std::fs::write(&out, code).expect("write OUT_DIR/guest_image.rs");
}
