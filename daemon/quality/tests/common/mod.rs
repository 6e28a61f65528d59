//! Deterministic synthetic frames: a lesion-like blob on skin, and the ways a
//! capture goes wrong. No real patient image is ever generated or stored.

#![allow(dead_code)]

pub const WIDTH: u32 = 640;
pub const HEIGHT: u32 = 480;

/// Light skin tone, and a mid-brown lesion darker and more saturated.
pub const SKIN: [f32; 3] = [214.0, 170.0, 146.0];
pub const LESION: [f32; 3] = [120.0, 74.0, 52.0];

/// Small deterministic noise (a hash of the position) so no frame is
/// unnaturally flat; amplitude in 8-bit levels, centred on zero.
fn noise(x: u32, y: u32, amplitude: f32) -> f32 {
    let mut h = x.wrapping_mul(0x9E37_79B1) ^ y.wrapping_mul(0x85EB_CA77);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    ((h & 0xFF) as f32 / 255.0 - 0.5) * 2.0 * amplitude
}

fn push_pixel(rgb: &mut Vec<u8>, colour: [f32; 3], n: f32) {
    for c in colour {
        rgb.push((c + n).round().clamp(0.0, 255.0) as u8);
    }
}

/// An irregular sharp-edged dark blob with a reticular pigment pattern,
/// centred on skin: what the gate should accept.
pub fn lesion_on_skin() -> Vec<u8> {
    let mut rgb = Vec::with_capacity((WIDTH * HEIGHT * 3) as usize);
    let (cx, cy) = (WIDTH as f32 / 2.0, HEIGHT as f32 / 2.0);
    for y in 0..HEIGHT {
        for x in 0..WIDTH {
            let (dx, dy) = (x as f32 - cx, y as f32 - cy);
            let angle = dy.atan2(dx);
            // A lobed outline, like a real lesion's border.
            let radius = 90.0 + 14.0 * (3.0 * angle).sin() + 8.0 * (5.0 * angle + 1.0).cos();
            let inside = (dx * dx + dy * dy).sqrt() < radius;
            let colour = if inside {
                // Pigment network: a darker lattice every 12 pixels.
                let lattice = (x % 12 < 3) || (y % 12 < 3);
                let k = if lattice { 0.7 } else { 1.0 };
                [LESION[0] * k, LESION[1] * k, LESION[2] * k]
            } else {
                SKIN
            };
            push_pixel(&mut rgb, colour, noise(x, y, 2.0));
        }
    }
    rgb
}

/// Plain skin with gentle illumination fall-off towards the corners (as
/// under a dermatoscope's ring light) and sensor-like noise, but no lesion.
pub fn plain_skin() -> Vec<u8> {
    let mut rgb = Vec::with_capacity((WIDTH * HEIGHT * 3) as usize);
    let (cx, cy) = (WIDTH as f32 / 2.0, HEIGHT as f32 / 2.0);
    let max_r2 = cx * cx + cy * cy;
    for y in 0..HEIGHT {
        for x in 0..WIDTH {
            let (dx, dy) = (x as f32 - cx, y as f32 - cy);
            let falloff = 1.0 - 0.06 * (dx * dx + dy * dy) / max_r2;
            let colour = [SKIN[0] * falloff, SKIN[1] * falloff, SKIN[2] * falloff];
            push_pixel(&mut rgb, colour, noise(x, y, 2.0));
        }
    }
    rgb
}

/// A uniform colour with noise (over- and under-exposed frames).
pub fn uniform(colour: [f32; 3]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity((WIDTH * HEIGHT * 3) as usize);
    for y in 0..HEIGHT {
        for x in 0..WIDTH {
            push_pixel(&mut rgb, colour, noise(x, y, 2.0));
        }
    }
    rgb
}

/// The lesion frame scaled in brightness by `gain` (clipping at 255), like a
/// wrong exposure time.
pub fn exposed(rgb: &[u8], gain: f32) -> Vec<u8> {
    rgb.iter()
        .map(|&v| (v as f32 * gain).round().clamp(0.0, 255.0) as u8)
        .collect()
}

/// Gaussian blur of a `WIDTH x HEIGHT` frame (defocus).
pub fn blurred(rgb: &[u8], sigma: f32) -> Vec<u8> {
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, rgb.to_vec()).expect("frame size");
    image::imageops::blur(&img, sigma).into_raw()
}
