//! Equal images tiled row-major on a white RGB canvas: the trainer's sample grids and the
//! server's grid responses. Pure byte arithmetic; encoding (PNG) and captions are the
//! callers'.

/// Where the cells of a grid go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    pub columns: u32,
    pub rows: u32,
    /// Size of each image before enlargement.
    pub image_width: u32,
    pub image_height: u32,
    /// Integer enlargement of each image (nearest neighbour); 1 keeps it as it is.
    pub scale: u32,
    /// Pixels between the cells and around them.
    pub pad: u32,
    /// Blank rows under each enlarged image, for a caption.
    pub caption_height: u32,
}

impl Tiling {
    /// A cell: the enlarged image and its caption strip.
    pub fn cell_width(&self) -> u32 {
        self.image_width * self.scale
    }

    pub fn cell_height(&self) -> u32 {
        self.image_height * self.scale + self.caption_height
    }

    pub fn width(&self) -> u32 {
        self.columns * self.cell_width() + (self.columns + 1) * self.pad
    }

    pub fn height(&self) -> u32 {
        self.rows * self.cell_height() + (self.rows + 1) * self.pad
    }

    /// The top-left canvas pixel of cell `i` (row-major).
    pub fn origin(&self, i: usize) -> (u32, u32) {
        let i = i as u32;
        let (column, row) = (i % self.columns.max(1), i / self.columns.max(1));
        (
            self.pad + column * (self.cell_width() + self.pad),
            self.pad + row * (self.cell_height() + self.pad),
        )
    }

    /// The canvas, `[height, width, 3]` bytes, white, with image `i` in cell `i`. Each
    /// image is `[image_height, image_width, channels]` bytes; one channel is drawn as
    /// grey, three as RGB. Images past the last cell, and missing pixels, are left out
    /// (white) rather than failing.
    pub fn draw<'a>(&self, images: impl IntoIterator<Item = (&'a [u8], u8)>) -> Vec<u8> {
        let (w, h) = (self.width() as usize, self.height() as usize);
        let mut canvas = vec![255u8; w * h * 3];
        let cells = (self.columns * self.rows) as usize;
        for (i, (pixels, channels)) in images.into_iter().enumerate().take(cells) {
            let (x0, y0) = self.origin(i);
            let c = usize::from(channels.max(1));
            for y in 0..self.image_height * self.scale {
                for x in 0..self.image_width * self.scale {
                    let (sx, sy) = ((x / self.scale) as usize, (y / self.scale) as usize);
                    let src = (sy * self.image_width as usize + sx) * c;
                    let dst = ((y0 + y) as usize * w + (x0 + x) as usize) * 3;
                    for k in 0..3 {
                        let from = src + if c == 3 { k } else { 0 };
                        canvas[dst + k] = pixels.get(from).copied().unwrap_or(0);
                    }
                }
            }
        }
        canvas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_sit_in_rows_with_padding_and_enlarged_pixels() {
        let tiling = Tiling {
            columns: 2,
            rows: 2,
            image_width: 2,
            image_height: 2,
            scale: 3,
            pad: 1,
            caption_height: 4,
        };
        assert_eq!((tiling.width(), tiling.height()), (2 * 6 + 3, 2 * 10 + 3));
        assert_eq!(tiling.origin(3), (1 + 6 + 1, 1 + 10 + 1));
        // An RGB image, then a grey one.
        let rgb: Vec<u8> = (0..12).collect();
        let grey = [7u8, 8, 9, 10];
        let canvas = tiling.draw([(&rgb[..], 3), (&grey[..], 1)]);
        let w = tiling.width() as usize;
        let at = |x: usize, y: usize| &canvas[(y * w + x) * 3..(y * w + x) * 3 + 3];
        assert_eq!(at(0, 0), [255, 255, 255], "padding");
        assert_eq!(at(1, 1), [0, 1, 2]);
        // Pixel (1, 1) of the first image, enlarged 3× to canvas pixels 4..7.
        assert_eq!(at(6, 6), [9, 10, 11]);
        assert_eq!(at(7, 1), [255, 255, 255], "padding between cells");
        assert_eq!(at(8 + 3, 1), [8, 8, 8], "grey drawn in all channels");
        assert_eq!(at(1, 1 + 6), [255, 255, 255], "the caption strip is blank");
    }
}
