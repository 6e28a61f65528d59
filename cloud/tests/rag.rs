//! `rag::answer` against a real PostgreSQL with pgvector and a fake
//! OpenAI-compatible model on loopback (`support/vlm.rs`).

#[path = "support/vlm.rs"]
mod vlm;

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::OnceLock;
use std::time::Duration;

use dermascope_cloud::auth::Viewer;
use dermascope_cloud::operator;
use dermascope_cloud::rag::{self, fallback, Vlm, VlmAuth, VlmConfig, VlmSetupError};
use dermascope_cloud_api::{codes, AnsweredBy, RagAnswer, RagRequest, WireSource};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;
use vlm::{Behaviour, ExpectKey};

const MODEL: &str = "test-enc";
const DIM: usize = 8;

/// A generous hang watchdog, not a timing claim: every call below finishes
/// in well under a second unless something is stuck.
const WATCHDOG: Duration = Duration::from_secs(120);

const KEY_ENV: &str = "DERMASCOPE_RAG_TEST_VLM_KEY";

fn key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = format!("sk-test-{}", std::process::id());
        // Set once, before any model client reads it.
        std::env::set_var(KEY_ENV, &key);
        key
    })
}

// ---------------------------------------------------------------- database

/// A migrated database of the test's own with the test encoder registered
/// by `operator::add_model` (which makes its partial HNSW indexes), or
/// `None` after a counted skip. The database lives as long as the handle.
struct Db {
    pool: PgPool,
    url: String,
    _database: dermascope_testkit::Postgres,
}

impl std::ops::Deref for Db {
    type Target = PgPool;
    fn deref(&self) -> &PgPool {
        &self.pool
    }
}

async fn database(test: &str) -> Option<Db> {
    let name = test.to_owned();
    let database = tokio::task::spawn_blocking(move || dermascope_testkit::postgres(&name))
        .await
        .expect("testkit")?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&database.url)
        .await
        .expect("connect to the test database");
    dermascope_cloud::db::migrate(&pool).await.expect("migrate");
    operator::add_model(&pool, MODEL, DIM).await.expect("model");
    Some(Db {
        pool,
        url: database.url.clone(),
        _database: database,
    })
}

async fn clinic(pool: &PgPool, name: &str, allow_originals: bool) -> Viewer {
    let clinic_id = Uuid::now_v7();
    sqlx::query("INSERT INTO clinics (clinic_id, name, allow_originals) VALUES ($1, $2, $3)")
        .bind(clinic_id)
        .bind(name)
        .bind(allow_originals)
        .execute(pool)
        .await
        .expect("clinic");
    Viewer {
        device_id: Uuid::now_v7(),
        clinic_id,
        clinic_name: name.into(),
        allow_originals,
    }
}

/// A unit vector at `similarity` to the query (`unit(0)`), off towards
/// axis `side` (1..DIM), so each case's inner product with the query is
/// what the test says.
fn at(similarity: f32, side: usize) -> Vec<f32> {
    let mut v = vec![0.0; DIM];
    v[0] = similarity;
    v[side] = (1.0 - similarity * similarity).max(0.0).sqrt();
    v
}

fn query_embedding() -> Vec<f32> {
    at(1.0, 1)
}

/// A small JPEG unlike every other one made with another `seed`.
fn jpeg(seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([
            (seed.wrapping_mul(37) % 256) as u8,
            ((seed / 7).wrapping_mul(53) % 256) as u8,
            ((x + y + seed) % 256) as u8,
        ])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg)
        .expect("encode a JPEG");
    out.into_inner()
}

fn name_of(code: &str) -> String {
    match code {
        "mel" => "Melanoma".into(),
        "nv" => "Melanocytic nevus".into(),
        "bkl" => "Benign keratosis-like lesion".into(),
        "bcc" => "Basal cell carcinoma".into(),
        other => format!("Diagnosis {other}"),
    }
}

/// A seeded case, and what the model should be shown of it.
struct Seed {
    id: String,
    code: &'static str,
    similarity: f32,
    lesion: Option<String>,
    confirmed: bool,
    original: bool,
}

fn seed(code: &'static str, similarity: f32) -> Seed {
    Seed {
        id: Uuid::now_v7().to_string(),
        code,
        similarity,
        lesion: None,
        confirmed: true,
        original: false,
    }
}

/// Every test's library: ids to the image the model must see, and the
/// strings that must never reach it.
#[derive(Default)]
struct Library {
    images: HashMap<String, Vec<u8>>,
    thumbnails: HashMap<String, Vec<u8>>,
    forbidden: Vec<String>,
    next: u32,
}

/// Seeds of the JPEGs made so far in this process, so no two cases of any
/// library share a photograph.
static NEXT_IMAGE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

