//! The bounds of a sampling request that the types cannot know, filled into the generated
//! `SampleRequest` and `ClassRef` schemas so that they say what [`crate::validate::plan`]
//! enforces on this server with this model:
//!
//! - `n` and the length of `classes`: at most --max-images-per-request;
//! - `steps`: at most the model's T;
//! - `ClassRef`: the model's class indices and names (no `class` or `classes` at all for an
//!   unconditional model);
//! - rules between fields: `class` or `classes`, not both; `n` with `classes` only as its
//!   length; η only with the ddim sampler (named, or the server's default).
//!
//! utoipa models no `not` and no `if`/`then`; its schema extensions are written inline into
//! the schema object, so the rules between fields travel there as plain JSON Schema
//! (OpenAPI 3.1 schemas are JSON Schema 2020-12).

use ddpm_core::SamplerKind;
use serde_json::{json, Value};
use utoipa::openapi::{extensions::Extensions, Object, OpenApi as Document, RefOr, Schema};

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
    let rules = request.extensions.get_or_insert_with(Extensions::default);
    rules.insert("not".into(), class_with_classes());
    rules.insert(
        "allOf".into(),
        json!([
            n_with_classes(max_n),
            eta_with_ddpm(defaults.default_sampler)
        ]),
    );
}

/// `class` and `classes` both given (null is absent).
fn class_with_classes() -> Value {
    json!({
        "required": ["class", "classes"],
        "properties": {
            "class": { "type": ["integer", "string"] },
            "classes": { "type": "array" },
        },
    })
}

/// `n` and `classes` both given: then `n` is the length of `classes` (JSON Schema has no
/// "equals the length of", so each possible length is listed).
fn n_with_classes(max_n: usize) -> Value {
    let lengths: Vec<Value> = (1..=max_n)
        .map(|k| json!({ "properties": { "n": { "const": k }, "classes": { "minItems": k, "maxItems": k } } }))
        .collect();
    json!({
        "if": {
            "required": ["n", "classes"],
            "properties": { "n": { "type": "integer" }, "classes": { "type": "array" } },
        },
        "then": { "anyOf": lengths },
    })
}

/// A request that samples with DDPM (it names ddpm, or names no sampler and ddpm is the
/// default) has no η, or η = 0.
fn eta_with_ddpm(default: SamplerKind) -> Value {
    let ddpm = match default {
        SamplerKind::Ddpm => json!({ "properties": { "sampler": { "enum": ["ddpm", null] } } }),
        SamplerKind::Ddim | SamplerKind::DpmPp2m => json!({
            "properties": { "sampler": { "const": "ddpm" } },
            "required": ["sampler"],
        }),
    };
    json!({ "if": ddpm, "then": { "properties": { "eta": { "enum": [0, null] } } } })
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

    #[test]
    fn the_rules_between_fields_are_stated() {
        let s = schemas(&defaults(SamplerKind::Ddim), None);
        let request = &s["SampleRequest"];
        assert_eq!(request["additionalProperties"], false);
        assert_eq!(request["not"]["required"], json!(["class", "classes"]));
        let [n, eta] = [&request["allOf"][0], &request["allOf"][1]];
        assert_eq!(n["if"]["required"], json!(["n", "classes"]));
        assert_eq!(n["then"]["anyOf"].as_array().unwrap().len(), 4);
        assert_eq!(n["then"]["anyOf"][3]["properties"]["n"]["const"], 4);
        assert_eq!(eta["if"]["required"], json!(["sampler"]));
        assert_eq!(eta["then"]["properties"]["eta"]["enum"], json!([0, null]));
        let ddpm_default = schemas(&defaults(SamplerKind::Ddpm), None);
        assert_eq!(
            ddpm_default["SampleRequest"]["allOf"][1]["if"]["properties"]["sampler"]["enum"],
            json!(["ddpm", null])
        );
        assert!(request["properties"].get("steps").is_some());
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
