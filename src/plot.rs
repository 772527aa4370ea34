//! Training-curve plots (the paper's Figure 3: loss terms against optimizer step) as a PNG.
//!
//! Drawing uses `plotters`' bitmap backend into an RGB buffer with an embedded font (Cantarell
//! Regular, SIL OFL 1.1, `assets/fonts/`) rendered by `ab_glyph`, so no system font or fontconfig
//! is needed. Text is rasterised here (`Canvas`) rather than by plotters, whose `ab_glyph` text
//! drawing drops each glyph's left side bearing and so spaces letters unevenly; plotters' font
//! table (same font) still does the layout estimates. The buffer is encoded as a PNG here (zlib
//! via `flate2`) and written atomically: a temporary file in the target's directory, then a
//! rename.

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, ScaleFont};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};

use crate::fsutil::FsError;

/// An error while drawing or writing a plot.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The file (or its directory) could not be written.
    #[error(transparent)]
    Io(#[from] FsError),
    /// The plot could not be drawn.
    #[error("{0}")]
    Draw(String),
}

pub type Result<T> = std::result::Result<T, PlotError>;

/// One curve: a name for the legend and (step, value) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series named `name` with the given points.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
        }
    }
}

/// At most this many ticks on the step axis and on the value axis.
const X_LABELS: usize = 10;
const Y_LABELS: usize = 8;

/// Width of the image in pixels.
pub const WIDTH: u32 = 1200;
/// Height of the image in pixels.
pub const HEIGHT: u32 = 800;

/// The embedded font (Cantarell Regular 0.303.1, SIL Open Font License 1.1).
static FONT: &[u8] = include_bytes!("../assets/fonts/Cantarell-Regular.otf");
/// The family every text style below uses; the font is registered under it.
const FAMILY: &str = "sans-serif";

/// Line colours (matplotlib's "tab10"), cycled over the series of a panel.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Draws the training curves like the paper's Figure 3 (loss terms against optimizer step):
/// one panel per entry of `panels` (stacked vertically), each with axes, tick labels, its y label
/// and a legend, under `title`; writes a 1200×800 PNG to `path` atomically (temp file in the
/// same directory + rename), creating the directory if needed.
///
/// Non-finite points are skipped; a series left empty is omitted; a panel left without series
/// says "no data", and so does the whole image when no panel has any.
pub fn plot_curves(path: &Path, title: &str, panels: &[(&str, Vec<Series>)]) -> Result<()> {
    register_font()?;
    let font = font()?;
    let panels: Vec<Panel> = panels
        .iter()
        .map(|(label, series)| Panel::Curves(label, clean(series)))
        .collect();
    let rgb = render(font, title, &panels).map_err(|e| draw_error(path, e))?;
    let png = encode_png(WIDTH, HEIGHT, &rgb);
    write_atomically(path, &png)
}

/// One series of a bar chart: a value (and optionally an error half-width, drawn as a whisker) per category;
/// `None` leaves the category without a bar of this series.
#[derive(Debug, Clone, PartialEq)]
pub struct BarSeries {
    /// The legend entry.
    pub name: String,
    /// One value per category.
    pub values: Vec<Option<f64>>,
    /// Half-width of each value's whisker (e.g. a standard error).
    pub errors: Vec<Option<f64>>,
}

impl BarSeries {
    /// A series named `name` with one value per category and no error whiskers.
    pub fn new(name: impl Into<String>, values: Vec<Option<f64>>) -> Self {
        BarSeries {
            name: name.into(),
            errors: vec![None; values.len()],
            values,
        }
    }
}

/// Draws grouped bar charts (e.g. reward and perplexity per model): one panel per entry of `panels`, stacked
/// vertically, each with one group of bars per entry of `categories` (named on the x axis) and one bar per series
/// in a group, its value written on it; a 1200×800 PNG written to `path` atomically like [`plot_curves`].
///
/// Non-finite values are left out; a panel without any value says "no data".
pub fn plot_bars(
    path: &Path,
    title: &str,
    categories: &[String],
    panels: &[(&str, Vec<BarSeries>)],
) -> Result<()> {
    register_font()?;
    let font = font()?;
    let panels: Vec<Panel> = panels
        .iter()
        .map(|(label, series)| Panel::Bars(label, categories, clean_bars(series, categories.len())))
        .collect();
    let rgb = render(font, title, &panels).map_err(|e| draw_error(path, e))?;
    let png = encode_png(WIDTH, HEIGHT, &rgb);
    write_atomically(path, &png)
}

