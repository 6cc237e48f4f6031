//! From a decoded image to training samples: the 2:1 crop and resize to the base size,
//! the seed's augmentation, and [`ImageSource`], which decodes (optionally caching) on
//! demand and skips files that turn out broken.

use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc, OnceLock,
};

use image::{imageops::FilterType, DynamicImage, ImageDecoder, RgbImage};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use rayon::prelude::*;

use super::*;

/// How samples are made from images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transform {
    /// Output side, in pixels.
    pub image_size: u32,
    pub augment: bool,
    pub flip: bool,
}

impl Transform {
    /// The shorter side images are resized to before cropping: 1.25× the output with
    /// augmentation (the seed's `Resize(80)` for 64), the output itself without.
    pub fn base_size(&self) -> u32 {
        if self.augment {
            ((self.image_size as f64) * 1.25).round() as u32
        } else {
            self.image_size
        }
    }

    /// Floats per sample: `[3, S, S]`.
    pub fn sample_len(&self) -> usize {
        3 * (self.image_size as usize).pow(2)
    }
}

/// The part of a `width` × `height` image that its base image is made from: all of it,
/// or its center cut to [`MAX_ASPECT`]:1. (x, y, w, h).
pub(crate) fn aspect_crop(width: u32, height: u32) -> (u32, u32, u32, u32) {
    let longest = width.min(height).saturating_mul(MAX_ASPECT);
    let (w, h) = (width.min(longest), height.min(longest));
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// The size of a `width` × `height` image resized to a shorter side of `base`.
pub(crate) fn base_dims(width: u32, height: u32, base: u32) -> (u32, u32) {
    let scale = base as f64 / width.min(height) as f64;
    (
        ((width as f64 * scale).round() as u32).max(base),
        ((height as f64 * scale).round() as u32).max(base),
    )
}

/// What a decode of a `width` × `height` image to a base image may hold at once: the
/// file (the JPEG decoder keeps all of it), the decoded image in the widest format and
/// its RGB copy, and the resize's buffers (it samples vertically into f32 RGBA first).
pub(crate) fn decode_bytes(file_bytes: u64, (width, height): (u32, u32), base: u32) -> u64 {
    let pixels = width as u64 * height as u64;
    let (_, _, w, h) = aspect_crop(width, height);
    let (nw, nh) = base_dims(w, h, base);
    let resize = w as u64 * nh as u64 * 16 + nw as u64 * nh as u64 * 3;
    file_bytes + pixels * (MAX_BYTES_PER_PIXEL + 3) + resize
}

/// Decodes a scanned image and resizes its shorter side to `base` (aspect kept up to
/// [`MAX_ASPECT`]:1; a longer image's center is cut out first, so the result has at most
/// 2 × `base`² pixels). The header is checked against `limits` and against the size the
/// scan read before anything is decoded, and the decode's memory is reserved from the
/// process's budget.
pub fn decode_base(
    item: &Item,
    base: u32,
    limits: &ImageLimits,
) -> std::result::Result<RgbImage, String> {
    let (reader, len) = open_image(&item.path, limits)?;
    limits.check_size(item.size.0, item.size.1)?;
    let _held = DECODE_BUDGET.reserve(decode_bytes(len, item.size, base));
    let decoder = reader.into_decoder().map_err(|e| limits.describe(e))?;
    // Again: the file may have changed since the scan.
    let (w, h) = decoder.dimensions();
    limits.check_size(w, h)?;
    if (w, h) != item.size {
        return Err(format!(
            "the image is {w}×{h} now; the scan read {}×{}",
            item.size.0, item.size.1
        ));
    }
    // What `ImageReader::decode` checks and `from_decoder` does not.
    let bytes = decoder.total_bytes();
    if bytes > limits.max_file_bytes() {
        return Err(format!(
            "decoding it takes {bytes} bytes, over the {} that dataset.max_pixels = {} allows",
            limits.max_file_bytes(),
            limits.max_pixels
        ));
    }
    let img = DynamicImage::from_decoder(decoder)
        .map_err(|e| limits.describe(e))?
        .into_rgb8();
    let (x, y, cw, ch) = aspect_crop(w, h);
    let (nw, nh) = base_dims(cw, ch, base);
    if (cw, ch) == (w, h) {
        if (nw, nh) == (w, h) {
            return Ok(img);
        }
        return Ok(image::imageops::resize(&img, nw, nh, FilterType::Triangle));
    }
    let kept = image::imageops::crop_imm(&img, x, y, cw, ch);
    if (nw, nh) == (cw, ch) {
        return Ok(kept.to_image());
    }
    Ok(image::imageops::resize(
        &*kept,
        nw,
        nh,
        FilterType::Triangle,
    ))
}

/// torchvision's `RandomResizedCrop.get_params` with scale (0.8, 1.0) and ratio
/// (3/4, 4/3): (x, y, w, h) of the crop.
pub(crate) fn random_crop(rng: &mut impl Rng, width: u32, height: u32) -> (u32, u32, u32, u32) {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(0.8..=1.0);
        let ratio = rng.random_range(log_lo..=log_hi).exp();
        let w = (target * ratio).sqrt().round() as u32;
        let h = (target / ratio).sqrt().round() as u32;
        if w > 0 && h > 0 && w <= width && h <= height {
            let x = rng.random_range(0..=width - w);
            let y = rng.random_range(0..=height - h);
            return (x, y, w, h);
        }
    }
    // Fallback (as torchvision): the whole image's central square-ish part.
    let side = width.min(height);
    ((width - side) / 2, (height - side) / 2, side, side)
}

