//! Published bundles: the archive in 1 MiB chunks beside what the
//! operator's tool read from its verified manifest.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use super::Mode;
use crate::db;
use crate::error::CloudError;

/// Size of every stored piece of an archive but the last (the schema's).
pub const CHUNK_BYTES: usize = 1 << 20;

/// Largest archive the service stores: a bundle's own cap (8 GiB of
/// files) plus tar's headers, well inside `bigint` and `integer` chunk
/// numbers.
pub const MAX_ARCHIVE_BYTES: u64 = 9 << 30;

/// What the operator's tool read from a bundle's manifest after verifying
/// its signature. The service takes it as given: it cannot check it, and
/// devices verify the archive themselves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFacts {
    pub version: u64,
    pub downgrade: bool,
    /// `encoder`, `adapter`, `library`, `config`.
    pub carries: Vec<String>,
    pub encoder_model_id: Option<String>,
    /// Hex ed25519 public key that signed the manifest.
    pub signed_by: String,
    /// `bundle.toml` exactly as signed.
    pub manifest: String,
}

/// A published bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub bundle_id: String,
    pub version: u64,
    pub downgrade: bool,
    pub carries: Vec<String>,
    pub encoder_model_id: Option<String>,
    pub signed_by: String,
    pub archive_sha256: String,
    pub archive_size: u64,
    pub published_at: String,
}

/// The answer to [`publish_bundle`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub bundle: Bundle,
    /// This archive had been published before; nothing was written.
    pub already: bool,
    /// A dry run: nothing was written (`bundle_id` is then a placeholder
    /// unless `already`).
    pub dry_run: bool,
}

const PARTS: [&str; 4] = ["encoder", "adapter", "library", "config"];

fn check_facts(facts: &BundleFacts) -> Result<(), CloudError> {
    if facts.version == 0 || i64::try_from(facts.version).is_err() {
        return Err(CloudError::Invalid(format!(
            "bundle version {} is outside 1..=2^63-1",
            facts.version
        )));
    }
    if facts.signed_by.len() != 64
        || !facts
            .signed_by
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(CloudError::Invalid(
            "signed_by is not a lowercase hex ed25519 public key".into(),
        ));
    }
    if facts.carries.is_empty() || facts.carries.iter().any(|p| !PARTS.contains(&p.as_str())) {
        return Err(CloudError::Invalid(format!(
            "a bundle carries one or more of {PARTS:?}, not {:?}",
            facts.carries
        )));
    }
    if let Some(model) = &facts.encoder_model_id {
        if !crate::operator::is_model_id(model) {
            return Err(CloudError::Invalid(format!(
                "encoder model id {model:?} is not 1 to 128 characters of A-Z a-z 0-9 . _ -"
            )));
        }
    }
    if facts.manifest.is_empty() || facts.manifest.len() > (1 << 20) {
        return Err(CloudError::Invalid(
            "the manifest is empty or over 1 MiB".into(),
        ));
    }
    Ok(())
}

fn io_error(context: &str, path: &Path) -> impl FnOnce(std::io::Error) -> CloudError {
    let context = format!("{context} {}", path.display());
    move |e| CloudError::io(context, e)
}

/// sha256 and size of a file, on a blocking thread.
async fn hash_file(path: &Path) -> Result<(String, u64), CloudError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path).map_err(io_error("opening", &path))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(io_error("reading", &path))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            hasher.update(&buf[..n]);
        }
        Ok((hex::encode(hasher.finalize()), size))
    })
    .await
    .map_err(|e| CloudError::Invalid(format!("hashing task: {e}")))?
}

/// The next chunk of `file` (shorter only at the end), on a blocking thread.
async fn next_chunk(
    mut file: std::fs::File,
    path: PathBuf,
) -> Result<(std::fs::File, Vec<u8>), CloudError> {
    tokio::task::spawn_blocking(move || {
        let mut chunk = Vec::with_capacity(CHUNK_BYTES);
        (&mut file)
            .take(CHUNK_BYTES as u64)
            .read_to_end(&mut chunk)
            .map_err(io_error("reading", &path))?;
        Ok((file, chunk))
    })
    .await
    .map_err(|e| CloudError::Invalid(format!("reading task: {e}")))?
}

