//! The view model: plain data the daemon fills in and the screens draw.
//! Nothing here knows where the data came from (store, encoder, camera).

/// Why a [`Thumbnail`] could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ThumbnailError {
    /// A side is zero.
    #[error("thumbnail of {width}x{height} has no pixels")]
    Empty {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
    },
    /// The buffer does not hold `width * height * 3` bytes.
    #[error("thumbnail of {width}x{height} needs {expected} RGB888 bytes, got {actual}")]
    LengthMismatch {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// `width * height * 3`, or `usize::MAX` when that overflows.
        expected: usize,
        /// Bytes supplied.
        actual: usize,
    },
}

/// A small decoded picture (RGB888, row-major, no padding). The caller
/// decodes; the screens only scale it to fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thumbnail {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Thumbnail {
    /// Checks that `rgb` holds exactly `width * height` RGB888 pixels.
    pub fn new(width: u32, height: u32, rgb: Vec<u8>) -> Result<Self, ThumbnailError> {
        if width == 0 || height == 0 {
            return Err(ThumbnailError::Empty { width, height });
        }
        let expected = (width as usize)
            .checked_mul(height as usize)
            .and_then(|n| n.checked_mul(3))
            .unwrap_or(usize::MAX);
        if rgb.len() != expected {
            return Err(ThumbnailError::LengthMismatch {
                width,
                height,
                expected,
                actual: rgb.len(),
            });
        }
        Ok(Self { width, height, rgb })
    }

    /// Width in pixels (never zero).
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels (never zero).
    pub fn height(&self) -> u32 {
        self.height
    }

    /// RGB888 bytes, row-major.
    pub fn rgb(&self) -> &[u8] {
        &self.rgb
    }
}

/// The device's link to the cloud case library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// No network; everything works from the local library.
    Offline,
    /// Connected and up to date.
    Online,
    /// Connected and exchanging cases.
    Syncing,
}

/// Local wall-clock time, already converted by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// 0-23.
    pub hours: u8,
    /// 0-59.
    pub minutes: u8,
}

/// The status bar drawn at the top of every screen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusView {
    /// Network state.
    pub sync: SyncState,
    /// Captures waiting to be uploaded.
    pub pending_uploads: u32,
    /// Confirmed cases in the local library.
    pub cases_in_library: u32,
    /// Time of day, when the device knows it.
    pub clock: Option<Clock>,
    /// Minutes since the last completed exchange with the fleet service;
    /// `None` when there has been none (or sync is not configured). An age,
    /// not a time of day, so it reads right whatever the device's clock
    /// and time zone.
    pub last_sync_minutes: Option<u32>,
}

/// Why a capture was refused, as the clinician needs to hear it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionView {
    /// Out of focus or moved.
    Blurry,
    /// Under-exposed.
    TooDark,
    /// Over-exposed or glare.
    TooBright,
    /// Nothing that looks like a lesion in the centre.
    NoLesion,
    /// The camera returned no usable frame.
    CameraError,
}

impl RejectionView {
    /// Short headline for the screen.
    pub fn title(self) -> &'static str {
        match self {
            Self::Blurry => "Image is blurred",
            Self::TooDark => "Image too dark",
            Self::TooBright => "Image too bright",
            Self::NoLesion => "No lesion in view",
            Self::CameraError => "Camera problem",
        }
    }

    /// The usual remedy, for callers with nothing more specific to say.
    pub fn default_advice(self) -> &'static str {
        match self {
            Self::Blurry => "Hold the scope flat on the skin and keep still.",
            Self::TooDark => "Check the light ring is on and the scope touches the skin.",
            Self::TooBright => "Reduce glare: add immersion fluid or switch to polarised light.",
            Self::NoLesion => "Centre the lesion inside the circle.",
            Self::CameraError => "Try again. If it repeats, restart the device.",
        }
    }
}

/// One similar confirmed case.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchView {
    /// Diagnosis as the library records it, in plain words.
    pub diagnosis: String,
    /// Cosine similarity to the query, -1..=1 (shown as 0-100%).
    pub similarity: f32,
    /// The case's photograph.
    pub thumbnail: Thumbnail,
    /// Whether the diagnosis was confirmed (e.g. by histopathology).
    pub confirmed: bool,
}

/// The classifier's suggestion, shown beside the similar cases.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionView {
    /// Suggested diagnosis in plain words.
    pub diagnosis: String,
    /// Its probability, 0..=1.
    pub probability: f32,
}

/// Who produced the fleet service's answer: the clinician must be able
/// to tell a language model's reading from a vote of confirmed cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetSource {
    /// The vision-language model, shown the most similar confirmed cases.
    Model,
    /// The fleet's confirmed cases alone (no model, or it failed).
    Cases,
}

/// The fleet service's answer for the capture, once it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetView {
    /// Most likely first, in plain words.
    pub differential: Vec<String>,
    /// Who answered.
    pub source: FleetSource,
}

/// Everything the results screen shows.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultsView {
    /// The photograph just taken.
    pub query: Thumbnail,
    /// Most similar first; the screen shows as many as fit (five at 240 px).
    pub matches: Vec<MatchView>,
    /// The classifier's suggestion, when one ran.
    pub prediction: Option<PredictionView>,
    /// The fleet service's answer; `None` until it arrives (or offline).
    pub fleet: Option<FleetView>,
    /// The capture crossed the clinic's melanoma operating point ("flag for
    /// review"): drawn as a band beside the matches, the suggestion and the
    /// notice, never instead of any of them.
    pub review: bool,
    /// The best match is farther from the capture than the library's own
    /// lesions are from theirs, but for a few: "no close match" is said,
    /// and the matches stay listed, drawn as weak ones.
    pub no_close_match: bool,
}

/// What the body of the screen shows.
#[derive(Debug, Clone, PartialEq)]
pub enum Screen {
    /// Waiting for the button, with the camera's live view when there is one.
    Ready {
        /// Latest preview frame, scaled down by the caller.
        live: Option<Thumbnail>,
        /// One line telling the clinician what to do next.
        hint: String,
    },
    /// A burst is being taken; the clinician must hold still.
    Capturing {
        /// Frames already taken.
        frames_taken: u32,
        /// Frames in the burst.
        burst_len: u32,
    },
    /// The quality gate refused every frame of the burst.
    Rejected {
        /// Why.
        reason: RejectionView,
        /// One line on what to do about it (see
        /// [`RejectionView::default_advice`]).
        what_to_do: String,
    },
    /// Similar confirmed cases for the last capture.
    Results(ResultsView),
    /// A signed update is being verified or installed: the device cannot
    /// capture meanwhile, and says so with how far it is.
    Updating {
        /// What is happening ("Installing update 12").
        title: String,
        /// The step in words ("Re-embedding the case library").
        detail: String,
        /// Units done of `total` (files, cases); `total == 0` draws no bar.
        done: u64,
        total: u64,
    },
    /// Something outside the capture went wrong (storage, model, ...).
    Error {
        /// Short headline.
        title: String,
        /// What the user can do about it.
        what_to_fix: String,
    },
}

impl Screen {
    /// A rejection with the reason's usual advice.
    pub fn rejected(reason: RejectionView) -> Self {
        Self::Rejected {
            reason,
            what_to_do: reason.default_advice().to_owned(),
        }
    }
}
