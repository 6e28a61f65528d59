//! Layout under stress: long diagnosis names, 0 to 8 matches, odd numbers
//! and other panel sizes must never draw outside the screen, and names must
//! never run into the similarity column.

mod common;

use std::convert::Infallible;

use common::{matches, screens, status, synthetic_lesion};
use dermascope_ui::{
    render, results_layout, Canvas, MatchView, PredictionView, RejectionView, ResultsView, Screen,
    StatusView, SyncState, Thumbnail, ThumbnailError, NO_CLOSE_MATCH_TEXTS, REVIEW_TEXTS,
};
use embedded_graphics::pixelcolor::{Rgb888, RgbColor};
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Pixel, Point, PointsIter, Size};
use embedded_graphics::primitives::Rectangle;

/// A target that counts every pixel drawn outside it instead of clipping.
struct StrictTarget {
    size: Size,
    outside: Vec<(i32, i32)>,
    inside: usize,
}

impl StrictTarget {
    fn new(width: u32, height: u32) -> Self {
        Self {
            size: Size::new(width, height),
            outside: Vec::new(),
            inside: 0,
        }
    }
}

impl OriginDimensions for StrictTarget {
    fn size(&self) -> Size {
        self.size
    }
}

impl DrawTarget for StrictTarget {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        for Pixel(p, _) in pixels {
            if p.x < 0 || p.y < 0 || p.x >= self.size.width as i32 || p.y >= self.size.height as i32
            {
                self.outside.push((p.x, p.y));
            } else {
                self.inside += 1;
            }
        }
        Ok(())
    }
}

const PANELS: [(u32, u32); 5] = [(320, 240), (240, 240), (240, 320), (480, 320), (320, 480)];

const LONG_NAMES: [&str; 8] = [
    "Pigmented basal cell carcinoma with superficial and nodular components, recurrent",
    "Actinic keratosis / Bowen's disease (intraepithelial carcinoma)",
    "Dysplasticmelanocyticnevuswitharchitecturaldisorderandnospacesatallinthename",
    "Melanoma in situ, lentigo maligna type, on chronically sun-damaged skin",
    "Меланома кожи (cyrillic, outside the panel font)",
    "Séborrhéique kératose irritée",
    "",
    "Vascular lesion (pyogenic granuloma, angiokeratoma, haemangioma)",
];

fn assert_inside(width: u32, height: u32, status: &StatusView, screen: &Screen, what: &str) {
    let mut target = StrictTarget::new(width, height);
    render(&mut target, status, screen).unwrap();
    assert!(
        target.outside.is_empty(),
        "{what} at {width}x{height}: {} pixels outside, first {:?}",
        target.outside.len(),
        &target.outside[..target.outside.len().min(5)]
    );
    assert!(
        target.inside >= (width * height) as usize,
        "{what}: screen not filled"
    );
}

fn long_results(n: usize) -> Screen {
    let names: Vec<(&str, f32, bool)> = (0..n)
        .map(|i| {
            (
                LONG_NAMES[i % LONG_NAMES.len()],
                0.99 - 0.05 * i as f32,
                i % 2 == 0,
            )
        })
        .collect();
    Screen::Results(ResultsView {
        query: synthetic_lesion(7, 33, 91),
        matches: matches(&names),
        prediction: Some(PredictionView {
            diagnosis: LONG_NAMES[0].to_owned(),
            probability: 0.51,
        }),
        // The worst case has the fleet band and both cautions too: each
        // takes room from the list.
        fleet: Some(dermascope_ui::FleetView {
            differential: LONG_NAMES.iter().map(|n| (*n).to_owned()).collect(),
            source: dermascope_ui::FleetSource::Model,
        }),
        review: true,
        no_close_match: true,
    })
}

fn worst_status() -> StatusView {
    StatusView {
        sync: SyncState::Syncing,
        pending_uploads: u32::MAX,
        cases_in_library: u32::MAX,
        clock: Some(dermascope_ui::Clock {
            hours: 255,
            minutes: 255,
        }),
        last_sync_minutes: Some(u32::MAX),
    }
}