/// The embedded font, parsed once.
fn font() -> Result<&'static FontRef<'static>> {
    static PARSED: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    PARSED
        .get_or_init(|| FontRef::try_from_slice(FONT).ok())
        .as_ref()
        .ok_or_else(|| PlotError::Draw("the embedded plot font could not be parsed".into()))
}

/// Registers the embedded font once per process (plotters keeps a global font table).
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
                .map_err(|_| "the embedded plot font could not be parsed".to_string())
        })
        .clone()
        .map_err(PlotError::Draw)
}

/// The series with their non-finite points removed, and those left empty dropped.
fn clean(series: &[Series]) -> Vec<Series> {
    series
        .iter()
        .map(|s| Series {
            name: s.name.clone(),
            points: s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect()
}

fn draw_error(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(format!("{}: drawing the plot failed: {e}", path.display()))
}

type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One panel of a figure: curves against step, or grouped bars over named categories.
enum Panel<'a> {
    Curves(&'a str, Vec<Series>),
    Bars(&'a str, &'a [String], Vec<BarSeries>),
}

impl Panel<'_> {
    fn label(&self) -> &str {
        match self {
            Panel::Curves(label, _) | Panel::Bars(label, _, _) => label,
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Panel::Curves(_, series) => series.is_empty(),
            Panel::Bars(_, _, series) => series.is_empty(),
        }
    }
}

/// Draws the figure into an RGB buffer of `WIDTH`×`HEIGHT` pixels.
fn render(font: &'static FontRef<'static>, title: &str, panels: &[Panel]) -> DrawResult<Vec<u8>> {
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = Canvas {
            inner: BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)),
            font,
        }
        .into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(title, (FAMILY, 30).into_font().color(&BLACK))?;
        if panels.iter().all(Panel::is_empty) {
            no_data(&body, "no data")?;
        } else {
            for (area, panel) in body.split_evenly((panels.len(), 1)).iter().zip(panels) {
                match panel {
                    p if p.is_empty() => no_data(area, &format!("{}: no data", p.label()))?,
                    Panel::Curves(label, series) => draw_panel(area, label, series)?,
                    Panel::Bars(label, categories, series) => {
                        draw_bars(area, label, categories, series)?
                    }
                }
            }
        }
        root.present()?;
    }
    Ok(buf)
}

/// plotters' bitmap backend with its own text rasteriser: glyphs placed at their advances (with
/// kerning and side bearings) on a baseline that centres capitals in plotters' layout box
/// (height `size / 1.24`, width the sum of advances, as plotters' `ab_glyph` estimates it).
struct Canvas<'a> {
    inner: BitMapBackend<'a>,
    font: &'static FontRef<'static>,
}

impl Canvas<'_> {
    /// The pixels of `text` at `size` px as (x, y, coverage), the layout box at (0, 0), with
    /// the layout box's width and height.
    fn rasterise(&self, text: &str, size: f32) -> (Vec<(i32, i32, f32)>, i32, i32) {
        let font = self.font.as_scaled(size);
        let height = (f64::from(size) / 1.24) as i32;
        let cap = font
            .outline_glyph(font.scaled_glyph('H'))
            .map_or(size * 0.7, |g| -g.px_bounds().min.y);
        let baseline = (height as f32 + cap) / 2.0;
        let mut pixels = Vec::new();
        let mut pen = 0f32;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                pen += font.kern(p, id);
            }
            prev = Some(id);
            let glyph = id.with_scale_and_position(size, ab_glyph::point(pen, baseline));
            pen += font.h_advance(id);
            if let Some(outline) = font.outline_glyph(glyph) {
                let b = outline.px_bounds();
                outline.draw(|x, y, coverage| {
                    pixels.push((
                        b.min.x as i32 + x as i32,
                        b.min.y as i32 + y as i32,
                        coverage,
                    ))
                });
            }
        }
        (pixels, pen as i32, height)
    }
}

