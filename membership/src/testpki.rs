//! Test certificates: a CA and node certificates in a temp dir, as `swarm init` writes them.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::TlsIdentity;

/// A CA and named node certificates in a temp dir, as `swarm init` writes them.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca: std::path::PathBuf,
}

impl Pki {
    pub(crate) fn new(tag: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, tag);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("ca");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, cert.pem()).expect("write");
        Self {
            dir,
            issuer: Issuer::new(p, key),
            ca,
        }
    }

    pub(crate) fn node(&self, name: &str) -> TlsIdentity {
        let (c, k) = self.files(&[name]);
        TlsIdentity::load(&self.ca, &c, &k).expect("load")
    }

    /// The CA certificate's path.
    pub(crate) fn ca(&self) -> &std::path::Path {
        &self.ca
    }

    /// Write a node certificate carrying every name in `names` as a DNS subject alternative
    /// name (the first is its common name) and its key; returns (cert, key) paths.
    pub(crate) fn files(&self, names: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
        self.files_for(
            names,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// [`Pki::files`] with these extended key usages (a gateway's certificate: `ServerAuth` only).
    pub(crate) fn files_for(
        &self,
        names: &[&str],
        usages: &[ExtendedKeyUsagePurpose],
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let name = names.first().copied().unwrap_or("nameless");
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = usages.to_vec();
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.issuer).expect("sign");
        let mut file = names.join("+");
        if !usages.contains(&ExtendedKeyUsagePurpose::ClientAuth) {
            file.push_str("-serving");
        }
        let c = self.dir.path().join(format!("{file}.pem"));
        let k = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&c, cert.pem()).expect("write");
        swarm_config::secret::write_secret_file(&k, &key.serialize_pem()).expect("write");
        (c, k)
    }
}
