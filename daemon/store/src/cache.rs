//! The index cache: the in-memory index's rows in one contiguous file next
//! to the sled database, so opening a store is one sequential read instead
//! of a walk over sled's pages.
//!
//! sled stays the source of truth. A cache file records the store
//! *generation* it was written at (a counter bumped, in the same sled
//! transaction, by every acknowledged write); it is used only when its
//! generation is not newer than sled's, and the writes since then are
//! replayed from sled's `changes` tree. Anything else (missing, foreign,
//! truncated, checksum mismatch, newer than sled) makes `open` fall back to
//! a full scan of the embeddings tree and rewrite the cache.
//!
//! Layout, all little-endian:
//!
//! ```text
//! magic "DSIDXC" 0x00 0x02 | kind u8 (1 f32, 2 int8) | 3 zero bytes
//! dim u64 | count u64 | generation u64
//! meta_len u64 | meta_crc u32 | rows_len u64 | rows_crc u32
//! model_len u16 | model id bytes | header_crc u32 (of everything before it)
//! meta: count x (id u16+bytes, code u8+bytes, source u8, flags u8,
//!       [site u16+bytes]), then corrupt entries: u32 count x
//!       (id u16+bytes, tree u8, reason u32+bytes), then the sign bits'
//!       centre: dim f32 and the rows it is the mean of, u64
//! rows: f32 -> count*dim f32; int8 -> count*dim i8, then count f32 steps;
//!       then (both kinds) count*ceil(dim/8) bytes of sign bits
//! ```
//!
//! Format 2 added the sign bits (the coarse search pass). The last two
//! bytes of the magic are the format: a cache of any other format is not
//! read (the index is rebuilt from sled and the cache rewritten), since
//! its sections have other sizes.
//!
//! Written to a temporary file, fsynced, renamed over the old one and the
//! directory fsynced, so a crash leaves either the old or the new cache.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::case::{CaseId, CaseSource};
use crate::index::{CaseTags, FlatIndex, LoadedSigns};
use crate::report::CorruptEntry;

const MAGIC: [u8; 8] = *b"DSIDXC\x00\x02";
const FORMAT: u16 = 2;
const FIXED_HEADER: usize = 8 + 4 + 8 * 3 + 8 + 4 + 8 + 4 + 2;
/// Large enough that syscalls are not the cost, small enough to stay in L2.
const CHUNK: usize = 1 << 20;

const FLAG_CONFIRMED: u8 = 1;
const FLAG_HAS_SITE: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheKind {
    F32,
    Int8,
}

impl CacheKind {
    pub fn file_name(self) -> &'static str {
        match self {
            CacheKind::F32 => "index-f32.cache",
            CacheKind::Int8 => "index-int8.cache",
        }
    }

    fn byte(self) -> u8 {
        match self {
            CacheKind::F32 => 1,
            CacheKind::Int8 => 2,
        }
    }

    fn row_bytes(self, dim: usize) -> usize {
        let signs = crate::index::sign_bytes_per_row(dim);
        match self {
            CacheKind::F32 => dim * 4 + signs,
            // The row and its f32 step.
            CacheKind::Int8 => dim + 4 + signs,
        }
    }
}

pub(crate) fn path(dir: &Path, kind: CacheKind) -> PathBuf {
    dir.join(kind.file_name())
}

/// Why a cache file was not used; becomes the reason logged for a rescan.
#[derive(Debug)]
pub(crate) enum Miss {
    Missing,
    Invalid(String),
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Miss::Missing => f.write_str("no index cache"),
            Miss::Invalid(why) => write!(f, "index cache unusable: {why}"),
        }
    }
}

fn invalid(why: impl Into<String>) -> Miss {
    Miss::Invalid(why.into())
}

fn io_miss(e: io::Error) -> Miss {
    if e.kind() == io::ErrorKind::NotFound {
        Miss::Missing
    } else if e.kind() == io::ErrorKind::UnexpectedEof {
        invalid("file is truncated")
    } else {
        invalid(format!("read failed: {e}"))
    }
}

pub(crate) struct Header {
    pub generation: u64,
    pub count: usize,
    meta_len: usize,
    meta_crc: u32,
    rows_crc: u32,
}

/// What a cache file holds, ready for `FlatIndex::load_rows`.
pub(crate) struct Loaded {
    pub generation: u64,
    pub ids: Vec<CaseId>,
    pub tags: Vec<CaseTags>,
    pub corrupt: Vec<CorruptEntry>,
    pub vectors: Vec<f32>,
    pub quantized: Option<(Vec<i8>, Vec<f32>)>,
    pub signs: LoadedSigns,
}