impl Library {
    async fn fleet(&mut self, pool: &PgPool, viewer: &Viewer, s: &Seed) {
        self.next = NEXT_IMAGE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let thumb = jpeg(self.next);
        let original = s.original.then(|| jpeg(10_000 + self.next));
        let metadata = serde_json::json!({
            "age_years": 73, "sex": "female", "anatomical_site": "left scapula-area",
            "fitzpatrick_type": 2, "lesion_id": s.lesion,
        });
        sqlx::query(
            "INSERT INTO fleet_cases (clinic_id, case_id, revision, device_id, model_id, embedding, \
             diagnosis_code, diagnosis_name, label_confirmed, metadata, lesion_key, thumbnail_jpeg, \
             original_jpeg, created_at_ms, updated_at_ms, change_seq) \
             VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1, 1, nextval('fleet_change_seq'))",
        )
        .bind(viewer.clinic_id)
        .bind(&s.id)
        .bind(viewer.device_id)
        .bind(MODEL)
        .bind(pgvector::HalfVector::from_f32_slice(&at(s.similarity, 1 + (self.next as usize % (DIM - 1)))))
        .bind(s.code)
        .bind(name_of(s.code))
        .bind(s.confirmed)
        .bind(metadata)
        .bind(s.lesion.clone().unwrap_or_else(|| s.id.clone()))
        .bind(&thumb)
        .bind(&original)
        .execute(pool)
        .await
        .expect("fleet case");
        let shown = match (&original, viewer.allow_originals) {
            (Some(o), true) => o.clone(),
            _ => thumb.clone(),
        };
        self.images.insert(s.id.clone(), shown);
        self.thumbnails.insert(s.id.clone(), thumb);
        self.forbid(&s.id, s.lesion.as_deref());
        self.forbidden.push(viewer.clinic_name.clone());
        self.forbidden.push(viewer.clinic_id.to_string());
        self.forbidden.push(viewer.device_id.to_string());
    }

    async fn reference(&mut self, pool: &PgPool, s: &Seed) {
        self.next = NEXT_IMAGE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let thumb = jpeg(self.next);
        sqlx::query(
            "INSERT INTO reference_cases (case_id, revision, model_id, embedding, diagnosis_code, \
             diagnosis_name, label_confirmed, metadata, lesion_key, thumbnail_jpeg, created_at_ms, \
             updated_at_ms, change_seq) \
             VALUES ($1, 1, $2, $3, $4, $5, $6, $7, $8, $9, 1, 1, nextval('reference_change_seq'))",
        )
        .bind(&s.id)
        .bind(MODEL)
        .bind(pgvector::HalfVector::from_f32_slice(&at(s.similarity, 1 + (self.next as usize % (DIM - 1)))))
        .bind(s.code)
        .bind(name_of(s.code))
        .bind(s.confirmed)
        .bind(serde_json::json!({"age_years": 41, "sex": "male", "anatomical_site": "right shin-area", "lesion_id": s.lesion}))
        .bind(s.lesion.clone().unwrap_or_else(|| s.id.clone()))
        .bind(&thumb)
        .execute(pool)
        .await
        .expect("reference case");
        self.images.insert(s.id.clone(), thumb.clone());
        self.thumbnails.insert(s.id.clone(), thumb);
        self.forbid(&s.id, s.lesion.as_deref());
    }

    fn forbid(&mut self, id: &str, lesion: Option<&str>) {
        self.forbidden.push(id.to_owned());
        self.forbidden.extend(lesion.map(str::to_owned));
        for word in [
            "scapula-area",
            "shin-area",
            "female",
            "age_years",
            "\"sex\"",
        ] {
            self.forbidden.push(word.into());
        }
    }
}

fn request(k: usize) -> RagRequest {
    RagRequest {
        model_id: MODEL.into(),
        embedding: query_embedding(),
        k,
        photo_jpeg: None,
        thumbnail_jpeg: Some(jpeg(999_999)),
    }
}

fn config(url: &str, auth: VlmAuth, timeout_ms: u64) -> VlmConfig {
    key();
    VlmConfig {
        url: url.into(),
        model: "fake-gpt".into(),
        api_key_env: Some(KEY_ENV.into()),
        auth,
        timeout_ms,
        max_examples: 16,
        allow_plain_http: false,
    }
}

fn bearer() -> Option<ExpectKey> {
    Some(ExpectKey {
        header: "authorization",
        value: format!("Bearer {}", key()),
    })
}

async fn ask(pool: &PgPool, viewer: &Viewer, vlm: Option<&Vlm>, request: RagRequest) -> RagAnswer {
    tokio::time::timeout(WATCHDOG, rag::answer(pool, viewer, vlm, request))
        .await
        .expect("watchdog: rag::answer hung")
        .expect("rag::answer")
}

fn ids(answer: &RagAnswer) -> Vec<&str> {
    answer.cases.iter().map(|c| c.id.as_str()).collect()
}

/// A library of five cases for the checking-model tests: three fleet cases
/// of the viewer's clinic (one with an original) and two reference cases.
async fn five_cases(pool: &PgPool, viewer: &Viewer, lib: &mut Library) -> Vec<String> {
    let seeds = [
        (seed("mel", 0.95), true),
        (seed("nv", 0.9), false),
        (seed("nv", 0.7), true),
        (seed("bkl", 0.5), false),
        (seed("mel", 0.3), true),
    ];
    let mut order = Vec::new();
    for (mut s, fleet) in seeds {
        if fleet {
            s.original = true;
            lib.fleet(pool, viewer, &s).await;
        } else {
            lib.reference(pool, &s).await;
        }
        order.push(s.id);
    }
    order
}

const GOOD_REPLY: &str = "```json\n{\"differential\": [{\"code\": \"nv\", \"reason\": \"regular network like examples 2 and 3\", \"confidence\": 0.6}, {\"code\": \"mel\", \"reason\": \"some asymmetry\", \"confidence\": 0.3}]}\n```";

