//! The `swarm` command line as an operator meets it. (Also makes `cargo test` build the binary
//! that the `swarm-tests` crate spawns.)

use std::process::Command;

fn swarm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_swarm"))
        .args(args)
        .env("SWARM_LOG", "warn")
        .output()
        .expect("run swarm")
}

#[test]
fn help_lists_the_commands() {
    let out = swarm(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["up", "init", "node", "status", "token", "model", "audit"] {
        assert!(text.contains(cmd), "{cmd} in help");
    }
}

#[test]
fn init_token_and_their_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("c");
    let d = dir.to_str().expect("utf8 path");
    let out = swarm(&[
        "init",
        "--dir",
        d,
        "--nodes",
        "2",
        "--http-port",
        "28080",
        "--gossip-port",
        "27946",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("node-2/node.toml").exists());
    let again = swarm(&["init", "--dir", d]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a cluster"));

    let out = swarm(&[
        "token",
        "--dir",
        d,
        "--subject",
        "alice",
        "--role",
        "viewer",
    ]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split('.')
            .count(),
        3
    );
    let bad = swarm(&[
        "token",
        "--dir",
        d,
        "--subject",
        "alice",
        "--role",
        "emperor",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown role `emperor`"));
    let bad = swarm(&[
        "token",
        "--dir",
        d,
        "--subject",
        "alice",
        "--ttl",
        "forever",
    ]);
    assert!(!bad.status.success());
}

#[test]
fn node_refuses_insecure_key_file_and_busy_port() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("c");
    let d = dir.to_str().expect("utf8 path");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port().to_string();
    let out = swarm(&[
        "init",
        "--dir",
        d,
        "--http-port",
        &port,
        "--gossip-port",
        "27999",
    ]);
    assert!(out.status.success());
    let config = dir.join("node-1/node.toml");
    let c = config.to_str().expect("utf8 path");

    let out = swarm(&["node", "--config", c]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot bind the gateway"), "{err}");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.join("node-1/master.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let out = swarm(&["node", "--config", c]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("must not be readable by group or others"),
            "{err}"
        );
    }

    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[node]\nname = \"n\"\ndata_dir = \"d\"\ncolour = 1\n").expect("write");
    let out = swarm(&["node", "--config", bad.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("node.colour"));
}

#[test]
fn model_list_and_an_unknown_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path().to_str().expect("utf8 path");
    let out = swarm(&["model", "list", "--dir", d]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SmolLM2-135M-Instruct") && text.contains("not pulled"),
        "{text}"
    );
    let out = swarm(&["model", "pull", "no-such-model", "--dir", d]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown model `no-such-model`"), "{err}");
}
