//! Photographs that are not dermoscopy, drawn here so that the "no close
//! match" rule can be measured on them without copying anyone's images: a
//! keyboard, text on paper, a flat colour and a photograph-like outdoor
//! scene, each in a few deterministic variants.

use image::{Rgb, RgbImage};

/// The kinds drawn, in the order [`non_dermoscopy_images`] returns them.
pub const KINDS: [&str; 4] = ["keyboard", "text on paper", "flat colour", "gradient scene"];

/// `variants` images of each of [`KINDS`], `width` x `height`, labelled
/// with their kind. The same arguments give the same pixels.
pub fn non_dermoscopy_images(
    width: u32,
    height: u32,
    variants: u32,
) -> Vec<(&'static str, RgbImage)> {
    let mut out = Vec::new();
    for kind in KINDS {
        for v in 0..variants {
            let mut rng = Rng(0x5eed_0000 + u64::from(v) * 7919 + kind.len() as u64);
            let image = match kind {
                "keyboard" => keyboard(width, height, &mut rng),
                "text on paper" => text_on_paper(width, height, &mut rng),
                "flat colour" => flat_colour(width, height, v),
                _ => gradient_scene(width, height, &mut rng),
            };
            out.push((kind, image));
        }
    }
    out
}

/// splitmix64: deterministic without a random-number crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `0..n` (`n` > 0).
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n.max(1))) as u32
    }
}

fn fill(image: &mut RgbImage, x0: u32, y0: u32, w: u32, h: u32, colour: [u8; 3]) {
    let (iw, ih) = image.dimensions();
    for y in y0.min(ih)..(y0 + h).min(ih) {
        for x in x0.min(iw)..(x0 + w).min(iw) {
            image.put_pixel(x, y, Rgb(colour));
        }
    }
}

/// Rows of light keys with a dark glyph on each, on a dark case.
fn keyboard(width: u32, height: u32, rng: &mut Rng) -> RgbImage {
    let case = 30 + rng.below(30) as u8;
    let mut image = RgbImage::from_pixel(width, height, Rgb([case, case, case + 5]));
    let key = (width / (13 + rng.below(4))).max(8);
    let gap = (key / 8).max(1);
    let mut y = gap * 3;
    let mut row = 0;
    while y + key < height {
        let mut x = gap * 3 + row * key / 4;
        while x + key < width {
            let shade = 200 + rng.below(40) as u8;
            fill(
                &mut image,
                x,
                y,
                key - gap,
                key - gap,
                [shade, shade, shade],
            );
            // A glyph: one or two dark strokes on the key's upper left.
            let s = (key / 3).max(2);
            fill(
                &mut image,
                x + key / 5,
                y + key / 5,
                s,
                (s / 4).max(1),
                [20, 20, 20],
            );
            if rng.below(2) == 0 {
                fill(
                    &mut image,
                    x + key / 5,
                    y + key / 5,
                    (s / 4).max(1),
                    s,
                    [20, 20, 20],
                );
            }
            x += key;
        }
        y += key;
        row += 1;
    }
    image
}

/// Off-white paper with lines of dark word-like strokes.
fn text_on_paper(width: u32, height: u32, rng: &mut Rng) -> RgbImage {
    let mut image = RgbImage::new(width, height);
    for (_, _, p) in image.enumerate_pixels_mut() {
        let n = rng.below(12) as u8;
        *p = Rgb([238 - n, 234 - n, 222 - n]);
    }
    let line = (height / 24).max(6);
    let mut y = line * 2;
    while y + line < height - line {
        let mut x = width / 12;
        while x < width - width / 12 {
            let word = line / 2 * (2 + rng.below(7));
            let end = (x + word).min(width - width / 12);
            let mut cx = x;
            // Letters: strokes of varying height, a gap between them.
            while cx + 2 < end {
                let h = line / 2 + rng.below(line / 2 + 1);
                fill(
                    &mut image,
                    cx,
                    y + line - h,
                    (line / 6).max(1),
                    h,
                    [35, 35, 45],
                );
                cx += (line / 3).max(2);
            }
            x = end + line / 2;
        }
        y += line * 3 / 2;
    }
    image
}

/// One colour all over: skin-like, grey and saturated variants.
fn flat_colour(width: u32, height: u32, variant: u32) -> RgbImage {
    const COLOURS: [[u8; 3]; 4] = [
        [205, 160, 140],
        [128, 128, 128],
        [40, 90, 200],
        [150, 60, 40],
    ];
    RgbImage::from_pixel(
        width,
        height,
        Rgb(COLOURS[variant as usize % COLOURS.len()]),
    )
}

/// Sky graded to the horizon, ground graded the other way, a sun and a
/// dark tree: the smooth gradients and few edges of an outdoor photograph.
fn gradient_scene(width: u32, height: u32, rng: &mut Rng) -> RgbImage {
    let horizon = height * (50 + rng.below(20)) / 100;
    let mut image = RgbImage::new(width, height);
    let sun = (
        width * (20 + rng.below(60)) / 100,
        horizon / 3,
        (height / 12).max(3),
    );
    for (x, y, p) in image.enumerate_pixels_mut() {
        let colour = if y < horizon {
            let t = y as f32 / horizon.max(1) as f32;
            [
                (70.0 + 120.0 * t) as u8,
                (120.0 + 90.0 * t) as u8,
                (220.0 + 25.0 * t) as u8,
            ]
        } else {
            let t = (y - horizon) as f32 / (height - horizon).max(1) as f32;
            [
                (90.0 - 40.0 * t) as u8,
                (140.0 - 60.0 * t) as u8,
                (50.0 - 20.0 * t) as u8,
            ]
        };
        let dx = x as i64 - i64::from(sun.0);
        let dy = y as i64 - i64::from(sun.1);
        *p = if dx * dx + dy * dy < i64::from(sun.2 * sun.2) {
            Rgb([255, 240, 190])
        } else {
            Rgb(colour)
        };
    }
    let trunk_x = width * (10 + rng.below(80)) / 100;
    let tree = (height / 4).max(4);
    fill(
        &mut image,
        trunk_x,
        horizon - tree / 2,
        (width / 60).max(2),
        tree,
        [60, 40, 25],
    );
    fill(
        &mut image,
        trunk_x.saturating_sub(tree / 3),
        horizon.saturating_sub(tree),
        tree * 2 / 3 + (width / 60).max(2),
        tree * 2 / 3,
        [30, 70, 30],
    );
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_drawn_deterministically_and_differently() {
        let a = non_dermoscopy_images(96, 72, 2);
        let b = non_dermoscopy_images(96, 72, 2);
        assert_eq!(a.len(), 8);
        let kinds: Vec<&str> = a.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds[0], "keyboard");
        assert_eq!(kinds[7], "gradient scene");
        for ((_, x), (_, y)) in a.iter().zip(&b) {
            assert_eq!(x.as_raw(), y.as_raw());
            assert_eq!(x.dimensions(), (96, 72));
        }
        // No two images are the same picture.
        for i in 0..a.len() {
            for j in i + 1..a.len() {
                assert_ne!(a[i].1.as_raw(), a[j].1.as_raw(), "{i} and {j}");
            }
        }
        // A flat colour is flat; a keyboard and text are not.
        let distinct = |img: &RgbImage| {
            let mut px: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
            px.sort_unstable();
            px.dedup();
            px.len()
        };
        assert_eq!(distinct(&a[4].1), 1);
        assert!(distinct(&a[0].1) >= 3 && distinct(&a[2].1) > 10);
    }
}
