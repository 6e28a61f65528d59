//! Fuzz target `labels`: the labels file reader, which takes whatever CSV a
//! clinic's spreadsheet exported. Seeds are in `fuzz/corpus/labels/`; the
//! harness is `dermascope_testkit::fuzz`.
//!
//! Invariants: no input panics or allocates without bound; a file is refused
//! as a whole only for its encoding or header; every record is either a row
//! or a rejected row, each accepted row meets every limit the store and the
//! images folder impose, and (for generated files) exactly the rows built
//! with a defect are refused, at their own line.

use std::collections::HashSet;
use std::path::Path;

use dermascope_library::{parse_labels, LabelsError, LabelsFile};
use dermascope_store::{Diagnosis, MAX_CASE_ID_BYTES, MAX_SITE_BYTES};
use dermascope_testkit::fuzz::proptest::prelude::*;
use dermascope_testkit::fuzz::{self, Fuzzer, TrackingAllocator};

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

const TARGET: &str = "labels";
const TOKENS: &[&[u8]] = &[
    b",",
    b"\"",
    b"\"\"",
    b"\n",
    b"\r\n",
    b"\r",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"\xc3\x28",
    b"..",
    b"../",
    b"/",
    b"\\",
    b"image",
    b"label",
    b"anatom_site",
    b"localization",
    b"mel",
    b"unknown",
    b"female",
    b"130.5",
    b"-1",
    b"nan",
    b"1e400",
    b"\x00",
];

fn parse(bytes: &[u8]) -> Result<LabelsFile, LabelsError> {
    parse_labels(bytes, Path::new("labels.csv"))
}

fn is_plain_file_name(image: &str) -> bool {
    let mut parts = Path::new(image).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    ) && !image.contains('\\')
}

/// What holds for any input the reader accepts.
fn check_file(file: &LabelsFile) -> Result<(), String> {
    let codes: HashSet<&str> = Diagnosis::ham10000_codes().collect();
    let mut lines = HashSet::new();
    let mut ids = HashSet::new();
    for row in &file.rows {
        let long = [&row.lesion_id, &row.dx_type, &row.anatomical_site]
            .iter()
            .any(|f| f.as_ref().is_some_and(|f| f.len() > MAX_SITE_BYTES));
        if !is_plain_file_name(&row.image)
            || row.image.len() > MAX_SITE_BYTES
            || long
            || row.case_id.as_str().len() > MAX_CASE_ID_BYTES
            || !codes.contains(row.diagnosis.code.as_str())
            || row.age_years.is_some_and(|a| a > 130)
        {
            return Err(format!("an accepted row breaks a limit: {row:?}"));
        }
        if !ids.insert(row.case_id.clone()) {
            return Err(format!("case id {:?} accepted twice", row.case_id));
        }
        if row.line < 2 || !lines.insert(row.line) {
            return Err(format!(
                "line {} reported twice or before the header",
                row.line
            ));
        }
    }
    for row in &file.rejected {
        if row.line < 2 || !lines.insert(row.line) || row.reason.is_empty() {
            return Err(format!(
                "rejected row without its own line or reason: {row:?}"
            ));
        }
    }
    Ok(())
}

fn check_bytes(bytes: &[u8]) -> Result<(), String> {
    match parse(bytes) {
        Ok(file) => check_file(&file),
        Err(LabelsError::Read { .. }) => Err("parsing bytes reported a read error".into()),
        Err(_) => Ok(()),
    }
}

// ------------------------------------------------ generated labels files

const COLUMNS: [&str; 7] = [
    "image",
    "label",
    "lesion_id",
    "dx_type",
    "age",
    "sex",
    "anatom_site",
];

/// A cell and whether the reader must refuse its row for it.
#[derive(Clone, Debug)]
struct Cell {
    bytes: Vec<u8>,
    defect: bool,
}

fn ok(text: impl Into<String>) -> Cell {
    Cell {
        bytes: text.into().into_bytes(),
        defect: false,
    }
}

fn bad(bytes: impl Into<Vec<u8>>) -> Cell {
    Cell {
        bytes: bytes.into(),
        defect: true,
    }
}

fn long(n: usize) -> String {
    "x".repeat(n)
}

