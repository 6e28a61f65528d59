//! Retrieval in SQL: the most similar confirmed cases a clinic may see, one
//! per lesion.
//!
//! Cases of every encoder share one `halfvec` column; each encoder has a
//! partial HNSW index over `embedding::halfvec(<dim>)` with
//! `WHERE model_id = '<id>'` on both case tables (`operator::add_model`).
//! The queries below repeat that expression and predicate exactly, so the
//! planner can use the index: the dimension is written into the SQL (it
//! comes from the `models` table, an integer), and the model id is a
//! parameter planned with its value (`plan_cache_mode = force_custom_plan`),
//! since a generic plan cannot prove a partial index's predicate.

use dermascope_cloud_api::WireSource;
use pgvector::HalfVector;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::prompt::Label;

/// One retrieved case, before the answer is put together.
#[derive(Clone, Debug)]
pub struct Hit {
    pub case_id: String,
    pub source: WireSource,
    pub label: Label,
    pub lesion_key: String,
    pub similarity: f32,
}

/// Rows read per table before de-duplication, as a multiple of `k`: a
/// lesion photographed several times takes several of the nearest rows.
const OVERFETCH: usize = 4;
/// Most rows read per table in one round; HNSW's `ef_search` tops out at
/// 1000, and a query that still lacks `k` lesions after that many rows has
/// found all the library has near it.
const MAX_FETCH: usize = 1000;
/// The candidate list HNSW keeps at least: pgvector's default of 40
/// gave recall@10 of 0.53 at 100,000 cases (`scripts/bench cloud`).
const MIN_EF_SEARCH: usize = 200;

/// How the nearest cases are found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    /// The encoder's partial HNSW index (approximate; what requests use).
    Hnsw,
    /// A scan of every case of the encoder (exact; the baseline that
    /// benchmarks measure HNSW's latency and recall against).
    Exact,
}

/// The `k` most similar confirmed cases of `clinic_id`'s fleet and the
/// reference library embedded by `model_id`, one per lesion (its most
/// similar photograph), most similar first.
pub async fn top_k(
    pool: &PgPool,
    clinic_id: Uuid,
    model_id: &str,
    dim: usize,
    query: &[f32],
    k: usize,
) -> Result<Vec<Hit>, sqlx::Error> {
    top_k_with(pool, clinic_id, model_id, dim, query, k, Search::Hnsw).await
}

