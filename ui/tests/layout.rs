//! Layout under stress: long diagnosis names, 0 to 8 matches, odd numbers
//! and other panel sizes must never draw outside the screen, and names must
//! never run into the similarity column.

mod common;

use std::convert::Infallible;

use common::{matches, screens, status, synthetic_lesion};
use dermascope_ui::{
    render, Canvas, MatchView, PredictionView, RejectionView, ResultsView, Screen, StatusView,
    SyncState, Thumbnail, ThumbnailError,
};
use embedded_graphics::pixelcolor::{Rgb888, RgbColor};
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Pixel, Size};

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
        // The worst case has the fleet band too: it takes room from the list.
        fleet: Some(dermascope_ui::FleetView {
            differential: LONG_NAMES.iter().map(|n| (*n).to_owned()).collect(),
            source: dermascope_ui::FleetSource::Model,
        }),
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