fn read_header(
    file: &mut File,
    kind: CacheKind,
    dim: usize,
    model_id: &str,
) -> Result<Header, Miss> {
    let mut fixed = [0u8; FIXED_HEADER];
    file.read_exact(&mut fixed).map_err(io_miss)?;
    let mut r = Reader(&fixed);
    let magic = r.take(8)?;
    if magic[..6] == MAGIC[..6] && magic != MAGIC {
        let format = u16::from_be_bytes([magic[6], magic[7]]);
        return Err(invalid(format!(
            "written in cache format {format}; this build reads format {FORMAT} \
             (rebuilding it from the database)"
        )));
    }
    if magic != MAGIC {
        return Err(invalid("not a Dermascope index cache (bad magic)"));
    }
    let kind_byte = r.take(4)?[0];
    if kind_byte != kind.byte() {
        return Err(invalid(format!("holds kind {kind_byte}, not {kind:?}")));
    }
    let file_dim = r.u64()?;
    let count = usize::try_from(r.u64()?).map_err(|_| invalid("row count too large"))?;
    let generation = r.u64()?;
    let meta_len = usize::try_from(r.u64()?).map_err(|_| invalid("meta too large"))?;
    let meta_crc = r.u32()?;
    let rows_len = usize::try_from(r.u64()?).map_err(|_| invalid("rows too large"))?;
    let rows_crc = r.u32()?;
    let model_len = r.u16()? as usize;
    let mut rest = vec![0u8; model_len + 4];
    file.read_exact(&mut rest).map_err(io_miss)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&fixed);
    hasher.update(&rest[..model_len]);
    let stored = u32::from_le_bytes([
        rest[model_len],
        rest[model_len + 1],
        rest[model_len + 2],
        rest[model_len + 3],
    ]);
    if hasher.finalize() != stored {
        return Err(invalid("header checksum mismatch"));
    }
    if file_dim != dim as u64 || &rest[..model_len] != model_id.as_bytes() {
        return Err(invalid(format!(
            "written for model {:?} dim {file_dim}, not {model_id:?} dim {dim}",
            String::from_utf8_lossy(&rest[..model_len])
        )));
    }
    let expected_rows = count
        .checked_mul(kind.row_bytes(dim))
        .ok_or_else(|| invalid("row count too large"))?;
    if rows_len != expected_rows {
        return Err(invalid(format!(
            "{rows_len} row bytes for {count} rows of dim {dim}"
        )));
    }
    // Checked before allocating anything sized by `count` or `meta_len`, so
    // a garbled length cannot make us reserve gigabytes; the sum is checked
    // too, since lengths that wrap it could match the file's size.
    let total = ((FIXED_HEADER + model_len + 4) as u64)
        .checked_add(meta_len as u64)
        .and_then(|t| t.checked_add(rows_len as u64))
        .ok_or_else(|| invalid("section lengths overflow"))?;
    let on_disk = file
        .metadata()
        .map_err(|e| invalid(format!("stat failed: {e}")))?
        .len();
    if on_disk != total {
        return Err(invalid(format!(
            "file is {on_disk} bytes; its header describes {total}"
        )));
    }
    Ok(Header {
        generation,
        count,
        meta_len,
        meta_crc,
        rows_crc,
    })
}

/// Only the generation and row count of a cache file (for pruning the
/// change log and sizing a rescan), or `None` if it has no valid header.
pub(crate) fn peek(dir: &Path, kind: CacheKind, dim: usize, model_id: &str) -> Option<Header> {
    let mut file = File::open(path(dir, kind)).ok()?;
    read_header(&mut file, kind, dim, model_id).ok()
}

