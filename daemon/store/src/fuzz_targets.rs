//! Fuzz targets for the store's readers of its own files, which a garbled
//! disk, a copied-in store or a bug in an older build can fill with
//! anything: `case-record` (every value layout of `codec.rs`) and
//! `index-cache` (`cache.rs`). Both are crate-private, so they are fuzzed
//! from inside the crate; the harness is `dermascope_testkit::fuzz`.
//!
//! Seeds: `fuzz/corpus/<target>/`, real values (the format-2 fixture
//! store's, and what this build writes). `DERMASCOPE_FUZZ_WRITE_CORPUS=1`
//! rewrites the ones this build writes; otherwise every seed must still
//! decode, so the corpus stays valid input.

use std::path::Path;

use dermascope_testkit::fuzz::proptest::prelude::*;
use dermascope_testkit::fuzz::{self, At, Fuzzer, Seed, TrackingAllocator};

use crate::cache::{self, CacheKind};
use crate::case::{Case, CaseId, CaseMetadata, CaseSource, Diagnosis, Sex};
use crate::codec;
use crate::index::{FlatIndex, Residency};
use crate::report::CorruptEntry;

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

/// Where inputs are written to be read back: memory where the OS offers it,
/// since a disk turns each rewrite (and the round trip's fsyncs) into
/// milliseconds.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}

fn writing_corpus() -> bool {
    std::env::var_os("DERMASCOPE_FUZZ_WRITE_CORPUS").is_some_and(|v| v == "1")
}

fn fixture_store() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format2-store")
}

