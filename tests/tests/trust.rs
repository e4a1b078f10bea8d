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
        AgentMessage, AgentsRequest, DecideApprovalRequest, GetFindingRequest, Hello,
        ImportBaselineRequest, ListApprovalsRequest, ListBaselinesRequest, ListFindingsRequest,
        NodeInfo, RequestApprovalRequest, ScanBaselineRequest, TimelineRequest,
        UpdateFindingRequest,
    },
};
use driftwatch_tests::{bin, policy, run, Agent, Collector, Dir};
use tonic::{transport::Channel, Code, Request, Status};

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f)
}

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

fn hello(node: &str) -> AgentMessage {
    AgentMessage {
        msg: Some(Msg::Hello(Hello {
            node: Some(NodeInfo {
                name: node.into(),
                ..Default::default()
            }),
            agent_started_unix_nanos: 1,
        })),
    }
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
