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
//!
//! A dataset may be hostile (a download, a shared folder), so reading one is bounded:
//!
//! - **Pixels.** An image over [`ImageLimits::max_pixels`] (`dataset.max_pixels`, by
//!   default [`DEFAULT_MAX_PIXELS`] = 8192 × 8192) is skipped and counted like a corrupt
//!   one. The limit is checked from the header, at the scan and again right before each
//!   decode (the file may have changed since); a file whose header no longer says what
//!   the scan read is skipped as corrupt.
//! - **Bytes.** A file larger than [`ImageLimits::max_file_bytes`] (the raw size of the
//!   largest allowed image at 8 bytes per pixel, plus 16 MiB of metadata) is skipped
//!   without being read, and no file is read past the size it had when it was opened (the
//!   JPEG decoder reads a whole file into memory). The `image` decoders get the same
//!   limits ([`image::Limits`]), so a header that lies cannot make one allocate more.
//! - **Shape.** Before the resize to the base size, an image is center-cropped to at
//!   most 2:1 ([`MAX_ASPECT`]), so a 1 × 1 000 000 strip becomes a 20 × 40 base image,
//!   not 20 × 20 000 000. The samples do not change: beyond 5:3 the augmentation's
//!   crops (and the plain center crop) take the central square anyway.
//! - **Memory.** Decodes and header reads reserve what they may hold (the file, the
//!   decoded image at 8 bytes per pixel, its RGB copy, the resize's buffers) from one
//!   process-wide budget of [`DECODE_BUDGET_BYTES`] (1 GiB) and wait while it is spent;
//!   an image that needs more than the whole budget is decoded alone.
//! - **Folders.** The scan reads each folder of a class once: a symbolic link back to a
//!   folder above it (a loop) or to a folder already read, and a folder nested more than
//!   [`MAX_DEPTH`] levels below its class folder, are skipped and listed with the
//!   skipped files (never fatal); so is a subfolder that cannot be read.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, BufReader, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Condvar, Mutex, OnceLock, PoisonError,
    },
};

use image::{
    error::LimitErrorKind, imageops::FilterType, DynamicImage, ImageDecoder, ImageError,
    ImageFormat, ImageReader, RgbImage,
};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainerError};

/// How many skipped files a summary lists by name (all are counted).
const LISTED_SKIPS: usize = 20;

/// The default [`ImageLimits::max_pixels`]: 64 Mi pixels (8192 × 8192, above the
/// 61-megapixel output of the largest common cameras). Decoded at the widest pixel format
/// the enabled decoders produce (16-bit RGBA, 8 bytes a pixel), that is 512 MiB: the
/// `image` crate's own default allocation limit.
pub const DEFAULT_MAX_PIXELS: u64 = 1 << 26;

/// Bytes a pixel takes in the widest format the enabled decoders produce (16-bit RGBA).
const MAX_BYTES_PER_PIXEL: u64 = 8;

/// Bytes beyond the pixels that a file or a decoder may use: headers, ICC profiles,
/// EXIF, text chunks.
const METADATA_ALLOWANCE: u64 = 16 << 20;

/// The longest side an image keeps before its resize, as a multiple of its shorter side:
/// beyond 5:3 no crop of the augmentation (scale ≥ 0.8, ratio ≤ 4:3) fits, so the
/// samples come from the central square either way.
pub const MAX_ASPECT: u32 = 2;

/// Folder levels below a class folder that the scan descends into.
pub const MAX_DEPTH: usize = 32;

/// What decoding may hold at once, over all threads (see [`DecodeBudget`]).
pub const DECODE_BUDGET_BYTES: u64 = 1 << 30;

/// What reading one image may cost; from `dataset.max_pixels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Width × height above which an image is skipped.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

impl ImageLimits {
    /// The largest file read (and the most a decoder may allocate): the largest allowed
    /// image at 8 bytes a pixel, plus 16 MiB of metadata. A compressed image is smaller
    /// than its own raw pixels, so only a hostile or broken file is over.
    pub fn max_file_bytes(&self) -> u64 {
        self.max_pixels
            .saturating_mul(MAX_BYTES_PER_PIXEL)
            .saturating_add(METADATA_ALLOWANCE)
    }

