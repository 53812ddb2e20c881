//! Compiles `kernels-cuda/*.cu` into one fatbin with nvcc (when nvcc exists) and
//! validates `kernels-wgsl/*.wgsl` with naga. Reruns only when a kernel file,
//! this script or one of the variables below changes.
//!
//! Variables: `NVCC` (the compiler), `CUDA_HOME` / `CUDA_PATH`,
//! `FRUGAL_CUDA_ARCHS` (comma list of `sm_XX` / `compute_XX`, default
//! `sm_80,sm_90a,compute_80`), `FRUGAL_CUDA_PIP_DIR` (where `.ci/run` installs
//! the pip toolkit), `FRUGAL_REQUIRE` (containing `nvcc`: no compiler or a
//! compile error fails the build instead of warning).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "sm_80,sm_90a,compute_80";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "FRUGAL_CUDA_ARCHS", "FRUGAL_CUDA_PIP_DIR", "FRUGAL_REQUIRE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    validate_wgsl(&root.join("kernels-wgsl"));
    build_cuda(&root.join("kernels-cuda"), &out);
}

/// Files in `dir` with extension `ext`, sorted, each registered for rerun.
fn kernel_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    files
}

/// Every kernel file is compiled as `common.wgsl` followed by itself, as the
/// wgpu backend does at run time, with only the capability `unpack2x16float`
/// needs (downlevel SHADER_F16_IN_F32, which lavapipe and Mesa GL have).
fn validate_wgsl(dir: &Path) {
    let common_path = dir.join("common.wgsl");
    println!("cargo:rerun-if-changed={}", common_path.display());
    let common = fs::read_to_string(&common_path).expect("kernels-wgsl/common.wgsl");
    for file in kernel_files(dir, "wgsl") {
        if file == common_path {
            continue;
        }
        let src = format!("{common}\n{}", fs::read_to_string(&file).unwrap());
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("WGSL error in {name} (after common.wgsl):\n{}", e.emit_to_string(&src)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("WGSL validation error in {name}:\n{}", e.emit_to_string(&src)));
    }
}

fn require_nvcc() -> bool {
    env::var("FRUGAL_REQUIRE").is_ok_and(|v| v.split(',').any(|s| s.trim().eq_ignore_ascii_case("nvcc")))
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> =
        env::var_os("PATH").map(|p| env::split_paths(&p).map(|d| d.join("nvcc")).collect()).unwrap_or_default();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            candidates.push(PathBuf::from(home).join("bin/nvcc"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.push(pip_toolkit_dir().join("nvidia/cu13/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file())
}

/// Where `.ci/run` installs the CUDA compiler wheels; keep the two in agreement.
fn pip_toolkit_dir() -> PathBuf {
    if let Some(dir) = env::var_os("FRUGAL_CUDA_PIP_DIR") {
        return PathBuf::from(dir);
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("frugal-attn/cuda-13.0")
}

fn gencode_flags() -> Vec<String> {
    let archs = env::var("FRUGAL_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    archs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| match (a.strip_prefix("sm_"), a.strip_prefix("compute_")) {
            (Some(n), _) => format!("-gencode=arch=compute_{n},code=sm_{n}"),
            (_, Some(n)) => format!("-gencode=arch=compute_{n},code=compute_{n}"),
            _ => panic!("FRUGAL_CUDA_ARCHS: `{a}` is neither sm_XX nor compute_XX"),
        })
        .collect()
}

fn build_cuda(dir: &Path, out: &Path) {
    let fatbin = out.join("frugal_attn.fatbin");
    let sources = kernel_files(dir, "cu");
    kernel_files(dir, "cuh"); // headers: registered for rerun only
    let status = match compile_cuda(dir, &sources, out, &fatbin) {
        Ok(status) => status,
        Err(why) => {
            if require_nvcc() {
                panic!("FRUGAL_REQUIRE contains nvcc, but the CUDA kernels did not build: {why}");
            }
            println!(
                "cargo:warning=frugal-attn: CUDA kernels not compiled ({why}); the CUDA backend will be unavailable"
            );
            fs::write(&fatbin, []).unwrap();
            why.lines().next().unwrap_or("not compiled").to_string()
        }
    };
    println!("cargo:rustc-env=FRUGAL_CUDA_BUILD={status}");
}

fn compile_cuda(dir: &Path, sources: &[PathBuf], out: &Path, fatbin: &Path) -> Result<String, String> {
    let nvcc = find_nvcc().ok_or_else(|| {
        "nvcc not found (looked at NVCC, PATH, CUDA_HOME, CUDA_PATH, /usr/local/cuda, and the .ci/run pip toolkit)"
            .to_string()
    })?;
    // One translation unit, so one fatbin holds every kernel.
    let unit = out.join("frugal_attn_kernels.cu");
    let includes: String = sources.iter().map(|s| format!("#include \"{}\"\n", s.display())).collect();
    fs::write(&unit, includes).unwrap();
    let output = Command::new(&nvcc)
        .args(["-fatbin", "-O3", "-std=c++17", "--threads", "0"])
        .args(gencode_flags())
        .arg(format!("-I{}", dir.display()))
        .arg("-o")
        .arg(fatbin)
        .arg(&unit)
        .output()
        .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed:\n{}{}",
            nvcc.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(format!("compiled by {}", nvcc.display()))
}
