//! An in-memory RGB888 frame buffer the screens draw into, for panel
//! drivers that take a whole frame, for screenshots and for golden tests.

use std::convert::Infallible;

use embedded_graphics::pixelcolor::{Rgb888, RgbColor};
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Pixel, Size};

/// Largest canvas side accepted, far above any handheld panel; it bounds
/// the allocation a bad configuration value could ask for.
pub const MAX_CANVAS_SIDE: u32 = 4096;

/// Why a canvas could not be made or encoded.
#[derive(Debug, thiserror::Error)]
pub enum CanvasError {
    /// A side is zero or above [`MAX_CANVAS_SIDE`].
    #[error("canvas of {width}x{height} is outside 1..={max} per side")]
    BadSize {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
        /// [`MAX_CANVAS_SIDE`].
        max: u32,
    },
    /// PNG encoding failed.
    #[error("encoding the canvas as PNG: {0}")]
    Png(#[from] image::ImageError),
}

/// A `width x height` RGB888 frame buffer, row-major, 3 bytes a pixel.
/// Pixels drawn outside it are dropped, as on a real panel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Canvas {
    /// A black canvas.
    pub fn new(width: u32, height: u32) -> Result<Self, CanvasError> {
        if width == 0 || height == 0 || width > MAX_CANVAS_SIDE || height > MAX_CANVAS_SIDE {
            return Err(CanvasError::BadSize {
                width,
                height,
                max: MAX_CANVAS_SIDE,
            });
        }
        Ok(Self {
            width,
            height,
            pixels: vec![0; width as usize * height as usize * 3],
        })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The frame: row-major RGB888, `width * height * 3` bytes.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// The colour at `(x, y)`, or `None` outside the canvas.
    pub fn pixel(&self, x: u32, y: u32) -> Option<Rgb888> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        Some(Rgb888::new(
            self.pixels[i],
            self.pixels[i + 1],
            self.pixels[i + 2],
        ))
    }

    /// The frame as a PNG file.
    pub fn to_png(&self) -> Result<Vec<u8>, CanvasError> {
        let mut png = Vec::new();
        image::write_buffer_with_format(
            &mut std::io::Cursor::new(&mut png),
            &self.pixels,
            self.width,
            self.height,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )?;
        Ok(png)
    }
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.width, self.height)
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        let (w, h) = (self.width as i32, self.height as i32);
        for Pixel(p, colour) in pixels {
            if p.x >= 0 && p.y >= 0 && p.x < w && p.y < h {
                let i = (p.y as usize * self.width as usize + p.x as usize) * 3;
                self.pixels[i] = colour.r();
                self.pixels[i + 1] = colour.g();
                self.pixels[i + 2] = colour.b();
            }
        }
        Ok(())
    }

    fn clear(&mut self, colour: Self::Color) -> Result<(), Self::Error> {
        for px in self.pixels.chunks_exact_mut(3) {
            px.copy_from_slice(&[colour.r(), colour.g(), colour.b()]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_graphics::prelude::Point;

    #[test]
    fn drops_pixels_outside_and_keeps_inside() {
        let mut canvas = Canvas::new(4, 3).unwrap();
        let red = Rgb888::new(255, 0, 0);
        canvas
            .draw_iter([
                Pixel(Point::new(3, 2), red),
                Pixel(Point::new(4, 0), red),
                Pixel(Point::new(-1, 1), red),
                Pixel(Point::new(0, 3), red),
            ])
            .unwrap();
        assert_eq!(canvas.pixel(3, 2), Some(red));
        assert_eq!(canvas.pixels().iter().filter(|&&b| b == 255).count(), 1);
        assert_eq!(canvas.pixel(4, 0), None);
    }

    #[test]
    fn refuses_empty_and_huge_sizes() {
        assert!(Canvas::new(0, 10).is_err());
        assert!(Canvas::new(10, MAX_CANVAS_SIDE + 1).is_err());
    }

    #[test]
    fn png_round_trips() {
        let mut canvas = Canvas::new(5, 2).unwrap();
        canvas.clear(Rgb888::new(1, 2, 3)).unwrap();
        let png = canvas.to_png().unwrap();
        let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (5, 2));
        assert_eq!(decoded.as_raw(), canvas.pixels());
    }
}