/// [`top_k`] with the search chosen.
pub async fn top_k_with(
    pool: &PgPool,
    clinic_id: Uuid,
    model_id: &str,
    dim: usize,
    query: &[f32],
    k: usize,
    search: Search,
) -> Result<Vec<Hit>, sqlx::Error> {
    let sql = top_k_sql(dim);
    let query = HalfVector::from_f32_slice(query);
    let mut fetch = (k * OVERFETCH).min(MAX_FETCH);
    loop {
        let mut tx = pool.begin().await?;
        let ef = fetch.clamp(MIN_EF_SEARCH, MAX_FETCH).to_string();
        // All transaction-local, in one round trip. Filtering by clinic and
        // confirmation after the index scan could leave fewer than `fetch`
        // rows; an iterative scan keeps going (its order is restored
        // below). A custom plan sees the model id's value, which a partial
        // index's predicate needs.
        sqlx::query(
            "SELECT set_config('hnsw.ef_search', $1, true), \
                    set_config('hnsw.iterative_scan', 'relaxed_order', true), \
                    set_config('plan_cache_mode', 'force_custom_plan', true), \
                    set_config('enable_indexscan', $2, true)",
        )
        .bind(&ef)
        .bind(if search == Search::Exact { "off" } else { "on" })
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(&sql)
            .bind(&query)
            .bind(model_id)
            .bind(clinic_id)
            .bind(i64::try_from(fetch).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;

        let (mut fleet_rows, mut reference_rows) = (0usize, 0usize);
        let mut hits = Vec::with_capacity(rows.len());
        for row in rows {
            let source = if row.try_get::<bool, _>("is_fleet")? {
                fleet_rows += 1;
                WireSource::Fleet
            } else {
                reference_rows += 1;
                WireSource::Reference
            };
            let distance: f64 = row.try_get("distance")?;
            hits.push(Hit {
                case_id: row.try_get("case_id")?,
                source,
                label: Label {
                    code: row.try_get("diagnosis_code")?,
                    name: row.try_get("diagnosis_name")?,
                },
                lesion_key: row.try_get("lesion_key")?,
                // `<#>` is the negative inner product.
                similarity: (-distance) as f32,
            });
        }
        let exhausted = fleet_rows < fetch && reference_rows < fetch;
        let kept = one_per_lesion(hits, k);
        if kept.len() >= k || exhausted || fetch >= MAX_FETCH {
            return Ok(kept);
        }
        fetch = (fetch * OVERFETCH).min(MAX_FETCH);
    }
}

/// Sorts most similar first (ties by source and id, for a stable answer)
/// and keeps each lesion's first case, up to `k`.
pub fn one_per_lesion(mut hits: Vec<Hit>, k: usize) -> Vec<Hit> {
    hits.sort_by(|a, b| {
        b.similarity
            .total_cmp(&a.similarity)
            .then((a.source == WireSource::Reference).cmp(&(b.source == WireSource::Reference)))
            .then(a.case_id.cmp(&b.case_id))
    });
    let mut seen = std::collections::HashSet::new();
    hits.into_iter()
        .filter(|h| seen.insert(h.lesion_key.clone()))
        .take(k)
        .collect()
}

/// The nearest-neighbour query over both tables for one dimension: each
/// half orders by the indexed expression and limits on its own, so each
/// can be an index scan; `$1` query, `$2` model id, `$3` clinic, `$4` rows
/// per table.
pub fn top_k_sql(dim: usize) -> String {
    let distance = format!("embedding::halfvec({dim}) <#> $1::halfvec({dim})");
    format!(
        "(SELECT true AS is_fleet, case_id, diagnosis_code, diagnosis_name, lesion_key, \
                 {distance} AS distance \
            FROM fleet_cases \
           WHERE model_id = $2 AND clinic_id = $3 AND label_confirmed \
           ORDER BY {distance} LIMIT $4) \
         UNION ALL \
         (SELECT false AS is_fleet, case_id, diagnosis_code, diagnosis_name, lesion_key, \
                 {distance} AS distance \
            FROM reference_cases \
           WHERE model_id = $2 AND label_confirmed \
           ORDER BY {distance} LIMIT $4)"
    )
}

/// Most labels named to the model: the prompt lists them all.
const MAX_LABELS: i64 = 200;

/// The distinct confirmed diagnoses the clinic's library holds for this
/// encoder (its fleet cases and the reference library), by code; a code
/// with several spellings of its name shows the first in sort order.
pub async fn library_labels(
    pool: &PgPool,
    clinic_id: Uuid,
    model_id: &str,
) -> Result<Vec<Label>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT diagnosis_code, min(diagnosis_name) AS diagnosis_name FROM ( \
             SELECT diagnosis_code, diagnosis_name FROM reference_cases \
              WHERE model_id = $1 AND label_confirmed \
             UNION ALL \
             SELECT diagnosis_code, diagnosis_name FROM fleet_cases \
              WHERE model_id = $1 AND clinic_id = $2 AND label_confirmed \
         ) d GROUP BY diagnosis_code ORDER BY diagnosis_code LIMIT $3",
    )
    .bind(model_id)
    .bind(clinic_id)
    .bind(MAX_LABELS)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(Label {
                code: row.try_get("diagnosis_code")?,
                name: row.try_get("diagnosis_name")?,
            })
        })
        .collect()
}

/// The photographs of the retrieved cases, in `hits`' order: the original
/// where one was uploaded and it is at most `max_original_bytes` (0: never),
/// else the thumbnail. Read
/// again scoped by clinic, so a case id can only ever name the clinic's
/// own row. `None` where the row vanished since retrieval (deleted).
pub async fn images(
    pool: &PgPool,
    clinic_id: Uuid,
    hits: &[Hit],
    max_original_bytes: usize,
) -> Result<Vec<Option<Vec<u8>>>, sqlx::Error> {
    let ids = |source: WireSource| -> Vec<String> {
        hits.iter()
            .filter(|h| h.source == source)
            .map(|h| h.case_id.clone())
            .collect()
    };
    let mut found: std::collections::HashMap<(bool, String), Vec<u8>> =
        std::collections::HashMap::new();
    let fleet = ids(WireSource::Fleet);
    if !fleet.is_empty() {
        let rows = sqlx::query(
            "SELECT case_id, CASE WHEN octet_length(original_jpeg) <= $3 \
                                  THEN original_jpeg ELSE thumbnail_jpeg END AS jpeg \
               FROM fleet_cases WHERE clinic_id = $1 AND case_id = ANY($2)",
        )
        .bind(clinic_id)
        .bind(&fleet)
        .bind(i64::try_from(max_original_bytes).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await?;
        for row in rows {
            found.insert((true, row.try_get("case_id")?), row.try_get("jpeg")?);
        }
    }
    let reference = ids(WireSource::Reference);
    if !reference.is_empty() {
        let rows = sqlx::query(
            "SELECT case_id, thumbnail_jpeg AS jpeg FROM reference_cases WHERE case_id = ANY($1)",
        )
        .bind(&reference)
        .fetch_all(pool)
        .await?;
        for row in rows {
            found.insert((false, row.try_get("case_id")?), row.try_get("jpeg")?);
        }
    }
    Ok(hits
        .iter()
        .map(|h| found.remove(&(h.source == WireSource::Fleet, h.case_id.clone())))
        .collect())
}

/// The dimension of a known encoder.
pub async fn model_dim(pool: &PgPool, model_id: &str) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar("SELECT dim FROM models WHERE model_id = $1")
        .bind(model_id)
        .fetch_optional(pool)
        .await
}
