//! The screens. Every layout is computed from the target's size, so the
//! same code fits a 320x240 landscape panel and a 240x240 square one; text
//! is truncated or wrapped to its box, never drawn past it.

use embedded_graphics::mono_font::iso_8859_1::{
    FONT_10X20, FONT_6X10, FONT_7X13, FONT_7X13_BOLD, FONT_8X13, FONT_8X13_BOLD, FONT_9X15,
    FONT_9X15_BOLD,
};
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{
    Circle, CornerRadii, Line, PrimitiveStyle, Rectangle, RoundedRectangle, Triangle,
};
use embedded_graphics::text::{Baseline, Text};

use crate::palette::*;
use crate::text::{chars_that_fit, text_width, truncate, wrap};
use crate::view::{
    FleetSource, FleetView, MatchView, PredictionView, RejectionView, ResultsView, Screen,
    StatusView, SyncState, Thumbnail,
};

/// Height of the status bar at the top of every screen.
pub const STATUS_BAR_HEIGHT: u32 = 22;

/// The decision-support notice on the results screen. ASCII hyphen: the
/// panel fonts have no em dash.
pub const NOTICE: &str = "Not a diagnosis - decision support only";

/// Most similar cases the results screen lists.
pub const MAX_MATCHES_SHOWN: usize = 5;

/// Side margin, in pixels.
const MARGIN: i32 = 6;

/// Draws the status bar and `screen` over the whole of `target`.
///
/// Panels with another colour format take the same call through
/// `embedded_graphics::draw_target::DrawTargetExt::color_converted`.
pub fn render<D>(target: &mut D, status: &StatusView, screen: &Screen) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let area = target.bounding_box();
    target.fill_solid(&area, BACKGROUND)?;
    let (bar, body) = split_status_bar(area);
    draw_status_bar(target, bar, status)?;
    match screen {
        Screen::Ready { live, hint } => draw_ready(target, body, live.as_ref(), hint),
        Screen::Capturing {
            frames_taken,
            burst_len,
        } => draw_capturing(target, body, *frames_taken, *burst_len),
        Screen::Rejected { reason, what_to_do } => draw_rejected(target, body, *reason, what_to_do),
        Screen::Results(results) => draw_results(target, body, results),
        Screen::Updating {
            title,
            detail,
            done,
            total,
        } => draw_updating(target, body, title, detail, *done, *total),
        Screen::Error { title, what_to_fix } => draw_error(target, body, title, what_to_fix),
    }
}

// ---------------------------------------------------------------- helpers

/// The status bar and the body below it.
fn split_status_bar(area: Rectangle) -> (Rectangle, Rectangle) {
    let bar_height = STATUS_BAR_HEIGHT.min(area.size.height);
    let bar = Rectangle::new(area.top_left, Size::new(area.size.width, bar_height));
    let body = Rectangle::new(
        area.top_left + Point::new(0, bar_height as i32),
        Size::new(area.size.width, area.size.height - bar_height),
    );
    (bar, body)
}

fn fill<D>(target: &mut D, area: Rectangle, colour: Rgb888) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    if area.size.width == 0 || area.size.height == 0 {
        return Ok(());
    }
    area.into_styled(PrimitiveStyle::with_fill(colour))
        .draw(target)
}

/// Draws `text` with its top-left at `at`, cut with an ellipsis to
/// `max_width` pixels. Returns the width drawn.
fn label<D>(
    target: &mut D,
    text: &str,
    font: &MonoFont<'_>,
    colour: Rgb888,
    at: Point,
    max_width: u32,
) -> Result<u32, D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let fitted = truncate(text, chars_that_fit(font, max_width));
    if fitted.is_empty() {
        return Ok(0);
    }
    Text::with_baseline(&fitted, at, MonoTextStyle::new(font, colour), Baseline::Top)
        .draw(target)?;
    Ok(text_width(font, fitted.chars().count()))
}

/// Draws `text` centred horizontally in `span` (x and width) at `y`, cut to
/// the span's width.
fn label_centred<D>(
    target: &mut D,
    text: &str,
    font: &MonoFont<'_>,
    colour: Rgb888,
    span: Rectangle,
    y: i32,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let fitted = truncate(text, chars_that_fit(font, span.size.width));
    let width = text_width(font, fitted.chars().count());
    let x = span.top_left.x + (span.size.width.saturating_sub(width) / 2) as i32;
    label(target, &fitted, font, colour, Point::new(x, y), width).map(|_| ())
}

/// Draws `text` right-aligned so it ends at `right`. Returns its width.
fn label_right<D>(
    target: &mut D,
    text: &str,
    font: &MonoFont<'_>,
    colour: Rgb888,
    right: i32,
    y: i32,
    max_width: u32,
) -> Result<u32, D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let fitted = truncate(text, chars_that_fit(font, max_width));
    let width = text_width(font, fitted.chars().count());
    label(
        target,
        &fitted,
        font,
        colour,
        Point::new(right - width as i32, y),
        width,
    )
}