fn write_seed(target: &str, name: &str, bytes: &[u8]) {
    let dir = fuzz::corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// A small but real thumbnail: a dark disc on skin tone, as JPEG.
fn thumbnail_jpeg() -> Vec<u8> {
    let (w, h) = (48u32, 48u32);
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let d = ((x as f32 - 24.0).powi(2) + (y as f32 - 22.0).powi(2)).sqrt();
            let px = if d < 14.0 {
                [92, 58, 40]
            } else {
                [222, 178, 150]
            };
            rgb.extend_from_slice(&px);
        }
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
        .encode(&rgb, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

fn unit_vector(dim: usize, seed: u32) -> Vec<f32> {
    let v: Vec<f32> = (0..dim)
        .map(|i| (0.7 * (i as f32 + seed as f32)).sin())
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

const CORPUS_MODEL: &str = "fuzz-corpus-encoder-v1";
const CORPUS_DIM: usize = 16;
const FIXTURE_MODEL: &str = "fixture-encoder-v1";
const FIXTURE_DIM: usize = 8;

fn corpus_case(i: u32) -> Case {
    let codes = ["nv", "mel", "bcc", "bkl"];
    Case {
        id: if i.is_multiple_of(3) {
            // The shape of CaseId::generate's ids, fixed so the corpus is reproducible.
            CaseId::new(format!("0193a4f2-7c1e-7{i:03x}-8000-00000000{i:04x}")).unwrap()
        } else {
            CaseId::new(format!("ISIC_09{i:05}")).unwrap()
        },
        embedding: unit_vector(CORPUS_DIM, i),
        diagnosis: Diagnosis::from_code(codes[i as usize % codes.len()]).unwrap(),
        source: CaseSource::ALL[i as usize % 3],
        metadata: CaseMetadata {
            age_years: Some(30 + i as u16),
            sex: Some(if i.is_multiple_of(2) {
                Sex::Female
            } else {
                Sex::Male
            }),
            anatomical_site: (!i.is_multiple_of(4))
                .then(|| ["back", "face", "lower extremity"][i as usize % 3].into()),
            fitzpatrick_type: Some(1 + (i % 6) as u8),
            note: (i == 1).then(|| "follow-up in 3 months".into()),
            lesion_id: Some(format!("HAM_09{:05}", i / 2)),
        },
        thumbnail_jpeg: thumbnail_jpeg(),
        model_id: CORPUS_MODEL.into(),
        created_at_ms: 1_764_000_000_000 + u64::from(i),
        updated_at_ms: 1_764_000_000_000 + u64::from(i) * 2,
        label_confirmed: i % 2 == 1,
        device_id: i
            .is_multiple_of(3)
            .then(|| "0193a4f2-7c1e-7000-8000-00000000abcd".into()),
        revision: 1 + u64::from(i % 3),
    }
}

// --------------------------------------------------------------- case-record

const RECORD: &str = "case-record";
const RECORD_DIMS: [usize; 2] = [FIXTURE_DIM, CORPUS_DIM];
/// Layout bytes, small lengths and magic-ish values the decoders branch on.
const RECORD_TOKENS: &[&[u8]] = &[
    &[1],
    &[2],
    &[3],
    &[0],
    &[0xff, 0xff, 0xff, 0xff, 0x0f],
    &[0x80, 0x80, 0x80, 0x80, 0x10],
    &[0xff, 0xd8, 0xff],
    b"nv",
    b"mel",
];

fn write_record_corpus() {
    let cases: Vec<Case> = (0..3).map(corpus_case).collect();
    for (i, case) in cases.iter().enumerate() {
        write_seed(
            RECORD,
            &format!("case-v3-{i}.bin"),
            &codec::encode_case(case).unwrap(),
        );
        write_seed(
            RECORD,
            &format!("embedding-dim16-{i}.bin"),
            &codec::encode_embedding(case),
        );
    }
    let ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
    write_seed(RECORD, "change-3-ids.bin", &codec::encode_change(&ids));
    let row = codec::row_checksum(&codec::encode_embedding(&cases[0])).unwrap();
    write_seed(
        RECORD,
        "adapter-row-hidden8.bin",
        &codec::encode_adapter_row("adapter-0123456789abcdef", row, &unit_vector(8, 9)),
    );
    write_seed(
        RECORD,
        "original-v1.bin",
        &codec::encode_original(&thumbnail_jpeg()),
    );
    write_seed(
        RECORD,
        "outbox-revision-3.bin",
        &codec::encode_outbox_revision(3),
    );
    // The values a format-2 build wrote, taken from the fixture store.
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_store()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    let db = sled::open(copy.path()).unwrap();
    for tree in ["cases", "embeddings", "changes", "outbox"] {
        for (n, item) in db.open_tree(tree).unwrap().iter().enumerate() {
            let (_, value) = item.unwrap();
            write_seed(RECORD, &format!("fixture-{tree}-{n}.bin"), &value);
        }
    }
}

/// What every decoder makes of `bytes`; whatever decodes must survive
/// being written again unchanged.
fn decode_record_bytes(bytes: &[u8]) -> Result<(), String> {
    if let Ok(record) = codec::decode_case(bytes) {
        let case = record.into_case(Vec::new());
        let again = codec::encode_case(&case).map_err(|e| format!("re-encoding failed: {e}"))?;
        let back = codec::decode_case(&again)
            .map_err(|e| format!("a re-encoded record does not decode: {e}"))?
            .into_case(Vec::new());
        if back != case {
            return Err(format!(
                "decode(encode(decoded)) differs: {back:?} vs {case:?}"
            ));
        }
    }
    for dim in RECORD_DIMS {
        if let Ok((_, raw)) = codec::decode_embedding(bytes, dim) {
            if codec::decode_f32_le(raw).len() != dim {
                return Err(format!(
                    "an embedding row of dim {dim} decoded to another length"
                ));
            }
        }
    }
    if let Ok(ids) = codec::decode_change(bytes) {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        if codec::encode_change(&ids) != bytes {
            return Err("a decoded change entry re-encodes to other bytes".into());
        }
    }
    if let Ok(row) = codec::decode_adapter_row(bytes) {
        let again = codec::encode_adapter_row(&row.adapter_id, row.source_checksum, &row.vector);
        if again != bytes {
            return Err("a decoded adapter row re-encodes to other bytes".into());
        }
    }
    if let Ok(jpeg) = codec::decode_original(bytes) {
        if codec::encode_original(jpeg) != bytes {
            return Err("a decoded original re-encodes to other bytes".into());
        }
    }
    if let Ok(revision) = codec::decode_outbox_revision(bytes) {
        if !bytes.is_empty() && codec::encode_outbox_revision(revision) != bytes {
            return Err("a decoded outbox value re-encodes to other bytes".into());
        }
    }
    Ok(())
}

/// Fixes a value's CRC after a mutation, so the decoder behind it runs.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() >= 5 {
        let crc = crc32fast::hash(&bytes[5..]);
        bytes[1..5].copy_from_slice(&crc.to_le_bytes());
    }
    bytes
}

fn arb_text(max: usize) -> impl Strategy<Value = String> {
    prop::string::string_regex(&format!("\\PC{{0,{max}}}")).unwrap()
}

fn arb_case() -> impl Strategy<Value = Case> {
    let id = prop_oneof![
        "[A-Za-z0-9_.-]{1,40}",
        prop::string::string_regex("\\PC{1,80}").unwrap()
    ]
    .prop_filter("ids are at most 256 bytes", |s| s.len() <= 256);
    let diagnosis = prop_oneof![
        prop::sample::select(Diagnosis::ham10000_codes().collect::<Vec<_>>())
            .prop_map(|c| Diagnosis::from_code(c).unwrap()),
        ("[a-z_]{1,64}", arb_text(40)).prop_map(|(c, n)| Diagnosis::new(c, n).unwrap()),
    ];
    let metadata = (
        any::<Option<u16>>(),
        prop::option::of(prop::sample::select(vec![
            Sex::Female,
            Sex::Male,
            Sex::Other,
        ])),
        prop::option::of(arb_text(200))
            .prop_filter("site", |s| s.as_ref().is_none_or(|s| s.len() <= 1024)),
        prop::option::of(1u8..=6),
        prop::option::of(any::<String>()),
        prop::option::of(arb_text(60)),
    )
        .prop_map(
            |(age_years, sex, anatomical_site, fitzpatrick_type, note, lesion_id)| CaseMetadata {
                age_years,
                sex,
                anatomical_site,
                fitzpatrick_type,
                note,
                lesion_id,
            },
        );
    let embedding = prop::sample::select(vec![1usize, 8, 16, 300])
        .prop_flat_map(|dim| prop::collection::vec(-1.0f32..1.0, dim));
    (
        (
            id,
            embedding,
            diagnosis,
            prop::sample::select(CaseSource::ALL.to_vec()),
            metadata,
        ),
        (
            prop::collection::vec(any::<u8>(), 0..600),
            arb_text(40),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            prop::option::of("[a-z0-9-]{1,128}"),
            1..=u64::MAX,
        ),
    )
        .prop_map(
            |(
                (id, embedding, diagnosis, source, metadata),
                (
                    thumbnail_jpeg,
                    model_id,
                    created_at_ms,
                    updated_at_ms,
                    label_confirmed,
                    device_id,
                    revision,
                ),
            )| Case {
                id: CaseId::new(id).unwrap(),
                embedding,
                diagnosis,
                source,
                metadata,
                thumbnail_jpeg,
                model_id,
                created_at_ms,
                updated_at_ms,
                label_confirmed,
                device_id,
                revision,
            },
        )
}

fn record_round_trip(case: Case) -> Result<(), String> {
    let bytes = codec::encode_case(&case).map_err(|e| format!("encode failed: {e}"))?;
    let back = codec::decode_case(&bytes)
        .map_err(|e| format!("decode(encode(case)) failed: {e}"))?
        .into_case(case.embedding.clone());
    if back != case {
        return Err("decode(encode(case)) != case".into());
    }
    let row = codec::encode_embedding(&case);
    let (tags, raw) = codec::decode_embedding(&row, case.embedding.len())
        .map_err(|e| format!("decode(encode(embedding row)) failed: {e}"))?;
    if tags != codec::tags_of(&case) || codec::decode_f32_le(raw) != case.embedding {
        return Err("decode(encode(embedding row)) differs".into());
    }
    let ids = [case.id.as_str(), case.diagnosis.code.as_str()];
    if codec::decode_change(&codec::encode_change(&ids)).as_deref()
        != Ok(&ids.map(String::from)[..])
    {
        return Err("decode(encode(change)) differs".into());
    }
    let checksum = codec::row_checksum(&row).ok_or("no checksum on a row")?;
    let adapter = codec::decode_adapter_row(&codec::encode_adapter_row(
        &case.model_id,
        checksum,
        &case.embedding,
    ))
    .map_err(|e| format!("decode(encode(adapter row)) failed: {e}"))?;
    if (
        adapter.adapter_id.as_str(),
        adapter.source_checksum,
        &adapter.vector,
    ) != (case.model_id.as_str(), checksum, &case.embedding)
    {
        return Err("decode(encode(adapter row)) differs".into());
    }
    if codec::decode_original(&codec::encode_original(&case.thumbnail_jpeg))
        != Ok(&case.thumbnail_jpeg[..])
    {
        return Err("decode(encode(original)) differs".into());
    }
    if codec::decode_outbox_revision(&codec::encode_outbox_revision(case.revision))
        != Ok(case.revision)
    {
        return Err("decode(encode(outbox)) differs".into());
    }
    Ok(())
}

#[test]
fn fuzz_case_record() {
    if writing_corpus() {
        write_record_corpus();
    }
    let seeds = fuzz::seeds(RECORD);
    for seed in &seeds {
        let decodes = codec::decode_case(&seed.bytes).is_ok()
            || RECORD_DIMS
                .iter()
                .any(|&d| codec::decode_embedding(&seed.bytes, d).is_ok())
            || codec::decode_change(&seed.bytes).is_ok()
            || codec::decode_adapter_row(&seed.bytes).is_ok()
            || codec::decode_original(&seed.bytes).is_ok()
            || codec::decode_outbox_revision(&seed.bytes).is_ok();
        assert!(
            decodes,
            "seed {} is not a value this build reads",
            seed.name
        );
    }
    let mut fuzzer = Fuzzer::new(RECORD);
    fuzzer.check(
        "mutants",
        fuzz::mutants(seeds.clone(), RECORD_TOKENS),
        |m| decode_record_bytes(&m.bytes),
    );
    fuzzer.check(
        "resealed-mutants",
        fuzz::mutants(seeds, RECORD_TOKENS).prop_map(|mut m| {
            m.bytes = reseal(m.bytes);
            m
        }),
        |m| decode_record_bytes(&m.bytes),
    );
    fuzzer.check("random-bytes", fuzz::random_bytes(512), |b| {
        decode_record_bytes(&b)
    });
    fuzzer.check(
        "resealed-random-bytes",
        fuzz::random_bytes(512).prop_map(reseal),
        |b| decode_record_bytes(&b),
    );
    fuzzer.check("round-trip", arb_case(), record_round_trip);
    fuzzer.finish();
}

// --------------------------------------------------------------- index-cache

const CACHE: &str = "index-cache";
const CACHE_TOKENS: &[&[u8]] = &[
    b"DSIDXC\x00\x02",
    b"DSIDXC\x00\x01",
    &[1, 0, 0, 0],
    &[2, 0, 0, 0],
    &[0xff; 8],
];

/// The store a cache seed belongs to, from its file name.
fn cache_params(name: &str) -> (CacheKind, usize, &'static str) {
    let kind = if name.contains("int8") {
        CacheKind::Int8
    } else {
        CacheKind::F32
    };
    if name.starts_with("fixture-") {
        (kind, FIXTURE_DIM, FIXTURE_MODEL)
    } else {
        (kind, CORPUS_DIM, CORPUS_MODEL)
    }
}

fn corpus_index() -> (FlatIndex, Vec<CorruptEntry>) {
    let mut index = FlatIndex::with_residency(CORPUS_DIM, Residency::Both).unwrap();
    for i in 0..12 {
        let case = corpus_case(i);
        index
            .upsert(case.id.clone(), &case.embedding, &codec::tags_of(&case))
            .unwrap();
    }
    let corrupt = vec![CorruptEntry {
        id: "ISIC_0999999".into(),
        tree: "cases",
        reason: "checksum mismatch".into(),
    }];
    (index, corrupt)
}

fn write_cache_corpus() {
    // The fixture store's own caches are of cache format 1, which this
    // build refuses (tests/store.rs checks that); its seeds are the caches
    // this build writes for the same store.
    let store_dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_store()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), store_dir.path().join(entry.file_name())).unwrap();
        }
    }
    let identity = crate::StoreIdentity {
        model_id: FIXTURE_MODEL.into(),
        embedding_dim: FIXTURE_DIM,
    };
    drop(crate::CaseStore::open(store_dir.path(), identity).unwrap());
    for name in ["index-f32.cache", "index-int8.cache"] {
        let bytes = std::fs::read(store_dir.path().join(name)).unwrap();
        write_seed(CACHE, &format!("fixture-{name}"), &bytes);
    }
    let (index, corrupt) = corpus_index();
    let dir = tempfile::tempdir().unwrap();
    for kind in [CacheKind::F32, CacheKind::Int8] {
        cache::write(dir.path(), kind, &index, 41, CORPUS_MODEL, &corrupt).unwrap();
        let bytes = std::fs::read(cache::path(dir.path(), kind)).unwrap();
        write_seed(CACHE, &format!("store-{}", kind.file_name()), &bytes);
    }
}

