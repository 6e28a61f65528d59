//! One capture, from the frames of a press to the screen that answers it:
//! quality gate → encoder → adapter → top-k → thumbnails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dermascope_adapter::{Adapter, AdapterOutput};
use dermascope_device::Frame;
use dermascope_encoder::Encoder;
use dermascope_library::evaluation::COMBINED_K;
use dermascope_library::{
    close_match, combined_probabilities, melanoma_flag, thumbnail, thumbnail_jpeg, Neighbour,
};
use dermascope_quality::{self as quality, QualityThresholds, RejectReason, Verdict};
use dermascope_store::{Case, CaseFilter, CaseStore, Diagnosis, ScoreKind, SearchHit};
use dermascope_ui::{MatchView, PredictionView, RejectionView, ResultsView, Screen, Thumbnail};
use image::RgbImage;
use serde::Serialize;
use tracing::{info, warn};

use crate::retrain::AdapterSlot;

pub use dermascope_library::THUMBNAIL_SIDE;

/// Where the time of one capture went, in milliseconds. A stage that did
/// not run (no frames, a refused frame, no adapter) is `None`, so a reader
/// never mistakes "not run" for "took no time".
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StageTimings {
    /// Taking the frames from the camera: a burst's wait, or taking the
    /// ring's frames (plus the wait for the next ones when none passed).
    pub burst_ms: Option<f64>,
    pub quality_ms: Option<f64>,
    pub encoder_ms: Option<f64>,
    pub adapter_ms: Option<f64>,
    pub search_ms: Option<f64>,
    /// Reading and decoding the matches' thumbnails.
    pub thumbnails_ms: Option<f64>,
    /// Drawing the screen into the canvas.
    pub render_ms: Option<f64>,
    /// Handing the pixels to the display.
    pub present_ms: Option<f64>,
    /// Trigger to results drawn.
    pub total_ms: f64,
    /// Which frame was answered, when one passed the gate.
    pub frame: Option<ChosenFrame>,
}

/// Where the answered frame came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FrameOrigin {
    /// One of the frames taken after the press (burst mode).
    Burst,
    /// The ring: captured within the window before the press.
    Ring,
    /// Captured just after the press, because no frame of the ring passed.
    FollowUp,
}

/// The frame a capture answered.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ChosenFrame {
    pub origin: FrameOrigin,
    /// The source's sequence number of the frame.
    pub sequence: u64,
    /// Press to capture of the frame: positive for a frame captured
    /// before the press, negative after it.
    pub age_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What a capture produced that a confirmation can turn into a case.
#[derive(Clone)]
pub struct CapturedLesion {
    pub embedding: Vec<f32>,
    /// The adapter embedding, when an adapter ran.
    pub adapter_embedding: Option<Vec<f32>>,
    /// The adapter that computed it (a retraining may replace it before
    /// the case is written).
    pub adapter_id: Option<String>,
    pub thumbnail_jpeg: Vec<u8>,
    /// The adapter's suggestion, else the top match's diagnosis code.
    pub suggested_code: Option<String>,
    /// The frame the answer came from: kept with a confirmed case as its
    /// original photograph (encoded by the case writer, not on the way to
    /// the screen).
    pub frame: Arc<Frame>,
}

