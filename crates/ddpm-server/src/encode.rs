//! A response's encodings: [`negotiate`] picks one from the request's `Accept`; then one
//! PNG (or its base64, for JSON), a labelled PNG grid, or a ZIP of PNGs (JSON is the
//! handler's).

use std::io::{Cursor, Write};

use base64::Engine;
use ddpm_core::tile::Tiling;
use image::{codecs::png::PngEncoder, ExtendedColorType, ImageEncoder};
use zip::{write::SimpleFileOptions, CompressionMethod, ZipWriter};

use crate::batcher::GeneratedImage;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("png: {0}")]
    Png(#[from] image::ImageError),
    #[error("zip: {0}")]
    Zip(#[from] zip::result::ZipError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("nothing to encode")]
    Empty,
}

/// What a sampling response can be encoded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Png,
    Zip,
    /// Server-Sent Events: the request's progress and its images as they finish.
    EventStream,
}

/// No encoding the client accepts is one the server can produce (406).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct NotAcceptable(pub String);

/// The supported type the client prefers most (by q, then order) in an `Accept` header's
/// value; JSON when there is none.
pub fn negotiate(accept: Option<&[u8]>) -> Result<Format, NotAcceptable> {
    let Some(accept) = accept else {
        return Ok(Format::Json);
    };
    let accept = std::str::from_utf8(accept)
        .map_err(|_| NotAcceptable("the Accept header is not readable text".into()))?;
    let mut ranges: Vec<(f64, usize, Format)> = Vec::new();
    for (order, range) in accept.split(',').enumerate() {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f64>().ok())
            .unwrap_or(1.0);
        let format = match media.as_str() {
            "application/json" | "application/*" | "*/*" => Format::Json,
            "image/png" | "image/*" => Format::Png,
            "application/zip" => Format::Zip,
            "text/event-stream" => Format::EventStream,
            _ => continue,
        };
        if q > 0.0 {
            ranges.push((q, order, format));
        }
    }
    ranges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    ranges.first().map(|r| r.2).ok_or_else(|| {
        NotAcceptable(format!(
            "cannot answer with {accept:?}: accept application/json, image/png, application/zip or text/event-stream"
        ))
    })
}

/// One image as a PNG file in base64 (standard alphabet, padded), as JSON carries it.
pub fn png_base64(image: &GeneratedImage) -> Result<String, EncodeError> {
    Ok(base64::engine::general_purpose::STANDARD.encode(png(image)?))
}

/// One image as PNG bytes.
pub fn png(image: &GeneratedImage) -> Result<Vec<u8>, EncodeError> {
    let color = if image.channels == 1 {
        ExtendedColorType::L8
    } else {
        ExtendedColorType::Rgb8
    };
    encode_png(&image.pixels, image.width, image.height, color)
}

fn encode_png(
    pixels: &[u8],
    width: u32,
    height: u32,
    color: ExtendedColorType,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out).write_image(pixels, width, height, color)?;
    Ok(out)
}

/// Cells are at least this wide: small images are enlarged (nearest neighbour, an integer
/// factor) so that the grid is viewable and a label fits under each.
const MIN_CELL: u32 = 64;
const PAD: u32 = 2;
const FONT_SCALE: u32 = 2;
/// A label's strip under its cell: 5 rows of glyph at `FONT_SCALE`, with a margin.
const LABEL_HEIGHT: u32 = 5 * FONT_SCALE + 4;

/// How a grid of `n` images of `size`² pixels is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridLayout {
    pub columns: u32,
    pub rows: u32,
    /// Enlargement of each image.
    pub scale: u32,
    pub width: u32,
    pub height: u32,
}

impl GridLayout {
    pub fn new(n: usize, image_width: u32, image_height: u32) -> GridLayout {
        let n = n.max(1) as u32;
        let columns = (1..=n).find(|c| c * c >= n).unwrap_or(n);
        let rows = n.div_ceil(columns);
        let scale = (MIN_CELL / image_width.max(1)).max(1);
        let tiling = Tiling {
            columns,
            rows,
            image_width,
            image_height,
            scale,
            pad: PAD,
            caption_height: LABEL_HEIGHT,
        };
        GridLayout {
            columns,
            rows,
            scale,
            width: tiling.width(),
            height: tiling.height(),
        }
    }
}

/// The images in a grid (row-major, white background), each labelled underneath.
pub fn grid(
    images: &[GeneratedImage],
    labels: &[String],
) -> Result<(Vec<u8>, GridLayout), EncodeError> {
    let first = images.first().ok_or(EncodeError::Empty)?;
    let layout = GridLayout::new(images.len(), first.width, first.height);
    let tiling = Tiling {
        columns: layout.columns,
        rows: layout.rows,
        image_width: first.width,
        image_height: first.height,
        scale: layout.scale,
        pad: PAD,
        caption_height: LABEL_HEIGHT,
    };
    let mut canvas = tiling.draw(images.iter().map(|i| (&i.pixels[..], i.channels)));
    for i in 0..images.len() {
        let (x0, y0) = tiling.origin(i);
        let label = labels.get(i).map(String::as_str).unwrap_or("");
        let under = y0 + first.height * layout.scale + 2;
        let width = layout.width as usize;
        draw_text(
            &mut canvas,
            width,
            x0 + 1,
            under,
            tiling.cell_width(),
            label,
        );
    }
    Ok((
        encode_png(
            &canvas,
            layout.width,
            layout.height,
            ExtendedColorType::Rgb8,
        )?,
        layout,
    ))
}

