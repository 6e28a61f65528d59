//! The learning curve of a device that learns from its clinic
//! (docs/evaluation.md, "Learning from the clinic's own cases").
//!
//! The second atlas plays the clinic: its images are split once by image
//! (fixed seed) into queries and a pool; for each seed, the first 0, 25, 50,
//! 100 and 200 images of a seeded shuffle of the pool join the reference
//! library as confirmed local cases, an adapter is trained on both with
//! `TrainingPlan::with_local`, and the queries are scored: melanoma recall
//! and balanced accuracy of the adapter's class (melanoma against nevus;
//! any other class is a miss) and precision@1 of adapter-space retrieval
//! over the library plus the local cases, as the daemon searches.
//!
//! Embeddings come from a case store both folders were ingested into
//! (`dermascope eval ... --store DIR` caches them), so no image is decoded:
//!
//! ```text
//! cargo run --release -p dermascope-library --example learning_curve -- \
//!     --store var/e3/eval --png docs/learning-curve.png
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dermascope_adapter::LabelledEmbedding;
use dermascope_eval::grouped_split;
use dermascope_library::labels::read_labels;
use dermascope_library::{LocalOptions, TrainingOptions, TrainingPlan};
use dermascope_store::{CaseStore, StoreIdentity};

struct Args {
    store: PathBuf,
    model_id: String,
    dim: usize,
    derm: PathBuf,
    isic: PathBuf,
    counts: Vec<usize>,
    seeds: u64,
    weights: Vec<f32>,
    query_fraction: f64,
    png: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        store: PathBuf::from("var/e3/eval"),
        model_id: "sklesion-xception-gap2048-v1".into(),
        dim: 2048,
        derm: PathBuf::from("../shared/data/derm"),
        isic: PathBuf::from("../shared/data/isic-uda1"),
        counts: vec![0, 25, 50, 100, 200],
        seeds: 5,
        weights: vec![1.0],
        query_fraction: 0.5,
        png: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let list = |v: &str| -> Result<Vec<f64>, String> {
            v.split(',')
                .map(|x| x.trim().parse::<f64>().map_err(|e| format!("{flag}: {e}")))
                .collect()
        };
        match flag.as_str() {
            "--store" => args.store = value.into(),
            "--model-id" => args.model_id = value,
            "--dim" => args.dim = value.parse().map_err(|e| format!("--dim: {e}"))?,
            "--derm" => args.derm = value.into(),
            "--isic" => args.isic = value.into(),
            "--counts" => args.counts = list(&value)?.into_iter().map(|x| x as usize).collect(),
            "--seeds" => args.seeds = value.parse().map_err(|e| format!("--seeds: {e}"))?,
            "--weights" => args.weights = list(&value)?.into_iter().map(|x| x as f32).collect(),
            "--query-fraction" => {
                args.query_fraction = value.parse().map_err(|e| format!("{flag}: {e}"))?
            }
            "--png" => args.png = Some(value.into()),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// A folder's rows with their cached embeddings, as training examples.
fn rows(
    store: &CaseStore,
    folder: &Path,
    model_id: &str,
) -> Result<Vec<LabelledEmbedding>, String> {
    let file = read_labels(&folder.join("labels.csv")).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut missing = 0;
    for row in file.rows {
        match store.get(&row.case_id).map_err(|e| e.to_string())? {
            Some(case) => out.push(LabelledEmbedding {
                embedding: case.embedding,
                label: row.diagnosis.code.clone(),
                model_id: model_id.to_string(),
                lesion: row
                    .lesion_id
                    .clone()
                    .unwrap_or_else(|| row.case_id.as_str().to_string()),
            }),
            None => missing += 1,
        }
    }
    if missing > 0 {
        eprintln!(
            "{}: {missing} rows have no cached embedding (not ingested, or refused)",
            folder.display()
        );
    }
    Ok(out)
}

/// splitmix64: a seeded shuffle without a random-number crate.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    melanoma_recall: f64,
    balanced_accuracy: f64,
    precision_at_1: f64,
    /// The adapter's own "validation on local cases" (held-out pool
    /// cases, never the queries): what the local weight is chosen on.
    local_balanced_accuracy: Option<f64>,
}

fn score(
    examples: &[LabelledEmbedding],
    local: &[bool],
    queries: &[LabelledEmbedding],
    seed: u64,
    weight: f32,
) -> Result<(Figures, f64), String> {
    let mut options = TrainingOptions::default();
    options.config.seed = 7 + seed;
    let local_options = LocalOptions {
        weight,
        ..LocalOptions::default()
    };
    let plan = TrainingPlan::with_local(examples, local, &options, &local_options)
        .map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (adapter, report) = plan.install(dir.path()).map_err(|e| e.to_string())?;
    let embed = |set: &[LabelledEmbedding]| {
        adapter
            .predict_many(
                &set.iter()
                    .map(|e| e.embedding.as_slice())
                    .collect::<Vec<_>>(),
            )
            .map_err(|e| e.to_string())
    };
    let library = embed(examples)?;
    let answers = embed(queries)?;
    let classes = adapter.classes();
    let (mut mel, mut mel_hit, mut nv, mut nv_hit, mut top1_hit) = (0, 0, 0, 0, 0);
    for (query, answer) in queries.iter().zip(&answers) {
        let predicted = classes[answer.predicted].as_str();
        match query.label.as_str() {
            "mel" => {
                mel += 1;
                mel_hit += usize::from(predicted == "mel");
            }
            "nv" => {
                nv += 1;
                nv_hit += usize::from(predicted == "nv");
            }
            _ => {}
        }
        let mut best = (f32::NEG_INFINITY, 0usize);
        for (i, case) in library.iter().enumerate() {
            let s: f32 = case
                .embedding
                .iter()
                .zip(&answer.embedding)
                .map(|(a, b)| a * b)
                .sum();
            if s > best.0 {
                best = (s, i);
            }
        }
        top1_hit += usize::from(examples[best.1].label == query.label);
    }
    let recall = mel_hit as f64 / mel.max(1) as f64;
    let specificity = nv_hit as f64 / nv.max(1) as f64;
    Ok((
        Figures {
            melanoma_recall: recall,
            balanced_accuracy: (recall + specificity) / 2.0,
            precision_at_1: top1_hit as f64 / queries.len().max(1) as f64,
            local_balanced_accuracy: report
                .local_validation
                .as_ref()
                .map(|l| l.balanced_accuracy),
        },
        report.wall_time_s,
    ))
}

fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

fn main() -> Result<(), String> {
    let args = parse()?;
    let store = CaseStore::open(
        &args.store,
        StoreIdentity {
            model_id: args.model_id.clone(),
            embedding_dim: args.dim,
        },
    )
    .map_err(|e| e.to_string())?;
    let library = rows(&store, &args.derm, &args.model_id)?;
    let atlas = rows(&store, &args.isic, &args.model_id)?;
    let labels: Vec<&str> = atlas.iter().map(|e| e.label.as_str()).collect();
    let images: Vec<&str> = atlas.iter().map(|e| e.lesion.as_str()).collect();
    // By image (the atlas has no lesion ids: each image is its own lesion),
    // seed 1 as `dermascope eval`'s query split.
    let split = grouped_split(&labels, &images, args.query_fraction, 1);
    let queries: Vec<LabelledEmbedding> = split.queries().map(|i| atlas[i].clone()).collect();
    let pool: Vec<LabelledEmbedding> = split.references().map(|i| atlas[i].clone()).collect();
    let max = args.counts.iter().copied().max().unwrap_or(0);
    if max > pool.len() {
        return Err(format!(
            "{max} local cases asked for, the pool has {}",
            pool.len()
        ));
    }
    eprintln!(
        "library {} cases; atlas {} queries ({} mel), pool {}",
        library.len(),
        queries.len(),
        queries.iter().filter(|q| q.label == "mel").count(),
        pool.len()
    );
    let mut table: BTreeMap<(u32, usize), Vec<Figures>> = BTreeMap::new();
    for &weight in &args.weights {
        for seed in 0..args.seeds {
            let mut drawn = pool.clone();
            shuffle(&mut drawn, seed);
            for &n in &args.counts {
                let mut examples = library.clone();
                examples.extend(drawn[..n].iter().cloned());
                let mut local = vec![false; library.len()];
                local.resize(examples.len(), true);
                let (figures, seconds) = score(&examples, &local, &queries, seed, weight)?;
                eprintln!(
                    "weight {weight} seed {seed} local {n}: mel recall {:.3} bal.acc {:.3} p@1 {:.3} \
                     local validation bal.acc {:?} ({seconds:.1} s)",
                    figures.melanoma_recall,
                    figures.balanced_accuracy,
                    figures.precision_at_1,
                    figures.local_balanced_accuracy
                );
                table
                    .entry(((weight * 100.0) as u32, n))
                    .or_default()
                    .push(figures);
            }
        }
    }
    println!(
        "| local weight | local cases | melanoma recall | balanced accuracy | precision@1 | \
         validation on local cases: bal. acc. |"
    );
    println!("|---:|---:|---|---|---|---|");
    let mut curve = Vec::new();
    for ((weight, n), runs) in &table {
        let stat = |f: fn(&Figures) -> f64| mean_sd(&runs.iter().map(f).collect::<Vec<_>>());
        let (r, b, p) = (
            stat(|f| f.melanoma_recall),
            stat(|f| f.balanced_accuracy),
            stat(|f| f.precision_at_1),
        );
        let local: Vec<f64> = runs
            .iter()
            .filter_map(|f| f.local_balanced_accuracy)
            .collect();
        let local = if local.is_empty() {
            "-".to_string()
        } else {
            let (m, sd) = mean_sd(&local);
            format!("{m:.3} ± {sd:.3}")
        };
        println!(
            "| {} | {n} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3} | {local} |",
            *weight as f64 / 100.0,
            r.0,
            r.1,
            b.0,
            b.1,
            p.0,
            p.1
        );
        if *weight == (args.weights[0] * 100.0) as u32 {
            curve.push((*n, [r, b, p]));
        }
    }
    if let Some(png) = &args.png {
        plot::write(png, &curve).map_err(|e| format!("{}: {e}", png.display()))?;
        eprintln!("plot written to {}", png.display());
    }
    Ok(())
}

/// The curve drawn with embedded-graphics (already the screens' renderer)
/// into an RGB buffer and written by `image` as PNG: no plotting crate.
mod plot {
    use std::path::Path;

