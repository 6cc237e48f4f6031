//! The sample grid written beside each EMA checkpoint: one row per class (one row for
//! an unconditional model), drawn from the EMA model with DDIM and guidance.

use ddpm_core::{
    sampler::{sample, to_uint8},
    tile::Tiling,
    Model, NoiseSchedule, SampleSpec, SamplerConfig,
};
use image::RgbImage;
use tch::{Kind, Tensor};

use crate::{dataset::mix, error::Result};

/// Pixels between (and around) the tiles.
const PAD: u32 = 2;
/// Samples per forward pass.
const MAX_BATCH: usize = 128;

/// What the grid shows.
#[derive(Debug, Clone, Copy)]
pub struct GridSpec {
    pub per_class: i64,
    /// DDIM steps.
    pub steps: usize,
    pub guidance_scale: f64,
    pub seed: u64,
}

/// Draws the grid's samples and tiles them.
pub fn sample_grid(model: &Model, schedule: &NoiseSchedule, spec: &GridSpec) -> Result<RgbImage> {
    let rows: Vec<Option<i64>> = match model.config().num_classes {
        Some(n) => (0..n).map(Some).collect(),
        None => vec![None],
    };
    let cols = spec.per_class.max(1) as u32;
    let specs: Vec<SampleSpec> = rows
        .iter()
        .enumerate()
        .flat_map(|(r, label)| {
            (0..cols).map(move |c| SampleSpec {
                label: *label,
                guidance_scale: if label.is_some() {
                    spec.guidance_scale
                } else {
                    1.0
                },
                // The same seeds at every checkpoint, so grids show progress, not noise.
                seed: mix(spec.seed, ((r as u64) << 32) | c as u64),
                sampler: SamplerConfig::ddim(spec.steps),
            })
        })
        .collect();
    let images = tch::no_grad(|| sample(model, schedule, &specs, MAX_BATCH))?; // [N, 3, S, S]
    tile_images(&images, cols, 1)
}

/// `images: [N, C, S, S]` in [−1, 1] (C = 1 or 3) tiled in rows of `columns`, in order,
/// each enlarged `scale`× (nearest neighbour); N a multiple of `columns`.
pub fn tile_images(images: &Tensor, columns: u32, scale: u32) -> Result<RgbImage> {
    let pixels = to_uint8(images)?
        .permute([0, 2, 3, 1])
        .to_kind(Kind::Uint8)
        .contiguous(); // [N, S, S, C] on the CPU
    let size = pixels.size();
    let (n, s, channels) = (size[0] as u32, size[1] as u32, size[3]);
    let columns = columns.max(1);
    if n % columns != 0 {
        return Err(crate::error::TrainerError::config(
            "columns",
            format!("{n} images do not fill rows of {columns}"),
        ));
    }
    let data = Vec::<u8>::try_from(pixels.view([-1]))?;
    let tiling = Tiling {
        columns,
        rows: n / columns,
        image_width: s,
        image_height: s,
        scale: scale.max(1),
        pad: PAD,
        caption_height: 0,
    };
    let per_image = (s * s) as usize * channels as usize;
    let canvas = tiling.draw(
        data.chunks_exact(per_image)
            .map(|tile| (tile, channels as u8)),
    );
    let grid = RgbImage::from_raw(tiling.width(), tiling.height(), canvas)
        .expect("the canvas holds width × height RGB pixels");
    Ok(grid)
}

/// The image as PNG bytes.
pub fn png_bytes(img: &RgbImage) -> std::result::Result<Vec<u8>, image::ImageError> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_core::ScheduleConfig;
    use ddpm_testkit_model::micro_config;
    use tch::Device;

    #[test]
    fn one_row_per_class() {
        let model = Model::new(&micro_config(3), Device::Cpu).unwrap();
        let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
        let spec = GridSpec {
            per_class: 4,
            steps: 3,
            guidance_scale: 3.0,
            seed: 0,
        };
        let grid = sample_grid(&model, &schedule, &spec).unwrap();
        assert_eq!(grid.dimensions(), (2 + 4 * 10, 2 + 3 * 10));
        let png = png_bytes(&grid).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }

    #[test]
    fn tiles_enlarge_and_keep_their_order() {
        // Two 2×2 images, black then white, side by side at 3×.
        let images = Tensor::cat(
            &[
                Tensor::full([1, 3, 2, 2], -1.0, (Kind::Float, Device::Cpu)),
                Tensor::full([1, 3, 2, 2], 1.0, (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let grid = tile_images(&images, 2, 3).unwrap();
        assert_eq!(grid.dimensions(), (3 * PAD + 2 * 6, 2 * PAD + 6));
        assert_eq!(grid.get_pixel(PAD + 5, PAD + 5).0, [0, 0, 0]);
        assert_eq!(grid.get_pixel(2 * PAD + 6, PAD).0, [255, 255, 255]);
        assert!(
            tile_images(&images, 3, 1).is_err(),
            "2 images do not fill a row of 3"
        );
    }
}
