//! The configuration files, in each vendor's syntax: Yealink `key = value` (`y000000000000.cfg`
//! for every phone, `<mac>.cfg` per device), Cisco SPA `<flat-profile>` XML (`spa<mac>.xml`),
//! Grandstream `<gs_provision>` XML with P-values (`cfg<mac>.xml`).
//!
//! Transport: SIP over TLS with SRTP required when the model has TLS and the server listens
//! for TLS; UDP otherwise (the SPA 3xx/5xx trust only Cisco-signed certificates). Codecs as in
//! the set-up guides: G.722 first, then G.711 µ-law and A-law, then Opus where the phone has
//! it. Busy-lamp keys for the device's colleagues from the second line key on.

use std::fmt::Write as _;

use careflow_core::provisioning::Model;
use careflow_store::devices::Device;

use super::DeviceSettings;

/// Where the SIP service is, as phones reach it.
#[derive(Debug, Clone)]
pub struct SipServer {
    /// Host name or address (the SIP domain).
    pub host: String,
    /// UDP port.
    pub udp_port: u16,
    /// TLS port, when TLS is served.
    pub tls_port: Option<u16>,
}

/// Everything a device's file is made of.
#[derive(Debug)]
pub struct PhoneConfig<'a> {
    /// The device.
    pub device: &'a Device,
    /// Its model.
    pub model: &'static Model,
    /// The digest user name it authenticates with (`<user>.<mac>`).
    pub auth_name: String,
    /// Its SIP password.
    pub password: String,
    /// The SIP service.
    pub server: &'a SipServer,
    /// Time zone, NTP, resync.
    pub settings: &'a DeviceSettings,
}

impl PhoneConfig<'_> {
    fn tls(&self) -> Option<u16> {
        self.server.tls_port.filter(|_| self.model.tls)
    }

    fn port(&self) -> u16 {
        self.tls().unwrap_or(self.server.udp_port)
    }

    fn display_name(&self) -> &str {
        &self.device.username
    }

    /// Busy lamps that fit on the model's keys (the first key is the line).
    fn blf(&self) -> impl Iterator<Item = (usize, &String)> {
        let keys = usize::from(self.model.line_keys.saturating_sub(1));
        self.device
            .blf
            .iter()
            .take(keys)
            .enumerate()
            .map(|(i, b)| (i + 2, b))
    }
}

