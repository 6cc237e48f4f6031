//! The varied shapes: a harder generated data set than the demo's, with real variation
//! within each class, made to tell samplers apart (BENCHMARKS.md, "Samplers: quality per
//! network evaluation").
//!
//! The demo classes are each one shape in one colour on a near-black background, so a
//! sampler that draws every sample of a class alike loses little. Here a class is a
//! shape only. Every image draws, independently of its class:
//!
//! - one of three **sub-modes** ([`SUB_MODES`]): a large shape near the centre on a
//!   linear gradient; a small shape anywhere on a noise texture; a medium shape on
//!   stripes of random angle and frequency;
//! - a **rotation** in [0, 2π), a **position** and a **size** within its sub-mode's range;
//! - a **colour** of any hue, lightened until its luminance is at least
//!   [`MIN_SHAPE_LUMA`], and a background colour of any hue darkened to a luminance of at
//!   most [`MAX_BACKGROUND_LUMA`], so that the shape stands out in luminance (the class
//!   probe sees luminance only) whatever the hues;
//!
//! and each pixel is the mean of 4×4 sub-pixel samples (anti-aliased edges, so size and
//! position vary continuously), plus a little pixel noise.

use image::{Rgb, RgbImage};
use rand::Rng;

/// Class names in order; a spec's `classes` takes the first K.
pub const VARIED_CLASSES: [&str; 8] = [
    "disc", "square", "triangle", "plus", "ring", "bar", "crescent", "pair",
];

/// Sub-modes of every class (the background and size ranges above).
pub const SUB_MODES: usize = 3;

/// Least luminance (Rec. 601, in [0, 1]) of a shape's colour.
pub const MIN_SHAPE_LUMA: f32 = 0.55;

/// Most luminance of a background's colour (before its texture's modulation).
pub const MAX_BACKGROUND_LUMA: f32 = 0.3;

/// Sub-pixel samples per side of a pixel.
const SUPERSAMPLE: u32 = 4;

fn luma(rgb: [f32; 3]) -> f32 {
    0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
}

/// A colour of hue `h` in [0, 1), saturation `s` and value `v` (all in [0, 1]).
fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h6 = (h.rem_euclid(1.0)) * 6.0;
    let f = h6 - h6.floor();
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match h6.floor() as i32 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// A random saturated colour, mixed with white until its luminance reaches `min_luma`.
fn bright_colour(rng: &mut impl Rng) -> [f32; 3] {
    let c = hsv(
        rng.random_range(0.0..1.0),
        rng.random_range(0.4..=1.0),
        rng.random_range(0.8..=1.0),
    );
    let l = luma(c);
    if l >= MIN_SHAPE_LUMA {
        return c;
    }
    // luma(c + k·(1 − c)) = l + k·(1 − l) reaches the minimum at k = (min − l)/(1 − l).
    let k = (MIN_SHAPE_LUMA - l) / (1.0 - l) + rng.random_range(0.0..=0.15);
    c.map(|v| v + k.min(1.0) * (1.0 - v))
}

/// A random colour scaled down to a luminance of at most `MAX_BACKGROUND_LUMA`.
fn dark_colour(rng: &mut impl Rng) -> [f32; 3] {
    let c = hsv(
        rng.random_range(0.0..1.0),
        rng.random_range(0.2..=0.9),
        rng.random_range(0.3..=1.0),
    );
    let target = rng.random_range(0.05..=MAX_BACKGROUND_LUMA);
    let l = luma(c).max(1e-3);
    c.map(|v| v * (target / l).min(1.0))
}

/// Whether (u, v), a point in the shape's own frame (rotated, centred, in units of its
/// half-size r = 1), is inside class `c`'s shape.
fn inside(c: usize, u: f32, v: f32) -> bool {
    let d = (u * u + v * v).sqrt();
    match c {
        0 => d <= 1.0,
        1 => u.abs() <= 0.85 && v.abs() <= 0.85,
        // An equilateral triangle with its centroid at the origin.
        2 => (-0.5..=1.0).contains(&v) && u.abs() <= (1.0 - v) / 3f32.sqrt(),
        3 => (u.abs() <= 0.3 && v.abs() <= 1.0) || (v.abs() <= 0.3 && u.abs() <= 1.0),
        4 => (0.55..=1.0).contains(&d),
        5 => u.abs() <= 1.0 && v.abs() <= 0.28,
        6 => d <= 1.0 && ((u - 0.45).powi(2) + v * v).sqrt() > 0.8,
        _ => {
            ((u - 0.55).powi(2) + v * v).sqrt() <= 0.42
                || ((u + 0.55).powi(2) + v * v).sqrt() <= 0.42
        }
    }
}

