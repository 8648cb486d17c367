//! The provisioning API over HTTP with real tokens: RS256 tokens signed by a test key whose
//! JWKS a local HTTP endpoint serves, as Firebase's does; then a real SIP client (sipsak) uses
//! the credentials the API handed out.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::support::*;

const ISSUER: &str = "https://securetoken.google.com/careflow-test";
const AUDIENCE: &str = "careflow-test";

/// An RSA key made by OpenSSL, its JWKS, and a JWKS endpoint serving it.
pub(crate) struct IdentityProvider {
    key: EncodingKey,
    pub(crate) jwks_url: String,
    pub(crate) jwks: String,
    _dir: tempfile::TempDir,
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

impl IdentityProvider {
    pub(crate) fn start() -> Self {
        require("openssl", "openssl");
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("idp.pem");
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&pem)
            .output()
            .unwrap();
        assert!(out.status.success());
        let modulus = Command::new("openssl")
            .args(["rsa", "-noout", "-modulus", "-in"])
            .arg(&pem)
            .output()
            .unwrap();
        let hex = String::from_utf8_lossy(&modulus.stdout)
            .trim()
            .trim_start_matches("Modulus=")
            .to_string();
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let jwks = json!({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig",
            "kid": "test-key-1", "n": b64url(&n), "e": "AQAB"}]})
        .to_string();
        let served = jwks.clone();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let jwks_url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf);
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{served}",
                    served.len()
                );
            }
        });
        let key = EncodingKey::from_rsa_pem(&std::fs::read(&pem).unwrap()).unwrap();
        Self {
            key,
            jwks_url,
            jwks,
            _dir: dir,
        }
    }

    /// A token for CareFlow user `uid`, valid for an hour; `tweak` changes claims.
    pub(crate) fn token(&self, uid: &str, tweak: impl FnOnce(&mut Value)) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut claims = json!({"sub": uid, "email": format!("{uid}@clinic.example"),
            "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600});
        tweak(&mut claims);
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("test-key-1".into());
        jsonwebtoken::encode(&h, &claims, &self.key).unwrap()
    }

    /// The server environment that trusts this provider.
    pub(crate) fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AUTH_JWKS_URL", self.jwks_url.clone()),
            ("AUTH_JWT_ISSUER", ISSUER.to_string()),
            ("AUTH_JWT_AUDIENCE", AUDIENCE.to_string()),
        ]
    }
}

/// One HTTP exchange: (status, content type, JSON body or Null).
pub(crate) fn http(
    server: &Server,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, String, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", server.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let ctype = header(head, "Content-Type").unwrap_or("").to_string();
    let json = serde_json::from_str(rest).unwrap_or(Value::Null);
    (code, ctype, json)
}

fn sipsak_register(server: &Server, user: &str, password: &str) -> bool {
    require("sipsak", "sipsak");
    Command::new("sipsak")
        .args([
            "-U",
            "-i",
            "-x",
            "300",
            "-C",
            &format!("sip:{user}@127.0.0.1:5999"),
        ])
        .args(["-s", &format!("sip:{user}@{}", server.domain)])
        .args([
            "-u",
            user,
            "-a",
            password,
            "-p",
            &server.sip_addr().to_string(),
        ])
        .output()
        .expect("run sipsak")
        .status
        .success()
}

fn api_server(idp: &IdentityProvider) -> Server {
    api_server_on(idp, None)
}