/// A ZIP (stored entries) of one PNG per image, named by `names`.
pub fn zip(images: &[GeneratedImage], names: &[String]) -> Result<Vec<u8>, EncodeError> {
    let mut writer = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    for (image, name) in images.iter().zip(names) {
        writer.start_file(name.as_str(), options)?;
        writer.write_all(&png(image)?)?;
    }
    Ok(writer.finish()?.into_inner())
}

/// 3×5 glyphs, one row per entry, bit 2 = left column.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_lowercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'a' => [2, 5, 7, 5, 5],
        'b' => [6, 5, 6, 5, 6],
        'c' => [3, 4, 4, 4, 3],
        'd' => [6, 5, 5, 5, 6],
        'e' => [7, 4, 6, 4, 7],
        'f' => [7, 4, 6, 4, 4],
        'g' => [3, 4, 5, 5, 3],
        'h' => [5, 5, 7, 5, 5],
        'i' => [7, 2, 2, 2, 7],
        'j' => [1, 1, 1, 5, 2],
        'k' => [5, 5, 6, 5, 5],
        'l' => [4, 4, 4, 4, 7],
        'm' => [5, 7, 7, 5, 5],
        'n' => [6, 5, 5, 5, 5],
        'o' => [2, 5, 5, 5, 2],
        'p' => [6, 5, 6, 4, 4],
        'q' => [2, 5, 5, 6, 3],
        'r' => [6, 5, 6, 5, 5],
        's' => [3, 4, 2, 1, 6],
        't' => [7, 2, 2, 2, 2],
        'u' => [5, 5, 5, 5, 7],
        'v' => [5, 5, 5, 5, 2],
        'w' => [5, 5, 7, 7, 5],
        'x' => [5, 5, 2, 5, 5],
        'y' => [5, 5, 2, 2, 2],
        'z' => [7, 1, 2, 4, 7],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        '.' => [0, 0, 0, 0, 2],
        ' ' => [0; 5],
        _ => [7, 1, 2, 0, 2],
    }
}

/// Draws `text` in black at (x, y), cut to what fits in `max_width` pixels.
fn draw_text(canvas: &mut [u8], canvas_width: usize, x: u32, y: u32, max_width: u32, text: &str) {
    let advance = 4 * FONT_SCALE;
    let fits = (max_width / advance) as usize;
    for (i, c) in text.chars().take(fits).enumerate() {
        let gx = x + i as u32 * advance;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..3u32 {
                if bits & (4 >> col) == 0 {
                    continue;
                }
                for dy in 0..FONT_SCALE {
                    for dx in 0..FONT_SCALE {
                        let px = (gx + col * FONT_SCALE + dx) as usize;
                        let py = (y + row as u32 * FONT_SCALE + dy) as usize;
                        let at = (py * canvas_width + px) * 3;
                        if let Some(p) = canvas.get_mut(at..at + 3) {
                            p.fill(0);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        let accept = |v: &str| negotiate(Some(v.as_bytes()));
        assert_eq!(negotiate(None).unwrap(), Format::Json);
        assert_eq!(accept("image/png").unwrap(), Format::Png);
        assert_eq!(accept("application/zip").unwrap(), Format::Zip);
        assert_eq!(accept("text/html, */*;q=0.1").unwrap(), Format::Json);
        assert_eq!(
            accept("application/json;q=0.5, image/png").unwrap(),
            Format::Png
        );
        assert!(accept("text/html").is_err());
        assert!(accept("image/png;q=0").is_err());
        assert!(negotiate(Some(b"\xff")).is_err());
    }

    fn image(value: u8) -> GeneratedImage {
        GeneratedImage {
            label: Some(0),
            seed: 1,
            width: 8,
            height: 8,
            channels: 3,
            pixels: vec![value; 8 * 8 * 3],
        }
    }

    #[test]
    fn png_round_trips() {
        let bytes = png(&image(200)).unwrap();
        let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (8, 8));
        assert!(decoded.pixels().all(|p| p.0 == [200, 200, 200]));
    }

    #[test]
    fn grid_layout_is_square_ish_and_enlarges_small_images() {
        let layout = GridLayout::new(5, 8, 8);
        assert_eq!((layout.columns, layout.rows, layout.scale), (3, 2, 8));
        assert_eq!(layout.width, 3 * 64 + 4 * PAD);
        assert_eq!(layout.height, 2 * (64 + LABEL_HEIGHT) + 3 * PAD);
        assert_eq!(GridLayout::new(1, 64, 64).scale, 1);
        let images: Vec<_> = (0..5).map(|i| image(i * 40)).collect();
        let labels: Vec<String> = (0..5).map(|i| format!("class-{i}")).collect();
        let (bytes, layout) = grid(&images, &labels).unwrap();
        let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (layout.width, layout.height));
        // The second image's top-left pixel, enlarged.
        assert_eq!(
            decoded.get_pixel(PAD + 64 + PAD + 3, PAD + 3).0,
            [40, 40, 40]
        );
        // Some label ink under the first cell.
        let ink = (0..64).any(|x| decoded.get_pixel(PAD + x, PAD + 64 + 4).0 == [0, 0, 0]);
        assert!(ink, "no label drawn");
    }

    #[test]
    fn zip_holds_one_png_per_image() {
        let bytes = zip(&[image(1), image(2)], &["a.png".into(), "b.png".into()]).unwrap();
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        assert_eq!(archive.len(), 2);
        let mut entry = archive.by_name("b.png").unwrap();
        let mut png_bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut png_bytes).unwrap();
        let decoded = image::load_from_memory(&png_bytes).unwrap().to_rgb8();
        assert_eq!(decoded.get_pixel(0, 0).0, [2, 2, 2]);
    }
}
