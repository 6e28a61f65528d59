//! `dermascope search` and `dermascope cases`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use dermascope_encoder::EncoderManifest;
use dermascope_store::{CaseFilter, CaseStore, OpenOptions, Residency, ScoreKind, StoreIdentity};

use dermascope_library::{index_adapter_space, load_installed};

use crate::adapter::AdapterDirArgs;
use crate::ingest::SourceArg;
use crate::{open_store, paths, EncoderArgs, StoreArgs};

#[derive(Args, Debug)]
pub struct SearchArgs {
    /// The lesion photograph to look up.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
    /// How many similar cases to show.
    #[arg(short, default_value_t = 5)]
    k: usize,
    /// Score with the int8 copy of the index (faster, approximate scores).
    #[arg(long)]
    int8: bool,
    /// Only cases from these anatomical sites (repeatable).
    #[arg(long = "site")]
    sites: Vec<String>,
    /// Only cases from these sources (repeatable).
    #[arg(long = "source", value_enum)]
    sources: Vec<SourceArg>,
    /// Only cases with these diagnosis codes (repeatable).
    #[arg(long = "diagnosis")]
    diagnoses: Vec<String>,
    /// Only cases whose label is confirmed.
    #[arg(long)]
    confirmed: bool,
    /// Search the raw encoder space even when an adapter is installed.
    #[arg(long)]
    raw: bool,
    #[command(flatten)]
    adapter: AdapterDirArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    encoder: EncoderArgs,
}