    use embedded_graphics::mono_font::ascii::FONT_6X10;
    use embedded_graphics::mono_font::MonoTextStyle;
    use embedded_graphics::pixelcolor::Rgb888;
    use embedded_graphics::prelude::*;
    use embedded_graphics::primitives::{Circle, Line, PrimitiveStyle};
    use embedded_graphics::text::Text;

    const W: u32 = 640;
    const H: u32 = 400;
    const LEFT: i32 = 60;
    const RIGHT: i32 = 620;
    const TOP: i32 = 30;
    const BOTTOM: i32 = 350;

    struct Canvas(image::RgbImage);

    impl OriginDimensions for Canvas {
        fn size(&self) -> Size {
            Size::new(W, H)
        }
    }

    impl DrawTarget for Canvas {
        type Color = Rgb888;
        type Error = std::convert::Infallible;
        fn draw_iter<I: IntoIterator<Item = Pixel<Rgb888>>>(
            &mut self,
            pixels: I,
        ) -> Result<(), Self::Error> {
            for Pixel(p, c) in pixels {
                if (0..W as i32).contains(&p.x) && (0..H as i32).contains(&p.y) {
                    self.0
                        .put_pixel(p.x as u32, p.y as u32, image::Rgb([c.r(), c.g(), c.b()]));
                }
            }
            Ok(())
        }
    }

