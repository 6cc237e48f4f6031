//! `POST /v1/samples`' body: the raw [`SampleRequest`] and [`plan`], which checks it against
//! the model being served and the server's limits and turns it into one spec per image.
//!
//! The bounds that depend on neither (guidance scale, η, seed) are in the field schemas
//! below; those that do (n, the classes, steps) are filled into the served document by
//! `http::openapi` from the same [`SampleDefaults`] and model.

use ddpm_core::{
    sampler::{DpmSolverAlgorithm, DynamicThresholding},
    AncestralVariance, SampleSpec, SamplerConfig, SamplerKind, TimestepSpacing,
};
use serde::{
    de::{value::StrDeserializer, DeserializeOwned, IntoDeserializer},
    Deserialize,
};
use utoipa::{
    openapi::{schema::SchemaType, ObjectBuilder, OneOfBuilder, RefOr, Schema, Type},
    PartialSchema, ToSchema,
};

use super::{integral, ValidationError};
use crate::{batcher::Priority, model::ModelInfo};

/// Guidance scales above this are refused (past it images saturate; it is a typo).
pub const MAX_GUIDANCE_SCALE: f64 = 50.0;
/// w of a request that gives none.
pub const DEFAULT_GUIDANCE_SCALE: f64 = 3.0;
/// Every sampler a request can name, as it names them.
pub const SAMPLERS: [SamplerKind; 3] = [SamplerKind::Ddpm, SamplerKind::Ddim, SamplerKind::DpmPp2m];
/// Every timestep spacing a request can name.
pub const SPACINGS: [TimestepSpacing; 3] = [
    TimestepSpacing::Leading,
    TimestepSpacing::Trailing,
    TimestepSpacing::Linspace,
];
/// How x̂₀ is kept in range at each step (`thresholding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Thresholding {
    /// x̂₀ as the network predicts it.
    None,
    /// Clamped to [−1, 1] (today's behaviour).
    Static,
    /// Imagen's dynamic thresholding (`dynamic_thresholding_ratio`, `sample_max_value`).
    Dynamic,
}

/// Every `thresholding` a request can name.
pub const THRESHOLDINGS: [Thresholding; 3] = [
    Thresholding::None,
    Thresholding::Static,
    Thresholding::Dynamic,
];
/// Diffusers' `dynamic_thresholding_ratio` and `sample_max_value` defaults.
pub const DEFAULT_DYNAMIC_THRESHOLDING: DynamicThresholding = DynamicThresholding {
    ratio: 0.995,
    max_value: 1.0,
};
/// `sample_max_value` above this is refused (s is then never reached: a typo).
pub const MAX_SAMPLE_MAX_VALUE: f64 = 1000.0;

/// Every DPM-Solver++ algorithm a request can name.
pub const DPM_ALGORITHMS: [DpmSolverAlgorithm; 2] = [
    DpmSolverAlgorithm::DpmSolverPp,
    DpmSolverAlgorithm::SdeDpmSolverPp,
];
/// Every DDPM noise variance a request can name.
pub const VARIANCES: [AncestralVariance; 2] =
    [AncestralVariance::FixedSmall, AncestralVariance::FixedLarge];

/// A class by index or by name.
#[derive(Debug, Clone, PartialEq)]
pub enum ClassRef {
    Index(i64),
    Name(String),
}

impl ClassRef {
    /// A class by index or by name: those of `classes`, or (`None`) any 64-bit index ≥ 0
    /// and any name. The served document states the model's ([`crate::http::openapi`]).
    pub fn schema_for(classes: Option<&[String]>) -> Schema {
        let (index, name) = match classes {
            Some(names) => (
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .maximum(Some(names.len().saturating_sub(1))),
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(names.iter().cloned())),
            ),
            None => (
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .maximum(Some(i64::MAX)),
                ObjectBuilder::new().schema_type(Type::String),
            ),
        };
        OneOfBuilder::new()
            .item(index)
            .item(name)
            .description(Some(
                "A class by index or by name (`GET /v1/model` lists the model's classes).",
            ))
            .build()
            .into()
    }
}

impl PartialSchema for ClassRef {
    fn schema() -> RefOr<Schema> {
        ClassRef::schema_for(None).into()
    }
}

impl ToSchema for ClassRef {}