/// XML text, escaped.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// A Yealink value: one line, no control characters.
fn line(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// `+1`, `-5`, `+5:30` (Yealink, Grandstream) from minutes east of UTC.
fn offset_hours(minutes: i32) -> String {
    let sign = if minutes < 0 { '-' } else { '+' };
    let m = minutes.unsigned_abs();
    if m.is_multiple_of(60) {
        format!("{sign}{}", m / 60)
    } else {
        format!("{sign}{}:{:02}", m / 60, m % 60)
    }
}

/// Yealink's common file: what every Yealink gets, whatever its MAC (no secrets).
pub fn yealink_common(s: &DeviceSettings) -> String {
    let mut f = String::from("#!version:1.0.0.1\n## careflow-sip: settings for every Yealink\n");
    let _ = writeln!(
        f,
        "local_time.time_zone = {}",
        offset_hours(s.utc_offset_minutes)
    );
    let _ = writeln!(f, "local_time.ntp_server1 = {}", line(&s.ntp_server));
    let _ = writeln!(f, "local_time.interval = 1000");
    // Fetch again every day, so a rotation reaches the phone well inside its grace period.
    let _ = writeln!(f, "auto_provision.repeat.enable = 1");
    let _ = writeln!(
        f,
        "auto_provision.repeat.minutes = {}",
        (s.resync.as_secs() / 60).max(1)
    );
    let _ = writeln!(f, "auto_provision.power_on = 1");
    f
}

/// Yealink's per-device file: account 1 and the busy-lamp keys.
pub fn yealink(c: &PhoneConfig<'_>) -> String {
    let mut f = String::from("#!version:1.0.0.1\n");
    let _ = writeln!(f, "## careflow-sip: {} ({})", c.device.mac, c.model.name);
    let kv = |f: &mut String, k: &str, v: &str| {
        let _ = writeln!(f, "{k} = {}", line(v));
    };
    kv(&mut f, "account.1.enable", "1");
    kv(&mut f, "account.1.label", c.display_name());
    kv(&mut f, "account.1.display_name", c.display_name());
    kv(&mut f, "account.1.auth_name", &c.auth_name);
    kv(&mut f, "account.1.user_name", &c.device.username);
    kv(&mut f, "account.1.password", &c.password);
    kv(&mut f, "account.1.sip_server.1.address", &c.server.host);
    kv(&mut f, "account.1.sip_server.1.port", &c.port().to_string());
    kv(
        &mut f,
        "account.1.sip_server.1.transport_type",
        if c.tls().is_some() { "2" } else { "0" },
    );
    kv(&mut f, "account.1.sip_server.1.expires", "300");
    // SRTP required on TLS (2 = compulsory), off on UDP.
    kv(
        &mut f,
        "account.1.srtp_encryption",
        if c.tls().is_some() { "2" } else { "0" },
    );
    kv(&mut f, "account.1.nat.udp_update_enable", "1");
    kv(&mut f, "account.1.nat.udp_update_time", "30");
    for (codec, priority) in [("g722", 1), ("pcmu", 2), ("pcma", 3), ("opus", 4)] {
        kv(&mut f, &format!("account.1.codec.{codec}.enable"), "1");
        kv(
            &mut f,
            &format!("account.1.codec.{codec}.priority"),
            &priority.to_string(),
        );
    }
    for (key, colleague) in c.blf() {
        // Type 16: BLF, on line 1.
        kv(&mut f, &format!("linekey.{key}.type"), "16");
        kv(&mut f, &format!("linekey.{key}.line"), "1");
        kv(&mut f, &format!("linekey.{key}.value"), colleague);
        kv(&mut f, &format!("linekey.{key}.label"), colleague);
    }
    f
}

/// Cisco SPA's profile (`<flat-profile>`).
pub fn spa(c: &PhoneConfig<'_>) -> String {
    let mut f = String::from("<flat-profile>\n");
    let el = |f: &mut String, k: &str, v: &str| {
        let _ = writeln!(f, "  <{k}>{}</{k}>", xml(v));
    };
    el(&mut f, "Line_Enable_1_", "Yes");
    el(
        &mut f,
        "Proxy_1_",
        &format!("{}:{}", c.server.host, c.port()),
    );
    el(&mut f, "Register_1_", "Yes");
    el(&mut f, "Register_Expires_1_", "300");
    el(&mut f, "Display_Name_1_", c.display_name());
    el(&mut f, "User_ID_1_", &c.device.username);
    el(&mut f, "Password_1_", &c.password);
    el(&mut f, "Use_Auth_ID_1_", "Yes");
    el(&mut f, "Auth_ID_1_", &c.auth_name);
    el(
        &mut f,
        "SIP_Transport_1_",
        if c.tls().is_some() { "TLS" } else { "UDP" },
    );
    el(&mut f, "NAT_Keep_Alive_Enable_1_", "Yes");
    el(&mut f, "Preferred_Codec_1_", "G722");
    el(&mut f, "Second_Preferred_Codec_1_", "G711u");
    el(&mut f, "Third_Preferred_Codec_1_", "G711a");
    el(&mut f, "Primary_NTP_Server", &c.settings.ntp_server);
    el(
        &mut f,
        "Time_Zone",
        &format!("GMT{}", spa_offset(c.settings.utc_offset_minutes)),
    );
    el(
        &mut f,
        "Resync_Periodic",
        &c.settings.resync.as_secs().to_string(),
    );
    for (key, colleague) in c.blf() {
        el(&mut f, &format!("Extension_{key}_"), "Disabled");
        el(
            &mut f,
            &format!("Extended_Function_{key}_"),
            &format!(
                "fnc=blf+cp;sub={colleague}@{};nme={colleague}",
                c.device.domain
            ),
        );
    }
    f.push_str("</flat-profile>\n");
    f
}

/// `+01:00` (SPA's `Time_Zone` is `GMT+01:00`).
fn spa_offset(minutes: i32) -> String {
    let sign = if minutes < 0 { '-' } else { '+' };
    let m = minutes.unsigned_abs();
    format!("{sign}{:02}:{:02}", m / 60, m % 60)
}

/// Grandstream's file (`<gs_provision>` with P-values, account 1).
pub fn grandstream(c: &PhoneConfig<'_>) -> String {
    let mut f =
        String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<gs_provision version=\"1\">\n");
    let _ = writeln!(f, "  <mac>{}</mac>", xml(&c.device.mac));
    f.push_str("  <config version=\"1\">\n");
    let p = |f: &mut String, n: u32, v: &str| {
        let _ = writeln!(f, "    <P{n}>{}</P{n}>", xml(v));
    };
    // Account 1: active, name, server, user ID, authenticate ID, password, display name.
    p(&mut f, 271, "1");
    p(&mut f, 270, c.display_name());
    p(&mut f, 47, &format!("{}:{}", c.server.host, c.port()));
    p(&mut f, 35, &c.device.username);
    p(&mut f, 36, &c.auth_name);
    p(&mut f, 34, &c.password);
    p(&mut f, 3, c.display_name());
    // Transport 0 UDP / 2 TLS; SRTP 2 = enabled and forced.
    p(&mut f, 130, if c.tls().is_some() { "2" } else { "0" });
    p(&mut f, 183, if c.tls().is_some() { "2" } else { "0" });
    // Register expiry in minutes; NAT keep-alive.
    p(&mut f, 32, "5");
    p(&mut f, 52, "2");
    // Codec order: G.722 (9), PCMU (0), PCMA (8), Opus (123).
    for (n, codec) in [(57, "9"), (58, "0"), (59, "8"), (60, "123")] {
        p(&mut f, n, codec);
    }
    p(&mut f, 30, &c.settings.ntp_server);
    p(&mut f, 64, &gs_offset(c.settings.utc_offset_minutes));
    // Fetch again every `resync` (194 = 1: every P193 minutes).
    p(&mut f, 194, "1");
    p(
        &mut f,
        193,
        &(c.settings.resync.as_secs() / 60).max(60).to_string(),
    );
    // Multi-purpose keys: mode 1 (BLF), account 0, value (P323/P324/P325 for the first key,
    // then three apart).
    for (i, colleague) in c.blf().map(|(_, b)| b).enumerate() {
        let base = 323 + 3 * u32::try_from(i).unwrap_or(0);
        p(&mut f, base, "1");
        p(&mut f, base + 1, "0");
        p(&mut f, base + 2, colleague);
    }
    f.push_str("  </config>\n</gs_provision>\n");
    f
}

