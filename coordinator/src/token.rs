//! Bootstrap tokens: how a new node proves it may join. `kitectl token create` makes one
//! (`<id>.<secret>`, like kubeadm's: 6 + 16 characters of [a-z0-9]); the store keeps only the
//! secret's sha256, its expiry and who used it. A token joins one node, once, before it
//! expires; the secret is compared in constant time.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A token as the operator hands it to a node.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    pub id: String,
    secret: String,
}

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never goes to a log.
        write!(f, "BootstrapToken({}.****)", self.id)
    }
}

impl std::fmt::Display for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not a bootstrap token (expected <6 characters>.<16 characters>, lowercase letters and digits)")]
    Malformed,
    #[error("bootstrap token {0} is unknown")]
    Unknown(String),
    #[error("bootstrap token {id} expired at unix time {at}")]
    Expired { id: String, at: i64 },
    #[error("bootstrap token {id} was already used (by node {by})")]
    Used { id: String, by: String },
    #[error("bootstrap token {0}: wrong secret")]
    WrongSecret(String),
}

fn random_string(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

fn well_formed(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| ALPHABET.contains(&b))
}

impl BootstrapToken {
    pub fn generate() -> BootstrapToken {
        BootstrapToken {
            id: random_string(6),
            secret: random_string(16),
        }
    }

    pub fn parse(text: &str) -> Result<BootstrapToken, TokenError> {
        let (id, secret) = text.trim().split_once('.').ok_or(TokenError::Malformed)?;
        if !well_formed(id, 6) || !well_formed(secret, 16) {
            return Err(TokenError::Malformed);
        }
        Ok(BootstrapToken {
            id: id.into(),
            secret: secret.into(),
        })
    }

    fn secret_sha256(&self) -> String {
        Sha256::digest(self.secret.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// What the store keeps of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub created_unix: i64,
    pub expires_unix: i64,
    #[serde(default)]
    pub description: String,
    /// The node that joined with it.
    #[serde(default)]
    pub used_by: Option<String>,
}

impl TokenRecord {
    pub fn new(token: &BootstrapToken, now: i64, ttl_secs: i64, description: &str) -> TokenRecord {
        TokenRecord {
            id: token.id.clone(),
            secret_sha256: token.secret_sha256(),
            created_unix: now,
            expires_unix: now.saturating_add(ttl_secs),
            description: description.into(),
            used_by: None,
        }
    }

    /// Whether `token` may join a node now (the record must be `token.id`'s).
    pub fn check(&self, token: &BootstrapToken, now: i64) -> Result<(), TokenError> {
        let given = token.secret_sha256();
        // Constant time: a wrong secret takes as long as a nearly right one.
        if !bool::from(given.as_bytes().ct_eq(self.secret_sha256.as_bytes())) {
            return Err(TokenError::WrongSecret(self.id.clone()));
        }
        if let Some(by) = &self.used_by {
            return Err(TokenError::Used {
                id: self.id.clone(),
                by: by.clone(),
            });
        }
        if now >= self.expires_unix {
            return Err(TokenError::Expired {
                id: self.id.clone(),
                at: self.expires_unix,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_join_once_before_they_expire() {
        let t = BootstrapToken::generate();
        let text = t.to_string();
        assert_eq!(BootstrapToken::parse(&text).unwrap(), t);
        assert!(!format!("{t:?}").contains(&text[7..]), "no secret in Debug");
        let mut r = TokenRecord::new(&t, 1000, 600, "rack 1");
        assert!(!serde_json::to_string(&r).unwrap().contains(&text[7..]));
        r.check(&t, 1599).unwrap();
        assert!(matches!(r.check(&t, 1600), Err(TokenError::Expired { .. })));
        let other = BootstrapToken::parse(&format!("{}.{}", t.id, "a".repeat(16))).unwrap();
        assert_eq!(
            r.check(&other, 1100),
            Err(TokenError::WrongSecret(t.id.clone()))
        );
        r.used_by = Some("node-1".into());
        assert!(matches!(r.check(&t, 1100), Err(TokenError::Used { .. })));
        for bad in [
            "",
            "abc",
            "abcdef.0123",
            "ABCDEF.0123456789abcdef",
            "abcdef0123456789abcdef",
        ] {
            assert_eq!(
                BootstrapToken::parse(bad),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }
}