/// An integer (`2.0` included, as JSON Schema counts it) is an index, a string a name.
impl<'de> Deserialize<'de> for ClassRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ClassVisitor;

        impl serde::de::Visitor<'_> for ClassVisitor {
            type Value = ClassRef;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a class index (an integer) or name (a string)")
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ClassRef, E> {
                Ok(ClassRef::Index(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ClassRef, E> {
                i64::try_from(v)
                    .map(ClassRef::Index)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ClassRef, E> {
                integral::whole_i64(v)
                    .map(ClassRef::Index)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ClassRef, E> {
                Ok(ClassRef::Name(v.to_owned()))
            }
        }

        d.deserialize_any(ClassVisitor)
    }
}

/// A choice among a type's names (`sampler`, `priority`): a JSON string, read in any case
/// by the type's own serde names. A string that names none is kept as given, so that
/// [`plan`] refuses it with the field's own code (`invalid_sampler`) where serde would
/// refuse the whole body (`invalid_request`); any other JSON type does not match the schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Named<T> {
    Known(T),
    Unknown(String),
}

impl<T: Copy> Named<T> {
    /// The choice, or `refuse` of the name that is none.
    fn known(&self, refuse: impl FnOnce(&str) -> ValidationError) -> Result<T, ValidationError> {
        match self {
            Named::Known(value) => Ok(*value),
            Named::Unknown(name) => Err(refuse(name)),
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Named<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        let lower = name.to_ascii_lowercase();
        let named: StrDeserializer<'_, serde::de::value::Error> =
            lower.as_str().into_deserializer();
        Ok(T::deserialize(named).map_or(Named::Unknown(name), Named::Known))
    }
}

/// The request body. A request names one `class` (for all `n` images), or lists `classes`
/// (one image each), or neither (unconditional images).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SampleRequest {
    /// One class for all `n` images, by index or by name (`GET /v1/model` lists them).
    /// Excludes `classes`.
    pub class: Option<ClassRef>,
    /// One image per entry (a mixed request). Excludes `class`; `n`, if given, must be its
    /// length.
    #[schema(min_items = 1)]
    pub classes: Option<Vec<ClassRef>>,
    /// Images to generate (default 1), at most the server's --max-images-per-request.
    #[serde(default, deserialize_with = "integral::body::i64")]
    #[schema(schema_with = n_schema)]
    pub n: Option<i64>,
    /// Classifier-free guidance w: ε̃ = ε∅ + w·(εy − ε∅). Kept as JSON so that a value of
    /// the wrong type is answered `invalid_guidance_scale`, like one out of range.
    #[schema(schema_with = guidance_scale_schema)]
    pub guidance_scale: Option<serde_json::Value>,
    /// Default: the server's --default-sampler.
    #[schema(schema_with = sampler_schema)]
    pub sampler: Option<Named<SamplerKind>>,
    /// Network evaluations, at most the model's T (`timesteps` in `GET /v1/model`);
    /// default: the server's --default-steps.
    #[serde(default, deserialize_with = "integral::body::i64")]
    #[schema(schema_with = steps_schema)]
    pub steps: Option<i64>,
    /// DDIM's η in [0, 1] (0: deterministic). Only with the ddim sampler.
    #[schema(minimum = 0.0, maximum = 1.0, default = 0.0)]
    pub eta: Option<f64>,
    /// Which timesteps the `steps` visit (diffusers' `timestep_spacing`): `leading`,
    /// `trailing` or `linspace`, each as the sampler's diffusers scheduler defines it.
    /// Default: the server's --default-timestep-spacing; unless that is set, the
    /// sampler's own (trailing for ddpm and ddim, linspace for dpmpp_2m).
    #[schema(schema_with = timestep_spacing_schema)]
    pub timestep_spacing: Option<Named<TimestepSpacing>>,
    /// The ddpm sampler's σ² (diffusers' `variance_type`): `fixed_small` (β̃, the
    /// posterior variance) or `fixed_large` (β). Only with the ddpm sampler; default:
    /// the server's --default-variance-type.
    #[schema(schema_with = variance_type_schema)]
    pub variance_type: Option<Named<AncestralVariance>>,
    /// The dpmpp_2m sampler's solver (diffusers' `algorithm_type`): `dpmsolver++` (the
    /// ODE's, deterministic) or `sde-dpmsolver++` (stochastic, fresh noise every step).
    /// Only with the dpmpp_2m sampler; default: the server's --default-algorithm-type.
    #[schema(schema_with = algorithm_type_schema)]
    pub algorithm_type: Option<Named<DpmSolverAlgorithm>>,
    /// How x̂₀ is kept in range at each step: `none`, `static` (clamped to [−1, 1]) or
    /// `dynamic` (Imagen's, diffusers' `thresholding`). Default: the server's
    /// --default-thresholding (static).
    #[schema(schema_with = thresholding_schema)]
    pub thresholding: Option<Named<Thresholding>>,
    /// With `dynamic` thresholding: the quantile of |x̂₀| taken as its bound s, in (0, 1].
    /// Default: the server's --default-dynamic-thresholding-ratio (0.995).
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub dynamic_thresholding_ratio: Option<f64>,
    /// With `dynamic` thresholding: the largest s, in [1, 1000]. Default: the server's
    /// --default-sample-max-value (1, which makes it the static clamp).
    #[schema(minimum = 1.0, maximum = 1000.0)]
    pub sample_max_value: Option<f64>,
    /// Guidance rescale φ in [0, 1] (Lin et al. 2024, diffusers' `guidance_rescale`): the
    /// guided ε̃ is rescaled to the standard deviation of the conditional one and mixed
    /// with itself by φ. Default: the server's --default-guidance-rescale (0: none).
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub guidance_rescale: Option<f64>,
    /// `[lo, hi]`: guidance only at the timesteps lo ≤ t ≤ hi (Kynkäänniemi et al. 2024),
    /// the conditional prediction alone (one network evaluation) at the others; t counts
    /// the model's T noise levels down to 0. Default: the server's
    /// --default-guidance-interval (none: every step).
    #[schema(schema_with = guidance_interval_schema)]
    pub guidance_interval: Option<Vec<i64>>,
    /// Image i uses seed + i (wrapping); the same seed and settings give the same image,
    /// alone or batched. Random when absent.
    #[serde(default, deserialize_with = "integral::body::u64")]
    #[schema(schema_with = seed_schema)]
    pub seed: Option<u64>,
    /// `low`, `normal` (default) or `high`. The server serves the request with the least
    /// work left first, a high request counting as 4× shorter and a low one as 4× longer;
    /// every request gains standing as it waits, so none starves.
    #[schema(schema_with = priority_schema)]
    pub priority: Option<Named<Priority>>,
    /// With `Accept: text/event-stream` only: send each image's current x̂₀ (the model's
    /// guess of the final image) as a `preview` event every this many of its steps.
    #[serde(default, deserialize_with = "integral::body::i64")]
    #[schema(schema_with = preview_every_schema)]
    pub preview_every: Option<i64>,
}

/// A count of at least 1; the served document lowers the maximum to the server's and
/// model's limits (`http::openapi`).
fn count_schema(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
        .minimum(Some(1))
        .maximum(Some(i64::MAX))
        .description(Some(description))
}

fn n_schema() -> ObjectBuilder {
    count_schema(
        "Images to generate (default 1), at most the server's --max-images-per-request. \
         With `classes`, it may be given only as their number.",
    )
}

fn steps_schema() -> ObjectBuilder {
    count_schema(
        "Network evaluations, at most the model's T (`timesteps` in `GET /v1/model`); \
         default: the server's --default-steps.",
    )
}

fn guidance_scale_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Number, Type::Null]))
        .minimum(Some(0.0))
        .maximum(Some(MAX_GUIDANCE_SCALE))
        .default(Some(DEFAULT_GUIDANCE_SCALE.into()))
        .description(Some("Classifier-free guidance w: ε̃ = ε∅ + w·(εy − ε∅)."))
}