#[derive(sqlx::FromRow)]
struct BundleRow {
    bundle_id: Uuid,
    version: i64,
    downgrade: bool,
    carries: Vec<String>,
    encoder_model_id: Option<String>,
    signed_by: String,
    archive_sha256: String,
    archive_size: i64,
    published_at: String,
}

impl From<BundleRow> for Bundle {
    fn from(r: BundleRow) -> Bundle {
        Bundle {
            bundle_id: r.bundle_id.to_string(),
            version: u64::try_from(r.version).unwrap_or(0),
            downgrade: r.downgrade,
            carries: r.carries,
            encoder_model_id: r.encoder_model_id,
            signed_by: r.signed_by,
            archive_sha256: r.archive_sha256,
            archive_size: u64::try_from(r.archive_size).unwrap_or(0),
            published_at: r.published_at,
        }
    }
}

fn select_bundles(filter: &str) -> String {
    format!(
        "SELECT bundle_id, version, downgrade, carries, encoder_model_id, signed_by, \
                archive_sha256, archive_size, {} AS published_at \
         FROM bundles {filter}",
        db::rfc3339("published_at")
    )
}

async fn by_sha256(pool: &PgPool, sha256: &str) -> Result<Option<Bundle>, CloudError> {
    let row: Option<BundleRow> = sqlx::query_as(&select_bundles("WHERE archive_sha256 = $1"))
        .bind(sha256)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(Bundle::from))
}

/// Stores the archive at `archive` (chunked, in one transaction) with its
/// facts. The same archive published again returns the stored bundle with
/// `already` and writes nothing; so does a publisher that lost a race to
/// another publishing the same archive.
pub async fn publish_bundle(
    pool: &PgPool,
    facts: &BundleFacts,
    archive: &Path,
    mode: Mode,
) -> Result<Published, CloudError> {
    check_facts(facts)?;
    let (sha256, size) = hash_file(archive).await?;
    if size == 0 || size > MAX_ARCHIVE_BYTES {
        return Err(CloudError::Invalid(format!(
            "{}: an archive is 1 byte to {MAX_ARCHIVE_BYTES} bytes, this one is {size}",
            archive.display()
        )));
    }
    if let Some(bundle) = by_sha256(pool, &sha256).await? {
        return Ok(Published {
            bundle,
            already: true,
            dry_run: mode == Mode::DryRun,
        });
    }
    let carries = {
        let mut c = facts.carries.clone();
        c.sort();
        c.dedup();
        c
    };
    let bundle_id = Uuid::now_v7();
    if mode == Mode::DryRun {
        return Ok(Published {
            bundle: Bundle {
                bundle_id: bundle_id.to_string(),
                version: facts.version,
                downgrade: facts.downgrade,
                carries,
                encoder_model_id: facts.encoder_model_id.clone(),
                signed_by: facts.signed_by.clone(),
                archive_sha256: sha256,
                archive_size: size,
                published_at: String::new(),
            },
            already: false,
            dry_run: true,
        });
    }

    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO bundles (bundle_id, version, downgrade, carries, encoder_model_id, \
             signed_by, manifest, archive_sha256, archive_size) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (archive_sha256) DO NOTHING",
    )
    .bind(bundle_id)
    .bind(facts.version as i64)
    .bind(facts.downgrade)
    .bind(&carries)
    .bind(&facts.encoder_model_id)
    .bind(&facts.signed_by)
    .bind(&facts.manifest)
    .bind(&sha256)
    .bind(size as i64)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        tx.rollback().await?;
        let bundle = by_sha256(pool, &sha256).await?.ok_or_else(|| {
            CloudError::NotFound(format!("bundle with archive {sha256} vanished"))
        })?;
        return Ok(Published {
            bundle,
            already: true,
            dry_run: false,
        });
    }

    // Read again while storing, and hash again: a file changed since the
    // first pass must not be stored under the first pass's sha256.
    let mut file = std::fs::File::open(archive).map_err(io_error("opening", archive))?;
    let mut hasher = Sha256::new();
    let mut stored = 0u64;
    let mut idx: i32 = 0;
    loop {
        let (f, chunk) = next_chunk(file, archive.to_path_buf()).await?;
        file = f;
        if chunk.is_empty() {
            break;
        }
        hasher.update(&chunk);
        stored += chunk.len() as u64;
        sqlx::query("INSERT INTO bundle_chunks (bundle_id, idx, data) VALUES ($1, $2, $3)")
            .bind(bundle_id)
            .bind(idx)
            .bind(&chunk)
            .execute(&mut *tx)
            .await?;
        idx = idx
            .checked_add(1)
            .ok_or_else(|| CloudError::Invalid("archive has too many chunks".into()))?;
    }
    if stored != size || hex::encode(hasher.finalize()) != sha256 {
        tx.rollback().await?;
        return Err(CloudError::Conflict(format!(
            "{} changed while it was being published; nothing was stored",
            archive.display()
        )));
    }
    tx.commit().await?;
    tracing::info!(%bundle_id, version = facts.version, size, "bundle published");
    let bundle = by_sha256(pool, &sha256)
        .await?
        .ok_or_else(|| CloudError::NotFound(format!("bundle {bundle_id} vanished")))?;
    Ok(Published {
        bundle,
        already: false,
        dry_run: false,
    })
}