/// Makes one sample from a base image into `out` (`[3, S, S]`, values in [−1, 1]).
pub fn make_sample(base: &RgbImage, t: &Transform, rng: &mut impl Rng, out: &mut [f32]) {
    let s = t.image_size;
    let (w, h) = base.dimensions();
    let (x, y, cw, ch) = if t.augment {
        random_crop(rng, w, h)
    } else {
        let side = w.min(h);
        ((w - side) / 2, (h - side) / 2, side, side)
    };
    let cropped = image::imageops::crop_imm(base, x, y, cw, ch).to_image();
    let img = if (cw, ch) == (s, s) {
        cropped
    } else {
        image::imageops::resize(&cropped, s, s, FilterType::Triangle)
    };
    let flip = t.flip && rng.random_bool(0.5);
    let plane = (s * s) as usize;
    for (px, py, p) in img.enumerate_pixels() {
        let sx = if flip { s - 1 - px } else { px };
        let i = (py * s + sx) as usize;
        for c in 0..3 {
            out[c * plane + i] = p[c] as f32 / 127.5 - 1.0;
        }
    }
}

/// SplitMix64: turns (seed, counters) into well-spread RNG seeds.
pub fn mix(seed: u64, a: u64) -> u64 {
    let mut z = seed
        ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x632B_E59B_D9B5_E15A);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The images of a dataset as the loader reads them: decoded on demand (within
/// `limits`), optionally kept (resized to the base size) in memory, with broken files
/// skipped.
#[derive(Debug)]
pub struct ImageSource {
    items: Vec<Item>,
    transform: Transform,
    limits: ImageLimits,
    cache: Option<Vec<OnceLock<Arc<RgbImage>>>>,
    /// Files that failed to decode: skipped from then on.
    broken: Vec<AtomicBool>,
    broken_count: AtomicUsize,
}

impl ImageSource {
    pub fn new(
        items: Vec<Item>,
        transform: Transform,
        cache: bool,
        limits: ImageLimits,
    ) -> ImageSource {
        let n = items.len();
        ImageSource {
            limits,
            cache: cache.then(|| (0..n).map(|_| OnceLock::new()).collect()),
            broken: (0..n).map(|_| AtomicBool::new(false)).collect(),
            broken_count: AtomicUsize::new(0),
            items,
            transform,
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn transform(&self) -> &Transform {
        &self.transform
    }

    /// Files found corrupt (or over the limits, or changed) while decoding, beyond those
    /// the scan skipped.
    pub fn broken_count(&self) -> usize {
        self.broken_count.load(Ordering::Relaxed)
    }

    /// Decodes every image now (in parallel), so a cached dataset is ready before the
    /// first step and its corrupt files are known.
    pub fn warm_up(&self) {
        (0..self.len()).into_par_iter().for_each(|i| {
            let _ = self.base(i);
        });
    }

    fn base(&self, i: usize) -> Option<Arc<RgbImage>> {
        if self.broken[i].load(Ordering::Relaxed) {
            return None;
        }
        if let Some(cache) = &self.cache {
            if let Some(img) = cache[i].get() {
                return Some(img.clone());
            }
        }
        match decode_base(&self.items[i], self.transform.base_size(), &self.limits) {
            Ok(img) => {
                let img = Arc::new(img);
                if let Some(cache) = &self.cache {
                    let _ = cache[i].set(img.clone());
                }
                Some(img)
            }
            Err(reason) => {
                if !self.broken[i].swap(true, Ordering::Relaxed) {
                    self.broken_count.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %self.items[i].path.display(), %reason, "skipping corrupt image");
                }
                None
            }
        }
    }

    /// Sample `index` of the stream: image `i` (or, if it is broken, the next good one)
    /// transformed with randomness seeded by `rng_seed`. Writes `[3, S, S]` into `out`
    /// and returns the label; `None` only when every image is broken.
    pub fn sample(&self, i: usize, rng_seed: u64, out: &mut [f32]) -> Option<i64> {
        let n = self.len();
        for k in 0..n {
            let j = (i + k) % n;
            if let Some(img) = self.base(j) {
                let mut rng = Pcg64Mcg::seed_from_u64(rng_seed);
                make_sample(&img, &self.transform, &mut rng, out);
                return Some(self.items[j].label);
            }
        }
        None
    }
}
