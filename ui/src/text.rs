//! Fitting text into boxes with the mono fonts: truncation with an ellipsis
//! and word wrapping, measured in characters so nothing overflows.

use embedded_graphics::mono_font::MonoFont;

/// What replaces the cut end of a truncated line (ASCII: the fonts have no
/// single-character ellipsis).
const ELLIPSIS: &str = "...";

/// Width in pixels of `chars` characters set in `font`.
pub(crate) fn text_width(font: &MonoFont<'_>, chars: usize) -> u32 {
    if chars == 0 {
        return 0;
    }
    let chars = chars as u32;
    chars * font.character_size.width + (chars - 1) * font.character_spacing
}

/// How many characters of `font` fit in `width` pixels.
pub(crate) fn chars_that_fit(font: &MonoFont<'_>, width: u32) -> usize {
    let advance = font.character_size.width + font.character_spacing;
    if advance == 0 {
        return 0;
    }
    ((width + font.character_spacing) / advance) as usize
}

/// `text` cut to at most `max_chars` characters, ending in an ellipsis when
/// cut.
pub(crate) fn truncate(text: &str, max_chars: usize) -> String {
    let count = text.chars().count();
    if count <= max_chars {
        return text.to_owned();
    }
    if max_chars <= ELLIPSIS.len() {
        return text.chars().take(max_chars).collect();
    }
    let mut cut: String = text.chars().take(max_chars - ELLIPSIS.len()).collect();
    cut.truncate(cut.trim_end().len());
    cut.push_str(ELLIPSIS);
    cut
}

/// `line` ended in an ellipsis within `max_chars`, cutting it if needed.
fn with_ellipsis(line: &str, max_chars: usize) -> String {
    let keep = max_chars.saturating_sub(ELLIPSIS.len());
    let mut cut: String = line.chars().take(keep).collect();
    cut.truncate(cut.trim_end().len());
    cut.push_str(ELLIPSIS);
    cut.chars().take(max_chars).collect()
}

/// `text` broken at spaces into at most `max_lines` lines of at most
/// `max_chars` characters; words longer than a line are split, and the last
/// line ends in an ellipsis when text is left over.
pub(crate) fn wrap(text: &str, max_chars: usize, max_lines: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    if max_chars == 0 || max_lines == 0 {
        return lines;
    }
    let mut current = String::new();
    let mut current_len = 0usize;
    let mut overflow = false;
    'words: for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let needed = if current_len == 0 {
                word.len()
            } else {
                current_len + 1 + word.len()
            };
            if needed <= max_chars {
                if current_len > 0 {
                    current.push(' ');
                    current_len += 1;
                }
                current.extend(word.iter());
                current_len += word.len();
                continue 'words;
            }
            if current_len > 0 {
                // Start the word on a fresh line.
                if lines.len() + 1 == max_lines {
                    overflow = true;
                    break 'words;
                }
                lines.push(std::mem::take(&mut current));
                current_len = 0;
                continue;
            }
            // A word longer than a whole line: split it.
            let rest = word.split_off(max_chars);
            current.extend(word.iter());
            if lines.len() + 1 == max_lines {
                overflow = true;
                break 'words;
            }
            lines.push(std::mem::take(&mut current));
            word = rest;
        }
    }
    if overflow {
        lines.push(with_ellipsis(&current, max_chars));
    } else if current_len > 0 {
        lines.push(current);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_graphics::mono_font::iso_8859_1::{FONT_10X20, FONT_6X10};

    #[test]
    fn widths_and_fits_agree() {
        assert_eq!(text_width(&FONT_10X20, 3), 30);
        assert_eq!(chars_that_fit(&FONT_10X20, 30), 3);
        assert_eq!(chars_that_fit(&FONT_10X20, 29), 2);
        assert_eq!(chars_that_fit(&FONT_6X10, 240), 40);
    }

    #[test]
    fn truncates_with_ellipsis_only_when_needed() {
        assert_eq!(truncate("Melanoma", 8), "Melanoma");
        assert_eq!(truncate("Melanocytic nevus", 12), "Melanocyt...");
        assert_eq!(truncate("Basal cell carcinoma", 14), "Basal cell...");
        assert_eq!(truncate("Melanoma", 2), "Me");
        assert_eq!(truncate("Mélanome étendu", 9), "Mélano...");
    }

    #[test]
    fn wraps_at_spaces_within_limits() {
        let lines = wrap("Hold the scope flat on the skin and keep still.", 16, 4);
        assert_eq!(
            lines,
            ["Hold the scope", "flat on the skin", "and keep still."]
        );
        for line in &lines {
            assert!(line.chars().count() <= 16);
        }
    }

    #[test]
    fn wrap_marks_cut_text_and_splits_long_words() {
        let lines = wrap("one two three four five six", 9, 2);
        assert_eq!(lines.len(), 2);
        assert!(lines[1].ends_with("..."), "{lines:?}");
        assert!(lines.iter().all(|l| l.chars().count() <= 9), "{lines:?}");
        let lines = wrap("Pseudoxanthomaelasticum", 10, 3);
        assert_eq!(lines, ["Pseudoxant", "homaelasti", "cum"]);
        assert!(wrap("anything", 0, 3).is_empty());
        assert!(wrap("", 10, 3).is_empty());
    }
}
