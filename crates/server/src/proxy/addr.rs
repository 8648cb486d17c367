//! Whether a URI names this server (a domain of ours, a listener, a flow token of ours) rather
//! than one of its users; our addresses themselves are `crate::interfaces`.

use super::*;

impl App {
    /// True when a URI names this server (not one of its users).
    pub(crate) fn is_ours(&self, u: &Uri<'_>) -> bool {
        // A user part is someone's address, unless it is one of our flow tokens or a cluster
        // owner token.
        if u.user.is_some_and(|user| {
            Flow::decode(user, &self.cfg.secret).is_none()
                && self
                    .cluster
                    .as_ref()
                    .is_none_or(|c| c.token(user).is_none())
        }) {
            return false;
        }
        if self.serves_domain(&u.host.as_str().to_ascii_lowercase()) && u.port.is_none() {
            return true;
        }
        self.interfaces.names_listener(u)
    }
}
