//! Embeds the dashboard in the binary: the project's own files from `web/src`
//! and the dist files of the map and chart libraries from `web/node_modules`.
//!
//! `npm ci` runs in `web/` when its `node_modules` is missing (a fresh clone),
//! so the libraries come from the npm registry at the versions pinned in
//! `web/package-lock.json`. Without npm the build still succeeds: the page is
//! embedded without the libraries and says so.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (served path under /dashboard/, file under web/node_modules)
const LIBRARIES: &[(&str, &str)] = &[
    ("vendor/leaflet.js", "leaflet/dist/leaflet.js"),
    ("vendor/leaflet.css", "leaflet/dist/leaflet.css"),
    ("vendor/uPlot.iife.min.js", "uplot/dist/uPlot.iife.min.js"),
    ("vendor/uPlot.min.css", "uplot/dist/uPlot.min.css"),
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let web = manifest.join("../../web");
    let src = web.join("src");
    let modules = web.join("node_modules");
    println!("cargo:rerun-if-changed={}", src.display());
    println!(
        "cargo:rerun-if-changed={}",
        web.join("package-lock.json").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        modules.join(".package-lock.json").display()
    );
    println!("cargo:rerun-if-env-changed=BOROUGH_WEB_SKIP_NPM");

    if !modules.join(".package-lock.json").exists()
        && std::env::var_os("BOROUGH_WEB_SKIP_NPM").is_none()
    {
        npm_ci(&web);
    }

    let mut files: Vec<(String, PathBuf)> = Vec::new();
    collect(&src, &src, &mut files);
    let mut missing = Vec::new();
    for (served, dist) in LIBRARIES {
        let path = modules.join(dist);
        if path.is_file() {
            println!("cargo:rerun-if-changed={}", path.display());
            files.push((served.to_string(), path));
        } else {
            missing.push(*dist);
        }
    }
    if !missing.is_empty() {
        println!(
            "cargo:warning=dashboard libraries missing ({}); run `npm ci` in web/ and rebuild, the page will say the map library is missing",
            missing.join(", ")
        );
    }
    files.sort();

    let mut code = String::from("/// Embedded dashboard files: (path under /dashboard/, bytes).\n");
    code.push_str("pub static ASSETS: &[(&str, &[u8])] = &[\n");
    for (served, path) in &files {
        let abs = path.canonicalize().unwrap_or_else(|_| path.clone());
        let _ = writeln!(
            code,
            "    ({served:?}, include_bytes!({:?})),",
            abs.display().to_string()
        );
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("assets.rs");
    std::fs::write(&out, code).expect("cannot write assets.rs");
}

fn npm_ci(web: &Path) {
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(web)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => println!(
            "cargo:warning=`npm ci` in web/ failed ({s}); the dashboard is built without its libraries"
        ),
        Err(e) => println!(
            "cargo:warning=cannot run npm ({e}); the dashboard is built without its libraries"
        ),
    }
}

/// Every file under `dir` (no dot-files), with its path relative to `root`.
fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect(root, &path, out);
        } else if let Ok(rel) = path.strip_prefix(root) {
            let rel = rel.to_string_lossy().replace('\\', "/");
            out.push((rel, path));
        }
    }
}