#[test]
fn golden_screens_stay_inside_every_panel() {
    for (stem, status, screen) in screens() {
        for (w, h) in PANELS {
            assert_inside(w, h, &status, &screen, stem);
        }
    }
}

#[test]
fn long_names_and_zero_to_eight_matches_stay_inside() {
    for n in 0..=8 {
        let screen = long_results(n);
        for (w, h) in PANELS {
            assert_inside(w, h, &worst_status(), &screen, &format!("{n} long matches"));
        }
    }
}

#[test]
fn odd_numbers_stay_inside() {
    let odd = Screen::Results(ResultsView {
        query: synthetic_lesion(1, 1, 1),
        matches: [f32::NAN, -1.0, 7.5, f32::INFINITY, 0.0]
            .iter()
            .enumerate()
            .map(|(i, &similarity)| MatchView {
                diagnosis: "Nevus".to_owned(),
                similarity,
                thumbnail: synthetic_lesion(i as u32, 500, 3),
                confirmed: i % 2 == 1,
            })
            .collect(),
        prediction: Some(PredictionView {
            diagnosis: "Nevus".to_owned(),
            probability: f32::NAN,
        }),
        fleet: Some(dermascope_ui::FleetView {
            differential: Vec::new(),
            source: dermascope_ui::FleetSource::Cases,
        }),
        review: false,
        no_close_match: false,
    });
    let bursts = [(0, 0), (7, 5), (3, 12), (50, 100), (u32::MAX, u32::MAX)];
    for (w, h) in PANELS {
        assert_inside(w, h, &worst_status(), &odd, "odd numbers");
        for (frames_taken, burst_len) in bursts {
            let screen = Screen::Capturing {
                frames_taken,
                burst_len,
            };
            assert_inside(w, h, &worst_status(), &screen, "capturing");
        }
    }
}

#[test]
fn long_and_empty_messages_stay_inside() {
    let long = "Unplug the device, wait ten seconds, plug it back in and hold the button \
                for five seconds; if the message comes back, write down the code \
                E-0042-STORAGE-UNREADABLE-BLOCK-9 and call support."
        .repeat(3);
    let screens = [
        Screen::Error {
            title: long.clone(),
            what_to_fix: long.clone(),
        },
        Screen::Error {
            title: String::new(),
            what_to_fix: String::new(),
        },
        Screen::Rejected {
            reason: RejectionView::CameraError,
            what_to_do: long.clone(),
        },
        Screen::Ready {
            live: Some(synthetic_lesion(2, 640, 480)),
            hint: long.clone(),
        },
        Screen::Ready {
            live: Some(synthetic_lesion(2, 4, 300)),
            hint: String::new(),
        },
    ];
    for screen in &screens {
        for (w, h) in PANELS {
            assert_inside(w, h, &worst_status(), screen, "long message");
        }
    }
}

/// The right-hand column of the match list, as pixels.
fn similarity_column(canvas: &Canvas, columns: u32) -> Vec<u8> {
    // Rows between the header (58 px below the status bar) and the notice.
    let (top, bottom) = (22 + 60, canvas.height() - 40);
    let mut out = Vec::new();
    for y in top..bottom {
        for x in canvas.width() - columns..canvas.width() {
            let p = canvas.pixel(x, y).unwrap();
            out.extend_from_slice(&[p.r(), p.g(), p.b()]);
        }
    }
    out
}