/// Why a chosen frame got no answer; each says what to do first (the
/// screen cuts a long text, and the detail is also in the log).
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("The camera frame has the wrong size. Restart the device.")]
    FrameSize,
    #[error("The encoder failed ({0}). Restart the device.")]
    Encoder(#[from] dermascope_encoder::EncoderError),
    #[error("Restart the device; if it repeats, call service. ({0})")]
    Search(#[from] dermascope_store::StoreError),
    #[error("The photograph could not be shown ({0}).")]
    Thumbnail(#[from] dermascope_ui::ThumbnailError),
}

/// The outcome of one capture.
pub struct Analysis {
    pub screen: Screen,
    pub timings: StageTimings,
    pub capture: Option<CapturedLesion>,
    /// The cases a results screen lists, best first, with their scores
    /// (empty for any other screen): what the clinician was shown.
    pub shown: Vec<SearchHit>,
}

/// Everything that turns frames into an answer; shared by the daemon and
/// the end-to-end benchmark.
pub struct Analyzer {
    pub encoder: Encoder,
    /// Replaced while serving when a retraining keeps a new adapter.
    pub adapter: AdapterSlot,
    pub store: Arc<CaseStore>,
    pub thresholds: QualityThresholds,
    pub top_k: usize,
    /// Which copy of the raw index to score with (the handheld keeps int8).
    pub raw_score: ScoreKind,
}

impl Analyzer {
    /// Judges the burst and, for the sharpest acceptable frame, finds the
    /// similar cases. Never fails: trouble becomes a screen.
    pub fn analyse(&self, frames: &[Arc<Frame>], timings: &mut StageTimings) -> Analysis {
        let started = Instant::now();
        let chosen = self.judge(frames);
        timings.quality_ms = Some(ms(started.elapsed()));
        match chosen {
            Ok(best) => self.analyse_frame(&frames[best], timings),
            Err(reason) => Self::refused(reason, timings),
        }
    }

    /// The answer for a frame the gate accepted. Never fails: trouble
    /// becomes a screen.
    pub fn analyse_frame(&self, frame: &Arc<Frame>, timings: &mut StageTimings) -> Analysis {
        match self.answer(frame, timings) {
            Ok(analysis) => analysis,
            Err(problem) => {
                warn!(error = %problem, "capture could not be answered");
                Analysis {
                    screen: Screen::Error {
                        title: "Could not search".into(),
                        what_to_fix: problem.to_string(),
                    },
                    timings: *timings,
                    capture: None,
                    shown: Vec::new(),
                }
            }
        }
    }

    /// The screen for a capture whose frames were all refused.
    pub fn refused(reason: RejectionView, timings: &StageTimings) -> Analysis {
        Analysis {
            screen: Screen::rejected(reason),
            timings: *timings,
            capture: None,
            shown: Vec::new(),
        }
    }

    /// The index in `frames` of the sharpest frame the gate accepts, else
    /// why they were refused. A malformed frame (its pixels do not match
    /// its size) is skipped and costs only itself; only when every frame is
    /// malformed is the camera blamed.
    pub fn judge(&self, frames: &[Arc<Frame>]) -> Result<usize, RejectionView> {
        let mut views = Vec::with_capacity(frames.len());
        let mut kept = Vec::with_capacity(frames.len());
        for (index, frame) in frames.iter().enumerate() {
            match quality::Frame::new(frame.width, frame.height, &frame.rgb) {
                Ok(view) => {
                    views.push(view);
                    kept.push(index);
                }
                Err(e) => {
                    warn!(
                        sequence = frame.sequence,
                        error = %e,
                        "malformed camera frame skipped; the other frames are judged"
                    );
                }
            }
        }
        if views.is_empty() {
            if !frames.is_empty() {
                warn!(
                    frames = frames.len(),
                    "every frame of the capture was malformed"
                );
            }
            return Err(RejectionView::CameraError);
        }
        let reports = quality::assess_burst(&views, &self.thresholds);
        if let Some(best) = quality::sharpest_accepted(&reports) {
            return Ok(kept[best]);
        }
        // Every frame refused: tell the clinician the commonest reason (on
        // a tie the later one in this order, blur last: it is the usual one).
        let order = [
            RejectReason::TooDark,
            RejectReason::TooBright,
            RejectReason::NoLesion,
            RejectReason::Blurry,
        ];
        let commonest = order
            .into_iter()
            .max_by_key(|reason| {
                reports
                    .iter()
                    .filter(|r| r.verdict == Verdict::Reject(*reason))
                    .count()
            })
            .unwrap_or(RejectReason::Blurry);
        Err(rejection_view(commonest))
    }

    fn answer(
        &self,
        frame: &Arc<Frame>,
        timings: &mut StageTimings,
    ) -> Result<Analysis, AnswerError> {
        let photo = RgbImage::from_raw(frame.width, frame.height, frame.rgb.clone())
            .ok_or(AnswerError::FrameSize)?;
        let started = Instant::now();
        let embedding = self.encoder.embed_rgb(&photo)?.into_values();
        timings.encoder_ms = Some(ms(started.elapsed()));

        // Once per capture: a swap between here and the screen is seen by
        // the next capture only.
        let adapter = self.adapter.current();
        let started = Instant::now();
        let adapted: Option<AdapterOutput> = match &adapter {
            Some(adapter) => match adapter.predict(&embedding) {
                Ok(out) => Some(out),
                Err(e) => {
                    warn!(error = %e, "adapter failed; showing raw matches");
                    None
                }
            },
            None => None,
        };
        if adapter.is_some() {
            timings.adapter_ms = Some(ms(started.elapsed()));
        }

        // The rules live in the adapter's manifest and hold in its space
        // only: without an adapter that ran, neither is applied.
        let calibrated = match (&adapted, &adapter) {
            (Some(out), Some(adapter)) => adapter
                .manifest()
                .calibration
                .as_ref()
                .map(|calibration| (adapter, out, calibration)),
            _ => None,
        };
        // The combined melanoma score votes with more neighbours than a
        // small panel lists.
        let k = match calibrated {
            Some((_, _, calibration)) if calibration.melanoma.is_some() => {
                self.top_k.max(COMBINED_K)
            }
            _ => self.top_k,
        };

        let started = Instant::now();
        let filter = CaseFilter::any();
        let hits = match &adapted {
            Some(out) => self.store.search_adapter_space(&out.embedding, k, &filter),
            None => self.store.search(&embedding, k, &filter, self.raw_score),
        }?;
        // The no-match rule also asks how far the capture is in the raw
        // space, which sees a photograph the adapter maps onto some class's
        // region as far: one more scan, for the best match only.
        let raw_top1 = match calibrated {
            Some((_, _, calibration))
                if calibration
                    .no_match
                    .as_ref()
                    .is_some_and(|rule| rule.min_top1_raw_similarity.is_some()) =>
            {
                self.store
                    .search(&embedding, 1, &filter, self.raw_score)?
                    .first()
                    .map(|hit| hit.score)
            }
            _ => None,
        };
        timings.search_ms = Some(ms(started.elapsed()));

        let started = Instant::now();
        let found = self.read_cases(&hits);
        let listed = hits.len().min(self.top_k);
        let (matches, shown, top_match_code) = self.match_views(&found, listed);
        let (review, no_close_match) = match calibrated {
            Some((adapter, out, _)) => {
                let neighbours: Vec<Neighbour> = found
                    .iter()
                    .map(|(_, hit, case)| Neighbour {
                        label: case.diagnosis.code.clone(),
                        similarity: hit.score,
                    })
                    .collect();
                cautions(
                    adapter,
                    out,
                    &neighbours,
                    hits.first().map(|h| h.score),
                    raw_top1,
                )
            }
            None => (false, false),
        };
        let small = thumbnail(&photo);
        let (width, height) = small.dimensions();
        let query = Thumbnail::new(width, height, small.into_raw());
        timings.thumbnails_ms = Some(ms(started.elapsed()));

        // The adapter's class, else the most similar case's diagnosis: shown
        // as the suggestion, and kept if the clinician confirms without a label.
        let adapter_class = match (&adapted, &adapter) {
            (Some(out), Some(adapter)) => adapter
                .classes()
                .get(out.predicted)
                .map(|code| (code.clone(), out.probabilities[out.predicted])),
            _ => None,
        };
        let prediction = adapter_class
            .as_ref()
            .map(|(code, probability)| PredictionView {
                diagnosis: display_name(code),
                probability: *probability,
            });
        let suggested_code = adapter_class.map(|(code, _)| code).or(top_match_code);
        let thumbnail_jpeg = thumbnail_jpeg(&photo).unwrap_or_default();
        let query = query?;
        Ok(Analysis {
            screen: Screen::Results(ResultsView {
                query,
                matches,
                prediction,
                // Arrives later, from the fleet service, if at all.
                fleet: None,
                review,
                no_close_match,
            }),
            timings: *timings,
            capture: Some(CapturedLesion {
                embedding,
                adapter_id: adapted
                    .as_ref()
                    .and(adapter.as_ref())
                    .map(|a| a.adapter_id().to_owned()),
                adapter_embedding: adapted.map(|a| a.embedding),
                thumbnail_jpeg,
                suggested_code,
                frame: Arc::clone(frame),
            }),
            shown,
        })
    }

    /// The stored cases of `hits`, each with its rank and hit; a case
    /// removed since the search, or unreadable, is left out.
    fn read_cases<'h>(&self, hits: &'h [SearchHit]) -> Vec<(usize, &'h SearchHit, Case)> {
        let mut found = Vec::with_capacity(hits.len());
        for (rank, hit) in hits.iter().enumerate() {
            match self.store.get(&hit.id) {
                Ok(Some(case)) => found.push((rank, hit, case)),
                Ok(None) => {} // removed since the search
                Err(e) => {
                    warn!(case = %hit.id.log_tag(), error = %e, "match skipped");
                }
            }
        }
        found
    }

    /// The matches among the first `listed` hits as the screen shows them,
    /// the hits they are, and the diagnosis code of the most similar one
    /// (read here once rather than again for the suggestion).
    fn match_views(
        &self,
        found: &[(usize, &SearchHit, Case)],
        listed: usize,
    ) -> (Vec<MatchView>, Vec<SearchHit>, Option<String>) {
        let mut matches = Vec::with_capacity(listed);
        let mut shown = Vec::with_capacity(listed);
        let mut top_code = None;
        for (_, hit, case) in found.iter().filter(|(rank, _, _)| *rank < listed) {
            // A case whose thumbnail does not decode is still a match worth
            // showing; a grey square stands in for its picture.
            let thumbnail = match decode_thumbnail(&case.thumbnail_jpeg) {
                Ok(t) => t,
                Err(e) => {
                    warn!(case = %hit.id.log_tag(), error = %e, "thumbnail unreadable");
                    match Thumbnail::new(1, 1, vec![128; 3]) {
                        Ok(grey) => grey,
                        Err(_) => continue,
                    }
                }
            };
            if top_code.is_none() {
                top_code = Some(case.diagnosis.code.clone());
            }
            matches.push(MatchView {
                diagnosis: case.diagnosis.display_name.clone(),
                similarity: hit.score,
                thumbnail,
                confirmed: case.label_confirmed,
            });
            shown.push((*hit).clone());
        }
        (matches, shown, top_code)
    }
}

/// The calibrated cautions of one capture, `(review, no_close_match)`:
/// the review flag when the combined melanoma score of the adapter's
/// output and its `neighbours` (adapter space, best first) reaches the
/// clinic's operating point, and "no close match" when the best match's
/// similarity, `top1` in the adapter's space or `raw_top1` in the raw one,
/// falls below the no-match rule. Each is false when the adapter's manifest
/// has no such rule. The log says which fired and in which space, never the
/// capture's score or similarity.
pub fn cautions(
    adapter: &Adapter,
    output: &AdapterOutput,
    neighbours: &[Neighbour],
    top1: Option<f32>,
    raw_top1: Option<f32>,
) -> (bool, bool) {
    let Some(calibration) = adapter.manifest().calibration.as_ref() else {
        return (false, false);
    };
    let review = calibration.melanoma.as_ref().is_some_and(|point| {
        let combined = combined_probabilities(output, neighbours, adapter.classes(), COMBINED_K);
        let flagged = melanoma_flag(adapter, &combined) == Some(true);
        if flagged {
            info!(
                adapter = adapter.adapter_id(),
                threshold = point.threshold,
                target_sensitivity = point.target_sensitivity,
                "capture flagged for review: combined melanoma score at or over the clinic's threshold"
            );
        }
        flagged
    });
    let no_close_match = calibration.no_match.as_ref().is_some_and(|rule| {
        let far = !close_match(adapter, top1, raw_top1);
        if far {
            let space = match (rule.adapter_close(top1), rule.raw_close(raw_top1)) {
                (false, false) => "both spaces",
                (false, true) => "adapter space",
                _ => "raw space",
            };
            info!(
                adapter = adapter.adapter_id(),
                min_similarity = rule.min_top1_similarity,
                min_raw_similarity = rule.min_top1_raw_similarity,
                space,
                "no close match in the library: the best match is below the calibrated similarity"
            );
        }
        far
    });
    (review, no_close_match)
}

fn rejection_view(reason: RejectReason) -> RejectionView {
    match reason {
        RejectReason::TooDark => RejectionView::TooDark,
        RejectReason::TooBright => RejectionView::TooBright,
        RejectReason::NoLesion => RejectionView::NoLesion,
        RejectReason::Blurry => RejectionView::Blurry,
    }
}

/// Plain-words name of a diagnosis code (the code itself when unknown).
pub fn display_name(code: &str) -> String {
    Diagnosis::from_code(code)
        .map(|d| d.display_name)
        .unwrap_or_else(|_| code.to_string())
}

/// Why a stored thumbnail could not be drawn.
#[derive(Debug, thiserror::Error)]
enum ThumbnailReadError {
    #[error("not a readable JPEG: {0}")]
    Decode(#[from] image::ImageError),
    #[error(transparent)]
    Shape(#[from] dermascope_ui::ThumbnailError),
}

fn decode_thumbnail(jpeg: &[u8]) -> Result<Thumbnail, ThumbnailReadError> {
    let image = image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg)?.into_rgb8();
    let (w, h) = image.dimensions();
    Ok(Thumbnail::new(w, h, image.into_raw())?)
}
