//! The daemon's side of the fleet link: what the status bar says about it,
//! and the fleet service's answer for the last capture on the results
//! screen.
//!
//! Everything here is non-blocking for the loop: the sync thread
//! (`dermascope-sync`) owns the network, the status is a snapshot, and the
//! answer to a capture arrives on a channel the loop polls at each tick. A
//! capture is answered from the local library first, always; the fleet's
//! answer is added to that screen when it comes, if the clinician is still
//! looking at it.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;

use dermascope_cloud_api::{AnsweredBy, RagAnswer, RagRequest};
use dermascope_device::Frame;
use dermascope_store::Diagnosis;
use dermascope_sync::{SyncError, SyncHandle};
use dermascope_ui::{FleetSource, FleetView, SyncState};
use tracing::{debug, info, warn};

/// Similar cases the fleet service is asked to show the model.
const RAG_CASES: usize = 5;

/// A running sync thread, as the loop sees it.
pub struct FleetLink {
    /// Shared with the short-lived threads that encode a question's photo.
    handle: Arc<SyncHandle>,
    waiting: Option<Waiting>,
}

/// The answer being waited for, and which capture it belongs to.
struct Waiting {
    capture: u64,
    answer: Receiver<Result<RagAnswer, SyncError>>,
}

impl FleetLink {
    pub fn new(handle: SyncHandle) -> Self {
        Self {
            handle: Arc::new(handle),
            waiting: None,
        }
    }

    /// The bar's sync state and the minutes since the last sync.
    pub fn status(&self, now_ms: u64) -> (SyncState, Option<u32>, usize) {
        let status = self.handle.status();
        let state = if status.syncing {
            SyncState::Syncing
        } else if status.online {
            SyncState::Online
        } else {
            SyncState::Offline
        };
        let minutes = status
            .last_sync_ms
            .map(|at| u32::try_from(now_ms.saturating_sub(at) / 60_000).unwrap_or(u32::MAX));
        (state, minutes, status.pending_uploads)
    }

    /// A case was saved: upload it now rather than at the next interval.
    pub fn nudge(&self) {
        self.handle.nudge();
    }

    /// A downloaded bundle or a rollback the fleet's rollout asks for,
    /// handed out once.
    pub fn take_update(&self) -> Option<dermascope_sync::ReadyUpdate> {
        self.handle.take_update()
    }

    /// Queues an update's outcome for the service (sent until acknowledged).
    pub fn report_update(&self, result: dermascope_cloud_api::UpdateResult) {
        self.handle.report_update(result);
    }

    /// What the device runs, for the report sent at every sync cycle.
    pub fn set_installed(&self, bundle_version: Option<u64>, failed_versions: Vec<u64>) {
        self.handle.set_installed(bundle_version, failed_versions);
    }

    /// The bundle being downloaded, if any.
    pub fn download(&self) -> Option<dermascope_sync::DownloadProgress> {
        self.handle.status().download
    }

    /// Asks the fleet service about capture number `capture`, in the
    /// background; a newer capture's question replaces an older one's.
    /// The photograph is encoded off the loop, and sent only where the
    /// clinic allows originals to leave (the sync client drops it
    /// otherwise, and the thumbnail stands in).
    pub fn ask(
        &mut self,
        capture: u64,
        model_id: &str,
        embedding: &[f32],
        thumbnail_jpeg: &[u8],
        frame: &Arc<Frame>,
    ) {
        let (sender, answer) = mpsc::channel();
        let handle = Arc::clone(&self.handle);
        let request = RagRequest {
            model_id: model_id.to_owned(),
            embedding: embedding.to_vec(),
            k: RAG_CASES,
            photo_jpeg: None,
            thumbnail_jpeg: (!thumbnail_jpeg.is_empty()).then(|| thumbnail_jpeg.to_vec()),
        };
        let frame = Arc::clone(frame);
        let spawned = std::thread::Builder::new()
            .name("fleet-question".into())
            .spawn(move || {
                let mut request = request;
                request.photo_jpeg =
                    image::RgbImage::from_raw(frame.width, frame.height, frame.rgb.clone())
                        .and_then(|photo| dermascope_library::original_from_rgb(&photo).ok())
                        .map(|photo| photo.into_jpeg());
                // recv fails only if the sync thread is gone; the loop
                // then sees a closed channel and stops waiting.
                if let Ok(result) = handle.request_rag(request).recv() {
                    let _ = sender.send(result);
                }
            });
        match spawned {
            Ok(_) => self.waiting = Some(Waiting { capture, answer }),
            Err(e) => warn!(error = %e, "cannot ask the fleet service: no thread"),
        }
    }

    /// The answer for `capture`, once it has arrived; `None` while it is
    /// still on its way, and for good once it failed or was superseded.
    pub fn answer_for(&mut self, capture: u64) -> Option<FleetView> {
        let waiting = self.waiting.as_ref()?;
        if waiting.capture != capture {
            self.waiting = None;
            return None;
        }
        match waiting.answer.try_recv() {
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.waiting = None;
                None
            }
            Ok(result) => {
                self.waiting = None;
                match result {
                    Ok(answer) => {
                        info!(
                            answered_by = ?answer.answered_by,
                            cases = answer.cases.len(),
                            "fleet answer arrived"
                        );
                        Some(fleet_view(&answer))
                    }
                    Err(e) => {
                        debug!(error = %e, "no fleet answer for this capture");
                        None
                    }
                }
            }
        }
    }

    /// Stops the sync thread (it finishes the request in flight first).
    /// A question still being encoded holds the handle a moment longer;
    /// the last holder's drop stops it then.
    pub fn stop(self) {
        if let Ok(handle) = Arc::try_unwrap(self.handle) {
            handle.stop();
        }
    }
}

/// The screen's words for an answer: the service's names, or the
/// device's own for a code it knows when the service gave none.
pub fn fleet_view(answer: &RagAnswer) -> FleetView {
    let known: HashMap<&str, String> = Diagnosis::ham10000_codes()
        .filter_map(|code| {
            Diagnosis::from_code(code)
                .ok()
                .map(|d| (code, d.display_name))
        })
        .collect();
    let differential = answer
        .differential
        .iter()
        .take(3)
        .map(|ranked| {
            if ranked.name.trim().is_empty() {
                known
                    .get(ranked.code.as_str())
                    .cloned()
                    .unwrap_or_else(|| ranked.code.clone())
            } else {
                ranked.name.clone()
            }
        })
        .collect();
    FleetView {
        differential,
        source: match answer.answered_by {
            AnsweredBy::Model => FleetSource::Model,
            AnsweredBy::Retrieval => FleetSource::Cases,
        },
    }
}