pub(crate) fn load(
    dir: &Path,
    kind: CacheKind,
    dim: usize,
    model_id: &str,
) -> Result<Loaded, Miss> {
    let mut file = File::open(path(dir, kind)).map_err(io_miss)?;
    let header = read_header(&mut file, kind, dim, model_id)?;
    let mut meta = vec![0u8; header.meta_len];
    file.read_exact(&mut meta).map_err(io_miss)?;
    if crc32fast::hash(&meta) != header.meta_crc {
        return Err(invalid("meta checksum mismatch"));
    }
    let (ids, tags, corrupt, (centre, centred_at)) = decode_meta(&meta, header.count, dim)?;
    drop(meta);

    let n = header.count * dim;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let (vectors, quantized) = match kind {
        CacheKind::F32 => {
            // Zeroed allocation is lazily mapped, so pages are touched once,
            // by the decode below.
            let mut vectors = vec![0f32; n];
            for out in vectors.chunks_mut(CHUNK / 4) {
                let bytes = &mut buf[..out.len() * 4];
                file.read_exact(bytes).map_err(io_miss)?;
                crc.update(bytes);
                for (x, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            (vectors, None)
        }
        CacheKind::Int8 => {
            let mut quantized = vec![0i8; n];
            for out in quantized.chunks_mut(CHUNK) {
                let bytes = &mut buf[..out.len()];
                file.read_exact(bytes).map_err(io_miss)?;
                crc.update(bytes);
                for (x, &b) in out.iter_mut().zip(bytes.iter()) {
                    *x = b as i8;
                }
            }
            let mut step_bytes = vec![0u8; header.count * 4];
            file.read_exact(&mut step_bytes).map_err(io_miss)?;
            crc.update(&step_bytes);
            let steps: Vec<f32> = step_bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if steps.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                return Err(invalid("an int8 step is not a positive number"));
            }
            (Vec::new(), Some((quantized, steps)))
        }
    };
    let mut bits = vec![0u8; header.count * crate::index::sign_bytes_per_row(dim)];
    for out in bits.chunks_mut(CHUNK) {
        file.read_exact(out).map_err(io_miss)?;
        crc.update(out);
    }
    if crc.finalize() != header.rows_crc {
        return Err(invalid("rows checksum mismatch"));
    }
    if kind == CacheKind::F32 && vectors.iter().any(|x| !x.is_finite()) {
        return Err(invalid("a stored component is not finite"));
    }
    Ok(Loaded {
        generation: header.generation,
        ids,
        tags,
        corrupt,
        vectors,
        quantized,
        signs: LoadedSigns {
            centre,
            centred_at,
            bits,
        },
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Miss> {
        if self.0.len() < n {
            return Err(invalid("meta section truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Miss> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Miss> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Miss> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, Miss> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self, len: usize) -> Result<String, Miss> {
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| invalid("text is not UTF-8"))
    }
}

type Meta = (
    Vec<CaseId>,
    Vec<CaseTags>,
    Vec<CorruptEntry>,
    (Vec<f32>, usize),
);

fn decode_meta(bytes: &[u8], count: usize, dim: usize) -> Result<Meta, Miss> {
    let mut r = Reader(bytes);
    // Each row takes at least 6 bytes, which bounds a garbled count.
    if count > bytes.len() / 6 {
        return Err(invalid("row count exceeds the meta section"));
    }
    let mut ids = Vec::with_capacity(count);
    let mut tags = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.u16()? as usize;
        let id = CaseId::new(r.string(len)?).map_err(|e| invalid(e.to_string()))?;
        let len = r.u8()? as usize;
        let diagnosis_code = r.string(len)?;
        let source = r.u8()?;
        let source =
            CaseSource::from_byte(source).ok_or_else(|| invalid(format!("source {source}")))?;
        let flags = r.u8()?;
        let anatomical_site = if flags & FLAG_HAS_SITE != 0 {
            let len = r.u16()? as usize;
            Some(r.string(len)?)
        } else {
            None
        };
        ids.push(id);
        tags.push(CaseTags {
            diagnosis_code,
            source,
            anatomical_site,
            label_confirmed: flags & FLAG_CONFIRMED != 0,
        });
    }
    let corrupt_count = r.u32()? as usize;
    let mut corrupt = Vec::new();
    for _ in 0..corrupt_count {
        let len = r.u16()? as usize;
        let id = r.string(len)?;
        let tree = tree_name(r.u8()?).ok_or_else(|| invalid("unknown tree"))?;
        let len = r.u32()? as usize;
        let reason = r.string(len)?;
        corrupt.push(CorruptEntry { id, tree, reason });
    }
    // The dimension was checked against the store's before this point, and
    // `take` bounds it by the section's length before anything is allocated.
    let centre_bytes = dim
        .checked_mul(4)
        .ok_or_else(|| invalid("dimension too large"))?;
    let centre: Vec<f32> = r
        .take(centre_bytes)?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if centre.iter().any(|c| !c.is_finite()) {
        return Err(invalid("a sign-bit centre component is not finite"));
    }
    let centred_at =
        usize::try_from(r.u64()?).map_err(|_| invalid("sign-bit centre count too large"))?;
    if !r.0.is_empty() {
        return Err(invalid("trailing bytes after the meta section"));
    }
    Ok((ids, tags, corrupt, (centre, centred_at)))
}

fn tree_byte(tree: &str) -> u8 {
    match tree {
        "cases" => 0,
        _ => 1,
    }
}

fn tree_name(b: u8) -> Option<&'static str> {
    match b {
        0 => Some("cases"),
        1 => Some("embeddings"),
        _ => None,
    }
}

fn encode_meta(index: &FlatIndex, corrupt: &[CorruptEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(index.len() * 32);
    for (id, tags) in index.row_tags() {
        // Lengths were bounded by Case::validate (id <= 256, code <= 64,
        // site <= 1024 bytes), so the narrow length fields cannot truncate.
        let id = id.as_str().as_bytes();
        out.extend_from_slice(&(id.len() as u16).to_le_bytes());
        out.extend_from_slice(id);
        let code = tags.diagnosis_code.as_bytes();
        out.push(code.len() as u8);
        out.extend_from_slice(code);
        out.push(tags.source.to_byte());
        let mut flags = 0;
        if tags.label_confirmed {
            flags |= FLAG_CONFIRMED;
        }
        if tags.anatomical_site.is_some() {
            flags |= FLAG_HAS_SITE;
        }
        out.push(flags);
        if let Some(site) = &tags.anatomical_site {
            out.extend_from_slice(&(site.len() as u16).to_le_bytes());
            out.extend_from_slice(site.as_bytes());
        }
    }
    out.extend_from_slice(&(corrupt.len() as u32).to_le_bytes());
    for entry in corrupt {
        let id = &entry.id.as_bytes()[..entry.id.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(id.len() as u16).to_le_bytes());
        out.extend_from_slice(id);
        out.push(tree_byte(entry.tree));
        out.extend_from_slice(&(entry.reason.len() as u32).to_le_bytes());
        out.extend_from_slice(entry.reason.as_bytes());
    }
    let (_, _, centre, centred_at) = index.sign_bits();
    out.extend(centre.iter().flat_map(|c| c.to_le_bytes()));
    out.extend_from_slice(&(centred_at as u64).to_le_bytes());
    out
}

/// Writes the index's `kind` rows as the cache for `generation`. The caller
/// guarantees the index is exactly sled's content at that generation.
/// Returns the bytes written.
pub(crate) fn write(
    dir: &Path,
    kind: CacheKind,
    index: &FlatIndex,
    generation: u64,
    model_id: &str,
    corrupt: &[CorruptEntry],
) -> io::Result<u64> {
    let missing = || io::Error::other(format!("{kind:?} rows are not resident"));
    let final_path = path(dir, kind);
    let tmp_path = dir.join(format!("{}.tmp", kind.file_name()));
    let result = (|| {
        let meta = encode_meta(index, corrupt);
        let dim = index.dim();
        let model = &model_id.as_bytes()[..model_id.len().min(u16::MAX as usize)];
        let header_len = FIXED_HEADER + model.len() + 4;
        let mut out = BufWriter::with_capacity(CHUNK, crate::private::create_file(&tmp_path)?);
        out.write_all(&vec![0u8; header_len])?;
        out.write_all(&meta)?;
        let mut crc = crc32fast::Hasher::new();
        let mut rows_len = 0usize;
        let mut emit = |bytes: &[u8], out: &mut BufWriter<File>| -> io::Result<()> {
            crc.update(bytes);
            rows_len += bytes.len();
            out.write_all(bytes)
        };
        let mut buf = Vec::with_capacity(CHUNK);
        match kind {
            CacheKind::F32 => {
                let rows = index.f32_rows().ok_or_else(missing)?;
                for chunk in rows.chunks(CHUNK / 4) {
                    buf.clear();
                    buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                    emit(&buf, &mut out)?;
                }
            }
            CacheKind::Int8 => {
                let (rows, steps) = index.int8_rows().ok_or_else(missing)?;
                for chunk in rows.chunks(CHUNK) {
                    buf.clear();
                    buf.extend(chunk.iter().map(|&x| x as u8));
                    emit(&buf, &mut out)?;
                }
                buf.clear();
                buf.extend(steps.iter().flat_map(|x| x.to_le_bytes()));
                emit(&buf, &mut out)?;
            }
        }
        let (bits, ..) = index.sign_bits();
        for chunk in bits.chunks(CHUNK) {
            emit(chunk, &mut out)?;
        }
        let mut header = Vec::with_capacity(header_len);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&[kind.byte(), 0, 0, 0]);
        header.extend_from_slice(&(dim as u64).to_le_bytes());
        header.extend_from_slice(&(index.len() as u64).to_le_bytes());
        header.extend_from_slice(&generation.to_le_bytes());
        header.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(&meta).to_le_bytes());
        header.extend_from_slice(&(rows_len as u64).to_le_bytes());
        header.extend_from_slice(&crc.finalize().to_le_bytes());
        header.extend_from_slice(&(model.len() as u16).to_le_bytes());
        header.extend_from_slice(model);
        let header_crc = crc32fast::hash(&header);
        header.extend_from_slice(&header_crc.to_le_bytes());
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&header)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp_path, &final_path)?;
        // The rename itself must be durable before the change log it
        // covers is pruned.
        File::open(dir)?.sync_all()?;
        Ok((header_len + meta.len() + rows_len) as u64)
    })();
    if result.is_err() {
        // Best effort: a leftover temp file is never read, only overwritten.
        let _ = fs::remove_file(&tmp_path);
    }
    result
}