impl DrawingBackend for Canvas<'_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }
    fn ensure_prepared(&mut self) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.ensure_prepared()
    }
    fn present(&mut self) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.present()
    }
    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }
    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }
    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }
    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let (pixels, width, height) = self.rasterise(text, style.size() as f32);
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0,
            HPos::Center => -width / 2,
            HPos::Right => -width,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let transform = style.transform();
        for (x, y, coverage) in pixels {
            let (x, y) = transform.transform(x + dx, y + dy);
            let alpha = color.alpha * f64::from(coverage.min(1.0));
            if alpha > 0.0 {
                let ink = BackendColor {
                    alpha,
                    rgb: color.rgb,
                };
                self.inner.draw_pixel((pos.0 + x, pos.1 + y), ink)?;
            }
        }
        Ok(())
    }
}

/// Writes `text` centred in `area`.
fn no_data(area: &DrawingArea<Canvas<'_>, Shift>, text: &str) -> DrawResult<()> {
    let (w, h) = area.dim_in_pixel();
    let style = TextStyle::from((FAMILY, 28).into_font())
        .color(&RGBColor(90, 90, 90))
        .pos(Pos::new(HPos::Center, VPos::Center));
    area.draw_text(text, &style, (w as i32 / 2, h as i32 / 2))?;
    Ok(())
}

/// Draws one panel: the curves of `series` (non-empty, all points finite) against step.
fn draw_panel(
    area: &DrawingArea<Canvas<'_>, Shift>,
    y_label: &str,
    series: &[Series],
) -> DrawResult<()> {
    let points = || series.iter().flat_map(|s| s.points.iter());
    let (x_lo, x_hi) = padded_range(points().map(|p| p.0), 0.0);
    let (y_lo, y_hi) = padded_range(points().map(|p| p.1), 0.05);
    let x_decimals = decimals(x_hi - x_lo, X_LABELS);
    let y_decimals = decimals(y_hi - y_lo, Y_LABELS);
    let x_fmt = move |x: &f64| format!("{x:.x_decimals$}");
    let y_fmt = move |y: &f64| format!("{y:.y_decimals$}");

    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_label)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .x_labels(X_LABELS)
        .y_labels(Y_LABELS)
        .max_light_lines(4)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 19))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(205, 205, 205))
        .draw()?;

    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let style = color.stroke_width(2);
        let legend_style = style;
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), style))?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], legend_style));
        if s.points.len() == 1 {
            // A single point draws no line: mark it.
            chart.draw_series(std::iter::once(Circle::new(s.points[0], 4, color.filled())))?;
        }
    }

    // The legend goes where the curves are not at the end of training: bottom right when they
    // end in the upper half (accuracy rising), top right otherwise (losses falling).
    let ends_high = series
        .iter()
        .map(|s| s.points[s.points.len() - 1].1)
        .sum::<f64>()
        / series.len() as f64
        > (y_lo + y_hi) / 2.0;
    let position = if ends_high {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    };
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FAMILY, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .margin(12)
        .draw()?;
    Ok(())
}

/// The bar series with non-finite values (and errors) removed, padded or cut to `n` categories, and those left
/// without any value dropped.
fn clean_bars(series: &[BarSeries], n: usize) -> Vec<BarSeries> {
    let finite = |v: Option<f64>| v.filter(|x| x.is_finite());
    series
        .iter()
        .map(|s| BarSeries {
            name: s.name.clone(),
            values: (0..n)
                .map(|i| finite(s.values.get(i).copied().flatten()))
                .collect(),
            errors: (0..n)
                .map(|i| finite(s.errors.get(i).copied().flatten()).map(f64::abs))
                .collect(),
        })
        .filter(|s| s.values.iter().any(Option::is_some))
        .collect()
}