/// Wraps `text` into `span`'s width and draws the lines centred from `y`,
/// at most `max_lines`. Returns the y below the last line.
fn paragraph_centred<D>(
    target: &mut D,
    text: &str,
    font: &MonoFont<'_>,
    colour: Rgb888,
    span: Rectangle,
    y: i32,
    max_lines: usize,
) -> Result<i32, D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let line_height = font.character_size.height as i32 + 2;
    let mut y = y;
    for line in wrap(text, chars_that_fit(font, span.size.width), max_lines) {
        label_centred(target, &line, font, colour, span, y)?;
        y += line_height;
    }
    Ok(y)
}

/// The largest of `fonts` (largest first) in which `text` wraps into
/// `max_lines` lines of `width` pixels without being cut, else the last.
fn font_for<'a>(
    text: &str,
    fonts: &[&'a MonoFont<'a>],
    width: u32,
    max_lines: usize,
) -> &'a MonoFont<'a> {
    let words_fit = |font: &MonoFont<'_>| {
        let chars = chars_that_fit(font, width);
        let lines = wrap(text, chars, usize::MAX);
        lines.len() <= max_lines && text.split_whitespace().all(|w| w.chars().count() <= chars)
    };
    fonts
        .iter()
        .copied()
        .find(|f| words_fit(f))
        .unwrap_or(fonts[fonts.len() - 1])
}

/// Scales `thumbnail` to fit `frame` (keeping its aspect ratio, averaging
/// the source pixels under each screen pixel) and draws it centred.
/// Returns the area it covers.
fn draw_thumbnail<D>(
    target: &mut D,
    thumbnail: &Thumbnail,
    frame: Rectangle,
) -> Result<Rectangle, D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let (sw, sh) = (thumbnail.width() as u64, thumbnail.height() as u64);
    let (fw, fh) = (frame.size.width as u64, frame.size.height as u64);
    if fw == 0 || fh == 0 {
        return Ok(Rectangle::new(frame.top_left, Size::zero()));
    }
    // Fit: whichever side binds, computed in integers so it is exact.
    let (dw, dh) = if sw * fh >= sh * fw {
        (fw, (sh * fw / sw).clamp(1, fh))
    } else {
        ((sw * fh / sh).clamp(1, fw), fh)
    };
    let origin = frame.top_left + Point::new(((fw - dw) / 2) as i32, ((fh - dh) / 2) as i32);
    let rgb = thumbnail.rgb();
    let mut colours = Vec::with_capacity((dw * dh) as usize);
    for y in 0..dh {
        let sy0 = y * sh / dh;
        let sy1 = ((y + 1) * sh / dh).max(sy0 + 1);
        for x in 0..dw {
            let sx0 = x * sw / dw;
            let sx1 = ((x + 1) * sw / dw).max(sx0 + 1);
            let mut sum = [0u64; 3];
            for sy in sy0..sy1 {
                for sx in sx0..sx1 {
                    let i = ((sy * sw + sx) * 3) as usize;
                    sum[0] += u64::from(rgb[i]);
                    sum[1] += u64::from(rgb[i + 1]);
                    sum[2] += u64::from(rgb[i + 2]);
                }
            }
            let n = (sy1 - sy0) * (sx1 - sx0);
            colours.push(Rgb888::new(
                ((sum[0] + n / 2) / n) as u8,
                ((sum[1] + n / 2) / n) as u8,
                ((sum[2] + n / 2) / n) as u8,
            ));
        }
    }
    let drawn = Rectangle::new(origin, Size::new(dw as u32, dh as u32));
    target.fill_contiguous(&drawn, colours)?;
    Ok(drawn)
}

/// Counts shown in a few characters: 1234, 12k, 3M.
fn compact_count(n: u32) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{}k", n / 1_000),
        _ => format!("{}M", n / 1_000_000),
    }
}

/// A 0..=1 fraction as a whole percentage; NaN shows as "--".
fn percent(fraction: f32) -> String {
    if fraction.is_nan() {
        return "--%".to_owned();
    }
    format!("{}%", (fraction.clamp(0.0, 1.0) * 100.0).round() as u32)
}

/// A tick mark in a `size`-pixel box at `at`.
fn tick<D>(target: &mut D, at: Point, size: i32, colour: Rgb888) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let style = PrimitiveStyle::with_stroke(colour, 2);
    let knee = at + Point::new(size * 2 / 5, size - 2);
    Line::new(at + Point::new(1, size / 2), knee)
        .into_styled(style)
        .draw(target)?;
    Line::new(knee, at + Point::new(size - 1, 1))
        .into_styled(style)
        .draw(target)
}

// ------------------------------------------------------------- status bar