/// One image of class `c` (any `c`; taken modulo the class count).
pub fn varied_image(c: usize, size: u32, rng: &mut impl Rng) -> RgbImage {
    let c = c % VARIED_CLASSES.len();
    let mode = rng.random_range(0..SUB_MODES);
    let (r_range, centre_range) = match mode {
        0 => (0.30..=0.40, 0.4..=0.6),
        1 => (0.16..=0.22, 0.25..=0.75),
        _ => (0.22..=0.30, 0.33..=0.67),
    };
    let r: f32 = rng.random_range(r_range);
    let (cx, cy): (f32, f32) = (
        rng.random_range(centre_range.clone()),
        rng.random_range(centre_range),
    );
    let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (sin, cos) = angle.sin_cos();
    let fg = bright_colour(rng);
    let bg = dark_colour(rng);
    // The texture: a brightness factor in about [0.6, 1.4] of the position.
    let stripe_angle: f32 = rng.random_range(0.0..std::f32::consts::PI);
    let frequency: f32 = rng.random_range(2.0..=5.0);
    let phase: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let grain: Vec<f32> = (0..size * size)
        .map(|_| rng.random_range(-0.35..=0.35))
        .collect();
    let texture = |x: f32, y: f32, pixel: usize| -> f32 {
        let along = x * stripe_angle.cos() + y * stripe_angle.sin();
        match mode {
            0 => 0.6 + 0.8 * along.clamp(0.0, 1.0),
            1 => 1.0 + grain[pixel],
            _ => 1.0 + 0.35 * (along * frequency * std::f32::consts::TAU + phase).sin(),
        }
    };
    let mut img = RgbImage::new(size, size);
    let n = SUPERSAMPLE as f32;
    for (px, py, p) in img.enumerate_pixels_mut() {
        let pixel = (py * size + px) as usize;
        let mut coverage = 0.0;
        for sy in 0..SUPERSAMPLE {
            for sx in 0..SUPERSAMPLE {
                let x = (px as f32 + (sx as f32 + 0.5) / n) / size as f32;
                let y = (py as f32 + (sy as f32 + 0.5) / n) / size as f32;
                let (dx, dy) = ((x - cx) / r, (y - cy) / r);
                let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
                if inside(c, u, v) {
                    coverage += 1.0;
                }
            }
        }
        let coverage = coverage / (n * n);
        let (x, y) = (
            (px as f32 + 0.5) / size as f32,
            (py as f32 + 0.5) / size as f32,
        );
        let shade = texture(x, y, pixel);
        let noise: f32 = rng.random_range(-5.0..=5.0);
        let rgb: [f32; 3] = std::array::from_fn(|k| {
            let back = bg[k] * shade;
            (coverage * fg[k] + (1.0 - coverage) * back) * 255.0 + noise
        });
        *p = Rgb(rgb.map(|v| v.clamp(0.0, 255.0) as u8));
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_pcg::Pcg64Mcg;

    fn luma_of(img: &RgbImage) -> Vec<f32> {
        img.pixels()
            .map(|p| luma([p[0] as f32, p[1] as f32, p[2] as f32].map(|v| v / 255.0)))
            .collect()
    }

    #[test]
    fn colours_keep_the_shape_brighter_than_its_background() {
        let mut rng = Pcg64Mcg::seed_from_u64(3);
        for _ in 0..500 {
            assert!(luma(bright_colour(&mut rng)) >= MIN_SHAPE_LUMA - 1e-4);
            assert!(luma(dark_colour(&mut rng)) <= MAX_BACKGROUND_LUMA + 1e-4);
        }
        assert_eq!(hsv(0.0, 1.0, 1.0), [1.0, 0.0, 0.0]);
        assert_eq!(hsv(2.0 / 6.0, 1.0, 1.0), [0.0, 1.0, 0.0]);
    }

    #[test]
    fn every_class_has_its_own_shape_and_the_shapes_differ() {
        // The shapes' masks on a 33 × 33 grid over [−1.2, 1.2]²: each covers a fair share
        // of its box and no two are alike.
        let masks: Vec<Vec<bool>> = (0..VARIED_CLASSES.len())
            .map(|c| {
                (0..33 * 33)
                    .map(|i| {
                        let (u, v) = ((i % 33) as f32, (i / 33) as f32);
                        inside(c, u / 16.0 * 1.2 - 1.2, v / 16.0 * 1.2 - 1.2)
                    })
                    .collect()
            })
            .collect();
        for (c, m) in masks.iter().enumerate() {
            let share = m.iter().filter(|&&b| b).count() as f64 / m.len() as f64;
            assert!((0.1..0.75).contains(&share), "class {c}: {share}");
            for (d, other) in masks.iter().enumerate().skip(c + 1) {
                let differ = m.iter().zip(other).filter(|(a, b)| a != b).count();
                assert!(differ > 40, "classes {c} and {d} differ in {differ} points");
            }
        }
    }

    #[test]
    fn images_of_a_class_vary_and_are_repeatable() {
        let draw = |seed| {
            let mut rng = Pcg64Mcg::seed_from_u64(seed);
            (0..40)
                .map(|_| varied_image(2, 16, &mut rng))
                .collect::<Vec<_>>()
        };
        let images = draw(5);
        assert_eq!(images, draw(5), "the same seed draws the same images");
        assert_ne!(images, draw(6));
        // Within one class: the brightest pixels (the shape) sit in many places, and the
        // mean colours spread over several hues.
        let mut brightest = std::collections::BTreeSet::new();
        let mut dominant = [0usize; 3];
        for img in &images {
            assert_eq!(img.dimensions(), (16, 16));
            let l = luma_of(img);
            let (at, _) =
                l.iter().enumerate().fold(
                    (0, f32::MIN),
                    |best, (i, &v)| if v > best.1 { (i, v) } else { best },
                );
            brightest.insert(at);
            // The shape is brighter than the image's darkest quarter.
            let mut sorted = l.clone();
            sorted.sort_by(f32::total_cmp);
            assert!(
                sorted[255] > sorted[64] + 0.15,
                "{:?}",
                (sorted[64], sorted[255])
            );
            let (x, y) = ((at % 16) as u32, (at / 16) as u32);
            let p = img.get_pixel(x, y);
            let k = (0..3).max_by_key(|&k| p[k]).unwrap_or(0);
            dominant[k] += 1;
        }
        assert!(
            brightest.len() >= 20,
            "{} distinct positions",
            brightest.len()
        );
        assert!(dominant.iter().all(|&n| n >= 3), "{dominant:?}");
    }
}
