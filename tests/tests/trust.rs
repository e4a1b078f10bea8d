//! Trust: who may stream and call what, over real TLS handshakes with
//! certificates made by `driftwatch-collector certs`.

use std::path::{Path, PathBuf};

use driftwatch_proto::{
    client::{endpoint, ClientTls},
    v1::{
        agent_message::Msg, agent_service_client::AgentServiceClient,
        approval_service_client::ApprovalServiceClient,
        baseline_service_client::BaselineServiceClient,
        finding_service_client::FindingServiceClient, query_service_client::QueryServiceClient,
        AgentMessage, AgentsRequest, DecideApprovalRequest, GetFindingRequest,
        ImportBaselineRequest, ListApprovalsRequest, ListBaselinesRequest, ListFindingsRequest,
        RequestApprovalRequest, ScanBaselineRequest, TimelineRequest, UpdateFindingRequest,
    },
};
use driftwatch_tests::{bin, block_on, hello, policy, run, sha256_file, Agent, Collector, Dir};
use tonic::{transport::Channel, Code, Request, Status};

/// A TLS connection to `c` trusting its CA, with a client certificate if given.
async fn connect(c: &Collector, cert: Option<&(PathBuf, PathBuf)>) -> Result<Channel, String> {
    let pki = c.pki.as_ref().expect("a collector with a CA");
    let tls = ClientTls {
        ca: Some(pki.join("ca.pem")),
        cert: cert.map(|c| c.0.clone()),
        key: cert.map(|c| c.1.clone()),
    };
    let (e, plaintext) = endpoint(&c.url, &tls)?;
    assert!(!plaintext);
    e.connect().await.map_err(|e| format!("{e:?}"))
}

fn with_token<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// Opens an agent stream saying hello as `node`; the status it ends with
/// (OK when the collector answered the hello).
async fn stream_as(ch: Channel, token: Option<&str>, node: &str) -> Status {
    let mut client = AgentServiceClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello(node)).await.unwrap();
    let resp = match client
        .stream(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            token,
        ))
        .await
    {
        Ok(r) => r,
        Err(s) => return s,
    };
    let mut inbound = resp.into_inner();
    let r = match inbound.message().await {
        Ok(Some(_)) => Status::ok("answered"),
        Ok(None) => Status::ok("ended"),
        Err(s) => s,
    };
    drop(tx);
    r
}

/// Every call of the API with `token` or a client certificate; each
/// call's outcome: Ok, or the status it was refused with.
async fn call_everything(
    ch: Channel,
    token: Option<&str>,
) -> Vec<(&'static str, Result<(), Status>)> {
    let mut out: Vec<(&'static str, Result<(), Status>)> = Vec::new();
    let mut q = QueryServiceClient::new(ch.clone());
    let mut f = FindingServiceClient::new(ch.clone());
    let mut a = ApprovalServiceClient::new(ch.clone());
    let mut b = BaselineServiceClient::new(ch.clone());
    fn done<T>(r: Result<T, Status>) -> Result<(), Status> {
        r.map(|_| ())
    }
    out.push((
        "QueryService/Timeline",
        done(
            q.timeline(with_token(
                TimelineRequest {
                    limit: 1,
                    ..Default::default()
                },
                token,
            ))
            .await,
        ),
    ));
    out.push((
        "QueryService/Agents",
        done(q.agents(with_token(AgentsRequest {}, token)).await),
    ));
    out.push((
        "FindingService/List",
        done(
            f.list(with_token(ListFindingsRequest::default(), token))
                .await,
        ),
    ));
    out.push((
        "FindingService/Get",
        done(
            f.get(with_token(GetFindingRequest { id: 999 }, token))
                .await,
        ),
    ));
    out.push((
        "FindingService/Update",
        done(
            f.update(with_token(
                UpdateFindingRequest {
                    id: 999,
                    status: "acknowledged".into(),
                    ..Default::default()
                },
                token,
            ))
            .await,
        ),
    ));
    out.push((
        "ApprovalService/Request",
        done(
            a.request(with_token(
                RequestApprovalRequest {
                    resource: "/etc/trust-test.conf".into(),
                    window_seconds: 60,
                    reason: "role test".into(),
                    ..Default::default()
                },
                token,
            ))
            .await,
        ),
    ));
    out.push((
        "ApprovalService/Decide",
        done(
            a.decide(with_token(
                DecideApprovalRequest {
                    id: 999,
                    approve: true,
                    ..Default::default()
                },
                token,
            ))
            .await,
        ),
    ));
    out.push((
        "ApprovalService/List",
        done(
            a.list(with_token(ListApprovalsRequest::default(), token))
                .await,
        ),
    ));
    out.push((
        "BaselineService/Import",
        done(
            b.import(with_token(ImportBaselineRequest::default(), token))
                .await,
        ),
    ));
    out.push((
        "BaselineService/Scan",
        done(
            b.scan(with_token(
                ScanBaselineRequest {
                    node: "nowhere".into(),
                    path: "/etc".into(),
                    timeout_seconds: 1,
                    ..Default::default()
                },
                token,
            ))
            .await,
        ),
    ));
    out.push((
        "BaselineService/List",
        done(
            b.list(with_token(ListBaselinesRequest::default(), token))
                .await,
        ),
    ));
    out
}

/// The least role each call needs (0 viewer .. 3 admin).
fn least_role(call: &str) -> usize {
    match call {
        "FindingService/Update" | "ApprovalService/Request" => 1,
        "ApprovalService/Decide" => 2,
        "BaselineService/Import" | "BaselineService/Scan" => 3,
        _ => 0,
    }
}

const ROLES: [&str; 4] = ["viewer", "responder", "approver", "admin"];

fn refused(r: &Result<(), Status>) -> Option<&Status> {
    match r {
        Err(s) if matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated) => Some(s),
        _ => None,
    }
}

