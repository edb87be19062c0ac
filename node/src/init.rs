//! `swarm init`: the cluster CA, one folder per node, the JWT signing key and an admin token.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
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
    /// Extra names (DNS names or IP addresses) clients use to reach the gateways; the HTTPS
    /// certificate of every node covers them besides `host`, `localhost` and `127.0.0.1`.
    pub gateway_names: Vec<String>,
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
    swarm_config::secret::create_private_dir(dir)
        .with_context(|| format!("create {}", dir.display()))?;

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
    let mut seed = [0u8; 32];
    rand::TryRng::try_fill_bytes(&mut rand::rngs::SysRng, &mut seed)
        .context("reading the OS random generator")?;
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    write_secret_file(&dir.join("jwt.key"), &hex::encode(signing.to_bytes()))?;
    std::fs::write(
        dir.join("jwt.pub"),
        format!("{}\n", hex::encode(signing.verifying_key().to_bytes())),
    )?;

    // The swarm file, for operators to edit.
    std::fs::write(dir.join("swarm-config.json"), SwarmFile::preset_text())?;

    let gateway_sans = gateway_sans(opts)?;
    let gossip = |k: u16| SocketAddr::new(opts.host, opts.gossip_port + k - 1);
    let mut configs = Vec::new();
    for k in 1..=opts.nodes {
        let name = format!("node-{k}");
        let ndir = dir.join(&name);
        swarm_config::secret::create_private_dir(&ndir)?;
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
        // The gateway's HTTPS certificate, for the addresses clients dial.
        let mut g = CertificateParams::default();
        g.subject_alt_names = gateway_sans.clone();
        g.distinguished_name
            .push(DnType::CommonName, format!("{name} gateway"));
        g.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        g.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let gkey = KeyPair::generate()?;
        let gcert = g.signed_by(&gkey, &issuer)?;
        std::fs::write(ndir.join("gateway.pem"), gcert.pem())?;
        write_secret_file(&ndir.join("gateway.key"), &gkey.serialize_pem())?;
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
header_read_timeout = "10s"
body_timeout = "30s"
idle_timeout = "60s"
max_connections = 1024
max_connections_per_source = 64

# HTTPS with a certificate from the cluster CA (clients trust ../ca.pem). Without this section
# the gateway speaks plain HTTP, and only on a loopback address unless allow_plain_http = true.
[gateway.tls]
cert = "gateway.pem"
key = "gateway.key"

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

/// The names in every gateway certificate: `host` (unless it is the unspecified address),
/// `localhost`, `127.0.0.1` and the `--gateway-name`s.
fn gateway_sans(opts: &InitOptions) -> Result<Vec<SanType>> {
    let mut sans = Vec::new();
    let mut add = |san: SanType| {
        if !sans.contains(&san) {
            sans.push(san);
        }
    };
    if !opts.host.is_unspecified() {
        add(SanType::IpAddress(opts.host));
    }
    add(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
    add(SanType::DnsName("localhost".try_into()?));
    for n in &opts.gateway_names {
        match n.parse::<IpAddr>() {
            Ok(ip) => add(SanType::IpAddress(ip)),
            Err(_) => {
                add(SanType::DnsName(n.as_str().try_into().with_context(
                    || format!("--gateway-name `{n}` is not a DNS name"),
                )?))
            }
        }
    }
    Ok(sans)
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
    rand::Rng::fill_bytes(&mut rand::rng(), &mut jti);
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

    /// The DER bytes of the first PEM block (enough to look for SAN bytes in it).
    fn pem_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(&body)
            .expect("base64")
    }

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
            gateway_names: vec!["swarm.example".into(), "10.9.8.7".into()],
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
        // HTTPS by default, with a certificate from the cluster CA for the gateway's names.
        assert!(c3.gateway.tls.is_some());
        assert!(crate::server::tls_acceptor(&c3).is_ok_and(|a| a.is_some()));
        let pem = std::fs::read_to_string(dir.join("node-3/gateway.pem")).expect("gateway.pem");
        let der = pem_der(&pem);
        for needle in [
            &[127u8, 0, 0, 1][..],
            b"localhost",
            b"swarm.example",
            &[10, 9, 8, 7],
        ] {
            assert!(
                der.windows(needle.len()).any(|w| w == needle),
                "gateway certificate lacks {needle:?}"
            );
        }
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
                "node-1/gateway.key",
            ] {
                let mode = std::fs::metadata(dir.join(f))
                    .expect("meta")
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o077, 0, "{f}");
            }
            for d in [dir.clone(), dir.join("node-1")] {
                let mode = std::fs::metadata(&d).expect("meta").permissions().mode();
                assert_eq!(mode & 0o777, 0o700, "{}", d.display());
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
                gateway_names: Vec::new(),
            })
            .is_err()
        );
    }
}