/// Loads `bytes` as the cache a store of (kind, dim, model) would read,
/// and checks what it returns.
fn load_cache_bytes(dir: &Path, bytes: &[u8], seed: &str) -> Result<(), String> {
    let (kind, dim, model) = cache_params(seed);
    std::fs::write(cache::path(dir, kind), bytes).map_err(|e| e.to_string())?;
    let header = cache::peek(dir, kind, dim, model);
    let Ok(loaded) = cache::load(dir, kind, dim, model) else {
        return Ok(());
    };
    let n = loaded.ids.len();
    let header = header.ok_or("load accepted a file whose header peek refused")?;
    if header.count != n || header.generation != loaded.generation || loaded.tags.len() != n {
        return Err(format!(
            "{n} ids, {} tags, header says {}",
            loaded.tags.len(),
            header.count
        ));
    }
    match (kind, &loaded.quantized) {
        (CacheKind::F32, None) if loaded.vectors.len() == n * dim => {}
        (CacheKind::Int8, Some((rows, steps))) if rows.len() == n * dim && steps.len() == n => {}
        _ => return Err("the rows loaded do not match the row count".into()),
    }
    // What was accepted must load into an index.
    let mut index = FlatIndex::with_residency(
        dim,
        if kind == CacheKind::F32 {
            Residency::F32
        } else {
            Residency::Int8
        },
    )
    .map_err(|e| e.to_string())?;
    let tags = loaded.tags.iter().map(|t| index.row_tags_for(t)).collect();
    // Duplicate ids are the one thing left to the index to refuse.
    let _ = index.load_rows(
        loaded.ids,
        tags,
        loaded.vectors,
        loaded.quantized,
        Some(loaded.signs),
    );
    Ok(())
}

