//! The CUDA kernel sources, run on the CPU: `tests/cuda_emu/*.cpp` include a
//! kernel file after `emu.h` (threads, barriers, warp collectives) and
//! `ptx_emu.h` (ldmatrix, mma.sync, cp.async), launch its kernels with the
//! launchers' grids and check them against an f64 reference. This is how the
//! tensor-core paths are checked on a machine without a GPU; the GPU tests in
//! the other files remain the word on real hardware.
//!
//! Needs a C++20 compiler (`CXX`, else `c++`) and the toolkit headers build.rs
//! found beside nvcc. Missing either is a skip, or a failure when
//! `FRUGAL_REQUIRE` names `nvcc`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn required() -> bool {
    std::env::var("FRUGAL_REQUIRE").is_ok_and(|v| v.split(',').any(|s| s.trim().eq_ignore_ascii_case("nvcc")))
}

fn skip_or_fail(test: &str, why: &str) {
    assert!(!required(), "FRUGAL_REQUIRE contains nvcc, but {test} cannot run: {why}");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test} (CUDA emulator): {why}");
}

/// Compiles `tests/cuda_emu/<name>.cpp` and runs it with `args`; `None` when skipped.
fn compile_and_run(name: &str, args: &[&str]) -> Option<String> {
    let Some(include) = option_env!("FRUGAL_CUDA_INCLUDE") else {
        skip_or_fail(name, "build.rs found no CUDA toolkit headers (cuda_fp16.h) beside nvcc");
        return None;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/cuda_emu");
    let exe: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cuda_emu_{name}"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let compiled = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-w"])
        .arg(format!("-I{}", dir.display()))
        .arg(format!("-I{}", root.join("kernels-cuda").display()))
        .arg(format!("-I{include}"))
        .arg(dir.join(format!("{name}.cpp")))
        .arg("-o")
        .arg(&exe)
        .output();
    let compiled = match compiled {
        Ok(out) => out,
        Err(e) => {
            skip_or_fail(name, &format!("running the C++ compiler `{cxx}`: {e}"));
            return None;
        }
    };
    assert!(
        compiled.status.success(),
        "{cxx} failed on tests/cuda_emu/{name}.cpp:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let run = Command::new(&exe).args(args).output().expect("running the emulated kernels");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "emulated kernels of tests/cuda_emu/{name}.cpp disagree with the reference:\n{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    Some(stdout)
}

#[test]
fn blockwise_kernels_on_the_emulator() {
    if let Some(out) = compile_and_run("blockwise", &[]) {
        // Every case printed a line, and none failed (the exit status says so too).
        assert!(out.lines().filter(|l| l.starts_with("ok")).count() > 100, "{out}");
        assert!(out.trim_end().ends_with("0 failure(s)"), "{out}");
    }
}

#[test]
fn decode_and_crosslayer_kernels_on_the_emulator() {
    if let Some(out) = compile_and_run("decode", &[]) {
        assert!(out.lines().filter(|l| l.starts_with("ok")).count() > 80, "{out}");
        assert!(out.trim_end().ends_with("0 failure(s)"), "{out}");
    }
}

#[test]
fn topk_kernel_on_the_emulator() {
    if let Some(out) = compile_and_run("topk", &[]) {
        assert!(out.lines().filter(|l| l.starts_with("ok")).count() >= 54, "{out}");
        assert!(out.trim_end().ends_with("0 failure(s)"), "{out}");
    }
}
