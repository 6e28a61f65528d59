//! The store's header in the meta tree: format version, encoder identity and
//! write generation, written at creation and checked (or migrated) at open.

use std::path::Path;

use tracing::info;

use super::error::{storage, StoreError};
use super::trees::Trees;

/// The encoder a store belongs to. Embeddings of different models (or
/// dimensions) are not comparable, so a store only ever holds one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreIdentity {
    pub model_id: String,
    pub embedding_dim: usize,
}

/// Version of the on-disk layout (tree names, meta keys, value layouts).
///
/// 2 added the write generation and the `changes` tree that validate the
/// index cache. Version 1 stores are upgraded in place when opened (they
/// lack only those); the bump keeps a version-1 build, which would write
/// without bumping the generation and so make a cache look current, from
/// opening an upgraded store.
///
/// 3 made inserts refuse stored ids (changes are updates with a revision),
/// added the device id and revision to case records (layout 3), the revision
/// to outbox values, and the originals tree. Version 1 and 2 stores are
/// upgraded in place: their records and empty outbox values read as
/// revision 1. The bump keeps a version-2 build, which would overwrite cases
/// and clear a newer revision's upload, from opening an upgraded store.
pub const FORMAT_VERSION: u32 = 3;

const KEY_FORMAT: &str = "format_version";
const KEY_MODEL: &str = "model_id";
const KEY_DIM: &str = "embedding_dim";
/// Number of acknowledged-or-attempted writes; bumped in each write's transaction.
pub(super) const KEY_GENERATION: &str = "generation";

pub(super) fn check_or_write_header(
    db: &sled::Db,
    trees: &Trees,
    path: &Path,
    identity: &StoreIdentity,
) -> Result<u64, StoreError> {
    let meta = &trees.meta;
    let read = |key: &str| meta.get(key).map_err(storage("reading the store header"));
    let bad = |reason: &str| StoreError::BadHeader {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    let Some(format) = read(KEY_FORMAT)? else {
        let has_data = !trees.cases.is_empty() || !trees.embeddings.is_empty() || !meta.is_empty();
        if has_data {
            return Err(StoreError::NotACaseStore {
                path: path.to_path_buf(),
            });
        }
        // A new store. The header goes in one batch and is flushed before
        // any case can be written, so a store never holds headerless cases.
        let mut batch = sled::Batch::default();
        batch.insert(KEY_FORMAT, &FORMAT_VERSION.to_le_bytes());
        batch.insert(KEY_MODEL, identity.model_id.as_bytes());
        batch.insert(KEY_DIM, &(identity.embedding_dim as u64).to_le_bytes());
        batch.insert(KEY_GENERATION, &0u64.to_le_bytes());
        meta.apply_batch(batch)
            .map_err(storage("writing the store header"))?;
        db.flush().map_err(storage("flushing the store header"))?;
        info!(model_id = %identity.model_id, dim = identity.embedding_dim, "new case store created");
        return Ok(0);
    };
    let format: [u8; 4] = format
        .as_ref()
        .try_into()
        .map_err(|_| bad("format version is not 4 bytes"))?;
    let mut found = u32::from_le_bytes(format);
    if found == 1 || found == 2 {
        // Version 1 lacks the generation (and the change log, created empty
        // on open); both older versions' values are read as they are (see
        // FORMAT_VERSION). Stamping the keys in one flushed batch means no
        // older build writes to this store again.
        let mut batch = sled::Batch::default();
        batch.insert(KEY_FORMAT, &FORMAT_VERSION.to_le_bytes());
        if found == 1 {
            batch.insert(KEY_GENERATION, &0u64.to_le_bytes());
        }
        meta.apply_batch(batch)
            .map_err(storage("upgrading the store header"))?;
        db.flush()
            .map_err(storage("flushing the upgraded store header"))?;
        info!(
            from = found,
            to = FORMAT_VERSION,
            "case store format upgraded"
        );
        found = FORMAT_VERSION;
    }
    if found != FORMAT_VERSION {
        return Err(StoreError::FormatMismatch {
            path: path.to_path_buf(),
            found,
            expected: FORMAT_VERSION,
        });
    }
    let StoreIdentity {
        model_id: store_model,
        embedding_dim: store_dim,
    } = read_identity(meta, path)?;
    if store_model != identity.model_id || store_dim != identity.embedding_dim {
        return Err(StoreError::ModelMismatch {
            path: path.to_path_buf(),
            store_model,
            store_dim,
            encoder_model: identity.model_id.clone(),
            encoder_dim: identity.embedding_dim,
        });
    }
    let generation = read(KEY_GENERATION)?.ok_or_else(|| bad("write generation missing"))?;
    let generation: [u8; 8] = generation
        .as_ref()
        .try_into()
        .map_err(|_| bad("write generation is not 8 bytes"))?;
    Ok(u64::from_le_bytes(generation))
}

/// The encoder identity recorded in a store's header.
pub(super) fn read_identity(meta: &sled::Tree, path: &Path) -> Result<StoreIdentity, StoreError> {
    let read = |key: &str| meta.get(key).map_err(storage("reading the store header"));
    let bad = |reason: &str| StoreError::BadHeader {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    let model = read(KEY_MODEL)?.ok_or_else(|| bad("model id missing"))?;
    let store_model =
        String::from_utf8(model.to_vec()).map_err(|_| bad("model id is not UTF-8"))?;
    let dim = read(KEY_DIM)?.ok_or_else(|| bad("embedding dimension missing"))?;
    let dim: [u8; 8] = dim
        .as_ref()
        .try_into()
        .map_err(|_| bad("embedding dimension is not 8 bytes"))?;
    let store_dim = usize::try_from(u64::from_le_bytes(dim))
        .map_err(|_| bad("embedding dimension does not fit this machine"))?;
    Ok(StoreIdentity {
        model_id: store_model,
        embedding_dim: store_dim,
    })
}
