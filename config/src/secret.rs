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

/// Largest secret file read (keys are a few hundred bytes; PEM chains a few KiB).
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Read a secret file (master key, JWT signing key, TLS private keys), refusing one that group or
/// others can read. The mode is checked on the opened file, so the file read is the one checked.
pub fn read_secret_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let io = |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
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
    if meta.len() > MAX_SECRET_FILE_BYTES {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_SECRET_FILE_BYTES} bytes; not a secret file"),
        )));
    }
    let mut text = String::new();
    file.take(MAX_SECRET_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(io)?;
    Ok(text.trim().to_string())
}

/// Create a directory (and its parents) that only its owner can enter (0700 on Unix), for
/// directories that hold secrets or data.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
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

    /// A world-readable key file (0644, as `cp` or an editor may leave it) is refused with an
    /// error that names the file and the fix; a private directory is 0700.
    #[cfg(unix)]
    #[test]
    fn refuses_world_readable_key_file_and_makes_private_dirs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("node.key");
        std::fs::write(&p, "-----BEGIN PRIVATE KEY-----").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = read_secret_file(&p).expect_err("insecure");
        assert_eq!(e.kind(), "insecure_secret");
        let msg = e.to_string();
        assert!(msg.contains("node.key") && msg.contains("644") && msg.contains("chmod 600"));
        let big = dir.path().join("big.key");
        write_secret_file(&big, &"a".repeat(70_000)).expect("write");
        assert!(read_secret_file(&big).is_err(), "oversized secret refused");
        let d = dir.path().join("a/b");
        create_private_dir(&d).expect("mkdir");
        let mode = std::fs::metadata(&d).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
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
