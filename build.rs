//! Build facts for `idalloc_build_info`'s labels: the git revision (or
//! `IDALLOC_BUILD_REVISION`, for builds outside a checkout), the compiler's
//! version, the target triple and the profile.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=IDALLOC_BUILD_REVISION");
    let revision = std::env::var("IDALLOC_BUILD_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(git_revision)
        .unwrap_or_else(|| "unknown".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=IDALLOC_BUILD_REVISION={revision}");
    println!("cargo:rustc-env=IDALLOC_BUILD_RUSTC={rustc_version}");
    println!("cargo:rustc-env=IDALLOC_BUILD_TARGET={target}");
    println!("cargo:rustc-env=IDALLOC_BUILD_PROFILE={profile}");
}

/// `git rev-parse --short=12 HEAD`, re-run whenever HEAD moves (its reflog is
/// appended on every commit and checkout, in a worktree too).
fn git_revision() -> Option<String> {
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let dir = PathBuf::from(git(&["rev-parse", "--absolute-git-dir"])?);
    for watched in ["HEAD", "logs/HEAD"] {
        if dir.join(watched).exists() {
            println!("cargo:rerun-if-changed={}", dir.join(watched).display());
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"])
}