    pub fn write(path: &Path, curve: &[(usize, [(f64, f64); 3])]) -> Result<(), String> {
        let mut canvas = Canvas(image::RgbImage::from_pixel(
            W,
            H,
            image::Rgb([255, 255, 255]),
        ));
        let ink = Rgb888::new(40, 40, 40);
        let grid = Rgb888::new(220, 220, 220);
        let text = MonoTextStyle::new(&FONT_6X10, ink);
        let max_x = curve.iter().map(|c| c.0).max().unwrap_or(1).max(1) as f64;
        let (y_lo, y_hi) = (0.3, 1.0);
        let x = |n: f64| LEFT + ((n / max_x) * f64::from(RIGHT - LEFT)) as i32;
        let y = |v: f64| {
            BOTTOM
                - (((v.clamp(y_lo, y_hi) - y_lo) / (y_hi - y_lo)) * f64::from(BOTTOM - TOP)) as i32
        };
        {
            let c = &mut canvas;
            for step in 3..=10 {
                let v = f64::from(step) / 10.0;
                let _ = Line::new(Point::new(LEFT, y(v)), Point::new(RIGHT, y(v)))
                    .into_styled(PrimitiveStyle::with_stroke(grid, 1))
                    .draw(c);
                let _ =
                    Text::new(&format!("{v:.1}"), Point::new(LEFT - 28, y(v) + 3), text).draw(c);
            }
            for &(n, _) in curve {
                let _ = Text::new(
                    &n.to_string(),
                    Point::new(x(n as f64) - 6, BOTTOM + 14),
                    text,
                )
                .draw(c);
            }
            let _ = Line::new(Point::new(LEFT, BOTTOM), Point::new(RIGHT, BOTTOM))
                .into_styled(PrimitiveStyle::with_stroke(ink, 1))
                .draw(c);
            let _ = Line::new(Point::new(LEFT, TOP), Point::new(LEFT, BOTTOM))
                .into_styled(PrimitiveStyle::with_stroke(ink, 1))
                .draw(c);
            let _ = Text::new(
                "confirmed local cases (second atlas) added to the library",
                Point::new(LEFT + 110, BOTTOM + 32),
                text,
            )
            .draw(c);
            let _ = Text::new(
                "Learning from the clinic's own cases: isic-uda1 queries, mean +/- sd of 5 seeds",
                Point::new(LEFT, TOP - 12),
                text,
            )
            .draw(c);
        }
        let colours = [
            (Rgb888::new(200, 40, 40), "melanoma recall"),
            (Rgb888::new(40, 90, 200), "balanced accuracy (mel vs nv)"),
            (Rgb888::new(40, 150, 60), "precision@1"),
        ];
        for (series, (colour, name)) in colours.iter().enumerate() {
            let stroke = PrimitiveStyle::with_stroke(*colour, 2);
            for pair in curve.windows(2) {
                let a = Point::new(x(pair[0].0 as f64), y(pair[0].1[series].0));
                let b = Point::new(x(pair[1].0 as f64), y(pair[1].1[series].0));
                let _ = Line::new(a, b).into_styled(stroke).draw(&mut canvas);
            }
            for &(n, figures) in curve {
                let (mean, sd) = figures[series];
                let px = x(n as f64) + (series as i32 - 1) * 3;
                let _ = Line::new(Point::new(px, y(mean - sd)), Point::new(px, y(mean + sd)))
                    .into_styled(PrimitiveStyle::with_stroke(*colour, 1))
                    .draw(&mut canvas);
                let _ = Circle::with_center(Point::new(px, y(mean)), 5)
                    .into_styled(PrimitiveStyle::with_fill(*colour))
                    .draw(&mut canvas);
            }
            let ly = BOTTOM - 60 + series as i32 * 14;
            let _ = Line::new(
                Point::new(RIGHT - 190, ly - 3),
                Point::new(RIGHT - 175, ly - 3),
            )
            .into_styled(stroke)
            .draw(&mut canvas);
            let _ = Text::new(name, Point::new(RIGHT - 170, ly), text).draw(&mut canvas);
        }
        canvas.0.save(path).map_err(|e| e.to_string())
    }
}