fn sampler_schema() -> ObjectBuilder {
    let names = SAMPLERS
        .iter()
        .filter_map(|kind| serde_json::to_value(kind).ok())
        .chain([serde_json::Value::Null]);
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some(names))
        .description(Some("Default: the server's --default-sampler."))
}

/// A nullable string naming one of `values` (by their serde names).
fn names_schema<T: serde::Serialize>(values: &[T], description: &str) -> ObjectBuilder {
    let names = values
        .iter()
        .filter_map(|v| serde_json::to_value(v).ok())
        .chain([serde_json::Value::Null]);
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some(names))
        .description(Some(description))
}

fn timestep_spacing_schema() -> ObjectBuilder {
    names_schema(
        &SPACINGS,
        "Which timesteps the steps visit (diffusers' `timestep_spacing`). Default: the \
         server's --default-timestep-spacing, else the sampler's own (trailing for ddpm \
         and ddim, linspace for dpmpp_2m).",
    )
}

fn variance_type_schema() -> ObjectBuilder {
    names_schema(
        &VARIANCES,
        "ddpm only: σ² = β̃ (`fixed_small`) or β (`fixed_large`), diffusers' \
         `variance_type`. Default: the server's --default-variance-type.",
    )
}

fn algorithm_type_schema() -> ObjectBuilder {
    names_schema(
        &DPM_ALGORITHMS,
        "dpmpp_2m only: its solver, diffusers' `algorithm_type`: dpmsolver++ (ODE) or \
         sde-dpmsolver++ (SDE). Default: the server's --default-algorithm-type.",
    )
}

fn thresholding_schema() -> ObjectBuilder {
    names_schema(
        &THRESHOLDINGS,
        "How x̂₀ is kept in range at each step: none, static (clamped to [−1, 1]) or \
         dynamic (Imagen's). Default: the server's --default-thresholding.",
    )
}

fn guidance_interval_schema() -> utoipa::openapi::schema::ArrayBuilder {
    utoipa::openapi::schema::ArrayBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
        .items(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0))
                .maximum(Some(i64::MAX)),
        )
        .min_items(Some(2))
        .max_items(Some(2))
        .description(Some(
            "[lo, hi]: guidance only at the timesteps lo ≤ t ≤ hi (hi below the model's \
             T), the conditional prediction alone at the others. Default: the server's \
             --default-guidance-interval (every step).",
        ))
}

