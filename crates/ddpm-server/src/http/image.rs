//! One generated image as JSON ([`ImageJson`]): an entry of `POST /v1/samples`' JSON
//! response and the data of a stream's `image` event, made in one place for both.

use serde::Serialize;
use utoipa::ToSchema;

use super::ApiError;
use crate::{batcher::GeneratedImage, encode, model::ModelInfo};

/// What an image's JSON needs besides its pixels.
#[derive(Debug, Clone)]
pub struct ImageContext {
    /// The class name (or `None`, unconditional) of each image, by index.
    pub class_names: Vec<Option<String>>,
    pub info: ModelInfo,
}

impl ImageContext {
    /// Image `index` of the request as JSON.
    pub fn image_json(&self, index: usize, image: &GeneratedImage) -> Result<ImageJson, ApiError> {
        Ok(ImageJson {
            index,
            class: self.class_names.get(index).cloned().flatten(),
            class_index: image.label,
            seed: image.seed,
            width: image.width,
            height: image.height,
            run_id: self.info.run_id,
            step: self.info.step,
            png_base64: encode::png_base64(image).map_err(ApiError::internal)?,
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImageJson {
    pub index: usize,
    /// The class name; null for an unconditional image.
    pub class: Option<String>,
    pub class_index: Option<i64>,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub run_id: i64,
    pub step: i64,
    /// The PNG file, base64 (standard alphabet, padded).
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub png_base64: String,
}
