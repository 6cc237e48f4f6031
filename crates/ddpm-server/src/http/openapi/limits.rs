//! The bounds of a sampling request that the types cannot know, filled into the generated
//! `SampleRequest` and `ClassRef` schemas so that they say what [`crate::validate::plan`]
//! enforces on this server with this model:
//!
//! - `n` and the length of `classes`: at most --max-images-per-request;
//! - `steps`: at most the model's T;
//! - `ClassRef`: the model's class indices and names (no `class` or `classes` at all for an
//!   unconditional model).
//!
//! The body stays a plain object of typed, bounded properties. The rules between fields
//! (`class` or `classes`, not both; `n` with `classes` only as its length; η only with the
//! ddim sampler, and the other sampler options only where they apply; a guidance interval
//! below the model's T) are not stated here: JSON Schema can say them only with `not`, `allOf` and
//! `if`/`then` around the object, which fuzzers and client generators read badly or not at
//! all. `plan` enforces them, answering 422 with a message that names the fields.

use utoipa::openapi::{Object, OpenApi as Document, RefOr, Schema};

use crate::{
    model::ModelInfo,
    validate::{ClassRef, SampleDefaults},
};

/// Fills the limits of `defaults` and `model` (with whether it is conditional) into `doc`.
pub(super) fn apply(
    doc: &mut Document,
    defaults: &SampleDefaults,
    model: Option<(&ModelInfo, bool)>,
) {
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    // The classes a request may name; None when any might be valid (no model yet).
    let classes: Option<&[String]> = model.map(|(info, conditional)| {
        if conditional {
            info.classes.as_slice()
        } else {
            &[]
        }
    });
    components
        .schemas
        .insert("ClassRef".into(), ClassRef::schema_for(classes).into());
    let Some(RefOr::T(Schema::Object(request))) = components.schemas.get_mut("SampleRequest")
    else {
        debug_assert!(false, "SampleRequest is not an object schema");
        return;
    };
    let max_n = defaults.max_images_per_request;
    if let Some(Schema::Object(n)) = property(request, "n") {
        n.maximum = Some(max_n.into());
    }
    if let Some(Schema::Array(list)) = property(request, "classes") {
        list.max_items = Some(max_n);
    }
    if let (Some(Schema::Object(steps)), Some((info, _))) = (property(request, "steps"), model) {
        steps.maximum = Some(info.timesteps.into());
    }
    if classes.is_some_and(<[String]>::is_empty) {
        // Nothing to name: the fields are refused, so the document has none.
        request.properties.remove("class");
        request.properties.remove("classes");
    }
}

