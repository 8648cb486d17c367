//! Whether a URI names this server (a domain of ours, a listener, a flow token of ours) rather
//! than one of its users; our addresses themselves are `crate::interfaces`.

use super::*;

impl App {
    /// True when a URI names this server (not one of its users).
    pub(crate) fn is_ours(&self, u: &Uri<'_>) -> bool {
        if !self.names_a_proxy(u) {
            return false;
        }
        if self.serves_domain(u.host.as_str()) && u.port.is_none() {
            return true;
        }
        self.interfaces.names_listener(u)
    }

    /// Whether a Route entry is passed over here: ours, or (in a cluster) one of a node that is
    /// gone, whose hop in a dialog's route set leads nowhere now (the far side is found again
    /// by its flow token or its current binding).
    pub(crate) fn passes_route(&self, u: &Uri<'_>) -> bool {
        self.is_ours(u)
            || (self.names_a_proxy(u)
                && self
                    .cluster
                    .as_ref()
                    .is_some_and(|c| u.host.ip().is_some_and(|ip| c.is_gone_ip(ip))))
    }

    /// A URI with a user part is someone's address, unless the user part is one of our flow
    /// tokens or a cluster owner token (what our Record-Route and owner routes carry).
    fn names_a_proxy(&self, u: &Uri<'_>) -> bool {
        u.user.is_none_or(|user| {
            Flow::decode(user, &self.cfg.secret).is_some()
                || self
                    .cluster
                    .as_ref()
                    .is_some_and(|c| c.token(user).is_some())
        })
    }
}