fn priority_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some(
            ["low", "normal", "high"]
                .map(serde_json::Value::from)
                .into_iter()
                .chain([serde_json::Value::Null]),
        ))
        .default(Some("normal".into()))
        .description(Some(
            "Served shortest remaining work first: high counts as 4× shorter, low as 4× \
             longer; waiting gains standing, so none starves.",
        ))
}

fn preview_every_schema() -> ObjectBuilder {
    count_schema(
        "With `Accept: text/event-stream` only: a `preview` event (each image's current \
         x̂₀ as a PNG) every this many of its steps.",
    )
}

fn seed_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
        .minimum(Some(0u64))
        .maximum(Some(u64::MAX))
        .description(Some(
            "Image i uses seed + i (wrapping); the same seed and settings give the same \
             image, alone or batched. Random when absent.",
        ))
}

/// The server's limits and defaults that a request is checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleDefaults {
    pub max_images_per_request: usize,
    pub default_sampler: SamplerKind,
    pub default_steps: usize,
    /// `None`: each sampler's own ([`SamplerKind::default_spacing`]).
    pub default_timestep_spacing: Option<TimestepSpacing>,
    /// For the ddpm sampler.
    pub default_variance_type: AncestralVariance,
    /// For the dpmpp_2m sampler.
    pub default_algorithm_type: DpmSolverAlgorithm,
    pub default_thresholding: Thresholding,
    /// The `dynamic_thresholding_ratio` and `sample_max_value` of requests that give none.
    pub default_dynamic_thresholding: DynamicThresholding,
    pub default_guidance_rescale: f64,
    /// `None`: guidance at every step.
    pub default_guidance_interval: Option<(i64, i64)>,
}

/// A validated request: one spec per image, plus what the response reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub specs: Vec<SampleSpec>,
    /// The class name (or `None`, unconditional) of each image.
    pub class_names: Vec<Option<String>>,
    pub priority: Priority,
    pub preview_every: Option<usize>,
}

