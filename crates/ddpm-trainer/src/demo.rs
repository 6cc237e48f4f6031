//! The demo dataset: a few classes of visually distinct generated images, so that a
//! first run needs nothing from outside. Each class is a shape in its own colour on a
//! dark, slightly noisy background, with random position, size and shade. [`varied`] is
//! a harder set with real variation within each class (shape only: any colour, rotation,
//! size, textured backgrounds, sub-modes), for the sampler benchmark.

pub mod varied;

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::{
    dataset::mix,
    error::{Result, TrainerError},
};

/// Class names in order; `classes` takes the first K.
pub const DEMO_CLASSES: [&str; 8] = [
    "circle", "square", "stripes", "cross", "ring", "checker", "triangle", "diagonal",
];

/// Each class's colour (RGB).
const COLOURS: [[f32; 3]; 8] = [
    [230.0, 50.0, 50.0],
    [50.0, 200.0, 60.0],
    [60.0, 90.0, 240.0],
    [240.0, 220.0, 40.0],
    [220.0, 60.0, 220.0],
    [40.0, 220.0, 220.0],
    [250.0, 140.0, 30.0],
    [235.0, 235.0, 235.0],
];

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoSpec {
    /// Side of each (square) image, in pixels.
    pub size: u32,
    pub per_class: usize,
    pub classes: usize,
    pub seed: u64,
}

impl Default for DemoSpec {
    fn default() -> Self {
        DemoSpec {
            size: 16,
            per_class: 64,
            classes: 4,
            seed: 0,
        }
    }
}

/// Whether pixel (x, y) (in [0, 1]² coordinates) is inside class `c`'s shape centred at
/// (cx, cy) with half-size r.
fn inside(c: usize, x: f32, y: f32, cx: f32, cy: f32, r: f32) -> bool {
    let (dx, dy) = (x - cx, y - cy);
    match c {
        0 => dx * dx + dy * dy <= r * r,
        1 => dx.abs() <= r && dy.abs() <= r,
        2 => ((y * 8.0).floor() as i32) % 2 == 0,
        3 => (dx.abs() <= r * 0.3 && dy.abs() <= r) || (dy.abs() <= r * 0.3 && dx.abs() <= r),
        4 => {
            let d = (dx * dx + dy * dy).sqrt();
            d <= r && d >= r * 0.55
        }
        5 => (((x * 4.0).floor() + (y * 4.0).floor()) as i32) % 2 == 0,
        6 => dy <= r && dy >= -r && dx.abs() <= (dy + r) * 0.5,
        _ => ((x - y) * 5.0).rem_euclid(1.0) < 0.5,
    }
}

/// One image of class `c`.
pub fn demo_image(c: usize, size: u32, rng: &mut impl Rng) -> RgbImage {
    let colour = COLOURS[c % COLOURS.len()];
    let shade: f32 = rng.random_range(0.75..=1.0);
    let cx: f32 = rng.random_range(0.35..=0.65);
    let cy: f32 = rng.random_range(0.35..=0.65);
    let r: f32 = rng.random_range(0.2..=0.32);
    let bg: f32 = rng.random_range(10.0..=40.0);
    let mut img = RgbImage::new(size, size);
    for (px, py, p) in img.enumerate_pixels_mut() {
        let (x, y) = (
            (px as f32 + 0.5) / size as f32,
            (py as f32 + 0.5) / size as f32,
        );
        let noise: f32 = rng.random_range(-8.0..=8.0);
        let rgb = if inside(c, x, y, cx, cy, r) {
            colour.map(|v| v * shade + noise)
        } else {
            [bg + noise; 3]
        };
        *p = Rgb(rgb.map(|v| v.clamp(0.0, 255.0) as u8));
    }
    img
}

/// Writes `out/<class>/<nnnn>.png` of the demo shapes; returns the class folders written.
pub fn write_demo_dataset(out: &Path, spec: &DemoSpec) -> Result<Vec<PathBuf>> {
    write_dataset(out, spec, &DEMO_CLASSES, demo_image)
}