/// A server trusting `idp`, its subscribers in `db` (the embedded store when None).
pub(crate) fn api_server_on(idp: &IdentityProvider, db: Option<&TestDb>) -> Server {
    let mut env = idp.env();
    if let Some(db) = db {
        env.push(("DB_URL", db.url.clone()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_with("localhost", &env)
}

#[test]
fn credentials_from_the_api_register_a_real_client_and_rotate_and_revoke_take_effect() {
    credentials_lifecycle(None);
}

#[test]
fn the_credentials_lifecycle_works_on_postgresql() {
    credentials_lifecycle(Some(&TestDb::postgres()));
}

#[test]
fn the_credentials_lifecycle_works_on_mariadb() {
    credentials_lifecycle(Some(&TestDb::mariadb()));
}

#[test]
fn admin_endpoints_work_on_postgresql() {
    admin_endpoints(Some(&TestDb::postgres()));
}

#[test]
fn admin_endpoints_work_on_mariadb() {
    admin_endpoints(Some(&TestDb::mariadb()));
}

fn credentials_lifecycle(db: Option<&TestDb>) {
    let idp = IdentityProvider::start();
    let server = api_server_on(&idp, db);
    let token = idp.token("firebase-uid-42", |_| {});

    // Who may call.
    let (code, ctype, p) = http(&server, "POST", "/api/sip/register", None, None);
    assert_eq!(code, 401, "{p}");
    assert_eq!(ctype, "application/problem+json");
    assert_eq!(p["status"], 401);
    let expired = idp.token("firebase-uid-42", |c| c["exp"] = json!(1_000_000));
    let (code, _, p) = http(&server, "POST", "/api/sip/register", Some(&expired), None);
    assert_eq!(code, 401, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("expired"), "{p}");
    let wrong_aud = idp.token("firebase-uid-42", |c| c["aud"] = json!("other-project"));
    let (code, _, _) = http(&server, "POST", "/api/sip/register", Some(&wrong_aud), None);
    assert_eq!(code, 401);
    let forged = format!("{}x", &token[..token.len() - 1]);
    let (code, _, _) = http(&server, "POST", "/api/sip/register", Some(&forged), None);
    assert_eq!(code, 401);

    // Create, once.
    let (code, _, c) = http(&server, "POST", "/api/sip/register", Some(&token), None);
    assert_eq!(code, 201, "{c}\n{}", server.log());
    let user = c["sipUsername"].as_str().unwrap().to_string();
    let password = c["sipPassword"].as_str().unwrap().to_string();
    assert!(user.starts_with("careflow_") && user.len() == 17, "{user}");
    assert!(
        user[9..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    );
    assert!(password.len() >= 22, "at least 128 bits: {password}");
    assert_eq!(c["sipUri"], format!("sip:{user}@localhost"));
    assert_eq!(c["sipConfig"]["domain"], "localhost");
    assert_eq!(c["sipConfig"]["port"], server.port);
    let (code, _, p) = http(&server, "POST", "/api/sip/register", Some(&token), None);
    assert_eq!(code, 409, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("rotate"), "{p}");
    assert!(
        !server.log().contains(&password),
        "the password must never be logged"
    );
    if db.is_none() {
        let file = std::fs::read(server.data_dir().join("careflow.db")).unwrap();
        assert!(
            !file
                .windows(password.len())
                .any(|w| w == password.as_bytes()),
            "the password must never be stored"
        );
    }

    let (code, _, cred) = http(&server, "GET", "/api/sip/credentials", Some(&token), None);
    assert_eq!(code, 200);
    assert_eq!(cred["sipUsername"], user.as_str());
    assert!(cred.get("sipPassword").is_none(), "{cred}");

    // A real client registers with them; the status shows it.
    assert!(
        sipsak_register(&server, &user, &password),
        "{}",
        server.log()
    );
    let (_, _, st) = http(&server, "GET", "/api/sip/status", Some(&token), None);
    assert_eq!(st["online"], true, "{st}");
    let device = &st["devices"][0];
    assert!(
        device["userAgent"].as_str().unwrap().contains("sipsak"),
        "{st}"
    );
    assert_eq!(device["transport"], "udp");
    assert!(device["expiresIn"].as_u64().unwrap() > 200);

    // Deregister one device by id, a missing id is named.
    let (code, _, p) = http(
        &server,
        "POST",
        "/api/sip/deregister",
        Some(&token),
        Some(r#"{"id": 12345}"#),
    );
    assert_eq!((code, p["field"].as_str()), (404, Some("id")), "{p}");
    let (code, _, p) = http(
        &server,
        "POST",
        "/api/sip/deregister",
        Some(&token),
        Some(r#"{"id": "x"}"#),
    );
    assert_eq!(code, 400, "{p}");
    let body = format!(r#"{{"id": {}}}"#, device["id"]);
    let (code, _, r) = http(
        &server,
        "POST",
        "/api/sip/deregister",
        Some(&token),
        Some(&body),
    );
    assert_eq!((code, r["removed"].as_u64()), (200, Some(1)), "{r}");
    assert!(server.bindings_of(&user).is_empty());

    // Rotate: the new password works, the old one no longer does.
    assert!(sipsak_register(&server, &user, &password));
    let (code, _, r) = http(
        &server,
        "POST",
        "/api/sip/credentials/rotate",
        Some(&token),
        None,
    );
    assert_eq!(code, 200, "{r}");
    let new_password = r["sipPassword"].as_str().unwrap().to_string();
    assert_ne!(new_password, password);
    assert!(
        server.bindings_of(&user).is_empty(),
        "rotation signs devices out"
    );
    assert!(!sipsak_register(&server, &user, &password));
    assert!(sipsak_register(&server, &user, &new_password));

    // Revoke: registration refused, credentials gone.
    let (code, _, _) = http(
        &server,
        "DELETE",
        "/api/sip/credentials",
        Some(&token),
        None,
    );
    assert_eq!(code, 204);
    assert!(server.bindings_of(&user).is_empty());
    assert!(!sipsak_register(&server, &user, &new_password));
    let (code, _, _) = http(&server, "GET", "/api/sip/credentials", Some(&token), None);
    assert_eq!(code, 404);
}

#[test]
fn admins_use_api_keys_and_users_cannot() {
    admin_endpoints(None);
}

fn admin_endpoints(db: Option<&TestDb>) {
    let idp = IdentityProvider::start();
    let server = api_server_on(&idp, db);
    let token = idp.token("uid-admin-test", |_| {});
    let (code, _, _) = http(&server, "POST", "/api/sip/register", Some(&token), None);
    assert_eq!(code, 201);
    let out = server.cli_ok(&["apikey", "create", "ops-dashboard"]);
    let key = out.lines().last().unwrap().trim().to_string();
    assert!(key.starts_with("cfk_"), "{out}");

    let (code, _, _) = http(&server, "GET", "/api/admin/subscribers", Some(&token), None);
    assert_eq!(code, 401, "a user token is not an admin key");
    let (code, _, list) = http(
        &server,
        "GET",
        "/api/admin/subscribers?q=careflow_",
        Some(&key),
        None,
    );
    assert_eq!(code, 200, "{list}");
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["careflowUserId"], "uid-admin-test");
    assert!(list[0].get("ha1Md5").is_none() && list[0].get("ha1_md5").is_none());
    let (code, _, p) = http(
        &server,
        "GET",
        "/api/admin/subscribers?limit=0",
        Some(&key),
        None,
    );
    assert_eq!((code, p["field"].as_str()), (400, Some("limit")), "{p}");
    let username = list[0]["username"].as_str().unwrap().to_string();
    let (code, _, _) = http(
        &server,
        "POST",
        &format!("/api/admin/subscribers/{username}/disable"),
        Some(&key),
        None,
    );
    assert_eq!(code, 204);
    let (code, _, p) = http(
        &server,
        "POST",
        "/api/admin/subscribers/nobody/disable",
        Some(&key),
        None,
    );
    assert_eq!(code, 404, "{p}");
    let (code, _, b) = http(&server, "GET", "/api/admin/bindings", Some(&key), None);
    assert_eq!((code, b.as_array().map(Vec::len)), (200, Some(0)));

    let listed = server.cli_ok(&["apikey", "list"]);
    assert!(
        listed.contains("ops-dashboard") && !listed.contains(&key),
        "{listed}"
    );
    server.cli_ok(&["apikey", "revoke", "ops-dashboard"]);
    let (code, _, _) = http(&server, "GET", "/api/admin/bindings", Some(&key), None);
    assert_eq!(code, 401);
}

#[test]
fn without_token_configuration_user_endpoints_refuse_everyone() {
    let server = Server::start("careflow.test");
    let (code, ctype, p) = http(
        &server,
        "GET",
        "/api/sip/status",
        Some("eyJhbGciOiJIUzI1NiJ9.e30.x"),
        None,
    );
    assert_eq!(code, 401);
    assert_eq!(ctype, "application/problem+json");
    assert!(
        p["detail"].as_str().unwrap().contains("not configured"),
        "{p}"
    );
}

#[test]
fn openapi_document_bad_input_and_limits() {
    let idp = IdentityProvider::start();
    let server = api_server(&idp);
    let (code, ctype, doc) = http(&server, "GET", "/api/openapi.json", None, None);
    assert_eq!(code, 200);
    assert!(ctype.starts_with("application/json"));
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/api/sip/register",
        "/api/sip/credentials",
        "/api/sip/credentials/rotate",
        "/api/sip/status",
        "/api/sip/deregister",
        "/api/admin/subscribers",
        "/api/admin/bindings/{id}",
    ] {
        assert!(
            doc["paths"].get(p).is_some(),
            "{p} missing from the document"
        );
    }
    let token = idp.token("uid-limits", |_| {});
    http(&server, "POST", "/api/sip/register", Some(&token), None);
    let big = format!(r#"{{"id": 1, "pad": "{}"}}"#, "x".repeat(40_000));
    let (code, _, _) = http(
        &server,
        "POST",
        "/api/sip/deregister",
        Some(&token),
        Some(&big),
    );
    assert_eq!(code, 413);
    let (code, _, p) = http(
        &server,
        "POST",
        "/api/sip/deregister",
        Some(&token),
        Some(r#"{"idd": 1}"#),
    );
    assert_eq!((code, p["field"].as_str()), (400, Some("idd")), "{p}");
    let (code, ctype, _) = http(&server, "GET", "/api/nothing-here", None, None);
    assert_eq!((code, ctype.as_str()), (404, "application/problem+json"));
    // Per-caller rate limit (30 at once by default).
    let codes: Vec<u16> = (0..40)
        .map(|_| http(&server, "GET", "/api/sip/status", Some(&token), None).0)
        .collect();
    assert!(codes.contains(&429), "{codes:?}");
    let other = idp.token("uid-someone-else", |_| {});
    assert_eq!(
        http(&server, "GET", "/api/sip/status", Some(&other), None).0,
        200
    );
}

/// schemathesis from PyPI (scripts/test installs it into a virtualenv).
fn schemathesis() -> String {
    let path = std::env::var("SCHEMATHESIS")
        .unwrap_or_else(|_| "/var/tmp/careflow-venv/bin/schemathesis".to_string());
    assert!(
        std::path::Path::new(&path).exists(),
        "schemathesis is not installed at {path}: run scripts/test (it pip-installs it)"
    );
    path
}

#[test]
fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let st = schemathesis();
    let secret = "schemathesis-shared-secret-0123456789";
    let server = Server::start_with(
        "localhost",
        &[
            ("AUTH_JWT_SECRET", secret),
            ("API_RATE_LIMIT", "100000"),
            ("API_RATE_BURST", "100000"),
        ],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "schemathesis-user", "exp": now + 3600}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let out = server.cli_ok(&["apikey", "create", "schemathesis"]);
    let key = out.lines().last().unwrap().trim().to_string();
    let spec = format!("http://127.0.0.1:{}/api/openapi.json", server.http);
    let reports = tempfile::tempdir().unwrap();
    // As a user (admin endpoints answer 401), then as an admin (user endpoints answer 401).
    for bearer in [&token, &key] {
        let run = Command::new(&st)
            .current_dir(reports.path())
            .args(["run", &spec, "--checks", "all", "-n", "60", "--seed", "1"])
            .args(["-H", &format!("Authorization: Bearer {bearer}")])
            .output()
            .expect("run schemathesis");
        assert!(
            run.status.success(),
            "schemathesis found problems:\n{}\n{}\nserver:\n{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr),
            server.log()
        );
    }
}

#[test]
fn the_careflow_user_check_allows_known_users_refuses_unknown_ones_and_fails_closed() {
    let idp = IdentityProvider::start();
    // CareFlow's user endpoint: one known user, one unknown, one that hangs.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let status = if !req
                    .to_ascii_lowercase()
                    .contains("authorization: bearer check-token")
                {
                    "401 Unauthorized"
                } else if req.starts_with("GET /users/known%40uid ") {
                    "200 OK"
                } else if req.starts_with("GET /users/slow ") {
                    std::thread::sleep(Duration::from_secs(6));
                    "200 OK"
                } else {
                    "404 Not Found"
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            });
        }
    });
    let mut env = idp.env();
    env.push((
        "CAREFLOW_USER_CHECK_URL",
        format!("http://127.0.0.1:{port}/users/{{userId}}"),
    ));
    env.push(("CAREFLOW_USER_CHECK_TOKEN", "check-token".to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start_with("localhost", &env);
    let register = |uid: &str| {
        let t = idp.token(uid, |_| {});
        http(&server, "POST", "/api/sip/register", Some(&t), None)
    };
    assert_eq!(register("known@uid").0, 201);
    let (code, _, p) = register("ghost");
    assert_eq!(code, 403, "{p}");
    let started = std::time::Instant::now();
    let (code, _, p) = register("slow");
    assert_eq!(code, 503, "{p}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the check must time out, not hang"
    );
}

#[test]
fn keys_can_come_from_a_jwks_file() {
    let idp = IdentityProvider::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, &idp.jwks).unwrap();
    let server = Server::start_with(
        "localhost",
        &[
            ("AUTH_JWKS_URL", file.to_str().unwrap()),
            ("AUTH_JWT_ISSUER", ISSUER),
            ("AUTH_JWT_AUDIENCE", AUDIENCE),
        ],
    );
    let token = idp.token("file-user", |_| {});
    let (code, _, body) = http(&server, "GET", "/api/sip/status", Some(&token), None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["online"], false);
}