/// Every published bundle, newest version first.
pub async fn list_bundles(pool: &PgPool) -> Result<Vec<Bundle>, CloudError> {
    let rows: Vec<BundleRow> = sqlx::query_as(&select_bundles(
        "ORDER BY version DESC, published_at DESC, bundle_id",
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Bundle::from).collect())
}

/// A bundle by its id, or by its version when only one bundle has it.
pub async fn find_bundle(pool: &PgPool, bundle: &str) -> Result<Bundle, CloudError> {
    let bundle = bundle.trim();
    if let Ok(id) = Uuid::parse_str(bundle) {
        let row: Option<BundleRow> = sqlx::query_as(&select_bundles("WHERE bundle_id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await?;
        return row
            .map(Bundle::from)
            .ok_or_else(|| CloudError::NotFound(format!("no bundle {id}")));
    }
    let version: i64 = bundle.parse().map_err(|_| {
        CloudError::Invalid(format!(
            "{bundle:?} is neither a bundle id (a UUID) nor a version (a number)"
        ))
    })?;
    let rows: Vec<BundleRow> = sqlx::query_as(&select_bundles(
        "WHERE version = $1 ORDER BY published_at, bundle_id",
    ))
    .bind(version)
    .fetch_all(pool)
    .await?;
    match rows.len() {
        0 => Err(CloudError::NotFound(format!(
            "no published bundle has version {version} (see `dermascope-fleet bundle list`)"
        ))),
        1 => Ok(rows.into_iter().map(Bundle::from).next().ok_or_else(|| {
            CloudError::NotFound(format!("no published bundle has version {version}"))
        })?),
        _ => Err(CloudError::Invalid(format!(
            "{} bundles have version {version} ({}); name one by its id",
            rows.len(),
            rows.iter()
                .map(|r| r.bundle_id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// One stored chunk of an archive.
pub(crate) async fn read_chunk(
    pool: &PgPool,
    bundle_id: Uuid,
    idx: i32,
) -> Result<Vec<u8>, sqlx::Error> {
    sqlx::query_scalar("SELECT data FROM bundle_chunks WHERE bundle_id = $1 AND idx = $2")
        .bind(bundle_id)
        .bind(idx)
        .fetch_one(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> BundleFacts {
        BundleFacts {
            version: 3,
            downgrade: false,
            carries: vec!["adapter".into()],
            encoder_model_id: Some("enc-a".into()),
            signed_by: "ab".repeat(32),
            manifest: "format = 1\n".into(),
        }
    }

    #[test]
    fn facts_are_checked_before_anything_is_read() {
        assert!(check_facts(&facts()).is_ok());
        let mut f = facts();
        f.version = 0;
        assert!(check_facts(&f).is_err());
        let mut f = facts();
        f.version = u64::MAX;
        assert!(check_facts(&f).is_err());
        let mut f = facts();
        f.signed_by = "AB".repeat(32);
        assert!(check_facts(&f).is_err());
        let mut f = facts();
        f.carries = vec!["kernel".into()];
        assert!(check_facts(&f).is_err());
        let mut f = facts();
        f.carries.clear();
        assert!(check_facts(&f).is_err());
        let mut f = facts();
        f.encoder_model_id = Some("a'b".into());
        assert!(check_facts(&f).is_err());
    }
}
