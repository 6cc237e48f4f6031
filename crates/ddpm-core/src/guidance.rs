//! Classifier-free guidance (Ho & Salimans 2022) in one forward pass.
//!
//! ε̃ = ε(x, ∅) + w·(ε(x, y) − ε(x, ∅)), with a guidance scale w per sample. The
//! conditional and unconditional inputs go through the network as one batch; samples that
//! need no unconditional half (w = 1, or no class) are not duplicated, so a batch of B
//! costs a forward pass of B + k where k samples are guided.
//!
//! Every tensor operation here is a fallible `f_*` one: a libtorch failure comes back as a
//! [`CoreError`] whose [`crate::DeviceFault`] says whether the device survived it. Only the
//! network's own forward pass (`UNet::forward`) may still panic.

use tch::{Device, Kind, Tensor};

use crate::{
    error::{CoreError, Result},
    unet::Model,
};

/// Whether sample `i` needs the unconditional prediction.
fn needs_uncond(label: i64, null: Option<i64>, w: f64) -> bool {
    null.is_some_and(|n| label != n) && w != 1.0
}

/// ε̃ for `x: [B, C, H, W]` at `t: [B]`, with per-sample `labels` (the null label for
/// "no class") and guidance scales. Call under `tch::no_grad`.
pub fn guided_epsilon(
    model: &Model,
    x: &Tensor,
    t: &Tensor,
    labels: &[i64],
    guidance_scales: &[f64],
) -> Result<Tensor> {
    let b = x.size()[0];
    if labels.len() as i64 != b || guidance_scales.len() as i64 != b {
        return Err(CoreError::Input(format!(
            "{} labels and {} guidance scales for a batch of {b}",
            labels.len(),
            guidance_scales.len()
        )));
    }
    if let Some(w) = guidance_scales.iter().find(|w| !w.is_finite()) {
        return Err(CoreError::Input(format!(
            "guidance scale {w} is not finite"
        )));
    }
    let device = x.device();
    let null = model.config().null_label();
    // Validate labels on the host: checking the tensor would sync with the GPU every step.
    if let Some(n) = null {
        if let Some(l) = labels.iter().find(|&&l| !(0..=n).contains(&l)) {
            return Err(CoreError::Input(format!(
                "label {l} is outside 0..={n} (null = {n})"
            )));
        }
    }
    check_input(model, x, t)?;
    let labels_t = Tensor::f_from_slice(labels)?.f_to_device(device)?;
    let guided: Vec<i64> = (0..b)
        .filter(|&i| needs_uncond(labels[i as usize], null, guidance_scales[i as usize]))
        .collect();
    if guided.is_empty() {
        return Ok(model.net.forward(x, t, Some(&labels_t)));
    }
    let k = guided.len() as i64;
    let all = k == b;
    let (x_u, t_u) = if all {
        (x.shallow_clone(), t.shallow_clone())
    } else {
        let idx = Tensor::f_from_slice(&guided)?.f_to_device(device)?;
        (x.f_index_select(0, &idx)?, t.f_index_select(0, &idx)?)
    };
    let null_labels = Tensor::f_full([k], null.unwrap_or(0), (Kind::Int64, device))?;
    let x_in = Tensor::f_cat(&[x, &x_u], 0)?; // [B + k, C, H, W]
    let t_in = Tensor::f_cat(&[t, &t_u], 0)?;
    let l_in = Tensor::f_cat(&[&labels_t, &null_labels], 0)?;
    let out = model.net.forward(&x_in, &t_in, Some(&l_in));
    let cond = out.f_narrow(0, 0, b)?; // [B, C, H, W]
    let uncond = out.f_narrow(0, b, k)?; // [k, C, H, W]
    let w: Vec<f32> = guided
        .iter()
        .map(|&i| guidance_scales[i as usize] as f32)
        .collect();
    let w = Tensor::f_from_slice(&w)?
        .f_to_device(device)?
        .f_view([k, 1, 1, 1])?;
    if all {
        // torch.lerp(uncond, cond, w) = uncond + w·(cond − uncond).
        return Ok(uncond.f_lerp_tensor(&cond, &w)?);
    }
    let idx = Tensor::f_from_slice(&guided)?.f_to_device(device)?;
    let cond_sel = cond.f_index_select(0, &idx)?;
    let mixed = uncond.f_lerp_tensor(&cond_sel, &w)?;
    Ok(cond.f_index_copy(0, &idx, &mixed)?)
}

/// Shape checks that need no device sync: x is `[B, C, S, S]` for the model, t is `[B]`.
fn check_input(model: &Model, x: &Tensor, t: &Tensor) -> Result<()> {
    let cfg = model.config();
    let size = x.size();
    if size.len() != 4 || size[1..] != [cfg.in_channels, cfg.image_size, cfg.image_size] {
        return Err(CoreError::Input(format!(
            "x has shape {size:?}, the model takes [B, {}, {}, {}]",
            cfg.in_channels, cfg.image_size, cfg.image_size
        )));
    }
    if t.size() != [size[0]] {
        return Err(CoreError::Input(format!(
            "t has shape {:?}, expected [{}]",
            t.size(),
            size[0]
        )));
    }
    Ok(())
}

/// A `[B]` int64 tensor of timesteps on `device`.
pub(crate) fn timestep_tensor(timesteps: &[i64], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(timesteps)?.f_to_device(device)?)
}