/// Grandstream's P64 is minutes east of UTC plus 720 (so 780 is UTC+1).
fn gs_offset(minutes: i32) -> String {
    (minutes + 720).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use careflow_core::provisioning::{FetchLimits, ProvisioningKey, model};

    use super::*;

    fn settings() -> DeviceSettings {
        DeviceSettings {
            key: ProvisioningKey::new([1; 32]),
            grace: Duration::from_secs(86_400),
            utc_offset_minutes: 60,
            ntp_server: "ntp.clinic.example".into(),
            resync: Duration::from_secs(86_400),
            public_url: None,
            limits: FetchLimits::default(),
            shared_by_default: false,
        }
    }

    fn device(model: &str) -> Device {
        Device {
            mac: "001565aabbcc".into(),
            model: model.into(),
            username: "2001".into(),
            domain: "clinic.example".into(),
            label: Some("Ward <3> & co".into()),
            blf: vec!["2002".into(), "2003".into(), "2004".into(), "2005".into()],
            generation: 1,
            ha1_md5: String::new(),
            ha1_sha256: String::new(),
            previous: None,
            prov_ha1_md5: String::new(),
            prov_ha1_sha256: String::new(),
            created_at: 0,
            updated_at: 0,
            last_fetch_at: None,
            last_fetch_from: None,
            shared: false,
        }
    }

    fn render(model_name: &str, f: fn(&PhoneConfig<'_>) -> String) -> String {
        let d = device(model_name);
        let s = settings();
        let server = SipServer {
            host: "sip.clinic.example".into(),
            udp_port: 5060,
            tls_port: Some(5061),
        };
        f(&PhoneConfig {
            device: &d,
            model: model(model_name).unwrap(),
            auth_name: "2001.001565aabbcc".into(),
            password: "p<&>w".into(),
            server: &server,
            settings: &s,
        })
    }

    fn yealink_values(text: &str) -> std::collections::HashMap<String, String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once(" = ").unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[test]
    fn yealink_gets_tls_srtp_its_own_auth_name_and_busy_lamps() {
        let v = yealink_values(&render("yealink-t46s", yealink));
        assert_eq!(v["account.1.auth_name"], "2001.001565aabbcc");
        assert_eq!(v["account.1.user_name"], "2001");
        assert_eq!(v["account.1.password"], "p<&>w");
        assert_eq!(v["account.1.sip_server.1.port"], "5061");
        assert_eq!(v["account.1.sip_server.1.transport_type"], "2");
        assert_eq!(v["account.1.srtp_encryption"], "2");
        assert_eq!(v["account.1.codec.g722.priority"], "1");
        assert_eq!(v["linekey.2.value"], "2002");
        assert_eq!(v["linekey.2.type"], "16");
        assert_eq!(v["linekey.5.value"], "2005");
        // A T33G has 4 line keys: the line and three lamps.
        let small = yealink_values(&render("yealink-t33g", yealink));
        assert_eq!(small["linekey.4.value"], "2004");
        assert!(!small.contains_key("linekey.5.value"));
        let common = yealink_values(&yealink_common(&settings()));
        assert_eq!(common["local_time.time_zone"], "+1");
        assert_eq!(common["auto_provision.repeat.minutes"], "1440");
    }

    #[test]
    fn spa_is_xml_on_udp_with_escaped_values() {
        let text = render("cisco-spa303", spa);
        let doc = roxmltree::Document::parse(&text).unwrap();
        let get = |k: &str| {
            doc.descendants()
                .find(|n| n.has_tag_name(k))
                .and_then(|n| n.text())
                .map(str::to_string)
        };
        assert_eq!(get("Password_1_").as_deref(), Some("p<&>w"));
        assert_eq!(get("Auth_ID_1_").as_deref(), Some("2001.001565aabbcc"));
        assert_eq!(get("Proxy_1_").as_deref(), Some("sip.clinic.example:5060"));
        assert_eq!(get("SIP_Transport_1_").as_deref(), Some("UDP"));
        assert_eq!(get("Time_Zone").as_deref(), Some("GMT+01:00"));
        assert_eq!(
            get("Extended_Function_2_").as_deref(),
            Some("fnc=blf+cp;sub=2002@clinic.example;nme=2002")
        );
        assert_eq!(
            get("Extended_Function_4_"),
            None,
            "an SPA303 has 3 line keys"
        );
    }

    #[test]
    fn grandstream_is_xml_with_p_values() {
        let text = render("grandstream-gxp2170", grandstream);
        let doc = roxmltree::Document::parse(&text).unwrap();
        let p = |n: u32| {
            doc.descendants()
                .find(|e| e.has_tag_name(format!("P{n}").as_str()))
                .and_then(|e| e.text())
                .map(str::to_string)
        };
        assert_eq!(p(35).as_deref(), Some("2001"));
        assert_eq!(p(36).as_deref(), Some("2001.001565aabbcc"));
        assert_eq!(p(34).as_deref(), Some("p<&>w"));
        assert_eq!(p(47).as_deref(), Some("sip.clinic.example:5061"));
        assert_eq!(p(130).as_deref(), Some("2"));
        assert_eq!(p(64).as_deref(), Some("780"));
        assert_eq!(p(325).as_deref(), Some("2002"));
        assert_eq!(p(328).as_deref(), Some("2003"));
    }

    #[test]
    fn offsets_are_written_each_vendors_way() {
        assert_eq!(offset_hours(-300), "-5");
        assert_eq!(offset_hours(330), "+5:30");
        assert_eq!(spa_offset(-210), "-03:30");
        assert_eq!(gs_offset(-300), "420");
    }
}
