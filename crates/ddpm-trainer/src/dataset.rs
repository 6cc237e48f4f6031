//! Image-folder datasets: scanning, decoding and the seed's augmentation.
//!
//! A folder whose subfolders are the classes (sorted names give the class ids; files in
//! a class folder's subfolders belong to it too), or a flat folder of images for an
//! unconditional model. Every file the `image` crate decodes counts; a file it cannot
//! read (unknown or broken header, unreadable) is skipped, counted and reported, never
//! fatal. An empty dataset or class is an error.
//!
//! Scanning reads headers only; a file whose body turns out corrupt when it is decoded
//! for training is skipped then (see [`ImageSource::sample`]).

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
};

use image::{imageops::FilterType, ImageFormat, ImageReader, RgbImage};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainerError};

/// How many skipped files a summary lists by name (all are counted).
const LISTED_SKIPS: usize = 20;

/// One training image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub path: PathBuf,
    /// Class id (0 for an unconditional dataset).
    pub label: i64,
}

/// A file that was not used, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// A scanned image folder.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub items: Vec<Item>,
    /// Empty for an unconditional (flat) dataset.
    pub class_names: Vec<String>,
    pub skipped: Vec<Skipped>,
}

/// What the registry stores about a run's dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSummary {
    pub path: PathBuf,
    pub image_count: usize,
    pub class_names: Vec<String>,
    pub class_counts: Vec<usize>,
    pub skipped_count: usize,
    /// The first few skipped files.
    pub skipped: Vec<Skipped>,
}