// ------------------------------------------------------------------- tests

#[tokio::test]
async fn the_model_sees_each_retrieved_case_in_order_and_its_answer_is_returned() {
    let Some(pool) = database("rag_model_answers").await else {
        return;
    };
    let viewer = clinic(&pool, "Clinic North-7", false).await;
    let mut lib = Library::default();
    let order = five_cases(&pool, &viewer, &mut lib).await;
    let fake = vlm::start(
        Behaviour::Reply(GOOD_REPLY.into()),
        &["bkl", "mel", "nv"],
        bearer(),
    )
    .await;
    let vlm = Vlm::new(&config(&fake.url, VlmAuth::Bearer, 30_000)).expect("vlm");
    let req = request(4);
    let query = req.thumbnail_jpeg.clone();
    let answer = ask(&pool, &viewer, Some(&vlm), req).await;

    let seen = fake.one();
    let problems = seen.check_against(&answer, &lib.images, query.as_deref(), &lib.forbidden);
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(answer.answered_by, AnsweredBy::Model, "{answer:?}");
    assert_eq!(answer.fallback_reason, None);
    assert_eq!(answer.model.as_deref(), Some("fake-gpt"));
    assert_eq!(ids(&answer), order[..4].to_vec());
    let sources: Vec<_> = answer.cases.iter().map(|c| c.source).collect();
    assert_eq!(
        sources,
        [
            WireSource::Fleet,
            WireSource::Reference,
            WireSource::Fleet,
            WireSource::Reference
        ]
    );
    let got: Vec<_> = answer
        .differential
        .iter()
        .map(|d| (d.code.as_str(), d.name.as_str(), d.score))
        .collect();
    assert_eq!(
        got,
        [
            ("nv", "Melanocytic nevus", Some(0.6)),
            ("mel", "Melanoma", Some(0.3))
        ]
    );
    assert_eq!(
        answer.differential[0].reason,
        "regular network like examples 2 and 3"
    );
    // The clinic does not allow originals: the thumbnails were shown even
    // though originals exist.
    for case in &answer.cases {
        assert_eq!(lib.images[&case.id], lib.thumbnails[&case.id]);
    }
}

#[tokio::test]
async fn originals_are_shown_where_the_clinic_allows_them_and_the_photo_is_the_query() {
    let Some(pool) = database("rag_originals").await else {
        return;
    };
    let viewer = clinic(&pool, "Clinic Originals-3", true).await;
    let mut lib = Library::default();
    let order = five_cases(&pool, &viewer, &mut lib).await;
    let fake = vlm::start(
        Behaviour::Reply(GOOD_REPLY.into()),
        &["bkl", "mel", "nv"],
        Some(ExpectKey {
            header: "api-key",
            value: key().into(),
        }),
    )
    .await;
    let vlm = Vlm::new(&config(&fake.url, VlmAuth::ApiKey, 30_000)).expect("vlm");
    let mut req = request(5);
    let photo = jpeg(424_242);
    req.photo_jpeg = Some(photo.clone());
    let answer = ask(&pool, &viewer, Some(&vlm), req).await;

    let seen = fake.one();
    let problems = seen.check_against(&answer, &lib.images, Some(&photo), &lib.forbidden);
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(
        seen.headers.get("authorization").is_none(),
        "Azure gets api-key only"
    );
    assert_eq!(answer.answered_by, AnsweredBy::Model);
    assert_eq!(ids(&answer), order);
    let originals_shown = answer
        .cases
        .iter()
        .filter(|c| lib.images[&c.id] != lib.thumbnails[&c.id])
        .count();
    assert_eq!(
        originals_shown, 3,
        "each fleet case's original, not its thumbnail"
    );
}

#[tokio::test]
async fn without_a_model_the_answer_is_the_similarity_weighted_vote() {
    let Some(pool) = database("rag_vote").await else {
        return;
    };
    let viewer = clinic(&pool, "Clinic Vote-1", false).await;
    let mut lib = Library::default();
    let order = five_cases(&pool, &viewer, &mut lib).await;
    let answer = ask(&pool, &viewer, None, request(5)).await;

    assert_eq!(answer.answered_by, AnsweredBy::Retrieval);
    assert_eq!(answer.fallback_reason.as_deref(), Some(fallback::NO_MODEL));
    assert_eq!(answer.model, None);
    assert_eq!(ids(&answer), order);
    for (case, expected) in answer.cases.iter().zip([0.95, 0.9, 0.7, 0.5, 0.3]) {
        // Stored as half floats: three significant digits.
        assert!(
            (case.similarity - expected).abs() < 2e-3,
            "{} vs {expected}",
            case.similarity
        );
    }
    // mel: 0.95 + 0.3, nv: 0.9 + 0.7, bkl: 0.5, over 3.35 in all.
    let sims: Vec<f32> = answer.cases.iter().map(|c| c.similarity).collect();
    let total: f32 = sims.iter().sum();
    let expect = [
        ("nv", (sims[1] + sims[2]) / total),
        ("mel", (sims[0] + sims[4]) / total),
        ("bkl", sims[3] / total),
    ];
    assert_eq!(answer.differential.len(), 3, "{:?}", answer.differential);
    for (got, (code, share)) in answer.differential.iter().zip(expect) {
        assert_eq!(got.code, code);
        let score = got.score.expect("a vote share");
        assert!((score - share).abs() < 1e-5, "{code}: {score} vs {share}");
    }
    assert!((expect[0].1 - 1.6 / 3.35).abs() < 2e-3);
}