fn draw_status_bar<D>(target: &mut D, bar: Rectangle, status: &StatusView) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    fill(target, bar, SURFACE)?;
    let font = &FONT_8X13;
    let text_y = bar.top_left.y + (bar.size.height as i32 - font.character_size.height as i32) / 2;
    let left = bar.top_left.x + MARGIN;
    let right = bar.top_left.x + bar.size.width as i32 - MARGIN;
    let centre_y = bar.top_left.y + bar.size.height as i32 / 2;

    // Sync: an icon whose shape differs per state, and the state in words.
    let icon = Circle::with_center(Point::new(left + 5, centre_y), 10);
    let (word, colour) = match status.sync {
        SyncState::Online => {
            icon.into_styled(PrimitiveStyle::with_fill(BLUISH_GREEN))
                .draw(target)?;
            ("Online", TEXT)
        }
        SyncState::Offline => {
            icon.into_styled(PrimitiveStyle::with_stroke(ORANGE, 2))
                .draw(target)?;
            Line::new(
                Point::new(left + 1, centre_y + 4),
                Point::new(left + 9, centre_y - 4),
            )
            .into_styled(PrimitiveStyle::with_stroke(ORANGE, 2))
            .draw(target)?;
            ("Offline", TEXT)
        }
        SyncState::Syncing => {
            icon.into_styled(PrimitiveStyle::with_stroke(SKY_BLUE, 2))
                .draw(target)?;
            Circle::with_center(Point::new(left + 5, centre_y), 4)
                .into_styled(PrimitiveStyle::with_fill(SKY_BLUE))
                .draw(target)?;
            ("Syncing", TEXT)
        }
    };
    let mut x = left + 16;
    let room = (right - x).max(0) as u32;
    x += label(target, word, font, colour, Point::new(x, text_y), room)? as i32;

    let mut right_edge = right;
    if let Some(clock) = status.clock {
        let time = format!("{:02}:{:02}", clock.hours.min(23), clock.minutes.min(59));
        let width = text_width(&FONT_8X13_BOLD, 5) as i32;
        if right_edge - width >= x + 8 {
            label_right(
                target,
                &time,
                &FONT_8X13_BOLD,
                TEXT,
                right_edge,
                text_y,
                width as u32,
            )?;
            right_edge -= width + 10;
        }
    }

    // Optional counts, most useful first, each only if it fits whole.
    let mut items = Vec::new();
    if status.pending_uploads > 0 {
        items.push(format!(
            "{} to upload",
            compact_count(status.pending_uploads)
        ));
    }
    if let Some(minutes) = status.last_sync_minutes {
        items.push(sync_age(minutes));
    }
    items.push(format!("{} cases", compact_count(status.cases_in_library)));
    let count_font = &FONT_7X13;
    for item in items {
        let width = text_width(count_font, item.chars().count()) as i32;
        if x + 15 + width > right_edge {
            break;
        }
        // A thin divider keeps neighbouring numbers from reading as one.
        fill(
            target,
            Rectangle::new(Point::new(x + 7, text_y), Size::new(1, 13)),
            TRACK,
        )?;
        x += 15;
        label(
            target,
            &item,
            count_font,
            TEXT_DIM,
            Point::new(x, text_y),
            width as u32,
        )?;
        x += width;
    }
    Ok(())
}

/// "sync now", "sync 5m", "sync 3h", "sync 2d": short enough to fit beside
/// the counts on a 240 px panel.
fn sync_age(minutes: u32) -> String {
    match minutes {
        0 => "sync now".to_owned(),
        1..=59 => format!("sync {minutes}m"),
        60..=2879 => format!("sync {}h", minutes / 60),
        _ => format!("sync {}d", minutes / 1440),
    }
}

// ------------------------------------------------------------------ ready

fn draw_ready<D>(
    target: &mut D,
    body: Rectangle,
    live: Option<&Thumbnail>,
    hint: &str,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let inner_width = body.size.width.saturating_sub(2 * MARGIN as u32);
    let font = font_for(hint, &[&FONT_9X15, &FONT_8X13], inner_width, 2);
    let lines = wrap(hint, chars_that_fit(font, inner_width), 2)
        .len()
        .max(1) as u32;
    let hint_height = (lines * (font.character_size.height + 2) + 8).min(body.size.height);
    let preview = Rectangle::new(
        body.top_left + Point::new(MARGIN, 4),
        Size::new(
            inner_width,
            body.size.height.saturating_sub(hint_height + 4),
        ),
    );
    let shown = match live {
        Some(frame) => {
            let shown = draw_thumbnail(target, frame, preview)?;
            // Where the lesion belongs: the quality gate judges the centre.
            let diameter = preview.size.width.min(preview.size.height) * 11 / 20;
            Circle::with_center(preview.center(), diameter)
                .into_styled(PrimitiveStyle::with_stroke(SKY_BLUE, 2))
                .draw(target)?;
            shown
        }
        None => {
            preview
                .into_styled(PrimitiveStyle::with_stroke(TRACK, 1))
                .draw(target)?;
            let y = preview.center().y - FONT_9X15.character_size.height as i32 / 2;
            label_centred(
                target,
                "Camera starting...",
                &FONT_9X15,
                TEXT_DIM,
                preview,
                y,
            )?;
            preview
        }
    };
    // The state, as a tag over the preview's corner.
    let tag_font = &FONT_8X13_BOLD;
    let tag = Rectangle::new(
        shown.top_left + Point::new(4, 4),
        Size::new(
            text_width(tag_font, 5) + 10,
            tag_font.character_size.height + 6,
        ),
    );
    RoundedRectangle::new(tag, CornerRadii::new(Size::new(4, 4)))
        .into_styled(PrimitiveStyle::with_fill(SKY_BLUE))
        .draw(target)?;
    label(
        target,
        "READY",
        tag_font,
        INK,
        tag.top_left + Point::new(5, 3),
        tag.size.width,
    )?;

    let hint_top = body.top_left.y + body.size.height as i32 - hint_height as i32 + 4;
    paragraph_centred(target, hint, font, TEXT, body, hint_top, 2)?;
    Ok(())
}