/// Values of `column` the reader must accept, and (for the columns it
/// reads) values that must make it refuse the row; `n` keeps image names
/// unique.
fn cells(column: &'static str, n: usize) -> (BoxedStrategy<Cell>, Option<BoxedStrategy<Cell>>) {
    let pool = |cells: Vec<Cell>| Some(prop::sample::select(cells).boxed());
    let (good, bads) = match column {
        "image" => (
            prop::sample::select(vec![
                ok(format!("ISIC_{n:07}.jpg")),
                ok(format!(" lesion {n}.JPG ")),
                ok(format!("ü-{n}.png")),
                ok(format!("{n}")),
                ok(format!(".hidden-{n}")),
            ])
            .boxed(),
            pool(vec![
                bad(format!("../{n}.jpg")),
                bad(format!("/etc/{n}.jpg")),
                bad(format!("sub/{n}.jpg")),
                bad(format!("a\\{n}.jpg")),
                bad(""),
                bad(".."),
                bad(format!("\u{7}{n}.jpg")),
                bad(format!("{}{n}.jpg", long(300))),
                bad(format!("{}{n}.jpg", long(MAX_SITE_BYTES))),
                bad([b"img".as_slice(), &[0xff], format!("{n}.jpg").as_bytes()].concat()),
            ]),
        ),
        "label" => (
            prop::sample::select(vec![
                ok("nv"),
                ok("MEL"),
                ok(" bcc "),
                ok("akiec"),
                ok("vasc"),
            ])
            .boxed(),
            pool(vec![
                bad("melanoma"),
                bad(""),
                bad("n v"),
                bad(vec![b'n', 0xff]),
            ]),
        ),
        "age" => (
            prop::sample::select(vec![
                ok(""),
                ok("0"),
                ok("45"),
                ok("60.0"),
                ok("85.5"),
                ok("130"),
            ])
            .boxed(),
            pool(vec![
                bad("abc"),
                bad("-1"),
                bad("131"),
                bad("nan"),
                bad("inf"),
                bad("1e400"),
            ]),
        ),
        "sex" => (
            prop::sample::select(vec![
                ok(""),
                ok("male"),
                ok("FEMALE"),
                ok("m"),
                ok("f"),
                ok("other"),
                ok("unknown"),
            ])
            .boxed(),
            pool(vec![bad("yes"), bad("x")]),
        ),
        _ => {
            let good = prop_oneof![
                4 => "[A-Za-z0-9 ,/._-]{0,30}".prop_map(ok),
                1 => prop::string::string_regex("\\PC{0,20}").unwrap().prop_map(ok),
                1 => Just(ok(long(MAX_SITE_BYTES))),
            ]
            .boxed();
            let bads = [bad(long(MAX_SITE_BYTES + 1)), bad(vec![b'a', 0xc3, 0x28])];
            if column == "extra" {
                // Columns the reader does not use may hold anything.
                let any = bads.map(|c| Cell { defect: false, ..c });
                (
                    prop_oneof![3 => good, 1 => prop::sample::select(any.to_vec())].boxed(),
                    None,
                )
            } else {
                (good, pool(bads.to_vec()))
            }
        }
    };
    (good, bads)
}