#[tokio::test]
async fn one_case_per_lesion_its_most_similar_photograph() {
    let Some(pool) = database("rag_lesion_dedup").await else {
        return;
    };
    let viewer = clinic(&pool, "Clinic Lesions-2", false).await;
    let mut lib = Library::default();
    let lesion = format!("lesion-{}", Uuid::now_v7());
    // Ten photographs of one lesion nearer than anything else: the nearest
    // on the fleet side, nine on the reference side; then three other
    // lesions.
    let mut nearest = seed("mel", 0.98);
    nearest.lesion = Some(lesion.clone());
    lib.fleet(&pool, &viewer, &nearest).await;
    for i in 0..9 {
        let mut s = seed("mel", 0.97 - 0.01 * i as f32);
        s.lesion = Some(lesion.clone());
        lib.reference(&pool, &s).await;
    }
    let mut others = Vec::new();
    for sim in [0.6, 0.5, 0.4] {
        let s = seed("nv", sim);
        lib.reference(&pool, &s).await;
        others.push(s.id);
    }
    // k = 2 reads 8 rows per table first: all photographs of the one
    // lesion, so the second lesion is found only by the wider re-read.
    let answer = ask(&pool, &viewer, None, request(2)).await;
    assert_eq!(ids(&answer), [&nearest.id, &others[0]]);
    let answer = ask(&pool, &viewer, None, request(1)).await;
    assert_eq!(ids(&answer), [&nearest.id]);
    let answer = ask(&pool, &viewer, None, request(16)).await;
    assert_eq!(
        ids(&answer),
        [&nearest.id, &others[0], &others[1], &others[2]]
    );
}

#[tokio::test]
async fn another_clinics_cases_are_never_retrieved_nor_shown_to_the_model() {
    let Some(pool) = database("rag_clinic_isolation").await else {
        return;
    };
    let viewer = clinic(&pool, "Clinic Ours-5", false).await;
    let other = clinic(&pool, "Clinic Theirs-9", true).await;
    let mut ours = Library::default();
    let mut theirs = Library::default();
    // The other clinic's cases are the nearest of all.
    for sim in [0.99, 0.98, 0.97] {
        let mut s = seed("bcc", sim);
        s.original = true;
        theirs.fleet(&pool, &other, &s).await;
    }
    let mine = seed("nv", 0.5);
    ours.fleet(&pool, &viewer, &mine).await;
    let shared = seed("mel", 0.4);
    ours.reference(&pool, &shared).await;

    let fake = vlm::start(
        Behaviour::Reply(GOOD_REPLY.into()),
        &["mel", "nv"],
        bearer(),
    )
    .await;
    let vlm = Vlm::new(&config(&fake.url, VlmAuth::Bearer, 30_000)).expect("vlm");
    let req = request(16);
    let query = req.thumbnail_jpeg.clone();
    let answer = ask(&pool, &viewer, Some(&vlm), req).await;
    assert_eq!(ids(&answer), [&mine.id, &shared.id]);
    assert_eq!(answer.answered_by, AnsweredBy::Model);

    let seen = fake.one();
    let mut forbidden = ours.forbidden.clone();
    forbidden.extend(theirs.forbidden.iter().cloned());
    let problems = seen.check_against(&answer, &ours.images, query.as_deref(), &forbidden);
    assert!(problems.is_empty(), "{problems:#?}");
    // Not their photographs, and not their diagnosis among the allowed ones.
    for image in theirs.images.values().chain(theirs.thumbnails.values()) {
        assert!(seen.examples.iter().all(|(shown, _)| shown != image));
    }
    let system = seen.body["messages"][0]["content"].as_str().unwrap_or("");
    assert!(!system.contains("- bcc:"), "{system}");

    // The other clinic sees its own three and the reference case.
    let answer = ask(&pool, &other, None, request(16)).await;
    assert_eq!(answer.cases.len(), 4);
    assert!(!ids(&answer).contains(&mine.id.as_str()));
}

#[tokio::test]
async fn unconfirmed_cases_are_not_retrieved() {
    let Some(pool) = database("rag_confirmed_only").await else {
        return;
    };
    let viewer = clinic(&pool, "Clinic Confirmed-4", false).await;
    let mut lib = Library::default();
    let mut fleet_guess = seed("mel", 0.99);
    fleet_guess.confirmed = false;
    lib.fleet(&pool, &viewer, &fleet_guess).await;
    let mut reference_guess = seed("bcc", 0.98);
    reference_guess.confirmed = false;
    lib.reference(&pool, &reference_guess).await;
    let confirmed = seed("nv", 0.2);
    lib.fleet(&pool, &viewer, &confirmed).await;

    let answer = ask(&pool, &viewer, None, request(16)).await;
    assert_eq!(ids(&answer), [&confirmed.id]);
    assert_eq!(answer.differential.len(), 1);
    assert_eq!(answer.differential[0].code, "nv");
}