/// Draws one bar panel: group `i` of bars centred at x = i, series side by side within 80% of the slot.
fn draw_bars(
    area: &DrawingArea<Canvas<'_>, Shift>,
    y_label: &str,
    categories: &[String],
    series: &[BarSeries],
) -> DrawResult<()> {
    let n = categories.len().max(1);
    // Bars start at 0, so 0 is always in range; whiskers widen it.
    let ends = series.iter().flat_map(|s| {
        s.values.iter().zip(&s.errors).flat_map(|(v, e)| {
            let (v, e) = (v.unwrap_or(0.0), e.unwrap_or(0.0));
            [v - e, v + e]
        })
    });
    let (y_lo, y_hi) = padded_range(ends.chain([0.0]), 0.1);
    // Headroom above the tallest bar for the legend (upper right) so that it covers no bar or value: the
    // legend's share of the plot's height (its rows of ≈ 20 px plus margins), at most 60%.
    let plot_px = (f64::from(area.dim_in_pixel().1) - 45.0 - 24.0).max(50.0);
    let legend_px = 36.0 + 20.0 * series.len() as f64;
    let share = (legend_px / plot_px).min(0.6);
    let y_hi = y_hi + (y_hi - y_lo) * share / (1.0 - share);
    let y_decimals = decimals(y_hi - y_lo, Y_LABELS);
    let y_fmt = move |y: &f64| format!("{y:.y_decimals$}");
    // Ticks fall on the integers (n ticks at step 1 on a span of n), which name the categories.
    let x_fmt = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < categories.len() {
            categories[i as usize].clone()
        } else {
            String::new()
        }
    };
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5..n as f64 - 0.5, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .x_labels(n)
        .y_labels(Y_LABELS)
        .max_light_lines(4)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 19))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(205, 205, 205))
        .draw()?;
    let width = 0.8 / series.len().max(1) as f64;
    let value_style = TextStyle::from((FAMILY, 14).into_font()).color(&BLACK);
    for (k, s) in series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let left = |i: usize| i as f64 - 0.4 + k as f64 * width;
        let bars = s.values.iter().enumerate().filter_map(|(i, v)| {
            v.map(|v| Rectangle::new([(left(i), 0.0), (left(i) + width, v)], color.filled()))
        });
        chart
            .draw_series(bars)?
            .label(s.name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
        for (i, (v, e)) in s.values.iter().zip(&s.errors).enumerate() {
            let Some(v) = *v else { continue };
            let mid = left(i) + width / 2.0;
            // A zero error (one value, or all equal) draws no whisker.
            if let Some(e) = e.filter(|e| *e > 0.0) {
                let cap = width / 6.0;
                let ink = BLACK.stroke_width(2);
                chart.draw_series([
                    PathElement::new(vec![(mid, v - e), (mid, v + e)], ink),
                    PathElement::new(vec![(mid - cap, v - e), (mid + cap, v - e)], ink),
                    PathElement::new(vec![(mid - cap, v + e), (mid + cap, v + e)], ink),
                ])?;
            }
            // The value beside the bar's end, away from the axis, past the whisker.
            let reach = v + v.signum() * e.unwrap_or(0.0);
            let (anchor, dy) = if v >= 0.0 {
                (VPos::Bottom, -4)
            } else {
                (VPos::Top, 4)
            };
            let style = value_style.pos(Pos::new(HPos::Center, anchor));
            let text = format!("{v:.d$}", d = y_decimals + 1);
            chart.draw_series(std::iter::once(
                EmptyElement::at((mid, reach)) + Text::new(text, (0, dy), style),
            ))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .margin(12)
        .draw()?;
    Ok(())
}

/// The span of finite `values` widened by `pad` of it on each side; a degenerate span (one
/// value) is widened to a unit (or relative) interval around it.
fn padded_range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let span = hi - lo;
    if !(span > 0.0 && span.is_finite()) {
        let half = (lo.abs() * 0.05).max(0.5);
        return (lo - half, lo + half);
    }
    (lo - span * pad, hi + span * pad)
}

