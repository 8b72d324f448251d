//! With the `cpu-variants` feature, llama.cpp and ggml are shared libraries and ggml's CPU
//! kernels are loadable modules, one per CPU level. llama-cpp-sys-2 leaves them in its build
//! directory (and links only the unversioned `.so` names beside the binaries, which point at
//! versioned files it does not place there), so a binary run outside `cargo run` / `cargo test`
//! would not start. This places the files the binaries load (by their sonames, as the binaries
//! name them) and the CPU modules beside the binaries and the test binaries, where the
//! `$ORIGIN` runpath (.cargo/config.toml) and `llama::backend` look for them: the profile
//! directory is then a deployable unit that can be copied to another machine as it is.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CPU_VARIANTS").is_none() {
        return;
    }
    // llama-cpp-sys-2 (`links = "llama"`) exports its backends directory; its libraries are
    // installed beside it, in lib/ (or lib64/).
    let Some(backends) = std::env::var_os("DEP_LLAMA_BACKENDS_DIR").map(PathBuf::from) else {
        panic!("llama-cpp-sys-2 did not export DEP_LLAMA_BACKENDS_DIR: was it built with dynamic-backends?");
    };
    let install = backends.parent().expect("backends dir has a parent").to_path_buf();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is <target>[/<triple>]/<profile>/build/<pkg>-<hash>/out.
    let profile_dir = out_dir.ancestors().nth(3).expect("OUT_DIR layout").to_path_buf();

    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for lib in ["lib", "lib64"] {
        for (path, name) in entries(&install.join(lib)) {
            // Sonames only (libllama.so.0): what the binaries' NEEDED entries ask for.
            if let Some((_, version)) = name.split_once(".so.") {
                if name.starts_with("lib") && !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit()) {
                    files.push((path, name));
                }
            }
        }
    }
    files.extend(entries(&backends).into_iter().filter(|(_, name)| name.ends_with(".so") && !LEFT_OUT_CPU_MODULES.contains(&name.as_str())));
    for dest_dir in [profile_dir.clone(), profile_dir.join("deps")] {
        std::fs::create_dir_all(&dest_dir).unwrap_or_else(|e| panic!("{}: {e}", dest_dir.display()));
        for name in LEFT_OUT_CPU_MODULES {
            // Placed by an earlier build: ggml would still find and prefer it.
            let _ = std::fs::remove_file(dest_dir.join(name));
        }
        for (src, name) in &files {
            println!("cargo:rerun-if-changed={}", src.display());
            place(src, &dest_dir.join(name));
        }
    }
}

/// CPU modules not placed, so ggml never loads them. `sapphirerapids` is the only one built
/// with ggml's AMX kernels, and on an AMX machine (Sapphire-Rapids-class Xeon) they score
/// SmolLM2's Q4_1 weights 0.3 nats away from llama-server's AVX-512 kernels on a single token
/// (tests/score_server.rs; the other modules agree within 3e-4), and crash llama-server itself
/// (llama.cpp issue 20824). Without it ggml picks `zen4`, the same ISA less AMX.
const LEFT_OUT_CPU_MODULES: &[&str] = &["libggml-cpu-sapphirerapids.so"];

/// The entries of `dir` (empty when it does not exist), with their file names.
fn entries(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<(PathBuf, String)> = rd.flatten().filter_map(|e| e.file_name().into_string().ok().map(|n| (e.path(), n))).collect();
    v.sort();
    v
}

/// `dest` becomes the file `src` resolves to: a hard link when possible (no extra disk), else a
/// copy; replaced through a temporary name so a concurrent reader never sees half a library.
fn place(src: &Path, dest: &Path) {
    let real = std::fs::canonicalize(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    #[cfg(unix)]
    if let (Ok(a), Ok(b)) = (std::fs::metadata(&real), std::fs::metadata(dest)) {
        use std::os::unix::fs::MetadataExt;
        if a.ino() == b.ino() && a.dev() == b.dev() {
            return;
        }
    }
    let tmp = dest.with_extension("d2c-tmp");
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(&real, &tmp).is_err() {
        std::fs::copy(&real, &tmp).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", real.display(), tmp.display()));
    }
    // A dangling symlink left by llama-cpp-sys-2 under the same name is replaced too.
    std::fs::rename(&tmp, dest).unwrap_or_else(|e| panic!("{}: {e}", dest.display()));
}