/// Runs one failing-model scenario on the five-case library and returns
/// the answer, after checking that it is the retrieval's and lists the
/// cases the model was (or would have been) shown.
async fn failing(
    test: &str,
    url: Option<String>,
    behaviour: Behaviour,
    timeout_ms: u64,
) -> Option<RagAnswer> {
    let pool = database(test).await?;
    let viewer = clinic(&pool, "Clinic Faults-6", false).await;
    let mut lib = Library::default();
    let order = five_cases(&pool, &viewer, &mut lib).await;
    let fake = vlm::start(behaviour, &["bkl", "mel", "nv"], bearer()).await;
    let url = url.unwrap_or_else(|| fake.url.clone());
    let vlm = Vlm::new(&config(&url, VlmAuth::Bearer, timeout_ms)).expect("vlm");
    let answer = ask(&pool, &viewer, Some(&vlm), request(5)).await;
    assert_eq!(answer.answered_by, AnsweredBy::Retrieval, "{answer:?}");
    assert_eq!(answer.model, None);
    assert_eq!(ids(&answer), order);
    let codes: Vec<_> = answer
        .differential
        .iter()
        .map(|d| d.code.as_str())
        .collect();
    assert_eq!(codes, ["nv", "mel", "bkl"], "the vote");
    for seen in fake.seen() {
        let problems = seen.check_against(
            &answer,
            &lib.images,
            request(5).thumbnail_jpeg.as_deref(),
            &lib.forbidden,
        );
        // The query thumbnail is made afresh but identically.
        assert!(problems.is_empty(), "{problems:#?}");
    }
    Some(answer)
}

#[tokio::test]
async fn a_garbage_answer_falls_back_to_retrieval() {
    if let Some(a) = failing("rag_garbage", None, Behaviour::Garbage, 30_000).await {
        assert_eq!(a.fallback_reason.as_deref(), Some(fallback::MALFORMED));
    }
}

#[tokio::test]
async fn prose_instead_of_json_falls_back_to_retrieval() {
    let reply = Behaviour::Reply("It looks like a melanoma to me.".into());
    if let Some(a) = failing("rag_prose", None, reply, 30_000).await {
        assert_eq!(a.fallback_reason.as_deref(), Some(fallback::MALFORMED));
    }
}

#[tokio::test]
async fn a_diagnosis_outside_the_label_set_falls_back_to_retrieval() {
    // "bcc" is a real diagnosis, but not one of this library's.
    let reply = Behaviour::Reply(
        r#"{"differential":[{"code":"nv","reason":"a"},{"code":"bcc","reason":"b"}]}"#.into(),
    );
    if let Some(a) = failing("rag_outside_labels", None, reply, 30_000).await {
        assert_eq!(a.fallback_reason.as_deref(), Some(fallback::OUTSIDE_LABELS));
    }
}

#[tokio::test]
async fn a_hanging_model_times_out_into_retrieval() {
    // The model never answers; the client's 300 ms deadline must end the
    // wait. The claim is the reason given, not how long it took.
    if let Some(a) = failing("rag_hang", None, Behaviour::Hang, 300).await {
        assert_eq!(a.fallback_reason.as_deref(), Some(fallback::TIMED_OUT));
    }
}

#[tokio::test]
async fn a_model_that_is_down_falls_back_to_retrieval() {
    let url = Some(vlm::closed_url());
    if let Some(a) = failing("rag_down", url, Behaviour::Garbage, 30_000).await {
        assert_eq!(a.fallback_reason.as_deref(), Some(fallback::UNREACHABLE));
    }
}

#[tokio::test]
async fn a_model_answering_503_falls_back_to_retrieval() {
    if let Some(a) = failing("rag_503", None, Behaviour::Status(503), 30_000).await {
        assert_eq!(a.fallback_reason.as_deref(), Some(fallback::UNREACHABLE));
    }
}

#[tokio::test]
async fn an_oversized_model_answer_is_not_read_past_the_cap() {
    if let Some(a) = failing("rag_oversized", None, Behaviour::Oversized, 30_000).await {
        assert_eq!(a.fallback_reason.as_deref(), Some(fallback::MALFORMED));
    }
}

#[tokio::test]
async fn bad_requests_are_refused_with_a_code_saying_why() {
    let Some(pool) = database("rag_validation").await else {
        return;
    };
    let viewer = clinic(&pool, "Clinic Strict-8", false).await;
    let refused = |req: RagRequest| {
        let pool = pool.clone();
        let viewer = viewer.clone();
        async move {
            tokio::time::timeout(WATCHDOG, rag::answer(&pool, &viewer, None, req))
                .await
                .expect("watchdog: rag::answer hung")
                .expect_err("refused")
        }
    };
    let mut r = request(0);
    assert_eq!(refused(r.clone()).await.code, codes::BAD_REQUEST);
    r.k = dermascope_cloud_api::MAX_RAG_K + 1;
    assert_eq!(refused(r).await.code, codes::BAD_REQUEST);

    let mut r = request(3);
    r.model_id = "other-enc".into();
    assert_eq!(refused(r).await.code, codes::UNKNOWN_MODEL);

    let mut r = request(3);
    r.embedding.push(0.0);
    let e = refused(r).await;
    assert_eq!(e.code, codes::BAD_EMBEDDING);
    assert!(e.message.contains(&DIM.to_string()), "{}", e.message);

    for bad in [f32::NAN, f32::INFINITY, 70_000.0] {
        let mut r = request(3);
        r.embedding[2] = bad;
        assert_eq!(refused(r).await.code, codes::BAD_EMBEDDING, "{bad}");
    }

    // This clinic keeps its photographs.
    let mut r = request(3);
    r.photo_jpeg = Some(jpeg(5));
    assert_eq!(refused(r).await.code, codes::ORIGINALS_NOT_ALLOWED);

    let mut r = request(3);
    r.thumbnail_jpeg = Some(b"GIF89a not a jpeg".to_vec());
    assert_eq!(refused(r).await.code, codes::BAD_PHOTO);

    let mut r = request(3);
    r.thumbnail_jpeg = Some(vec![0xff; dermascope_cloud_api::MAX_THUMBNAIL_BYTES + 1]);
    assert_eq!(refused(r).await.code, codes::TOO_LARGE);

    // A request within limits on an empty library: no cases, no vote.
    let answer = ask(&pool, &viewer, None, request(3)).await;
    assert!(answer.cases.is_empty() && answer.differential.is_empty());
}

