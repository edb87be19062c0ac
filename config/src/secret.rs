//! Secrets: from an environment variable, or from a file that only its owner can read.

use std::path::Path;

use crate::ConfigError;

/// Environment variable that overrides the master key file.
pub const ENV_MASTER_KEY: &str = "SWARM_MASTER_KEY";
/// Environment variable that overrides the JWT signing key file.
pub const ENV_JWT_SIGNING_KEY: &str = "SWARM_JWT_SIGNING_KEY";

/// Read a secret: the environment variable `env` wins when set and non-empty; otherwise the file,
/// which must exist and must not be readable by group or others. Surrounding whitespace is trimmed.
pub fn read_secret(name: &str, env: &str, path: &Path) -> Result<String, ConfigError> {
    if let Ok(v) = std::env::var(env) {
        let v = v.trim();
        if !v.is_empty() {
            return Ok(v.to_string());
        }
    }
    read_secret_file(path).map_err(|e| match e {
        ConfigError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ConfigError::MissingSecret {
                name: name.to_string(),
                env: env.to_string(),
                path: path.to_path_buf(),
            }
        }
        other => other,
    })
}

/// Read a secret file, refusing one that group or others can read.
pub fn read_secret_file(path: &Path) -> Result<String, ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ConfigError::InsecureSecret {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = std::fs::read_to_string(path).map_err(io)?;
    Ok(text.trim().to_string())
}

/// Write a secret file with mode 0600 (created that way, never briefly world-readable).
pub fn write_secret_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_group_readable_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k");
        write_secret_file(&p, "abc").expect("write");
        assert_eq!(read_secret_file(&p).expect("read"), "abc");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).expect("chmod");
            let e = read_secret_file(&p).expect_err("insecure");
            assert_eq!(e.kind(), "insecure_secret");
        }
    }

    #[test]
    fn missing_file_names_env_var() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = read_secret(
            "master key",
            "SWARM_TEST_UNSET_VAR",
            &dir.path().join("nope"),
        )
        .expect_err("missing");
        assert_eq!(e.kind(), "missing_secret");
        assert!(e.to_string().contains("SWARM_TEST_UNSET_VAR"));
    }
}