    /// The same limits for the `image` decoders.
    fn decoder_limits(&self) -> image::Limits {
        let side = u32::try_from(self.max_pixels).unwrap_or(u32::MAX);
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(side);
        limits.max_image_height = Some(side);
        limits.max_alloc = Some(self.max_file_bytes());
        limits
    }

    /// An image of `width` × `height` is usable.
    fn check_size(&self, width: u32, height: u32) -> std::result::Result<(), String> {
        if width == 0 || height == 0 {
            return Err("the image is empty".into());
        }
        let pixels = width as u64 * height as u64;
        if pixels > self.max_pixels {
            return Err(format!(
                "{width}×{height} is {pixels} pixels, over the limit of {} (dataset.max_pixels)",
                self.max_pixels
            ));
        }
        Ok(())
    }

    /// An `image` error, with the limit named when it is what failed.
    fn describe(&self, e: ImageError) -> String {
        match e {
            ImageError::Limits(l) => match l.kind() {
                LimitErrorKind::DimensionError => format!(
                    "a side of the image is over {} pixels, the limit on width × height \
                     (dataset.max_pixels)",
                    self.max_pixels
                ),
                _ => format!(
                    "{l} (dataset.max_pixels = {} allows {} bytes a file or decoder)",
                    self.max_pixels,
                    self.max_file_bytes()
                ),
            },
            other => other.to_string(),
        }
    }
}

/// One training image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub path: PathBuf,
    /// Class id (0 for an unconditional dataset).
    pub label: i64,
    /// Width and height as the scan read them from the header: a decode reserves memory
    /// for this size and refuses a file whose header says otherwise by then.
    pub size: (u32, u32),
}

/// A file (or folder) that was not used, and why.
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
    /// Skipped folders (loops, links to a folder already read, too deep, unreadable),
    /// then skipped files.
    pub skipped: Vec<Skipped>,
}

/// What the registry stores about a run's dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSummary {
    pub path: PathBuf,
    pub image_count: usize,
    pub class_names: Vec<String>,
    pub class_counts: Vec<usize>,
    /// Files and folders skipped.
    pub skipped_count: usize,
    /// The first few skipped.
    pub skipped: Vec<Skipped>,
}