#[tokio::test]
async fn an_empty_library_names_the_ham10000_classes_and_shows_no_examples() {
    let Some(pool) = database("rag_empty_library").await else {
        return;
    };
    let viewer = clinic(&pool, "Clinic Empty-0", false).await;
    let all = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"];
    let fake = vlm::start(Behaviour::Reply(GOOD_REPLY.into()), &all, bearer()).await;
    let vlm = Vlm::new(&config(&fake.url, VlmAuth::Bearer, 30_000)).expect("vlm");
    let mut req = request(4);
    req.thumbnail_jpeg = None;
    let answer = ask(&pool, &viewer, Some(&vlm), req).await;
    let seen = fake.one();
    let problems = seen.check_against(&answer, &HashMap::new(), None, &[]);
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(seen.query.1.contains("no image"), "{}", seen.query.1);
    assert_eq!(answer.answered_by, AnsweredBy::Model);
    assert!(answer.cases.is_empty());
}

#[tokio::test]
async fn retrieval_uses_the_partial_hnsw_index() {
    let Some(pool) = database("rag_uses_index").await else {
        return;
    };
    let viewer = clinic(&pool, "Clinic Index-1", false).await;
    let explain = |setting: &'static str| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.expect("tx");
            sqlx::query(setting).execute(&mut *tx).await.expect("set");
            sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan")
                .execute(&mut *tx)
                .await
                .expect("set");
            let plan: Vec<String> =
                sqlx::query_scalar(&format!("EXPLAIN {}", rag::retrieve::top_k_sql(DIM)))
                    .bind(pgvector::HalfVector::from_f32_slice(&query_embedding()))
                    .bind(MODEL)
                    .bind(viewer.clinic_id)
                    .bind(8_i64)
                    .fetch_all(&mut *tx)
                    .await
                    .expect("explain");
            plan.join("\n")
        }
    };
    // Tiny tables are cheaper to scan; the claim is that the index *can*
    // serve this query (expression and predicate match), so forbid scans.
    let plan = explain("SET LOCAL enable_seqscan = off").await;
    // The indexes `operator::add_model` made for this encoder.
    assert!(
        plan.contains("Index Scan using fleet_cases_hnsw_"),
        "{plan}"
    );
    assert!(
        plan.contains("Index Scan using reference_cases_hnsw_"),
        "{plan}"
    );
    // What `Search::Exact` sets: no approximate index at all.
    let plan = explain("SET LOCAL enable_indexscan = off").await;
    assert!(!plan.contains("hnsw"), "{plan}");
}

#[test]
fn a_missing_key_or_a_plain_http_remote_is_refused_at_start() {
    let mut c = config(
        "http://127.0.0.1:9/v1/chat/completions",
        VlmAuth::Bearer,
        1000,
    );
    c.api_key_env = Some("DERMASCOPE_RAG_TEST_NO_SUCH_KEY".into());
    assert!(matches!(
        Vlm::new(&c),
        Err(VlmSetupError::MissingKey { .. })
    ));
    let c = config(
        "http://models.example.org/v1/chat/completions",
        VlmAuth::Bearer,
        1000,
    );
    assert!(matches!(Vlm::new(&c), Err(VlmSetupError::PlainHttp)));
    let mut c = config(
        "https://models.example.org/v1/chat/completions",
        VlmAuth::Bearer,
        1000,
    );
    assert!(Vlm::new(&c).is_ok());
    c.url = "ftp://x/y".into();
    assert!(matches!(Vlm::new(&c), Err(VlmSetupError::BadUrl { .. })));
    let v = Vlm::new(&config("http://localhost:9/v1", VlmAuth::ApiKey, 1000)).expect("loopback");
    assert!(!format!("{v:?}").contains(key()), "Debug shows the key");
}

#[test]
fn the_vlm_section_parses_with_defaults_and_refuses_unknown_keys() {
    let c: VlmConfig = toml::from_str(
        "url = \"https://r.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21\"\n\
         model = \"gpt-4o\"\napi_key_env = \"AZURE_OPENAI_KEY\"\nauth = \"api_key\"\n",
    )
    .expect("parse");
    assert_eq!(c.auth, VlmAuth::ApiKey);
    assert_eq!(c.timeout_ms, 20_000);
    assert_eq!(c.max_examples, dermascope_cloud_api::MAX_RAG_K);
    assert!(
        toml::from_str::<VlmConfig>("url = \"x\"\nmodel = \"m\"\napi_key = \"sk-...\"\n").is_err()
    );
}