/// Decimal places that show every tick label exactly on an axis spanning `span` with at most
/// `labels` ticks. plotters puts ticks at multiples of a step of the form {1, 2, 5}×10^k with
/// step ≥ span / (labels + 1), so the decimals of that bound always suffice.
fn decimals(span: f64, labels: usize) -> usize {
    if !(span > 0.0 && span.is_finite()) {
        return 2;
    }
    (-(span / (labels + 1) as f64).log10().floor()).clamp(0.0, 8.0) as usize
}

/// Encodes 8-bit RGB pixels as a PNG (no interlacing, filter type 0 on every row).
fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    let stride = width as usize * 3;
    debug_assert_eq!(rgb.len(), stride * height as usize);
    let mut raw = Vec::with_capacity((stride + 1) * height as usize);
    for row in rgb.chunks_exact(stride) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).expect("writing to a Vec cannot fail");
    let idat = z.finish().expect("writing to a Vec cannot fail");

    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);

    let mut png = Vec::with_capacity(idat.len() + 64);
    png.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    for (kind, data) in [
        (b"IHDR", &ihdr[..]),
        (b"IDAT", &idat[..]),
        (b"IEND", &[][..]),
    ] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        png.extend_from_slice(&crc.sum().to_be_bytes());
    }
    png
}

