//! Every configuration key with its default and documentation, in the order
//! `docs/configuration.md` lists them (`scripts/gen-config-doc` writes that table from here; a
//! test checks it).

/// (key, default, description). The default "" means unset.
pub const KEYS: &[(&str, &str, &str)] = &[
    (
        "sip_domain",
        "localhost",
        "SIP domain served; also the digest realm and the domain of new users.",
    ),
    (
        "sip_listen",
        "udp:0.0.0.0:5060,tcp:0.0.0.0:5060,tls:0.0.0.0:5061,wss:0.0.0.0:8443",
        "Comma-separated SIP listeners, each `TRANSPORT:HOST:PORT` with transport `udp`, `tcp`, `tls`, `ws` or `wss` (IPv6 as `udp:[::]:5060`). `tls` and `wss` use TLS_CERT/TLS_KEY.",
    ),
    (
        "tls_cert",
        "",
        "PEM certificate chain (leaf first) for `tls` and `wss` listeners. Unset (with TLS_KEY unset): a self-signed certificate for SIP_DOMAIN is generated into DATA_DIR on first start and its SHA-256 fingerprint logged. Reloaded on SIGHUP and when the file changes.",
    ),
    (
        "tls_key",
        "",
        "PEM private key for TLS_CERT (PKCS#8, PKCS#1 or SEC1).",
    ),
    (
        "tls_ca_file",
        "",
        "Extra PEM CA bundle trusted when careflow-sip opens TLS connections itself (e.g. to OUTBOUND_GATEWAY with `transport=tls`), besides the system CAs. The peer's certificate must name the IP address dialled.",
    ),
    (
        "tls_client_ca",
        "",
        "PEM CA bundle; when set, client certificates offered on TLS listeners are verified against it.",
    ),
    (
        "tls_require_client_cert",
        "false",
        "`true`: with TLS_CLIENT_CA, TLS clients without a valid certificate are refused.",
    ),
    (
        "ws_path",
        "/",
        "HTTP path of the WebSocket upgrade on `ws` and `wss` listeners.",
    ),
    (
        "ws_allowed_origins",
        "",
        "Comma-separated Origins (e.g. `https://app.careflow.example`) allowed to open WebSocket connections. Empty: any origin.",
    ),
    (
        "ws_require_origin",
        "false",
        "`true` refuses WebSocket upgrades without an Origin header (non-browser clients send none).",
    ),
    (
        "ws_ping_interval",
        "30",
        "Seconds of silence after which a WebSocket connection is pinged; two unanswered pings close it and drop its bindings.",
    ),
    (
        "auth_jwt_secret",
        "",
        "HS256 secret for CareFlow user tokens on `/api/sip/*`. With neither this nor AUTH_JWKS_URL set, user endpoints refuse every request (401).",
    ),
    (
        "auth_jwks_url",
        "",
        "JWKS with CareFlow's token signing keys (RS256/ES256): an http(s) URL (cached, refreshed every 10 minutes and on an unknown key id) or a file path. For Firebase: `https://www.googleapis.com/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com`.",
    ),
    (
        "auth_jwt_issuer",
        "",
        "Required `iss` of user tokens (Firebase: `https://securetoken.google.com/PROJECT`). Unset: not checked.",
    ),
    (
        "auth_jwt_audience",
        "",
        "Required `aud` of user tokens (Firebase: the project id). Unset: not checked.",
    ),
    (
        "auth_jwt_user_claim",
        "sub",
        "Token claim holding the CareFlow user id (`firebaseUid` in the seed is Firebase's `sub`).",
    ),
    (
        "careflow_user_check_url",
        "",
        "Optional URL asked before credentials are created (the seed's \"verify user exists in CareFlow\"): `{userId}` is replaced by the user id; 2xx allows, 404 refuses with 403, anything else or no answer within 3 s gives 503.",
    ),
    (
        "careflow_user_check_token",
        "",
        "Bearer token sent with CAREFLOW_USER_CHECK_URL requests.",
    ),
    (
        "api_rate_limit",
        "10",
        "Requests per second each API caller (user or API key) may make on average.",
    ),
    (
        "api_rate_burst",
        "30",
        "Requests an API caller may make at once before API_RATE_LIMIT applies (429 beyond).",
    ),
    (
        "rtpengine",
        "",
        "Comma-separated rtpengine ng control addresses (`127.0.0.1:22222`). Unset: media is never anchored and SDP passes untouched.",
    ),
    (
        "media_policy",
        "when-needed",
        "When calls are anchored at rtpengine: `always`, `when-needed` (a WebRTC leg meets a plain one, or a party is behind NAT) or `never`.",
    ),
    (
        "rtpengine_timeout_ms",
        "500",
        "Milliseconds to wait for one rtpengine answer (three tries); a call whose rtpengine does not answer keeps its own SDP.",
    ),
    (
        "rtpengine_check_interval",
        "60",
        "Seconds between checks that rtpengine still holds the media of each anchored call; calls it dropped (its own media timeout, e.g. both phones vanished without a BYE) are forgotten.",
    ),
    (
        "nat_keepalive_interval",
        "30",
        "Seconds between OPTIONS keep-alives to each device registered over UDP from behind NAT (its Contact is not the address it registers from); they keep the NAT mapping open. 0 disables them.",
    ),
    (
        "nat_keepalive_failures",
        "3",
        "Keep-alives in a row without an answer after which such a device's binding is removed.",
    ),
    (
        "http_listen",
        "127.0.0.1:8080",
        "Address of the HTTP server (`/healthz`, `/metrics`).",
    ),
    (
        "data_dir",
        "./data",
        "Directory for the embedded database, the registration journal and the nonce secret.",
    ),
    (
        "db_url",
        "",
        "Subscriber database. Default: `sqlite://DATA_DIR/careflow.db`.",
    ),
    (
        "redis_url",
        "",
        "`redis://HOST:PORT[/DB]`: keep registrations in Redis so several nodes share them (with a shared DB_URL and the same NONCE_SECRET). Unset: in memory with a journal in DATA_DIR.",
    ),
    (
        "cluster_address",
        "",
        "`IP:PORT` of this node's internal link (TCP), which the other nodes of a cluster dial to reach the devices this node holds (connections, UDP behind NAT). Needs REDIS_URL and CLUSTER_SECRET; a shared DB_URL and NONCE_SECRET too. Unset: the node is alone. See docs/operations.md, \"A cluster\".",
    ),
    (
        "cluster_secret",
        "",
        "64 hex digits, the same on every node: signs the owner tokens that say which node holds a device's flow. Never logged.",
    ),
    (
        "cluster_secret_file",
        "",
        "A file holding CLUSTER_SECRET (e.g. a systemd credential), instead of the value itself.",
    ),
    (
        "cluster_secret_previous",
        "",
        "During a secret rotation, the previous CLUSTER_SECRET: tokens signed with it are still accepted. Drop it once every device has re-registered (its registration interval after the change).",
    ),
    (
        "cluster_tls",
        "false",
        "`true`: the internal link is TLS (with TLS_CERT/TLS_KEY; each node's certificate must name its CLUSTER_ADDRESS IP as a subjectAltName and be issued by a CA in TLS_CA_FILE or the system's). Set it alike on every node.",
    ),
    (
        "push_apns_key_file",
        "",
        "APNs token-authentication key (the `.p8` file from the Apple developer account): with PUSH_APNS_KEY_ID and PUSH_APNS_TEAM_ID, iOS devices that register with `pn-provider=apns` are woken by a VoIP push. Unset: no APNs. Never logged. See docs/push.md.",
    ),
    (
        "push_apns_key_id",
        "",
        "The 10-character id of PUSH_APNS_KEY_FILE's key.",
    ),
    (
        "push_apns_team_id",
        "",
        "The Apple developer team id the key belongs to (the JWT issuer).",
    ),
    (
        "push_apns_url",
        "https://api.push.apple.com",
        "APNs service URL: production, `https://api.sandbox.push.apple.com` for development builds of the app, or a local service.",
    ),
    (
        "push_fcm_service_account_file",
        "",
        "FCM service-account key (the JSON file from the Firebase console): Android devices that register with `pn-provider=fcm` are woken by a high-priority data message. Unset: no FCM. Never logged.",
    ),
    (
        "push_fcm_url",
        "https://fcm.googleapis.com",
        "FCM HTTP v1 service URL (the OAuth2 token URL is the service account's `token_uri`).",
    ),
    (
        "push_wait",
        "10",
        "Seconds a call or message waits for a pushed device to register again (then 480).",
    ),
    (
        "push_refresh_before",
        "120",
        "Seconds before a push device's registration expires at which it is woken to register again (RFC 8599 §5.5; announced as `+sip.pnsreg`).",
    ),
    (
        "blf_groups",
        "",
        "Who may watch whose busy lamp (SUBSCRIBE Event: dialog) and pick up whose calls: `GROUP=USER,USER;GROUP=...` (users of SIP_DOMAIN or `user@domain`); a user may watch the members of every group it is in. Empty: any user of the same domain.",
    ),
    (
        "pickup_prefix",
        "**",
        "Dialling this and a colleague's SIP username (`**2001`) takes their ringing call (directed pickup, for phones without BLF pickup), within BLF_GROUPS. Empty: off.",
    ),
    (
        "blf_quirks",
        "",
        "Busy-lamp bodies for phones that need them differently, by User-Agent: `FRAGMENT=QUIRK,QUIRK;...` (FRAGMENT any part of the User-Agent, any case; first match wins). Quirks: `single-dialog` (one `<dialog>` per NOTIFY, the ringing call first), `idle-terminated` (an idle user as one terminated dialog rather than none).",
    ),
    (
        "cdr",
        "true",
        "`true`: one call detail record per call (caller and device, dialled URI, answering device, INVITE/ringing/answer/end times, disposition, final code, who hung up) is stored in the subscriber database (DB_URL) when the call ends. `false`: none.",
    ),
    (
        "cdr_max_call",
        "43200",
        "Seconds after which a call whose BYE never came is ended in its record (marked `ended_by: timeout`).",
    ),
    (
        "cdr_retention_days",
        "2190",
        "Days call records are kept (2190: six years, the usual HIPAA retention); older ones are purged hourly. 0: kept for ever.",
    ),
    (
        "audit_syslog",
        "",
        "The SIEM's syslog collector the audit trail is forwarded to: `tls://HOST:PORT` (RFC 5424 messages over TLS, RFC 5425 framing; the certificate must chain to the system CAs or TLS_CA_FILE and name HOST) or `tcp://HOST:PORT` for a collector on the same host. Every entry, from every node and the CLI, is sent once the collector is reachable (at least once; the place is kept in `DATA_DIR/audit-syslog.cursor`). Set it on one node. Empty: off.",
    ),
    (
        "provision_listen",
        "",
        "Comma-separated listeners of the provisioning server desk phones fetch their configuration from (docs/provisioning.md): `https://HOST:PORT` (TLS with TLS_CERT/TLS_KEY, or the generated self-signed certificate; a bare HOST:PORT means https) or `http://HOST:PORT` (plain HTTP, for phones that trust only their vendor's CA such as the Cisco SPA; only on a trusted network, the files carry SIP passwords). Every fetch needs the device's provisioning credentials (HTTP digest). Empty: off.",
    ),
    (
        "provision_public_url",
        "",
        "The provisioning server's URL as phones reach it (`https://sip.clinic.example:8443`), written into each device's provisioning URL shown to admins. Empty: the first PROVISION_LISTEN listener at SIP_DOMAIN.",
    ),
    (
        "provision_key_file",
        "",
        "File with the key devices' SIP passwords are derived from (64 hex digits; only their HA1 is stored). Empty: `DATA_DIR/provisioning.key`, generated on first start. Every node of a cluster needs the same file; a node with another key refuses to serve a file (503) rather than serve a password that does not work.",
    ),
    (
        "device_credentials",
        "own",
        "What a new desk phone authenticates with unless its `device add` says otherwise: `own` (its own credentials, `<user>.<mac>`, revoked and rotated alone) or `shared` (its user's own username and password; the user's password is set to one derived for sharing when the first such device is added, shown once, and a rotation of one such device rotates the user's password for all of them).",
    ),
    (
        "device_rotation_grace",
        "86400",
        "Seconds a device's previous SIP credentials keep working after a rotation, so a phone is never locked out before its next configuration fetch (phones fetch again every PROVISION_RESYNC). 0: they stop at once.",
    ),
    (
        "provision_misses",
        "60",
        "Requests for unknown MACs or with wrong credentials allowed from one address per PROVISION_MISS_WINDOW; over it, the address gets 429 for every request without valid credentials for one window (phones with valid credentials are still served).",
    ),
    (
        "provision_miss_window",
        "600",
        "Seconds of the PROVISION_MISSES window, and how long an address over it is throttled.",
    ),
    (
        "provision_utc_offset",
        "0",
        "The phones' time zone as an offset from UTC (`+1`, `-5`, `+5:30`), written into every configuration file.",
    ),
    (
        "provision_ntp_server",
        "pool.ntp.org",
        "The NTP server written into every configuration file.",
    ),
    (
        "provision_resync",
        "86400",
        "Seconds between a phone's configuration fetches (written into its file), so a rotation reaches it well inside DEVICE_ROTATION_GRACE.",
    ),
    (
        "provision_client_ca",
        "",
        "PEM bundle of the phone vendors' device CAs (e.g. Yealink's). A phone that presents its factory certificate on an https PROVISION_LISTEN listener, chained to one of them and naming its MAC in its subject (`CN=001565aabbcc`, `SEP001565AABBCC`), gets its files without HTTP digest. Empty: client certificates are not asked for.",
    ),
    (
        "provision_pnp",
        "",
        "SIP PnP for Yealink phones (docs/provisioning.md): the IPv4 address of the interface on the phones' network (`10.20.0.1`, or `10.20.0.1:5060`); phones that multicast a `ua-profile` SUBSCRIBE at first boot and that an admin has added get a NOTIFY with their provisioning URL and a new provisioning password. Anyone on that network naming such a MAC gets it too: only on a voice network phones alone reach. Needs PROVISION_LISTEN, and no UDP SIP listener on 0.0.0.0 at the same port. Empty: off.",
    ),
    (
        "webhook_url",
        "",
        "CareFlow's URL for live events (`https://...`): device registered/unregistered, call answered/missed/ended, credentials changed, each POSTed as JSON and signed (`X-CareFlow-Signature: t=TIMESTAMP,v1=HMAC-SHA256(secret, \"TIMESTAMP.BODY\")`). Empty: no webhook.",
    ),
    (
        "webhook_secret",
        "",
        "The shared secret of the webhook signatures (at least 16 characters). Prefer WEBHOOK_SECRET_FILE; never logged.",
    ),
    (
        "webhook_secret_file",
        "",
        "A file holding the webhook secret (instead of WEBHOOK_SECRET).",
    ),
    (
        "webhook_events",
        "",
        "Comma-separated event types sent to WEBHOOK_URL (`device.registered`, `device.unregistered`, `call.answered`, `call.missed`, `call.ended`, `credentials.changed`). Empty: all.",
    ),
    (
        "webhook_max_attempts",
        "8",
        "Attempts per event (1 s, 2 s, 4 s ... apart, at most 5 min) before it is counted as a dead letter (`careflow_sip_webhook_dead_letters_total`).",
    ),
    (
        "node_name",
        "",
        "This node's name in call records. Empty: the host name.",
    ),
    (
        "nonce_secret",
        "",
        "64 hex digits used to sign digest nonces; nodes sharing a location service must share it. Default: generated once into `DATA_DIR/secret`.",
    ),
    (
        "auth_algorithms",
        "MD5",
        "Digest algorithms offered, in challenge order (`MD5`, `SHA-256`); one WWW-Authenticate header each. MD5 alone is the default because some clients (baresip 1.0) fail on any challenge they cannot answer; see docs/interop.md.",
    ),
    (
        "subscriber_cache_ttl",
        "60",
        "Seconds a subscriber row read for authentication is answered from memory (a phone's registration, busy-lamp SUBSCRIBEs and calls then cost one database read). Changes made through this server's API or its CLI (which tells it over the control socket) are seen at once, another node's credential changes when it announces them over Redis; changes nobody announces (a database edited by another program) count within this time. 0: no cache.",
    ),
    (
        "subscriber_cache_size",
        "20000",
        "Most subscriber rows kept in memory for authentication (about 150 bytes each); when full, new rows are kept only as old ones expire.",
    ),
    (
        "nonce_ttl",
        "300",
        "Seconds a nonce stays valid; older ones get `stale=true`.",
    ),
    (
        "min_expires",
        "60",
        "Shortest registration accepted, seconds (423 Interval Too Brief below).",
    ),
    (
        "max_expires",
        "3600",
        "Longest registration granted, seconds; longer requests are shortened.",
    ),
    (
        "default_expires",
        "3600",
        "Registration time when the REGISTER names none, seconds.",
    ),
    (
        "max_contacts",
        "10",
        "Most contacts per address-of-record; more is refused with 403.",
    ),
    (
        "max_message_size",
        "65536",
        "Largest SIP message accepted, bytes.",
    ),
    ("max_headers", "128", "Most header fields in one message."),
    (
        "max_connections",
        "10000",
        "Most simultaneous TCP, TLS and WebSocket connections.",
    ),
    (
        "tcp_idle_timeout",
        "3900",
        "Seconds without traffic after which a TCP, TLS or WebSocket connection is closed (bindings over it are dropped).",
    ),
    (
        "t1_ms",
        "500",
        "RFC 3261 timer T1 in milliseconds; server transactions live 64*T1.",
    ),
    (
        "worker_threads",
        "1",
        "Threads running SIP and HTTP work. One is the most CPU-efficient and handled about 10,000 registrations/s here; raise it on machines with many cores.",
    ),
    (
        "t2_ms",
        "4000",
        "RFC 3261 timer T2 in milliseconds: the longest retransmission interval.",
    ),
    (
        "t4_ms",
        "5000",
        "RFC 3261 timer T4 in milliseconds: how long a message may stay in the network.",
    ),
    (
        "timer_c",
        "181",
        "RFC 3261 timer C in seconds: a branch that rings longer is cancelled and the caller gets 408.",
    ),
    (
        "outbound_gateway",
        "",
        "SIP URI of a gateway for calls to other domains, e.g. `sip:192.0.2.10:5060;transport=udp`. Unset: such requests are refused with 403.",
    ),
    (
        "allow_inbound",
        "false",
        "`true` routes requests from other domains to our users without authentication (peering); `false` refuses them with 403.",
    ),
    (
        "security_rate_limit",
        "50",
        "SIP messages per second one flow (a UDP source address and port, or one TCP/TLS/WebSocket connection: one device, even behind a shared NAT address) may send on average; a flow above it is banned for SECURITY_BAN_TIME. 0 disables every limit and ban.",
    ),
    (
        "security_burst",
        "400",
        "SIP messages one flow may send at once before SECURITY_RATE_LIMIT applies. Sized for a desk phone booting with about 120 busy-lamp keys (a SUBSCRIBE, its authenticated copy and a NOTIFY answer each, at once); a flood at any real rate is still banned within a second.",
    ),
    (
        "security_site_rate_limit",
        "2000",
        "SIP messages per second one site (an IPv4 address or an IPv6 /64: every device behind one NAT) may send in all; above it messages are dropped until the rate falls, and nobody is banned.",
    ),
    (
        "security_site_burst",
        "4000",
        "SIP messages one site may send at once before SECURITY_SITE_RATE_LIMIT applies.",
    ),
    (
        "security_ban_time",
        "300",
        "Seconds a flooding or guessing flow (or a site) stays banned (its packets are dropped before parsing).",
    ),
    (
        "security_auth_failures",
        "5",
        "Failed guesses (wrong password or unknown user; never the first challenge, never a stale or reused nonce) within SECURITY_AUTH_WINDOW that ban the flow; the same count for one username from one site, or from anywhere, bans each further flow that fails for it.",
    ),
    (
        "security_site_auth_failures",
        "100",
        "Failed guesses of all flows of one site within SECURITY_AUTH_WINDOW that ban the whole site (IPv4 address or IPv6 /64). Raise it for a large site whose phones may keep old passwords after a rotation.",
    ),
    (
        "security_auth_window",
        "60",
        "Seconds over which failed authentications are counted.",
    ),
    (
        "security_allowlist",
        "",
        "Comma-separated IPs or CIDRs (e.g. `10.0.0.0/8,192.0.2.10`) never rate limited or banned: your own networks, monitoring, SBCs.",
    ),
    (
        "log_level",
        "info",
        "Log filter when RUST_LOG is unset: `error`, `warn`, `info`, `debug`, `trace`, or per target (`info,careflow::security=debug`). Reloaded on SIGHUP.",
    ),
    (
        "shutdown_grace",
        "30",
        "Seconds SIGTERM waits for calls being set up to be answered (new requests get 503 meanwhile); unanswered calls are then cancelled and their callers answered 503. Keep it below the service manager's stop timeout (the unit uses 40).",
    ),
    (
        "partial_message_timeout",
        "10",
        "Seconds within which a SIP message, TLS handshake or WebSocket upgrade must arrive whole once its first byte did; slower senders (slowloris) are disconnected.",
    ),
    (
        "max_connections_per_ip",
        "2500",
        "Most simultaneous TCP, TLS and WebSocket connections from one IP address (allow-listed ones excepted): a bound against one source taking every connection (MAX_CONNECTIONS), high enough for a whole site of phones and browser tabs behind one NAT address.",
    ),
    (
        "scanner_user_agents",
        "friendly-scanner,sipvicious,sipcli,sip-scan,sundayddr,iwar,sivus,smap,pplsip,vaxsipuseragent",
        "Comma-separated User-Agent fragments (case-insensitive) of SIP scanners; their requests are dropped without an answer. Empty: none.",
    ),
    (
        "max_transactions",
        "100000",
        "Most server transactions in progress; beyond it requests get 503.",
    ),
];