// -------------------------------------------------------------- over HTTP

/// A device's view of the service: its credential and an HTTP client.
struct Device {
    base: String,
    credential: String,
    client: reqwest::Client,
}

impl Device {
    async fn post<T: serde::Serialize>(
        &self,
        route: &str,
        body: &T,
    ) -> (reqwest::StatusCode, Vec<u8>) {
        let response = self
            .client
            .post(format!("{}{route}", self.base))
            .header(
                reqwest::header::AUTHORIZATION,
                dermascope_cloud_api::bearer(&self.credential),
            )
            .json(body)
            .send()
            .await
            .expect("the service answers");
        let status = response.status();
        (status, response.bytes().await.expect("a body").to_vec())
    }
}

fn wire_case(
    id: &str,
    code: &str,
    similarity: f32,
    side: usize,
    lesion: Option<&str>,
    thumb: Vec<u8>,
) -> dermascope_cloud_api::WireCase {
    dermascope_cloud_api::WireCase {
        id: id.into(),
        revision: 1,
        model_id: MODEL.into(),
        embedding: at(similarity, side),
        diagnosis: dermascope_cloud_api::WireDiagnosis {
            code: code.into(),
            name: name_of(code),
        },
        label_confirmed: true,
        metadata: dermascope_cloud_api::WireMetadata {
            age_years: Some(64),
            sex: Some("female".into()),
            anatomical_site: Some("upper back-left".into()),
            fitzpatrick_type: Some(3),
            lesion_id: lesion.map(str::to_owned),
        },
        created_at_ms: 1,
        updated_at_ms: 1,
        thumbnail_jpeg: thumb,
        original_jpeg: None,
        source: None,
        device_id: None,
    }
}

#[tokio::test]
async fn a_device_uploads_then_asks_over_http_and_the_model_sees_its_clinics_cases() {
    let Some(db) = database("rag_over_http").await else {
        return;
    };
    let fake = vlm::start(
        Behaviour::Reply(GOOD_REPLY.into()),
        &["mel", "nv"],
        bearer(),
    )
    .await;
    let mut config = dermascope_cloud::server::ServiceConfig::for_database(&db.url);
    config.vlm = Some(self::config(&fake.url, VlmAuth::Bearer, 30_000));
    let service = tokio::time::timeout(WATCHDOG, dermascope_cloud::server::start(config))
        .await
        .expect("watchdog: start")
        .expect("the service starts");
    let clinic = operator::add_clinic(&db, "Clinic Http-2", false)
        .await
        .expect("clinic");
    let cheap = dermascope_cloud::config::HashSettings {
        argon2_memory_kib: 256,
        argon2_iterations: 1,
        argon2_parallelism: 1,
    };
    let device = operator::add_device_with(&db, &clinic.clinic_id, "scope 1", &cheap)
        .await
        .expect("device");
    let other_clinic = operator::add_clinic(&db, "Clinic Elsewhere-4", false)
        .await
        .expect("clinic");
    let outsider = operator::add_device_with(&db, &other_clinic.clinic_id, "scope 9", &cheap)
        .await
        .expect("device");
    let client = reqwest::Client::builder()
        .timeout(WATCHDOG)
        .build()
        .expect("client");
    let ours = Device {
        base: service.base_url(),
        credential: device.credential.clone(),
        client: client.clone(),
    };
    let theirs = Device {
        base: service.base_url(),
        credential: outsider.credential.clone(),
        client,
    };

    // Two photographs of one lesion and one of another from our device; a
    // nearer case from the other clinic's device.
    let lesion = format!("lesion-{}", Uuid::now_v7());
    let ids: Vec<String> = (0..4).map(|_| Uuid::now_v7().to_string()).collect();
    let thumbs: Vec<Vec<u8>> = (0..4).map(|i| jpeg(777_000 + i)).collect();
    let batch = dermascope_cloud_api::UploadBatch {
        cases: vec![
            wire_case(&ids[0], "mel", 0.9, 1, Some(&lesion), thumbs[0].clone()),
            wire_case(&ids[1], "mel", 0.8, 2, Some(&lesion), thumbs[1].clone()),
            wire_case(&ids[2], "nv", 0.6, 3, None, thumbs[2].clone()),
        ],
    };
    let (status, body) = ours.post(dermascope_cloud_api::routes::CASES, &batch).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let batch = dermascope_cloud_api::UploadBatch {
        cases: vec![wire_case(&ids[3], "bcc", 0.99, 4, None, thumbs[3].clone())],
    };
    let (status, body) = theirs
        .post(dermascope_cloud_api::routes::CASES, &batch)
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let req = request(16);
    let (status, body) = ours.post(dermascope_cloud_api::routes::RAG, &req).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: RagAnswer = serde_json::from_slice(&body).expect("a RagAnswer");
    assert_eq!(answer.answered_by, AnsweredBy::Model, "{answer:?}");
    assert_eq!(self::ids(&answer), [&ids[0], &ids[2]]);
    let images: HashMap<String, Vec<u8>> = ids.iter().cloned().zip(thumbs).collect();
    let mut forbidden: Vec<String> = ids.clone();
    forbidden.extend([
        lesion.clone(),
        device.device_id.clone(),
        clinic.clinic_id.clone(),
        "Clinic Http-2".into(),
        "upper back-left".into(),
        "female".into(),
    ]);
    let problems =
        fake.one()
            .check_against(&answer, &images, req.thumbnail_jpeg.as_deref(), &forbidden);
    assert!(problems.is_empty(), "{problems:#?}");

    // A refusal over HTTP is a JSON body with a code.
    let mut photo = request(3);
    photo.photo_jpeg = Some(jpeg(5));
    let (status, body) = ours.post(dermascope_cloud_api::routes::RAG, &photo).await;
    assert_eq!(status, 403);
    let refusal: dermascope_cloud_api::ErrorBody =
        serde_json::from_slice(&body).expect("an ErrorBody");
    assert_eq!(refusal.code, codes::ORIGINALS_NOT_ALLOWED);

    // No credential, no answer.
    let anonymous = Device {
        credential: String::new(),
        ..ours
    };
    let (status, _) = anonymous
        .post(dermascope_cloud_api::routes::RAG, &request(3))
        .await;
    assert_eq!(status, 401);
    service.shutdown().await;
}