/// Checks a request against the model and the limits; every refusal names what to fix.
pub fn plan(
    request: &SampleRequest,
    model: &ModelInfo,
    conditional: bool,
    defaults: &SampleDefaults,
) -> Result<Plan, ValidationError> {
    let labels = labels(request, model, conditional, defaults.max_images_per_request)?;
    let kind = match &request.sampler {
        None => defaults.default_sampler,
        Some(named) => named.known(|s| {
            ValidationError::Sampler(format!(
                "unknown sampler {s:?}: use \"ddpm\", \"ddim\" or \"dpmpp_2m\""
            ))
        })?,
    };
    let t_max = model.timesteps as i64;
    let steps = request.steps.unwrap_or(defaults.default_steps as i64);
    if steps < 1 || steps > t_max {
        return Err(ValidationError::Steps(format!(
            "steps must be in 1..={t_max}, got {steps}"
        )));
    }
    let eta = request.eta.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&eta) {
        return Err(ValidationError::Eta(format!(
            "eta must be in [0, 1], got {eta}"
        )));
    }
    if eta != 0.0 && kind == SamplerKind::Ddpm {
        return Err(ValidationError::Eta(
            "eta applies to the ddim sampler only: omit it for ddpm".into(),
        ));
    }
    let guidance_scale = guidance_scale(request.guidance_scale.as_ref())?;
    let spacing = match &request.timestep_spacing {
        None => defaults
            .default_timestep_spacing
            .unwrap_or_else(|| kind.default_spacing()),
        Some(named) => named.known(|s| {
            ValidationError::SamplerOption(format!(
                "unknown timestep_spacing {s:?}: use \"leading\", \"trailing\" or \"linspace\""
            ))
        })?,
    };
    let variance = match &request.variance_type {
        None if kind == SamplerKind::Ddpm => defaults.default_variance_type,
        None => AncestralVariance::FixedSmall,
        Some(named) => named.known(|v| {
            ValidationError::SamplerOption(format!(
                "unknown variance_type {v:?}: use \"fixed_small\" or \"fixed_large\""
            ))
        })?,
    };
    // Like η with ddpm: the value that changes nothing is accepted with any sampler.
    if variance != AncestralVariance::FixedSmall && kind != SamplerKind::Ddpm {
        return Err(ValidationError::SamplerOption(
            "variance_type fixed_large applies to the ddpm sampler only".into(),
        ));
    }
    let dpm_solver = match &request.algorithm_type {
        None if kind == SamplerKind::DpmPp2m => defaults.default_algorithm_type,
        None => DpmSolverAlgorithm::DpmSolverPp,
        Some(named) => named.known(|a| {
            ValidationError::SamplerOption(format!(
                "unknown algorithm_type {a:?}: use \"dpmsolver++\" or \"sde-dpmsolver++\""
            ))
        })?,
    };
    if dpm_solver != DpmSolverAlgorithm::DpmSolverPp && kind != SamplerKind::DpmPp2m {
        return Err(ValidationError::SamplerOption(
            "algorithm_type sde-dpmsolver++ applies to the dpmpp_2m sampler only".into(),
        ));
    }
    let thresholding = match &request.thresholding {
        None => defaults.default_thresholding,
        Some(named) => named.known(|t| {
            ValidationError::SamplerOption(format!(
                "unknown thresholding {t:?}: use \"none\", \"static\" or \"dynamic\""
            ))
        })?,
    };
    let dynamic = dynamic_thresholding(request, defaults.default_dynamic_thresholding)?;
    let dynamic_given =
        request.dynamic_thresholding_ratio.is_some() || request.sample_max_value.is_some();
    if dynamic_given && thresholding != Thresholding::Dynamic {
        return Err(ValidationError::SamplerOption(
            "dynamic_thresholding_ratio and sample_max_value apply to \"dynamic\" thresholding only"
                .into(),
        ));
    }
    let guidance_rescale = request
        .guidance_rescale
        .unwrap_or(defaults.default_guidance_rescale);
    if !(0.0..=1.0).contains(&guidance_rescale) {
        return Err(ValidationError::SamplerOption(format!(
            "guidance_rescale must be in [0, 1], got {guidance_rescale}"
        )));
    }
    let guidance_interval = match request.guidance_interval.as_deref() {
        None => defaults
            .default_guidance_interval
            .filter(|&(_, hi)| hi < t_max),
        Some(&[lo, hi]) if 0 <= lo && lo <= hi && hi < t_max => Some((lo, hi)),
        Some(other) => {
            return Err(ValidationError::SamplerOption(format!(
                "guidance_interval must be [lo, hi] with 0 ≤ lo ≤ hi ≤ {}, got {other:?}",
                t_max - 1
            )))
        }
    };
    let sampler = SamplerConfig {
        kind,
        steps: steps as usize,
        eta,
        spacing,
        clip_denoised: thresholding != Thresholding::None,
        dynamic_thresholding: (thresholding == Thresholding::Dynamic).then_some(dynamic),
        guidance_rescale,
        guidance_interval,
        dpm_solver,
        variance,
    };
    let seed = request.seed.unwrap_or_else(rand::random);
    let specs = labels
        .iter()
        .enumerate()
        .map(|(i, &label)| SampleSpec {
            label,
            guidance_scale,
            seed: seed.wrapping_add(i as u64),
            sampler,
        })
        .collect();
    let class_names = labels
        .iter()
        .map(|l| l.and_then(|i| model.classes.get(i as usize).cloned()))
        .collect();
    let priority = match &request.priority {
        None => Priority::Normal,
        Some(named) => named.known(|p| {
            ValidationError::Priority(format!(
                "unknown priority {p:?}: use \"low\", \"normal\" or \"high\""
            ))
        })?,
    };
    let preview_every = match request.preview_every {
        None => None,
        Some(k) if k >= 1 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
        Some(k) => {
            return Err(ValidationError::PreviewEvery(format!(
                "preview_every must be at least 1, got {k}"
            )))
        }
    };
    Ok(Plan {
        specs,
        class_names,
        priority,
        preview_every,
    })
}

/// The label (or `None`, unconditional) of each image the request asks for.
fn labels(
    request: &SampleRequest,
    model: &ModelInfo,
    conditional: bool,
    max_n: usize,
) -> Result<Vec<Option<i64>>, ValidationError> {
    let resolve = |c: &ClassRef| resolve_class(c, model, conditional);
    match (&request.class, &request.classes) {
        (Some(_), Some(_)) => Err(ValidationError::Request(
            "give either `class` or `classes`, not both".into(),
        )),
        (None, Some(classes)) => {
            if classes.is_empty() || classes.len() > max_n {
                return Err(ValidationError::N(format!(
                    "`classes` must list 1 to {max_n} classes, got {}",
                    classes.len()
                )));
            }
            // `n` may repeat the count; one that disagrees is a mistake worth naming.
            if let Some(n) = request.n.filter(|&n| n != classes.len() as i64) {
                return Err(ValidationError::N(format!(
                    "n = {n} but `classes` lists {}: omit n or make them agree",
                    classes.len()
                )));
            }
            classes.iter().map(|c| resolve(c).map(Some)).collect()
        }
        (class, None) => {
            let n = request.n.unwrap_or(1);
            if n < 1 || n > max_n as i64 {
                return Err(ValidationError::N(format!(
                    "n must be in 1..={max_n}, got {n}"
                )));
            }
            let label = class.as_ref().map(resolve).transpose()?;
            Ok(vec![label; n as usize])
        }
    }
}

