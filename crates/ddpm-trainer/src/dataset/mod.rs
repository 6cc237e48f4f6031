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
    io,
    path::{Path, PathBuf},
};

use image::ImageFormat;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainerError};

mod decode;
mod limits;

pub use self::{decode::*, limits::*};

/// How many skipped files a summary lists by name (all are counted).
const LISTED_SKIPS: usize = 20;

/// One training image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
        if !root.exists() {
            // Often a volume that is not mounted (yet): worth retrying, unlike a file.
            return Err(TrainerError::DatasetUnavailable {
                path: root.to_path_buf(),
                message: "does not exist (a volume not mounted?)".into(),
            });
        }
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

pub(crate) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(crate) fn is_hidden(p: &Path) -> bool {
    file_name(p).starts_with('.')
}

/// Whether the name says image (an extension `image` knows); other files (READMEs, label
/// lists) are not candidates at all.
pub(crate) fn is_image_name(p: &Path) -> bool {
    p.is_file() && ImageFormat::from_path(p).is_ok()
}

/// Non-hidden entries of `dir`, sorted by name.
pub(crate) fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
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
pub(crate) struct DirId(#[cfg(unix)] (u64, u64), #[cfg(not(unix))] PathBuf);

#[cfg(unix)]
pub(crate) fn dir_id(dir: &Path) -> io::Result<DirId> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)?;
    Ok(DirId((meta.dev(), meta.ino())))
}

#[cfg(not(unix))]
pub(crate) fn dir_id(dir: &Path) -> io::Result<DirId> {
    std::fs::canonicalize(dir).map(DirId)
}

/// The files under one class folder, each folder read once (so a walk ends, and takes
/// as long as the folders are many, whatever the links).
pub(crate) struct Walk {
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

#[cfg(test)]
mod tests {
    use super::*;
    use image::{imageops::FilterType, RgbImage};
    use rand::SeedableRng;
    use rand_pcg::Pcg64Mcg;
    use std::{io::Read, sync::Arc};

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
