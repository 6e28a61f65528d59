//! Host display: every presented screen becomes a PNG file, so a PC run
//! can be watched (open `latest.png`) and reviewed afterwards.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{ImageFormat, RgbImage};

use crate::display::{check_screen, fit_screen, Display, DisplayError};

/// Writes the `n`-th presented screen (from 1) to `<dir>/screen-<n>.png`
/// and also to `<dir>/latest.png`.
///
/// Both are written to a temporary file in `dir` and renamed into place, so
/// a viewer polling `latest.png` never reads half a file. Numbering starts
/// again at 1 for every new display, overwriting an earlier run's files.
#[derive(Debug)]
pub struct PngSnapshotDisplay {
    dir: PathBuf,
    size: (u32, u32),
    presented: u64,
}

impl PngSnapshotDisplay {
    /// A `width` x `height` display writing into `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>, width: u32, height: u32) -> Result<Self, DisplayError> {
        let dir = dir.into();
        // Screens show case thumbnails: the folder is the daemon user's alone.
        dermascope_durable::create_private_dir_all(&dir).map_err(|source| DisplayError::Io {
            what: format!("creating snapshot folder {}", dir.display()),
            source,
        })?;
        Ok(Self {
            dir,
            size: (width, height),
            presented: 0,
        })
    }

    /// The folder the screens go to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_atomically(&self, name: &str, png: &[u8]) -> Result<(), DisplayError> {
        let path = self.dir.join(name);
        let io_error = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| DisplayError::Io { what, source }
        };
        // Atomic, not durable: a viewer never reads half a screen, and a
        // screen lost to a power cut is worth no fsync per frame.
        dermascope_durable::replace(&path, png).map_err(io_error("writing"))
    }
}

impl Display for PngSnapshotDisplay {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn present(&mut self, width: u32, height: u32, rgb: &[u8]) -> Result<(), DisplayError> {
        check_screen(width, height, rgb)?;
        let (target_w, target_h) = self.size;
        let fitted = fit_screen(width, height, rgb, self.size);
        let Some(image) = RgbImage::from_raw(target_w, target_h, fitted) else {
            return Err(DisplayError::BadScreen {
                width: target_w,
                height: target_h,
                expected: target_w as usize * target_h as usize * 3,
                actual: 0,
            });
        };
        let mut png = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .map_err(|e| DisplayError::Io {
                what: "encoding a PNG screen".into(),
                source: std::io::Error::other(e),
            })?;
        let number = self.presented + 1;
        self.write_atomically(&format!("screen-{number}.png"), &png)?;
        self.write_atomically("latest.png", &png)?;
        self.presented = number;
        Ok(())
    }
}
