//! Subscriber records.

/// A stored subscriber. There is deliberately no password field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    /// Row id.
    pub id: i64,
    /// SIP username.
    pub username: String,
    /// SIP domain, also the digest realm.
    pub domain: String,
    /// Contact e-mail.
    pub email: Option<String>,
    /// CareFlow user id (the identity provider's subject).
    pub careflow_user_id: Option<String>,
    /// CareFlow Care4W id.
    pub careflow_care4w_id: Option<String>,
    /// Disabled subscribers cannot authenticate.
    pub enabled: bool,
    /// MD5(username:realm:password), hex.
    pub ha1_md5: String,
    /// SHA-256(username:realm:password), hex.
    pub ha1_sha256: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// A subscriber to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSubscriber {
    /// SIP username.
    pub username: String,
    /// SIP domain.
    pub domain: String,
    /// Contact e-mail.
    pub email: Option<String>,
    /// CareFlow user id.
    pub careflow_user_id: Option<String>,
    /// CareFlow Care4W id.
    pub careflow_care4w_id: Option<String>,
    /// MD5 HA1, hex.
    pub ha1_md5: String,
    /// SHA-256 HA1, hex.
    pub ha1_sha256: String,
}

/// What authenticating a subscriber needs of their row (all a cache of it keeps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRow {
    /// Disabled subscribers cannot authenticate.
    pub enabled: bool,
    /// MD5 HA1, hex.
    pub ha1_md5: String,
    /// SHA-256 HA1, hex.
    pub ha1_sha256: String,
}

impl AuthRow {
    /// The HA1 for an algorithm.
    pub fn ha1(&self, alg: careflow_proto::digest::Algorithm) -> &str {
        match alg {
            careflow_proto::digest::Algorithm::Md5 => &self.ha1_md5,
            careflow_proto::digest::Algorithm::Sha256 => &self.ha1_sha256,
        }
    }
}

impl From<Subscriber> for AuthRow {
    fn from(s: Subscriber) -> Self {
        Self {
            enabled: s.enabled,
            ha1_md5: s.ha1_md5,
            ha1_sha256: s.ha1_sha256,
        }
    }
}