fn resolve_class(
    class: &ClassRef,
    model: &ModelInfo,
    conditional: bool,
) -> Result<i64, ValidationError> {
    if !conditional {
        return Err(ValidationError::UnknownClass(
            "the loaded model is unconditional: omit `class` and `classes`".into(),
        ));
    }
    let listed = || {
        let names: Vec<&str> = model.classes.iter().take(50).map(String::as_str).collect();
        names.join(", ")
    };
    match class {
        ClassRef::Index(i) if (0..model.classes.len() as i64).contains(i) => Ok(*i),
        ClassRef::Index(i) => Err(ValidationError::UnknownClass(format!(
            "class index {i} is out of range: use 0..={} or a name ({})",
            model.classes.len().saturating_sub(1),
            listed()
        ))),
        ClassRef::Name(name) => model
            .classes
            .iter()
            .position(|c| c == name)
            .map(|i| i as i64)
            .ok_or_else(|| {
                ValidationError::UnknownClass(format!(
                    "unknown class {name:?}: use one of {}",
                    listed()
                ))
            }),
    }
}

/// The request's dynamic thresholding settings, the defaults filled in.
fn dynamic_thresholding(
    request: &SampleRequest,
    defaults: DynamicThresholding,
) -> Result<DynamicThresholding, ValidationError> {
    let ratio = request.dynamic_thresholding_ratio.unwrap_or(defaults.ratio);
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(ValidationError::SamplerOption(format!(
            "dynamic_thresholding_ratio must be in (0, 1], got {ratio}"
        )));
    }
    let max_value = request.sample_max_value.unwrap_or(defaults.max_value);
    if !(1.0..=MAX_SAMPLE_MAX_VALUE).contains(&max_value) {
        return Err(ValidationError::SamplerOption(format!(
            "sample_max_value must be in [1, {MAX_SAMPLE_MAX_VALUE}], got {max_value}"
        )));
    }
    Ok(DynamicThresholding { ratio, max_value })
}