/// Writes `out/<class>/<nnnn>.png` of the varied shapes ([`varied`]); returns the class
/// folders written. `spec.classes` is at most [`varied::VARIED_CLASSES`]' length.
pub fn write_varied_dataset(out: &Path, spec: &DemoSpec) -> Result<Vec<PathBuf>> {
    write_dataset(out, spec, &varied::VARIED_CLASSES, |c, size, rng| {
        varied::varied_image(c, size, rng)
    })
}

/// `spec.per_class` images of each of the first `spec.classes` of `names`, class c drawn
/// by `draw(c, size, rng)` from a generator seeded by (seed, c).
fn write_dataset(
    out: &Path,
    spec: &DemoSpec,
    names: &[&str],
    draw: impl Fn(usize, u32, &mut Pcg64Mcg) -> RgbImage,
) -> Result<Vec<PathBuf>> {
    if spec.classes == 0 || spec.classes > names.len() {
        return Err(TrainerError::config(
            "classes",
            format!("must be in 1..={}", names.len()),
        ));
    }
    if spec.size < 4 {
        return Err(TrainerError::config("size", "must be at least 4 pixels"));
    }
    if spec.per_class == 0 {
        return Err(TrainerError::config("per-class", "must be at least 1"));
    }
    let mut dirs = Vec::new();
    for (c, name) in names.iter().enumerate().take(spec.classes) {
        let dir = out.join(name);
        std::fs::create_dir_all(&dir).map_err(TrainerError::io(&dir))?;
        let mut rng = Pcg64Mcg::seed_from_u64(mix(spec.seed, c as u64));
        for i in 0..spec.per_class {
            let path = dir.join(format!("{i:04}.png"));
            draw(c, spec.size, &mut rng)
                .save(&path)
                .map_err(|source| TrainerError::Image {
                    path: path.clone(),
                    source,
                })?;
        }
        dirs.push(dir);
    }
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::ImageFolder;

    #[test]
    fn writes_a_scannable_dataset_with_distinct_classes() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DemoSpec {
            size: 16,
            per_class: 5,
            classes: 3,
            seed: 1,
        };
        write_demo_dataset(dir.path(), &spec).unwrap();
        let folder = ImageFolder::scan(dir.path(), Default::default()).unwrap();
        assert_eq!(folder.class_names, ["circle", "square", "stripes"]);
        assert_eq!(folder.items.len(), 15);
        // Mean colours differ by class: red dominates circles, green squares, blue stripes.
        for (c, channel) in [(0usize, 0usize), (1, 1), (2, 2)] {
            let img = image::open(dir.path().join(DEMO_CLASSES[c]).join("0000.png"))
                .unwrap()
                .into_rgb8();
            let mut sums = [0u64; 3];
            for p in img.pixels() {
                for k in 0..3 {
                    sums[k] += p[k] as u64;
                }
            }
            let max = (0..3).max_by_key(|&k| sums[k]).unwrap();
            assert_eq!(max, channel, "class {c}: {sums:?}");
        }
        assert!(write_demo_dataset(dir.path(), &DemoSpec { classes: 0, ..spec }).is_err());
    }

    #[test]
    fn writes_the_varied_shapes_as_a_scannable_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DemoSpec {
            size: 16,
            per_class: 3,
            classes: 8,
            seed: 2,
        };
        write_varied_dataset(dir.path(), &spec).unwrap();
        let folder = ImageFolder::scan(dir.path(), Default::default()).unwrap();
        let mut names = varied::VARIED_CLASSES.to_vec();
        names.sort();
        assert_eq!(folder.class_names, names);
        assert_eq!(folder.items.len(), 24);
        // The same spec writes the same files.
        let again = tempfile::tempdir().unwrap();
        write_varied_dataset(again.path(), &spec).unwrap();
        let path = |root: &Path| root.join("ring").join("0002.png");
        assert_eq!(
            std::fs::read(path(dir.path())).unwrap(),
            std::fs::read(path(again.path())).unwrap()
        );
        assert!(write_varied_dataset(dir.path(), &DemoSpec { classes: 9, ..spec }).is_err());
    }
}