#[test]
fn each_role_is_allowed_exactly_its_calls_and_refusals_name_who_what_and_why() {
    let dir = Dir::new();
    let roles = dir.path.join("roles.yaml");
    // carol is a responder by her client certificate, not a token.
    std::fs::write(
        &roles,
        "admin: [alice]\napprover: [bob]\nresponder: [carol]\nviewer: [reader]\n",
    )
    .unwrap();
    let c = Collector::secured(&["--roles", roles.to_str().unwrap()]);
    let carol = c.issue("user", "carol");
    let dave = c.issue("user", "dave");
    let node = c.issue("node", "web-1");
    block_on(async {
        for (role, who) in [(0, "reader"), (2, "bob"), (3, "alice")] {
            let token = format!("{who}-token");
            let ch = connect(&c, None).await.unwrap();
            for (call, r) in call_everything(ch, Some(&token)).await {
                let allowed = role >= least_role(call);
                match refused(&r) {
                    None => assert!(allowed, "{who} ({}) was allowed {call}: {r:?}", ROLES[role]),
                    Some(s) => {
                        assert!(
                            !allowed,
                            "{who} ({}) was refused {call}: {s:?}",
                            ROLES[role]
                        );
                        assert_eq!(s.code(), Code::PermissionDenied, "{call}");
                        let m = s.message();
                        assert!(
                            m.contains(who)
                                && m.contains(call)
                                && m.contains(ROLES[least_role(call)]),
                            "the refusal must name the principal, the call and the role: {m}"
                        );
                    }
                }
            }
            // A person never streams as an agent.
            let ch = connect(&c, None).await.unwrap();
            let s = stream_as(ch, Some(&token), "web-1").await;
            assert_eq!(s.code(), Code::PermissionDenied, "{who} streamed: {s:?}");
        }
        // The responder by certificate.
        let ch = connect(&c, Some(&carol)).await.unwrap();
        for (call, r) in call_everything(ch, None).await {
            let allowed = 1 >= least_role(call);
            assert_eq!(
                refused(&r).is_none(),
                allowed,
                "carol (responder) {call}: {r:?}"
            );
        }
        // A valid certificate with no role, an unknown token and no
        // credential: refused everything, each with the right code.
        let ch = connect(&c, Some(&dave)).await.unwrap();
        for (call, r) in call_everything(ch, None).await {
            let s = refused(&r).unwrap_or_else(|| panic!("dave (no role) was allowed {call}"));
            assert_eq!(s.code(), Code::PermissionDenied);
            assert!(s.message().contains("has no role"), "{}", s.message());
        }
        let ch = connect(&c, None).await.unwrap();
        for (call, r) in call_everything(ch.clone(), Some("guess")).await {
            let s = refused(&r).unwrap_or_else(|| panic!("an unknown token was allowed {call}"));
            assert_eq!(s.code(), Code::Unauthenticated, "{call}");
        }
        for (call, r) in call_everything(ch, None).await {
            let s = refused(&r).unwrap_or_else(|| panic!("no credential was allowed {call}"));
            assert_eq!(s.code(), Code::Unauthenticated, "{call}");
        }
        // An agent's certificate streams, and does nothing else.
        let ch = connect(&c, Some(&node)).await.unwrap();
        for (call, r) in call_everything(ch.clone(), None).await {
            let s =
                refused(&r).unwrap_or_else(|| panic!("an agent certificate was allowed {call}"));
            assert_eq!(s.code(), Code::PermissionDenied);
        }
        let s = stream_as(ch, None, "web-1").await;
        assert_eq!(s.code(), Code::Ok, "the agent of web-1 was refused: {s:?}");
    });
}