/// w from the request: a JSON number in [0, [`MAX_GUIDANCE_SCALE`]]. A string such as
/// "2.5" is refused like any other non-number: the document says number.
fn guidance_scale(value: Option<&serde_json::Value>) -> Result<f64, ValidationError> {
    let w = match value {
        None | Some(serde_json::Value::Null) => return Ok(DEFAULT_GUIDANCE_SCALE),
        Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(other) => {
            return Err(ValidationError::GuidanceScale(format!(
                "guidance_scale must be a number, got {other}"
            )));
        }
    };
    if !w.is_finite() || !(0.0..=MAX_GUIDANCE_SCALE).contains(&w) {
        return Err(ValidationError::GuidanceScale(format!(
            "guidance_scale must be a finite number in [0, {MAX_GUIDANCE_SCALE}], got {w}"
        )));
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use serde_json::json;

    fn defaults() -> SampleDefaults {
        SampleDefaults {
            max_images_per_request: 8,
            default_sampler: SamplerKind::Ddim,
            default_steps: 20,
            default_timestep_spacing: None,
            default_variance_type: AncestralVariance::FixedSmall,
            default_algorithm_type: DpmSolverAlgorithm::DpmSolverPp,
            default_thresholding: Thresholding::Static,
            default_dynamic_thresholding: DEFAULT_DYNAMIC_THRESHOLDING,
            default_guidance_rescale: 0.0,
            default_guidance_interval: None,
        }
    }

    fn info() -> ModelInfo {
        ModelInfo {
            checkpoint_id: 1,
            run_id: 1,
            step: 10,
            classes: vec!["red".into(), "green".into(), "blue".into()],
            image_size: 8,
            channels: 3,
            timesteps: 1000,
            parameters: 1,
            device: "cpu".into(),
            checkpoint_path: "x".into(),
            checkpoint_created_at: Utc::now(),
            loaded_at: Utc::now(),
        }
    }

    fn request(json: serde_json::Value) -> SampleRequest {
        serde_json::from_value(json).unwrap()
    }

    fn error(json: serde_json::Value) -> ValidationError {
        plan(&request(json), &info(), true, &defaults()).unwrap_err()
    }

    #[test]
    fn defaults_and_seeds() {
        let p = plan(
            &request(json!({"class": "green", "n": 3, "seed": 7})),
            &info(),
            true,
            &defaults(),
        )
        .unwrap();
        assert_eq!(p.specs.len(), 3);
        assert!(p
            .specs
            .iter()
            .all(|s| s.label == Some(1) && s.guidance_scale == DEFAULT_GUIDANCE_SCALE));
        assert_eq!(
            p.specs.iter().map(|s| s.seed).collect::<Vec<_>>(),
            [7, 8, 9]
        );
        assert_eq!(p.specs[0].sampler, SamplerConfig::ddim(20));
        assert_eq!(p.class_names[0].as_deref(), Some("green"));
        let p = plan(
            &request(json!({"classes": [0, "blue"], "sampler": "DDPM", "steps": 1000, "priority": "High"})),
            &info(),
            true,
            &defaults(),
        )
        .unwrap();
        assert_eq!(p.priority, Priority::High, "names are read in any case");
        assert_eq!(
            p.specs.iter().map(|s| s.label).collect::<Vec<_>>(),
            [Some(0), Some(2)]
        );
        assert_eq!(p.specs[0].sampler.kind, SamplerKind::Ddpm);
        let p = plan(&request(json!({})), &info(), true, &defaults()).unwrap();
        assert_eq!(p.specs[0].label, None);
        assert_eq!((p.priority, p.preview_every), (Priority::Normal, None));
        // JSON null is the field's absence, as the document's nullable types say.
        let p = plan(
            &request(json!({"guidance_scale": null, "steps": null, "seed": u64::MAX, "n": 2})),
            &info(),
            true,
            &defaults(),
        )
        .unwrap();
        assert_eq!(p.specs[0].guidance_scale, DEFAULT_GUIDANCE_SCALE);
        assert_eq!(p.specs[1].seed, 0, "seeds wrap");
        // JSON Schema's integers include 2.0.
        let p = plan(
            &request(json!({"class": 1.0, "n": 2.0, "steps": 5.0})),
            &info(),
            true,
            &defaults(),
        )
        .unwrap();
        assert_eq!(p.specs.len(), 2);
        assert_eq!(p.specs[0].label, Some(1));
        assert_eq!(p.specs[0].sampler.steps, 5);
        for bad in [
            json!({"class": 1.5}),
            json!({"class": true}),
            json!({"n": "2"}),
            json!({"sampler": 1}),
            json!({"priority": ["high"]}),
        ] {
            assert!(
                serde_json::from_value::<SampleRequest>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    /// Unset options take the server's defaults, which are today's behaviour unless set.
    #[test]
    fn sampler_options_and_their_defaults() {
        let sampler = |body: serde_json::Value, defaults: &SampleDefaults| {
            plan(&request(body), &info(), true, defaults).unwrap().specs[0].sampler
        };
        let d = defaults();
        for kind in SAMPLERS {
            let name = serde_json::to_value(kind).unwrap();
            let unset = sampler(json!({ "sampler": name }), &d);
            assert_eq!(unset.spacing, kind.default_spacing());
            assert_eq!(unset.variance, AncestralVariance::FixedSmall);
            assert!(unset.clip_denoised && unset.dynamic_thresholding.is_none());
            assert_eq!(
                (unset.guidance_rescale, unset.guidance_interval),
                (0.0, None)
            );
            let explicit = sampler(
                json!({ "sampler": name, "timestep_spacing": kind.default_spacing() }),
                &d,
            );
            assert_eq!(unset, explicit, "{kind:?}");
        }
        let s = sampler(
            json!({"sampler": "ddpm", "timestep_spacing": "LEADING", "variance_type": "fixed_large"}),
            &d,
        );
        assert_eq!(
            (s.spacing, s.variance),
            (TimestepSpacing::Leading, AncestralVariance::FixedLarge)
        );
        let server = SampleDefaults {
            default_timestep_spacing: Some(TimestepSpacing::Leading),
            default_variance_type: AncestralVariance::FixedLarge,
            ..defaults()
        };
        let s = sampler(json!({"sampler": "ddpm"}), &server);
        assert_eq!(
            (s.spacing, s.variance),
            (TimestepSpacing::Leading, AncestralVariance::FixedLarge)
        );
        // The server's `--default-guidance-interval all` reaches past every T: no
        // interval, guidance at every step.
        let all = SampleDefaults {
            default_guidance_interval: Some(crate::config::ALL_STEPS),
            ..defaults()
        };
        assert_eq!(sampler(json!({}), &all).guidance_interval, None);
        let s = sampler(
            json!({"guidance_rescale": 0.7, "guidance_interval": [100, 700]}),
            &d,
        );
        assert_eq!(
            (s.guidance_rescale, s.guidance_interval),
            (0.7, Some((100, 700)))
        );
        let s = sampler(
            json!({"sampler": "dpmpp_2m", "algorithm_type": "SDE-DPMSolver++"}),
            &d,
        );
        assert_eq!(s.dpm_solver, DpmSolverAlgorithm::SdeDpmSolverPp);
        let s = sampler(json!({"thresholding": "none"}), &d);
        assert!(!s.clip_denoised && s.dynamic_thresholding.is_none());
        let s = sampler(
            json!({"thresholding": "dynamic", "sample_max_value": 2.0}),
            &d,
        );
        assert!(s.clip_denoised);
        assert_eq!(
            s.dynamic_thresholding,
            Some(DynamicThresholding {
                ratio: 0.995,
                max_value: 2.0
            })
        );
        let s = sampler(
            json!({"sampler": "ddim", "timestep_spacing": "linspace"}),
            &server,
        );
        assert_eq!(
            (s.spacing, s.variance),
            (TimestepSpacing::Linspace, AncestralVariance::FixedSmall),
            "the request's own spacing; ddim ignores the variance"
        );
    }

    #[test]
    fn every_invalid_field_has_its_variant() {
        use ValidationError as E;
        let is = |body: serde_json::Value, f: fn(&E) -> bool| {
            let e = error(body.clone());
            assert!(f(&e), "{body}: {e:?}");
        };
        is(json!({"class": "purple"}), |e| {
            matches!(e, E::UnknownClass(_))
        });
        is(json!({"class": 3}), |e| matches!(e, E::UnknownClass(_)));
        is(json!({"class": -1}), |e| matches!(e, E::UnknownClass(_)));
        is(json!({"n": 0}), |e| matches!(e, E::N(_)));
        is(json!({"n": 9}), |e| matches!(e, E::N(_)));
        is(json!({"classes": []}), |e| matches!(e, E::N(_)));
        is(json!({"classes": [0, 1], "n": 3}), |e| matches!(e, E::N(_)));
        is(json!({"class": 0, "classes": [0]}), |e| {
            matches!(e, E::Request(_))
        });
        is(json!({"steps": 0}), |e| matches!(e, E::Steps(_)));
        is(json!({"steps": 1001}), |e| matches!(e, E::Steps(_)));
        is(json!({"sampler": "euler"}), |e| matches!(e, E::Sampler(_)));
        is(json!({"priority": "urgent"}), |e| {
            matches!(e, E::Priority(_))
        });
        is(json!({"preview_every": 0}), |e| {
            matches!(e, E::PreviewEvery(_))
        });
        is(json!({"eta": 1.5}), |e| matches!(e, E::Eta(_)));
        is(json!({"sampler": "ddpm", "eta": 0.5}), |e| {
            matches!(e, E::Eta(_))
        });
        for bad in [
            json!({"thresholding": "clip"}),
            json!({"thresholding": "dynamic", "dynamic_thresholding_ratio": 0.0}),
            json!({"thresholding": "dynamic", "dynamic_thresholding_ratio": 1.5}),
            json!({"thresholding": "dynamic", "sample_max_value": 0.5}),
            json!({"thresholding": "dynamic", "sample_max_value": 1e9}),
            json!({"sample_max_value": 2.0}),
            json!({"thresholding": "none", "dynamic_thresholding_ratio": 0.9}),
            json!({"guidance_rescale": 1.5}),
            json!({"guidance_rescale": -0.1}),
            json!({"guidance_interval": [500]}),
            json!({"guidance_interval": [600, 500]}),
            json!({"guidance_interval": [-1, 500]}),
            json!({"guidance_interval": [0, 1000]}),
            json!({"guidance_interval": [0, 1, 2]}),
            json!({"sampler": "dpmpp_2m", "algorithm_type": "dpmsolver"}),
            json!({"sampler": "ddim", "algorithm_type": "sde-dpmsolver++"}),
        ] {
            is(bad, |e| matches!(e, E::SamplerOption(_)));
        }
        is(json!({"timestep_spacing": "uniform"}), |e| {
            matches!(e, E::SamplerOption(_))
        });
        is(
            json!({"sampler": "ddpm", "variance_type": "learned"}),
            |e| matches!(e, E::SamplerOption(_)),
        );
        is(
            json!({"sampler": "ddim", "variance_type": "fixed_large"}),
            |e| matches!(e, E::SamplerOption(_)),
        );
        for w in [
            json!("NaN"),
            json!("2.5"),
            json!(1e9),
            json!(-1),
            json!([1]),
        ] {
            is(json!({ "guidance_scale": w }), |e| {
                matches!(e, E::GuidanceScale(_))
            });
        }
        let unconditional =
            plan(&request(json!({"class": 0})), &info(), false, &defaults()).unwrap_err();
        assert!(matches!(unconditional, E::UnknownClass(_)));
    }

    #[test]
    fn the_documented_bounds_are_the_enforced_ones() {
        let ok = |body: serde_json::Value| {
            plan(&request(body.clone()), &info(), true, &defaults())
                .unwrap_or_else(|e| panic!("{body}: {e}"));
        };
        ok(json!({"guidance_scale": 0}));
        ok(json!({ "guidance_scale": MAX_GUIDANCE_SCALE }));
        assert!(guidance_scale(Some(&json!(MAX_GUIDANCE_SCALE + 1e-9))).is_err());
        ok(json!({"eta": 1.0, "sampler": "ddim"}));
        ok(json!({"classes": [0, 1], "n": 2}));
        for sampler in SAMPLERS {
            ok(json!({ "sampler": sampler }));
        }
        let schema = serde_json::to_value(sampler_schema().build()).unwrap();
        assert_eq!(schema["enum"], json!(["ddpm", "ddim", "dpmpp_2m", null]));
    }
}
