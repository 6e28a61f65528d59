//! dermascope-ui: the handheld's screens, as pure functions of a view model.
//!
//! [`render`] draws the status bar and one [`Screen`] over any
//! `embedded_graphics` [`DrawTarget`](embedded_graphics::draw_target::DrawTarget)
//! with RGB888 colours: the in-memory [`Canvas`] (which the daemon hands to
//! a panel driver or saves as PNG), or a panel driver directly. Drawing the
//! same view model always gives the same pixels, which the golden tests in
//! `tests/golden.rs` hold to (and `docs/screens/` shows).
//!
//! Boundaries: this crate depends on nothing of Dermascope's. The daemon
//! turns cases, quality reports and sync state into the plain structs of
//! [`view`]; images arrive already decoded as RGB888 [`Thumbnail`]s. No I/O,
//! no clocks, no logging.
//!
//! Design rules the screens keep: legible at arm's length on a 2-inch
//! 320x240 panel (fonts of 8x13 px and up for anything the clinician must
//! read), colour-blind-safe accents (Okabe-Ito, and never colour alone: each
//! state also has a word or a distinct icon shape), text cut or wrapped to
//! its box, and the results screen always says it is not a diagnosis.

mod canvas;
mod draw;
mod palette;
mod text;
pub mod view;

pub use canvas::{Canvas, CanvasError, MAX_CANVAS_SIDE};
pub use draw::{
    render, results_layout, BandLayout, ResultsLayout, MAX_MATCHES_SHOWN, NOTICE,
    NO_CLOSE_MATCH_TEXTS, REVIEW_TAG, REVIEW_TEXTS, STATUS_BAR_HEIGHT,
};
pub use view::{
    Clock, FleetSource, FleetView, MatchView, PredictionView, RejectionView, ResultsView, Screen,
    StatusView, SyncState, Thumbnail, ThumbnailError,
};
