//! `dermascope embed IMAGE...`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use crate::EncoderArgs;

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Photographs to embed.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    #[command(flatten)]
    encoder: EncoderArgs,
    /// One JSON object per image on stdout, with the full embedding.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &EmbedArgs) -> anyhow::Result<ExitCode> {
    let encoder = args.encoder.load(None)?;
    if !args.json {
        println!(
            "encoder {} ({}), {} dims",
            encoder.model_id(),
            encoder.variant().name,
            encoder.dim()
        );
    }
    let mut failures = 0usize;
    for path in &args.images {
        let started = Instant::now();
        let embedded = std::fs::read(path)
            .with_context(|| format!("reading {}", path.display()))
            .and_then(|bytes| {
                encoder
                    .embed_image_bytes(&bytes)
                    .with_context(|| format!("embedding {}", path.display()))
            });
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        match embedded {
            Ok(embedding) if args.json => {
                let line = serde_json::json!({
                    "image": path.display().to_string(),
                    "model_id": encoder.model_id(),
                    "variant": encoder.variant().name,
                    "embedding": embedding.values(),
                    "ms": elapsed_ms,
                });
                println!("{line}");
            }
            Ok(embedding) => {
                let head: Vec<String> = embedding
                    .values()
                    .iter()
                    .take(4)
                    .map(|v| format!("{v:+.4}"))
                    .collect();
                println!(
                    "{}  [{} ...]  {:.0} ms",
                    path.display(),
                    head.join(", "),
                    elapsed_ms
                );
            }
            Err(error) => {
                failures += 1;
                eprintln!("error: {error:#}");
            }
        }
    }
    if failures > 0 {
        eprintln!(
            "{failures} of {} images could not be embedded",
            args.images.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
