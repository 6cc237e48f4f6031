//! `POST /v1/samples`: formats, sizes, classes, seeds.

use serde_json::json;

use crate::helpers::{channel_means, decode_png, json_png, spawn_app, Options, IMAGE_SIZE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn png_json_and_zip_answers_decode_to_the_right_size_and_count() {
    let app = spawn_app(Options::default()).await;

    let one = app
        .sample(json!({"class": "red", "seed": 1}), "image/png")
        .await;
    assert_eq!(one.status(), 200);
    assert_eq!(one.headers()["content-type"], "image/png");
    assert_eq!(
        one.headers()["x-ddpm-run-id"],
        app.run_id.to_string().as_str()
    );
    assert_eq!(one.headers()["x-ddpm-step"], "100");
    let (w, h, _) = decode_png(&one.bytes().await.unwrap());
    assert_eq!((w, h), (IMAGE_SIZE, IMAGE_SIZE));

    let grid = app
        .sample(
            json!({"classes": ["red", "green", "blue", 0, 1]}),
            "image/png",
        )
        .await;
    assert_eq!(grid.status(), 200);
    assert_eq!(grid.headers()["x-ddpm-grid-columns"], "3");
    assert_eq!(grid.headers()["x-ddpm-grid-rows"], "2");
    assert_eq!(grid.headers()["x-ddpm-classes"], "red,green,blue,red,green");
    let layout = ddpm_server::encode::GridLayout::new(5, IMAGE_SIZE, IMAGE_SIZE);
    let (w, h, _) = decode_png(&grid.bytes().await.unwrap());
    assert_eq!((w, h), (layout.width, layout.height));

    let body = app
        .sample_json(json!({"class": "green", "n": 3, "seed": 42, "steps": 10}))
        .await;
    let images = body["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    for (i, image) in images.iter().enumerate() {
        assert_eq!(image["class"], "green");
        assert_eq!(image["class_index"], 1);
        assert_eq!(image["seed"], 42 + i as u64);
        assert_eq!(image["run_id"], app.run_id);
        assert_eq!(image["step"], 100);
        let (w, h, _) = decode_png(&json_png(&body, i));
        assert_eq!((w, h), (IMAGE_SIZE, IMAGE_SIZE));
    }
    assert_eq!(body["model"]["step"], 100);
    assert_eq!(body["sampler"]["steps"], 10);

    let zip = app
        .sample(
            json!({"classes": ["blue", "red"], "seed": 5}),
            "application/zip",
        )
        .await;
    assert_eq!(zip.status(), 200);
    assert_eq!(zip.headers()["content-type"], "application/zip");
    let bytes = zip.bytes().await.unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    assert_eq!(archive.len(), 2);
    let names: Vec<String> = archive.file_names().map(String::from).collect();
    assert!(
        names.contains(&"000-blue-seed5.png".to_string()),
        "{names:?}"
    );
    let mut png = Vec::new();
    std::io::Read::read_to_end(&mut archive.by_name("001-red-seed6.png").unwrap(), &mut png)
        .unwrap();
    assert_eq!(decode_png(&png).0, IMAGE_SIZE);

    // Unconditional samples work too.
    let body = app.sample_json(json!({"n": 2})).await;
    assert_eq!(body["images"][0]["class"], serde_json::Value::Null);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_of_a_class_has_that_class_colour() {
    let app = spawn_app(Options::default()).await;
    for (class, name) in ["red", "green", "blue"].iter().enumerate() {
        let body = app
            .sample_json(
                json!({"class": name, "n": 4, "seed": 10, "guidance_scale": 3.0, "steps": 50}),
            )
            .await;
        let mut right = 0;
        for i in 0..4 {
            let (_, _, rgb) = decode_png(&json_png(&body, i));
            let means = channel_means(&rgb);
            let brightest = (0..3)
                .max_by(|&a, &b| means[a].total_cmp(&means[b]))
                .unwrap();
            if brightest == class {
                right += 1;
            }
        }
        assert!(right >= 3, "only {right}/4 {name} images are mostly {name}");
    }
    app.stop().await.unwrap();
}

/// Max |Δ| ≤ 1e-4 in [-1, 1] is at most one level after rounding to uint8.
fn max_level_difference(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_seed_gives_the_same_image_alone_and_inside_a_batch() {
    let app = spawn_app(Options::default()).await;
    let settings = json!({"guidance_scale": 2.0, "sampler": "ddim", "steps": 25, "eta": 0.5});
    let with = |extra: serde_json::Value| {
        let mut body = settings.clone();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let alone = app
        .sample_json(with(json!({"class": "blue", "seed": 1001})))
        .await;
    let again = app
        .sample_json(with(json!({"class": "blue", "seed": 1001})))
        .await;
    let alone_png = decode_png(&json_png(&alone, 0)).2;
    assert_eq!(
        alone_png,
        decode_png(&json_png(&again, 0)).2,
        "same seed, same image"
    );

    // Image 1 of a mixed request seeded 1000 has seed 1001 and class blue; run it while
    // other requests (other classes, samplers, step counts) share the forward passes.
    let mixed = with(json!({"classes": ["red", "blue", "green"], "seed": 1000}));
    let noise = (0..3).map(|k| {
        app.sample_json(json!({"class": k, "n": 2, "seed": 7 + k, "sampler": if k % 2 == 0 { "ddpm" } else { "ddim" }, "steps": 15 + 10 * k}))
    });
    let (batched, _others) = tokio::join!(app.sample_json(mixed), futures::future::join_all(noise));
    assert_eq!(batched["images"][1]["seed"], 1001);
    let batched_png = decode_png(&json_png(&batched, 1)).2;
    let d = max_level_difference(&alone_png, &batched_png);
    assert!(d <= 1, "the batched image differs by {d} levels");
    let other_seed = app
        .sample_json(with(json!({"class": "blue", "seed": 1002})))
        .await;
    assert_ne!(
        alone_png,
        decode_png(&json_png(&other_seed, 0)).2,
        "another seed, another image"
    );
    app.stop().await.unwrap();
}

/// A request that leaves the sampler options unset gets exactly the image of one that sets
/// them to the server's defaults (the shipped ones: the SDE solver for dpmpp_2m, guidance
/// at 80 ≤ t ≤ 580 for every sampler), for every sampler; a non-default option changes
/// the image, is reported back, and batches with other requests like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unset_sampler_options_equal_their_explicit_defaults() {
    let app = spawn_app(Options::default()).await;
    for (sampler, spacing, algorithm) in [
        ("ddpm", "trailing", "dpmsolver++"),
        ("ddim", "trailing", "dpmsolver++"),
        ("dpmpp_2m", "linspace", "sde-dpmsolver++"),
    ] {
        let base = json!({"class": "green", "seed": 31, "sampler": sampler, "steps": 6});
        let mut explicit = base.clone();
        explicit.as_object_mut().unwrap().extend(
            json!({"timestep_spacing": spacing, "variance_type": "fixed_small", "eta": 0.0,
                "thresholding": "static", "guidance_rescale": 0.0,
                "guidance_interval": [80, 580], "algorithm_type": algorithm})
            .as_object()
            .unwrap()
            .clone(),
        );
        let unset = app.sample_json(base).await;
        let set = app.sample_json(explicit).await;
        assert_eq!(json_png(&unset, 0), json_png(&set, 0), "{sampler}");
        assert_eq!(unset["sampler"]["timestep_spacing"], spacing);
        assert_eq!(unset["sampler"]["variance_type"], "fixed_small");
        assert_eq!(unset["sampler"]["thresholding"], "static");
        assert_eq!(unset["sampler"]["guidance_rescale"], 0.0);
        assert_eq!(unset["sampler"]["guidance_interval"], json!([80, 580]));
    }

    let options = json!({"class": "red", "seed": 5, "sampler": "ddpm", "steps": 8,
        "timestep_spacing": "leading", "variance_type": "fixed_large",
        "thresholding": "dynamic", "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5,
        "guidance_rescale": 0.7, "guidance_interval": [100, 700]});
    let alone = app.sample_json(options.clone()).await;
    assert_eq!(alone["sampler"]["timestep_spacing"], "leading");
    assert_eq!(alone["sampler"]["variance_type"], "fixed_large");
    assert_eq!(alone["sampler"]["thresholding"], "dynamic");
    assert_eq!(alone["sampler"]["sample_max_value"], 1.5);
    assert_eq!(alone["sampler"]["guidance_rescale"], 0.7);
    assert_eq!(alone["sampler"]["guidance_interval"], json!([100, 700]));
    let plain = app
        .sample_json(json!({"class": "red", "seed": 5, "sampler": "ddpm", "steps": 8}))
        .await;
    assert_ne!(json_png(&alone, 0), json_png(&plain, 0), "the options act");
    // The SDE solver: seeded like the others, and not the ODE's image.
    let sde = json!({"class": "blue", "seed": 8, "sampler": "dpmpp_2m", "steps": 6,
        "algorithm_type": "sde-dpmsolver++"});
    let sde_image = app.sample_json(sde.clone()).await;
    assert_eq!(sde_image["sampler"]["algorithm_type"], "sde-dpmsolver++");
    assert_eq!(
        json_png(&sde_image, 0),
        json_png(&app.sample_json(sde.clone()).await, 0),
        "the same seed, the same SDE sample"
    );
    let ode = app
        .sample_json(
            json!({"class": "blue", "seed": 8, "sampler": "dpmpp_2m", "steps": 6,
            "algorithm_type": "dpmsolver++"}),
        )
        .await;
    assert_ne!(json_png(&sde_image, 0), json_png(&ode, 0));
    // With other samplers and options in the same forward passes.
    let others = [
        ("ddim", "linspace", "none"),
        ("dpmpp_2m", "leading", "static"),
        ("ddpm", "trailing", "dynamic"),
    ]
    .into_iter()
    .zip(0..)
    .map(|((sampler, spacing, thresholding), k)| {
        app.sample_json(
            json!({"class": k, "n": 2, "seed": 70 + k, "steps": 5 + 3 * k,
                "sampler": sampler, "timestep_spacing": spacing, "thresholding": thresholding,
                "guidance_interval": [0, 300 * k + 100]}),
        )
    });
    let (batched, sde_batched, _) = tokio::join!(
        app.sample_json(options),
        app.sample_json(sde),
        futures::future::join_all(others)
    );
    let d = max_level_difference(
        &decode_png(&json_png(&sde_image, 0)).2,
        &decode_png(&json_png(&sde_batched, 0)).2,
    );
    assert!(d <= 1, "the batched SDE image differs by {d} levels");
    let d = max_level_difference(
        &decode_png(&json_png(&alone, 0)).2,
        &decode_png(&json_png(&batched, 0)).2,
    );
    assert!(d <= 1, "the batched image differs by {d} levels");
    app.stop().await.unwrap();
}