#[test]
fn long_names_never_reach_the_similarity_column() {
    for (w, h) in [(320, 240), (240, 240)] {
        let draw = |name: &str| {
            let screen = Screen::Results(ResultsView {
                query: synthetic_lesion(2, 64, 64),
                matches: matches(&[(name, 0.9, true), (name, 0.5, false), (name, 0.4, true)]),
                prediction: None,
                fleet: None,
                review: false,
                no_close_match: false,
            });
            let mut canvas = Canvas::new(w, h).unwrap();
            render(&mut canvas, &status(SyncState::Online, 0, None), &screen).unwrap();
            canvas
        };
        let short = draw("X");
        let long = draw(LONG_NAMES[2]);
        assert_ne!(short.pixels(), long.pixels());
        // Percentage (4 chars of 9 px at most), margin, and an 8 px gap.
        let column = 4 * 9 + 6 + 6;
        assert_eq!(
            similarity_column(&short, column),
            similarity_column(&long, column),
            "a long name reached the similarity column at {w}x{h}"
        );
    }
}

#[test]
fn results_always_carry_the_notice() {
    const YELLOW: [u8; 3] = [0xF0, 0xE4, 0x42];
    for n in [0, 1, 5] {
        for (w, h) in PANELS {
            let mut canvas = Canvas::new(w, h).unwrap();
            render(&mut canvas, &worst_status(), &long_results(n)).unwrap();
            let bottom_band: Vec<_> = (h - 14..h)
                .flat_map(|y| (0..w).map(move |x| (x, y)))
                .map(|(x, y)| canvas.pixel(x, y).unwrap())
                .collect();
            let yellow = bottom_band
                .iter()
                .filter(|p| [p.r(), p.g(), p.b()] == YELLOW)
                .count();
            let ink = bottom_band
                .iter()
                .filter(|p| [p.r(), p.g(), p.b()] == [0, 0, 0])
                .count();
            assert!(
                yellow > bottom_band.len() / 2,
                "{n} matches at {w}x{h}: no notice band"
            );
            assert!(ink > 100, "{n} matches at {w}x{h}: notice band has no text");
        }
    }
}