/// Writes `bytes` over `path` atomically (`crate::fsutil`), creating its directory first.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| FsError::new(dir, e))?;
    }
    Ok(crate::fsutil::write_atomic(path, bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::path::PathBuf;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "rrhf-plot-{tag}-{}-{:?}",
                std::process::id(),
                std::time::SystemTime::now()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Checks the PNG's structure (signature, chunk CRCs, IHDR, IDAT inflating to the right
    /// size) and returns its width, height and RGB pixels.
    fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        let mut pos = 8;
        let (mut width, mut height) = (0, 0);
        let mut idat = Vec::new();
        let mut kinds = Vec::new();
        while pos < bytes.len() {
            let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = &bytes[pos + 4..pos + 8];
            let data = &bytes[pos + 8..pos + 8 + len];
            let crc = u32::from_be_bytes(bytes[pos + 8 + len..pos + 12 + len].try_into().unwrap());
            let mut c = flate2::Crc::new();
            c.update(kind);
            c.update(data);
            assert_eq!(
                c.sum(),
                crc,
                "CRC of chunk {:?}",
                String::from_utf8_lossy(kind)
            );
            match kind {
                b"IHDR" => {
                    width = u32::from_be_bytes(data[0..4].try_into().unwrap());
                    height = u32::from_be_bytes(data[4..8].try_into().unwrap());
                    assert_eq!(&data[8..], &[8, 2, 0, 0, 0]);
                }
                b"IDAT" => idat.extend_from_slice(data),
                _ => {}
            }
            kinds.push(String::from_utf8_lossy(kind).into_owned());
            pos += 12 + len;
        }
        assert_eq!(kinds.first().map(String::as_str), Some("IHDR"));
        assert_eq!(kinds.last().map(String::as_str), Some("IEND"));
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&idat[..])
            .read_to_end(&mut raw)
            .unwrap();
        let stride = width as usize * 3;
        assert_eq!(raw.len(), (stride + 1) * height as usize);
        let mut rgb = Vec::with_capacity(stride * height as usize);
        for row in raw.chunks_exact(stride + 1) {
            assert_eq!(row[0], 0, "filter type");
            rgb.extend_from_slice(&row[1..]);
        }
        (width, height, rgb)
    }

    /// Non-white pixels in rows `y0..y1`.
    fn ink(rgb: &[u8], y0: u32, y1: u32) -> usize {
        let stride = WIDTH as usize * 3;
        rgb[y0 as usize * stride..y1 as usize * stride]
            .chunks_exact(3)
            .filter(|p| p != &[255, 255, 255])
            .count()
    }

    /// With RRHF_PLOT_SAMPLES=DIR set, keeps a copy of the image there to look at.
    fn keep(path: &Path) {
        if let Some(dir) = std::env::var_os("RRHF_PLOT_SAMPLES") {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    fn curve(name: &str, n: usize, f: impl Fn(f64) -> f64) -> Series {
        Series::new(name, (0..n).map(|i| (i as f64, f(i as f64))).collect())
    }

    #[test]
    fn two_panels_write_a_1200x800_png_atomically() {
        let dir = TempDir::new("two");
        let path = dir.0.join("curves.png");
        let n = 300;
        let loss = vec![
            curve("total", n, |t| {
                2.5 * (-t / 80.0).exp() + 0.4 + 0.05 * (t / 3.0).sin()
            }),
            curve("rank_loss", n, |t| 1.2 * (-t / 60.0).exp() + 0.1),
            curve("sft_loss", n, |t| 1.3 * (-t / 100.0).exp() + 0.3),
            Series::new(
                "eval_loss",
                (0..n)
                    .step_by(50)
                    .map(|i| (i as f64, 2.0 * (-(i as f64) / 90.0).exp() + 0.5))
                    .collect(),
            ),
        ];
        let acc = vec![
            curve("rank_acc", n, |t| 0.5 + 0.4 * (1.0 - (-t / 70.0).exp())),
            Series::new(
                "eval_rank_acc",
                (0..n)
                    .step_by(50)
                    .map(|i| (i as f64, 0.5 + 0.35 * (1.0 - (-(i as f64) / 90.0).exp())))
                    .collect(),
            ),
        ];
        plot_curves(
            &path,
            "RRHF training",
            &[("loss", loss), ("ranking accuracy", acc)],
        )
        .unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let (w, h, rgb) = decode_png(&bytes);
        assert_eq!((w, h), (1200, 800));
        assert!(
            leftovers(&dir.0).is_empty(),
            "temp file left: {:?}",
            leftovers(&dir.0)
        );
        // The title band holds rendered text; the panels hold curves, grid and labels.
        assert!(ink(&rgb, 0, 40) > 200, "no title text rendered");
        assert!(ink(&rgb, 40, 800) > 20_000);
        // Coloured (curve) pixels in both halves.
        let stride = WIDTH as usize * 3;
        let blue = |y0: usize, y1: usize| {
            rgb[y0 * stride..y1 * stride]
                .chunks_exact(3)
                .filter(|p| p == &[31, 119, 180])
                .count()
        };
        assert!(blue(40, 420) > 100 && blue(420, 800) > 100);

        keep(&path);
        // Rewriting the same path replaces the file.
        plot_curves(&path, "again", &[("loss", vec![curve("total", 3, |t| t)])]).unwrap();
        assert_ne!(std::fs::read(&path).unwrap(), bytes);
        assert!(leftovers(&dir.0).is_empty());
    }

    #[test]
    fn all_empty_input_writes_a_no_data_png() {
        let dir = TempDir::new("empty");
        for (i, panels) in [
            vec![],
            vec![
                ("loss", vec![]),
                ("ranking accuracy", vec![Series::new("rank_acc", vec![])]),
            ],
            vec![(
                "loss",
                vec![Series::new(
                    "total",
                    vec![(f64::NAN, 1.0), (2.0, f64::INFINITY)],
                )],
            )],
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.0.join(format!("empty{i}.png"));
            plot_curves(&path, "RRHF training", &panels).unwrap();
            keep(&path);
            let (w, h, rgb) = decode_png(&std::fs::read(&path).unwrap());
            assert_eq!((w, h), (1200, 800));
            // Title and the centred "no data" are drawn, nothing else.
            assert!(ink(&rgb, 0, 40) > 200);
            assert!(ink(&rgb, 380, 460) > 200, "no 'no data' text");
            assert_eq!(ink(&rgb, 40, 360) + ink(&rgb, 480, 800), 0);
        }
        assert!(leftovers(&dir.0).is_empty());
    }

    #[test]
    fn nan_points_and_degenerate_series_do_not_crash() {
        let dir = TempDir::new("nan");
        let path = dir.0.join("nan.png");
        let mut total = curve("total", 200, |t| 1.0 / (t + 1.0));
        total.points[10].1 = f64::NAN;
        total.points[20].1 = f64::INFINITY;
        total.points[30].0 = f64::NEG_INFINITY;
        let panels = [
            (
                "loss",
                vec![
                    total,
                    Series::new("nan only", vec![(0.0, f64::NAN); 5]),
                    Series::new("one point", vec![(5.0, 0.5)]),
                ],
            ),
            (
                "ranking accuracy",
                vec![Series::new("flat", vec![(0.0, 1.0), (1.0, 1.0)])],
            ),
            ("empty panel", vec![]),
        ];
        plot_curves(&path, "NaN", &panels).unwrap();
        keep(&path);
        let (w, h, _) = decode_png(&std::fs::read(&path).unwrap());
        assert_eq!((w, h), (1200, 800));
        // A single point alone in its panel.
        plot_curves(
            &path,
            "one",
            &[("loss", vec![Series::new("x", vec![(3.0, -2.0)])])],
        )
        .unwrap();
        assert!(leftovers(&dir.0).is_empty());
    }

    #[test]
    fn bar_panels_draw_grouped_bars_with_whiskers_and_skip_missing_values() {
        let dir = TempDir::new("bars");
        let path = dir.0.join("bars.png");
        let models: Vec<String> = ["base", "rrhf", "sft"].map(String::from).to_vec();
        let mut greedy = BarSeries::new("greedy", vec![Some(-0.8), Some(0.4), Some(f64::NAN)]);
        greedy.errors = vec![Some(0.1), None, Some(0.2)];
        let best = BarSeries::new("best-of-4", vec![Some(0.2), None, Some(0.9)]);
        let ppl = BarSeries::new("PPL", vec![Some(20.0), Some(35.5), Some(18.0)]);
        plot_bars(
            &path,
            "eval",
            &models,
            &[
                ("reward", vec![greedy, best]),
                ("perplexity", vec![ppl]),
                ("nothing", vec![BarSeries::new("x", vec![None, None, None])]),
            ],
        )
        .unwrap();
        keep(&path);
        let (w, h, rgb) = decode_png(&std::fs::read(&path).unwrap());
        assert_eq!((w, h), (WIDTH, HEIGHT));
        let stride = WIDTH as usize * 3;
        let count = |y0: usize, y1: usize, c: [u8; 3]| {
            rgb[y0 * stride..y1 * stride]
                .chunks_exact(3)
                .filter(|p| p == &c)
                .count()
        };
        // Filled bars of both series in the first panel, the perplexity bars in the second, none in the third.
        assert!(count(40, 290, [31, 119, 180]) > 2000);
        assert!(count(40, 290, [255, 127, 14]) > 2000);
        assert!(count(290, 540, [31, 119, 180]) > 5000);
        assert_eq!(count(540, 800, [31, 119, 180]), 0);
        assert!(ink(&rgb, 540, 800) > 200, "no 'no data' text");
        assert!(leftovers(&dir.0).is_empty());
        assert_eq!(
            clean_bars(&[BarSeries::new("x", vec![Some(1.0)])], 2)[0].values,
            [Some(1.0), None]
        );
    }

    #[test]
    fn unwritable_target_is_an_io_error() {
        let dir = TempDir::new("io");
        // The target's "directory" is a file.
        let file = dir.0.join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = plot_curves(&file.join("x.png"), "t", &[]).unwrap_err();
        assert!(matches!(err, PlotError::Io(_)), "{err}");
    }

    #[test]
    fn helpers() {
        assert_eq!(padded_range([1.0, 3.0].into_iter(), 0.0), (1.0, 3.0));
        assert_eq!(padded_range([2.0].into_iter(), 0.0), (1.5, 2.5));
        assert_eq!(padded_range([100.0].into_iter(), 0.0), (95.0, 105.0));
        assert_eq!(decimals(300.0, 10), 0);
        assert_eq!(decimals(3.0, 8), 1);
        assert_eq!(decimals(0.42, 8), 2);
        assert_eq!(decimals(0.0, 8), 2);
    }
}