/// One row: every cell acceptable, or (30%) one cell that is not.
fn row(columns: &[&'static str], n: usize) -> BoxedStrategy<Vec<Cell>> {
    let (good, bads): (Vec<_>, Vec<_>) = columns.iter().map(|c| cells(c, n)).unzip();
    let defective: Vec<BoxedStrategy<Cell>> = bads.into_iter().flatten().collect();
    let refusable: Vec<usize> = columns
        .iter()
        .enumerate()
        .filter(|(_, c)| **c != "extra")
        .map(|(i, _)| i)
        .collect();
    (good, defective, prop::bool::weighted(0.3), any::<u64>())
        .prop_map(move |(mut row, defective, defect, pick)| {
            if defect {
                let which = fuzz::At(pick).index(refusable.len());
                row[refusable[which]] = defective[which].clone();
            }
            row
        })
        .boxed()
}

#[derive(Clone, Debug)]
struct Generated {
    header: Vec<String>,
    /// Per row: the cells written, and whether the row must be refused.
    rows: Vec<(Vec<Vec<u8>>, bool)>,
    bom: bool,
    crlf: bool,
}

impl Generated {
    fn bytes(&self) -> Vec<u8> {
        let mut writer = csv::WriterBuilder::new()
            .flexible(true)
            .terminator(if self.crlf {
                csv::Terminator::CRLF
            } else {
                csv::Terminator::Any(b'\n')
            })
            .from_writer(Vec::new());
        writer.write_record(&self.header).unwrap();
        for (cells, _) in &self.rows {
            writer.write_record(cells).unwrap();
        }
        let mut out = if self.bom {
            b"\xef\xbb\xbf".to_vec()
        } else {
            Vec::new()
        };
        out.extend(writer.into_inner().unwrap());
        out
    }
}

fn generated_files() -> impl Strategy<Value = Generated> {
    // The used columns in any order and letter case, with unknown ones
    // between them; image and label always present.
    let header = (
        prop::sample::subsequence(&COLUMNS[2..], 0..=5),
        prop::collection::vec("[a-z_]{3,10}", 0..3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(|(mut used, extra, upper, localization)| {
            used.extend(["image", "label"]);
            let named: Vec<String> = used
                .iter()
                .map(|c| {
                    let c = if localization && *c == "anatom_site" {
                        "localization"
                    } else {
                        c
                    };
                    if upper {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_string()
                    }
                })
                .chain(extra.into_iter().map(|e| format!("x_{e}")))
                .collect();
            Just(named).prop_shuffle()
        });
    (header, 0..30usize, any::<bool>(), any::<bool>())
        .prop_flat_map(|(header, n, bom, crlf)| {
            let columns: Vec<&'static str> = header
                .iter()
                .map(|h| {
                    let h = h.to_ascii_lowercase();
                    let h = if h == "localization" {
                        "anatom_site".to_string()
                    } else {
                        h
                    };
                    COLUMNS.iter().copied().find(|c| *c == h).unwrap_or("extra")
                })
                .collect();
            let rows: Vec<_> = (0..n).map(|i| row(&columns, i)).collect();
            (Just(header), rows, Just(bom), Just(crlf))
        })
        .prop_map(|(header, rows, bom, crlf)| {
            let rows = rows
                .into_iter()
                .map(|cells| {
                    let defect = cells.iter().any(|c| c.defect);
                    (cells.into_iter().map(|c| c.bytes).collect(), defect)
                })
                .collect();
            Generated {
                header,
                rows,
                bom,
                crlf,
            }
        })
}

fn check_generated(g: &Generated) -> Result<(), String> {
    let file =
        parse(&g.bytes()).map_err(|e| format!("a file with image and label refused: {e}"))?;
    check_file(&file)?;
    let accepted: Vec<usize> = file.rows.iter().map(|r| r.line).collect();
    let rejected: Vec<usize> = file.rejected.iter().map(|r| r.line).collect();
    let expect_accepted: Vec<usize> = (0..g.rows.len())
        .filter(|&i| !g.rows[i].1)
        .map(|i| i + 2)
        .collect();
    let expect_rejected: Vec<usize> = (0..g.rows.len())
        .filter(|&i| g.rows[i].1)
        .map(|i| i + 2)
        .collect();
    if accepted != expect_accepted || rejected != expect_rejected {
        return Err(format!(
            "accepted lines {accepted:?}, rejected {rejected:?}; expected {expect_accepted:?} and {expect_rejected:?}\n{:?}",
            file.rejected
        ));
    }
    Ok(())
}

#[test]
fn the_seeds_are_labels_files_this_build_reads() {
    for seed in fuzz::seeds(TARGET) {
        let file = parse(&seed.bytes).unwrap_or_else(|e| panic!("seed {}: {e}", seed.name));
        assert!(
            !file.rows.is_empty(),
            "seed {} has no accepted row",
            seed.name
        );
        check_file(&file).unwrap_or_else(|e| panic!("seed {}: {e}", seed.name));
        if seed.name == "rejected-rows.csv" {
            let images: Vec<&str> = file.rows.iter().map(|r| r.image.as_str()).collect();
            assert_eq!(images, ["ok-1.jpg", "ok-9.jpg"], "{:?}", file.rejected);
            assert_eq!(file.rejected.len(), 12);
        }
    }
}

#[test]
fn fuzz_labels() {
    let seeds = fuzz::seeds(TARGET);
    let mut fuzzer = Fuzzer::new(TARGET);
    fuzzer.check("mutants", fuzz::mutants(seeds, TOKENS), |m| {
        check_bytes(&m.bytes)
    });
    fuzzer.check("random-bytes", fuzz::random_bytes(512), |b| check_bytes(&b));
    fuzzer.check("generated-files", generated_files(), |g| {
        check_generated(&g)
    });
    fuzzer.finish();
}
