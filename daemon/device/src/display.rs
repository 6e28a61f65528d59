//! The screen seen by the pipeline: a [`Display`] takes finished RGB
//! screens (the daemon renders them itself) and shows them.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// Something that shows RGB888 screens: the framebuffer or an SPI panel on
/// the device, PNG files or memory on a PC.
pub trait Display: Send {
    /// The native size in pixels (width, height); render at this size to
    /// avoid scaling.
    fn size(&self) -> (u32, u32);

    /// Shows one screen: RGB888, row-major, `width * height * 3` bytes. A
    /// screen of another size than [`Display::size`] is scaled to fit,
    /// keeping its aspect ratio, centred on black.
    fn present(&mut self, width: u32, height: u32, rgb: &[u8]) -> Result<(), DisplayError>;
}

/// Why a screen could not be shown.
///
/// Only `Io` can be worth retrying (a transient write failure). `NotFound`,
/// `Unavailable` and `UnsupportedFormat` need the setup changed; `BadScreen`
/// is a bug in the caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DisplayError {
    /// The display device does not exist.
    #[error("display {} not found: {fix}", device.display())]
    NotFound {
        /// Device path as configured.
        device: PathBuf,
        /// What to do about it.
        fix: String,
    },
    /// The display's bus or pins cannot be used on this machine.
    #[error("display unavailable: {reason}")]
    Unavailable {
        /// What is missing and how to fix it.
        reason: String,
    },
    /// The display uses a pixel layout this crate does not write.
    #[error("display {} has an unsupported pixel format: {reason}", device.display())]
    UnsupportedFormat {
        /// Device path as configured.
        device: PathBuf,
        /// What the layout is.
        reason: String,
    },
    /// The screen handed over does not match its stated size.
    #[error("a {width}x{height} screen needs {expected} RGB bytes, got {actual}")]
    BadScreen {
        /// Stated width.
        width: u32,
        /// Stated height.
        height: u32,
        /// `width * height * 3`.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// Writing the screen out failed.
    #[error("display {what}: {source}")]
    Io {
        /// What was being written, with its path.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl DisplayError {
    /// True when presenting the next screen may succeed without anyone
    /// changing the setup.
    pub fn is_retryable(&self) -> bool {
        matches!(self, DisplayError::Io { .. })
    }
}

/// What every [`Display::present`] does first, so all displays (here and
/// in `dermascope-device-linux`) treat a screen alike: refuses a buffer
/// that does not hold a `width` x `height` screen
/// ([`DisplayError::BadScreen`]), then fits it to `target` as
/// [`Display::present`] describes.
pub fn fit_screen_to(
    width: u32,
    height: u32,
    rgb: &[u8],
    target: (u32, u32),
) -> Result<Vec<u8>, DisplayError> {
    check_screen(width, height, rgb)?;
    Ok(fit_screen(width, height, rgb, target))
}

/// Checks that `rgb` holds a `width` x `height` screen.
pub(crate) fn check_screen(width: u32, height: u32, rgb: &[u8]) -> Result<(), DisplayError> {
    let expected = width as usize * height as usize * 3;
    if width == 0 || height == 0 || rgb.len() != expected {
        return Err(DisplayError::BadScreen {
            width,
            height,
            expected,
            actual: rgb.len(),
        });
    }
    Ok(())
}

/// Scales a checked RGB screen into `target` (width, height) by nearest
/// neighbour, keeping the aspect ratio, centred on black. Screens are drawn
/// at the display's size, so this only runs on a misconfiguration and
/// favours simplicity over filtering.
pub(crate) fn fit_screen(width: u32, height: u32, rgb: &[u8], target: (u32, u32)) -> Vec<u8> {
    let (target_w, target_h) = target;
    if (width, height) == target {
        return rgb.to_vec();
    }
    if target_w == 0 || target_h == 0 {
        return Vec::new();
    }
    let (sw, sh, tw, th) = (
        u64::from(width),
        u64::from(height),
        u64::from(target_w),
        u64::from(target_h),
    );
    let (out_w, out_h) = if sw * th > tw * sh {
        (tw, (sh * tw / sw).max(1))
    } else {
        ((sw * th / sh).max(1), th)
    };
    let (x0, y0) = ((tw - out_w) / 2, (th - out_h) / 2);
    let mut fitted = vec![0u8; (tw * th * 3) as usize];
    for y in 0..out_h {
        let sy = y * sh / out_h;
        for x in 0..out_w {
            let sx = x * sw / out_w;
            let from = ((sy * sw + sx) * 3) as usize;
            let to = (((y0 + y) * tw + x0 + x) * 3) as usize;
            fitted[to..to + 3].copy_from_slice(&rgb[from..from + 3]);
        }
    }
    fitted
}

/// A screen as presented.
#[derive(Clone, PartialEq, Eq)]
pub struct Screen {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// RGB888, row-major.
    pub rgb: Vec<u8>,
}

impl std::fmt::Debug for Screen {
    // Screens show lesion photographs: keep pixels out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Screen")
            .field("width", &self.width)
            .field("height", &self.height)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Presented {
    count: u64,
    last: Option<Screen>,
}

/// A display that keeps the last screen in memory, for tests and
/// benchmarks. Hand it to the pipeline as a `Box<dyn Display>` and keep a
/// [`PresentedScreens`] handle to look at what it showed.
#[derive(Debug)]
pub struct InMemoryDisplay {
    size: (u32, u32),
    presented: Arc<Mutex<Presented>>,
}

impl InMemoryDisplay {
    /// A `width` x `height` display that has shown nothing yet.
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            size: (width, height),
            presented: Arc::default(),
        }
    }

    /// A handle that keeps seeing what this display shows, even after the
    /// display was moved into the pipeline.
    pub fn presented(&self) -> PresentedScreens {
        PresentedScreens(Arc::clone(&self.presented))
    }
}

