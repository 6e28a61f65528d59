//! The text of ingest's progress line, and when to show it: for a caller
//! that prints (the CLI, the daemon's first start). It names no file, since
//! image names may hold patients' names.

use std::time::{Duration, Instant};

use super::IngestProgress;

/// How often a terminal's line is redrawn, at most.
pub const TERMINAL_INTERVAL: Duration = Duration::from_secs(1);

/// How often a line is written where stderr is a log (a pipe, journald),
/// at most, so that a quarter of an hour of ingest is about a hundred lines.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Turns [`IngestProgress`] reports into lines such as
/// `ingest: 1200/4176 images, 14.2/s, about 3 min 30 s left`, no more
/// often than its interval (the first report and the last row always get
/// one). The rate is counted from the first report, which [`super::ingest`]
/// makes before the first photograph; the caller passes the time, so the
/// pacing is testable without waiting.
#[derive(Debug, Clone)]
pub struct ProgressLine {
    interval: Duration,
    /// When the first report came, and its `done`.
    first: Option<(Instant, usize)>,
    last_shown: Option<Instant>,
}

impl ProgressLine {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            first: None,
            last_shown: None,
        }
    }

    /// The line for `progress` at `now`, or `None` while the last line shown
    /// is younger than the interval.
    pub fn update(&mut self, progress: IngestProgress, now: Instant) -> Option<String> {
        let (start, start_done) = *self.first.get_or_insert((now, progress.done));
        let finished = progress.done >= progress.total;
        let due = self
            .last_shown
            .is_none_or(|shown| now.saturating_duration_since(shown) >= self.interval);
        if !due && !finished {
            return None;
        }
        self.last_shown = Some(now);
        let seconds = now.saturating_duration_since(start).as_secs_f64();
        let counted = progress.done.saturating_sub(start_done);
        let rate = (seconds > 0.0 && counted > 0).then(|| counted as f64 / seconds);
        Some(line(progress, rate, seconds))
    }
}

/// `ingest: DONE/TOTAL images[, R/s, about T left | , R/s, done in T]`.
fn line(progress: IngestProgress, rate: Option<f64>, seconds: f64) -> String {
    let IngestProgress { done, total } = progress;
    let mut text = format!("ingest: {done}/{total} images");
    if let Some(rate) = rate {
        text.push_str(&format!(", {rate:.1}/s"));
        if done >= total {
            text.push_str(&format!(", done in {}", duration(seconds)));
        } else {
            let left = (total - done) as f64 / rate;
            text.push_str(&format!(", about {} left", duration(left)));
        }
    }
    text
}

/// `40 s`, `3 min 30 s` (to 10 s: an estimate), `1 h 5 min`.
fn duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0);
    if seconds < 59.5 {
        return format!("{} s", (seconds.round() as u64).max(1));
    }
    if seconds < 3595.0 {
        let tens = (seconds / 10.0).round() as u64;
        let (minutes, rest) = (tens / 6, tens % 6 * 10);
        return if rest == 0 {
            format!("{minutes} min")
        } else {
            format!("{minutes} min {rest} s")
        };
    }
    let minutes = (seconds / 60.0).round() as u64;
    let (hours, rest) = (minutes / 60, minutes % 60);
    if rest == 0 {
        format!("{hours} h")
    } else {
        format!("{hours} h {rest} min")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(done: usize) -> IngestProgress {
        IngestProgress { done, total: 4176 }
    }

    #[test]
    fn the_line_gives_done_total_rate_and_time_left() {
        let t0 = Instant::now();
        let mut line = ProgressLine::new(TERMINAL_INTERVAL);
        assert_eq!(
            line.update(at(0), t0).as_deref(),
            Some("ingest: 0/4176 images")
        );
        // 1200 images in 84.5 s: 14.2/s, 2976 left at that rate = 209.6 s.
        let t1 = t0 + Duration::from_millis(84_500);
        assert_eq!(
            line.update(at(1200), t1).as_deref(),
            Some("ingest: 1200/4176 images, 14.2/s, about 3 min 30 s left")
        );
        let end = t0 + Duration::from_secs(294);
        assert_eq!(
            line.update(at(4176), end).as_deref(),
            Some("ingest: 4176/4176 images, 14.2/s, done in 4 min 50 s")
        );
    }

    #[test]
    fn lines_come_no_more_often_than_the_interval_but_the_last_always() {
        let t0 = Instant::now();
        let mut line = ProgressLine::new(LOG_INTERVAL);
        assert!(line.update(at(0), t0).is_some());
        let mut shown = 0;
        // A report every 0.5 s for 60 s: one line per 10 s.
        for step in 1..=120u64 {
            let now = t0 + Duration::from_millis(500 * step);
            if line.update(at(step as usize * 16), now).is_some() {
                shown += 1;
            }
        }
        assert_eq!(shown, 6);
        let now = t0 + Duration::from_millis(60_100);
        assert!(
            line.update(at(4176), now).is_some(),
            "the last row is shown"
        );
    }

    #[test]
    fn durations_read_as_an_estimate() {
        assert_eq!(duration(0.2), "1 s");
        assert_eq!(duration(40.4), "40 s");
        assert_eq!(duration(59.7), "1 min");
        assert_eq!(duration(209.6), "3 min 30 s");
        assert_eq!(duration(646.0), "10 min 50 s");
        assert_eq!(duration(3900.0), "1 h 5 min");
        assert_eq!(duration(7200.0), "2 h");
    }
}