#[test]
fn agents_are_refused_without_a_certificate_of_the_ca_naming_their_node() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let c = Collector::secured(&[]);
    let pki = c.pki.clone().unwrap();
    let ca = pki.join("ca.pem").display().to_string();
    // Another CA's node certificate for the same name.
    let other = dir.path.join("other-ca");
    run(std::process::Command::new(bin("driftwatch-collector"))
        .args(["certs", "init", "--dir"])
        .arg(&other)
        .stdout(std::process::Stdio::null()));
    run(std::process::Command::new(bin("driftwatch-collector"))
        .args(["certs", "issue", "--dir"])
        .arg(&other)
        .args(["node", "stranger"])
        .stdout(std::process::Stdio::null()));
    let (web1_cert, web1_key) = c.issue("node", "web-1");
    let pol = policy(&[format!("{tree}/")], &[]);
    let start = |node: &str, cert: Option<(&Path, &Path)>| {
        let spool = dir.path.join(format!("spool-{node}"));
        let mut args: Vec<String> = [
            "--collector",
            &c.url,
            "--ca",
            &ca,
            "--node-name",
            node,
            "--heartbeat-interval",
            "1",
            "--spool-dir",
            spool.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec();
        if let Some((cert, key)) = cert {
            args.extend([
                "--cert".to_owned(),
                cert.display().to_string(),
                "--key".to_owned(),
                key.display().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start_with(&pol, &args)
    };
    let _none = start("bare", None);
    let _foreign = start(
        "stranger",
        Some((
            &other.join("node-stranger.pem"),
            &other.join("node-stranger-key.pem"),
        )),
    );
    let _impostor = start("web-2", Some((&web1_cert, &web1_key)));
    let _good = start("web-1", Some((&web1_cert, &web1_key)));
    std::fs::write(format!("{tree}/app.conf"), "x = 1\n").unwrap();
    c.wait_timeline(
        &["--host", "web-1", "--path", &tree],
        |t| !t.is_empty(),
        "web-1's change",
    );
    // Each refused agent has tried by now (they start together, retry
    // within seconds) and each refusal is in the log, named.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let wanted = [
        "Stream needs an agent certificate",
        "TLS handshake refused",
        "refused a hello for another node",
    ];
    loop {
        let log = c.log();
        if wanted.iter().all(|w| log.contains(w)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "missing refusals {:?} in the log:\n{log}",
            wanted
                .iter()
                .filter(|w| !log.contains(**w))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let agents = c.json("", &["agents"]);
    let names: Vec<&str> = agents.iter().filter_map(|a| a["host"].as_str()).collect();
    assert_eq!(
        names,
        ["web-1"],
        "only the certified agent is known: {agents:?}"
    );
    for host in ["bare", "stranger", "web-2"] {
        assert!(
            c.timeline(&["--host", host]).is_empty(),
            "{host} stored events"
        );
    }
}

/// An identity provider's signing key, and its JWK.
struct Idp {
    key: jsonwebtoken::EncodingKey,
    kid: String,
    jwk: serde_json::Value,
}

impl Idp {
    fn new(kid: &str) -> Self {
        use base64::Engine as _;
        let pair = rcgen::KeyPair::generate().expect("a P-256 key");
        let raw = pair.public_key_raw();
        assert_eq!(raw.len(), 65, "an uncompressed P-256 point");
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        Self {
            key: jsonwebtoken::EncodingKey::from_ec_der(pair.serialized_der()),
            kid: kid.into(),
            jwk: serde_json::json!({
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                "x": b64(&raw[1..33]), "y": b64(&raw[33..]),
            }),
        }
    }

    /// An ID token for `email` in `groups`, expiring `exp_in` seconds from now.
    fn token(&self, aud: &str, email: &str, groups: &[&str], exp_in: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let claims = serde_json::json!({
            "iss": "https://idp.example", "aud": aud, "sub": email, "email": email,
            "groups": groups, "iat": now, "exp": now + exp_in,
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign")
    }
}

fn write_jwks(path: &Path, keys: &[&Idp]) {
    let set = serde_json::json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, set.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A unary call that approves request `id` with `token`.
async fn decide(c: &Collector, token: &str, id: u64) -> Result<(), Status> {
    let ch = connect(c, None).await.unwrap();
    ApprovalServiceClient::new(ch)
        .decide(with_token(
            DecideApprovalRequest {
                id,
                approve: true,
                ..Default::default()
            },
            Some(token),
        ))
        .await
        .map(|_| ())
}

async fn request(c: &Collector, token: &str) -> Result<u64, Status> {
    let ch = connect(c, None).await.unwrap();
    ApprovalServiceClient::new(ch)
        .request(with_token(
            RequestApprovalRequest {
                resource: "/etc/app.conf".into(),
                window_seconds: 600,
                reason: "rotate the key".into(),
                ..Default::default()
            },
            Some(token),
        ))
        .await
        .map(|r| r.into_inner().id)
}

/// Waits (up to 10 s) until `f` holds: for files re-read within seconds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn oidc_id_tokens_are_verified_and_groups_give_roles_and_key_files_are_re_read() {
    let dir = Dir::new();
    let jwks = dir.path.join("jwks.json");
    let roles = dir.path.join("roles.yaml");
    std::fs::write(
        &roles,
        "approver: [\"group:security\"]\nresponder: [\"group:dev\"]\n",
    )
    .unwrap();
    let idp = Idp::new("k1");
    write_jwks(&jwks, &[&idp]);
    let c = Collector::secured(&[
        "--oidc-issuer",
        "https://idp.example",
        "--oidc-audience",
        "driftwatch",
        "--oidc-jwks",
        jwks.to_str().unwrap(),
        "--roles",
        roles.to_str().unwrap(),
    ]);
    let dev = idp.token("driftwatch", "dev@example.com", &["dev"], 300);
    let sec = idp.token("driftwatch", "sec@example.com", &["security"], 300);
    block_on(async {
        // A developer files a request; the security group approves it.
        let id = request(&c, &dev)
            .await
            .expect("a responder files a request");
        let s = decide(&c, &dev, id).await.unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(
            s.message().contains("dev@example.com") && s.message().contains("approver"),
            "{s:?}"
        );
        // An approver still cannot approve their own request.
        let own = request(&c, &sec).await.unwrap();
        let s = decide(&c, &sec, own).await.unwrap_err();
        assert!(s.message().contains("self-approval"), "{s:?}");
        decide(&c, &sec, id)
            .await
            .expect("another principal approves");

        // Expired, for another audience, signed by a key not in the JWKS,
        // or not a token at all: unauthenticated, saying why.
        let stranger = Idp::new("k1");
        for (what, token, why) in [
            (
                "expired",
                idp.token("driftwatch", "sec@example.com", &["security"], -3600),
                "xpired",
            ),
            (
                "another audience",
                idp.token("other-app", "sec@example.com", &["security"], 300),
                "udience",
            ),
            (
                "a stranger's key",
                stranger.token("driftwatch", "sec@example.com", &["security"], 300),
                "ignature",
            ),
            ("garbage", "a.b.c".to_owned(), "refused"),
        ] {
            let s = decide(&c, &token, id).await.unwrap_err();
            assert_eq!(s.code(), Code::Unauthenticated, "{what}: {s:?}");
            assert!(s.message().contains(why), "{what}: {s:?}");
        }

        // The provider rotates its key: the new JWKS is read without a
        // restart, and the old key stops working.
        let next = Idp::new("k2");
        write_jwks(&jwks, &[&next]);
        let fresh = next.token("driftwatch", "dev@example.com", &["dev"], 300);
        let mut ok = false;
        for _ in 0..50 {
            if request(&c, &fresh).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(ok, "a token of the rotated key was never accepted");
        let s = request(&c, &dev).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    });
    // The tokens file too: a token added to it works without a restart.
    let tokens = c.pki.as_ref().unwrap().parent().unwrap().join("tokens");
    let mut t = std::fs::read_to_string(&tokens).unwrap();
    t.push_str("erin-token erin\n");
    std::fs::write(&tokens, t).unwrap();
    eventually("the new token is accepted", || {
        c.cli("erin", &["findings", "list"]).status.success()
            || !String::from_utf8_lossy(&c.cli("erin", &["findings", "list"]).stderr)
                .contains("not recognised")
    });
    // erin has no role in the roles file: known, but refused.
    let out = c.cli("erin", &["findings", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"erin\" has no role"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaces `to` with `from` the way a secret volume or cert-manager does:
/// a whole new file renamed over the old.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// Files under `tree` with a `close_write` in the timeline of `node`.
fn written(c: &Collector, node: &str, tree: &str) -> std::collections::BTreeSet<String> {
    c.timeline(&["--host", node, "--path", tree, "--kind", "file"])
        .iter()
        .filter(|e| e["op"] == "close_write")
        .filter_map(|e| e["path"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn certificates_rotated_in_place_are_used_without_a_restart_and_nothing_is_lost() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let c = Collector::secured(&[]);
    let pki = c.pki.clone().unwrap();
    // The agent's own copies, as a node would mount them.
    let mine = dir.path.join("agent-tls");
    std::fs::create_dir_all(&mine).unwrap();
    let (cert, key) = c.issue("node", "rot");
    let (my_ca, my_cert, my_key) = (
        mine.join("ca.pem"),
        mine.join("tls.crt"),
        mine.join("tls.key"),
    );
    replace(&pki.join("ca.pem"), &my_ca);
    replace(&cert, &my_cert);
    replace(&key, &my_key);
    let spool = dir.path.join("spool");
    let port = c.url.rsplit(':').next().unwrap().to_owned();
    let s = |p: &Path| p.display().to_string();
    let args = [
        "--collector".to_owned(),
        c.url.clone(),
        "--ca".into(),
        s(&my_ca),
        "--cert".into(),
        s(&my_cert),
        "--key".into(),
        s(&my_key),
        "--node-name".into(),
        "rot".into(),
        "--heartbeat-interval".into(),
        "1".into(),
        "--spool-dir".into(),
        s(&spool),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _agent = Agent::start_with(&policy(&[format!("{tree}/")], &[]), &args);
    for i in 0..20 {
        std::fs::write(format!("{tree}/before{i}.conf"), "1").unwrap();
    }
    eventually_long(&c, "the first 20 changes", |c| {
        written(c, "rot", &tree).len() == 20
    });

    // Rotation to a new CA: the collector's certificate and key and the CA
    // it checks clients with, the agent's certificate, key and CA, each
    // replaced in place.
    let ca2 = dir.path.join("ca2");
    run(std::process::Command::new(bin("driftwatch-collector"))
        .args(["certs", "init", "--dir"])
        .arg(&ca2)
        .stdout(std::process::Stdio::null()));
    run(std::process::Command::new(bin("driftwatch-collector"))
        .args(["certs", "issue", "--dir"])
        .arg(&ca2)
        .args(["node", "rot"])
        .stdout(std::process::Stdio::null()));
    let old_user = c.issue("user", "olduser");
    replace(&ca2.join("node-rot-key.pem"), &my_key);
    replace(&ca2.join("node-rot.pem"), &my_cert);
    replace(&ca2.join("ca.pem"), &my_ca);
    replace(&ca2.join("server-key.pem"), &pki.join("server-key.pem"));
    replace(&ca2.join("server.pem"), &pki.join("server.pem"));
    replace(&ca2.join("ca.pem"), &pki.join("ca.pem"));
    let reloads = |c: &Collector| c.log().matches("TLS certificate").count();
    let before = reloads(&c);
    for i in 0..10 {
        std::fs::write(format!("{tree}/during{i}.conf"), "2").unwrap();
    }
    eventually_long(&c, "the collector re-reads its TLS files", |c| {
        reloads(c) > before
    });
    // The server now presents its new certificate.
    let served = std::process::Command::new("python3")
        .args([
            "-c",
            &format!("import ssl; print(ssl.get_server_certificate(('127.0.0.1', {port})))"),
        ])
        .output()
        .unwrap();
    let norm = |s: &str| s.split_whitespace().collect::<String>();
    assert_eq!(
        norm(&String::from_utf8_lossy(&served.stdout)),
        norm(&std::fs::read_to_string(pki.join("server.pem")).unwrap()),
        "the collector still serves its old certificate"
    );
    // The agent's stream is cut; it reconnects with what is now in its
    // files, which only the re-read collector accepts (and which only
    // accept it).
    run(std::process::Command::new("ss")
        .args(["-K", "dst", "127.0.0.1", "dport", "=", &port])
        .stdout(std::process::Stdio::null()));
    for i in 0..10 {
        std::fs::write(format!("{tree}/after{i}.conf"), "3").unwrap();
    }
    eventually_long(&c, "all 40 changes", |c| {
        written(c, "rot", &tree).len() == 40
    });
    assert!(
        c.log().matches("agent connected").count() >= 2,
        "the agent never reconnected"
    );
    // A certificate of the old CA is refused from now on.
    block_on(async {
        let refused = match connect(&c, Some(&old_user)).await {
            Err(_) => true,
            Ok(ch) => {
                let r = QueryServiceClient::new(ch).agents(AgentsRequest {}).await;
                r.is_err()
            }
        };
        assert!(refused, "a certificate of the replaced CA was accepted");
    });
}

/// Waits (up to 60 s) until `f(c)` holds.
fn eventually_long(c: &Collector, what: &str, f: impl Fn(&Collector) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !f(c) {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

/// Changes one stored file event of `node` in the collector's database (the
/// collector stopped), as someone with the disk would: the block is
/// rewritten with the event's path changed and its chain value kept.
/// Returns the event's sequence number.
fn alter_stored_event(data: &Path, node: &str, path_part: &str) -> u64 {
    use driftwatch_proto::v1::{event, EventBatch};
    use prost::Message as _;
    let db = sled::open(data).expect("open the stopped collector's store");
    let blocks = db.open_tree("blocks").unwrap();
    let mut prefix = node.as_bytes().to_vec();
    prefix.push(0);
    for kv in blocks.scan_prefix(&prefix) {
        let (k, v) = kv.unwrap();
        assert_eq!(v[0], 0, "an LZ4 block");
        let len = u32::from_le_bytes(v[1..5].try_into().unwrap()) as usize;
        let raw = lz4_flex::block::decompress(&v[5..], len).unwrap();
        let mut batch = EventBatch::decode(raw.as_slice()).unwrap();
        let hit = batch.events.iter_mut().find(
            |e| matches!(&e.event, Some(event::Event::File(f)) if f.path.contains(path_part)),
        );
        if let Some(e) = hit {
            let seq = e.seq;
            if let Some(event::Event::File(f)) = &mut e.event {
                f.path = "/nothing/to/see".into();
            }
            let raw = batch.encode_to_vec();
            let mut value = vec![0u8];
            value.extend_from_slice(&(raw.len() as u32).to_le_bytes());
            value.extend_from_slice(&lz4_flex::block::compress(&raw));
            blocks.insert(k, value).unwrap();
            db.flush().unwrap();
            return seq;
        }
    }
    panic!("no stored file event of {node} under {path_part}");
}

#[test]
fn people_s_actions_are_audited_and_verify_names_the_first_altered_event() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let roles = dir.path.join("roles.yaml");
    std::fs::write(
        &roles,
        "admin: [alice]\napprover: [bob]\nviewer: [reader]\n",
    )
    .unwrap();
    let mut c = Collector::secured(&["--roles", roles.to_str().unwrap()]);
    let agent = Agent::streaming(
        &policy(&[format!("{tree}/")], &[]),
        &c,
        "chained",
        &dir.path.join("spool"),
    );
    // Real writers: sed -i, cp, Python.
    let conf = format!("{tree}/app.conf");
    std::fs::write(&conf, "debug = false\n").unwrap();
    run(std::process::Command::new("sed").args(["-i", "s/false/true/", &conf]));
    run(std::process::Command::new("cp").args([&conf, &format!("{tree}/copy.conf")]));
    run(&mut driftwatch_tests::python(&format!(
        "open('{tree}/py.conf', 'w').write('x = 1\\n')"
    )));
    c.wait_timeline(
        &["--host", "chained", "--path", &format!("{tree}/py.conf")],
        |t| t.iter().any(|e| e["op"] == "close_write"),
        "python's write",
    );

    // People act: a request, a self-approval (refused), an approval by
    // another, a viewer trying to change something (refused).
    let req = c.json(
        "alice",
        &[
            "approvals",
            "request",
            "--resource",
            &conf,
            "--window",
            "10m",
            "--reason",
            "flip debug",
        ],
    );
    let id = req[0]["id"].as_u64().unwrap().to_string();
    assert!(!c
        .cli("alice", &["approvals", "approve", &id])
        .status
        .success());
    assert!(c
        .cli("bob", &["approvals", "approve", &id])
        .status
        .success());
    assert!(!c.cli("reader", &["findings", "ack", "1"]).status.success());
    let audit = c.wait_json(&["audit"], 10, |a| a.len() >= 4, "four audit records");
    let row = |call: &str, who: &str| {
        audit
            .iter()
            .find(|r| r["call"] == call && r["principal"] == who)
            .unwrap_or_else(|| panic!("no {call} by {who} in {audit:#?}"))
    };
    assert_eq!(row("ApprovalService/Request", "alice")["outcome"], "ok");
    assert_eq!(
        row("ApprovalService/Request", "alice")["args"]["resource"],
        conf
    );
    assert!(row("ApprovalService/Decide", "alice")["outcome"]
        .as_str()
        .unwrap()
        .contains("self-approval"));
    assert_eq!(row("ApprovalService/Decide", "bob")["outcome"], "ok");
    assert!(row("FindingService/Update", "reader")["outcome"]
        .as_str()
        .unwrap()
        .starts_with("PermissionDenied"));

    // An honest store verifies, from the collector and from an export.
    let verify = |c: &Collector, extra: &[&str]| {
        let out = c
            .command("reader")
            .arg("verify")
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = verify(&c, &[]);
    assert!(ok, "an honest store failed to verify:\n{text}");
    assert!(
        text.contains("host chained") && text.contains("audit log"),
        "{text}"
    );
    let export = dir.path.join("export.jsonl");
    let out = c
        .command("reader")
        .args(["timeline", "--host", "chained", "-o", "jsonl", "--chain"])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&export, &out.stdout).unwrap();
    let offline = |f: &Path| {
        let out = std::process::Command::new(bin("driftwatch"))
            .args(["verify", "--file"])
            .arg(f)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = offline(&export);
    assert!(ok, "an honest export failed to verify:\n{text}");

    // An export with one readable field edited, or one event left out.
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let victim = lines
        .iter()
        .position(|l| l.contains("copy.conf") && l.contains("\"type\":\"event\""))
        .expect("cp's event in the export");
    let seq_of = |l: &str| {
        serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
            .as_u64()
            .unwrap()
    };
    let mut edited = lines.clone();
    edited[victim] = edited[victim].replace("copy.conf", "other.conf");
    std::fs::write(&export, edited.join("\n")).unwrap();
    let (ok, text) = offline(&export);
    assert!(
        !ok && text.contains(&format!("seq {}", seq_of(&lines[victim]))),
        "{text}"
    );
    let mut cut = lines.clone();
    let removed = seq_of(&cut.remove(victim));
    std::fs::write(&export, cut.join("\n")).unwrap();
    let (ok, text) = offline(&export);
    let next = lines
        .iter()
        .map(|l| seq_of(l))
        .filter(|s| *s > removed)
        .min()
        .expect("an event after the removed one");
    assert!(
        !ok && text.contains(&format!("seq {next}")),
        "removed {removed}: {text}"
    );

    // The store itself altered while the collector is down.
    drop(agent);
    c.kill();
    let altered = alter_stored_event(&c.data, "chained", "copy.conf");
    c.restart();
    let (ok, text) = verify(&c, &["--host", "chained"]);
    assert!(!ok, "an altered store verified:\n{text}");
    assert!(
        text.contains(&format!("first bad event: seq {altered}:")),
        "verify must name seq {altered}:\n{text}"
    );
}

#[test]
fn forged_evidence_cannot_resolve_a_drift_finding() {
    use driftwatch_proto::v1::{event, Digest, Event, EventBatch};
    let dir = Dir::new();
    let tree = dir.join("etc/app");
    std::fs::create_dir_all(&tree).unwrap();
    let file = format!("{tree}/app.conf");
    std::fs::write(&file, "pool=10\n").unwrap();
    let desired = sha256_file(&file);
    let c = Collector::judging(
        &format!(
            "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: app-config\n    kind: config\n    paths: [\"{tree}/\"]\n    writers: [ {{ user: deploy }} ]\n"
        ),
        &[],
    );
    let _agent = driftwatch_tests::Agent::managed(&c, "victim", &dir.path.join("spool"));
    run(std::process::Command::new("sed").args(["-i", "s/pool=10/pool=500/", &file]));
    let drift = |c: &Collector| {
        c.json("", &["findings", "list", "--all", "--kind", "drift"])
            .into_iter()
            .find(|f| f["path"] == file.as_str())
    };
    eventually_long(&c, "a drift finding on app.conf", |c| drift(c).is_some());

    // A digest that says the file is back as desired, sent by whoever holds
    // another node's certificate (or none).
    let forged = |node: &str, seq: u64| AgentMessage {
        msg: Some(Msg::Batch(EventBatch {
            events: vec![Event {
                event: Some(event::Event::Digest(Digest {
                    path: file.clone(),
                    resource: "app-config".into(),
                    exists: true,
                    sha256: desired.clone(),
                    mode: 0o644,
                    reason: "change".into(),
                    ..Default::default()
                })),
                seq,
                time_unix_nanos: driftwatch_proto::time::now_unix_nanos(),
                node: node.into(),
                ..Default::default()
            }],
        })),
    };
    let other = c.issue("node", "forger");
    block_on(async {
        for (cert, hello_as) in [(None, "victim"), (Some(&other), "victim")] {
            let ch = connect(&c, cert).await.unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(hello(hello_as)).await.unwrap();
            tx.send(forged("victim", 1_000)).await.unwrap();
            let r = AgentServiceClient::new(ch)
                .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            let code = match r {
                Err(s) => s.code(),
                Ok(r) => match r.into_inner().message().await {
                    Err(s) => s.code(),
                    Ok(_) => Code::Ok,
                },
            };
            assert!(
                matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                "a forged hello as victim got {code:?}"
            );
        }
        // As itself, the forger cannot put its digest on the victim's stream.
        let ch = connect(&c, Some(&other)).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(hello("forger")).await.unwrap();
        tx.send(forged("victim", 1)).await.unwrap();
        let mut inbound = AgentServiceClient::new(ch)
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("the forger's own stream")
            .into_inner();
        let mut refused = None;
        while refused.is_none() {
            match inbound.message().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(s) => refused = Some(s.code()),
            }
        }
        assert_eq!(
            refused,
            Some(Code::PermissionDenied),
            "an event naming another node"
        );
        drop(tx);
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    let f = drift(&c).unwrap();
    assert_eq!(
        f["status"], "open",
        "forged evidence changed the finding: {f:#}"
    );
    assert!(c.timeline(&["--host", "forger"]).is_empty());
}