// ------------------------------------------------------ HNSW against exact

/// A seeded generator, so the library and the queries are the same on
/// every run.
struct XorShift(u64);

impl XorShift {
    fn unit(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    fn direction(&mut self) -> Vec<f32> {
        let v: Vec<f32> = (0..DIM).map(|_| self.unit()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        v.into_iter().map(|x| x / norm).collect()
    }
}

#[tokio::test]
async fn exact_search_is_brute_force_and_hnsw_recalls_it() {
    let Some(db) = database("rag_hnsw_recall").await else {
        return;
    };
    let viewer = clinic(&db, "Clinic Recall-1", false).await;
    let mut rng = XorShift(0x5eed_cafe_f00d);
    let n = 3000;
    let ids: Vec<String> = (0..n).map(|i| format!("ref-{i:05}")).collect();
    let embeddings: Vec<Vec<f32>> = (0..n).map(|_| rng.direction()).collect();
    let halves: Vec<pgvector::HalfVector> = embeddings
        .iter()
        .map(|e| pgvector::HalfVector::from_f32_slice(e))
        .collect();
    let thumb = jpeg(31_337);
    sqlx::query(
        "INSERT INTO reference_cases (case_id, revision, model_id, embedding, diagnosis_code, \
         diagnosis_name, label_confirmed, lesion_key, thumbnail_jpeg, created_at_ms, \
         updated_at_ms, change_seq) \
         SELECT id, 1, $3, e, 'nv', 'Melanocytic nevus', true, id, $4, 1, 1, \
                nextval('reference_change_seq') \
           FROM unnest($1::text[], $2::halfvec[]) AS t(id, e)",
    )
    .bind(&ids)
    .bind(&halves)
    .bind(MODEL)
    .bind(&thumb)
    .execute(&*db)
    .await
    .expect("bulk insert");

    let k = 10;
    let (mut found, mut wanted) = (0, 0);
    for _ in 0..20 {
        let query = rng.direction();
        let search = |s| rag::retrieve::top_k_with(&db, viewer.clinic_id, MODEL, DIM, &query, k, s);
        let exact = search(rag::retrieve::Search::Exact).await.expect("exact");
        let hnsw = search(rag::retrieve::Search::Hnsw).await.expect("hnsw");
        let mut brute: Vec<f32> = embeddings
            .iter()
            .map(|e| e.iter().zip(&query).map(|(a, b)| a * b).sum())
            .collect();
        brute.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(exact.len(), k);
        for (hit, expected) in exact.iter().zip(&brute) {
            // Half-float storage: three significant digits.
            assert!(
                (hit.similarity - expected).abs() < 3e-3,
                "exact search found {} where brute force has {expected}",
                hit.similarity
            );
        }
        let exact_ids: std::collections::HashSet<_> = exact.iter().map(|h| &h.case_id).collect();
        found += hnsw
            .iter()
            .filter(|h| exact_ids.contains(&h.case_id))
            .count();
        wanted += k;
    }
    let recall = found as f64 / wanted as f64;
    eprintln!("hnsw recall@{k} against exact over {n} cases: {recall:.3}");
    assert!(recall >= 0.9, "HNSW recall@{k} {recall:.3}");
}

#[tokio::test]
async fn max_examples_caps_what_is_retrieved_shown_and_listed() {
    let Some(pool) = database("rag_max_examples").await else {
        return;
    };
    let viewer = clinic(&pool, "Clinic Capped-3", false).await;
    let mut lib = Library::default();
    let order = five_cases(&pool, &viewer, &mut lib).await;
    let fake = vlm::start(
        Behaviour::Reply(GOOD_REPLY.into()),
        &["bkl", "mel", "nv"],
        bearer(),
    )
    .await;
    let mut c = config(&fake.url, VlmAuth::Bearer, 30_000);
    c.max_examples = 2;
    let vlm = Vlm::new(&c).expect("vlm");
    let req = request(5);
    let query = req.thumbnail_jpeg.clone();
    let answer = ask(&pool, &viewer, Some(&vlm), req).await;
    assert_eq!(ids(&answer), order[..2].to_vec());
    let problems = fake
        .one()
        .check_against(&answer, &lib.images, query.as_deref(), &lib.forbidden);
    assert!(problems.is_empty(), "{problems:#?}");
}
