//! Generates the raw Corosync bindings with bindgen over `wrapper.h` and links the five client libraries.

use std::env;
use std::path::PathBuf;

/// pkg-config names of the libraries (Debian ships a .pc file for each).
const LIBRARIES: [&str; 5] = ["libcpg", "libquorum", "libvotequorum", "libcmap", "libcfg"];

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");

    let mut include_paths = Vec::new();
    for lib in LIBRARIES {
        match pkg_config::Config::new().probe(lib) {
            Ok(found) => include_paths.extend(found.include_paths),
            // No .pc file: link by the plain library name and rely on the default include path.
            Err(_) => println!("cargo:rustc-link-lib={}", lib.trim_start_matches("lib")),
        }
    }

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .allowlist_function("cpg_.*")
        .allowlist_function("quorum_.*")
        .allowlist_function("votequorum_.*")
        .allowlist_function("cmap_.*")
        .allowlist_function("corosync_cfg_.*")
        .allowlist_type("cs_.*")
        .allowlist_type("cpg_.*")
        .allowlist_type("quorum_.*")
        .allowlist_type("votequorum_.*")
        .allowlist_type("cmap_.*")
        .allowlist_type("corosync_cfg_.*")
        .allowlist_var("CS_.*")
        .allowlist_var("CPG_.*")
        .allowlist_var("QUORUM_.*")
        .allowlist_var("VOTEQUORUM_.*")
        .allowlist_var("CMAP_.*")
        // Plain integer constants for the C enums keep the safe layer's conversions explicit.
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .generate_comments(false);
    for path in &include_paths {
        builder = builder.clang_arg(format!("-I{}", path.display()));
    }
    let bindings = builder
        .generate()
        .expect("bindgen over the Corosync headers (are libcpg-dev ... libcfg-dev and libclang-dev installed?)");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing the generated bindings");
}
