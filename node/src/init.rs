//! `swarm init`: the cluster CA, one folder per node, the JWT signing key and an admin token.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use swarm_config::SwarmFile;
use swarm_config::secret::write_secret_file;
use swarm_storage::SecretKey;

use crate::jwt::{self, Claims};

/// What `init` is asked for.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub dir: PathBuf,
    pub nodes: u16,
    pub host: IpAddr,
    pub gossip_port: u16,
    pub http_port: u16,
    /// Models every node serves (catalog names, pulled into `dir/models`).
    pub models: Vec<String>,
}

/// Write a new cluster into `opts.dir`. Refuses to overwrite an existing one.
pub fn init_cluster(opts: &InitOptions) -> Result<Vec<PathBuf>> {
    if opts.nodes == 0 || opts.nodes > 1000 {
        bail!("--nodes must be between 1 and 1000");
    }
    let last = u32::from(opts.nodes) - 1;
    if u32::from(opts.gossip_port) + last > 65535 || u32::from(opts.http_port) + last > 65535 {
        bail!("ports out of range for {} nodes", opts.nodes);
    }
    let dir = &opts.dir;
    if dir.join("ca.pem").exists() {
        bail!(
            "{} already holds a cluster (ca.pem exists); choose another --dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;

    // Cluster CA.
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "swarm cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    write_secret_file(&dir.join("ca.key"), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    // JWT signing key.
    let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    write_secret_file(&dir.join("jwt.key"), &hex::encode(signing.to_bytes()))?;
    std::fs::write(
        dir.join("jwt.pub"),
        format!("{}\n", hex::encode(signing.verifying_key().to_bytes())),
    )?;

    // The swarm file, for operators to edit.
    std::fs::write(dir.join("swarm-config.json"), SwarmFile::preset_text())?;

    let gossip = |k: u16| SocketAddr::new(opts.host, opts.gossip_port + k - 1);
    let mut configs = Vec::new();
    for k in 1..=opts.nodes {
        let name = format!("node-{k}");
        let ndir = dir.join(&name);
        std::fs::create_dir_all(&ndir)?;
        let mut p = CertificateParams::new(vec![name.clone()])?;
        p.distinguished_name.push(DnType::CommonName, name.as_str());
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        std::fs::write(ndir.join("node.pem"), cert.pem())?;
        write_secret_file(&ndir.join("node.key"), &key.serialize_pem())?;
        write_secret_file(&ndir.join("master.key"), &SecretKey::generate().to_hex())?;
        let seeds: Vec<String> = (1..=opts.nodes)
            .filter(|j| *j != k)
            .map(|j| format!("\"{}\"", gossip(j)))
            .collect();
        let toml = format!(
            r#"# swarm node config written by `swarm init`. Paths are relative to this file.
[node]
name = "{name}"
data_dir = "data"
swarm_file = "../swarm-config.json"

[gossip]
bind = "{gossip}"
seeds = [{seeds}]

[tls]
ca_cert = "../ca.pem"
cert = "node.pem"
key = "node.key"

[gateway]
bind = "{http}"
body_limit = 1048576

[keys]
# Or set SWARM_MASTER_KEY / SWARM_JWT_SIGNING_KEY; files must be mode 0600.
master_key_file = "master.key"
jwt_signing_key_file = "../jwt.key"

[auth]
issuer = "swarm"
audience = "swarm"

[inference]
# Models this node serves: catalog names (`swarm model pull NAME` puts them in model_dir), or
# {{ name = "my-model", path = "/models/my-model.gguf" }} (a GGUF file or a Hugging Face folder).
# A node without models still answers /v1/chat/completions by routing to a node that has one.
model_dir = "../models"
models = [{models}]
"#,
            models = opts
                .models
                .iter()
                .map(|m| format!("{{ name = \"{m}\" }}"))
                .collect::<Vec<_>>()
                .join(", "),
            gossip = gossip(k),
            seeds = seeds.join(", "),
            http = SocketAddr::new(opts.host, opts.http_port + k - 1),
        );
        let path = ndir.join("node.toml");
        std::fs::write(&path, toml)?;
        configs.push(path);
    }

    // An admin token for the operator.
    let token = mint(&signing, "admin", "admin", 30 * 86_400, "swarm", "swarm")?;
    write_secret_file(&dir.join("admin.token"), &token)?;
    Ok(configs)
}

/// Sign a token for `subject` with `role`, valid for `ttl_s` seconds.
pub fn mint(
    key: &ed25519_dalek::SigningKey,
    subject: &str,
    role: &str,
    ttl_s: u64,
    issuer: &str,
    audience: &str,
) -> Result<String> {
    let now = crate::gateway::now_s();
    let mut jti = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut jti);
    Ok(jwt::sign(
        key,
        &Claims {
            sub: subject.to_string(),
            role: role.to_string(),
            iss: issuer.to_string(),
            aud: audience.to_string(),
            iat: now,
            exp: now.saturating_add(ttl_s),
            nbf: None,
            jti: hex::encode(jti),
        },
    ))
}

/// The first node's config in a cluster folder, if there is one.
pub fn first_node_config(dir: &Path) -> Option<PathBuf> {
    let p = dir.join("node-1").join("node.toml");
    p.exists().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_loadable_cluster() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("c");
        let configs = init_cluster(&InitOptions {
            dir: dir.clone(),
            nodes: 3,
            host: "127.0.0.1".parse().expect("ip"),
            gossip_port: 17946,
            http_port: 18080,
            models: Vec::new(),
        })
        .expect("init");
        assert_eq!(configs.len(), 3);
        let c3 = swarm_config::NodeConfig::load(&configs[2]).expect("node-3 config loads");
        assert_eq!(c3.node.name, "node-3");
        assert_eq!(c3.gateway.bind.port(), 18082);
        assert_eq!(c3.gossip.bind.port(), 17948);
        assert_eq!(c3.gossip.seeds.len(), 2);
        assert!(crate::node::load_master_key(&c3).is_ok());
        assert!(crate::node::load_signing_key(&c3).is_ok());
        assert!(c3.swarm_file().is_ok());
        // Secrets are 0600; a second init refuses to overwrite.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [
                "ca.key",
                "jwt.key",
                "admin.token",
                "node-1/master.key",
                "node-1/node.key",
            ] {
                let mode = std::fs::metadata(dir.join(f))
                    .expect("meta")
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o077, 0, "{f}");
            }
        }
        assert!(
            init_cluster(&InitOptions {
                dir,
                nodes: 1,
                host: "127.0.0.1".parse().expect("ip"),
                gossip_port: 1,
                http_port: 1,
                models: Vec::new(),
            })
            .is_err()
        );
    }
}
