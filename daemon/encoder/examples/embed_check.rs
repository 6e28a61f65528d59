//! Embeds the bundle's check inputs with one variant and writes the raw
//! outputs (little-endian f32, one row of `dim` per input) to a file, so that
//! `scripts/test-aarch64` can compare the same encoder built for x86_64 and
//! run natively with the aarch64 build run under qemu.
//!
//! `--variant default` goes through the daemon's own selection
//! (`VariantChoice::Default`, which asks tract's CPU probe for int8
//! dot-product instructions), so under `qemu-aarch64 -cpu cortex-a72` and
//! `-cpu cortex-a76` it shows which variant a Raspberry Pi 4 and 5 would run.
//! The first stdout line names it:
//!
//! ```text
//! variant fp32 isa none inputs 2 dim 2048
//! ```
//!
//! ```sh
//! cargo run --release -p dermascope-encoder --example embed_check -- \
//!     --variant int8 --count 2 --out /tmp/int8.f32
//! ```

use std::io::Write;
use std::path::PathBuf;

use dermascope_encoder::{int8_dot_product_isa, Encoder, EncoderOptions, VariantChoice};

struct Args {
    bundle: PathBuf,
    variant: String,
    count: Option<usize>,
    threads: usize,
    out: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        bundle: PathBuf::from("models/dist/sklesion-xception"),
        variant: "default".into(),
        count: None,
        threads: 1,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--bundle" => args.bundle = value()?.into(),
            "--variant" => args.variant = value()?,
            "--count" => args.count = Some(value()?.parse().map_err(|e| format!("--count: {e}"))?),
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            "--out" => args.out = Some(value()?.into()),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let variant = match args.variant.as_str() {
        "default" => VariantChoice::Default,
        name => VariantChoice::Named(name.to_string()),
    };
    let options = EncoderOptions {
        variant,
        // On an x86_64 CPU without VNNI int8 is slow: measured, not refused.
        allow_slow_int8: true,
        threads: args.threads,
        ..EncoderOptions::default()
    };
    let encoder = Encoder::load(&args.bundle, &options)?;

    let bytes = std::fs::read(args.bundle.join("check/inputs.f32"))?;
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut inputs: Vec<&[f32]> = values.chunks_exact(encoder.input_len()).collect();
    inputs.truncate(args.count.unwrap_or(usize::MAX));
    println!(
        "variant {} isa {} inputs {} dim {}",
        encoder.variant().name,
        int8_dot_product_isa().unwrap_or("none"),
        inputs.len(),
        encoder.dim()
    );
    let Some(out) = &args.out else {
        return Ok(());
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
    for input in inputs {
        for value in encoder.run_tensor(input)? {
            file.write_all(&value.to_le_bytes())?;
        }
    }
    file.flush()?;
    Ok(())
}
