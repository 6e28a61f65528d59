//! Colours. Accents are from the Okabe-Ito palette, which stays distinct
//! under the common colour-vision deficiencies; every state they mark is
//! also spelled out in text or shown by an icon's shape, never colour alone.
//! A dark background keeps a small panel readable and glare-free.

use embedded_graphics::pixelcolor::Rgb888;

/// Screen background.
pub const BACKGROUND: Rgb888 = Rgb888::new(0x12, 0x16, 0x1C);
/// Status bar and card background.
pub const SURFACE: Rgb888 = Rgb888::new(0x26, 0x2C, 0x35);
/// Empty parts of bars and frames.
pub const TRACK: Rgb888 = Rgb888::new(0x45, 0x4D, 0x58);
/// Main text.
pub const TEXT: Rgb888 = Rgb888::new(0xF4, 0xF5, 0xF7);
/// Secondary text (labels, counts).
pub const TEXT_DIM: Rgb888 = Rgb888::new(0xB4, 0xBC, 0xC6);
/// Text on a light accent.
pub const INK: Rgb888 = Rgb888::new(0x00, 0x00, 0x00);

/// Okabe-Ito orange: warnings the user can fix (refused capture, offline).
pub const ORANGE: Rgb888 = Rgb888::new(0xE6, 0x9F, 0x00);
/// Okabe-Ito sky blue: live, in progress.
pub const SKY_BLUE: Rgb888 = Rgb888::new(0x56, 0xB4, 0xE9);
/// Okabe-Ito bluish green: confirmed, online.
pub const BLUISH_GREEN: Rgb888 = Rgb888::new(0x00, 0x9E, 0x73);
/// Okabe-Ito yellow: the decision-support notice.
pub const YELLOW: Rgb888 = Rgb888::new(0xF0, 0xE4, 0x42);
/// Okabe-Ito reddish purple: a capture flagged for clinical review (a
/// clinical caution, unlike the orange of a fixable problem or the
/// vermillion of a failure).
pub const REDDISH_PURPLE: Rgb888 = Rgb888::new(0xCC, 0x79, 0xA7);
/// Okabe-Ito vermillion: errors.
pub const VERMILLION: Rgb888 = Rgb888::new(0xD5, 0x5E, 0x00);
