//! Bounds on reading untrusted images: the pixel and file-size limits checked from the
//! header, the decoders' own limits, files never read past their size when opened, and
//! the process-wide decoding budget (see the parent module's doc).

use std::{
    fs::File,
    io::{self, BufReader, Read, Seek, SeekFrom},
    path::Path,
    sync::{Condvar, Mutex, PoisonError},
};

use image::{error::LimitErrorKind, ImageError, ImageFormat, ImageReader};

/// The default [`ImageLimits::max_pixels`]: 64 Mi pixels (8192 × 8192, above the
/// 61-megapixel output of the largest common cameras). Decoded at the widest pixel format
/// the enabled decoders produce (16-bit RGBA, 8 bytes a pixel), that is 512 MiB: the
/// `image` crate's own default allocation limit.
pub const DEFAULT_MAX_PIXELS: u64 = 1 << 26;

/// Bytes a pixel takes in the widest format the enabled decoders produce (16-bit RGBA).
pub(crate) const MAX_BYTES_PER_PIXEL: u64 = 8;

/// Bytes beyond the pixels that a file or a decoder may use: headers, ICC profiles,
/// EXIF, text chunks.
pub(crate) const METADATA_ALLOWANCE: u64 = 16 << 20;

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
    pub(crate) fn decoder_limits(&self) -> image::Limits {
        let side = u32::try_from(self.max_pixels).unwrap_or(u32::MAX);
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(side);
        limits.max_image_height = Some(side);
        limits.max_alloc = Some(self.max_file_bytes());
        limits
    }

    /// An image of `width` × `height` is usable.
    pub(crate) fn check_size(&self, width: u32, height: u32) -> std::result::Result<(), String> {
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
    pub(crate) fn describe(&self, e: ImageError) -> String {
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
pub(crate) static DECODE_BUDGET: DecodeBudget = DecodeBudget::new(DECODE_BUDGET_BYTES);

/// A file read no further than `cap` bytes (its size when it was opened): a file that
/// grows while it is read is an error, not more memory.
pub(crate) struct Capped<R> {
    pub(crate) inner: R,
    pub(crate) pos: u64,
    pub(crate) cap: u64,
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

pub(crate) type Reader = ImageReader<BufReader<Capped<File>>>;

/// Opens an image file for the decoders, within `limits`: a regular file no larger than
/// [`ImageLimits::max_file_bytes`], read no further than its size now, with the
/// decoders' limits set and its format guessed from its content (else its extension).
/// Returns the reader and the file's size.
pub(crate) fn open_image(
    path: &Path,
    limits: &ImageLimits,
) -> std::result::Result<(Reader, u64), String> {
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
pub(crate) type Header = std::result::Result<(u32, u32), String>;

/// Reads `path`'s header: its size, if it is an image within `limits`.
pub(crate) fn check_header(path: &Path, limits: &ImageLimits) -> Header {
    let (reader, len) = open_image(path, limits)?;
    // The JPEG decoder reads the whole file to find the header.
    let _held = DECODE_BUDGET.reserve(len);
    let (w, h) = reader.into_dimensions().map_err(|e| limits.describe(e))?;
    limits.check_size(w, h)?;
    Ok((w, h))
}
