//! The fleet status page against the real service on a real PostgreSQL:
//! over plain HTTP (login, the cookie's attributes, sessions ending,
//! escaping) and in Debian's real headless chromium (log in as a person
//! would, watch a rollout progress as devices report over HTTP, the
//! cookie out of the page's script's reach, a screenshot).

#[path = "support/chromium.rs"]
mod chromium;
#[path = "support/fleet.rs"]
mod fleet;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use dermascope_cloud::fleet::{self as rollouts, BundleFacts, Mode, NewRollout, StageSpec};
use dermascope_cloud::operator;
use dermascope_cloud_api::{
    routes, DeviceReport, UpdateAck, UpdateOffer, UpdateOutcome, UpdateResult,
};
use dermascope_testkit::Need;
use fleet::*;
use reqwest::StatusCode;
use serde_json::Value;

const PASSWORD: &str = "correct horse battery staple";

/// `dermascope-cloud operator add NAME --password-stdin`, as a script would.
fn add_operator(database_url: &str, name: &str, password: &str) -> Value {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dermascope-cloud"))
        .args(["operator", "add", name, "--password-stdin", "--json"])
        .env("DERMASCOPE_CLOUD_DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dermascope-cloud");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password");
    let out = child.wait_with_output().expect("dermascope-cloud ends");
    assert!(
        out.status.success(),
        "operator add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn cloud(db: &Db, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_dermascope-cloud"))
        .args(args)
        .env("DERMASCOPE_CLOUD_DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run dermascope-cloud")
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(WATCHDOG)
        .build()
        .expect("client")
}

/// `application/x-www-form-urlencoded`, as a browser encodes a field.
fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                (b as char).to_string()
            }
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn post_login(base: &str, name: &str, password: &str) -> reqwest::Response {
    no_redirects()
        .post(format!("{base}/fleet/login"))
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(format!(
            "name={}&password={}",
            form_encode(name),
            form_encode(password)
        ))
        .send()
        .await
        .expect("the service answers")
}