impl ImageFolder {
    /// Lists the images under `root` and checks each one's header against `limits` (in
    /// parallel).
    pub fn scan(root: &Path, limits: ImageLimits) -> Result<ImageFolder> {
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
        let mut skipped = Vec::new();
        if conditional {
            if loose.iter().any(|p| is_image_name(p)) {
                tracing::warn!(
                    root = %root.display(),
                    "the dataset has class folders; images directly in its root are ignored"
                );
            }
            let root_id = dir_id(root).map_err(TrainerError::io(root))?;
            for (label, dir) in class_dirs.iter().enumerate() {
                class_names.push(file_name(dir));
                let mut walk = Walk::new(root_id.clone(), root);
                walk.dir(dir, 0);
                candidates.extend(walk.files.into_iter().map(|f| (f, label as i64)));
                skipped.extend(walk.skipped);
            }
        } else {
            candidates.extend(loose.into_iter().map(|f| (f, 0)));
        }
        for s in &skipped {
            tracing::warn!(path = %s.path.display(), reason = %s.reason, "skipping a folder");
        }
        let candidates: Vec<(PathBuf, i64)> = candidates
            .into_iter()
            .filter(|(p, _)| is_image_name(p))
            .collect();
        let checked: Vec<(PathBuf, i64, Header)> = candidates
            .into_par_iter()
            .map(|(path, label)| {
                let header = check_header(&path, &limits);
                (path, label, header)
            })
            .collect();
        let mut items = Vec::new();
        for (path, label, header) in checked {
            match header {
                Ok(size) => items.push(Item { path, label, size }),
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "skipping unreadable image");
                    skipped.push(Skipped { path, reason });
                }
            }
        }
        if items.is_empty() {
            return Err(bad(format!(
                "no readable images ({} skipped); expected class subfolders of images \
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

/// What makes two paths the same folder (symbolic links followed): its device and inode
/// on Unix, its canonical path elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DirId(#[cfg(unix)] (u64, u64), #[cfg(not(unix))] PathBuf);

#[cfg(unix)]
fn dir_id(dir: &Path) -> io::Result<DirId> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)?;
    Ok(DirId((meta.dev(), meta.ino())))
}

#[cfg(not(unix))]
fn dir_id(dir: &Path) -> io::Result<DirId> {
    std::fs::canonicalize(dir).map(DirId)
}

/// The files under one class folder, each folder read once (so a walk ends, and takes
/// as long as the folders are many, whatever the links).
struct Walk {
    /// The folders from the dataset root down to the one being read.
    above: Vec<(DirId, PathBuf)>,
    /// Every folder read, by identity: where it was first read.
    seen: HashMap<DirId, PathBuf>,
    files: Vec<PathBuf>,
    skipped: Vec<Skipped>,
}

impl Walk {
    fn new(root_id: DirId, root: &Path) -> Walk {
        Walk {
            above: vec![(root_id.clone(), root.to_path_buf())],
            seen: HashMap::from([(root_id, root.to_path_buf())]),
            files: Vec::new(),
            skipped: Vec::new(),
        }
    }

    fn skip(&mut self, dir: &Path, reason: String) {
        self.skipped.push(Skipped {
            path: dir.to_path_buf(),
            reason,
        });
    }

    /// Reads `dir`, `depth` levels below the class folder, and the folders under it.
    fn dir(&mut self, dir: &Path, depth: usize) {
        let id = match dir_id(dir) {
            Ok(id) => id,
            Err(e) => return self.skip(dir, format!("unreadable folder: {e}")),
        };
        if let Some((_, again)) = self.above.iter().find(|(a, _)| *a == id) {
            let reason = format!(
                "a symbolic-link loop: this folder is {}, which contains it",
                again.display()
            );
            return self.skip(dir, reason);
        }
        if let Some(first) = self.seen.get(&id) {
            let reason = format!("the same folder as {}, already read", first.display());
            return self.skip(dir, reason);
        }
        if depth > MAX_DEPTH {
            let reason = format!("nested more than {MAX_DEPTH} folders below its class folder");
            return self.skip(dir, reason);
        }
        self.seen.insert(id.clone(), dir.to_path_buf());
        let entries = match read_dir_sorted(dir) {
            Ok(entries) => entries,
            Err(e) => return self.skip(dir, format!("unreadable folder: {e}")),
        };
        self.above.push((id, dir.to_path_buf()));
        for p in entries {
            if p.is_dir() {
                self.dir(&p, depth + 1);
            } else {
                self.files.push(p);
            }
        }
        self.above.pop();
    }
}

/// A process-wide allowance of bytes that decoding may hold: each decode (and each header
/// read) reserves what it may need before it reads anything and waits while the rest is
/// spent. A reservation over the total is cut to the total (it then runs alone). Nothing
/// reserves while holding a reservation, so waiting cannot deadlock.
pub struct DecodeBudget {
    total: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// Bytes reserved from a [`DecodeBudget`], given back when dropped.
pub struct Reservation<'a> {
    budget: &'a DecodeBudget,
    bytes: u64,
}

impl DecodeBudget {
    pub const fn new(total: u64) -> DecodeBudget {
        DecodeBudget {
            total,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Waits until `bytes` (at most the total) are free, and takes them.
    pub fn reserve(&self, bytes: u64) -> Reservation<'_> {
        let bytes = bytes.min(self.total);
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        while *used + bytes > self.total {
            used = self
                .freed
                .wait(used)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *used += bytes;
        Reservation {
            budget: self,
            bytes,
        }
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut used = self
            .budget
            .used
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *used -= self.bytes;
        self.budget.freed.notify_all();
    }
}

/// The budget every scan and decode of this process shares.
static DECODE_BUDGET: DecodeBudget = DecodeBudget::new(DECODE_BUDGET_BYTES);

/// A file read no further than `cap` bytes (its size when it was opened): a file that
/// grows while it is read is an error, not more memory.
struct Capped<R> {
    inner: R,
    pos: u64,
    cap: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.cap.saturating_sub(self.pos);
        if left == 0 {
            // At the cap: only the end of the file may follow.
            let mut probe = [0u8; 1];
            let n = self.inner.read(&mut probe)?;
            self.pos += n as u64;
            return if n == 0 {
                Ok(0)
            } else {
                Err(io::Error::other(format!(
                    "the file grew past its size when opened ({} bytes) while it was read",
                    self.cap
                )))
            };
        }
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Seek> Seek for Capped<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }
}

type Reader = ImageReader<BufReader<Capped<File>>>;

/// Opens an image file for the decoders, within `limits`: a regular file no larger than
/// [`ImageLimits::max_file_bytes`], read no further than its size now, with the
/// decoders' limits set and its format guessed from its content (else its extension).
/// Returns the reader and the file's size.
fn open_image(path: &Path, limits: &ImageLimits) -> std::result::Result<(Reader, u64), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let len = meta.len();
    if len > limits.max_file_bytes() {
        return Err(format!(
            "the file is {len} bytes, over the {} that dataset.max_pixels = {} allows",
            limits.max_file_bytes(),
            limits.max_pixels
        ));
    }
    let capped = BufReader::new(Capped {
        inner: file,
        pos: 0,
        cap: len,
    });
    let mut reader = match ImageFormat::from_path(path) {
        Ok(format) => ImageReader::with_format(capped, format),
        Err(_) => ImageReader::new(capped),
    }
    .with_guessed_format()
    .map_err(|e| e.to_string())?;
    reader.limits(limits.decoder_limits());
    Ok((reader, len))
}

/// An image's size as its header says, or why it is skipped.
type Header = std::result::Result<(u32, u32), String>;

/// Reads `path`'s header: its size, if it is an image within `limits`.
fn check_header(path: &Path, limits: &ImageLimits) -> Header {
    let (reader, len) = open_image(path, limits)?;
    // The JPEG decoder reads the whole file to find the header.
    let _held = DECODE_BUDGET.reserve(len);
    let (w, h) = reader.into_dimensions().map_err(|e| limits.describe(e))?;
    limits.check_size(w, h)?;
    Ok((w, h))
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

/// The part of a `width` × `height` image that its base image is made from: all of it,
/// or its center cut to [`MAX_ASPECT`]:1. (x, y, w, h).
fn aspect_crop(width: u32, height: u32) -> (u32, u32, u32, u32) {
    let longest = width.min(height).saturating_mul(MAX_ASPECT);
    let (w, h) = (width.min(longest), height.min(longest));
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// The size of a `width` × `height` image resized to a shorter side of `base`.
fn base_dims(width: u32, height: u32, base: u32) -> (u32, u32) {
    let scale = base as f64 / width.min(height) as f64;
    (
        ((width as f64 * scale).round() as u32).max(base),
        ((height as f64 * scale).round() as u32).max(base),
    )
}

/// What a decode of a `width` × `height` image to a base image may hold at once: the
/// file (the JPEG decoder keeps all of it), the decoded image in the widest format and
/// its RGB copy, and the resize's buffers (it samples vertically into f32 RGBA first).
fn decode_bytes(file_bytes: u64, (width, height): (u32, u32), base: u32) -> u64 {
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
        let folder = ImageFolder::scan(root, ImageLimits::default()).unwrap();
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
        let folder = ImageFolder::scan(dir.path(), ImageLimits::default()).unwrap();
        assert_eq!(folder.num_classes(), None);
        assert_eq!(folder.items[0].label, 0);

        let empty = tempfile::tempdir().unwrap();
        let e = ImageFolder::scan(empty.path(), ImageLimits::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no readable images"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("cats/a.png"), 8, 8, [1, 2, 3]);
        std::fs::create_dir_all(dir.path().join("dogs")).unwrap();
        std::fs::write(dir.path().join("dogs/x.jpg"), b"garbage").unwrap();
        let e = ImageFolder::scan(dir.path(), ImageLimits::default())
            .unwrap_err()
            .to_string();
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
                size: (20, 14),
            },
            Item {
                path: good,
                label: 0,
                size: (20, 14),
            },
        ];
        let t = Transform {
            image_size: 8,
            augment: true,
            flip: true,
        };
        let source = ImageSource::new(items, t, true, ImageLimits::default());
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

    /// A PNG file whose header says `w` × `h` (8-bit grey) and whose body holds a few
    /// bytes: a decompression bomb's header, at no cost.
    fn write_png_header(path: &Path, w: u32, h: u32) {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in bytes {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xEDB8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
            out.extend((data.len() as u32).to_be_bytes());
            let start = out.len();
            out.extend(kind);
            out.extend(data);
            let crc = crc32(&out[start..]);
            out.extend(crc.to_be_bytes());
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend(w.to_be_bytes());
        ihdr.extend(h.to_be_bytes());
        ihdr.extend([8, 0, 0, 0, 0]);
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00]);
        chunk(&mut png, b"IEND", &[]);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// A real `w` × `h` grey PNG, one pixel thin: dark at the ends and white in the
    /// middle third.
    fn write_strip(path: &Path, w: u32, h: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let long = w.max(h);
        image::GrayImage::from_fn(w, h, |x, y| {
            image::Luma([if (long / 3..2 * long / 3).contains(&x.max(y)) {
                255
            } else {
                0
            }])
        })
        .save(path)
        .unwrap();
    }

    /// Scans on another thread; a scan that has not finished within a minute fails the
    /// test (instead of hanging it).
    fn scan_in_time(root: &Path, limits: ImageLimits) -> Result<ImageFolder> {
        let (tx, rx) = std::sync::mpsc::channel();
        let root = root.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(ImageFolder::scan(&root, limits));
        });
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("the scan did not finish within a minute")
    }

    fn reasons(folder: &ImageFolder) -> Vec<(String, String)> {
        folder
            .skipped
            .iter()
            .map(|s| {
                let rel = s.path.strip_prefix(&folder.root).unwrap_or(&s.path);
                (rel.display().to_string(), s.reason.clone())
            })
            .collect()
    }

    #[test]
    fn oversized_images_and_files_are_skipped_from_their_headers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_png(&root.join("cats/ok.png"), 8, 8, [1, 2, 3]);
        // 10 gigapixels claimed by a 70-byte file.
        write_png_header(&root.join("cats/bomb.png"), 100_000, 100_000);
        // 1 000 000 pixels, really there (a file of a few KB).
        write_strip(&root.join("cats/strip.png"), 1_000_000, 1);
        let size = std::fs::metadata(root.join("cats/strip.png"))
            .unwrap()
            .len();
        assert!(size < 20_000, "{size} bytes");

        let folder = scan_in_time(root, ImageLimits::default()).unwrap();
        let names: Vec<_> = folder.items.iter().map(|i| file_name(&i.path)).collect();
        assert_eq!(names, ["ok.png", "strip.png"]);
        assert_eq!(folder.items[1].size, (1_000_000, 1));
        let skipped = reasons(&folder);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].0, "cats/bomb.png");
        assert!(
            skipped[0].1.contains("100000×100000") && skipped[0].1.contains("dataset.max_pixels"),
            "{skipped:?}"
        );
        assert_eq!(folder.summary().skipped_count, 1);

        // A lower limit: the strip is over it too.
        let small = ImageLimits {
            max_pixels: 500_000,
        };
        let folder = scan_in_time(root, small).unwrap();
        assert_eq!(folder.items.len(), 1);
        let skipped = reasons(&folder);
        assert_eq!(skipped[1].0, "cats/strip.png", "{skipped:?}");
        assert!(
            skipped[1]
                .1
                .contains("a side of the image is over 500000 pixels"),
            "{skipped:?}"
        );

        // A file larger than any image within the limit is not read at all (the JPEG
        // decoder would read all of it): a sparse file, so the test writes nothing.
        let tiny = ImageLimits { max_pixels: 1000 };
        let huge = std::fs::File::create(root.join("cats/huge.jpg")).unwrap();
        huge.set_len(tiny.max_file_bytes() + 1).unwrap();
        let folder = scan_in_time(root, tiny).unwrap();
        let skipped = reasons(&folder);
        let huge = skipped.iter().find(|(p, _)| p == "cats/huge.jpg").unwrap();
        assert!(
            huge.1.contains("bytes, over the") && huge.1.contains("dataset.max_pixels = 1000"),
            "{skipped:?}"
        );
    }

    #[test]
    fn decoding_checks_the_header_again_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
        write_png(&a, 8, 8, [10, 20, 30]);
        write_png(&b, 8, 8, [200, 0, 0]);
        let folder = ImageFolder::scan(dir.path(), ImageLimits::default()).unwrap();
        assert_eq!(folder.items.len(), 2);
        // After the scan, a.png becomes a bomb's header and b.png another image.
        write_png_header(&a, 100_000, 100_000);
        write_png(&b, 9, 8, [200, 0, 0]);
        let limits = ImageLimits::default();
        let e = decode_base(&folder.items[0], 10, &limits).unwrap_err();
        assert!(e.contains("dataset.max_pixels"), "{e}");
        let e = decode_base(&folder.items[1], 10, &limits).unwrap_err();
        assert!(e.contains("9×8 now"), "{e}");
        // Through the source: both are skipped and counted, none is decoded.
        let t = Transform {
            image_size: 8,
            augment: false,
            flip: false,
        };
        let source = ImageSource::new(folder.items.clone(), t, false, limits);
        let mut out = vec![0f32; t.sample_len()];
        assert_eq!(source.sample(0, 1, &mut out), None);
        assert_eq!(source.broken_count(), 2);
    }

    #[test]
    fn thin_images_are_cut_to_two_to_one_before_the_resize() {
        let dir = tempfile::tempdir().unwrap();
        let strip = dir.path().join("strip.png");
        write_strip(&strip, 1, 50_000);
        let item = Item {
            path: strip,
            label: 0,
            size: (1, 50_000),
        };
        let base = decode_base(&item, 10, &ImageLimits::default()).unwrap();
        // Not 10 × 500 000: the center 1 × 2 is what is resized.
        assert_eq!(base.dimensions(), (10, 20));
        assert!(base.pixels().all(|p| p.0 == [255; 3]), "the white middle");
        let t = Transform {
            image_size: 8,
            augment: true,
            flip: true,
        };
        let source = ImageSource::new(vec![item], t, true, ImageLimits::default());
        let mut out = vec![0f32; t.sample_len()];
        assert_eq!(source.sample(0, 3, &mut out), Some(0));
        assert!(out.iter().all(|v| *v == 1.0));

        // Up to 2:1 an image is resized whole, as before.
        let mut img = RgbImage::new(30, 16);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 8) as u8, (y * 15) as u8, 7]);
        }
        let path = dir.path().join("wide.png");
        img.save(&path).unwrap();
        let item = Item {
            path,
            label: 0,
            size: (30, 16),
        };
        let base = decode_base(&item, 10, &ImageLimits::default()).unwrap();
        let whole = image::imageops::resize(&img, 19, 10, FilterType::Triangle);
        assert_eq!(base, whole);
        // 3:1 keeps the center 2:1.
        let wider = image::imageops::resize(&img, 48, 16, FilterType::Nearest);
        wider.save(&item.path).unwrap();
        let item = Item {
            size: (48, 16),
            ..item
        };
        let base = decode_base(&item, 16, &ImageLimits::default()).unwrap();
        assert_eq!(
            base,
            image::imageops::crop_imm(&wider, 8, 0, 32, 16).to_image()
        );
    }

    #[cfg(unix)]
    #[test]
    fn symlink_loops_and_repeated_folders_are_skipped_and_listed() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        write_png(&root.join("cats/a.png"), 8, 8, [1, 2, 3]);
        write_png(&root.join("cats/sub/b.png"), 8, 8, [1, 2, 3]);
        write_png(&root.join("dogs/c.png"), 8, 8, [1, 2, 3]);
        write_png(&dir.path().join("elsewhere/d.png"), 8, 8, [1, 2, 3]);
        // Loops: to the dataset root, to the class folder, to the folder itself.
        symlink("..", root.join("cats/loop")).unwrap();
        symlink("..", root.join("cats/sub/up")).unwrap();
        symlink(".", root.join("cats/sub/self")).unwrap();
        // Two links to one folder outside the dataset: read once.
        symlink("../../elsewhere", root.join("dogs/x")).unwrap();
        symlink("../../elsewhere", root.join("dogs/y")).unwrap();

        let folder = scan_in_time(&root, ImageLimits::default()).unwrap();
        let items: Vec<_> = folder
            .items
            .iter()
            .map(|i| {
                let rel = i.path.strip_prefix(&root).unwrap();
                (rel.display().to_string(), i.label)
            })
            .collect();
        let expected = [
            ("cats/a.png", 0),
            ("cats/sub/b.png", 0),
            ("dogs/c.png", 1),
            ("dogs/x/d.png", 1),
        ];
        assert_eq!(items, expected.map(|(p, l)| (p.to_string(), l)));
        let skipped = reasons(&folder);
        let paths: Vec<&str> = skipped.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["cats/loop", "cats/sub/self", "cats/sub/up", "dogs/y"],
            "{skipped:?}"
        );
        for (path, reason) in &skipped[..3] {
            assert!(reason.contains("symbolic-link loop"), "{path}: {reason}");
        }
        assert!(skipped[3].1.contains("same folder as"), "{skipped:?}");
        assert_eq!(folder.summary().skipped_count, 4);
    }

    #[test]
    fn folders_nested_too_deep_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_png(&root.join("cats/a.png"), 8, 8, [1, 2, 3]);
        let mut deep = root.join("cats");
        for level in 1..=MAX_DEPTH + 1 {
            deep.push(format!("{level}"));
            write_png(&deep.join("x.png"), 8, 8, [1, 2, 3]);
        }
        let folder = scan_in_time(root, ImageLimits::default()).unwrap();
        // Levels 1..=MAX_DEPTH are read; the one below is not.
        assert_eq!(folder.items.len(), 1 + MAX_DEPTH);
        let skipped = reasons(&folder);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].0.ends_with(&format!("/{}", MAX_DEPTH + 1)));
        assert!(skipped[0].1.contains("nested more than"), "{skipped:?}");
    }

    #[test]
    fn the_decode_budget_makes_what_does_not_fit_wait() {
        let budget = Arc::new(DecodeBudget::new(100));
        let first = budget.reserve(80);
        let (tx, rx) = std::sync::mpsc::channel();
        let b = budget.clone();
        let waiter = std::thread::spawn(move || {
            let held = b.reserve(50);
            tx.send(()).unwrap();
            drop(held);
        });
        let wait = std::time::Duration::from_millis(200);
        assert!(rx.recv_timeout(wait).is_err(), "50 more do not fit in 100");
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("freed bytes wake the waiter");
        waiter.join().unwrap();
        assert_eq!(budget.used(), 0);
        // More than the whole budget: cut to it, so it runs alone rather than never.
        let all = budget.reserve(1 << 40);
        assert_eq!(budget.used(), 100);
        drop(all);
    }

    #[test]
    fn files_are_not_read_past_their_size_when_opened() {
        let mut capped = Capped {
            inner: std::io::Cursor::new(vec![7u8; 10]),
            pos: 0,
            cap: 6,
        };
        let mut out = Vec::new();
        let e = capped.read_to_end(&mut out).unwrap_err();
        assert!(e.to_string().contains("grew"), "{e}");
        assert!(out.len() <= 6);
        let mut exact = Capped {
            inner: std::io::Cursor::new(vec![7u8; 6]),
            pos: 0,
            cap: 6,
        };
        let mut out = Vec::new();
        exact.read_to_end(&mut out).unwrap();
        assert_eq!(out.len(), 6);
    }
}
