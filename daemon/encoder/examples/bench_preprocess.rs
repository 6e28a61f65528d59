//! Milliseconds per capture of each `[preprocess]` setting: decode excluded,
//! from the decoded RGB photograph to the embedding (colour constancy,
//! framing, resize, normalise, every test-time view through the encoder).
//!
//! ```sh
//! cargo run --release -p dermascope-encoder --example bench_preprocess -- \
//!     models/dist/sklesion-xception int8 ../shared/data/isic-uda1/images 10 \
//!     none shades-of-gray lesion shades-of-gray,lesion tta2 tta4 tta8
//! ```
//!
//! Arguments: bundle, variant, a folder of JPEGs, how many of them (each
//! embedded once per setting after one warm-up), then the settings.
//! Prints one line per setting: median and p90 ms over the photographs.

use std::path::PathBuf;
use std::time::Instant;

use dermascope_encoder::{decode_rgb, DecodeBudget, Encoder, EncoderOptions, PreprocessSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        return Err("usage: bench_preprocess BUNDLE VARIANT IMAGES COUNT SETTING...".into());
    }
    let bundle = PathBuf::from(&args[0]);
    let count: usize = args[3].parse()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args[2])?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    files.sort();
    files.truncate(count);
    let images = files
        .iter()
        .map(|f| decode_rgb(&std::fs::read(f)?, DecodeBudget::default()).map_err(Into::into))
        .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
    for setting in &args[4..] {
        let options = EncoderOptions {
            variant: dermascope_encoder::VariantChoice::Named(args[1].clone()),
            // On an x86_64 CPU without VNNI int8 is slow: measured, not refused.
            allow_slow_int8: true,
            preprocess: Some(PreprocessSpec::parse_list(setting)?),
            ..EncoderOptions::default()
        };
        let encoder = Encoder::load(&bundle, &options)?;
        encoder.embed_rgb(&images[0])?;
        let mut ms: Vec<f64> = images
            .iter()
            .map(|image| {
                let started = Instant::now();
                encoder
                    .embed_rgb(image)
                    .map(|_| started.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_, _>>()?;
        ms.sort_by(f64::total_cmp);
        let p90 = ms[((ms.len() as f64 * 0.9) as usize).min(ms.len() - 1)];
        println!(
            "{setting:<28} {variant:<5} threads {threads} median {median:7.1} ms  p90 {p90:7.1} ms  ({n} photographs)",
            variant = args[1],
            threads = options.threads,
            median = ms[ms.len() / 2],
            n = ms.len()
        );
    }
    Ok(())
}
