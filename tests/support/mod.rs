//! Shared by the tests that run the example programs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Builds example `name` with the cargo and profile running this test and
/// returns the executable cargo reports (so a stale binary is never run).
pub fn build_example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .args(["build", "--example", name, "--message-format=json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit());
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let output = build.output().expect("run cargo build --example");
    assert!(
        output.status.success(),
        "cargo build --example {name} failed: {}",
        output.status
    );
    let name_field = format!("\"name\":\"{name}\"");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter(|l| l.contains(&name_field))
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + l[start..].find('"')?;
            Some(PathBuf::from(&l[start..end]))
        })
        .unwrap_or_else(|| panic!("cargo reports the executable of example {name}"))
}