impl Display for InMemoryDisplay {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn present(&mut self, width: u32, height: u32, rgb: &[u8]) -> Result<(), DisplayError> {
        check_screen(width, height, rgb)?;
        let screen = Screen {
            width: self.size.0,
            height: self.size.1,
            rgb: fit_screen(width, height, rgb, self.size),
        };
        let mut presented = lock(&self.presented);
        presented.count += 1;
        presented.last = Some(screen);
        Ok(())
    }
}

/// Read access to what an [`InMemoryDisplay`] showed.
#[derive(Debug, Clone)]
pub struct PresentedScreens(Arc<Mutex<Presented>>);

impl PresentedScreens {
    /// How many screens were presented.
    pub fn count(&self) -> u64 {
        lock(&self.0).count
    }

    /// The last screen presented, at the display's size.
    pub fn last(&self) -> Option<Screen> {
        lock(&self.0).last.clone()
    }
}

fn lock(presented: &Mutex<Presented>) -> MutexGuard<'_, Presented> {
    // The data is a plain value, consistent even if a holder panicked.
    presented
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_letterboxes_a_wide_screen() {
        // 4x2 red into 4x4: scaled 1:1, one black row band above and below.
        let red = [255u8, 0, 0].repeat(8);
        let fitted = fit_screen(4, 2, &red, (4, 4));
        let row = |y: usize| &fitted[y * 12..(y + 1) * 12];
        assert_eq!(row(0), &[0u8; 12]);
        assert_eq!(row(1), &red[..12]);
        assert_eq!(row(2), &red[..12]);
        assert_eq!(row(3), &[0u8; 12]);
    }

    #[test]
    fn fit_scales_up_keeping_pixels() {
        // 2x1 (red, blue) into 4x2: each source pixel becomes a 2x2 block.
        let rgb = [255u8, 0, 0, 0, 0, 255];
        let fitted = fit_screen(2, 1, &rgb, (4, 2));
        let red_blue_row = [255u8, 0, 0, 255, 0, 0, 0, 0, 255, 0, 0, 255];
        assert_eq!(&fitted[..12], &red_blue_row);
        assert_eq!(&fitted[12..], &red_blue_row);
    }

    #[test]
    fn bad_screen_is_refused() {
        assert!(matches!(
            check_screen(2, 2, &[0; 11]),
            Err(DisplayError::BadScreen {
                expected: 12,
                actual: 11,
                ..
            })
        ));
        assert!(check_screen(0, 2, &[]).is_err());
        assert!(check_screen(2, 2, &[0; 12]).is_ok());
    }
}