impl ImageFolder {
    /// Lists the images under `root` and checks each one's header (in parallel).
    pub fn scan(root: &Path) -> Result<ImageFolder> {
        let bad = |m: String| TrainerError::dataset(root, m);
        if !root.is_dir() {
            return Err(bad("is not a directory".into()));
        }
        let mut class_dirs = Vec::new();
        let mut loose = Vec::new();
        for entry in read_dir_sorted(root)? {
            if entry.is_dir() {
                class_dirs.push(entry);
            } else {
                loose.push(entry);
            }
        }
        let conditional = !class_dirs.is_empty();
        let mut candidates: Vec<(PathBuf, i64)> = Vec::new();
        let mut class_names = Vec::new();
        if conditional {
            if loose.iter().any(|p| is_image_name(p)) {
                tracing::warn!(
                    root = %root.display(),
                    "the dataset has class folders; images directly in its root are ignored"
                );
            }
            for (label, dir) in class_dirs.iter().enumerate() {
                class_names.push(file_name(dir));
                let mut files = Vec::new();
                walk(dir, &mut files)?;
                candidates.extend(files.into_iter().map(|f| (f, label as i64)));
            }
        } else {
            candidates.extend(loose.into_iter().map(|f| (f, 0)));
        }
        let candidates: Vec<(PathBuf, i64)> = candidates
            .into_iter()
            .filter(|(p, _)| is_image_name(p))
            .collect();
        let checked: Vec<(PathBuf, i64, Option<String>)> = candidates
            .into_par_iter()
            .map(|(path, label)| {
                let problem = check_header(&path).err();
                (path, label, problem)
            })
            .collect();
        let mut items = Vec::new();
        let mut skipped = Vec::new();
        for (path, label, problem) in checked {
            match problem {
                None => items.push(Item { path, label }),
                Some(reason) => skipped.push(Skipped { path, reason }),
            }
        }
        for s in &skipped {
            tracing::warn!(path = %s.path.display(), reason = %s.reason, "skipping unreadable image");
        }
        if items.is_empty() {
            return Err(bad(format!(
                "no readable images ({} skipped as unreadable); expected class subfolders of images \
                 or a flat folder of images",
                skipped.len()
            )));
        }
        if conditional {
            for (label, name) in class_names.iter().enumerate() {
                if !items.iter().any(|i| i.label == label as i64) {
                    return Err(bad(format!("class {name:?} has no readable images")));
                }
            }
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            items,
            class_names,
            skipped,
        })
    }

    /// `None` for a flat (unconditional) dataset.
    pub fn num_classes(&self) -> Option<i64> {
        (!self.class_names.is_empty()).then_some(self.class_names.len() as i64)
    }

    pub fn summary(&self) -> DatasetSummary {
        let mut class_counts = vec![0; self.class_names.len()];
        for item in &self.items {
            if let Some(c) = class_counts.get_mut(item.label as usize) {
                *c += 1;
            }
        }
        DatasetSummary {
            path: self.root.clone(),
            image_count: self.items.len(),
            class_names: self.class_names.clone(),
            class_counts,
            skipped_count: self.skipped.len(),
            skipped: self.skipped.iter().take(LISTED_SKIPS).cloned().collect(),
        }
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn is_hidden(p: &Path) -> bool {
    file_name(p).starts_with('.')
}

/// Whether the name says image (an extension `image` knows); other files (READMEs, label
/// lists) are not candidates at all.
fn is_image_name(p: &Path) -> bool {
    p.is_file() && ImageFormat::from_path(p).is_ok()
}

/// Non-hidden entries of `dir`, sorted by name.
fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(TrainerError::io(dir))? {
        let path = entry.map_err(TrainerError::io(dir))?.path();
        if !is_hidden(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for p in read_dir_sorted(dir)? {
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn check_header(path: &Path) -> std::result::Result<(), String> {
    let reader = ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let (w, h) = reader.into_dimensions().map_err(|e| e.to_string())?;
    if w == 0 || h == 0 {
        return Err("the image is empty".into());
    }
    Ok(())
}

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

/// Decodes an image and resizes its shorter side to `base` (aspect kept).
pub fn decode_base(path: &Path, base: u32) -> std::result::Result<RgbImage, String> {
    let img = ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .decode()
        .map_err(|e| e.to_string())?
        .into_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err("the image is empty".into());
    }
    if w.min(h) == base {
        return Ok(img);
    }
    let scale = base as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(base),
        ((h as f64 * scale).round() as u32).max(base),
    );
    Ok(image::imageops::resize(&img, nw, nh, FilterType::Triangle))
}

/// torchvision's `RandomResizedCrop.get_params` with scale (0.8, 1.0) and ratio
/// (3/4, 4/3): (x, y, w, h) of the crop.
fn random_crop(rng: &mut impl Rng, width: u32, height: u32) -> (u32, u32, u32, u32) {
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

/// The images of a dataset as the loader reads them: decoded on demand, optionally kept
/// (resized to the base size) in memory, with broken files skipped.
#[derive(Debug)]
pub struct ImageSource {
    items: Vec<Item>,
    transform: Transform,
    cache: Option<Vec<OnceLock<Arc<RgbImage>>>>,
    /// Files that failed to decode: skipped from then on.
    broken: Vec<AtomicBool>,
    broken_count: AtomicUsize,
}

impl ImageSource {
    pub fn new(items: Vec<Item>, transform: Transform, cache: bool) -> ImageSource {
        let n = items.len();
        ImageSource {
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

    /// Files found corrupt while decoding (beyond those the scan skipped).
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
        match decode_base(&self.items[i].path, self.transform.base_size()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(w, h, image::Rgb(rgb))
            .save(path)
            .unwrap();
    }

    #[test]
    fn class_folders_give_sorted_class_ids_and_broken_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_png(&root.join("zebra/a.png"), 10, 12, [0, 0, 0]);
        write_png(&root.join("apple/b.png"), 8, 8, [255, 0, 0]);
        write_png(&root.join("apple/nested/c.png"), 8, 8, [255, 0, 0]);
        std::fs::write(root.join("apple/broken.png"), b"not a png").unwrap();
        std::fs::write(root.join("apple/notes.txt"), b"ignored").unwrap();
        std::fs::write(root.join("zebra/.hidden.png"), b"ignored").unwrap();
        let folder = ImageFolder::scan(root).unwrap();
        assert_eq!(folder.class_names, ["apple", "zebra"]);
        assert_eq!(folder.items.len(), 3);
        assert_eq!(folder.num_classes(), Some(2));
        let summary = folder.summary();
        assert_eq!(summary.class_counts, [2, 1]);
        assert_eq!(summary.skipped_count, 1);
        assert!(summary.skipped[0].path.ends_with("apple/broken.png"));
    }

    #[test]
    fn flat_folders_are_unconditional_and_empty_ones_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("a.png"), 8, 8, [1, 2, 3]);
        let folder = ImageFolder::scan(dir.path()).unwrap();
        assert_eq!(folder.num_classes(), None);
        assert_eq!(folder.items[0].label, 0);

        let empty = tempfile::tempdir().unwrap();
        let e = ImageFolder::scan(empty.path()).unwrap_err().to_string();
        assert!(e.contains("no readable images"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("cats/a.png"), 8, 8, [1, 2, 3]);
        std::fs::create_dir_all(dir.path().join("dogs")).unwrap();
        std::fs::write(dir.path().join("dogs/x.jpg"), b"garbage").unwrap();
        let e = ImageFolder::scan(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("\"dogs\"") && e.contains("no readable images"),
            "{e}"
        );
    }

    #[test]
    fn samples_are_in_range_deterministic_and_corrupt_bodies_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("a.png");
        let mut img = RgbImage::new(20, 14);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 12) as u8, (y * 18) as u8, 255]);
        }
        img.save(&good).unwrap();
        // A valid header with a truncated body: passes the scan, fails to decode.
        let bytes = std::fs::read(&good).unwrap();
        let truncated = dir.path().join("b.png");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let items = vec![
            Item {
                path: truncated,
                label: 1,
            },
            Item {
                path: good,
                label: 0,
            },
        ];
        let t = Transform {
            image_size: 8,
            augment: true,
            flip: true,
        };
        let source = ImageSource::new(items, t, true);
        let mut a = vec![0f32; t.sample_len()];
        let mut b = vec![0f32; t.sample_len()];
        assert_eq!(source.sample(0, 42, &mut a), Some(0)); // item 0 is broken → item 1
        assert_eq!(source.broken_count(), 1);
        source.sample(1, 42, &mut b);
        assert_eq!(a, b, "same seed, same sample");
        assert!(a.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!(a.iter().any(|v| *v > 0.9), "blue channel is 255 → 1.0");
        let differs = (0..20u64).any(|s| {
            source.sample(1, s, &mut b);
            a != b
        });
        assert!(differs, "augmentation varies with the seed");
    }

    #[test]
    fn crops_stay_inside_the_image() {
        let mut rng = Pcg64Mcg::seed_from_u64(1);
        for _ in 0..1000 {
            let (x, y, w, h) = random_crop(&mut rng, 80, 100);
            assert!(x + w <= 80 && y + h <= 100 && w > 0 && h > 0);
            let frac = (w * h) as f64 / 8000.0;
            assert!(frac > 0.75 && frac < 1.05, "{frac}");
        }
    }
}