// -------------------------------------------------------------- capturing

fn draw_capturing<D>(
    target: &mut D,
    body: Rectangle,
    frames_taken: u32,
    burst_len: u32,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let centre_x = body.center().x;
    let mut y = body.top_left.y + (body.size.height as i32 - 150).max(0) / 2;
    // A shutter: ring and dot.
    Circle::with_center(Point::new(centre_x, y + 26), 50)
        .into_styled(PrimitiveStyle::with_stroke(SKY_BLUE, 5))
        .draw(target)?;
    Circle::with_center(Point::new(centre_x, y + 26), 22)
        .into_styled(PrimitiveStyle::with_fill(SKY_BLUE))
        .draw(target)?;
    y += 64;
    label_centred(target, "Hold still", &FONT_10X20, TEXT, body, y)?;
    y += 26;
    let taken = frames_taken.min(burst_len);
    let progress = if burst_len == 0 {
        "Capturing".to_owned()
    } else {
        format!("Frame {taken} of {burst_len}")
    };
    label_centred(target, &progress, &FONT_9X15, TEXT_DIM, body, y)?;
    y += 26;

    let bar_width = body.size.width.saturating_sub(4 * MARGIN as u32).min(240);
    let bar = Rectangle::new(
        Point::new(centre_x - bar_width as i32 / 2, y),
        Size::new(bar_width, 14),
    );
    const MAX_SEGMENTS: u32 = 12;
    if (1..=MAX_SEGMENTS).contains(&burst_len) {
        let gap = 4;
        let segment = (bar_width.saturating_sub(gap * (burst_len - 1))) / burst_len;
        for i in 0..burst_len {
            let at = bar.top_left + Point::new((i * (segment + gap)) as i32, 0);
            let colour = if i < taken { SKY_BLUE } else { TRACK };
            fill(target, Rectangle::new(at, Size::new(segment, 14)), colour)?;
        }
    } else {
        fill(target, bar, TRACK)?;
        let done = if burst_len == 0 {
            0
        } else {
            (u64::from(bar_width) * u64::from(taken) / u64::from(burst_len)) as u32
        };
        fill(
            target,
            Rectangle::new(bar.top_left, Size::new(done, 14)),
            SKY_BLUE,
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------- updating

fn draw_updating<D>(
    target: &mut D,
    body: Rectangle,
    title: &str,
    detail: &str,
    done: u64,
    total: u64,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let centre = Point::new(body.center().x, body.top_left.y + 40);
    // A ring with a downward arrow: "arriving", unlike the shutter or the
    // problem icons.
    Circle::with_center(centre, 50)
        .into_styled(PrimitiveStyle::with_stroke(SKY_BLUE, 5))
        .draw(target)?;
    let arrow = PrimitiveStyle::with_stroke(SKY_BLUE, 5);
    Line::new(centre + Point::new(0, -12), centre + Point::new(0, 10))
        .into_styled(arrow)
        .draw(target)?;
    Line::new(centre + Point::new(-9, 2), centre + Point::new(0, 11))
        .into_styled(arrow)
        .draw(target)?;
    Line::new(centre + Point::new(9, 2), centre + Point::new(0, 11))
        .into_styled(arrow)
        .draw(target)?;
    let span = Rectangle::new(
        body.top_left + Point::new(MARGIN * 2, 0),
        Size::new(
            body.size.width.saturating_sub(4 * MARGIN as u32),
            body.size.height,
        ),
    );
    let mut y = centre.y + 36;
    let title_font = font_for(title, &[&FONT_10X20, &FONT_9X15_BOLD], span.size.width, 1);
    y = paragraph_centred(target, title, title_font, TEXT, span, y, 1)? + 4;
    y = paragraph_centred(target, detail, &FONT_9X15, TEXT_DIM, span, y, 2)? + 8;
    if let Some(filled) = (u64::from(span.size.width.min(240)) * done.min(total)).checked_div(total)
    {
        let bar_width = span.size.width.min(240);
        let bar = Rectangle::new(
            Point::new(body.center().x - bar_width as i32 / 2, y),
            Size::new(bar_width, 14),
        );
        fill(target, bar, TRACK)?;
        fill(
            target,
            Rectangle::new(bar.top_left, Size::new(filled as u32, 14)),
            SKY_BLUE,
        )?;
        let shown = format!("{}%", done.min(total) * 100 / total);
        label_centred(target, &shown, &FONT_8X13, TEXT_DIM, span, y + 18)?;
    }
    label_centred(
        target,
        "Do not switch off",
        &FONT_8X13,
        TEXT,
        span,
        body.top_left.y + body.size.height as i32 - 20,
    )?;
    Ok(())
}

// ------------------------------------------------------ rejected and error

/// The shared layout of the two "something is wrong" screens: an accent
/// strip, an icon, a headline, what to do, and an optional footer.
fn draw_problem<D, I>(
    target: &mut D,
    body: Rectangle,
    accent: Rgb888,
    icon: I,
    title: &str,
    advice: &str,
    footer: Option<&str>,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
    I: FnOnce(&mut D, Point) -> Result<(), D::Error>,
{
    fill(
        target,
        Rectangle::new(body.top_left, Size::new(body.size.width, 4)),
        accent,
    )?;
    let text_span = Rectangle::new(
        body.top_left + Point::new(MARGIN * 2, 0),
        Size::new(
            body.size.width.saturating_sub(4 * MARGIN as u32),
            body.size.height,
        ),
    );
    let mut y = body.top_left.y + 16;
    icon(target, Point::new(body.center().x, y + 22))?;
    y += 56;
    let title_font = font_for(
        title,
        &[&FONT_10X20, &FONT_9X15_BOLD],
        text_span.size.width,
        1,
    );
    y = paragraph_centred(target, title, title_font, TEXT, text_span, y, 2)? + 6;
    let footer_height = if footer.is_some() { 24 } else { 0 };
    let bottom = body.top_left.y + body.size.height as i32 - footer_height;
    let advice_font = &FONT_9X15;
    let line_height = advice_font.character_size.height as i32 + 2;
    let lines = ((bottom - y) / line_height).clamp(0, 4) as usize;
    paragraph_centred(target, advice, advice_font, TEXT, text_span, y, lines)?;
    if let Some(footer) = footer {
        let font = font_for(footer, &[&FONT_8X13, &FONT_7X13], text_span.size.width, 1);
        label_centred(target, footer, font, TEXT_DIM, text_span, bottom + 4)?;
    }
    Ok(())
}

fn draw_rejected<D>(
    target: &mut D,
    body: Rectangle,
    reason: RejectionView,
    what_to_do: &str,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    // A warning triangle: the shape, not only the orange, says "fixable".
    let icon = |t: &mut D, c: Point| {
        Triangle::new(
            c + Point::new(0, -22),
            c + Point::new(25, 21),
            c + Point::new(-25, 21),
        )
        .into_styled(PrimitiveStyle::with_fill(ORANGE))
        .draw(t)?;
        fill(
            t,
            Rectangle::new(c + Point::new(-2, -9), Size::new(5, 18)),
            INK,
        )?;
        fill(
            t,
            Rectangle::new(c + Point::new(-2, 12), Size::new(5, 5)),
            INK,
        )
    };
    draw_problem(
        target,
        body,
        ORANGE,
        icon,
        reason.title(),
        what_to_do,
        Some("Press the button to try again"),
    )
}

fn draw_error<D>(
    target: &mut D,
    body: Rectangle,
    title: &str,
    what_to_fix: &str,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    // A disc with a cross: a different shape from the warning triangle.
    let icon = |t: &mut D, c: Point| {
        Circle::with_center(c, 46)
            .into_styled(PrimitiveStyle::with_fill(VERMILLION))
            .draw(t)?;
        let style = PrimitiveStyle::with_stroke(TEXT, 5);
        Line::new(c + Point::new(-10, -10), c + Point::new(10, 10))
            .into_styled(style)
            .draw(t)?;
        Line::new(c + Point::new(-10, 10), c + Point::new(10, -10))
            .into_styled(style)
            .draw(t)
    };
    draw_problem(target, body, VERMILLION, icon, title, what_to_fix, None)
}

// ---------------------------------------------------------------- results

/// Fonts and sizes of one match row, chosen from the row height.
struct RowStyle {
    name: &'static MonoFont<'static>,
    detail: &'static MonoFont<'static>,
    similarity: &'static MonoFont<'static>,
}

/// The tag that opens the "flag for review" band.
pub const REVIEW_TAG: &str = "REVIEW";

/// The words after [`REVIEW_TAG`], longest first: the longest that fits the
/// panel whole is drawn, never one cut short.
pub const REVIEW_TEXTS: [&str; 4] = [
    "melanoma score over clinic threshold",
    "melanoma score over threshold",
    "melanoma over threshold",
    "melanoma score high",
];

/// The "no close match" band's words, longest first, chosen as
/// [`REVIEW_TEXTS`] are.
pub const NO_CLOSE_MATCH_TEXTS: [&str; 3] = [
    "No close match in the library",
    "No close match in library",
    "No close match",
];

const HEADER_HEIGHT: u32 = 58;
const CAUTION_BAND_HEIGHT: u32 = 18;
const CAUTION_FONT: &MonoFont<'static> = &FONT_7X13_BOLD;
const NOTICE_FONT: &MonoFont<'static> = &FONT_7X13_BOLD;

/// One caution band of the results screen: the review flag or "no close
/// match".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandLayout {
    /// The whole band.
    pub area: Rectangle,
    /// What marks the band besides its words: the review tag, the
    /// no-match strip.
    pub marker: Rectangle,
    /// The words drawn.
    pub text: &'static str,
    /// The pixels the words take.
    pub text_area: Rectangle,
    /// Even the shortest words did not fit (a panel narrower than any the
    /// device has) and are drawn cut.
    pub cut: bool,
}

/// Where each part of the results screen goes. [`render`] draws from
/// exactly this, so a test of the layout is a test of the screen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultsLayout {
    /// The capture, the suggestion and the count of matches.
    pub header: Rectangle,
    /// Under the header, above the matches.
    pub review: Option<BandLayout>,
    /// Under the review band; not drawn without matches, whose place then
    /// says it in a sentence.
    pub no_close_match: Option<BandLayout>,
    /// One row per match drawn, most similar first.
    pub rows: Vec<Rectangle>,
    /// The fleet service's answer, just above the notice.
    pub fleet: Option<Rectangle>,
    /// The "not a diagnosis" band, at the bottom.
    pub notice: Rectangle,
}

/// The results screen's layout on a `size` panel (status bar included).
pub fn results_layout(size: Size, results: &ResultsView) -> ResultsLayout {
    let (_, body) = split_status_bar(Rectangle::new(Point::zero(), size));
    layout_results(body, results)
}

fn notice_lines(inner_width: u32) -> Vec<String> {
    wrap(NOTICE, chars_that_fit(NOTICE_FONT, inner_width), 2)
}

/// The first of `texts` (longest first) that fits `room` pixels whole,
/// else the last, cut.
fn fitting(texts: &[&'static str], room: u32) -> (&'static str, bool) {
    match texts
        .iter()
        .find(|t| text_width(CAUTION_FONT, t.chars().count()) <= room)
    {
        Some(text) => (text, false),
        None => (texts[texts.len() - 1], true),
    }
}

fn caution_band(
    area: Rectangle,
    marker: Rectangle,
    text_x: i32,
    right: i32,
    texts: &[&'static str],
) -> BandLayout {
    let room = (right - text_x).max(0) as u32;
    let (text, cut) = fitting(texts, room);
    let width = text_width(CAUTION_FONT, text.chars().count()).min(room);
    let height = CAUTION_FONT.character_size.height;
    let y = area.top_left.y + (area.size.height.saturating_sub(height) / 2) as i32;
    BandLayout {
        area,
        marker,
        text,
        text_area: Rectangle::new(Point::new(text_x, y), Size::new(width, height)),
        cut,
    }
}

fn layout_results(body: Rectangle, results: &ResultsView) -> ResultsLayout {
    let width = body.size.width;
    let inner_width = width.saturating_sub(2 * MARGIN as u32);
    let left = body.top_left.x;
    let right = left + width as i32 - MARGIN;
    let top = body.top_left.y;

    // Notice first: it must always fit, so it takes its room before the list.
    let notice_height =
        notice_lines(inner_width).len() as u32 * (NOTICE_FONT.character_size.height + 1) + 5;
    let notice = Rectangle::new(
        Point::new(left, top + body.size.height as i32 - notice_height as i32),
        Size::new(width, notice_height),
    );
    // The fleet's answer sits just above the notice, so it reads as part of
    // the same decision support and never pushes the notice off the panel.
    let fleet = results.fleet.as_ref().map(|_| {
        Rectangle::new(
            Point::new(left, notice.top_left.y - FLEET_BAND_HEIGHT as i32),
            Size::new(width, FLEET_BAND_HEIGHT),
        )
    });
    let list_bottom = fleet.map_or(notice.top_left.y, |f| f.top_left.y);
    let header = Rectangle::new(body.top_left, Size::new(width, HEADER_HEIGHT));

    // The cautions come before the matches, so they are read first; each
    // takes a band only where one still fits above the list's bottom.
    let mut y = top + HEADER_HEIGHT as i32 + 2;
    let band_at = |y: &mut i32| {
        let area = Rectangle::new(Point::new(left, *y), Size::new(width, CAUTION_BAND_HEIGHT));
        (*y + CAUTION_BAND_HEIGHT as i32 <= list_bottom).then(|| {
            *y += CAUTION_BAND_HEIGHT as i32;
            area
        })
    };
    let review = if results.review {
        band_at(&mut y).map(|area| {
            let tag = Rectangle::new(
                Point::new(left + MARGIN, area.top_left.y + 2),
                Size::new(
                    text_width(CAUTION_FONT, REVIEW_TAG.len()) + 8,
                    CAUTION_BAND_HEIGHT - 4,
                ),
            );
            let text_x = tag.top_left.x + tag.size.width as i32 + 6;
            caution_band(area, tag, text_x, right, &REVIEW_TEXTS)
        })
    } else {
        None
    };
    let no_close_match = if results.no_close_match && !results.matches.is_empty() {
        band_at(&mut y).map(|area| {
            let strip = Rectangle::new(area.top_left, Size::new(3, CAUTION_BAND_HEIGHT));
            caution_band(area, strip, left + MARGIN, right, &NO_CLOSE_MATCH_TEXTS)
        })
    } else {
        None
    };

    let shown = results.matches.len().min(MAX_MATCHES_SHOWN);
    let room = (list_bottom - y).max(0) as u32;
    let row_height = (room / MAX_MATCHES_SHOWN as u32).clamp(20, 40);
    let rows_fit = (room / row_height) as usize;
    let rows = (0..shown.min(rows_fit))
        .map(|i| {
            Rectangle::new(
                Point::new(left, y + (i as u32 * row_height) as i32),
                Size::new(width, row_height),
            )
        })
        .collect();
    ResultsLayout {
        header,
        review,
        no_close_match,
        rows,
        fleet,
        notice,
    }
}

fn draw_results<D>(target: &mut D, body: Rectangle, results: &ResultsView) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let layout = layout_results(body, results);
    let width = body.size.width;
    let inner_width = width.saturating_sub(2 * MARGIN as u32);

    let notice = layout.notice;
    fill(target, notice, YELLOW)?;
    let mut y = notice.top_left.y + 3;
    for line in &notice_lines(inner_width) {
        label_centred(target, line, NOTICE_FONT, INK, notice, y)?;
        y += NOTICE_FONT.character_size.height as i32 + 1;
    }
    if let (Some(band), Some(fleet)) = (layout.fleet, &results.fleet) {
        draw_fleet(target, band, fleet)?;
    }

    // Header: the capture, the model's suggestion, how many cases follow.
    let query = Rectangle::new(body.top_left + Point::new(MARGIN, 4), Size::new(50, 50));
    draw_thumbnail(target, &results.query, query)?;
    let text_x = query.top_left.x + query.size.width as i32 + 8;
    let right = body.top_left.x + width as i32 - MARGIN;
    let text_width_px = (right - text_x).max(0) as u32;
    let top = body.top_left.y;
    draw_prediction(
        target,
        results.prediction.as_ref(),
        Point::new(text_x, top + 3),
        text_width_px,
    )?;
    // Far matches are counted as such, so the count never reads as a
    // promise of likeness.
    let count = match (results.matches.len(), results.no_close_match) {
        (0, _) => "No similar cases".to_owned(),
        (1, false) => "1 similar case".to_owned(),
        (n, false) => format!("{n} similar cases"),
        (1, true) => "1 distant case".to_owned(),
        (n, true) => format!("{n} distant cases"),
    };
    label(
        target,
        &count,
        &FONT_7X13,
        TEXT_DIM,
        Point::new(text_x, top + 41),
        text_width_px,
    )?;
    fill(
        target,
        Rectangle::new(
            Point::new(body.top_left.x, top + HEADER_HEIGHT as i32),
            Size::new(width, 1),
        ),
        TRACK,
    )?;

    if let Some(band) = &layout.review {
        fill(target, band.area, SURFACE)?;
        RoundedRectangle::new(band.marker, CornerRadii::new(Size::new(3, 3)))
            .into_styled(PrimitiveStyle::with_fill(REDDISH_PURPLE))
            .draw(target)?;
        let tag_y =
            band.marker.top_left.y + (band.marker.size.height.saturating_sub(13) / 2) as i32;
        label_centred(target, REVIEW_TAG, CAUTION_FONT, INK, band.marker, tag_y)?;
        draw_band_text(target, band)?;
    }
    if let Some(band) = &layout.no_close_match {
        fill(target, band.area, SURFACE)?;
        fill(target, band.marker, ORANGE)?;
        draw_band_text(target, band)?;
    }

    if results.matches.is_empty() {
        let y = top
            + HEADER_HEIGHT as i32
            + 2
            + layout
                .review
                .as_ref()
                .map_or(0, |b| b.area.size.height as i32)
            + 12;
        // Only the span's x and width place the sentence.
        let span = Rectangle::new(
            Point::new(body.top_left.x + MARGIN, y),
            Size::new(inner_width, 0),
        );
        paragraph_centred(
            target,
            "No confirmed case in the library is close to this capture.",
            &FONT_8X13,
            TEXT_DIM,
            span,
            y,
            3,
        )?;
        return Ok(());
    }
    let style = if layout.rows.first().is_some_and(|r| r.size.height >= 32) {
        RowStyle {
            name: &FONT_9X15,
            detail: &FONT_7X13,
            similarity: &FONT_9X15_BOLD,
        }
    } else {
        RowStyle {
            name: &FONT_8X13,
            detail: &FONT_6X10,
            similarity: &FONT_8X13_BOLD,
        }
    };
    for (row, case) in layout.rows.iter().zip(&results.matches) {
        draw_match_row(target, *row, case, &style, results.no_close_match)?;
    }
    Ok(())
}

fn draw_band_text<D>(target: &mut D, band: &BandLayout) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    label(
        target,
        band.text,
        CAUTION_FONT,
        TEXT,
        band.text_area.top_left,
        band.text_area.size.width,
    )
    .map(|_| ())
}

const FLEET_BAND_HEIGHT: u32 = 18;

/// "Fleet AI: Melanoma, Nevus" for the model's answer, "Fleet cases: ..."
/// for a vote of confirmed cases: who answered is always in words, and the
/// model's answer has its own colour and a marker.
fn draw_fleet<D>(target: &mut D, band: Rectangle, fleet: &FleetView) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    fill(target, band, SURFACE)?;
    let font = &FONT_7X13;
    let (prefix, colour) = match fleet.source {
        FleetSource::Model => ("Fleet AI: ", SKY_BLUE),
        FleetSource::Cases => ("Fleet cases: ", TEXT_DIM),
    };
    let text = if fleet.differential.is_empty() {
        format!("{prefix}no answer")
    } else {
        format!("{prefix}{}", fleet.differential.join(", "))
    };
    let y = band.top_left.y + (band.size.height as i32 - font.character_size.height as i32) / 2;
    let x = band.top_left.x + MARGIN;
    if fleet.source == FleetSource::Model {
        fill(
            target,
            Rectangle::new(
                Point::new(band.top_left.x, band.top_left.y),
                Size::new(3, band.size.height),
            ),
            SKY_BLUE,
        )?;
    }
    let room = band.size.width.saturating_sub(2 * MARGIN as u32);
    label(target, &text, font, colour, Point::new(x, y), room)?;
    Ok(())
}

fn draw_prediction<D>(
    target: &mut D,
    prediction: Option<&PredictionView>,
    at: Point,
    max_width: u32,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let Some(prediction) = prediction else {
        label(
            target,
            "No model suggestion",
            &FONT_7X13,
            TEXT_DIM,
            at,
            max_width,
        )?;
        return Ok(());
    };
    // The probability stays small beside the label: a large number next
    // to a diagnosis would read as a verdict.
    let heading = format!("Model suggestion ({})", percent(prediction.probability));
    label(target, &heading, &FONT_7X13, TEXT_DIM, at, max_width)?;
    let name_font = font_for(
        &prediction.diagnosis,
        &[&FONT_10X20, &FONT_9X15_BOLD, &FONT_8X13_BOLD],
        max_width,
        1,
    );
    let line_height = FONT_10X20.character_size.height;
    let name_y = at.y + 15 + (line_height - name_font.character_size.height) as i32 / 2;
    label(
        target,
        &prediction.diagnosis,
        name_font,
        TEXT,
        Point::new(at.x, name_y),
        max_width,
    )?;
    Ok(())
}

fn draw_match_row<D>(
    target: &mut D,
    row: Rectangle,
    case: &MatchView,
    style: &RowStyle,
    weak: bool,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let side = row.size.height.saturating_sub(4);
    let thumb = Rectangle::new(row.top_left + Point::new(MARGIN, 2), Size::new(side, side));
    draw_thumbnail(target, &case.thumbnail, thumb)?;

    let right = row.top_left.x + row.size.width as i32 - MARGIN;
    let similarity_width = text_width(style.similarity, 4);
    let text_x = thumb.top_left.x + side as i32 + 8;
    let name_room = (right - similarity_width as i32 - 8 - text_x).max(0) as u32;

    let name_y = row.top_left.y + 2;
    label(
        target,
        &case.diagnosis,
        style.name,
        TEXT,
        Point::new(text_x, name_y),
        name_room,
    )?;

    // Confirmation: a tick or an open ring, each with its word.
    let detail_y = name_y + style.name.character_size.height as i32 + 1;
    let icon_size = style.detail.character_size.height as i32 - 1;
    let (word, colour) = if case.confirmed {
        tick(
            target,
            Point::new(text_x, detail_y),
            icon_size,
            BLUISH_GREEN,
        )?;
        ("confirmed", TEXT)
    } else {
        Circle::new(Point::new(text_x + 1, detail_y + 1), (icon_size - 2) as u32)
            .into_styled(PrimitiveStyle::with_stroke(ORANGE, 2))
            .draw(target)?;
        ("not confirmed", TEXT_DIM)
    };
    let word_x = text_x + icon_size + 4;
    label(
        target,
        word,
        style.detail,
        colour,
        Point::new(word_x, detail_y),
        name_room.saturating_sub((icon_size + 4) as u32),
    )?;

    // Similarity: a number and a bar under it, both greyed when no match
    // is close, so a far match is never drawn as a strong one.
    let (number, bar_colour) = if weak {
        (TEXT_DIM, TEXT_DIM)
    } else {
        (TEXT, SKY_BLUE)
    };
    let similarity = case.similarity;
    label_right(
        target,
        &percent(similarity),
        style.similarity,
        number,
        right,
        name_y,
        similarity_width,
    )?;
    let bar = Rectangle::new(
        Point::new(right - similarity_width as i32, detail_y + 2),
        Size::new(similarity_width, 5),
    );
    fill(target, bar, TRACK)?;
    let fraction = if similarity.is_nan() {
        0.0
    } else {
        similarity.clamp(0.0, 1.0)
    };
    let done = (similarity_width as f32 * fraction).round() as u32;
    fill(
        target,
        Rectangle::new(bar.top_left, Size::new(done, 5)),
        bar_colour,
    )
}
