//! schemathesis against a live node: every operation of `/openapi.json` is called with data
//! generated from its description (valid and invalid), over HTTPS with the cluster CA, as an
//! admin, and no call may end in a server error.
//!
//! A 503 is this API's answer for "what this needs is not reachable now" (no peer to confirm a
//! `w=2` write, no actor session to the pinged node), which a lone node gives by design; the
//! audit log tells each 503's code, and only those codes are let through. Any other 5xx fails,
//! and so does an answer whose status, content type or body its description does not list.
//!
//! Needs the `schemathesis` CLI (v4): `pip install --break-system-packages schemathesis`
//! (`.ci/run` installs it). `SCHEMATHESIS` names another binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use swarm_tests::{NodeProc, init_cluster, token};

/// The version `.ci/run` installs.
const VERSION: &str = "4.32.5";

/// The 503 codes a lone node gives by design.
const EXPECTED_503: [&str; 4] = [
    "no_replica",
    "replication_timeout",
    "unavailable",
    "timeout",
];

/// The whole run's limit (it takes well under a minute).
const RUN_LIMIT: Duration = Duration::from_secs(240);

/// The schemathesis CLI: `$SCHEMATHESIS`, else `schemathesis` on `PATH`.
fn schemathesis() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SCHEMATHESIS") {
        return Ok(PathBuf::from(p));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("schemathesis"))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "the schemathesis CLI is not on PATH: install it with \
                 `pip install --break-system-packages schemathesis=={VERSION}` \
                 (or set SCHEMATHESIS to its path)"
            )
        })
}

/// Run `cmd` to its end or kill it after `limit`; its stdout and stderr go to `log`.
fn run_within(mut cmd: Command, log: &Path, limit: Duration) -> Result<(bool, String)> {
    let out = std::fs::File::create(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("start schemathesis")?;
    let deadline = Instant::now() + limit;
    let ok = loop {
        if let Some(status) = child.try_wait()? {
            break status.success();
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            bail!(
                "schemathesis ran longer than {limit:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Ok((ok, std::fs::read_to_string(log)?))
}

#[test]
fn schemathesis_finds_no_server_error() -> Result<()> {
    let bin = schemathesis()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("cluster");
    let configs = init_cluster(&dir, 1)?;
    let node = NodeProc::start(&configs[0])?;
    let ca = node.ca.clone().context("swarm init configures HTTPS")?;
    let admin = token(&dir, "schemathesis", "admin")?;

    let config = tmp.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "[checks.not_a_server_error]\nexpected-statuses = [\"2xx\", \"3xx\", \"4xx\", \"503\"]\n",
    )?;
    let mut cmd = Command::new(&bin);
    cmd.current_dir(tmp.path())
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("{}/openapi.json", node.url)])
        // And every answer matches its description (status, content type, body schema), so the
        // schema-only types of `/openapi.json` cannot drift from the JSON the handlers build.
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_schema_conformance",
        ])
        // Leaving would stop the node under test; the event stream never ends (it is tested
        // in the gateway's and the agents' tests).
        .args(["--exclude-path", "/v1/cluster/leave"])
        .args(["--exclude-path", "/v1/events"])
        .args(["-H", &format!("Authorization: Bearer {admin}")])
        .arg("--tls-verify")
        .arg(&ca)
        // One worker: hypothesis describes its strategies with `ast.parse`, which is not safe
        // to call from several threads at once on some Python versions (3.11: a spurious
        // `SystemError`, or a `KeyError` in its cache), failing the run for no fault of ours.
        .args(["--max-examples", "20", "--seed", "1", "--workers", "1"])
        .args(["--request-timeout", "10", "--generation-database", "none"])
        // The admin token above, not generated `Authorization` / `X-API-Key` values.
        .args(["--generation-with-security-parameters", "false"])
        .args(["--no-color"]);
    let (ok, output) = run_within(cmd, &tmp.path().join("schemathesis.log"), RUN_LIMIT)?;
    assert!(ok, "schemathesis found failures:\n{output}");

    // Each 503 the run provoked says which missing dependency it was.
    let c = node.client(&admin);
    let mut after = 0;
    let mut seen = 0;
    loop {
        let (s, page) = c.get(&format!("/v1/audit?after={after}&limit=1000"))?;
        assert_eq!(s, 200, "{page}");
        let entries = page["entries"].as_array().context("entries")?;
        let Some(last) = entries.last() else { break };
        for e in entries {
            let status = e["status"].as_u64().unwrap_or(0);
            assert!(status < 500 || status == 503, "a {status}: {e}");
            if status == 503 {
                let code = e["code"].as_str().unwrap_or("");
                assert!(EXPECTED_503.contains(&code), "an unexpected 503: {e}");
            }
        }
        seen += entries.len();
        after = last["seq"].as_u64().context("seq")?;
        // A short page is the last: reading on would chase the entries these reads audit.
        if entries.len() < 1000 {
            break;
        }
    }
    assert!(
        seen > 100,
        "the run made {seen} audited requests:\n{output}"
    );
    Ok(())
}
