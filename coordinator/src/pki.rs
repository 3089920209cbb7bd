//! The cluster's certificate authority. `kite-coordinator init` makes it; it signs the
//! coordinator's serving certificate, the admins' credentials (kitectl) and every node's
//! certificate when the node joins with a bootstrap token. Who a peer is comes from the
//! certificate the CA signed: its common name and organization ([`Identity`]), never from what
//! the peer asks for (a node's CSR contributes only its public key).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Organizations by role.
pub const ORG_NODES: &str = "kite:nodes";
pub const ORG_ADMINS: &str = "kite:admins";
pub const ORG_COORDINATORS: &str = "kite:coordinators";

/// Who a certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// A coordinator (serving), with the names and addresses clients reach it by.
    Coordinator {
        name: String,
        dns: Vec<String>,
        ips: Vec<IpAddr>,
    },
    /// A node, by name: it sees and changes only its own pods.
    Node(String),
    /// An admin (kitectl).
    Admin(String),
}

impl Identity {
    fn name(&self) -> &str {
        match self {
            Identity::Coordinator { name, .. } | Identity::Node(name) | Identity::Admin(name) => {
                name
            }
        }
    }

    fn org(&self) -> &'static str {
        match self {
            Identity::Coordinator { .. } => ORG_COORDINATORS,
            Identity::Node(_) => ORG_NODES,
            Identity::Admin(_) => ORG_ADMINS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Cert {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{0:?} is not a valid name: lowercase letters, digits and '-', 1 to 63, starting with a letter or digit")]
    BadName(String),
    #[error("the certificate names no kite identity: {0}")]
    NoIdentity(String),
}

fn cert_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Cert { what, source }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PkiError {
    let path = path.to_path_buf();
    move |source| PkiError::Io { op, path, source }
}

/// A node's or admin's name: a DNS label (it becomes a certificate's CN and store keys).
pub fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_string()))
    }
}

/// A signed certificate and, when the CA made the key, its private key (PEM).
#[derive(Clone, Debug)]
pub struct Credential {
    pub cert_pem: String,
    pub key_pem: Option<String>,
}

/// The CA: its certificate and signing key.
pub struct ClusterCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl ClusterCa {
    /// A new CA for the cluster `cluster` (valid ten years).
    pub fn create(cluster: &str) -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate().map_err(cert_err("generate the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("kite cluster CA {cluster}"));
        dn.push(DnType::OrganizationName, "kite");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .map_err(cert_err("self-sign the CA"))?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA in `dir` (`ca.crt`, `ca.key`).
    pub fn load(dir: &Path) -> Result<ClusterCa, PkiError> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err("read", &cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err("read", &key_path))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(cert_err(format!("parse {}", key_path.display())))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(cert_err(format!("parse {}", cert_path.display())))?;
        Ok(ClusterCa { cert_pem, issuer })
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600, written with that mode) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        write_file(&dir.join("ca.crt"), &self.cert_pem, 0o644)?;
        write_file(
            &dir.join("ca.key"),
            &self.issuer.key().serialize_pem(),
            0o600,
        )
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn params_for(identity: &Identity, days: i64) -> Result<CertificateParams, PkiError> {
        check_name(identity.name())?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.name());
        dn.push(DnType::OrganizationName, identity.org());
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match identity {
            // Coordinators also dial each other (high availability).
            Identity::Coordinator { .. } => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        if let Identity::Coordinator { dns, ips, .. } = identity {
            for d in dns {
                let name = d
                    .clone()
                    .try_into()
                    .map_err(cert_err(format!("DNS name {d:?}")))?;
                params.subject_alt_names.push(SanType::DnsName(name));
            }
            for ip in ips {
                params.subject_alt_names.push(SanType::IpAddress(*ip));
            }
        }
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(days);
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// A certificate for `identity` with a key made here (the coordinator's, an admin's).
    pub fn issue(&self, identity: &Identity, days: i64) -> Result<Credential, PkiError> {
        let key = KeyPair::generate().map_err(cert_err("generate a key"))?;
        let params = Self::params_for(identity, days)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_err(format!("sign {identity:?}")))?;
        Ok(Credential {
            cert_pem: cert.pem(),
            key_pem: Some(key.serialize_pem()),
        })
    }

    /// A certificate for `identity` over the public key of a CSR (a joining node keeps its
    /// private key). What the CSR asks for beyond its key is ignored.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        days: i64,
    ) -> Result<Credential, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(cert_err("parse the certificate signing request"))?;
        let params = Self::params_for(identity, days)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(cert_err(format!("sign {identity:?}")))?;
        Ok(Credential {
            cert_pem: cert.pem(),
            key_pem: None,
        })
    }
}