#[test]
fn thumbnails_check_their_buffers() {
    assert_eq!(
        Thumbnail::new(0, 5, Vec::new()),
        Err(ThumbnailError::Empty {
            width: 0,
            height: 5
        })
    );
    assert_eq!(
        Thumbnail::new(2, 2, vec![0; 11]),
        Err(ThumbnailError::LengthMismatch {
            width: 2,
            height: 2,
            expected: 12,
            actual: 11
        })
    );
    assert!(matches!(
        Thumbnail::new(u32::MAX, u32::MAX, vec![0; 3]),
        Err(ThumbnailError::LengthMismatch { .. })
    ));
    let ok = Thumbnail::new(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
    assert_eq!((ok.width(), ok.height(), ok.rgb().len()), (2, 1, 6));
}

#[test]
fn default_advice_is_used_by_the_convenience_constructor() {
    for reason in [
        RejectionView::Blurry,
        RejectionView::TooDark,
        RejectionView::TooBright,
        RejectionView::NoLesion,
        RejectionView::CameraError,
    ] {
        match Screen::rejected(reason) {
            Screen::Rejected {
                reason: r,
                what_to_do,
            } => {
                assert_eq!(r, reason);
                assert_eq!(what_to_do, reason.default_advice());
                assert!(!reason.title().is_empty());
            }
            other => panic!("{other:?}"),
        }
    }
}

/// A results view with the given cautions, `n` matches and, when `fleet`,
/// the fleet band: every part the results screen can stack.
fn cautioned(review: bool, no_close_match: bool, fleet: bool, n: usize) -> ResultsView {
    let names: Vec<(&str, f32, bool)> = (0..n)
        .map(|i| ("Melanocytic nevus", 0.45 - 0.01 * i as f32, true))
        .collect();
    ResultsView {
        query: synthetic_lesion(3, 64, 64),
        matches: matches(&names),
        prediction: Some(PredictionView {
            diagnosis: "Melanoma".to_owned(),
            probability: 0.4,
        }),
        fleet: fleet.then(|| dermascope_ui::FleetView {
            differential: vec!["Melanoma".to_owned()],
            source: dermascope_ui::FleetSource::Cases,
        }),
        review,
        no_close_match,
    }
}

fn inside(outer: &Rectangle, inner: &Rectangle) -> bool {
    inner.size.width > 0
        && inner.size.height > 0
        && outer.contains(inner.top_left)
        && outer.contains(inner.bottom_right().unwrap())
}

fn overlap(a: &Rectangle, b: &Rectangle) -> bool {
    !a.intersection(b).is_zero_sized()
}

#[test]
fn cautions_sit_beside_the_matches_and_the_notice_without_overlap() {
    let combinations = [(true, false), (false, true), (true, true), (false, false)];
    for (w, h) in PANELS {
        let screen = Rectangle::new(Point::zero(), Size::new(w, h));
        for (review, far) in combinations {
            for fleet in [false, true] {
                for n in [0, 1, 3, 5, 8] {
                    let view = cautioned(review, far, fleet, n);
                    let what = format!("{w}x{h} review={review} far={far} fleet={fleet} n={n}");
                    let layout = results_layout(Size::new(w, h), &view);
                    assert_eq!(layout.review.is_some(), review, "{what}: review band");
                    // Without matches the list's sentence says it instead.
                    assert_eq!(
                        layout.no_close_match.is_some(),
                        far && n > 0,
                        "{what}: no-match band"
                    );
                    assert_eq!(layout.fleet.is_some(), fleet, "{what}: fleet band");
                    // The matches stay: as many as fit, and at least three
                    // on every panel the device has.
                    assert!(
                        layout.rows.len() >= n.min(3) && layout.rows.len() <= n.min(5),
                        "{what}: {} rows drawn",
                        layout.rows.len()
                    );
                    assert_eq!(
                        layout.notice.bottom_right().unwrap().y,
                        h as i32 - 1,
                        "{what}: the notice is not at the bottom"
                    );
                    let mut parts = vec![("header", layout.header), ("notice", layout.notice)];
                    parts.extend(layout.fleet.map(|f| ("fleet", f)));
                    for (name, band) in
                        [("review", &layout.review), ("far", &layout.no_close_match)]
                    {
                        let Some(band) = band else { continue };
                        assert!(!band.cut, "{what}: {name} text cut: {:?}", band.text);
                        assert!(inside(&band.area, &band.marker), "{what}: {name} marker");
                        assert!(inside(&band.area, &band.text_area), "{what}: {name} text");
                        assert!(
                            !overlap(&band.marker, &band.text_area),
                            "{what}: {name} text over its marker"
                        );
                        parts.push((name, band.area));
                    }
                    parts.extend(layout.rows.iter().map(|r| ("row", *r)));
                    for (i, (a, ra)) in parts.iter().enumerate() {
                        assert!(inside(&screen, ra), "{what}: {a} off the screen: {ra:?}");
                        for (b, rb) in &parts[i + 1..] {
                            assert!(!overlap(ra, rb), "{what}: {a} {ra:?} overlaps {b} {rb:?}");
                        }
                    }
                    assert_inside(w, h, &worst_status(), &Screen::Results(view), &what);
                }
            }
        }
    }
}

#[test]
fn the_screen_texts_are_the_longest_that_fit() {
    let view = cautioned(true, true, false, 3);
    let wide = results_layout(Size::new(320, 240), &view);
    assert_eq!(wide.review.unwrap().text, REVIEW_TEXTS[0]);
    assert_eq!(wide.no_close_match.unwrap().text, NO_CLOSE_MATCH_TEXTS[0]);
    let square = results_layout(Size::new(240, 240), &view);
    let review = square.review.unwrap();
    assert!(REVIEW_TEXTS.contains(&review.text) && !review.cut);
    assert_eq!(square.no_close_match.unwrap().text, NO_CLOSE_MATCH_TEXTS[0]);
    // A panel narrower than any the device has cuts the shortest words
    // rather than drawing past the band, and says so.
    let tiny = results_layout(Size::new(90, 240), &view);
    let review = tiny.review.unwrap();
    assert!(review.cut && review.text == REVIEW_TEXTS[REVIEW_TEXTS.len() - 1]);
}

fn colour_count(canvas: &Canvas, area: &Rectangle, colour: [u8; 3]) -> usize {
    area.points()
        .filter_map(|p| canvas.pixel(p.x as u32, p.y as u32))
        .filter(|p| [p.r(), p.g(), p.b()] == colour)
        .count()
}

fn drawn(w: u32, h: u32, view: &ResultsView) -> Canvas {
    let mut canvas = Canvas::new(w, h).unwrap();
    render(
        &mut canvas,
        &status(SyncState::Online, 0, None),
        &Screen::Results(view.clone()),
    )
    .unwrap();
    canvas
}

const REDDISH_PURPLE: [u8; 3] = [0xCC, 0x79, 0xA7];
const SKY_BLUE: [u8; 3] = [0x56, 0xB4, 0xE9];
const ORANGE: [u8; 3] = [0xE6, 0x9F, 0x00];
const TEXT: [u8; 3] = [0xF4, 0xF5, 0xF7];
const INK: [u8; 3] = [0, 0, 0];

#[test]
fn the_review_flag_is_drawn_in_words_beside_the_matches() {
    for (w, h) in [(320, 240), (240, 240)] {
        let flagged = cautioned(true, false, false, 5);
        let plain = cautioned(false, false, false, 5);
        let screen = Rectangle::new(Point::zero(), Size::new(w, h));
        let layout = results_layout(Size::new(w, h), &flagged);
        let band = layout.review.clone().unwrap();
        let with = drawn(w, h, &flagged);
        let without = drawn(w, h, &plain);
        // The tag: its colour, and the word on it in ink.
        let tag_colour = colour_count(&with, &band.marker, REDDISH_PURPLE);
        assert!(
            tag_colour > band.marker.size.width as usize * 8,
            "{w}x{h}: no tag"
        );
        assert!(
            colour_count(&with, &band.marker, INK) > 20,
            "{w}x{h}: tag has no word"
        );
        assert!(
            colour_count(&with, &band.text_area, TEXT) > 50,
            "{w}x{h}: no words"
        );
        assert_eq!(
            colour_count(&without, &screen, REDDISH_PURPLE),
            0,
            "{w}x{h}"
        );
        // The matches are still drawn, each with its similarity bar.
        for row in &layout.rows {
            assert!(
                colour_count(&with, row, SKY_BLUE) > 0,
                "{w}x{h}: a row is empty"
            );
        }
    }
}

#[test]
fn far_matches_stay_listed_but_greyed_under_no_close_match() {
    for (w, h) in [(320, 240), (240, 240)] {
        let far = cautioned(false, true, false, 4);
        let close = cautioned(false, false, false, 4);
        let layout = results_layout(Size::new(w, h), &far);
        let band = layout.no_close_match.clone().unwrap();
        let weak = drawn(w, h, &far);
        let strong = drawn(w, h, &close);
        assert!(colour_count(&weak, &band.marker, ORANGE) == band.marker.size.height as usize * 3);
        assert!(
            colour_count(&weak, &band.text_area, TEXT) > 50,
            "{w}x{h}: no words"
        );
        assert_eq!(
            layout.rows.len(),
            4,
            "{w}x{h}: the matches must stay listed"
        );
        for row in &layout.rows {
            // The thumbnail and name are drawn; the similarity is not blue.
            assert!(
                colour_count(&weak, row, TEXT) > 20,
                "{w}x{h}: a row is empty"
            );
            assert_eq!(
                colour_count(&weak, row, SKY_BLUE),
                0,
                "{w}x{h}: a far match in blue"
            );
        }
        let strong_rows = results_layout(Size::new(w, h), &close).rows;
        for row in &strong_rows {
            assert!(colour_count(&strong, row, SKY_BLUE) > 0, "{w}x{h}");
        }
    }
}