/// A header field of the cache layout (byte offset, width).
#[derive(Clone, Copy, Debug)]
enum Field {
    Kind,
    Dim,
    Count,
    Generation,
    MetaLen,
    RowsLen,
    ModelLen,
}

impl Field {
    fn span(self) -> (usize, usize) {
        match self {
            Field::Kind => (8, 1),
            Field::Dim => (12, 8),
            Field::Count => (20, 8),
            Field::Generation => (28, 8),
            Field::MetaLen => (36, 8),
            Field::RowsLen => (48, 8),
            Field::ModelLen => (60, 2),
        }
    }
}

/// Structure-aware edits of a cache file: they know which fields must agree
/// (rows = count x row bytes, header + meta + rows = file length) and make
/// them agree, or not, on purpose.
#[derive(Clone, Debug)]
enum CacheEdit {
    Set(Field, u64),
    Add(Field, i8),
    /// rows_len := count x row bytes (wrapping).
    MatchRows,
    /// Sets the field so header + meta + rows wraps to the file's length.
    WrapTotal(Field),
    Resize(At),
}

const FIXED: usize = 62;

fn read_field(b: &[u8], f: Field) -> u64 {
    let (at, w) = f.span();
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + w) {
        a[..w].copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn write_field(b: &mut [u8], f: Field, v: u64) {
    let (at, w) = f.span();
    if let Some(s) = b.get_mut(at..at + w) {
        s.copy_from_slice(&v.to_le_bytes()[..w]);
    }
}

/// Recomputes the three checksums from the layout the header now declares.
fn reseal_cache(b: &mut [u8]) {
    if b.len() < FIXED {
        return;
    }
    let model_len = read_field(b, Field::ModelLen) as usize;
    let header_end = FIXED + model_len;
    if b.len() < header_end + 4 {
        return;
    }
    let crc = crc32fast::hash(&b[..header_end]);
    b[header_end..header_end + 4].copy_from_slice(&crc.to_le_bytes());
    let body = header_end + 4;
    let meta_len = (read_field(b, Field::MetaLen) as usize).min(b.len() - body);
    let meta_crc = crc32fast::hash(&b[body..body + meta_len]);
    b[44..48].copy_from_slice(&meta_crc.to_le_bytes());
    let rows_crc = crc32fast::hash(&b[body + meta_len..]);
    b[56..60].copy_from_slice(&rows_crc.to_le_bytes());
    // The header checksum covers the two just written.
    let crc = crc32fast::hash(&b[..header_end]);
    b[header_end..header_end + 4].copy_from_slice(&crc.to_le_bytes());
}

fn apply_cache_edits(seed: &[u8], name: &str, edits: &[CacheEdit]) -> Vec<u8> {
    let (kind, dim, _) = cache_params(name);
    let signs = crate::index::sign_bytes_per_row(dim) as u64;
    let row_bytes = match kind {
        CacheKind::F32 => dim as u64 * 4 + signs,
        CacheKind::Int8 => dim as u64 + 4 + signs,
    };
    let mut b = seed.to_vec();
    for e in edits {
        match *e {
            CacheEdit::Set(f, v) => write_field(&mut b, f, v),
            CacheEdit::Add(f, d) => {
                let v = read_field(&b, f).wrapping_add_signed(i64::from(d));
                write_field(&mut b, f, v)
            }
            CacheEdit::MatchRows => {
                let rows = read_field(&b, Field::Count).wrapping_mul(row_bytes);
                write_field(&mut b, Field::RowsLen, rows)
            }
            CacheEdit::WrapTotal(f) => {
                let header = (FIXED as u64 + 4).wrapping_add(read_field(&b, Field::ModelLen));
                let others = header
                    .wrapping_add(read_field(&b, Field::MetaLen))
                    .wrapping_add(read_field(&b, Field::RowsLen))
                    .wrapping_sub(read_field(&b, f));
                let len = b.len() as u64;
                write_field(&mut b, f, len.wrapping_sub(others))
            }
            CacheEdit::Resize(at) => {
                let len = at.index(b.len() * 2 + 1);
                b.resize(len, 0)
            }
        }
    }
    reseal_cache(&mut b);
    b
}

fn cache_edit() -> impl Strategy<Value = CacheEdit> {
    let field = prop::sample::select(vec![
        Field::Kind,
        Field::Dim,
        Field::Count,
        Field::Generation,
        Field::MetaLen,
        Field::RowsLen,
        Field::ModelLen,
    ]);
    let value = prop_oneof![
        0u64..64,
        prop::sample::select(vec![
            u64::MAX,
            u64::MAX / 2,
            1 << 32,
            1 << 40,
            u64::from(u32::MAX)
        ]),
        any::<u64>(),
    ];
    prop_oneof![
        3 => (field.clone(), value).prop_map(|(f, v)| CacheEdit::Set(f, v)),
        3 => (field.clone(), any::<i8>()).prop_map(|(f, d)| CacheEdit::Add(f, d)),
        2 => Just(CacheEdit::MatchRows),
        2 => prop::sample::select(vec![Field::MetaLen, Field::RowsLen, Field::Count])
            .prop_map(CacheEdit::WrapTotal),
        1 => any::<u64>().prop_map(|a| CacheEdit::Resize(At(a))),
    ]
}

#[derive(Clone, Debug)]
struct EditedCache {
    seed: String,
    // Read through Debug, in a failure's report.
    #[allow(dead_code)]
    edits: Vec<CacheEdit>,
    bytes: Vec<u8>,
}

fn edited_caches(seeds: Vec<Seed>) -> impl Strategy<Value = EditedCache> {
    let seeds = std::sync::Arc::new(seeds);
    (0..seeds.len(), prop::collection::vec(cache_edit(), 1..=5)).prop_map(move |(i, edits)| {
        EditedCache {
            bytes: apply_cache_edits(&seeds[i].bytes, &seeds[i].name, &edits),
            seed: seeds[i].name.clone(),
            edits,
        }
    })
}

/// Header fields set to a lie, every other length then made consistent with
/// the lie (rows = count x row bytes, header + meta + rows = the file's
/// length, both wrapping) and the checksums recomputed: so the one lie
/// meets the reader's cross-checks instead of being caught by the first.
fn consistent_lies(seeds: Vec<Seed>) -> impl Strategy<Value = EditedCache> {
    let lie = (
        prop::sample::select(vec![
            Field::Count,
            Field::Dim,
            Field::MetaLen,
            Field::RowsLen,
            Field::ModelLen,
        ]),
        prop_oneof![
            0u64..64,
            prop::sample::select(vec![
                u64::MAX,
                u64::MAX / 2,
                1 << 32,
                1 << 40,
                u64::from(u32::MAX)
            ]),
            any::<u64>(),
        ],
    );
    let seeds = std::sync::Arc::new(seeds);
    (0..seeds.len(), prop::collection::vec(lie, 1..=2)).prop_map(move |(i, lies)| {
        let mut edits: Vec<CacheEdit> = lies.iter().map(|&(f, v)| CacheEdit::Set(f, v)).collect();
        let lied = |f: Field| {
            lies.iter()
                .any(|(l, _)| std::mem::discriminant(l) == std::mem::discriminant(&f))
        };
        if !lied(Field::RowsLen) {
            edits.push(CacheEdit::MatchRows);
        }
        if !lied(Field::MetaLen) {
            edits.push(CacheEdit::WrapTotal(Field::MetaLen));
        }
        EditedCache {
            bytes: apply_cache_edits(&seeds[i].bytes, &seeds[i].name, &edits),
            seed: seeds[i].name.clone(),
            edits,
        }
    })
}

fn arb_index() -> impl Strategy<Value = (usize, Residency, Vec<Case>, Vec<CorruptEntry>)> {
    let corrupt = prop::collection::vec(
        (
            arb_text(40),
            prop::sample::select(vec!["cases", "embeddings"]),
            arb_text(80),
        )
            .prop_map(|(id, tree, reason)| CorruptEntry { id, tree, reason }),
        0..3,
    );
    (
        prop::sample::select(vec![1usize, 3, 16]),
        prop::sample::select(vec![Residency::F32, Residency::Int8, Residency::Both]),
        prop::collection::vec(arb_case(), 0..12),
        corrupt,
    )
}

fn cache_round_trip(
    dir: &Path,
    (dim, residency, cases, corrupt): (usize, Residency, Vec<Case>, Vec<CorruptEntry>),
) -> Result<(), String> {
    let mut index = FlatIndex::with_residency(dim, residency).map_err(|e| e.to_string())?;
    for (i, case) in cases.iter().enumerate() {
        // Rows of the generated dimension, which the cases' own may not be.
        let v: Vec<f32> = (0..dim)
            .map(|d| case.embedding.get(d).copied().unwrap_or(0.1) + i as f32)
            .collect();
        index
            .upsert(case.id.clone(), &v, &codec::tags_of(case))
            .map_err(|e| e.to_string())?;
    }
    let expected_tags: Vec<_> = index.row_tags().map(|(id, t)| (id.clone(), t)).collect();
    for kind in [CacheKind::F32, CacheKind::Int8] {
        if (kind == CacheKind::F32 && !residency.has_f32())
            || (kind == CacheKind::Int8 && !residency.has_int8())
        {
            continue;
        }
        cache::write(dir, kind, &index, 7, "model", &corrupt).map_err(|e| e.to_string())?;
        let loaded = cache::load(dir, kind, dim, "model")
            .map_err(|e| format!("load(write(index)) failed: {e}"))?;
        let tags: Vec<_> = loaded
            .ids
            .iter()
            .cloned()
            .zip(loaded.tags.iter().cloned())
            .collect();
        if tags != expected_tags || loaded.corrupt != corrupt || loaded.generation != 7 {
            return Err(format!(
                "load(write(index)) has other ids, tags or corrupt entries ({kind:?})"
            ));
        }
        let same_rows = match kind {
            CacheKind::F32 => index.f32_rows() == Some(&loaded.vectors[..]),
            CacheKind::Int8 => {
                index.int8_rows() == loaded.quantized.as_ref().map(|(r, s)| (&r[..], &s[..]))
            }
        };
        if !same_rows {
            return Err(format!("load(write(index)) has other rows ({kind:?})"));
        }
        let (bits, _, centre, centred_at) = index.sign_bits();
        let signs = &loaded.signs;
        if signs.bits != bits || signs.centre != centre || signs.centred_at != centred_at {
            return Err(format!("load(write(index)) has other sign bits ({kind:?})"));
        }
    }
    Ok(())
}

#[test]
fn fuzz_index_cache() {
    if writing_corpus() {
        write_cache_corpus();
    }
    let seeds = fuzz::seeds(CACHE);
    let dir = scratch_dir();
    for seed in &seeds {
        let (kind, dim, model) = cache_params(&seed.name);
        std::fs::write(cache::path(dir.path(), kind), &seed.bytes).unwrap();
        if let Err(miss) = cache::load(dir.path(), kind, dim, model) {
            panic!("seed {} is not a cache this build reads: {miss}", seed.name);
        }
    }
    let mut fuzzer = Fuzzer::new(CACHE);
    let d = dir.path();
    fuzzer.check("mutants", fuzz::mutants(seeds.clone(), CACHE_TOKENS), |m| {
        load_cache_bytes(d, &m.bytes, &m.seed)
    });
    fuzzer.check(
        "resealed-mutants",
        fuzz::mutants(seeds.clone(), CACHE_TOKENS).prop_map(|mut m| {
            reseal_cache(&mut m.bytes);
            m
        }),
        |m| load_cache_bytes(d, &m.bytes, &m.seed),
    );
    fuzzer.check("header-edits", edited_caches(seeds.clone()), |e| {
        load_cache_bytes(d, &e.bytes, &e.seed)
    });
    fuzzer.check("consistent-lies", consistent_lies(seeds), |e| {
        load_cache_bytes(d, &e.bytes, &e.seed)
    });
    fuzzer.check("random-bytes", fuzz::random_bytes(256), |b| {
        load_cache_bytes(d, &b, "store-f32")
    });
    fuzzer.check("round-trip", arb_index(), |index| {
        cache_round_trip(d, index)
    });
    fuzzer.finish();
}

/// Found by `consistent-lies`: a header claiming more rows than the file
/// holds, with a meta length that wraps header + meta + rows around to the
/// file's size, passed the size check and `load` allocated 2^64 - 3 bytes
/// (a "capacity overflow" panic). The sum is now checked.
#[test]
fn index_cache_regression_wrapping_section_lengths() {
    let seed = fuzz::seeds(CACHE)
        .into_iter()
        .find(|s| s.name == "fixture-index-f32.cache")
        .unwrap();
    // Enough rows that their bytes exceed the meta section, so the meta
    // length that makes the sum match the file's size wraps (format 2's
    // rows carry the sign bits and its meta the centre, so the count that
    // does it depends on the format; 64 does for both).
    let edits = [
        CacheEdit::Set(Field::Count, 64),
        CacheEdit::MatchRows,
        CacheEdit::WrapTotal(Field::MetaLen),
    ];
    let bytes = apply_cache_edits(&seed.bytes, &seed.name, &edits);
    let meta_len = read_field(&bytes, Field::MetaLen);
    assert!(
        meta_len > u64::MAX / 2,
        "meta length {meta_len} did not wrap"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(cache::path(dir.path(), CacheKind::F32), &bytes).unwrap();
    match cache::load(dir.path(), CacheKind::F32, FIXTURE_DIM, FIXTURE_MODEL) {
        Err(cache::Miss::Invalid(why)) => assert!(why.contains("overflow"), "{why}"),
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a cache whose lengths wrap was accepted"),
    }
}