/// The kite identity a peer's certificate (DER, already verified against the CA by TLS)
/// names: its common name and organization.
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::NoIdentity(format!("unparsable certificate: {e}")))?;
    let subject = cert.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
        it.next().and_then(|a| a.as_str().ok()).map(String::from)
    };
    let cn = first(&mut subject.iter_common_name())
        .ok_or_else(|| PkiError::NoIdentity(format!("no common name in {subject}")))?;
    let org = first(&mut subject.iter_organization())
        .ok_or_else(|| PkiError::NoIdentity(format!("no organization in {subject}")))?;
    check_name(&cn)?;
    match org.as_str() {
        ORG_NODES => Ok(Identity::Node(cn)),
        ORG_ADMINS => Ok(Identity::Admin(cn)),
        ORG_COORDINATORS => Ok(Identity::Coordinator {
            name: cn,
            dns: Vec::new(),
            ips: Vec::new(),
        }),
        other => Err(PkiError::NoIdentity(format!("organization {other:?}"))),
    }
}

/// Writes `text` to `path` with `mode` from its creation (a key is never readable by others,
/// not even for a moment), atomically and durably.
pub fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    kite_config::files::write_durable(path, text.as_bytes(), mode).map_err(io_err("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn der(pem_text: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).unwrap();
        p.contents
    }

    fn verifies(cert_pem: &str, ca_pem: &str) -> bool {
        let cert_der = der(cert_pem);
        let ca_der = der(ca_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        cert.verify_signature(Some(ca.public_key())).is_ok()
    }

    #[test]
    fn the_ca_signs_identities_from_its_own_params_not_the_csr() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create("test").unwrap();
        ca.save(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca = ClusterCa::load(dir.path()).unwrap();
        // A node asks for "admin" in its CSR; it gets the node name the token allowed.
        let (_key, csr) = kite_agent::link::new_csr("admin").unwrap();
        let node = ca
            .sign_csr(&csr, &Identity::Node("node-1".into()), 365)
            .unwrap();
        assert!(node.key_pem.is_none());
        assert!(verifies(&node.cert_pem, ca.cert_pem()));
        assert_eq!(
            identity_of(&der(&node.cert_pem)).unwrap(),
            Identity::Node("node-1".into())
        );
        let admin = ca.issue(&Identity::Admin("alice".into()), 365).unwrap();
        assert!(admin.key_pem.is_some());
        assert_eq!(
            identity_of(&der(&admin.cert_pem)).unwrap(),
            Identity::Admin("alice".into())
        );
        // Another CA's certificate does not verify against this one.
        let other = ClusterCa::create("other").unwrap();
        let stranger = other.issue(&Identity::Admin("alice".into()), 365).unwrap();
        assert!(!verifies(&stranger.cert_pem, ca.cert_pem()));
        let server = ca
            .issue(
                &Identity::Coordinator {
                    name: "coordinator".into(),
                    dns: vec!["localhost".into()],
                    ips: vec!["127.0.0.1".parse().unwrap()],
                },
                365,
            )
            .unwrap();
        assert!(verifies(&server.cert_pem, ca.cert_pem()));
    }

    #[test]
    fn names_are_dns_labels() {
        for bad in ["", "-a", "A", "a.b", "a/b", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("node-1").unwrap();
        assert!(ClusterCa::create("t")
            .unwrap()
            .issue(&Identity::Node("../x".into()), 1)
            .is_err());
    }
}