fn property<'a>(object: &'a mut Object, name: &str) -> Option<&'a mut Schema> {
    match object.properties.get_mut(name) {
        Some(RefOr::T(schema)) => Some(schema),
        _ => {
            debug_assert!(false, "SampleRequest.{name} is not an inline schema");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use ddpm_core::SamplerKind;
    use serde_json::{json, Value};
    use utoipa::OpenApi;

    use super::*;
    use crate::{
        http::openapi::ApiDoc,
        validate::{plan, SampleRequest},
    };

    fn defaults(default_sampler: SamplerKind) -> SampleDefaults {
        SampleDefaults {
            max_images_per_request: 4,
            default_sampler,
            default_steps: 10,
            default_timestep_spacing: None,
            default_variance_type: Default::default(),
            default_algorithm_type: Default::default(),
            default_thresholding: crate::validate::samples::Thresholding::Static,
            default_dynamic_thresholding: crate::validate::samples::DEFAULT_DYNAMIC_THRESHOLDING,
            default_guidance_rescale: 0.0,
            default_guidance_interval: None,
        }
    }

    fn info(classes: &[&str]) -> ModelInfo {
        ModelInfo {
            checkpoint_id: 1,
            run_id: 1,
            step: 10,
            classes: classes.iter().map(|c| c.to_string()).collect(),
            image_size: 8,
            channels: 3,
            timesteps: 50,
            parameters: 1,
            device: "cpu".into(),
            checkpoint_path: "x".into(),
            checkpoint_created_at: Utc::now(),
            loaded_at: Utc::now(),
        }
    }

    fn schemas(defaults: &SampleDefaults, model: Option<(&ModelInfo, bool)>) -> Value {
        let mut doc = ApiDoc::openapi();
        apply(&mut doc, defaults, model);
        serde_json::to_value(doc).unwrap()["components"]["schemas"].take()
    }

    /// The documented bounds against `plan`: the largest documented value passes, one more
    /// is refused.
    #[test]
    fn the_documented_bounds_are_what_plan_enforces() {
        let defaults = defaults(SamplerKind::Ddim);
        let info = info(&["red", "green"]);
        let s = schemas(&defaults, Some((&info, true)));
        let request = &s["SampleRequest"]["properties"];
        let max = |v: &Value| v["maximum"].as_u64().unwrap() as i64;
        let checked = |body: Value| {
            let request: SampleRequest = serde_json::from_value(body).unwrap();
            plan(&request, &info, true, &defaults)
        };
        let n = max(&request["n"]);
        assert_eq!(n, 4);
        assert!(checked(json!({ "n": n })).is_ok());
        assert!(checked(json!({ "n": n + 1 })).is_err());
        let steps = max(&request["steps"]);
        assert!(checked(json!({ "steps": steps })).is_ok());
        assert!(checked(json!({ "steps": steps + 1 })).is_err());
        let classes = request["classes"]["maxItems"].as_u64().unwrap() as usize;
        assert!(checked(json!({ "classes": vec![0; classes] })).is_ok());
        assert!(checked(json!({ "classes": vec![0; classes + 1] })).is_err());
        assert_eq!(request["classes"]["minItems"], 1);
        assert!(checked(json!({ "classes": [] })).is_err());

        let class = &s["ClassRef"]["oneOf"];
        assert_eq!(class[0]["maximum"], 1);
        assert_eq!(class[1]["enum"], json!(["red", "green"]));
        assert!(checked(json!({"class": 1})).is_ok());
        assert!(checked(json!({"class": 2})).is_err());
        assert!(checked(json!({"class": "green"})).is_ok());
    }

    /// The body's schema is its properties, nothing around them; the rules between fields
    /// are `plan`'s, and each refusal names the fields it is about.
    #[test]
    fn the_rules_between_fields_are_plans_and_name_the_fields() {
        let info = info(&["red", "green"]);
        for default in [SamplerKind::Ddim, SamplerKind::Ddpm] {
            let defaults = defaults(default);
            let s = schemas(&defaults, Some((&info, true)));
            let request = s["SampleRequest"].as_object().unwrap();
            assert_eq!(request["type"], "object");
            assert_eq!(request["additionalProperties"], false);
            for keyword in ["not", "allOf", "anyOf", "oneOf", "if", "then"] {
                assert!(!request.contains_key(keyword), "{keyword}");
            }
            let refused = |body: Value, fields: &[&str]| {
                let request: SampleRequest = serde_json::from_value(body.clone()).unwrap();
                let message = plan(&request, &info, true, &defaults)
                    .unwrap_err()
                    .to_string();
                for field in fields {
                    assert!(
                        message.contains(field),
                        "{body}: {message:?} names no {field}"
                    );
                }
            };
            refused(
                json!({"class": 0, "classes": [1]}),
                &["`class`", "`classes`"],
            );
            refused(json!({"classes": [0, 1], "n": 3}), &["n = ", "`classes`"]);
            refused(json!({"sampler": "ddpm", "eta": 0.5}), &["eta", "ddpm"]);
        }
        // η with the server's default sampler, when that is ddpm.
        let request: SampleRequest = serde_json::from_value(json!({"eta": 0.5})).unwrap();
        assert!(plan(&request, &info, true, &defaults(SamplerKind::Ddpm)).is_err());
        assert!(plan(&request, &info, true, &defaults(SamplerKind::Ddim)).is_ok());
    }

    #[test]
    fn an_unconditional_model_takes_no_classes() {
        let info = info(&[]);
        let s = schemas(&defaults(SamplerKind::Ddim), Some((&info, false)));
        let properties = &s["SampleRequest"]["properties"];
        assert!(properties.get("class").is_none());
        assert!(properties.get("classes").is_none());
        assert!(properties.get("n").is_some());
    }
}