pub fn search(args: &SearchArgs) -> anyhow::Result<ExitCode> {
    let encoder = args.encoder.load(None)?;
    let (kind, residency) = if args.int8 {
        (ScoreKind::Int8, Residency::Int8)
    } else {
        (ScoreKind::F32, Residency::F32)
    };
    let store = open_store(&args.store, &encoder, residency)?;
    let bytes =
        std::fs::read(&args.image).with_context(|| format!("reading {}", args.image.display()))?;
    let embedding = encoder
        .embed_image_bytes(&bytes)
        .with_context(|| format!("embedding {}", args.image.display()))?;

    let mut filter = CaseFilter::any();
    if !args.sites.is_empty() {
        filter = filter.with_sites(args.sites.iter().cloned());
    }
    if !args.sources.is_empty() {
        filter = filter.with_sources(args.sources.iter().map(|s| (*s).into()));
    }
    if !args.diagnoses.is_empty() {
        filter = filter.with_diagnoses(args.diagnoses.iter().cloned());
    }
    if args.confirmed {
        filter = filter.confirmed_only();
    }
    // With an adapter installed, similar cases are found in its space (its
    // embedding was trained to separate the clinic's diagnoses) and its own
    // prediction is shown beside them.
    let adapter_dir = args.adapter.path();
    let adapter = if args.raw
        || !adapter_dir
            .join(dermascope_adapter::MANIFEST_FILE)
            .is_file()
    {
        None
    } else {
        Some(load_installed(&adapter_dir, &encoder)?)
    };
    let hits = match &adapter {
        Some(adapter) => {
            let computed = index_adapter_space(&store, adapter)?;
            if computed > 0 {
                eprintln!("adapter space: computed {computed} missing case embeddings");
            }
            let output = adapter.predict(embedding.values())?;
            let code = &adapter.classes()[output.predicted];
            let name = dermascope_store::Diagnosis::from_code(code)
                .map(|d| d.display_name)
                .unwrap_or_default();
            println!(
                "adapter {}: {} {} (p = {:.2}) -- decision support, not a diagnosis",
                adapter.adapter_id(),
                code,
                name,
                output.probabilities[output.predicted]
            );
            store.search_adapter_space(&output.embedding, args.k, &filter)?
        }
        None => store.search(embedding.values(), args.k, &filter, kind)?,
    };
    if hits.is_empty() {
        println!("no case matches (the store holds {} cases)", store.len()?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<4}{:<16}{:<7}{:<34}{:>10}  {:<5}{:<8}{:<18}{:<10}",
        "#", "case", "code", "diagnosis", "similarity", "age", "sex", "site", "source"
    );
    for (rank, hit) in hits.iter().enumerate() {
        let Some(case) = store.get(&hit.id)? else {
            continue; // removed between search and lookup
        };
        let meta = &case.metadata;
        println!(
            "{:<4}{:<16}{:<7}{:<34}{:>10.3}  {:<5}{:<8}{:<18}{:<10}",
            rank + 1,
            case.id.as_str(),
            case.diagnosis.code,
            case.diagnosis.display_name,
            hit.score,
            meta.age_years.map_or("-".into(), |a| a.to_string()),
            meta.sex
                .map_or("-".into(), |s| format!("{s:?}").to_lowercase()),
            meta.anatomical_site.as_deref().unwrap_or("-"),
            format!("{:?}", case.source).to_lowercase(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct CasesArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Encoder bundle whose store to open (only its manifest is read).
    #[arg(long, value_name = "DIR")]
    bundle: Option<PathBuf>,
    /// Also write the store's reference cases to FILE, one JSON case per
    /// line, for `dermascope-cloud reference import` (free-text notes stay
    /// behind; originals are not included).
    #[arg(long, value_name = "FILE")]
    export_reference: Option<PathBuf>,
}

pub fn cases(args: &CasesArgs) -> anyhow::Result<ExitCode> {
    let bundle = paths::encoder_bundle(args.bundle.as_ref());
    let manifest = EncoderManifest::load(&bundle)
        .with_context(|| format!("reading the encoder manifest in {}", bundle.display()))?;
    let path = args.store.path();
    let store = CaseStore::open_with(
        &path,
        StoreIdentity {
            model_id: manifest.model_id.clone(),
            embedding_dim: manifest.output.dim,
        },
        OpenOptions {
            residency: Residency::Int8,
            ..OpenOptions::default()
        },
    )
    .with_context(|| format!("opening the case store at {}", path.display()))?;
    if let Some(file) = &args.export_reference {
        let exported = export_reference(&store, file)
            .with_context(|| format!("exporting the reference cases to {}", file.display()))?;
        eprintln!("exported {exported} reference cases to {}", file.display());
    }
    let counts = store.counts()?;
    println!(
        "{} cases in {} (model {})",
        counts.total,
        path.display(),
        manifest.model_id
    );
    println!("\n{:<8}{:<36}{:>8}", "code", "diagnosis", "cases");
    let codes: BTreeSet<&String> = counts.by_diagnosis.keys().collect();
    for code in codes {
        let name = dermascope_store::Diagnosis::from_code(code)
            .map(|d| d.display_name)
            .unwrap_or_default();
        println!("{:<8}{:<36}{:>8}", code, name, counts.by_diagnosis[code]);
    }
    println!("\n{:<12}{:>8}", "source", "cases");
    for (source, n) in &counts.by_source {
        println!("{:<12}{:>8}", format!("{source:?}").to_lowercase(), n);
    }
    let report = store.open_report();
    if !report.corrupt.is_empty() {
        println!(
            "\n{} damaged records were left out of the index:",
            report.corrupt.len()
        );
        for entry in &report.corrupt {
            println!("  {} ({}): {}", entry.id, entry.tree, entry.reason);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The store's reference cases as JSON lines in the fleet service's wire
/// form; returns how many.
fn export_reference(store: &CaseStore, file: &std::path::Path) -> anyhow::Result<usize> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(file)?);
    let mut exported = 0;
    for case in store.cases() {
        let case = case?;
        if case.source != dermascope_store::CaseSource::Reference {
            continue;
        }
        let wire = dermascope_sync::convert::to_wire(&case, None);
        serde_json::to_writer(&mut out, &wire)?;
        out.write_all(b"\n")?;
        exported += 1;
    }
    out.flush()?;
    Ok(exported)
}