async fn get_page(base: &str, path: &str, cookie: Option<&str>) -> (StatusCode, String, String) {
    let mut request = no_redirects().get(format!("{base}{path}"));
    if let Some(c) = cookie {
        request = request.header(reqwest::header::COOKIE, format!("dermascope_session={c}"));
    }
    let response = request.send().await.expect("the service answers");
    let status = response.status();
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, location, response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_sessions_and_escaping_over_http() {
    let Some((db, service)) = fleet("status_page_http").await else {
        return;
    };
    let base = service.base_url();
    let clinic_id = clinic(&db, "Clinique <b>Nord</b>", false).await;
    let hostile = device(&db, &clinic_id, "<script>alert('x')</script>").await;
    let revoked = device(&db, &clinic_id, "old-one").await;
    operator::revoke_device(&db.pool, &revoked.device_id)
        .await
        .expect("revoke");

    // The command line: a generated password printed once, a chosen one
    // from standard input, no second operator of a name, no short password.
    let generated = cloud(&db, &["operator", "add", "ops.gen", "--json"]);
    assert!(generated.status.success());
    let generated: Value = serde_json::from_slice(&generated.stdout).expect("JSON");
    let generated_password = generated["generated_password"]
        .as_str()
        .expect("a generated password")
        .to_string();
    assert!(generated_password.len() >= 32);
    let chosen = add_operator(&db.url, "ops@nord", PASSWORD);
    assert_eq!(chosen["generated_password"], Value::Null);
    let again = cloud(&db, &["operator", "add", "ops@nord"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    let stored: String =
        sqlx::query_scalar("SELECT password_hash FROM operators WHERE name = 'ops@nord'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(stored.starts_with("$argon2id$"), "{stored}");
    assert!(!stored.contains(PASSWORD));

    // Every page but the login form sends a stranger to it.
    for path in ["/fleet", "/fleet/rollouts", "/fleet/rollouts/not-a-uuid"] {
        let (status, location, _) = get_page(&base, path, None).await;
        assert_eq!(
            (status, location.as_str()),
            (StatusCode::SEE_OTHER, "/fleet/login"),
            "{path}"
        );
        let (status, location, _) = get_page(&base, path, Some(&"0".repeat(64))).await;
        assert_eq!(
            (status, location.as_str()),
            (StatusCode::SEE_OTHER, "/fleet/login"),
            "{path}"
        );
    }

    // A wrong password, an unknown name: refused alike, no cookie.
    for (name, password) in [
        ("ops@nord", "wrong password!"),
        ("nobody", PASSWORD),
        ("ops@nord", ""),
    ] {
        let reply = post_login(&base, name, password).await;
        assert_eq!(reply.status(), StatusCode::UNAUTHORIZED, "{name}");
        assert!(reply.headers().get(reqwest::header::SET_COOKIE).is_none());
        let body = reply.text().await.unwrap();
        assert!(body.contains("Wrong operator name or password."), "{body}");
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM operator_sessions").await,
        0
    );

    // The right one: a session cookie the page's script cannot read.
    let clock = "SELECT clock_timestamp()::text";
    let before: String = sqlx::query_scalar(clock).fetch_one(&db.pool).await.unwrap();
    let reply = post_login(&base, "ops@nord", PASSWORD).await;
    let after: String = sqlx::query_scalar(clock).fetch_one(&db.pool).await.unwrap();
    assert_eq!(reply.status(), StatusCode::SEE_OTHER);
    assert_eq!(reply.headers()[reqwest::header::LOCATION], "/fleet");
    let set_cookie = reply.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    for attribute in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/fleet",
        "Max-Age=43200",
    ] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain HTTP: {set_cookie}");
    let token = set_cookie
        .strip_prefix("dermascope_session=")
        .and_then(|rest| rest.split(';').next())
        .unwrap()
        .to_string();
    assert_eq!(token.len(), 64, "32 random bytes as hex");
    // Kept as its SHA-256 only, for 12 hours.
    // The database's clock read around the login brackets its start.
    let (digest, twelve_hours): (String, bool) = sqlx::query_as(
        "SELECT token_sha256, expires_at BETWEEN $1::timestamptz + interval '12 hours' \
                                         AND $2::timestamptz + interval '12 hours' \
         FROM operator_sessions WHERE operator = 'ops@nord'",
    )
    .bind(&before)
    .bind(&after)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let expected: String = sqlx::query_scalar("SELECT encode(sha256($1::bytea), 'hex')")
        .bind(token.as_bytes())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(digest, expected);
    assert!(twelve_hours, "a session lasts 12 hours from login");

    let (status, _, html) = get_page(&base, "/fleet", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"),
        "{html}"
    );
    assert!(!html.contains("<script"), "no markup from a value: {html}");
    assert!(html.contains("Clinique &lt;b&gt;Nord&lt;/b&gt;"));
    assert!(html.contains(&hostile.device_id));
    assert!(
        html.contains("class=\"revoked\""),
        "the revoked device is marked"
    );
    assert!(html.contains("<span id=\"operator\">ops@nord</span>"));
    let (status, _, html) = get_page(&base, "/fleet/rollouts", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("No rollout yet"));
    for path in [
        "/fleet/rollouts/not-a-uuid",
        "/fleet/rollouts/0191b8a0-0000-7000-8000-000000000000",
    ] {
        let (status, _, html) = get_page(&base, path, Some(&token)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(html.contains("No rollout"));
    }
    // The headers forbid any script, framing and caching.
    let reply = no_redirects()
        .get(format!("{base}/fleet"))
        .header(
            reqwest::header::COOKIE,
            format!("dermascope_session={token}"),
        )
        .send()
        .await
        .unwrap();
    let csp = reply.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"));
    assert_eq!(reply.headers()["cache-control"], "no-store");

    // A logged-in operator going to the form is sent to the fleet.
    let (status, location, _) = get_page(&base, "/fleet/login", Some(&token)).await;
    assert_eq!(
        (status, location.as_str()),
        (StatusCode::SEE_OTHER, "/fleet")
    );

    // An expired session is refused though the browser still sends it.
    sqlx::query("UPDATE operator_sessions SET expires_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    let (status, location, _) = get_page(&base, "/fleet", Some(&token)).await;
    assert_eq!(
        (status, location.as_str()),
        (StatusCode::SEE_OTHER, "/fleet/login")
    );

    // Logout ends the session on the server, not only in the browser.
    let reply = post_login(&base, "ops.gen", &generated_password).await;
    assert_eq!(
        reply.status(),
        StatusCode::SEE_OTHER,
        "the generated password logs in"
    );
    let token = reply.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .trim_start_matches("dermascope_session=")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        get_page(&base, "/fleet", Some(&token)).await.0,
        StatusCode::OK
    );
    let reply = no_redirects()
        .post(format!("{base}/fleet/logout"))
        .header(
            reqwest::header::COOKIE,
            format!("dermascope_session={token}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::SEE_OTHER);
    assert!(reply.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(
        get_page(&base, "/fleet", Some(&token)).await.0,
        StatusCode::SEE_OTHER
    );

    // Removing an operator closes their sessions.
    let reply = post_login(&base, "ops.gen", &generated_password).await;
    assert_eq!(reply.status(), StatusCode::SEE_OTHER);
    let removed = cloud(&db, &["operator", "remove", "ops.gen", "--json"]);
    assert!(removed.status.success());
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM operator_sessions WHERE operator = 'ops.gen'"
        )
        .await,
        0
    );
    assert_eq!(
        post_login(&base, "ops.gen", &generated_password)
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    service.shutdown().await;
}

/// One device's update calls over HTTP, as its sync cycle makes them.
struct Handheld {
    name: String,
    id: String,
    api: Api,
}

impl Handheld {
    async fn report(&self, bundle_version: u64, failed: Vec<u64>, pending: u64) -> UpdateOffer {
        let reply = self
            .api
            .send(
                self.api
                    .client
                    .post(format!("{}{}", self.api.base, routes::UPDATE))
                    .json(&DeviceReport {
                        daemon_version: "0.7.0".into(),
                        bundle_version: Some(bundle_version),
                        encoder_model_id: MODEL.into(),
                        pending_uploads: pending,
                        failed_versions: failed,
                    }),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        reply.json()
    }

    async fn result(&self, rollout_id: &str, outcome: UpdateOutcome, detail: Option<&str>) {
        let reply = self
            .api
            .send(
                self.api
                    .client
                    .post(format!("{}{}", self.api.base, routes::UPDATE_RESULT))
                    .json(&UpdateResult {
                        rollout_id: rollout_id.into(),
                        version: NEW_VERSION,
                        outcome,
                        detail: detail.map(str::to_string),
                    }),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let ack: UpdateAck = reply.json();
        assert!(ack.recorded, "{} {outcome:?}", self.name);
    }

    /// Takes the offer, "installs" and says so.
    async fn installs(&self, rollout_id: &str) {
        let offer = self.report(OLD_VERSION, vec![], 0).await;
        assert!(
            matches!(&offer, UpdateOffer::Install { version, .. } if *version == NEW_VERSION),
            "{}: {offer:?}",
            self.name
        );
        self.result(rollout_id, UpdateOutcome::Installed, None)
            .await;
        // Its next cycle shows the new version.
        assert_eq!(self.report(NEW_VERSION, vec![], 0).await, UpdateOffer::None);
    }
}

const OLD_VERSION: u64 = 6;
const NEW_VERSION: u64 = 7;

/// The texts of a stage's row: assigned, offered, installed, failed,
/// refused, and its progress cell.
fn stage_row(browser: &mut chromium::Browser, stage: u32) -> [String; 6] {
    let mut cell = |class: &str| browser.text(&format!("tr[data-stage=\"{stage}\"] td.{class}"));
    [
        cell("assigned"),
        cell("offered"),
        cell("installed"),
        cell("failed"),
        cell("refused"),
        cell("progress"),
    ]
}

fn row(
    assigned: u32,
    offered: u32,
    installed: u32,
    failed: u32,
    refused: u32,
    progress: &str,
) -> [String; 6] {
    [
        assigned.to_string(),
        offered.to_string(),
        installed.to_string(),
        failed.to_string(),
        refused.to_string(),
        progress.to_string(),
    ]
}

#[test]
fn an_operator_logs_in_and_watches_a_rollout_progress_in_chromium() {
    let test = "an_operator_logs_in_and_watches_a_rollout_progress_in_chromium";
    let Some(binary) = chromium::find() else {
        dermascope_testkit::skip(
            test,
            Need::Chromium,
            "no chromium (scripts/setup installs it)",
        );
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let Some((db, service)) = runtime.block_on(fleet("status_page_browser")) else {
        return;
    };
    let base = service.base_url();

    // A clinic of five handhelds on bundle 6, and a second clinic.
    let (rollout_id, handhelds) = runtime.block_on(async {
        let lac = clinic(&db, "Clinique du Lac", false).await;
        let mut handhelds = Vec::new();
        for (i, name) in ["lac-01", "lac-02", "lac-03", "lac-04", "lac-05"]
            .iter()
            .enumerate()
        {
            let d = device(&db, &lac, name).await;
            let h = Handheld {
                name: name.to_string(),
                id: d.device_id.clone(),
                api: Api::new(&service, &d.credential),
            };
            assert_eq!(
                h.report(OLD_VERSION, vec![], i as u64 * 3).await,
                UpdateOffer::None
            );
            handhelds.push(h);
        }
        let hill = clinic(&db, "Hill Station", false).await;
        let far = device(&db, &hill, "hill-01").await;
        let far = Api::new(&service, &far.credential);
        let reply = far
            .send(
                far.client
                    .post(format!("{}{}", far.base, routes::UPDATE))
                    .json(&DeviceReport {
                        daemon_version: "0.6.2".into(),
                        bundle_version: None,
                        encoder_model_id: MODEL.into(),
                        pending_uploads: 41,
                        failed_versions: vec![],
                    }),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);

        // Bundle 7 published, rolled out: lac-01 first, then half the
        // clinic, then the rest; 60% installed starts the next stage, 50%
        // failed or refused pauses.
        let archive = tempfile::NamedTempFile::new().expect("archive file");
        std::fs::write(archive.path(), vec![7u8; 3000]).expect("archive bytes");
        let published = rollouts::publish_bundle(
            &db.pool,
            &BundleFacts {
                version: NEW_VERSION,
                downgrade: false,
                carries: vec!["adapter".into(), "library".into()],
                encoder_model_id: Some(MODEL.into()),
                signed_by: "ab".repeat(32),
                manifest: "version = 7\n".into(),
            },
            archive.path(),
            Mode::Apply,
        )
        .await
        .expect("publish");
        let created = rollouts::create_rollout(
            &db.pool,
            &NewRollout {
                bundle: published.bundle.bundle_id.clone(),
                clinic: "Clinique du Lac".into(),
                stages: vec![
                    StageSpec::Devices {
                        device_ids: vec![handhelds[0].id.clone()],
                    },
                    StageSpec::Percent { percent: 50 },
                    StageSpec::Rest,
                ],
                success_threshold: 0.6,
                error_threshold: 0.5,
            },
            Mode::Apply,
        )
        .await
        .expect("rollout");
        (created.rollout.rollout_id, handhelds)
    });
    add_operator(&db.url, "ops@lac", PASSWORD);

    let mut browser = chromium::Browser::launch(&binary, 1280, 900);

    // A stranger is sent to the login form; a wrong password is refused
    // and leaves no cookie.
    browser.goto(&format!("{base}/fleet"));
    assert!(browser.url().ends_with("/fleet/login"), "{}", browser.url());
    browser.type_into("#name", "ops@lac");
    browser.type_into("#password", "not the password");
    browser.click_and_wait("#log-in");
    assert!(browser.url().ends_with("/fleet/login"), "{}", browser.url());
    assert_eq!(
        browser.text("#login-error"),
        "Wrong operator name or password."
    );
    assert!(browser.cookies(&format!("{base}/fleet")).is_empty());

    // The right one opens the fleet page.
    browser.type_into("#password", PASSWORD);
    browser.click_and_wait("#log-in");
    assert!(browser.url().ends_with("/fleet"), "{}", browser.url());
    assert_eq!(browser.text("#operator"), "ops@lac");
    let cookies = browser.cookies(&format!("{base}/fleet"));
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    assert_eq!(cookies[0]["name"], "dermascope_session");
    assert_eq!(cookies[0]["httpOnly"], true, "{cookies:?}");
    assert_eq!(cookies[0]["sameSite"], "Strict", "{cookies:?}");
    // The page's own script sees no cookie at all.
    assert_eq!(
        browser.eval("document.cookie"),
        Value::String(String::new())
    );

    // Devices per clinic with what each reported.
    let far_row = browser.text("section:nth-of-type(2) tbody tr");
    assert!(
        far_row.contains("hill-01") && far_row.contains("0.6.2"),
        "{far_row}"
    );
    assert!(far_row.contains("41"), "pending uploads: {far_row}");
    let lac = browser.text("section:nth-of-type(1)");
    assert!(
        lac.contains("Clinique du Lac") && lac.contains("Rollout of bundle 7"),
        "{lac}"
    );
    let lac5 = browser.text(&format!("tr[data-device=\"{}\"]", handhelds[4].id));
    assert!(
        lac5.contains("0.7.0") && lac5.contains(&MODEL.to_string()),
        "{lac5}"
    );
    assert!(lac5.contains("12"), "pending uploads 12: {lac5}");

    // The rollout page: stage 0 offered to lac-01, the others waiting.
    browser.goto(&format!("{base}/fleet/rollouts"));
    browser.click_and_wait(&format!("tr[data-rollout=\"{rollout_id}\"] a"));
    assert!(browser.url().ends_with(&rollout_id), "{}", browser.url());
    assert_eq!(browser.text("#rollout-state"), "running");
    assert_eq!(
        stage_row(&mut browser, 0),
        row(1, 1, 0, 0, 0, "in progress")
    );
    assert_eq!(stage_row(&mut browser, 1), row(0, 0, 0, 0, 0, "waiting"));
    assert_eq!(stage_row(&mut browser, 2), row(0, 0, 0, 0, 0, "waiting"));

    // lac-01 installs: stage 0 is done and stage 1 takes in half the
    // clinic (3 of 5).
    runtime.block_on(handhelds[0].installs(&rollout_id));
    browser.reload();
    let first = stage_row(&mut browser, 0);
    assert_eq!(first[..5], row(1, 0, 1, 0, 0, "")[..5]);
    assert!(first[5].starts_with("finished"), "{first:?}");
    assert_eq!(
        stage_row(&mut browser, 1),
        row(3, 3, 0, 0, 0, "in progress")
    );

    // Stage 1's devices, as the rollout chose them.
    let stage1: Vec<&Handheld> = runtime.block_on(async {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT device_id::text FROM rollout_devices WHERE stage = 1 ORDER BY device_id",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        handhelds.iter().filter(|h| ids.contains(&h.id)).collect()
    });
    assert_eq!(stage1.len(), 3);
    let last: &Handheld = handhelds
        .iter()
        .skip(1)
        .find(|h| !stage1.iter().any(|s| s.id == h.id))
        .expect("the one device left for the last stage");

    // One installs, one fails its health check: 1 of 3 is below both
    // thresholds, nothing moves.
    runtime.block_on(async {
        stage1[0].installs(&rollout_id).await;
        assert!(matches!(
            stage1[1].report(OLD_VERSION, vec![], 0).await,
            UpdateOffer::Install { .. }
        ));
        stage1[1]
            .result(
                &rollout_id,
                UpdateOutcome::Failed,
                Some("health check: the new encoder's embedding of the known image differs"),
            )
            .await;
    });
    browser.reload();
    assert_eq!(
        stage_row(&mut browser, 1),
        row(3, 1, 1, 1, 0, "in progress")
    );
    assert_eq!(browser.text("#rollout-state"), "running");
    let failed = browser.text(&format!("tr[data-device=\"{}\"]", stage1[1].id));
    assert!(
        failed.contains("failed") && failed.contains("health check"),
        "{failed}"
    );

    // The third installs (2 of 3 >= 60%): the last stage starts, and its
    // only device refuses (1 of 1 >= 50%): the rollout pauses and says why.
    runtime.block_on(async {
        stage1[2].installs(&rollout_id).await;
        assert!(matches!(
            last.report(OLD_VERSION, vec![], 0).await,
            UpdateOffer::Install { .. }
        ));
        last.result(
            &rollout_id,
            UpdateOutcome::Refused,
            Some("not enough free space: 12 MB free, 40 MB needed"),
        )
        .await;
    });
    browser.reload();
    let second = stage_row(&mut browser, 1);
    assert_eq!(second[..5], row(3, 0, 2, 1, 0, "")[..5]);
    assert!(second[5].starts_with("finished"), "{second:?}");
    assert_eq!(stage_row(&mut browser, 2), row(1, 0, 0, 0, 1, "paused"));
    assert_eq!(browser.text("#rollout-state"), "paused");
    let reason: String = runtime.block_on(async {
        sqlx::query_scalar("SELECT paused_reason FROM rollouts")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    });
    assert_eq!(browser.text("#paused-reason"), format!("Paused: {reason}"));
    let refused = browser.text(&format!("tr[data-device=\"{}\"]", last.id));
    assert!(
        refused.contains("refused") && refused.contains("12 MB free"),
        "{refused}"
    );

    let png = browser.screenshot(1280);
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!(width, 1280);
    assert!(height >= 600, "the whole page: {height}");
    let out = if std::env::var_os("DERMASCOPE_WRITE_SCREENSHOT").is_some_and(|v| v == "1") {
        dermascope_testkit::workspace_root().join("docs/fleet-status.png")
    } else {
        std::env::temp_dir().join(format!("fleet-status-{}.png", std::process::id()))
    };
    std::fs::write(&out, &png).expect("write the screenshot");
    eprintln!("screenshot: {}", out.display());

    // The fleet page now shows the new version where it was installed.
    browser.goto(&format!("{base}/fleet"));
    let lac1 = browser.text(&format!("tr[data-device=\"{}\"]", handhelds[0].id));
    assert!(lac1.contains(&NEW_VERSION.to_string()), "{lac1}");

    // The operator rolls it back: the three devices that installed it are
    // offered a rollback, and the page follows them back.
    runtime.block_on(async {
        rollouts::rollback_rollout(&db.pool, &rollout_id, Mode::Apply)
            .await
            .expect("rollback");
    });
    browser.goto(&format!("{base}/fleet/rollouts/{rollout_id}"));
    assert_eq!(browser.text("#rollout-state"), "rolling back");
    assert_eq!(
        browser.text("tr[data-stage=\"0\"] td.rolled-back"),
        "0 of 1"
    );
    assert_eq!(
        browser.text("tr[data-stage=\"1\"] td.rolled-back"),
        "0 of 2"
    );
    runtime.block_on(async {
        for h in [&handhelds[0], stage1[0]] {
            let offer = h.report(NEW_VERSION, vec![], 0).await;
            assert!(
                matches!(&offer, UpdateOffer::Rollback { version, .. } if *version == NEW_VERSION),
                "{}: {offer:?}",
                h.name
            );
            h.result(&rollout_id, UpdateOutcome::RolledBack, None).await;
        }
    });
    browser.reload();
    assert_eq!(browser.text("#rollout-state"), "rolling back");
    assert_eq!(
        browser.text("tr[data-stage=\"0\"] td.rolled-back"),
        "1 of 1"
    );
    assert_eq!(
        browser.text("tr[data-stage=\"1\"] td.rolled-back"),
        "1 of 2"
    );
    // The last one's report shows it back on 6: that settles it too.
    runtime.block_on(async {
        assert_eq!(
            stage1[2].report(OLD_VERSION, vec![], 0).await,
            UpdateOffer::None
        );
    });
    browser.reload();
    assert_eq!(browser.text("#rollout-state"), "rolled back");
    assert_eq!(
        browser.text("tr[data-stage=\"1\"] td.rolled-back"),
        "2 of 2"
    );
    browser.goto(&format!("{base}/fleet/rollouts"));
    let listed = browser.text(&format!("tr[data-rollout=\"{rollout_id}\"]"));
    assert!(listed.contains("rolled back"), "{listed}");

    // Logging out ends it: the cookie is gone and the pages are closed.
    browser.click_and_wait("header button");
    assert!(browser.url().ends_with("/fleet/login"), "{}", browser.url());
    assert!(browser.cookies(&format!("{base}/fleet")).is_empty());
    browser.goto(&format!("{base}/fleet/rollouts/{rollout_id}"));
    assert!(browser.url().ends_with("/fleet/login"), "{}", browser.url());
    drop(browser);
    runtime.block_on(async {
        assert_eq!(
            count(&db.pool, "SELECT count(*) FROM operator_sessions").await,
            0
        );
        service.shutdown().await;
    });
    if !Path::new(&out).starts_with(dermascope_testkit::workspace_root()) {
        let _ = std::fs::remove_file(&out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_session_cookie_is_secure() {
    let Some(db) = database("status_page_tls").await else {
        return;
    };
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    let service = dermascope_cloud::server::start(dermascope_cloud::server::ServiceConfig {
        tls: Some(dermascope_cloud::server::TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        }),
        ..dermascope_cloud::server::ServiceConfig::for_database(&db.url)
    })
    .await
    .expect("TLS service starts");
    add_operator(&db.url, "ops@tls", PASSWORD);
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(issuer.pem().as_bytes()).unwrap()])
        .redirect(reqwest::redirect::Policy::none())
        .timeout(WATCHDOG)
        .build()
        .unwrap();
    let base = service.base_url();
    assert!(base.starts_with("https://"));
    let reply = client
        .post(format!("{base}/fleet/login"))
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(format!(
            "name={}&password={}",
            form_encode("ops@tls"),
            form_encode(PASSWORD)
        ))
        .send()
        .await
        .expect("the service answers over TLS");
    assert_eq!(reply.status(), StatusCode::SEE_OTHER);
    let cookie = reply.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let token = cookie
        .trim_start_matches("dermascope_session=")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let reply = client
        .post(format!("{base}/fleet/logout"))
        .header(
            reqwest::header::COOKIE,
            format!("dermascope_session={token}"),
        )
        .send()
        .await
        .unwrap();
    let cleared = reply.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap();
    assert!(
        cleared.contains("Max-Age=0") && cleared.contains("; Secure"),
        "{cleared}"
    );
    service.shutdown().await;
}
