//! The crate stays pure: nothing it depends on, directly or not, does I/O on its own.

#[test]
fn no_runtime_and_no_socket_in_the_dependency_tree() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "netlink-packet-ipvs",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("netlink-packet-core"), "not the crate's tree:\n{tree}");
    for banned in ["tokio", "netlink-sys", "mio", "futures", "async"] {
        let found: Vec<&str> = tree.lines().filter(|l| l.starts_with(banned)).collect();
        assert!(found.is_empty(), "netlink-packet-ipvs depends on {found:?}:\n{tree}");
    }
}
